//! `Exec`: run a process in its own process group and stream its output.

use std::collections::VecDeque;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use sandpit_agent_proto::{
    AgentError, AgentErrorCode, ExecRequest, ExecStarted, ExitStatus, FrameKind, ProtoError,
    SignalRequest, normalize_path,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::time::sleep_until;

use crate::conn::{Conn, agent_error};
use crate::init::default_env;
use crate::users;

/// Largest `Stdout`/`Stderr` payload.
pub const OUTPUT_CHUNK: usize = 64 * 1024;
/// After the process exits, how long to wait for its pipes to reach EOF (a backgrounded
/// grandchild may hold them open forever).
pub const PIPE_GRACE: Duration = Duration::from_millis(100);
/// Stop reading host frames while this much stdin is queued and not yet taken by the process.
const STDIN_QUEUE_LIMIT: usize = 1 << 20;
/// While stdin is backed up, how often to check whether the host went away.
const PEER_CHECK: Duration = Duration::from_millis(500);

/// Build the command for `req`, or the error to answer with.
pub fn build_command(req: &ExecRequest) -> Result<Command, AgentError> {
    let bad = |m: &str| agent_error(AgentErrorCode::BadRequest, m);
    let (program, args): (&str, &[String]) = match (&req.argv, &req.shell) {
        (Some(argv), None) => match argv.split_first() {
            Some((program, args)) => (program, args),
            None => return Err(bad("argv is empty")),
        },
        (None, Some(shell)) => ("/bin/sh", std::slice::from_ref(shell)),
        _ => return Err(bad("exactly one of argv and shell must be set")),
    };
    check_env(&req.env)?;
    let cwd = check_cwd(req.cwd.as_deref().unwrap_or("/"))?;
    let creds = users::resolve_opt(req.user.as_deref())?;
    let mut cmd = Command::new(program);
    if req.shell.is_some() {
        cmd.arg("-c");
    }
    cmd.args(args)
        .current_dir(&cwd)
        .envs(default_env())
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .process_group(0)
        .stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(creds) = &creds {
        if !req.env.iter().any(|(k, _)| k == "HOME") {
            cmd.env("HOME", &creds.home);
        }
        users::run_as(&mut cmd, creds);
    }
    Ok(cmd)
}

/// Refuse environment variable names that are empty or contain `=`.
pub fn check_env(env: &[(String, String)]) -> Result<(), AgentError> {
    if env.iter().any(|(k, _)| k.is_empty() || k.contains('=')) {
        return Err(agent_error(
            AgentErrorCode::BadRequest,
            "environment variable names must be non-empty and not contain '='",
        ));
    }
    Ok(())
}

/// The normalized working directory `cwd`, which must be a directory.
pub fn check_cwd(cwd: &str) -> Result<String, AgentError> {
    let cwd = normalize_path(cwd)?;
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => Ok(cwd),
        Ok(_) => Err(agent_error(
            AgentErrorCode::SpawnFailed,
            format!("working directory {cwd} is not a directory"),
        )),
        Err(e) => Err(agent_error(
            AgentErrorCode::SpawnFailed,
            format!("working directory {cwd}: {e}"),
        )),
    }
}

/// The signal numbered `raw`, or `bad_request`.
pub fn signal_from_raw(raw: i32) -> Result<Signal, AgentError> {
    Signal::from_named_raw(raw)
        .ok_or_else(|| agent_error(AgentErrorCode::BadRequest, format!("unknown signal {raw}")))
}

/// Kills the process group on drop unless the process was reaped, so neither an early
/// return nor a dropped host leaves processes running.
struct Group {
    pgid: Option<Pid>,
}

impl Group {
    fn new(pid: u32) -> Group {
        // Never 1: kill(-1) would signal everything.
        let pgid = i32::try_from(pid)
            .ok()
            .filter(|p| *p > 1)
            .and_then(Pid::from_raw);
        Group { pgid }
    }

    fn signal(&self, sig: Signal) {
        if let Some(pgid) = self.pgid {
            let _ = rustix::process::kill_process_group(pgid, sig);
        }
    }

    /// The leader was reaped: from now on the group id may be reused, so never signal it.
    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.signal(Signal::KILL);
    }
}

/// Shell convention: the exit code, or 128 + the signal.
pub fn exit_status(
    status: std::process::ExitStatus,
    timed_out: bool,
    elapsed: Duration,
) -> ExitStatus {
    let signal = status.signal();
    let exit_code = match (status.code(), signal) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => -1,
    };
    ExitStatus {
        exit_code,
        signal,
        timed_out,
        duration_ms: elapsed.as_millis() as u64,
    }
}

/// Run `req`, streaming `Started`, `Stdout`/`Stderr` and finally `Exit` (or `Error`).
pub async fn run(conn: &mut Conn, req: ExecRequest) -> Result<(), ProtoError> {
    let mut cmd = match build_command(&req) {
        Ok(cmd) => cmd,
        Err(e) => return conn.send_error(&e).await,
    };
    let start = Instant::now();
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let program = req
                .argv
                .as_ref()
                .and_then(|a| a.first())
                .map_or("/bin/sh", String::as_str);
            let err = agent_error(
                AgentErrorCode::SpawnFailed,
                format!("cannot run {program}: {e}"),
            );
            return conn.send_error(&err).await;
        }
    };
    let pid = child.id().unwrap_or(0);
    let mut group = Group::new(pid);
    conn.send_json(FrameKind::Started, &ExecStarted { pid })
        .await?;
    let deadline = req
        .timeout_ms
        .map(|ms| tokio::time::Instant::from_std(start) + Duration::from_millis(ms));
    let (status, timed_out) = supervise(conn, child, &mut group, deadline).await?;
    let exit = exit_status(status, timed_out, start.elapsed());
    conn.send_json(FrameKind::Exit, &exit).await
}

/// Pump stdin/stdout/stderr and host frames until the process exited and its output is
/// drained (or [`PIPE_GRACE`] passed). Returns the status and whether it timed out.
/// An error means the host is gone; the group is then killed when `group` drops.
async fn supervise(
    conn: &mut Conn,
    mut child: Child,
    group: &mut Group,
    deadline: Option<tokio::time::Instant>,
) -> Result<(std::process::ExitStatus, bool), ProtoError> {
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut stdin = StdinPump::new(child.stdin.take());
    let mut out_buf = vec![0u8; OUTPUT_CHUNK];
    let mut err_buf = vec![0u8; OUTPUT_CHUNK];
    let mut status = None;
    let mut timed_out = false;
    let mut grace_end = tokio::time::Instant::now();
    let mut host_open = true;
    loop {
        if status.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        let backed_up = stdin.queued > STDIN_QUEUE_LIMIT;
        tokio::select! {
            r = read_some(&mut stdout, &mut out_buf) => match r {
                Ok(n) if n > 0 => conn.send(FrameKind::Stdout, &out_buf[..n]).await?,
                _ => stdout = None,
            },
            r = read_some(&mut stderr, &mut err_buf) => match r {
                Ok(n) if n > 0 => conn.send(FrameKind::Stderr, &err_buf[..n]).await?,
                _ => stderr = None,
            },
            r = child.wait(), if status.is_none() => {
                let st = r.map_err(ProtoError::Write)?;
                group.disarm();
                status = Some(st);
                stdin.close();
                grace_end = tokio::time::Instant::now() + PIPE_GRACE;
            }
            _ = sleep_until(grace_end), if status.is_some() => break,
            _ = sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)),
                if deadline.is_some() && !timed_out && status.is_none() => {
                group.signal(Signal::KILL);
                timed_out = true;
            }
            r = stdin.write(), if stdin.pending() => {
                if r.is_err() {
                    stdin.close();
                }
            }
            frame = conn.recv(), if host_open && !backed_up => match frame {
                Ok(frame) => match frame.kind {
                    FrameKind::Stdin => stdin.push(frame.payload),
                    FrameKind::StdinClose => stdin.close_when_flushed(),
                    FrameKind::Signal if status.is_none() => match frame.parse::<SignalRequest>() {
                        Ok(SignalRequest { signal }) => match Signal::from_named_raw(signal) {
                            Some(sig) => group.signal(sig),
                            None => log!("exec: ignoring unknown signal {signal}"),
                        },
                        Err(e) => log!("exec: {e}"),
                    },
                    _ => {}
                },
                Err(e) => {
                    if status.is_none() {
                        // The host is gone before the process ended: `group` kills it.
                        return Err(e);
                    }
                    host_open = false;
                }
            },
            _ = tokio::time::sleep(PEER_CHECK), if backed_up && status.is_none() => {
                if let Some(e) = conn.take_error() {
                    return Err(ProtoError::Read(e));
                }
            }
        }
    }
    // Output still open after the grace period belongs to a process that outlived the
    // leader; it is left alone (its pipes are closed on our side).
    Ok((status.expect("loop ends after exit"), timed_out))
}

/// Read from an optional pipe; pending forever once it is gone.
async fn read_some<R: AsyncRead + Unpin>(r: &mut Option<R>, buf: &mut [u8]) -> io::Result<usize> {
    match r {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Queue of host stdin bytes waiting to be written to the process.
struct StdinPump {
    pipe: Option<ChildStdin>,
    queue: VecDeque<Vec<u8>>,
    /// Bytes of `queue[0]` already written.
    offset: usize,
    queued: usize,
    close_requested: bool,
}

impl StdinPump {
    fn new(pipe: Option<ChildStdin>) -> StdinPump {
        StdinPump {
            pipe,
            queue: VecDeque::new(),
            offset: 0,
            queued: 0,
            close_requested: false,
        }
    }

    fn push(&mut self, data: Vec<u8>) {
        if self.pipe.is_some() && !data.is_empty() {
            self.queued += data.len();
            self.queue.push_back(data);
        }
    }

    fn pending(&self) -> bool {
        self.pipe.is_some() && !self.queue.is_empty()
    }

    /// Write some of the queue (cancel safe).
    async fn write(&mut self) -> io::Result<()> {
        let (Some(pipe), Some(front)) = (self.pipe.as_mut(), self.queue.front()) else {
            return std::future::pending().await;
        };
        let n = pipe.write(&front[self.offset..]).await?;
        self.offset += n;
        self.queued -= n;
        if self.offset == front.len() {
            self.queue.pop_front();
            self.offset = 0;
            if self.close_requested && self.queue.is_empty() {
                self.close();
            }
        }
        Ok(())
    }

    fn close_when_flushed(&mut self) {
        self.close_requested = true;
        if self.queue.is_empty() {
            self.close();
        }
    }

    fn close(&mut self) {
        self.pipe = None;
        self.queue.clear();
        self.offset = 0;
        self.queued = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        let d = Duration::from_millis(5);
        let st = exit_status(std::process::ExitStatus::from_raw(3 << 8), false, d);
        assert_eq!((st.exit_code, st.signal, st.duration_ms), (3, None, 5));
        let st = exit_status(std::process::ExitStatus::from_raw(9), true, d);
        assert_eq!(
            (st.exit_code, st.signal, st.timed_out),
            (137, Some(9), true)
        );
    }

    #[test]
    fn validates_requests() {
        let code = |req: ExecRequest| build_command(&req).err().map(|e| e.code);
        assert_eq!(
            code(ExecRequest::default()),
            Some(AgentErrorCode::BadRequest)
        );
        assert_eq!(
            code(ExecRequest {
                argv: Some(vec![]),
                ..Default::default()
            }),
            Some(AgentErrorCode::BadRequest)
        );
        let shell = |cwd: &str| ExecRequest {
            shell: Some("true".into()),
            cwd: Some(cwd.into()),
            ..Default::default()
        };
        assert_eq!(code(shell("/")), None);
        assert_eq!(
            code(shell("/nonexistent-dir")),
            Some(AgentErrorCode::SpawnFailed)
        );
        assert_eq!(code(shell("/a/../b")), Some(AgentErrorCode::InvalidPath));
        assert_eq!(
            code(ExecRequest {
                shell: Some("true".into()),
                env: vec![("A=B".into(), "x".into())],
                ..Default::default()
            }),
            Some(AgentErrorCode::BadRequest)
        );
    }
}
