//! The fallback `fs/watch` of the agent gateway, for agents older than protocol version 4
//! (a sandbox restored from a snapshot taken with one), which have no inotify watch: the
//! watched tree is listed through the agent (every [`WATCH_POLL`]) and compared with the
//! previous listing. A change that keeps a file's size and modification second is not seen,
//! and a tree larger than [`MAX_ENTRIES`] is watched only in part. Every other agent's
//! watches go through `Op::Watch` (see `gateway.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use sandpit_agent_proto::{AgentErrorCode, EntryKind};

use sandpit_control::agent::{AgentClient, AgentFailure};

/// How often watched trees are listed.
pub const WATCH_POLL: Duration = Duration::from_millis(450);
/// Most entries one watch follows.
pub const MAX_ENTRIES: usize = 5000;

/// What a listing remembers of an entry: kind, size, mtime.
pub type Entry = (bool, u64, i64);

/// One `fs/watch`.
#[derive(Debug, Clone)]
pub struct Watch {
    pub path: String,
    pub recursive: bool,
    pub excludes: Vec<String>,
    pub seen: BTreeMap<String, Entry>,
}

/// A change, as `fs/watchEvent` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `add`, `change` or `remove`.
    pub kind: &'static str,
    pub paths: Vec<String>,
}

/// Whether `path` (absolute) is excluded by one of the SDK's glob patterns. Supported shapes:
/// `name`, `**/name`, `**/name/**`, `name/**` (a path component equal to `name`), and `*.ext`
/// (a final component ending in `.ext`).
pub fn excluded(path: &str, excludes: &[String]) -> bool {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    excludes.iter().any(|pat| {
        let core = pat
            .trim_start_matches("**/")
            .trim_end_matches("/**")
            .trim_matches('/');
        if let Some(ext) = core.strip_prefix("*.") {
            return parts
                .last()
                .is_some_and(|l| l.ends_with(&format!(".{ext}")));
        }
        !core.is_empty() && !core.contains('*') && parts.contains(&core)
    })
}

/// List the watched tree: the directory's entries (recursively if asked), or the file itself.
pub async fn snapshot(
    agent: &AgentClient,
    root: &str,
    recursive: bool,
    excludes: &[String],
) -> Result<BTreeMap<String, Entry>, AgentFailure> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_string()];
    while let Some(dir) = dirs.pop() {
        let listing = match agent.list_dir(&dir).await {
            Ok(l) => l,
            Err(AgentFailure::Refused(e))
                if dir == root && e.code == AgentErrorCode::NotDirectory =>
            {
                let info = agent.stat(root).await?;
                out.insert(root.to_string(), (false, info.size, info.mtime));
                return Ok(out);
            }
            // A directory that vanished between listings: its removal shows next round.
            Err(AgentFailure::Refused(_)) if dir != root => continue,
            Err(e) => return Err(e),
        };
        for e in listing.entries {
            let path = if dir == "/" {
                format!("/{}", e.name)
            } else {
                format!("{dir}/{}", e.name)
            };
            if excluded(&path, excludes) {
                continue;
            }
            let is_dir = e.info.kind == EntryKind::Dir;
            out.insert(path.clone(), (is_dir, e.info.size, e.info.mtime));
            if is_dir && recursive {
                dirs.push(path);
            }
            if out.len() >= MAX_ENTRIES {
                return Ok(out);
            }
        }
    }
    Ok(out)
}

/// The changes from `old` to `new`, grouped by kind (adds, changes, removes).
pub fn diff(old: &BTreeMap<String, Entry>, new: &BTreeMap<String, Entry>) -> Vec<Event> {
    let mut add = Vec::new();
    let mut change = Vec::new();
    let mut remove = Vec::new();
    for (p, e) in new {
        match old.get(p) {
            None => add.push(p.clone()),
            // Directories change when their entries do; those are reported themselves.
            Some(o) if o != e && !(o.0 && e.0) => change.push(p.clone()),
            _ => {}
        }
    }
    for p in old.keys() {
        if !new.contains_key(p) {
            remove.push(p.clone());
        }
    }
    [("add", add), ("change", change), ("remove", remove)]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(kind, paths)| Event { kind, paths })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs_report_adds_changes_and_removes() {
        let mut a = BTreeMap::new();
        a.insert("/w/x".to_string(), (false, 1, 10));
        a.insert("/w/d".to_string(), (true, 4096, 10));
        a.insert("/w/gone".to_string(), (false, 1, 10));
        let mut b = a.clone();
        b.remove("/w/gone");
        b.insert("/w/x".into(), (false, 2, 11));
        b.insert("/w/d".into(), (true, 4096, 12));
        b.insert("/w/new".into(), (false, 0, 12));
        let d = diff(&a, &b);
        assert_eq!(
            d,
            vec![
                Event {
                    kind: "add",
                    paths: vec!["/w/new".into()]
                },
                Event {
                    kind: "change",
                    paths: vec!["/w/x".into()]
                },
                Event {
                    kind: "remove",
                    paths: vec!["/w/gone".into()]
                },
            ]
        );
        assert!(diff(&b, &b).is_empty());
    }

    #[test]
    fn excludes_match_components_and_extensions() {
        let ex = vec!["**/node_modules/**".to_string(), "*.log".to_string()];
        assert!(excluded("/p/node_modules/a.js", &ex));
        assert!(excluded("/p/x.log", &ex));
        assert!(!excluded("/p/src/a.js", &ex));
        assert!(!excluded("/p/node_modules_x", &ex));
    }
}
