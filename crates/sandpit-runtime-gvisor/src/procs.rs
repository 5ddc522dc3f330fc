//! Finding the host processes of one runsc sandbox (`runsc-sandbox` and `runsc-gofer`).
#![expect(clippy::disallowed_methods, reason = "/proc is the kernel's")]

use std::path::Path;

/// Pids of live (non-zombie) processes that belong to sandbox `id` under runsc root `root`:
/// the sentry (`runsc-sandbox ... boot ... <id>`) and the gofer (`runsc-gofer ...
/// --bundle=<bundle>`). runsc re-executes itself with these names and `--root=<root>`.
pub(crate) fn sandbox_pids(root: &Path, id: &str, bundle: Option<&Path>) -> Vec<i32> {
    let root_arg = format!("--root={}", root.display());
    let bundle_arg = bundle.map(|b| format!("--bundle={}", b.display()));
    let mut pids = Vec::new();
    for pid in host_pids() {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .collect();
        if matches_sandbox(&args, &root_arg, id, bundle_arg.as_deref()) && is_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

fn matches_sandbox(args: &[&[u8]], root_arg: &str, id: &str, bundle_arg: Option<&str>) -> bool {
    let Some(argv0) = args.first() else {
        return false;
    };
    if !args.contains(&root_arg.as_bytes()) {
        return false;
    }
    let name = argv0.rsplit(|b| *b == b'/').next().unwrap_or(argv0);
    match name {
        b"runsc-sandbox" => args.last() == Some(&id.as_bytes()),
        b"runsc-gofer" => bundle_arg.is_some_and(|b| args.contains(&b.as_bytes())),
        _ => false,
    }
}

/// Every process of the host now (the numeric entries of `/proc`); empty if `/proc` cannot
/// be read.
pub fn host_pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether `pid` exists and is not a zombie.
pub(crate) fn is_alive(pid: i32) -> bool {
    Started::of(pid).is_some()
}

/// A process as it started: its pid and start time (clock ticks after boot), so a pid the
/// kernel reused for another process is not taken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Started {
    pid: i32,
    start: u64,
}

impl Started {
    /// `pid` now, if it exists and is not a zombie.
    pub(crate) fn of(pid: i32) -> Option<Started> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let start = live_start_time(&stat)?;
        Some(Started { pid, start })
    }

    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the same process still runs (not a zombie).
    pub(crate) fn still_running(&self) -> bool {
        Started::of(self.pid) == Some(*self)
    }
}

/// The start time in `/proc/<pid>/stat` of a process that is not a zombie.
fn live_start_time(stat: &str) -> Option<u64> {
    // The fields follow the parenthesised command name, which may contain spaces: state is
    // field 3, starttime field 22.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<&[u8]> {
        s.split(' ').map(str::as_bytes).collect()
    }

    #[test]
    fn matches_sentry_and_gofer() {
        let root = "--root=/r";
        let sentry = args("runsc-sandbox --root=/r --network=none boot --bundle=/s/b sbx-1");
        assert!(matches_sandbox(&sentry, root, "sbx-1", None));
        assert!(!matches_sandbox(&sentry, root, "sbx-10", None));
        assert!(!matches_sandbox(&sentry, "--root=/other", "sbx-1", None));
        let gofer = args("runsc-gofer --root=/r gofer --bundle=/s/b --io-fds=5");
        assert!(matches_sandbox(
            &gofer,
            root,
            "sbx-1",
            Some("--bundle=/s/b")
        ));
        assert!(!matches_sandbox(
            &gofer,
            root,
            "sbx-1",
            Some("--bundle=/s/c")
        ));
        assert!(!matches_sandbox(&gofer, root, "sbx-1", None));
        let client = args("runsc --root=/r state sbx-1");
        assert!(!matches_sandbox(
            &client,
            root,
            "sbx-1",
            Some("--bundle=/s/b")
        ));
    }

    #[test]
    fn start_time_of_live_processes_only() {
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 3 4 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(live_start_time(stat), Some(987654));
        assert_eq!(live_start_time(&stat.replace(") S ", ") Z ")), None);
        assert_eq!(live_start_time("42 (a) S 1"), None);
        let me = Started::of(std::process::id() as i32).unwrap();
        assert!(me.still_running());
        assert!(Started::of(i32::MAX).is_none());
    }

    #[test]
    fn own_process_is_not_a_zombie() {
        assert!(is_alive(std::process::id() as i32));
        assert!(!is_alive(i32::MAX));
    }
}
