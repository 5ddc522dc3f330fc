//! File watches (protocol version 4): inotify on a file or a directory tree, streamed to the
//! host as batches of add/change/remove events until the host closes the connection.
//!
//! One inotify instance per watch, owned by a reader task that the connection's task aborts
//! when it ends (the host closed, or the watched path went away), so nothing outlives the
//! connection. A recursive watch adds a watch for each directory (at most
//! [`MAX_WATCHED_DIRS`]) and, for a directory created later, lists it once right after
//! watching it, reporting what was created in between as `add`s (an entry may then be
//! reported twice). Directories matching an exclude are never watched. A watched file is
//! followed through its parent directory, so that an editor's replace-by-rename is seen.
//!
//! Memory is bounded at every step: the reader drains inotify into an [`EventQueue`] (at
//! most [`MAX_QUEUED_EVENTS`], then one `overflow` event) and hands the host one batch at a
//! time; while the host does not read, the queue overflows rather than grows. Names that are
//! not UTF-8 are reported lossily.

use std::collections::HashMap;
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::io::Errno;
use sandpit_agent_proto::{
    AgentErrorCode, EventQueue, FrameKind, MAX_WATCHED_DIRS, ProtoError, WatchBatch, WatchEvent,
    WatchEventKind, WatchRequest, watch_excluded,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::conn::{Conn, agent_error};
use crate::files::map_io;

/// How often the reader drains inotify even without a readiness report (as terminals do:
/// epoll readiness is not trusted alone under gVisor).
const POKE: Duration = Duration::from_secs(1);
/// Events handled in one go before the reader lets the sender run.
const DRAIN_BUDGET: usize = 4096;

/// Serve a `Watch` request on `conn` until the host closes it.
pub async fn run(conn: &mut Conn, req: WatchRequest) -> Result<(), ProtoError> {
    let req = match req.validate() {
        Ok(r) => r,
        Err(e) => return conn.send_error(&e).await,
    };
    let (fd, state) = match State::start(&req) {
        Ok(s) => s,
        Err(e) => return conn.send_error(&e).await,
    };
    conn.send_json(FrameKind::Started, &serde_json::json!({}))
        .await?;
    let (tx, mut rx) = mpsc::channel::<Vec<WatchEvent>>(1);
    let reader = AbortOnDrop(tokio::spawn(read_loop(fd, state, tx)));
    let result = loop {
        tokio::select! {
            batch = rx.recv() => match batch {
                Some(events) => conn.send_json(FrameKind::Events, &WatchBatch { events }).await?,
                // The watched path went away.
                None => break conn.send(FrameKind::End, &[]).await,
            },
            frame = conn.recv() => if frame.is_err() {
                break Ok(());
            },
        }
    };
    drop(reader);
    result
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a directory watch listens for.
fn dir_flags() -> WatchFlags {
    WatchFlags::CREATE
        | WatchFlags::DELETE
        | WatchFlags::MODIFY
        | WatchFlags::CLOSE_WRITE
        | WatchFlags::ATTRIB
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::DELETE_SELF
        | WatchFlags::MOVE_SELF
        | WatchFlags::ONLYDIR
        | WatchFlags::DONT_FOLLOW
        | WatchFlags::EXCL_UNLINK
}

/// One watch's state, owned by its reader task.
struct State {
    /// The watched path (normalized, absolute).
    root: String,
    /// When a file is watched: the file, followed through its parent directory.
    file: Option<String>,
    recursive: bool,
    excludes: Vec<String>,
    /// Watched directories by watch descriptor.
    dirs: HashMap<i32, String>,
    queue: EventQueue,
    /// A `limit` event was queued already.
    limited: bool,
    /// The watched path is gone: send what is queued, then end.
    gone: bool,
}

impl State {
    fn start(
        req: &WatchRequest,
    ) -> Result<(AsyncFd<OwnedFd>, State), sandpit_agent_proto::AgentError> {
        let meta = std::fs::metadata(&req.path).map_err(|e| map_io(&req.path, &e))?;
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)
            .map_err(|e| watch_error(&req.path, e))?;
        // `AsyncFd::register` is `unsafe` (and this crate has none) only because an arbitrary
        // `T` might change the descriptor it reports; an `OwnedFd` never does, so the
        // deprecated safe constructor is sound here.
        #[allow(deprecated)]
        let fd = AsyncFd::new(fd).map_err(|e| map_io(&req.path, &e))?;
        let (file, dir) = if meta.is_dir() {
            (None, req.path.clone())
        } else {
            let parent = match req.path.rsplit_once('/') {
                Some(("", _)) | None => "/".to_string(),
                Some((p, _)) => p.to_string(),
            };
            (Some(req.path.clone()), parent)
        };
        let mut state = State {
            root: req.path.clone(),
            file,
            recursive: req.recursive && meta.is_dir(),
            excludes: req.excludes.clone(),
            dirs: HashMap::new(),
            queue: EventQueue::new(&req.path),
            limited: false,
            gone: false,
        };
        // The first directory must be watched; the rest of the tree is best effort.
        let wd = inotify::add_watch(fd.get_ref(), dir.as_str(), dir_flags())
            .map_err(|e| watch_error(&dir, e))?;
        state.dirs.insert(wd, dir.clone());
        if state.recursive {
            state.add_children(fd.get_ref(), &dir, false);
        }
        Ok((fd, state))
    }

    /// `path` relative to the root, or `None` when it is not under it.
    fn relative<'p>(&self, path: &'p str) -> Option<&'p str> {
        if self.root == "/" {
            return path.strip_prefix('/');
        }
        path.strip_prefix(self.root.as_str())
            .and_then(|r| r.strip_prefix('/'))
    }

    fn push(&mut self, kind: WatchEventKind, path: String, dir: bool) {
        self.queue.push(WatchEvent { kind, path, dir });
    }

    /// Watch the directories under `dir` (already watched), in a walk bounded by
    /// [`MAX_WATCHED_DIRS`]. With `report` (a directory that just appeared), every entry
    /// found is an `add`, and a regular file with content a `change` too: it was written
    /// before its directory's watch was in place, so inotify never said so.
    fn add_children(&mut self, fd: &OwnedFd, dir: &str, report: bool) {
        let mut stack = vec![dir.to_string()];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let path = join(&d, &name);
                if self
                    .relative(&path)
                    .is_some_and(|r| watch_excluded(r, &self.excludes))
                {
                    continue;
                }
                // Not following symlinks: a link to a directory is an entry, not a subtree.
                let file_type = entry.file_type().ok();
                let is_dir = file_type.is_some_and(|t| t.is_dir());
                if report {
                    self.push(WatchEventKind::Add, path.clone(), is_dir);
                    // `DirEntry::metadata` does not follow symlinks.
                    if file_type.is_some_and(|t| t.is_file())
                        && entry.metadata().is_ok_and(|m| m.len() > 0)
                    {
                        self.push(WatchEventKind::Change, path.clone(), false);
                    }
                }
                if is_dir && self.watch_dir(fd, &path) {
                    stack.push(path);
                }
            }
        }
    }

    /// Add a watch on `path`; false when it could not be (gone, or a limit reached).
    fn watch_dir(&mut self, fd: &OwnedFd, path: &str) -> bool {
        if self.dirs.len() >= MAX_WATCHED_DIRS {
            self.limit(path);
            return false;
        }
        match inotify::add_watch(fd, path, dir_flags()) {
            Ok(wd) => {
                self.dirs.insert(wd, path.to_string());
                true
            }
            Err(Errno::NOSPC) => {
                self.limit(path);
                false
            }
            Err(_) => false,
        }
    }

    fn limit(&mut self, path: &str) {
        if !self.limited {
            self.limited = true;
            self.push(WatchEventKind::Limit, path.to_string(), true);
        }
    }

    /// Forget the watches on `path` and under it (it was moved or deleted).
    fn drop_tree(&mut self, fd: &OwnedFd, path: &str) {
        let prefix = format!("{path}/");
        let gone: Vec<i32> = self
            .dirs
            .iter()
            .filter(|(_, d)| *d == path || d.starts_with(&prefix))
            .map(|(wd, _)| *wd)
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            let _ = inotify::remove_watch(fd, wd);
        }
    }

    fn handle(&mut self, fd: &OwnedFd, wd: i32, mask: ReadFlags, name: Option<&CStr>) {
        if mask.contains(ReadFlags::QUEUE_OVERFLOW) {
            let root = self.root.clone();
            self.push(WatchEventKind::Overflow, root, true);
            return;
        }
        let Some(dir) = self.dirs.get(&wd).cloned() else {
            return;
        };
        let top = self.file.is_some() || dir == self.root;
        if mask.intersects(ReadFlags::IGNORED | ReadFlags::DELETE_SELF | ReadFlags::MOVE_SELF) {
            if mask.contains(ReadFlags::IGNORED) {
                self.dirs.remove(&wd);
            }
            // A subdirectory's removal is reported by its parent; the top one ends the watch.
            if top {
                self.gone = true;
            }
            return;
        }
        let Some(name) = name else {
            return;
        };
        let path = join(&dir, &name.to_string_lossy());
        if let Some(file) = &self.file {
            if path != *file {
                return;
            }
        } else if self
            .relative(&path)
            .is_some_and(|r| watch_excluded(r, &self.excludes))
        {
            return;
        }
        let is_dir = mask.contains(ReadFlags::ISDIR);
        if mask.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO) {
            self.push(WatchEventKind::Add, path.clone(), is_dir);
            if is_dir && self.recursive && self.watch_dir(fd, &path) {
                self.add_children(fd, &path, true);
            }
        } else if mask.intersects(ReadFlags::DELETE | ReadFlags::MOVED_FROM) {
            self.push(WatchEventKind::Remove, path.clone(), is_dir);
            if is_dir {
                self.drop_tree(fd, &path);
            }
        } else if !is_dir
            && mask.intersects(ReadFlags::MODIFY | ReadFlags::CLOSE_WRITE | ReadFlags::ATTRIB)
        {
            self.push(WatchEventKind::Change, path, false);
        }
    }

    /// Handle what inotify has, up to [`DRAIN_BUDGET`] events. True when it has no more.
    fn drain(&mut self, fd: &OwnedFd, buf: &mut [MaybeUninit<u8>]) -> bool {
        let mut reader = inotify::Reader::new(fd, buf);
        for _ in 0..DRAIN_BUDGET {
            match reader.next() {
                Ok(ev) => {
                    let (wd, mask) = (ev.wd(), ev.events());
                    let name = ev.file_name().map(CStr::to_owned);
                    self.handle(fd, wd, mask, name.as_deref());
                }
                Err(Errno::INTR) => {}
                // AGAIN: nothing more now. Anything else: nothing more ever.
                Err(_) => return true,
            }
        }
        false
    }
}

/// Drain inotify into the queue and hand batches to the connection's task; ends (dropping
/// `tx`) once the watched path is gone and its last events were handed over.
async fn read_loop(fd: AsyncFd<OwnedFd>, mut state: State, tx: mpsc::Sender<Vec<WatchEvent>>) {
    let mut buf = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
    loop {
        if state.gone && state.queue.is_empty() {
            return;
        }
        let pending = !state.queue.is_empty();
        tokio::select! {
            permit = tx.reserve(), if pending => match permit {
                Ok(permit) => permit.send(state.queue.take_batch()),
                Err(_) => return,
            },
            ready = fd.readable(), if !state.gone => {
                let Ok(mut guard) = ready else { return };
                if state.drain(fd.get_ref(), &mut buf) {
                    guard.clear_ready();
                }
            }
            () = tokio::time::sleep(POKE), if !state.gone => {
                state.drain(fd.get_ref(), &mut buf);
            }
        }
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn watch_error(path: &str, e: Errno) -> sandpit_agent_proto::AgentError {
    match e {
        Errno::NOSPC | Errno::MFILE | Errno::NFILE => agent_error(
            AgentErrorCode::TooManyWatches,
            format!("{path}: the sandbox's inotify limits are reached: {e}"),
        ),
        e => map_io(path, &std::io::Error::from(e)),
    }
}
