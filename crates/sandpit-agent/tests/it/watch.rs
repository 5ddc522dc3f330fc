//! Watches (protocol version 4) against the real agent on the host's own inotify: creates,
//! changes (one that keeps size and mtime too), removes, renames, excludes, new
//! subdirectories, a watched file, and refusals before anything starts.

use std::time::Duration;

use sandpit_agent_proto::client;
use sandpit_agent_proto::{AgentErrorCode, ProtoError, WatchEvent, WatchEventKind, WatchRequest};
use tokio::net::TcpStream;

use super::{Agent, close};

/// How long an expected event may take.
const WAIT: Duration = Duration::from_secs(15);

struct Watcher {
    s: TcpStream,
    seen: Vec<WatchEvent>,
}

impl Watcher {
    async fn start(agent: &Agent, req: WatchRequest) -> Result<Watcher, ProtoError> {
        let mut s = TcpStream::connect(agent.addr).await.unwrap();
        client::watch(&mut s, req).await?;
        Ok(Watcher {
            s,
            seen: Vec::new(),
        })
    }

    /// Read until an event of `kind` for `path` arrived; returns everything read meanwhile.
    async fn until(&mut self, kind: WatchEventKind, path: &str) -> Vec<WatchEvent> {
        let start = self.seen.len();
        tokio::time::timeout(WAIT, async {
            loop {
                if self.seen[start..]
                    .iter()
                    .any(|e| e.kind == kind && e.path == path)
                {
                    return;
                }
                let batch = client::read_watch_batch(&mut self.s).await.unwrap();
                self.seen.extend(batch.expect("the watch goes on"));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {kind:?} {path} in {:?}", &self.seen[start..]));
        self.seen[start..].to_vec()
    }
}

fn req(path: &std::path::Path, recursive: bool, excludes: &[&str]) -> WatchRequest {
    WatchRequest {
        path: path.to_str().unwrap().into(),
        recursive,
        excludes: excludes.iter().map(|s| s.to_string()).collect(),
    }
}

#[tokio::test]
async fn a_recursive_watch_sees_every_kind_of_change() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("node_modules")).unwrap();
    std::fs::write(root.join("same.txt"), "aaaa").unwrap();
    let mut w = Watcher::start(&agent, req(root, true, &["**/node_modules/**", "*.log"]))
        .await
        .unwrap();
    let p = |rel: &str| format!("{}/{rel}", root.display());

    std::fs::write(root.join("node_modules/x.js"), "x").unwrap();
    std::fs::write(root.join("skip.log"), "x").unwrap();
    std::fs::write(root.join("a.txt"), "1").unwrap();
    w.until(WatchEventKind::Add, &p("a.txt")).await;

    // Same size, same mtime: still a change.
    let mtime = std::fs::metadata(root.join("same.txt"))
        .unwrap()
        .modified()
        .unwrap();
    std::fs::write(root.join("same.txt"), "bbbb").unwrap();
    std::fs::File::options()
        .write(true)
        .open(root.join("same.txt"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    w.until(WatchEventKind::Change, &p("same.txt")).await;

    std::fs::rename(root.join("a.txt"), root.join("b.txt")).unwrap();
    let got = w.until(WatchEventKind::Add, &p("b.txt")).await;
    assert!(
        got.iter()
            .any(|e| e.kind == WatchEventKind::Remove && e.path == p("a.txt")),
        "{got:?}"
    );

    // A new subdirectory is followed, including what was made in it at once: a file
    // written there before its watch was in place is an add and a change.
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("sub/deeper/f"), "f").unwrap();
    let got = w.until(WatchEventKind::Change, &p("sub/deeper/f")).await;
    assert!(
        got.iter()
            .any(|e| e.kind == WatchEventKind::Add && e.path == p("sub/deeper/f")),
        "{got:?}"
    );
    std::fs::write(root.join("sub/deeper/g"), "g").unwrap();
    w.until(WatchEventKind::Add, &p("sub/deeper/g")).await;
    // Always before the watch: a tree written elsewhere and moved in. Only the scan of
    // the new directory can tell; it reports the file's content as a change.
    let outside = tempfile::tempdir_in(root.parent().unwrap()).unwrap();
    std::fs::create_dir_all(outside.path().join("moved/inner")).unwrap();
    std::fs::write(outside.path().join("moved/inner/h"), "h").unwrap();
    std::fs::write(outside.path().join("moved/inner/empty"), "").unwrap();
    std::fs::rename(outside.path().join("moved"), root.join("moved")).unwrap();
    let got = w.until(WatchEventKind::Change, &p("moved/inner/h")).await;
    let empty = p("moved/inner/empty");
    if !got
        .iter()
        .any(|e| e.kind == WatchEventKind::Add && e.path == empty)
    {
        w.until(WatchEventKind::Add, &empty).await;
    }
    assert!(
        !w.seen
            .iter()
            .any(|e| e.kind == WatchEventKind::Change && e.path == empty),
        "an empty file is only an add: {:?}",
        w.seen
    );

    std::fs::remove_file(root.join("b.txt")).unwrap();
    w.until(WatchEventKind::Remove, &p("b.txt")).await;
    assert!(
        !w.seen
            .iter()
            .any(|e| e.path.contains("node_modules") || e.path.ends_with(".log")),
        "{:?}",
        w.seen
    );

    // The root going away ends the watch.
    drop(dir);
    tokio::time::timeout(WAIT, async {
        loop {
            if client::read_watch_batch(&mut w.s).await.unwrap().is_none() {
                return;
            }
        }
    })
    .await
    .expect("the watch ends with its root");
    close(w.s);
}

#[tokio::test]
async fn a_watched_file_survives_replacement_and_bad_requests_are_refused() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.txt");
    std::fs::write(&file, "1").unwrap();
    let mut w = Watcher::start(&agent, req(&file, false, &[]))
        .await
        .unwrap();
    let path = file.to_str().unwrap();
    std::fs::write(dir.path().join("other"), "x").unwrap();
    std::fs::write(dir.path().join("f.tmp"), "2").unwrap();
    std::fs::rename(dir.path().join("f.tmp"), &file).unwrap();
    w.until(WatchEventKind::Add, path).await;
    std::fs::write(&file, "3").unwrap();
    w.until(WatchEventKind::Change, path).await;
    assert!(w.seen.iter().all(|e| e.path == path), "{:?}", w.seen);
    close(w.s);

    let code = |r: Result<Watcher, ProtoError>| match r {
        Err(ProtoError::Refused(e)) => e.code,
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("accepted"),
    };
    let missing = dir.path().join("missing");
    assert_eq!(
        code(Watcher::start(&agent, req(&missing, true, &[])).await),
        AgentErrorCode::NotFound
    );
    let mut bad = req(dir.path(), true, &[]);
    bad.path = "relative".into();
    assert_eq!(
        code(Watcher::start(&agent, bad).await),
        AgentErrorCode::InvalidPath
    );
    let many: Vec<&str> = vec!["x"; 1000];
    assert_eq!(
        code(Watcher::start(&agent, req(dir.path(), true, &many)).await),
        AgentErrorCode::BadRequest
    );
}
