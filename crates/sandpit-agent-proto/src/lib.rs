//! Wire protocol between the Sandpit server (host) and `sandpit-agent` (inside a sandbox).
//!
//! One TCP connection carries one operation. The host opens it, sends a
//! [`FrameKind::Request`] frame whose payload is a JSON [`Request`], then, depending on the
//! operation, more frames (stdin, file data, signals). The agent answers with frames until a
//! terminal frame ([`FrameKind::Exit`], [`FrameKind::Ok`], [`FrameKind::End`] or
//! [`FrameKind::Error`]). The host then closes the connection with a reset (linger 0) so no
//! TCP endpoint inside the sandbox lingers in a closing state: gVisor refuses to checkpoint a
//! sandbox that holds a connected or closing TCP endpoint, and a failed checkpoint kills it.
//!
//! Frame layout: `kind: u8`, `len: u32` big-endian, `len` bytes of payload (at most
//! [`MAX_FRAME_LEN`]). Control payloads are JSON; data payloads are raw bytes.
//!
//! Versioning: every request carries the lowest protocol version that has its operation
//! ([`Op::version`]), so requests an older agent knows stay in that agent's version. The agent
//! accepts any request whose version is ≤ its own ([`PROTOCOL_VERSION`]) and answers in that
//! version's shape, so a sandbox restored from a snapshot taken with an older agent keeps
//! working with a newer server: an operation the agent is too old for is refused with
//! `unsupported_version`, and the host falls back to the older operations. New fields are
//! added as optional.
//!
//! Version 2 added [`Op::ReadRegular`] (a bounded read of a regular file).
//!
//! Version 3 added terminals: processes on a pseudo-terminal that live in the agent, not in a
//! connection, so they survive the host cutting every connection before a checkpoint.
//! [`Op::TerminalCreate`] starts one, [`Op::TerminalAttach`] streams its output (optionally
//! replaying its scrollback first) and takes its input, [`Op::TerminalList`],
//! [`Op::TerminalResize`] and [`Op::TerminalKill`] manage it. Any number of attachments may
//! view one terminal at once: each sees all output and each may type. Closing an attachment
//! (the host's reset) leaves the terminal running. An exited terminal stays listed, with its
//! exit code and scrollback, until `TerminalKill` without a signal removes it; an agent holds
//! at most [`MAX_TERMINALS`] (`too_many_terminals` past that). During an attachment the host
//! sends `Stdin` (bytes typed), [`FrameKind::Resize`] (new in version 3, only ever sent on a
//! version-3 operation, so an older agent never sees it) and `Signal`. An agent of version 2
//! refuses every terminal operation with `unsupported_version`. [`client`] has typed helpers
//! for the host.
//!
//! Version 4 added [`Op::Watch`]: inotify on a file or a directory tree inside the sandbox.
//! The agent answers `Started` once its watches are in place, then sends
//! [`FrameKind::Events`] frames (JSON [`WatchBatch`], new in version 4 and only ever sent on
//! a version-4 operation) until the host closes the connection, which ends the watch; `End`
//! if the watched path itself went away. Everything between inotify and the host is bounded:
//! at most [`MAX_WATCHED_DIRS`] directories per watch (past that, one [`WatchEventKind::Limit`]
//! event names the directory left out) and at most [`MAX_QUEUED_EVENTS`] events waiting for
//! a slow host (past that they are dropped for one [`WatchEventKind::Overflow`] event: the
//! client must list the tree again). An agent of version 3 refuses it with
//! `unsupported_version`.
//!
//! Version 5 added users: [`ExecRequest::user`] and [`TerminalCreate::user`] run the process
//! as a user spec (`name`, `uid`, `name:group`, `uid:gid`, see [`check_user_spec`]) resolved
//! in the sandbox's own `/etc/passwd` and `/etc/group`, and `owner` on [`Op::WriteFile`] and
//! [`Op::MakeDir`] gives what they create to one. A request sets them only when it needs them
//! and is then a version-5 request ([`Op::version`]), so an agent of version 4 refuses it with
//! `unsupported_version` rather than ignoring the field and running as root. An unknown user
//! or group is `user_not_found`.
//!
//! Version 6 added terminals on pipes: [`TerminalCreate::pipes`] runs the process with
//! stdout and stderr on pipes of their own (and stdin on a pipe when
//! [`TerminalCreate::stdin`], else `/dev/null`) instead of a pty, in its own process group.
//! It is the same agent-held process as any terminal (it survives every connection and a
//! checkpoint, is listed, attached, signalled and removed alike), for callers that need the
//! streams apart: an attachment to one sends its stderr as `Stderr` frames and its stdout as
//! `Stdout`, each replayed from a scrollback of its own, and `StdinClose` closes its stdin.
//! A request sets `pipes` only when it wants them and is then a version-6 request, so an
//! agent of version 5 refuses it with `unsupported_version`.
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        reason = "unit tests build host-side fixtures by path"
    )
)]

pub mod client;
#[cfg(any(test, feature = "fake"))]
pub mod fake;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 6;

/// The TCP port the agent listens on inside the sandbox.
pub const AGENT_PORT: u16 = 49983;

/// Largest payload of one frame.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Size of file data chunks the agent and server send.
pub const DATA_CHUNK: usize = 256 * 1024;

/// Most terminals (running or exited, not yet removed) one agent holds.
pub const MAX_TERMINALS: usize = 64;
/// Scrollback of a terminal when [`TerminalCreate::scrollback_bytes`] is absent.
pub const DEFAULT_SCROLLBACK: u64 = 256 * 1024;
/// Smallest scrollback a terminal may ask for.
pub const MIN_SCROLLBACK: u64 = 64 * 1024;
/// Largest scrollback a terminal may ask for.
pub const MAX_SCROLLBACK: u64 = 4 * 1024 * 1024;
/// Largest terminal width and height (in characters).
pub const MAX_TERMINAL_DIM: u16 = 1000;
/// Longest terminal id.
pub const MAX_TERMINAL_ID_LEN: usize = 64;
/// Most exclude patterns one watch may carry.
pub const MAX_WATCH_EXCLUDES: usize = 64;
/// Longest exclude pattern (bytes).
pub const MAX_WATCH_EXCLUDE_LEN: usize = 256;
/// Most directories one recursive watch follows.
pub const MAX_WATCHED_DIRS: usize = 4096;
/// Most events one watch holds for a host (or, on the host, a client) that does not keep up.
pub const MAX_QUEUED_EVENTS: usize = 4096;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// host → agent: JSON [`Request`], always the first frame.
    Request = 1,
    /// host → agent: bytes for the process's stdin.
    Stdin = 2,
    /// host → agent: close the process's stdin (empty payload).
    StdinClose = 3,
    /// host → agent: JSON [`SignalRequest`] for the process group.
    Signal = 4,
    /// both ways: raw file bytes.
    Data = 5,
    /// both ways: end of a data stream (empty payload). Terminal for `ReadFile`.
    End = 6,
    /// agent → host: JSON [`ExecStarted`].
    Started = 7,
    /// agent → host: bytes the process wrote to stdout.
    Stdout = 8,
    /// agent → host: bytes the process wrote to stderr.
    Stderr = 9,
    /// agent → host: JSON [`ExitStatus`]. Terminal for `Exec`.
    Exit = 10,
    /// agent → host: JSON result of the operation (see each [`Request`]). Terminal.
    Ok = 11,
    /// agent → host: JSON [`AgentError`]. Terminal. host → agent during `WriteFile`: abort.
    Error = 12,
    /// host → agent (version 3), during `TerminalAttach` only: JSON [`TerminalSize`], the new
    /// window size. A frame kind of its own rather than a variant of `Signal`'s payload, so
    /// that `Signal` keeps its one shape.
    Resize = 13,
    /// agent → host (version 4), during `Watch` only: JSON [`WatchBatch`].
    Events = 14,
}

impl FrameKind {
    /// Decode a frame kind byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        use FrameKind::*;
        Some(match b {
            1 => Request,
            2 => Stdin,
            3 => StdinClose,
            4 => Signal,
            5 => Data,
            6 => End,
            7 => Started,
            8 => Stdout,
            9 => Stderr,
            10 => Exit,
            11 => Ok,
            12 => Error,
            13 => Resize,
            14 => Events,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame whose payload is `value` as JSON.
    pub fn json<T: Serialize>(kind: FrameKind, value: &T) -> Self {
        // Serializing our own plain structs to a Vec cannot fail.
        let payload = serde_json::to_vec(value).expect("protocol types serialize");
        Frame { kind, payload }
    }

    /// Parse the payload as JSON.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ProtoError> {
        serde_json::from_slice(&self.payload).map_err(|source| ProtoError::BadPayload {
            kind: self.kind as u8,
            source,
        })
    }
}

/// The request that opens a connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    /// Protocol version of the sender.
    pub v: u32,
    #[serde(flatten)]
    pub op: Op,
}

impl Request {
    /// A request for `op`, in the lowest protocol version that has it (so an older agent
    /// answers every operation it knows).
    pub fn new(op: Op) -> Self {
        Request {
            v: op.version(),
            op,
        }
    }
}

/// The operations the agent performs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Answered with `Ok` + [`PingReply`].
    Ping,
    /// Answered with `Started`, any number of `Stdout`/`Stderr`, then `Exit` (or `Error` if the
    /// process could not be spawned). The host may send `Stdin`, `StdinClose` and `Signal`.
    Exec(ExecRequest),
    /// Answered with `Ok` + [`FileInfo`], then `Data` frames, then `End`; or `Error`.
    ReadFile { path: String },
    /// The host sends `Data` frames then `End`; the agent writes to a temporary file in the
    /// target directory and renames it into place, then answers `Ok` + [`WriteReply`]. If the
    /// connection drops before `End`, nothing is left behind. The host may abort with an
    /// `Error` frame instead of `End`: the agent removes the temporary file, then answers
    /// `Error`.
    WriteFile {
        path: String,
        /// Permission bits for a new file (default 0o644).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
        /// Create missing parent directories.
        #[serde(default)]
        create_parents: bool,
        /// Version 5: a user spec that owns a new file and the directories created for it
        /// (a replaced file keeps its owner). Default: root.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    /// Answered with `Ok` + [`DirListing`].
    ListDir { path: String },
    /// Answered with `Ok` + [`FileInfo`].
    Stat { path: String },
    /// Answered with `Ok` + `{}`.
    MakeDir {
        path: String,
        recursive: bool,
        /// Version 5: a user spec that owns the directories created. Default: root.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    /// Answered with `Ok` + `{}`.
    Remove { path: String, recursive: bool },
    /// Answered with `Ok` + [`PortList`]: the TCP sockets listening inside the sandbox (from
    /// `/proc/net/tcp` and `/proc/net/tcp6`, which gVisor provides). Added without a version
    /// bump: an older agent refuses it with `bad_request` (unknown operation).
    ListPorts,
    /// Version 2. Like `ReadFile`, for reads the host keeps in memory: refuses anything but
    /// a regular file (a directory is refused with `is_directory`, a FIFO, device or socket
    /// with `not_regular_file`, without blocking on it), starts at byte `offset` and sends at most
    /// `limit` bytes before `End`. The `Ok` frame's [`FileInfo`] has the whole file's size.
    /// An agent of version 1 refuses it with `unsupported_version`.
    ReadRegular {
        path: String,
        offset: u64,
        limit: u64,
    },
    /// Version 3. Start a process on a new pseudo-terminal, owned by the agent. Answered with
    /// `Ok` + [`TerminalInfo`]; `already_exists` if the id is taken, `too_many_terminals`
    /// past [`MAX_TERMINALS`], `bad_request` for a malformed id, size or scrollback,
    /// `spawn_failed` if the process could not start.
    TerminalCreate(TerminalCreate),
    /// Version 3. Answered with `Started` + [`TerminalInfo`], then (when `replay`) the
    /// scrollback as `Stdout` frames, then live output as `Stdout` frames, then `Exit` +
    /// [`ExitStatus`] once the process exited (at once if it already had). `not_found` for
    /// an unknown id. The host may send `Stdin` (input bytes), [`FrameKind::Resize`] (JSON
    /// [`TerminalSize`]) and `Signal` (JSON [`SignalRequest`], for the terminal's process
    /// group); `StdinClose` is ignored on a pty (send the terminal's EOF character, `\x04`,
    /// instead). On pipes (version 6) stderr comes as `Stderr` frames (each stream replayed
    /// from its own scrollback) and `StdinClose` closes stdin. A malformed frame ends the attachment with `Error`; the terminal goes on.
    /// Closing the connection detaches. A viewer that falls more than the scrollback behind
    /// skips the output it missed.
    TerminalAttach {
        id: String,
        /// Send the scrollback before live output.
        #[serde(default)]
        replay: bool,
    },
    /// Version 3. Answered with `Ok` + [`TerminalList`].
    TerminalList,
    /// Version 3. With `signal`: send it to the terminal's process group (nothing if it
    /// exited); the terminal stays listed. Without: kill the group with SIGKILL if it still
    /// runs and remove the terminal (attached viewers still get `Exit`). Answered with `Ok` +
    /// `{}`; `not_found` for an unknown id.
    TerminalKill {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
    },
    /// Version 3. Set the window size (the foreground process group gets SIGWINCH). Answered
    /// with `Ok` + `{}`; `not_found` for an unknown id.
    TerminalResize { id: String, cols: u16, rows: u16 },
    /// Version 4. Watch a file or directory (see the crate docs): `Started` + `{}` once the
    /// watches are in place, then `Events` frames until the host closes; `End` once the
    /// watched path is gone. `not_found`, `invalid_path` or `bad_request` (a malformed
    /// exclude) before `Started`.
    Watch(WatchRequest),
}

impl Op {
    /// The protocol version that introduced this operation.
    pub fn version(&self) -> u32 {
        match self {
            Op::TerminalCreate(TerminalCreate { pipes: true, .. }) => 6,
            Op::Exec(ExecRequest { user: Some(_), .. })
            | Op::TerminalCreate(TerminalCreate { user: Some(_), .. })
            | Op::WriteFile { owner: Some(_), .. }
            | Op::MakeDir { owner: Some(_), .. } => 5,
            Op::ReadRegular { .. } => 2,
            Op::TerminalCreate(_)
            | Op::TerminalAttach { .. }
            | Op::TerminalList
            | Op::TerminalKill { .. }
            | Op::TerminalResize { .. } => 3,
            Op::Watch(_) => 4,
            _ => 1,
        }
    }
}

/// Start a terminal (version 3).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct TerminalCreate {
    /// `[A-Za-z0-9_-]{1,64}`; the agent picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// argv; `argv[0]` is looked up in `PATH`. At most one of `argv` and `shell` is set;
    /// with neither, the user's login shell (from `/etc/passwd`, else `/bin/sh`) runs as a
    /// login shell (`argv[0]` `-<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// A shell command line, run as `/bin/sh -c <shell>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Working directory (default: `HOME` if it is a directory, else `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Environment added to the agent's base environment and `TERM=xterm-256color` (which
    /// an entry here overrides).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Width, 1 to [`MAX_TERMINAL_DIM`].
    pub cols: u16,
    /// Height, 1 to [`MAX_TERMINAL_DIM`].
    pub rows: u16,
    /// Bytes of output kept for replay, [`MIN_SCROLLBACK`] to [`MAX_SCROLLBACK`] (default
    /// [`DEFAULT_SCROLLBACK`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrollback_bytes: Option<u64>,
    /// Version 5: run as this user spec, as [`ExecRequest::user`] (its login shell and home
    /// then come from its passwd entry). Default: root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Version 6: run on pipes instead of a pty (see the crate docs); `cols` and `rows` are
    /// then only recorded.
    #[serde(default, skip_serializing_if = "is_false")]
    pub pipes: bool,
    /// Version 6, with `pipes` only: stdin is a pipe that attachments write to and
    /// `StdinClose` closes; without it stdin is `/dev/null`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stdin: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Watch a path (version 4).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct WatchRequest {
    /// Absolute path of a directory or a file.
    pub path: String,
    /// Follow the whole tree under a directory (and directories created in it later);
    /// otherwise only its direct entries.
    #[serde(default)]
    pub recursive: bool,
    /// Glob patterns ([`watch_excluded`]) of paths, relative to `path`, to leave out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excludes: Vec<String>,
}

impl WatchRequest {
    /// The request with its path normalized, or why it is refused (`invalid_path` or
    /// `bad_request`). The host checks with this before it connects; the agent again.
    pub fn validate(mut self) -> Result<WatchRequest, AgentError> {
        self.path = normalize_path(&self.path)?;
        let bad = |message: String| AgentError {
            code: AgentErrorCode::BadRequest,
            message,
        };
        if self.excludes.len() > MAX_WATCH_EXCLUDES {
            return Err(bad(format!(
                "at most {MAX_WATCH_EXCLUDES} exclude patterns are allowed"
            )));
        }
        for pat in &self.excludes {
            if pat.is_empty() || pat.len() > MAX_WATCH_EXCLUDE_LEN || pat.contains('\0') {
                return Err(bad(format!(
                    "an exclude pattern must be 1 to {MAX_WATCH_EXCLUDE_LEN} bytes without NUL"
                )));
            }
        }
        Ok(self)
    }
}

/// What happened to a watched path.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WatchEventKind {
    /// Created, or moved in (a rename is a `remove` of the old path and an `add` of the new).
    Add,
    /// Contents or metadata changed.
    Change,
    /// Deleted, or moved out.
    Remove,
    /// Events were dropped (a host or client did not keep up): list the tree again.
    /// `path` is the watched path.
    Overflow,
    /// The tree has more than [`MAX_WATCHED_DIRS`] directories: changes under `path` are
    /// not seen.
    Limit,
}

/// One change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub kind: WatchEventKind,
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Whether the path is (or was) a directory.
    #[serde(default)]
    pub dir: bool,
}

/// The payload of an [`FrameKind::Events`] frame: changes in the order they happened.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WatchBatch {
    pub events: Vec<WatchEvent>,
}

/// Most events in one [`WatchBatch`], so a batch always fits in a frame (a path is at most
/// 4096 bytes).
pub const MAX_BATCH_EVENTS: usize = 128;

/// Events waiting for a slow reader, at most [`MAX_QUEUED_EVENTS`] of them: past that, the
/// queue holds a single `overflow` event for `root` and drops everything until it is taken.
#[derive(Debug)]
pub struct EventQueue {
    root: String,
    events: std::collections::VecDeque<WatchEvent>,
    overflowed: bool,
}

impl EventQueue {
    pub fn new(root: &str) -> EventQueue {
        EventQueue {
            root: root.to_string(),
            events: Default::default(),
            overflowed: false,
        }
    }

    /// Queue `ev`, skipping it when it repeats the last one.
    pub fn push(&mut self, ev: WatchEvent) {
        if self.overflowed || self.events.back() == Some(&ev) {
            return;
        }
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.clear();
            self.overflowed = true;
            self.events.push_back(WatchEvent {
                kind: WatchEventKind::Overflow,
                path: self.root.clone(),
                dir: true,
            });
            return;
        }
        self.events.push_back(ev);
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Up to [`MAX_BATCH_EVENTS`] of the oldest events; taking the overflow event ends the
    /// overflow.
    pub fn take_batch(&mut self) -> Vec<WatchEvent> {
        let n = self.events.len().min(MAX_BATCH_EVENTS);
        let batch: Vec<WatchEvent> = self.events.drain(..n).collect();
        if self.events.is_empty() {
            self.overflowed = false;
        }
        batch
    }
}

/// Whether `rel` (a path relative to the watched root, `/`-separated, no leading slash) is
/// excluded by one of `patterns`, or lies under a directory that is. A pattern without a
/// slash matches any single component (`node_modules`, `*.log`); one with a slash matches the
/// whole relative path, with `**` for any number of components (`**/node_modules/**`,
/// `src/*.tmp`). Within a component `*` matches any run of characters and `?` one.
pub fn watch_excluded(rel: &str, patterns: &[String]) -> bool {
    let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
    patterns.iter().any(|pat| {
        let pat = pat.trim_start_matches("./").trim_matches('/');
        if pat.is_empty() {
            return false;
        }
        if !pat.contains('/') {
            return parts
                .iter()
                .any(|c| component_match(pat.as_bytes(), c.as_bytes()));
        }
        let pp: Vec<&str> = pat.split('/').filter(|p| !p.is_empty()).collect();
        // The path or one of its ancestors.
        (1..=parts.len()).any(|n| path_match(&pp, &parts[..n]))
    })
}

fn path_match(pat: &[&str], parts: &[&str]) -> bool {
    match pat.split_first() {
        None => parts.is_empty(),
        Some((&"**", rest)) => (0..=parts.len()).any(|i| path_match(rest, &parts[i..])),
        Some((p, rest)) => parts.split_first().is_some_and(|(c, tail)| {
            component_match(p.as_bytes(), c.as_bytes()) && path_match(rest, tail)
        }),
    }
}

/// `*` and `?` glob match of one component, iterative (linear backtracking on the last star).
fn component_match(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&b| b == b'*')
}

/// A terminal's window size (version 3): the payload of [`FrameKind::Resize`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct TerminalSize {
    pub cols: u16,
    pub rows: u16,
}

impl TerminalSize {
    /// Both dimensions within 1 to [`MAX_TERMINAL_DIM`], or `bad_request`.
    pub fn validate(self) -> Result<TerminalSize, AgentError> {
        let ok = |d: u16| (1..=MAX_TERMINAL_DIM).contains(&d);
        if ok(self.cols) && ok(self.rows) {
            Ok(self)
        } else {
            Err(AgentError {
                code: AgentErrorCode::BadRequest,
                message: format!(
                    "terminal size {}x{} is outside 1x1 to {MAX_TERMINAL_DIM}x{MAX_TERMINAL_DIM}",
                    self.cols, self.rows
                ),
            })
        }
    }
}

/// One terminal (version 3).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TerminalInfo {
    pub id: String,
    /// PID of the process inside the sandbox (also its session and process group id).
    pub pid: u32,
    /// What runs (as given, or the login shell chosen), cut to its first 4 KiB so that a
    /// [`TerminalList`] always fits in one frame.
    pub argv: Vec<String>,
    pub cols: u16,
    pub rows: u16,
    /// Set once the process exited: its exit code, `128 + signal` when killed by a signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: i64,
    /// Version 6: the process runs on pipes ([`TerminalCreate::pipes`]).
    #[serde(default, skip_serializing_if = "is_false")]
    pub pipes: bool,
}

/// Reply to [`Op::TerminalList`], sorted by id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TerminalList {
    pub terminals: Vec<TerminalInfo>,
}

/// Check a terminal id the host sends: `[A-Za-z0-9_-]{1,64}`, or `bad_request`.
pub fn validate_terminal_id(id: &str) -> Result<(), AgentError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_TERMINAL_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(AgentError {
            code: AgentErrorCode::BadRequest,
            message: format!(
                "terminal id must be 1 to {MAX_TERMINAL_ID_LEN} of [A-Za-z0-9_-], got {:?}",
                id.chars().take(MAX_TERMINAL_ID_LEN + 1).collect::<String>()
            ),
        })
    }
}

/// Run a process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ExecRequest {
    /// argv; `argv[0]` is looked up in `PATH`. Exactly one of `argv` and `shell` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// A shell command line, run as `/bin/sh -c <shell>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Working directory (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Environment added to the agent's base environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Kill the whole process group after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Whether the host will send stdin frames. When false, stdin is /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Version 5: run as this user spec ([`check_user_spec`]) with its groups, and `HOME`
    /// from its passwd entry unless `env` sets one. Default: root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Sent when the process was spawned.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecStarted {
    /// PID inside the sandbox (also the process group id).
    pub pid: u32,
}

/// How a process ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExitStatus {
    /// Exit code; `128 + signal` when killed by a signal (shell convention).
    pub exit_code: i32,
    /// The signal that ended it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// True when the agent killed it because `timeout_ms` passed.
    #[serde(default)]
    pub timed_out: bool,
    pub duration_ms: u64,
}

/// Signal the process group of a running exec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SignalRequest {
    pub signal: i32,
}

/// Reply to [`Op::Ping`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PingReply {
    /// Highest protocol version the agent speaks.
    pub protocol: u32,
    /// The agent's crate version.
    pub agent_version: String,
    /// How long this `serve` process has run, in ms of its monotonic clock (which goes on
    /// across a checkpoint: a restored serve is as old as before plus the time since the
    /// restore). A serve younger than a restore started after it: init restarted it (it
    /// crashed), and the processes and terminals of the one before are gone. `None` from
    /// agents before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
}

/// The kind of a directory entry.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// Metadata of one file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileInfo {
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DirEntry {
    pub name: String,
    #[serde(flatten)]
    pub info: FileInfo,
}

/// Reply to [`Op::ListDir`], sorted by name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DirListing {
    pub entries: Vec<DirEntry>,
}

/// One listening TCP socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListeningPort {
    pub port: u16,
    /// The address it is bound to: `0.0.0.0` or `::` for every address, `127.0.0.1` or
    /// `::1` for loopback only (unreachable from outside the sandbox).
    pub address: String,
}

/// Reply to [`Op::ListPorts`], sorted by port then address, without duplicates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortList {
    pub ports: Vec<ListeningPort>,
}

/// Reply to [`Op::WriteFile`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WriteReply {
    pub size: u64,
}

/// Why the agent refused or failed an operation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AgentErrorCode {
    NotFound,
    IsDirectory,
    NotDirectory,
    PermissionDenied,
    InvalidPath,
    AlreadyExists,
    NotEmpty,
    SpawnFailed,
    UnsupportedVersion,
    BadRequest,
    /// The sandbox's disk is full (ENOSPC or EDQUOT).
    NoSpace,
    /// A read that needs a regular file found a FIFO, device or socket (version 2; only
    /// `ReadRegular` answers with it).
    NotRegularFile,
    /// The agent holds [`MAX_TERMINALS`] terminals already (version 3; only
    /// `TerminalCreate` answers with it).
    TooManyTerminals,
    /// The sandbox's inotify limits were reached (version 4; only `Watch`).
    TooManyWatches,
    /// A user or group of a user spec is not in the sandbox's `/etc/passwd` or `/etc/group`,
    /// or those files could not be read (version 5; only requests with a user or owner).
    UserNotFound,
    Io,
}

/// An error frame's payload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentError {
    pub code: AgentErrorCode,
    pub message: String,
}

/// Errors of the frame codec.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection closed")]
    Closed,
    #[error("reading a frame")]
    Read(#[source] std::io::Error),
    #[error("writing a frame")]
    Write(#[source] std::io::Error),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("bad payload in frame of kind {kind}")]
    BadPayload {
        kind: u8,
        #[source]
        source: serde_json::Error,
    },
    /// The agent answered with an `Error` frame ([`client`] helpers only).
    #[error("the agent refused: {} ({:?})", .0.message, .0.code)]
    Refused(AgentError),
    /// A frame the operation does not allow at this point ([`client`] helpers only).
    #[error("unexpected frame of kind {0}")]
    UnexpectedFrame(u8),
}

/// Longest user spec accepted ([`check_user_spec`]).
pub const MAX_USER_SPEC: usize = 64;

/// A user spec as Docker's `USER` and `--user` take it: `user` or `user:group`, each a name
/// (`[A-Za-z0-9._-]`, not starting with `-`) or a numeric id, at most [`MAX_USER_SPEC`]
/// bytes. Returns the user and the optional group. Says nothing about whether they exist.
pub fn check_user_spec(spec: &str) -> Result<(&str, Option<&str>), String> {
    if spec.is_empty() || spec.len() > MAX_USER_SPEC {
        return Err(format!(
            "a user must be 1 to {MAX_USER_SPEC} bytes: a name or id, optionally :group"
        ));
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('-')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    if !part_ok(user) || !group.is_none_or(part_ok) {
        return Err(format!(
            "user {spec:?} is not a name or id ([A-Za-z0-9._-]) with an optional :group"
        ));
    }
    Ok((user, group))
}

/// Validate a path the host sends: absolute, no `..` component, no NUL, not longer than
/// 4096 bytes. Returns the path with repeated and trailing slashes removed. Symlinks are
/// resolved by the sandbox's own kernel (gVisor), inside the sandbox's root: they can never
/// reach the host.
pub fn normalize_path(path: &str) -> Result<String, AgentError> {
    let bad = |message: &str| AgentError {
        code: AgentErrorCode::InvalidPath,
        message: message.to_string(),
    };
    if path.is_empty() {
        return Err(bad("path is empty"));
    }
    if path.len() > 4096 {
        return Err(bad("path is longer than 4096 bytes"));
    }
    if path.contains('\0') {
        return Err(bad("path contains a NUL byte"));
    }
    if !path.starts_with('/') {
        return Err(bad("path must be absolute"));
    }
    let mut out = String::with_capacity(path.len());
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return Err(bad("path must not contain '..'"));
        }
        if part.len() > 255 {
            return Err(bad("a path component is longer than 255 bytes"));
        }
        out.push('/');
        out.push_str(part);
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Write one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), ProtoError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(ProtoError::TooLarge(payload.len()));
    }
    let mut header = [0u8; 5];
    header[0] = kind as u8;
    header[1..].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    // A small frame goes out in one write: with `TCP_NODELAY` two writes are two segments
    // (and two wake-ups of the peer's reader) for every request and control frame.
    if payload.len() <= SMALL_FRAME {
        let mut buf = Vec::with_capacity(header.len() + payload.len());
        buf.extend_from_slice(&header);
        buf.extend_from_slice(payload);
        return w.write_all(&buf).await.map_err(ProtoError::Write);
    }
    w.write_all(&header).await.map_err(ProtoError::Write)?;
    w.write_all(payload).await.map_err(ProtoError::Write)?;
    Ok(())
}

/// Frames up to this payload size are copied to be written at once ([`write_frame`]).
const SMALL_FRAME: usize = 16 * 1024;

/// Write a frame with a JSON payload.
pub async fn write_json<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    kind: FrameKind,
    value: &T,
) -> Result<(), ProtoError> {
    let frame = Frame::json(kind, value);
    write_frame(w, kind, &frame.payload).await
}

/// Read one frame. Returns [`ProtoError::Closed`] on a clean end of stream before a header.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, ProtoError> {
    let mut header = [0u8; 5];
    match r.read_exact(&mut header[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ProtoError::Closed),
        Err(e) => return Err(ProtoError::Read(e)),
    }
    r.read_exact(&mut header[1..])
        .await
        .map_err(ProtoError::Read)?;
    let kind = FrameKind::from_u8(header[0]).ok_or(ProtoError::UnknownKind(header[0]))?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(ProtoError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.map_err(ProtoError::Read)?;
    Ok(Frame { kind, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_specs_and_their_version() {
        assert_eq!(check_user_spec("app"), Ok(("app", None)));
        assert_eq!(check_user_spec("1000:1000"), Ok(("1000", Some("1000"))));
        assert_eq!(check_user_spec("a.b_c-d:g"), Ok(("a.b_c-d", Some("g"))));
        for bad in [
            "",
            "a:b:c",
            "a/b",
            "-a",
            "a:-g",
            "a:",
            ":g",
            "a b",
            "é",
            &"a".repeat(65),
        ] {
            assert!(check_user_spec(bad).is_err(), "{bad:?}");
        }
        let exec = |user: Option<&str>| {
            Op::Exec(ExecRequest {
                shell: Some("id".into()),
                user: user.map(str::to_string),
                ..Default::default()
            })
            .version()
        };
        // Without a user a request stays in the version an older agent knows.
        assert_eq!((exec(None), exec(Some("app"))), (1, 5));
        let mkdir = |owner: Option<&str>| {
            Op::MakeDir {
                path: "/x".into(),
                recursive: true,
                owner: owner.map(str::to_string),
            }
            .version()
        };
        assert_eq!((mkdir(None), mkdir(Some("app"))), (1, 5));
        assert_eq!(Op::TerminalCreate(TerminalCreate::default()).version(), 3);
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let mut buf = Vec::new();
        let req = Request::new(Op::Exec(ExecRequest {
            shell: Some("echo hi".into()),
            timeout_ms: Some(1000),
            ..Default::default()
        }));
        write_json(&mut buf, FrameKind::Request, &req)
            .await
            .unwrap();
        write_frame(&mut buf, FrameKind::Stdout, b"hi\n")
            .await
            .unwrap();
        // Past the size written in one go: header and payload are written apart.
        let big = vec![7u8; SMALL_FRAME + 1];
        write_frame(&mut buf, FrameKind::Data, &big).await.unwrap();
        let mut r = &buf[..];
        let f = read_frame(&mut r).await.unwrap();
        assert_eq!(f.kind, FrameKind::Request);
        assert_eq!(f.parse::<Request>().unwrap(), req);
        let f = read_frame(&mut r).await.unwrap();
        assert_eq!(
            (f.kind, f.payload.as_slice()),
            (FrameKind::Stdout, &b"hi\n"[..])
        );
        let f = read_frame(&mut r).await.unwrap();
        assert_eq!((f.kind, f.payload), (FrameKind::Data, big));
        assert!(matches!(read_frame(&mut r).await, Err(ProtoError::Closed)));
    }

    #[tokio::test]
    async fn rejects_oversized_and_unknown_frames() {
        let mut r = &[99u8, 0, 0, 0, 0][..];
        assert!(matches!(
            read_frame(&mut r).await,
            Err(ProtoError::UnknownKind(99))
        ));
        let big = (MAX_FRAME_LEN as u32 + 1).to_be_bytes();
        let bytes = [5u8, big[0], big[1], big[2], big[3]];
        let mut r = &bytes[..];
        assert!(matches!(
            read_frame(&mut r).await,
            Err(ProtoError::TooLarge(_))
        ));
    }

    #[test]
    fn request_json_shape_is_stable() {
        let req = Request::new(Op::ReadFile {
            path: "/etc/hostname".into(),
        });
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"v":1,"op":"read_file","path":"/etc/hostname"}"#
        );
    }

    #[test]
    fn requests_carry_the_version_of_their_operation() {
        let req = Request::new(Op::ReadRegular {
            path: "/x".into(),
            offset: 3,
            limit: 10,
        });
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"v":2,"op":"read_regular","path":"/x","offset":3,"limit":10}"#
        );
        // Version-1 operations stay version 1, so an older agent still answers them.
        for op in [
            Op::Ping,
            Op::ListPorts,
            Op::Stat { path: "/".into() },
            Op::ReadFile { path: "/".into() },
        ] {
            assert_eq!(Request::new(op).v, 1);
        }
        assert_eq!(
            serde_json::to_string(&AgentErrorCode::NotRegularFile).unwrap(),
            r#""not_regular_file""#
        );
    }

    #[test]
    fn terminal_json_shapes_are_stable() {
        let req = Request::new(Op::TerminalCreate(TerminalCreate {
            id: Some("main".into()),
            argv: Some(vec!["/bin/sh".into()]),
            cols: 80,
            rows: 24,
            ..Default::default()
        }));
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"v":3,"op":"terminal_create","id":"main","argv":["/bin/sh"],"env":[],"cols":80,"rows":24}"#
        );
        let ops = [
            (
                Op::TerminalAttach {
                    id: "t1".into(),
                    replay: true,
                },
                r#"{"v":3,"op":"terminal_attach","id":"t1","replay":true}"#,
            ),
            (Op::TerminalList, r#"{"v":3,"op":"terminal_list"}"#),
            (
                Op::TerminalKill {
                    id: "t1".into(),
                    signal: Some(15),
                },
                r#"{"v":3,"op":"terminal_kill","id":"t1","signal":15}"#,
            ),
            (
                Op::TerminalResize {
                    id: "t1".into(),
                    cols: 120,
                    rows: 50,
                },
                r#"{"v":3,"op":"terminal_resize","id":"t1","cols":120,"rows":50}"#,
            ),
        ];
        for (op, json) in ops {
            assert_eq!(serde_json::to_string(&Request::new(op)).unwrap(), json);
        }
        let info = TerminalInfo {
            id: "t1".into(),
            pid: 42,
            argv: vec!["-bash".into()],
            cols: 80,
            rows: 24,
            exit_code: Some(3),
            created_at: 1_700_000_000,
            pipes: false,
        };
        assert_eq!(
            serde_json::to_string(&info).unwrap(),
            r#"{"id":"t1","pid":42,"argv":["-bash"],"cols":80,"rows":24,"exit_code":3,"created_at":1700000000}"#
        );
        assert_eq!(
            serde_json::to_string(&TerminalSize { cols: 1, rows: 2 }).unwrap(),
            r#"{"cols":1,"rows":2}"#
        );
        assert_eq!(FrameKind::from_u8(13), Some(FrameKind::Resize));
        assert_eq!(
            serde_json::to_string(&AgentErrorCode::TooManyTerminals).unwrap(),
            r#""too_many_terminals""#
        );
    }

    #[test]
    fn watch_json_shapes_are_stable() {
        let req = Request::new(Op::Watch(WatchRequest {
            path: "/w".into(),
            recursive: true,
            excludes: vec!["**/node_modules/**".into()],
        }));
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"v":4,"op":"watch","path":"/w","recursive":true,"excludes":["**/node_modules/**"]}"#
        );
        let batch = WatchBatch {
            events: vec![WatchEvent {
                kind: WatchEventKind::Add,
                path: "/w/a".into(),
                dir: false,
            }],
        };
        assert_eq!(
            serde_json::to_string(&batch).unwrap(),
            r#"{"events":[{"type":"add","path":"/w/a","dir":false}]}"#
        );
        assert_eq!(FrameKind::from_u8(14), Some(FrameKind::Events));
    }

    #[test]
    fn watch_requests_are_checked() {
        let req = |path: &str, excludes: Vec<String>| WatchRequest {
            path: path.into(),
            recursive: true,
            excludes,
        };
        assert_eq!(req("/w//x/", vec![]).validate().unwrap().path, "/w/x");
        assert_eq!(
            req("w", vec![]).validate().unwrap_err().code,
            AgentErrorCode::InvalidPath
        );
        assert_eq!(
            req("/w/../etc", vec![]).validate().unwrap_err().code,
            AgentErrorCode::InvalidPath
        );
        for bad in [
            vec!["".to_string()],
            vec!["a\0".to_string()],
            vec!["x".repeat(MAX_WATCH_EXCLUDE_LEN + 1)],
            vec!["a".to_string(); MAX_WATCH_EXCLUDES + 1],
        ] {
            assert_eq!(
                req("/w", bad).validate().unwrap_err().code,
                AgentErrorCode::BadRequest
            );
        }
    }

    #[test]
    fn excludes_match_like_gitignore() {
        let ex = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let nm = ex(&["**/node_modules/**"]);
        assert!(watch_excluded("node_modules", &nm));
        assert!(watch_excluded("node_modules/a.js", &nm));
        assert!(watch_excluded("p/node_modules/x/y.js", &nm));
        assert!(!watch_excluded("p/node_modules_x", &nm));
        assert!(!watch_excluded("src/a.js", &nm));
        let logs = ex(&["*.log", "build"]);
        assert!(watch_excluded("x.log", &logs) && watch_excluded("a/b/x.log", &logs));
        assert!(watch_excluded("build/out.js", &logs));
        assert!(!watch_excluded("x.logs", &logs) && !watch_excluded("builder", &logs));
        let anchored = ex(&["src/*.tmp"]);
        assert!(watch_excluded("src/a.tmp", &anchored));
        assert!(!watch_excluded("lib/src/a.tmp", &anchored));
        assert!(component_match(b"a*b?c*", b"axxbycdd"));
        assert!(!component_match(b"a*b?c", b"axxbyd"));
    }

    #[test]
    fn event_queues_are_bounded() {
        let ev = |i: usize| WatchEvent {
            kind: WatchEventKind::Add,
            path: format!("/w/{i}"),
            dir: false,
        };
        let mut q = EventQueue::new("/w");
        q.push(ev(0));
        q.push(ev(0));
        assert_eq!(q.take_batch(), vec![ev(0)]);
        for i in 0..MAX_QUEUED_EVENTS * 3 {
            q.push(ev(i));
        }
        let first = q.take_batch();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].kind, WatchEventKind::Overflow);
        assert!(q.is_empty());
        // After the overflow was taken, events queue again.
        q.push(ev(1));
        assert_eq!(q.take_batch(), vec![ev(1)]);
    }

    #[test]
    fn validates_terminal_ids_and_sizes() {
        for good in ["t1", "a", "A-b_9", &"x".repeat(64)] {
            assert!(validate_terminal_id(good).is_ok(), "{good:?}");
        }
        for bad in ["", "../x", "a/b", "a b", "é", "a\0", &"x".repeat(65)] {
            assert_eq!(
                validate_terminal_id(bad).unwrap_err().code,
                AgentErrorCode::BadRequest,
                "{bad:?}"
            );
        }
        let size = |cols, rows| TerminalSize { cols, rows }.validate().is_ok();
        assert!(size(1, 1) && size(1000, 1000) && size(80, 24));
        assert!(!size(0, 24) && !size(80, 0) && !size(1001, 24) && !size(80, u16::MAX));
    }

    #[test]
    fn list_ports_json_shape_is_stable() {
        let req = Request::new(Op::ListPorts);
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"v":1,"op":"list_ports"}"#
        );
        let reply = PortList {
            ports: vec![ListeningPort {
                port: 8080,
                address: "0.0.0.0".into(),
            }],
        };
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"ports":[{"port":8080,"address":"0.0.0.0"}]}"#
        );
    }

    #[test]
    fn normalizes_and_rejects_paths() {
        assert_eq!(normalize_path("/a//b/./c/").unwrap(), "/a/b/c");
        assert_eq!(normalize_path("/").unwrap(), "/");
        for bad in ["", "a/b", "/a/../b", "/..", "/a\0b"] {
            assert!(normalize_path(bad).is_err(), "{bad:?} accepted");
        }
        assert!(normalize_path(&format!("/{}", "x".repeat(256))).is_err());
    }

    proptest::proptest! {
        /// Whatever the host sends, an accepted path is absolute, canonical (no empty, `.`
        /// or `..` components) and a fixed point.
        #[test]
        fn normalized_paths_cannot_climb(raw in "(/|[a-z.]{1,3}|\\.\\.|//|\\x00){0,12}") {
            if let Ok(p) = normalize_path(&raw) {
                proptest::prop_assert!(p.starts_with('/'));
                proptest::prop_assert!(p == "/" || p.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != ".."));
                proptest::prop_assert!(!p.contains('\0'));
                proptest::prop_assert_eq!(normalize_path(&p).unwrap(), p);
            }
        }

        /// The frame decoder never panics or over-allocates on arbitrary bytes.
        #[test]
        fn frame_decoder_survives_garbage(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut r = &bytes[..];
            let _ = rt.block_on(read_frame(&mut r));
        }
    }
}
