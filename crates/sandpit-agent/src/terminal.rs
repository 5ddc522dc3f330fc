//! Terminals (protocol version 3): processes on a pseudo-terminal that belong to the agent,
//! not to a connection, viewed by any number of attachments at once.
//!
//! Each terminal has two tasks. The supervisor reads the pty master into the terminal's
//! scrollback (a bounded ring) until the process exited and the pty drained (or
//! [`PIPE_GRACE`] passed: a background child may hold the pty open forever), then records
//! the exit and lets go of the master. The writer takes input bytes from a bounded queue and
//! writes them to the master until the process exited. Both end on their own when the process
//! does. Attachments never hold output of their own: each keeps a position in the scrollback
//! and copies from it when the terminal's `events` channel says something changed, so a slow
//! attachment never slows the process or the others; one that falls more than the scrollback
//! behind skips what it missed.
//!
//! The pty is opened and the child made a session leader with the pty as its controlling
//! terminal by `pty-process` (which holds the `unsafe` `pre_exec`); switching the child to
//! a user is `users::pty_run_as`.
//!
//! A terminal on pipes (protocol version 6, `TerminalCreate::pipes`) is the same thing
//! without the pty: the process runs in a process group of its own with stdout and stderr on
//! pipes, each read into a scrollback of its own, and stdin on a pipe (or `/dev/null`) that
//! `StdinClose` closes.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use pty_process::OwnedReadPty;
use rustix::process::{Pid, Signal};
use sandpit_agent_proto::{
    AgentError, AgentErrorCode, DEFAULT_SCROLLBACK, ExecRequest, ExitStatus, FrameKind,
    MAX_SCROLLBACK, MAX_TERMINALS, MIN_SCROLLBACK, ProtoError, SignalRequest, TerminalCreate,
    TerminalInfo, TerminalList, TerminalSize, validate_terminal_id,
};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, ChildStdout};
use tokio::sync::{mpsc, watch};
use tokio::time::sleep_until;

use crate::conn::{Conn, agent_error};
use crate::exec::{
    OUTPUT_CHUNK, PIPE_GRACE, build_command, check_cwd, check_env, exit_status, signal_from_raw,
};
use crate::init::{DEFAULT_HOME, default_env};
use crate::users::{self, Creds};

/// `TERM` of every terminal unless its request sets one.
pub const DEFAULT_TERM: &str = "xterm-256color";
/// Input chunks queued for a terminal's writer; attachments wait (and stop reading the host)
/// while it is full, so at most this many frames of input are held.
const INPUT_QUEUE: usize = 8;
/// While input is backed up, how often an attachment checks whether the host went away.
const PEER_CHECK: Duration = Duration::from_millis(500);
/// Bytes the supervisor reads from the master at once.
const READ_CHUNK: usize = 16 * 1024;
/// How often the supervisor looks at the pty and the process without epoll.
const POKE: Duration = Duration::from_secs(1);
/// Most bytes of argv a [`TerminalInfo`] shows, so that a list of [`MAX_TERMINALS`] always
/// fits in one frame.
pub const MAX_ARGV_SHOWN: usize = 4 * 1024;

/// The agent's terminals.
pub struct Terminals {
    /// By id. Held for map operations and for spawning a process (no await under it), so
    /// two creates cannot both take the last free place or the same id.
    map: Mutex<BTreeMap<String, Arc<Terminal>>>,
    /// Source of the ids the agent picks (`t1`, `t2`, ...).
    next_id: AtomicU64,
}

impl Terminals {
    pub fn new() -> Terminals {
        Terminals {
            map: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// Start a terminal. Must run inside the tokio runtime (the pty and the child register
    /// with it, and its tasks are spawned on it).
    pub fn create(&self, req: TerminalCreate) -> Result<TerminalInfo, AgentError> {
        let bad = |m: String| agent_error(AgentErrorCode::BadRequest, m);
        let size = TerminalSize {
            cols: req.cols,
            rows: req.rows,
        }
        .validate()?;
        let capacity = req.scrollback_bytes.unwrap_or(DEFAULT_SCROLLBACK);
        if !(MIN_SCROLLBACK..=MAX_SCROLLBACK).contains(&capacity) {
            return Err(bad(format!(
                "scrollback_bytes {capacity} is outside {MIN_SCROLLBACK} to {MAX_SCROLLBACK}"
            )));
        }
        if let Some(id) = &req.id {
            validate_terminal_id(id)?;
        }
        let creds = users::resolve_opt(req.user.as_deref())?;
        let (program, args, arg0) = match (req.argv, req.shell) {
            (Some(argv), None) => {
                let mut argv = argv.into_iter();
                match argv.next() {
                    Some(program) => (program, argv.collect(), None),
                    None => return Err(bad("argv is empty".into())),
                }
            }
            (None, Some(shell)) => ("/bin/sh".to_string(), vec!["-c".to_string(), shell], None),
            (None, None) if req.pipes => {
                return Err(bad("a terminal on pipes needs argv or shell".into()));
            }
            (None, None) => {
                let shell = login_shell(creds.as_ref());
                let name = shell.rsplit('/').next().unwrap_or("sh");
                let arg0 = format!("-{name}");
                (shell, Vec::new(), Some(arg0))
            }
            (Some(_), Some(_)) => {
                return Err(bad("at most one of argv and shell may be set".into()));
            }
        };
        let shown = shown_argv(
            std::iter::once(arg0.as_deref().unwrap_or(&program))
                .chain(args.iter().map(String::as_str)),
        );
        check_env(&req.env)?;
        let home = creds.as_ref().map(|c| c.home.as_str());
        let cwd = match &req.cwd {
            Some(cwd) => check_cwd(cwd)?,
            None => default_cwd(home),
        };

        let mut map = self.lock();
        if map.len() >= MAX_TERMINALS {
            return Err(agent_error(
                AgentErrorCode::TooManyTerminals,
                format!(
                    "the sandbox has {MAX_TERMINALS} terminals already; remove exited ones with terminal_kill"
                ),
            ));
        }
        let id = match req.id {
            Some(id) if map.contains_key(&id) => {
                return Err(agent_error(
                    AgentErrorCode::AlreadyExists,
                    format!("terminal {id} exists"),
                ));
            }
            Some(id) => id,
            // At most MAX_TERMINALS ids are taken, so this ends.
            None => loop {
                let id = format!("t{}", self.next_id.fetch_add(1, Ordering::Relaxed));
                if !map.contains_key(&id) {
                    break id;
                }
            },
        };
        let spawn_failed = |what: &str, e: &dyn std::fmt::Display| {
            agent_error(AgentErrorCode::SpawnFailed, format!("{what}: {e}"))
        };
        let (input, input_rx) = mpsc::channel(INPUT_QUEUE);
        let (events, _) = watch::channel(false);
        let created_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let new_term = |pid: u32, master: Option<OwnedFd>, peek: Vec<(OwnedFd, Stream)>| {
            Arc::new(Terminal {
                id: id.clone(),
                pid,
                argv: shown.clone(),
                created_at,
                started: Instant::now(),
                pipes: req.pipes,
                state: Mutex::new(State {
                    scrollback: Scrollback::new(capacity as usize),
                    err: req.pipes.then(|| Scrollback::new(capacity as usize)),
                    size,
                    master,
                    peek,
                    pgid: i32::try_from(pid)
                        .ok()
                        .filter(|p| *p > 1)
                        .and_then(Pid::from_raw),
                    exit: None,
                }),
                events,
                input,
            })
        };
        let cant_run = |e: &dyn std::fmt::Display| {
            // `program` may be most of a frame long: name its first bytes only.
            let name = &shown_argv(std::iter::once(program.as_str()))[0];
            spawn_failed(&format!("cannot run {name}"), e)
        };
        let term = if req.pipes {
            // Spawned exactly as an `Exec` is (process group, pipes, user), the command
            // already in argv form.
            let mut cmd = build_command(&ExecRequest {
                argv: Some(
                    std::iter::once(program.clone())
                        .chain(args.iter().cloned())
                        .collect(),
                ),
                cwd: Some(cwd.clone()),
                env: req.env.clone(),
                stdin: req.stdin,
                user: req.user.clone(),
                ..Default::default()
            })?;
            let mut child = cmd.spawn().map_err(|e| cant_run(&e))?;
            let pid = child.id().unwrap_or(0);
            // All three were asked for as pipes (stdin only with `req.stdin`).
            let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
                return Err(spawn_failed("cannot run the process", &"no output pipes"));
            };
            let stdin = child.stdin.take();
            let mut peek = Vec::new();
            for (fd, stream) in [(out.as_fd(), Stream::Out), (err.as_fd(), Stream::Err)] {
                let dup = fd
                    .try_clone_to_owned()
                    .map_err(|e| spawn_failed("cannot duplicate a pipe", &e))?;
                peek.push((dup, stream));
            }
            let term = new_term(pid, None, peek);
            tokio::spawn(supervise_pipes(term.clone(), out, err, child));
            tokio::spawn(write_input(stdin, true, input_rx, term.events.subscribe()));
            term
        } else {
            let (pty, pts) =
                pty_process::open().map_err(|e| spawn_failed("cannot open a pty", &e))?;
            pty.resize(pty_process::Size::new(size.rows, size.cols))
                .map_err(|e| spawn_failed("cannot size the pty", &e))?;
            let master = pty
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| spawn_failed("cannot duplicate the pty", &e))?;
            let peek = vec![(
                master
                    .try_clone()
                    .map_err(|e| spawn_failed("cannot duplicate the pty", &e))?,
                Stream::Out,
            )];
            let mut cmd = pty_process::Command::new(&program)
                .args(&args)
                .current_dir(&cwd)
                .envs(default_env())
                .env("TERM", DEFAULT_TERM)
                .envs(req.env.iter().map(|(k, v)| (k, v)));
            if let Some(arg0) = &arg0 {
                cmd = cmd.arg0(arg0);
            }
            if let Some(creds) = &creds {
                if !req.env.iter().any(|(k, _)| k == "HOME") {
                    cmd = cmd.env("HOME", &creds.home);
                }
                cmd = users::pty_run_as(cmd, creds);
            }
            let child = cmd.spawn(pts).map_err(|e| cant_run(&e))?;
            let pid = child.id().unwrap_or(0);
            let (reader, writer) = pty.into_split();
            let term = new_term(pid, Some(master), peek);
            tokio::spawn(supervise(term.clone(), reader, child));
            tokio::spawn(write_input(
                Some(writer),
                false,
                input_rx,
                term.events.subscribe(),
            ));
            term
        };
        map.insert(id, term.clone());
        Ok(term.info())
    }

    /// All terminals, sorted by id.
    pub fn list(&self) -> TerminalList {
        let terminals = self.lock().values().map(|t| t.info()).collect();
        TerminalList { terminals }
    }

    /// Signal a terminal's process group, or (no signal) kill it and remove it.
    pub fn kill(&self, id: &str, signal: Option<i32>) -> Result<(), AgentError> {
        let signal = signal.map(signal_from_raw).transpose()?;
        let term = self.get(id)?;
        match signal {
            Some(sig) => term.signal(sig),
            None => {
                term.signal(Signal::KILL);
                self.lock().remove(id);
            }
        }
        Ok(())
    }

    /// Resize a terminal.
    pub fn resize(&self, id: &str, size: TerminalSize) -> Result<(), AgentError> {
        let size = size.validate()?;
        self.get(id)?.resize(size)
    }

    fn get(&self, id: &str) -> Result<Arc<Terminal>, AgentError> {
        validate_terminal_id(id)?;
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| agent_error(AgentErrorCode::NotFound, format!("no terminal {id}")))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Terminal>>> {
        // A panic under the lock leaves the map consistent: every change is one call.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serve `TerminalAttach`: `Started`, the scrollback if `replay`, live output, `Exit`; take
/// `Stdin`, `Resize` and `Signal` from the host meanwhile. Returns when the process exited
/// (after `Exit`), on a malformed frame (after `Error`), or when the host detached.
pub async fn attach(
    conn: &mut Conn,
    terminals: &Terminals,
    id: &str,
    replay: bool,
) -> Result<(), ProtoError> {
    let term = match terminals.get(id) {
        Ok(t) => t,
        Err(e) => return conn.send_error(&e).await,
    };
    // Subscribed before the position is taken: nothing written after it goes unnoticed.
    let mut events = term.events.subscribe();
    let (mut pos, mut epos) = {
        let st = term.lock();
        let err = st.err.as_ref();
        if replay {
            (st.scrollback.start(), err.map_or(0, Scrollback::start))
        } else {
            (st.scrollback.end(), err.map_or(0, Scrollback::end))
        }
    };
    conn.send_json(FrameKind::Started, &term.info()).await?;
    // Input taken from the host, waiting for room in the writer's queue.
    let mut pending: Option<Input> = None;
    loop {
        loop {
            let (next, chunk, enext, echunk, exit) = {
                let st = term.lock();
                let (next, chunk) = st.scrollback.read_from(pos, OUTPUT_CHUNK);
                let (enext, echunk) = match &st.err {
                    Some(err) => err.read_from(epos, OUTPUT_CHUNK),
                    None => (epos, Vec::new()),
                };
                (next, chunk, enext, echunk, st.exit.clone())
            };
            (pos, epos) = (next, enext);
            if !chunk.is_empty() {
                conn.send(FrameKind::Stdout, &chunk).await?;
            }
            if !echunk.is_empty() {
                conn.send(FrameKind::Stderr, &echunk).await?;
            }
            if chunk.is_empty() && echunk.is_empty() {
                if let Some(exit) = exit {
                    // The exit is recorded after the last output: everything was sent.
                    return conn.send_json(FrameKind::Exit, &exit).await;
                }
                break;
            }
        }
        tokio::select! {
            // The sender lives in `term`, which this function holds: never closed.
            _ = events.changed() => {}
            permit = term.input.reserve(), if pending.is_some() => {
                // An error: the writer is gone (the process exited); the input is dropped.
                if let (Ok(permit), Some(input)) = (permit, pending.take()) {
                    permit.send(input);
                }
            }
            _ = tokio::time::sleep(PEER_CHECK), if pending.is_some() => {
                if let Some(e) = conn.take_error() {
                    return Err(ProtoError::Read(e));
                }
            }
            frame = conn.recv(), if pending.is_none() => {
                let frame = frame?;
                let handled = match frame.kind {
                    FrameKind::Stdin => {
                        if !frame.payload.is_empty() {
                            pending = Some(Input::Bytes(frame.payload));
                        }
                        Ok(())
                    }
                    FrameKind::Resize => frame
                        .parse::<TerminalSize>()
                        .map_err(|e| agent_error(AgentErrorCode::BadRequest, e.to_string()))
                        .and_then(TerminalSize::validate)
                        .and_then(|size| term.resize(size)),
                    FrameKind::Signal => frame
                        .parse::<SignalRequest>()
                        .map_err(|e| agent_error(AgentErrorCode::BadRequest, e.to_string()))
                        .and_then(|req| signal_from_raw(req.signal))
                        .map(|sig| term.signal(sig)),
                    // A pty has no end of input: the host sends the EOF character instead.
                    FrameKind::StdinClose => {
                        if term.pipes {
                            pending = Some(Input::Close);
                        }
                        Ok(())
                    }
                    other => Err(agent_error(
                        AgentErrorCode::BadRequest,
                        format!("frame kind {} is not allowed in an attachment", other as u8),
                    )),
                };
                if let Err(e) = handled {
                    return conn.send_error(&e).await;
                }
            }
        }
    }
}

/// One terminal.
struct Terminal {
    id: String,
    pid: u32,
    argv: Vec<String>,
    created_at: i64,
    started: Instant,
    /// On pipes (version 6), not a pty.
    pipes: bool,
    /// Output, size and exit; never held across an await.
    state: Mutex<State>,
    /// `true` once the process exited; also bumped (unchanged) on every output.
    events: watch::Sender<bool>,
    /// Input for the writer task.
    input: mpsc::Sender<Input>,
}

/// What an attachment hands the writer.
enum Input {
    Bytes(Vec<u8>),
    /// Close stdin (pipes only).
    Close,
}

/// An output stream of a terminal.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stream {
    /// The pty, or stdout.
    Out,
    Err,
}

struct State {
    /// The pty's output, or stdout.
    scrollback: Scrollback,
    /// Stderr, on pipes.
    err: Option<Scrollback>,
    size: TerminalSize,
    /// A duplicate of the master, to resize the pty; dropped when the process exited.
    master: Option<OwnedFd>,
    /// Duplicates of the descriptors output is read from, to read them without epoll (see
    /// [`supervise`]); dropped when the process exited.
    peek: Vec<(OwnedFd, Stream)>,
    /// The process group to signal; `None` once the leader was reaped (its id may be reused).
    pgid: Option<Pid>,
    exit: Option<ExitStatus>,
}

impl Terminal {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn info(&self) -> TerminalInfo {
        let st = self.lock();
        TerminalInfo {
            id: self.id.clone(),
            pid: self.pid,
            argv: self.argv.clone(),
            cols: st.size.cols,
            rows: st.size.rows,
            exit_code: st.exit.as_ref().map(|e| e.exit_code),
            created_at: self.created_at,
            pipes: self.pipes,
        }
    }

    fn signal(&self, sig: Signal) {
        if let Some(pgid) = self.lock().pgid {
            // ESRCH: the group is gone already.
            let _ = rustix::process::kill_process_group(pgid, sig);
        }
    }

    fn resize(&self, size: TerminalSize) -> Result<(), AgentError> {
        let mut st = self.lock();
        if let Some(master) = &st.master {
            let winsize = rustix::termios::Winsize {
                ws_row: size.rows,
                ws_col: size.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            rustix::termios::tcsetwinsize(master, winsize).map_err(|e| {
                agent_error(AgentErrorCode::Io, format!("cannot resize the pty: {e}"))
            })?;
        }
        st.size = size;
        Ok(())
    }

    /// Read what `stream` holds now, without waiting (and without epoll).
    fn read_now(&self, stream: Stream, buf: &mut [u8]) -> Option<usize> {
        let st = self.lock();
        let (fd, _) = st.peek.iter().find(|(_, s)| *s == stream)?;
        rustix::io::read(fd, buf).ok().filter(|n| *n > 0)
    }

    fn push(&self, stream: Stream, data: &[u8]) {
        {
            let mut st = self.lock();
            match (stream, st.err.as_mut()) {
                (Stream::Err, Some(err)) => err.push(data),
                _ => st.scrollback.push(data),
            }
        }
        self.events.send_modify(|_| {});
    }

    /// The exit status of a reaped process.
    fn reaped(&self, st: std::process::ExitStatus) -> ExitStatus {
        self.lock().pgid = None;
        exit_status(st, false, self.started.elapsed())
    }

    /// Record the exit (after the last output) and let go of the descriptors.
    fn finish(&self, status: Option<ExitStatus>) {
        {
            let mut st = self.lock();
            st.exit = status;
            st.master = None;
            st.peek.clear();
        }
        self.events.send_replace(true);
    }
}

/// Read the pty into the scrollback until the process exited and the pty drained, then
/// record the exit.
async fn supervise(term: Arc<Terminal>, mut pty: OwnedReadPty, mut child: Child) {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut reading = true;
    let mut status: Option<ExitStatus> = None;
    let mut waiting = true;
    let mut grace_end = tokio::time::Instant::now();
    let mut poke = tokio::time::interval(POKE);
    poke.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while reading || status.is_none() {
        let reaped = tokio::select! {
            r = pty.read(&mut buf), if reading => {
                match r {
                    Ok(n) if n > 0 => term.push(Stream::Out, &buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // EIO once no process holds the pty any more.
                    _ => reading = false,
                }
                None
            }
            r = child.wait(), if status.is_none() && waiting => waited(&term, r, &mut waiting),
            _ = poke.tick() => {
                // A terminal lives across checkpoints, and after a gVisor restore a
                // descriptor registered with epoll before the checkpoint was seen never to
                // report readiness again (see `server.rs`): look without epoll now and then.
                if reading && let Some(n) = term.read_now(Stream::Out, &mut buf) {
                    term.push(Stream::Out, &buf[..n]);
                }
                match child.try_wait() {
                    Ok(Some(st)) if status.is_none() => Some(st),
                    _ => None,
                }
            }
            _ = sleep_until(grace_end), if status.is_some() => break,
        };
        if let Some(r) = reaped {
            status = Some(term.reaped(r));
            grace_end = tokio::time::Instant::now() + PIPE_GRACE;
        }
    }
    term.finish(status);
}

/// [`supervise`] for a terminal on pipes: read stdout and stderr until the process exited
/// and both drained (or [`PIPE_GRACE`] passed), then record the exit.
async fn supervise_pipes(
    term: Arc<Terminal>,
    mut out: ChildStdout,
    mut err: ChildStderr,
    mut child: Child,
) {
    let mut obuf = vec![0u8; READ_CHUNK];
    let mut ebuf = vec![0u8; READ_CHUNK];
    let (mut out_open, mut err_open) = (true, true);
    let mut status: Option<ExitStatus> = None;
    let mut waiting = true;
    let mut grace_end = tokio::time::Instant::now();
    let mut poke = tokio::time::interval(POKE);
    poke.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while out_open || err_open || status.is_none() {
        let reaped = tokio::select! {
            r = out.read(&mut obuf), if out_open => {
                out_open = took(&term, Stream::Out, r, &obuf);
                None
            }
            r = err.read(&mut ebuf), if err_open => {
                err_open = took(&term, Stream::Err, r, &ebuf);
                None
            }
            r = child.wait(), if status.is_none() && waiting => waited(&term, r, &mut waiting),
            _ = poke.tick() => {
                // As in `supervise`: after a restore, look without epoll now and then.
                for (open, stream, buf) in
                    [(out_open, Stream::Out, &mut obuf), (err_open, Stream::Err, &mut ebuf)]
                {
                    if open && let Some(n) = term.read_now(stream, buf) {
                        term.push(stream, &buf[..n]);
                    }
                }
                match child.try_wait() {
                    Ok(Some(st)) if status.is_none() => Some(st),
                    _ => None,
                }
            }
            _ = sleep_until(grace_end), if status.is_some() => break,
        };
        if let Some(r) = reaped {
            status = Some(term.reaped(r));
            grace_end = tokio::time::Instant::now() + PIPE_GRACE;
        }
    }
    term.finish(status);
}

/// What one `child.wait()` gave. An error is not an exit: tokio waits on a pidfd through
/// epoll, and after a gVisor restore re-registering it can fail while the process runs on
/// (seen as a live E2B process reported exited with -1 after a resume). The supervisor then
/// stops waiting that way and the poke's `try_wait` (a plain `waitpid`) sees the exit.
fn waited(
    term: &Terminal,
    r: std::io::Result<std::process::ExitStatus>,
    waiting: &mut bool,
) -> Option<std::process::ExitStatus> {
    match r {
        Ok(st) => Some(st),
        Err(e) => {
            log!(
                "terminal {}: wait: {e}; polling for the exit instead",
                term.id
            );
            *waiting = false;
            None
        }
    }
}

/// Keep what one read of `stream` gave; whether the stream is still open.
fn took(term: &Terminal, stream: Stream, r: std::io::Result<usize>, buf: &[u8]) -> bool {
    match r {
        Ok(n) if n > 0 => {
            term.push(stream, &buf[..n]);
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => true,
        // EOF, or an error: nothing more comes.
        _ => false,
    }
}

/// Write queued input to the pty or the stdin pipe until the process exited. `Close` drops
/// the pipe when `closable` (a pty has no end of input).
async fn write_input<W: AsyncWrite + Unpin>(
    mut sink: Option<W>,
    closable: bool,
    mut input: mpsc::Receiver<Input>,
    mut exited: watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            next = input.recv() => next,
            _ = exited.wait_for(|e| *e) => None,
        };
        let bytes = match next {
            None => return,
            Some(Input::Close) => {
                if closable {
                    sink = None;
                }
                continue;
            }
            Some(Input::Bytes(bytes)) => bytes,
        };
        // No stdin (or closed): the input is dropped.
        let Some(w) = sink.as_mut() else { continue };
        tokio::select! {
            // An error (EIO, EPIPE): nothing reads any more; keep draining until the exit.
            _ = w.write_all(&bytes) => {}
            _ = exited.wait_for(|e| *e) => return,
        }
    }
}

/// `argv` for [`TerminalInfo`]: its first [`MAX_ARGV_SHOWN`] bytes (the argument that
/// crosses the bound is cut at a character boundary, later ones are left out).
fn shown_argv<'a>(argv: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut room = MAX_ARGV_SHOWN;
    let mut out = Vec::new();
    for arg in argv {
        if room == 0 {
            break;
        }
        let mut end = arg.len().min(room);
        while !arg.is_char_boundary(end) {
            end -= 1;
        }
        out.push(arg[..end].to_string());
        room -= end;
    }
    out
}

/// The login shell of the agent's user (`/etc/passwd`), or `/bin/sh`.
/// The login shell of `creds` (root's when `None`), if it is a usable file; else `/bin/sh`.
fn login_shell(creds: Option<&Creds>) -> String {
    let shell = match creds {
        Some(c) => c.shell.clone(),
        None => users::resolve("0").ok().and_then(|c| c.shell),
    };
    shell
        .filter(|shell| {
            shell.starts_with('/')
                && !shell.ends_with("/nologin")
                && !shell.ends_with("/false")
                && std::path::Path::new(shell).is_file()
        })
        .unwrap_or_else(|| "/bin/sh".to_string())
}

/// The user's home (`HOME` for root) when it is a directory, else `/`.
fn default_cwd(home: Option<&str>) -> String {
    let home = match home {
        Some(h) => h.to_string(),
        None => std::env::var("HOME").unwrap_or_else(|_| DEFAULT_HOME.to_string()),
    };
    check_cwd(&home).unwrap_or_else(|_| "/".to_string())
}

/// The last `capacity` bytes of a stream, addressed by their position in the whole stream.
struct Scrollback {
    buf: VecDeque<u8>,
    capacity: usize,
    /// Bytes ever pushed: the position just past the last one.
    end: u64,
}

impl Scrollback {
    fn new(capacity: usize) -> Scrollback {
        Scrollback {
            buf: VecDeque::new(),
            capacity,
            end: 0,
        }
    }

    /// Position of the oldest byte kept.
    fn start(&self) -> u64 {
        self.end - self.buf.len() as u64
    }

    fn end(&self) -> u64 {
        self.end
    }

    fn push(&mut self, data: &[u8]) {
        self.end += data.len() as u64;
        let data = &data[data.len().saturating_sub(self.capacity)..];
        let over = (self.buf.len() + data.len()).saturating_sub(self.capacity);
        self.buf.drain(..over);
        self.buf.extend(data);
    }

    /// At most `max` bytes from position `pos` (or from the oldest kept, if `pos` fell out),
    /// and the position after them.
    fn read_from(&self, pos: u64, max: usize) -> (u64, Vec<u8>) {
        let pos = pos.clamp(self.start(), self.end);
        let offset = (pos - self.start()) as usize;
        let n = (self.buf.len() - offset).min(max);
        let out: Vec<u8> = self.buf.range(offset..offset + n).copied().collect();
        (pos + n as u64, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrollback_keeps_the_tail_and_skips_lost_output() {
        let mut sb = Scrollback::new(8);
        sb.push(b"hello");
        assert_eq!((sb.start(), sb.end()), (0, 5));
        assert_eq!(sb.read_from(0, 100), (5, b"hello".to_vec()));
        assert_eq!(sb.read_from(1, 2), (3, b"el".to_vec()));
        sb.push(b" world");
        assert_eq!((sb.start(), sb.end()), (3, 11));
        // Position 0 fell out: the reader skips to the oldest byte kept.
        assert_eq!(sb.read_from(0, 100), (11, b"lo world".to_vec()));
        assert_eq!(sb.read_from(11, 100), (11, Vec::new()));
        // A push larger than the capacity keeps its tail.
        sb.push(b"0123456789abc");
        assert_eq!((sb.start(), sb.end()), (16, 24));
        assert_eq!(sb.read_from(20, 100), (24, b"9abc".to_vec()));
        assert_eq!(sb.buf.len(), 8);
    }

    #[test]
    fn shown_argv_is_bounded() {
        let long = "é".repeat(MAX_ARGV_SHOWN);
        let shown = shown_argv(["sh", "-c", long.as_str(), "more"].into_iter());
        assert_eq!(shown.len(), 3);
        assert_eq!(shown.iter().map(String::len).sum::<usize>(), MAX_ARGV_SHOWN);
        assert_eq!(shown_argv(["a", "b"].into_iter()), ["a", "b"]);
    }

    #[test]
    fn login_shell_is_an_absolute_file() {
        let shell = login_shell(None);
        assert!(shell.starts_with('/'), "{shell}");
        assert!(std::path::Path::new(&shell).is_file());
    }
}
