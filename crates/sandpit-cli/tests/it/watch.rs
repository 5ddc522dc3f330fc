//! File watches end to end: `GET /v1/sandboxes/{id}/watch` (Server-Sent Events, through
//! `sandpit_sdk::Client::watch`) on a real sandbox's inotify: creates, changes (one that
//! keeps size and mtime), removes, renames, excludes, new subdirectories; hostile queries
//! and another workspace refused before anything starts. The CodeSandbox `fs.watch` and zip
//! download run in `csb.rs`. The bound on queued events (an `overflow` event in place of
//! growth) is unit-tested on `EventQueue`: end to end, the socket buffers between server
//! and client absorbed 50,000 events (3.7 MB) without a stall, so no test here can make a
//! client fall behind deterministically.

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use sandpit_sdk::types::{FileEvent, TokenCreateRequest};
use sandpit_sdk::{Client, SdkError};

use crate::{assert_api_err, base, create, server, sh};

/// How long an expected event may take.
const WAIT: Duration = Duration::from_secs(30);

type Events = Pin<Box<dyn Stream<Item = Result<FileEvent, SdkError>> + Send>>;

struct Watcher {
    events: Events,
    seen: Vec<FileEvent>,
}

impl Watcher {
    async fn start(client: &Client, id: &str, path: &str, excludes: &[&str]) -> Watcher {
        let events = client
            .watch(id, path, true, excludes)
            .await
            .expect("the watch starts");
        Watcher {
            events: Box::pin(events),
            seen: Vec::new(),
        }
    }

    /// Read until an event of `kind` for `path`; returns how long that took.
    async fn until(&mut self, kind: &str, path: &str) -> Duration {
        let start = Instant::now();
        let from = self.seen.len();
        tokio::time::timeout(WAIT, async {
            while !self.seen[from..]
                .iter()
                .any(|e| e.kind == kind && e.path == path)
            {
                let e = self.events.next().await.expect("the stream goes on");
                self.seen.push(e.expect("a well-formed event"));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {kind} {path} in {:?}", &self.seen[from..]));
        start.elapsed()
    }
}

#[tokio::test]
async fn a_watch_streams_every_kind_of_change() {
    let srv = server().await;
    let client = srv.client();
    let sb = create(&client, base()).await;
    let id = sb.id.as_str();
    let r = sh(
        &client,
        id,
        "mkdir -p /w/node_modules && printf aaaa > /w/same.txt",
    )
    .await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    let mut w = Watcher::start(&client, id, "/w", &["**/node_modules/**", "*.log"]).await;

    let mut latencies = Vec::new();
    sh(
        &client,
        id,
        "echo x > /w/node_modules/x.js; echo x > /w/skip.log; echo 1 > /w/a.txt",
    )
    .await;
    latencies.push(w.until("add", "/w/a.txt").await);

    // Same size, same mtime (set back from a reference): inotify still sees the write.
    let r = sh(
        &client,
        id,
        "touch -r /w/same.txt /tmp/ref && printf bbbb > /w/same.txt && touch -r /tmp/ref /w/same.txt \
         && [ \"$(stat -c %s.%Y /w/same.txt)\" = \"$(stat -c 4.%Y /tmp/ref)\" ] && cat /w/same.txt",
    )
    .await;
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "bbbb"), "{r:?}");
    latencies.push(w.until("change", "/w/same.txt").await);

    sh(&client, id, "mv /w/a.txt /w/b.txt").await;
    latencies.push(w.until("add", "/w/b.txt").await);
    assert!(
        w.seen
            .iter()
            .any(|e| e.kind == "remove" && e.path == "/w/a.txt"),
        "a rename is a remove and an add: {:?}",
        w.seen
    );

    // A directory made after the watch started is followed, with what was made in it at once.
    sh(
        &client,
        id,
        "mkdir -p /w/sub/deeper && echo f > /w/sub/deeper/f",
    )
    .await;
    latencies.push(w.until("add", "/w/sub/deeper/f").await);
    sh(&client, id, "echo g > /w/sub/deeper/g").await;
    latencies.push(w.until("add", "/w/sub/deeper/g").await);

    sh(&client, id, "rm /w/b.txt").await;
    latencies.push(w.until("remove", "/w/b.txt").await);
    assert!(
        !w.seen
            .iter()
            .any(|e| e.path.contains("node_modules") || e.path.ends_with(".log")),
        "excluded paths were reported: {:?}",
        w.seen
    );

    // The watched directory going away ends the stream.
    sh(&client, id, "rm -rf /w").await;
    w.until("end", "/w").await;
    let end = w.seen.last().unwrap();
    assert_eq!(end.reason.as_deref(), Some("gone"), "{end:?}");
    latencies.sort();
    eprintln!(
        "watch: time from the exec's answer to the event, median {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies.last().unwrap()
    );
    client.destroy_sandbox(id).await.unwrap();
}

#[tokio::test]
async fn hostile_watches_are_refused_before_anything_starts() {
    let srv = server().await;
    let client = srv.client();
    let sb = create(&client, base()).await;
    let id = sb.id.as_str();
    let long = "x".repeat(300);
    let many: Vec<&str> = vec!["x"; 65];
    let deep = format!("/{}", "a/".repeat(3000));
    for (path, excludes, code) in [
        ("w", &[][..], "invalid_path"),
        ("/w/../etc", &[], "invalid_path"),
        (deep.as_str(), &[], "invalid_path"),
        ("/tmp", &[long.as_str()][..], "invalid_exclude"),
        ("/tmp", &many[..], "invalid_exclude"),
        ("/tmp", &["a\0b"], "invalid_exclude"),
    ] {
        assert_api_err(
            client.watch(id, path, true, excludes).await.map(drop),
            400,
            code,
        );
    }
    assert_api_err(
        client.watch(id, "/nope", true, &[]).await.map(drop),
        404,
        "file_not_found",
    );

    // Another workspace's token: refused as every /v1 sandbox route refuses it.
    let admin = srv.client();
    let ws_b = admin.create_workspace("tenant-b").await.unwrap();
    let tok_b = admin
        .create_token(&ws_b.id, &TokenCreateRequest::default())
        .await
        .unwrap();
    let b = srv.client_with(tok_b.token.as_deref().unwrap());
    assert_api_err(
        b.watch(id, "/tmp", true, &[]).await.map(drop),
        403,
        "forbidden",
    );
    // Even with a malformed query, the workspace check comes first.
    assert_api_err(
        b.watch(id, "relative", true, &[]).await.map(drop),
        403,
        "forbidden",
    );
    client.destroy_sandbox(id).await.unwrap();
}
