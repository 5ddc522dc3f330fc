//! envd's filesystem watches, on top of the agent's inotify watch (protocol version 4):
//! `WatchDir`, a server stream (the JS SDK and Python's async SDK: a `start` event once the
//! watch is in place, then one `filesystem {name, type}` event per change), and the polling
//! trio `CreateWatcher` / `GetWatcherEvents` / `RemoveWatcher` (Python's sync SDK).
//!
//! A polling watcher is server state, kept per sandbox in [`WATCHES`] under the key
//! `(sandbox id, watcher id)`: a call names its sandbox (checked against the envd token
//! first), so a watcher id read through another sandbox is not found. It is bounded: at most
//! [`MAX_WATCHES`] watches (polling or streaming) per sandbox, at most [`MAX_QUEUED`] events
//! waiting per watcher (past that new ones are dropped), and a watcher not polled for
//! [`IDLE`] is removed and its agent connection closed.
//!
//! Like the native `/v1/sandboxes/{id}/watch`, a watch holds no sandbox lock while it lives:
//! it registers in the sandbox's live connections under the read lock while the agent
//! connection is made, then lets the lock go, so a pause never waits for it. A pause
//! (destroy, fork) cuts it: a stream ends with `unavailable`, a polling watcher answers its
//! queued events and then `unavailable` (and is gone).
//!
//! Events: the agent's `add` is `EVENT_TYPE_CREATE`, `change` `EVENT_TYPE_WRITE`, `remove`
//! `EVENT_TYPE_REMOVE`; a rename is a `REMOVE` of the old name and a `CREATE` of the new one
//! (inotify pairs are not joined), and there is no `CHMOD` (a mode change is a `WRITE`).
//! Names are relative to the watched directory. A file written through envd (the agent
//! writes a temporary file and renames it into place) is reported as envd reports a write,
//! `CREATE` then `WRITE` of the file; the temporary file is never seen.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::response::Response;
use sandpit_agent_proto::{self as proto, EntryKind, WatchEvent, WatchEventKind, WatchRequest};
use sandpit_control::agent::AgentFailure;
use sandpit_control::agent_watch::AgentWatch;
use sandpit_control::live::ConnGuard;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::connect::{self, ConnectError};
use super::envd::{Envd, failed, resolve};
use crate::lifecycle;
use crate::server::Server;

/// Most watches (polling and streaming together) one sandbox has open.
pub const MAX_WATCHES: usize = 16;
/// Most events a polling watcher holds between two polls; past that new ones are dropped.
pub const MAX_QUEUED: usize = 4096;
/// A polling watcher not polled for this long is removed.
pub const IDLE: Duration = Duration::from_secs(10 * 60);
/// How often a polling watcher checks whether it has gone idle.
const IDLE_CHECK: Duration = Duration::from_secs(15);

/// Dispatch the unary watch calls (`method` is one of them, see [`is_unary`]).
pub(super) async fn unary(
    server: &Arc<Server>,
    envd: &Envd,
    method: &str,
    msg: &[u8],
) -> Result<Value, ConnectError> {
    match method {
        "CreateWatcher" => create_watcher(server, envd, msg).await,
        "GetWatcherEvents" => {
            let m: WatcherMsg = connect::parse(msg)?;
            get_events(envd.sb.id(), &m.watcher_id)
        }
        "RemoveWatcher" => {
            let m: WatcherMsg = connect::parse(msg)?;
            remove(envd.sb.id(), &m.watcher_id)?;
            Ok(json!({}))
        }
        other => Err(ConnectError::new(
            "unimplemented",
            format!("filesystem.Filesystem/{other} is not supported by Sandpit"),
        )),
    }
}

/// Whether `method` is one of the unary watch calls.
pub(super) fn is_unary(method: &str) -> bool {
    matches!(
        method,
        "CreateWatcher" | "GetWatcherEvents" | "RemoveWatcher"
    )
}

/// `WatchDir`: a stream of `start`, then the changes, with keep-alives, until the client
/// goes, the watched directory goes (the stream ends cleanly), `Connect-Timeout-Ms` passes
/// (`deadline_exceeded`) or a pause cuts it (`unavailable`).
pub(super) async fn watch_dir(
    server: &Arc<Server>,
    envd: Envd,
    msg: &[u8],
    headers: &HeaderMap,
) -> Result<Response, ConnectError> {
    let m: WatchMsg = connect::parse(msg)?;
    let connect::StreamTiming {
        keepalive,
        deadline,
    } = connect::StreamTiming::of(headers);
    let slot = Slot::reserve(envd.sb.id(), Kind::Stream)?;
    let (root, agent_watch, live) = open(server, &envd, &m).await?;
    let (body_tx, body_rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    let stop = slot.stop.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let frames = body_tx.clone();
        let mut translate = Translate::new(&root);
        let relay = async {
            if frames
                .send(Ok(connect::frame(0, &json!({"start": {}}))))
                .await
                .is_err()
            {
                return End::Stopped;
            }
            pump(agent_watch, live, keepalive, |batch| {
                let frames = frames.clone();
                let out: Vec<Bytes> = match batch {
                    Some(batch) => batch
                        .into_iter()
                        .flat_map(|e| translate.event(e))
                        .map(|e| connect::frame(0, &json!({"filesystem": e.json()})))
                        .collect(),
                    None => vec![connect::frame(0, &json!({"keepalive": {}}))],
                };
                async move {
                    for f in out {
                        if frames.send(Ok(f)).await.is_err() {
                            return false;
                        }
                    }
                    true
                }
            })
            .await
        };
        let end = tokio::select! {
            end = relay => end,
            () = sleep_or_forever(deadline) => End::Deadline,
            () = stop.cancelled() => End::Stopped,
            () = body_tx.closed() => End::Stopped,
        };
        let error = match end {
            End::Stopped => return,
            End::Gone => None,
            other => Some(other.error()),
        };
        let _ = body_tx.send(Ok(connect::end_frame(error.as_ref()))).await;
    });
    Ok(connect::stream_body(body_rx))
}

// ---- requests ----

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WatchMsg {
    path: String,
    recursive: bool,
    // `includeEntry` and `allowNetworkMounts` need envd 0.6.3 / 0.6.4: the SDKs refuse
    // them for the version Sandpit reports, so they are ignored here.
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WatcherMsg {
    #[serde(alias = "watcher_id", rename = "watcherId")]
    watcher_id: String,
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Resolve and check the path, then start the agent's watch: registered as a live
/// connection under the sandbox's read lock, which is let go before this returns.
async fn open(
    server: &Arc<Server>,
    envd: &Envd,
    m: &WatchMsg,
) -> Result<(String, AgentWatch, ConnGuard), ConnectError> {
    let path = resolve(envd, &m.path)?;
    let (agent, guard, _) = lifecycle::running_agent(server, &envd.sb).await?;
    let info = agent.stat(&path).await.map_err(failed)?;
    if info.kind != EntryKind::Dir {
        return Err(ConnectError::new(
            "invalid_argument",
            format!("path {path} is not a directory"),
        ));
    }
    let live = server.previews.register(envd.sb.id());
    let req = WatchRequest {
        path: path.clone(),
        recursive: m.recursive,
        excludes: Vec::new(),
    };
    let agent_watch = agent.watch(req).await.map_err(watch_failed)?;
    drop(guard);
    Ok((path, agent_watch, live))
}

fn watch_failed(f: AgentFailure) -> ConnectError {
    match &f {
        AgentFailure::Refused(e) if e.code == proto::AgentErrorCode::TooManyWatches => {
            ConnectError::new("resource_exhausted", e.message.clone())
        }
        AgentFailure::Refused(e) if e.code == proto::AgentErrorCode::UnsupportedVersion => {
            ConnectError::new(
                "unimplemented",
                "this sandbox's agent predates file watches",
            )
        }
        _ => failed(f),
    }
}

// ---- the relay ----

/// Why a watch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// The watched directory went away.
    Gone,
    /// A pause (destroy, fork) cut the agent connection.
    Cut,
    /// The agent connection broke.
    Broken,
    /// `Connect-Timeout-Ms` passed.
    Deadline,
    /// The client went, removed the watcher or let it idle.
    Stopped,
}

impl End {
    fn error(&self) -> ConnectError {
        match self {
            End::Gone => ConnectError::new("not_found", "the watched directory was removed"),
            End::Cut => ConnectError::new(
                "unavailable",
                "the sandbox was paused or stopped: the watch ended, watch again",
            ),
            End::Broken => ConnectError::new(
                "unavailable",
                "the connection to the sandbox broke: the watch ended, watch again",
            ),
            End::Deadline => ConnectError::new("deadline_exceeded", "the watch timed out"),
            End::Stopped => ConnectError::new("not_found", "no such watcher"),
        }
    }
}

/// Read the agent connection into `sink` until it ends or a cut cancels `live`; `sink` is
/// also called with `None` every `tick` (keep-alives) and answers false once its reader is
/// gone. Owns the connection and the live registration: both go when this returns or is
/// dropped, so a cut never waits on a slow sink.
async fn pump<F, Fut>(
    mut agent_watch: AgentWatch,
    live: ConnGuard,
    tick: Duration,
    mut sink: F,
) -> End
where
    F: FnMut(Option<Vec<WatchEvent>>) -> Fut,
    Fut: Future<Output = bool>,
{
    let cancel = live.cancel_token();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    loop {
        let batch = tokio::select! {
            next = agent_watch.next() => match next {
                Ok(Some(batch)) => Some(batch),
                Ok(None) => return End::Gone,
                Err(e) => {
                    tracing::info!(error = ?e, "envd watch: agent connection ended");
                    return End::Broken;
                }
            },
            _ = ticks.tick() => None,
            () = cancel.cancelled() => return End::Cut,
        };
        tokio::select! {
            open = sink(batch) => if !open { return End::Stopped },
            () = cancel.cancelled() => return End::Cut,
        }
    }
}

/// One change as envd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FsEvent {
    name: String,
    kind: &'static str,
}

impl FsEvent {
    fn json(&self) -> Value {
        json!({"name": self.name, "type": self.kind})
    }
}

/// Turns the agent's events into envd's (see the module docs), hiding the agent's
/// temporary files: the rename of one onto `x` is a `CREATE` and a `WRITE` of `x`.
struct Translate {
    /// The watched directory, with a trailing `/`.
    prefix: String,
    /// The target of the temporary file just renamed away, if the last event was that.
    renamed_to: Option<String>,
}

impl Translate {
    fn new(root: &str) -> Self {
        let prefix = if root.ends_with('/') {
            root.to_string()
        } else {
            format!("{root}/")
        };
        Translate {
            prefix,
            renamed_to: None,
        }
    }

    fn event(&mut self, e: WatchEvent) -> Vec<FsEvent> {
        let renamed_to = self.renamed_to.take();
        let Some(name) = e.path.strip_prefix(&self.prefix).filter(|n| !n.is_empty()) else {
            return Vec::new();
        };
        let name = name.to_string();
        let (dir, base) = match name.rsplit_once('/') {
            Some((d, b)) => (Some(d), b),
            None => (None, name.as_str()),
        };
        if let Some(target) = temp_target(base) {
            if e.kind == WatchEventKind::Remove {
                self.renamed_to = Some(match dir {
                    Some(d) => format!("{d}/{target}"),
                    None => target.to_string(),
                });
            }
            return Vec::new();
        }
        let one = |kind| {
            vec![FsEvent {
                name: name.clone(),
                kind,
            }]
        };
        match e.kind {
            WatchEventKind::Add if !e.dir && renamed_to.as_deref() == Some(name.as_str()) => vec![
                FsEvent {
                    name: name.clone(),
                    kind: "EVENT_TYPE_CREATE",
                },
                FsEvent {
                    name,
                    kind: "EVENT_TYPE_WRITE",
                },
            ],
            WatchEventKind::Add => one("EVENT_TYPE_CREATE"),
            WatchEventKind::Change => one("EVENT_TYPE_WRITE"),
            WatchEventKind::Remove => one("EVENT_TYPE_REMOVE"),
            // No envd counterpart: what was dropped or left out is not reported.
            WatchEventKind::Overflow | WatchEventKind::Limit => Vec::new(),
        }
    }
}

/// `x` when `base` is the name of an agent's temporary file for `x`
/// (`.x.sandpit-tmp-<16 hex digits>`, see `sandpit-agent` `files.rs`).
fn temp_target(base: &str) -> Option<&str> {
    let rest = base.strip_prefix('.')?;
    let (target, hex) = rest.rsplit_once(".sandpit-tmp-")?;
    (!target.is_empty() && hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(target)
}

// ---- watcher state ----

/// The watches of every sandbox, by (sandbox id, watcher id). The mutex guards only the
/// map; it is never held across an await.
static WATCHES: LazyLock<Mutex<HashMap<(String, String), Watch>>> = LazyLock::new(Default::default);

fn watches() -> MutexGuard<'static, HashMap<(String, String), Watch>> {
    WATCHES.lock().unwrap_or_else(|p| p.into_inner())
}

struct Watch {
    kind: Kind,
    /// Ends the watch's task (and so its agent connection).
    stop: CancellationToken,
}

enum Kind {
    Stream,
    Poll(Queue),
}

/// A polling watcher's events between two polls.
struct Queue {
    events: VecDeque<FsEvent>,
    /// Why the watch ended, once it has.
    ended: Option<End>,
    polled: Instant,
}

impl Queue {
    fn new() -> Self {
        Queue {
            events: VecDeque::new(),
            ended: None,
            polled: Instant::now(),
        }
    }

    fn push(&mut self, e: FsEvent) {
        if self.events.len() < MAX_QUEUED {
            self.events.push_back(e);
        }
    }

    fn idle(&self, now: Instant) -> bool {
        now.duration_since(self.polled) >= IDLE
    }
}

/// A place in [`WATCHES`], taken before the agent is asked (so the bound holds under
/// concurrent calls) and given back when dropped unless kept.
struct Slot {
    key: (String, String),
    stop: CancellationToken,
    keep: bool,
}

impl Slot {
    fn reserve(sandbox: &str, kind: Kind) -> Result<Slot, ConnectError> {
        let mut map = watches();
        sweep(&mut map, Instant::now());
        if map.keys().filter(|(s, _)| s == sandbox).count() >= MAX_WATCHES {
            return Err(ConnectError::new(
                "resource_exhausted",
                format!("at most {MAX_WATCHES} watches per sandbox"),
            ));
        }
        let key = (
            sandbox.to_string(),
            uuid::Uuid::new_v4().simple().to_string(),
        );
        let stop = CancellationToken::new();
        map.insert(
            key.clone(),
            Watch {
                kind,
                stop: stop.clone(),
            },
        );
        Ok(Slot {
            key,
            stop,
            keep: false,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.keep {
            watches().remove(&self.key);
        }
    }
}

/// Forget polling watchers that ended and were not polled for [`IDLE`] (a live one ends
/// itself once idle).
fn sweep(map: &mut HashMap<(String, String), Watch>, now: Instant) {
    map.retain(|_, w| match &w.kind {
        Kind::Poll(q) => !(q.ended.is_some() && q.idle(now)),
        Kind::Stream => true,
    });
}

async fn create_watcher(
    server: &Arc<Server>,
    envd: &Envd,
    msg: &[u8],
) -> Result<Value, ConnectError> {
    let m: WatchMsg = connect::parse(msg)?;
    let mut slot = Slot::reserve(envd.sb.id(), Kind::Poll(Queue::new()))?;
    let (root, agent_watch, live) = open(server, envd, &m).await?;
    slot.keep = true;
    let key = slot.key.clone();
    let stop = slot.stop.clone();
    tokio::spawn({
        let key = key.clone();
        async move {
            let mut translate = Translate::new(&root);
            let relay = pump(agent_watch, live, IDLE_CHECK, |batch| {
                let open = match batch {
                    Some(batch) => {
                        let events: Vec<FsEvent> =
                            batch.into_iter().flat_map(|e| translate.event(e)).collect();
                        with_queue(&key, |q| events.into_iter().for_each(|e| q.push(e))).is_some()
                    }
                    // The tick: give up once nobody polls.
                    None => with_queue(&key, |q| !q.idle(Instant::now())).unwrap_or(false),
                };
                std::future::ready(open)
            });
            let end = tokio::select! {
                end = relay => end,
                () = stop.cancelled() => End::Stopped,
            };
            let mut map = watches();
            match map.get_mut(&key) {
                Some(Watch {
                    kind: Kind::Poll(q),
                    ..
                }) if q.idle(Instant::now()) || end == End::Stopped => {
                    map.remove(&key);
                }
                Some(Watch {
                    kind: Kind::Poll(q),
                    ..
                }) => q.ended = Some(end),
                _ => {}
            }
        }
    });
    Ok(json!({"watcherId": key.1}))
}

/// Run `f` on the queue of the polling watcher `key`, if it is still there.
fn with_queue<R>(key: &(String, String), f: impl FnOnce(&mut Queue) -> R) -> Option<R> {
    match watches().get_mut(key) {
        Some(Watch {
            kind: Kind::Poll(q),
            ..
        }) => Some(f(q)),
        _ => None,
    }
}

/// The polling watcher's events since the last poll. Once its watch has ended and its
/// events are taken, the next poll answers why it ended and forgets it.
fn get_events(sandbox: &str, watcher_id: &str) -> Result<Value, ConnectError> {
    let key = (sandbox.to_string(), watcher_id.to_string());
    let mut map = watches();
    let Some(Watch {
        kind: Kind::Poll(q),
        ..
    }) = map.get_mut(&key)
    else {
        return Err(no_watcher());
    };
    q.polled = Instant::now();
    if q.events.is_empty()
        && let Some(end) = q.ended.clone()
    {
        map.remove(&key);
        return Err(end.error());
    }
    let events: Vec<Value> = q.events.drain(..).map(|e| e.json()).collect();
    Ok(json!({"events": events}))
}

/// Stop and forget a polling watcher.
fn remove(sandbox: &str, watcher_id: &str) -> Result<(), ConnectError> {
    let key = (sandbox.to_string(), watcher_id.to_string());
    let mut map = watches();
    match map.get(&key) {
        Some(Watch {
            kind: Kind::Poll(_),
            stop,
        }) => {
            stop.cancel();
            map.remove(&key);
            Ok(())
        }
        _ => Err(no_watcher()),
    }
}

fn no_watcher() -> ConnectError {
    ConnectError::new("not_found", "no such watcher")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: WatchEventKind, path: &str, dir: bool) -> WatchEvent {
        WatchEvent {
            kind,
            path: path.to_string(),
            dir,
        }
    }

    fn names(t: &mut Translate, events: Vec<WatchEvent>) -> Vec<(String, &'static str)> {
        events
            .into_iter()
            .flat_map(|e| t.event(e))
            .map(|e| (e.name, e.kind))
            .collect()
    }

    #[test]
    fn events_are_translated_relative_and_temp_files_hidden() {
        use WatchEventKind::*;
        let mut t = Translate::new("/w");
        let tmp = ".a.txt.sandpit-tmp-0123456789abcdef";
        let got = names(
            &mut t,
            vec![
                // A write through envd: temporary file, renamed into place.
                ev(Add, &format!("/w/{tmp}"), false),
                ev(Change, &format!("/w/{tmp}"), false),
                ev(Remove, &format!("/w/{tmp}"), false),
                ev(Add, "/w/a.txt", false),
                // A shell append, a nested file (recursive), a removal, a rename.
                ev(Change, "/w/a.txt", false),
                ev(Add, "/w/sub", true),
                ev(Add, "/w/sub/b", false),
                ev(Remove, "/w/a.txt", false),
                ev(Remove, "/w/sub/b", false),
                ev(Add, "/w/sub/c", false),
                // The root itself, paths outside it, and what envd cannot say.
                ev(Add, "/w", true),
                ev(Add, "/wx/y", false),
                ev(Overflow, "/w", true),
                ev(Limit, "/w/sub", true),
            ],
        );
        let want: Vec<(String, &str)> = [
            ("a.txt", "EVENT_TYPE_CREATE"),
            ("a.txt", "EVENT_TYPE_WRITE"),
            ("a.txt", "EVENT_TYPE_WRITE"),
            ("sub", "EVENT_TYPE_CREATE"),
            ("sub/b", "EVENT_TYPE_CREATE"),
            ("a.txt", "EVENT_TYPE_REMOVE"),
            ("sub/b", "EVENT_TYPE_REMOVE"),
            ("sub/c", "EVENT_TYPE_CREATE"),
        ]
        .into_iter()
        .map(|(n, k)| (n.to_string(), k))
        .collect();
        assert_eq!(got, want);
        // A temporary file removed without a rename (a failed write) leaves no trace, and
        // only the next event can be its target.
        let got = names(
            &mut t,
            vec![
                ev(Remove, "/w/sub/.x.sandpit-tmp-ffffffffffffffff", false),
                ev(Add, "/w/other", false),
                ev(Add, "/w/sub/x", false),
            ],
        );
        assert_eq!(
            got,
            [
                ("other".to_string(), "EVENT_TYPE_CREATE"),
                ("sub/x".to_string(), "EVENT_TYPE_CREATE")
            ]
        );
        // The root `/`.
        let mut t = Translate::new("/");
        assert_eq!(
            names(&mut t, vec![ev(Add, "/etc", true)]),
            [("etc".to_string(), "EVENT_TYPE_CREATE")]
        );
    }

    #[test]
    fn temp_names_are_recognised_exactly() {
        assert_eq!(temp_target(".a.sandpit-tmp-0123456789abcdef"), Some("a"));
        assert_eq!(temp_target("..b.sandpit-tmp-0123456789abcdef"), Some(".b"));
        for no in [
            "a.sandpit-tmp-0123456789abcdef",
            "..sandpit-tmp-0123456789abcdef",
            ".a.sandpit-tmp-0123",
            ".a.sandpit-tmp-0123456789abcdeg",
            ".a",
        ] {
            assert_eq!(temp_target(no), None, "{no}");
        }
    }

    #[test]
    fn watchers_are_bounded_per_sandbox_and_keyed_by_it() {
        let (a, b) = ("sbwatchtesta", "sbwatchtestb");
        let mut slots = Vec::new();
        for _ in 0..MAX_WATCHES {
            let mut s = Slot::reserve(a, Kind::Poll(Queue::new())).unwrap();
            s.keep = true;
            slots.push(s);
        }
        let err = Slot::reserve(a, Kind::Stream).err().unwrap();
        assert_eq!(err.code, "resource_exhausted");
        // Another sandbox has its own bound, and cannot read or remove a's watchers.
        let other = Slot::reserve(b, Kind::Stream).unwrap();
        let id = slots[0].key.1.clone();
        assert_eq!(get_events(b, &id).unwrap_err().code, "not_found");
        assert_eq!(remove(b, &id).unwrap_err().code, "not_found");
        assert_eq!(get_events(a, "nope").unwrap_err().code, "not_found");
        // Its own watcher: events, then once ended and drained, why, then nothing.
        let key = slots[0].key.clone();
        with_queue(&key, |q| {
            for i in 0..MAX_QUEUED + 10 {
                q.push(FsEvent {
                    name: format!("f{i}"),
                    kind: "EVENT_TYPE_CREATE",
                });
            }
            q.ended = Some(End::Cut);
        })
        .unwrap();
        let got = get_events(a, &id).unwrap();
        assert_eq!(got["events"].as_array().unwrap().len(), MAX_QUEUED);
        assert_eq!(got["events"][0]["name"], "f0");
        assert_eq!(get_events(a, &id).unwrap_err().code, "unavailable");
        assert_eq!(get_events(a, &id).unwrap_err().code, "not_found");
        // Removing one frees a place and stops its task.
        let id1 = slots[1].key.1.clone();
        let stop = slots[1].stop.clone();
        remove(a, &id1).unwrap();
        assert!(stop.is_cancelled());
        assert_eq!(remove(a, &id1).unwrap_err().code, "not_found");
        let again = Slot::reserve(a, Kind::Stream).unwrap();
        // A slot not kept gives its place back.
        drop(again);
        drop(other);
        assert_eq!(
            watches().keys().filter(|(s, _)| s == b).count(),
            0,
            "a dropped slot is forgotten"
        );
        slots.iter_mut().for_each(|s| s.keep = false);
        drop(slots);
        assert_eq!(watches().keys().filter(|(s, _)| s == a).count(), 0);
    }

    #[test]
    fn ended_watchers_expire_after_idle() {
        let mut map = HashMap::new();
        let now = Instant::now();
        let mut q = Queue::new();
        q.ended = Some(End::Gone);
        q.polled = now;
        let mut fresh = Queue::new();
        fresh.ended = Some(End::Gone);
        fresh.polled = now + IDLE / 2;
        // Idle but still watching: it ends itself, then expires.
        let mut live = Queue::new();
        live.polled = now;
        for (id, q) in [("old", q), ("fresh", fresh), ("live", live)] {
            map.insert(
                ("s".to_string(), id.to_string()),
                Watch {
                    kind: Kind::Poll(q),
                    stop: CancellationToken::new(),
                },
            );
        }
        sweep(&mut map, now + IDLE);
        let mut left: Vec<&str> = map.keys().map(|(_, id)| id.as_str()).collect();
        left.sort();
        assert_eq!(left, ["fresh", "live"]);
    }
}
