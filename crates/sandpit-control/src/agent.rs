//! The host side of the agent protocol (`sandpit-agent-proto`): one TCP connection per
//! operation to the agent inside a sandbox, closed by the host with a reset.
//!
//! Invariant: every connection to an agent is closed with `SO_LINGER` 0 (see [`AgentConn`]).
//! gVisor refuses to checkpoint a sandbox that holds a connected or closing TCP endpoint, and
//! a refused checkpoint kills the sandbox; a reset leaves no endpoint behind on either side.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sandpit_agent_proto::{
    self as proto, AgentError, AgentErrorCode, DirListing, EntryKind, ExecRequest, ExitStatus,
    FileInfo, FrameKind, Op, PingReply, PortList, Request, WriteReply,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::error::{ControlError, DisplayChain};

/// How long a read of tenant bytes into the server's memory ([`AgentClient::read_bounded`]) or
/// the opening of a streamed read may take: an agent of protocol 1 would block on a FIFO.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// An agent operation's failure: the agent refused (its error code says why), or the
/// connection broke.
#[derive(Debug)]
pub enum AgentFailure {
    Refused(AgentError),
    Broken(ControlError),
    /// An upload went past the size limit.
    TooLarge {
        limit: u64,
    },
    /// The client's request body failed mid-way.
    Body(String),
}

impl From<ControlError> for AgentFailure {
    fn from(e: ControlError) -> Self {
        AgentFailure::Broken(e)
    }
}

/// Most stderr [`AgentClient::run_for_stderr`] keeps.
pub const MAX_HELPER_STDERR: usize = 64 * 1024;

/// The refusal of a read that needs a regular file.
fn not_regular(path: &str) -> AgentFailure {
    AgentFailure::Refused(AgentError {
        code: AgentErrorCode::NotRegularFile,
        message: format!("{path}: not a regular file"),
    })
}

/// Output of a running exec, as it arrives.
#[derive(Debug)]
pub enum ExecOutput {
    Started(u32),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// What the host sends a running exec ([`AgentClient::exec_controlled`]).
#[derive(Debug)]
pub enum ExecInput {
    Stdin(Vec<u8>),
    CloseStdin,
    /// A signal for the process group.
    Signal(i32),
}

/// A connection that resets on drop.
pub struct AgentConn {
    stream: TcpStream,
}

impl Drop for AgentConn {
    fn drop(&mut self) {
        // Reset instead of FIN: see the module docs.
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
    }
}

/// Talks to the agent of one sandbox.
#[derive(Debug, Clone)]
pub struct AgentClient {
    pub sandbox: String,
    pub addr: SocketAddr,
}

impl AgentClient {
    pub fn new(sandbox: &str, ip: Ipv4Addr) -> Self {
        AgentClient {
            sandbox: sandbox.to_string(),
            addr: SocketAddr::from((ip, proto::AGENT_PORT)),
        }
    }

    fn broken(&self, what: impl std::fmt::Display) -> ControlError {
        ControlError::Agent {
            sandbox: self.sandbox.clone(),
            what: what.to_string(),
        }
    }

    /// Open a connection and send the request frame.
    async fn open(&self, op: Op) -> Result<AgentConn, ControlError> {
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(self.addr))
            .await
            .map_err(|_| self.broken("connect timed out"))?
            .map_err(|e| self.broken(format!("connect: {e}")))?;
        let _ = stream.set_nodelay(true);
        let mut conn = AgentConn { stream };
        proto::write_json(&mut conn.stream, FrameKind::Request, &Request::new(op))
            .await
            .map_err(|e| self.broken(DisplayChain(&e)))?;
        Ok(conn)
    }

    async fn read(&self, conn: &mut AgentConn) -> Result<proto::Frame, ControlError> {
        proto::read_frame(&mut conn.stream)
            .await
            .map_err(|e| self.broken(DisplayChain(&e)))
    }

    /// Read the terminal `Ok` reply of a simple operation.
    async fn simple<T: for<'de> serde::Deserialize<'de>>(&self, op: Op) -> Result<T, AgentFailure> {
        let mut conn = self.open(op).await?;
        let frame = self.read(&mut conn).await?;
        self.ok_or_refused(&frame)
    }

    fn ok_or_refused<T: for<'de> serde::Deserialize<'de>>(
        &self,
        frame: &proto::Frame,
    ) -> Result<T, AgentFailure> {
        match frame.kind {
            FrameKind::Ok => frame.parse().map_err(|e| self.broken(e).into()),
            FrameKind::Error => Err(AgentFailure::Refused(
                frame.parse().map_err(|e| self.broken(e))?,
            )),
            other => Err(self.broken(format!("unexpected frame {other:?}")).into()),
        }
    }

    #[tracing::instrument(level = "debug", name = "agent.ping", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn ping(&self) -> Result<PingReply, AgentFailure> {
        self.simple(Op::Ping).await
    }

    /// Poll until the agent answers a ping or `limit` passes.
    #[tracing::instrument(level = "debug", name = "agent.wait_ready", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn wait_ready(&self, limit: Duration) -> Result<PingReply, ControlError> {
        let start = std::time::Instant::now();
        // Short sleeps between attempts at first: the agent needs some 40 ms after runsc
        // returns, and a coarser poll adds up to its interval to every create, wake and
        // fork; later (a loaded host) longer ones, not to flood it with connects.
        let mut delay = Duration::from_millis(1);
        loop {
            // A short connect timeout: before the agent listens, gVisor's netstack answers
            // with a reset, so failures are fast.
            // (Not `ping`: one span for the wait, none per attempt.)
            let attempt = tokio::time::timeout(
                Duration::from_millis(500),
                self.simple::<PingReply>(Op::Ping),
            )
            .await;
            let last = match attempt {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(f)) => format!("{f:?}"),
                Err(_) => "no answer within 500 ms".to_string(),
            };
            if start.elapsed() >= limit {
                return Err(ControlError::AgentTimeout {
                    sandbox: self.sandbox.clone(),
                    secs: limit.as_secs(),
                    last,
                });
            }
            tokio::time::sleep(delay).await;
            let cap = if start.elapsed() < Duration::from_millis(200) {
                Duration::from_millis(5)
            } else {
                Duration::from_millis(20)
            };
            delay = (delay * 2).min(cap);
        }
    }

    /// Run a command, sending output to `out` as it arrives. A closed `out` does not stop the
    /// command (the caller may stop listening); dropping the returned future does: the
    /// connection resets and the agent kills the process group.
    #[tracing::instrument(level = "debug", name = "agent.exec", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn exec(
        &self,
        req: ExecRequest,
        out: mpsc::Sender<ExecOutput>,
    ) -> Result<ExitStatus, AgentFailure> {
        let mut conn = self.open(Op::Exec(req)).await?;
        self.relay_exec(&mut conn, out).await
    }

    /// Like [`AgentClient::exec`], with `input` sent as the process's stdin (then closed).
    #[tracing::instrument(level = "debug", name = "agent.exec_with_input", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn exec_with_input(
        &self,
        mut req: ExecRequest,
        input: Vec<u8>,
        out: mpsc::Sender<ExecOutput>,
    ) -> Result<ExitStatus, AgentFailure> {
        req.stdin = true;
        let mut conn = self.open(Op::Exec(req)).await?;
        for chunk in input.chunks(proto::DATA_CHUNK) {
            proto::write_frame(&mut conn.stream, FrameKind::Stdin, chunk)
                .await
                .map_err(|e| self.broken(DisplayChain(&e)))?;
        }
        proto::write_frame(&mut conn.stream, FrameKind::StdinClose, &[])
            .await
            .map_err(|e| self.broken(DisplayChain(&e)))?;
        self.relay_exec(&mut conn, out).await
    }

    /// Like [`AgentClient::exec`], with `input` relayed to the process while it runs
    /// (stdin bytes, stdin close, signals). A closed `input` sends nothing more; the
    /// process goes on.
    #[tracing::instrument(level = "debug", name = "agent.exec_controlled", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn exec_controlled(
        &self,
        req: ExecRequest,
        out: mpsc::Sender<ExecOutput>,
        mut input: mpsc::Receiver<ExecInput>,
    ) -> Result<ExitStatus, AgentFailure> {
        let mut conn = self.open(Op::Exec(req)).await?;
        let (mut r, mut w) = conn.stream.split();
        let writer = async {
            while let Some(i) = input.recv().await {
                let sent = match i {
                    ExecInput::Stdin(b) => {
                        let mut res = Ok(());
                        for chunk in b.chunks(proto::DATA_CHUNK) {
                            res = proto::write_frame(&mut w, FrameKind::Stdin, chunk).await;
                            if res.is_err() {
                                break;
                            }
                        }
                        res
                    }
                    ExecInput::CloseStdin => {
                        proto::write_frame(&mut w, FrameKind::StdinClose, &[]).await
                    }
                    ExecInput::Signal(signal) => {
                        proto::write_json(
                            &mut w,
                            FrameKind::Signal,
                            &proto::SignalRequest { signal },
                        )
                        .await
                    }
                };
                if sent.is_err() {
                    break;
                }
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            r = self.relay_exec_from(&mut r, out) => r,
            _ = writer => unreachable!("the writer never ends"),
        }
    }

    /// Run `argv` to its end (at most `timeout`), keeping only the first
    /// [`MAX_HELPER_STDERR`] bytes of its stderr: for short helper commands whose failure
    /// message is all that matters (the command runs in the tenant's sandbox, so its output
    /// is the tenant's to make as large as it likes).
    pub async fn run_for_stderr(
        &self,
        argv: Vec<String>,
        timeout: Duration,
    ) -> Result<(ExitStatus, Vec<u8>), AgentFailure> {
        let (tx, mut rx) = mpsc::channel(16);
        let collect = async move {
            let mut err = Vec::new();
            while let Some(o) = rx.recv().await {
                if let ExecOutput::Stderr(b) = o {
                    let room = MAX_HELPER_STDERR.saturating_sub(err.len());
                    err.extend_from_slice(&b[..b.len().min(room)]);
                }
            }
            err
        };
        let req = ExecRequest {
            argv: Some(argv),
            timeout_ms: Some(timeout.as_millis() as u64),
            ..Default::default()
        };
        let (status, err) = tokio::join!(self.exec(req, tx), collect);
        Ok((status?, err))
    }

    /// Read an exec's frames to its exit, passing its output to `out`.
    async fn relay_exec(
        &self,
        conn: &mut AgentConn,
        out: mpsc::Sender<ExecOutput>,
    ) -> Result<ExitStatus, AgentFailure> {
        self.relay_exec_from(&mut conn.stream, out).await
    }

    /// [`AgentClient::relay_exec`] from the read side of a connection.
    async fn relay_exec_from<R: tokio::io::AsyncRead + Unpin>(
        &self,
        r: &mut R,
        out: mpsc::Sender<ExecOutput>,
    ) -> Result<ExitStatus, AgentFailure> {
        loop {
            let frame = proto::read_frame(r)
                .await
                .map_err(|e| self.broken(DisplayChain(&e)))?;
            let item = match frame.kind {
                FrameKind::Started => {
                    let s: proto::ExecStarted = frame.parse().map_err(|e| self.broken(e))?;
                    ExecOutput::Started(s.pid)
                }
                FrameKind::Stdout => ExecOutput::Stdout(frame.payload),
                FrameKind::Stderr => ExecOutput::Stderr(frame.payload),
                FrameKind::Exit => return frame.parse().map_err(|e| self.broken(e).into()),
                FrameKind::Error => {
                    return Err(AgentFailure::Refused(
                        frame.parse().map_err(|e| self.broken(e))?,
                    ));
                }
                other => return Err(self.broken(format!("unexpected frame {other:?}")).into()),
            };
            let _ = out.send(item).await;
        }
    }

    /// Open a regular file for a read: `ReadRegular` from `offset` (at most `limit` bytes),
    /// or, with an agent of protocol 1, a `stat` (which must say "file") and `ReadFile` from
    /// the start (the caller skips `offset` bytes and stops after `limit`). Returns the
    /// file's metadata, the connection positioned at its first data frame, and how many
    /// leading bytes the caller must skip. Refuses anything but a regular file.
    async fn open_regular(
        &self,
        path: &str,
        offset: u64,
        limit: u64,
    ) -> Result<(FileInfo, AgentConn, u64), AgentFailure> {
        let first = async |op: Op| -> Result<(FileInfo, AgentConn), AgentFailure> {
            let mut conn = self.open(op).await?;
            let frame = self.read(&mut conn).await?;
            Ok((self.ok_or_refused(&frame)?, conn))
        };
        let opened = first(Op::ReadRegular {
            path: path.into(),
            offset,
            limit,
        })
        .await;
        match opened {
            Ok((info, conn)) => Ok((info, conn, 0)),
            Err(AgentFailure::Refused(e)) if e.code == AgentErrorCode::UnsupportedVersion => {
                match self.stat(path).await?.kind {
                    EntryKind::File => {}
                    EntryKind::Dir => {
                        return Err(AgentFailure::Refused(AgentError {
                            code: AgentErrorCode::IsDirectory,
                            message: format!("{path}: is a directory"),
                        }));
                    }
                    _ => return Err(not_regular(path)),
                }
                let (info, conn) = first(Op::ReadFile { path: path.into() }).await?;
                if info.kind != EntryKind::File {
                    return Err(not_regular(path));
                }
                Ok((info, conn, offset))
            }
            Err(e) => Err(e),
        }
    }

    /// Read at most `limit` bytes of the regular file `path`, from byte `offset`, into
    /// memory: for every read of tenant bytes the server keeps. Returns the file's metadata
    /// (its whole size) and the bytes. Anything but a regular file is refused with
    /// `not_regular_file`; the whole read is bounded by [`READ_TIMEOUT`].
    #[tracing::instrument(level = "debug", name = "agent.read_bounded", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn read_bounded(
        &self,
        path: &str,
        offset: u64,
        limit: u64,
    ) -> Result<(FileInfo, Vec<u8>), AgentFailure> {
        let read = async {
            let (info, mut conn, mut skip) = self.open_regular(path, offset, limit).await?;
            let mut out = Vec::new();
            loop {
                let frame = self.read(&mut conn).await?;
                match frame.kind {
                    FrameKind::Data => {
                        let mut data = &frame.payload[..];
                        let skipped = data.len().min(usize::try_from(skip).unwrap_or(usize::MAX));
                        data = &data[skipped..];
                        skip -= skipped as u64;
                        let room = usize::try_from(limit)
                            .unwrap_or(usize::MAX)
                            .saturating_sub(out.len());
                        out.extend_from_slice(&data[..data.len().min(room)]);
                        // Enough: dropping the connection resets it and the agent stops.
                        if out.len() as u64 >= limit {
                            return Ok((info, out));
                        }
                    }
                    FrameKind::End => return Ok((info, out)),
                    FrameKind::Error => {
                        return Err(AgentFailure::Refused(
                            frame.parse().map_err(|e| self.broken(e))?,
                        ));
                    }
                    other => {
                        return Err(self.broken(format!("unexpected frame {other:?}")).into());
                    }
                }
            }
        };
        tokio::time::timeout(READ_TIMEOUT, read)
            .await
            .map_err(|_| self.broken(format!("reading {path} took longer than {READ_TIMEOUT:?}")))?
    }

    /// Open a regular file for a streamed read (downloads). Returns its metadata and a
    /// stream of its bytes; the stream ends with an error item if the connection breaks
    /// mid-way. Anything but a regular file is refused with `not_regular_file` (a device
    /// never ends, a FIFO may never open).
    #[tracing::instrument(level = "debug", name = "agent.read_file", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn read_file(
        &self,
        path: &str,
    ) -> Result<
        (
            FileInfo,
            impl Stream<Item = Result<Bytes, std::io::Error>> + use<>,
        ),
        AgentFailure,
    > {
        let (info, mut conn, _) =
            tokio::time::timeout(READ_TIMEOUT, self.open_regular(path, 0, u64::MAX))
                .await
                .map_err(|_| {
                    self.broken(format!("opening {path} took longer than {READ_TIMEOUT:?}"))
                })??;
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                match me.read(&mut conn).await {
                    Ok(f) if f.kind == FrameKind::Data => {
                        if tx.send(Ok(Bytes::from(f.payload))).await.is_err() {
                            return; // client went away; dropping conn resets it
                        }
                    }
                    Ok(f) if f.kind == FrameKind::End => return,
                    Ok(f) => {
                        let _ = tx
                            .send(Err(std::io::Error::other(format!(
                                "unexpected frame {:?}",
                                f.kind
                            ))))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                        return;
                    }
                }
            }
        });
        Ok((info, tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// Stream `body` into a file. Fails with `file_too_large` (as a refusal) once more than
    /// `limit` bytes arrive; the agent then removes its temporary file and nothing changes.
    /// A new file and the directories made for it are given to `owner` (a user spec; root
    /// when `None`).
    #[tracing::instrument(level = "debug", name = "agent.write_file", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn write_file<S, E>(
        &self,
        path: &str,
        owner: Option<&str>,
        mut body: S,
        limit: u64,
    ) -> Result<WriteReply, AgentFailure>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut conn = self
            .open(Op::WriteFile {
                path: path.into(),
                mode: None,
                create_parents: true,
                owner: owner.map(str::to_string),
            })
            .await?;
        let mut total: u64 = 0;
        let mut pending: Vec<u8> = Vec::with_capacity(proto::DATA_CHUNK);
        while let Some(chunk) = body.next().await {
            let failure = match chunk {
                Ok(c) if total + c.len() as u64 <= limit => {
                    total += c.len() as u64;
                    Ok(c)
                }
                Ok(_) => Err(AgentFailure::TooLarge { limit }),
                Err(e) => Err(AgentFailure::Body(e.to_string())),
            };
            let chunk = match failure {
                Ok(c) => c,
                Err(f) => {
                    self.abort_write(&mut conn).await;
                    return Err(f);
                }
            };
            // Coalesce the body's (often small) chunks into full frames: fewer, larger writes
            // through gVisor's netstack.
            pending.extend_from_slice(&chunk);
            while pending.len() >= proto::DATA_CHUNK {
                let rest = pending.split_off(proto::DATA_CHUNK);
                self.send_data(&mut conn, &pending).await?;
                pending = rest;
            }
        }
        if !pending.is_empty() {
            self.send_data(&mut conn, &pending).await?;
        }
        proto::write_frame(&mut conn.stream, FrameKind::End, &[])
            .await
            .map_err(|e| self.broken(DisplayChain(&e)))?;
        let frame = self.read(&mut conn).await?;
        self.ok_or_refused(&frame)
    }

    /// One `Data` frame, header and payload in a single write.
    async fn send_data(&self, conn: &mut AgentConn, payload: &[u8]) -> Result<(), ControlError> {
        use tokio::io::AsyncWriteExt;
        let mut buf = Vec::with_capacity(5 + payload.len());
        buf.push(FrameKind::Data as u8);
        buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(payload);
        conn.stream
            .write_all(&buf)
            .await
            .map_err(|e| self.broken(format!("writing file data: {e}")))
    }

    /// Abort a `WriteFile` and wait (briefly) until the agent has removed its temporary
    /// file, so a rejected upload leaves nothing behind when the client hears of it.
    async fn abort_write(&self, conn: &mut AgentConn) {
        let abort = AgentError {
            code: proto::AgentErrorCode::BadRequest,
            message: "upload rejected by the server".into(),
        };
        if proto::write_json(&mut conn.stream, FrameKind::Error, &abort)
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(5), self.read(conn)).await;
        }
    }

    #[tracing::instrument(level = "debug", name = "agent.list_dir", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn list_dir(&self, path: &str) -> Result<DirListing, AgentFailure> {
        self.simple(Op::ListDir { path: path.into() }).await
    }

    #[tracing::instrument(level = "debug", name = "agent.stat", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn stat(&self, path: &str) -> Result<FileInfo, AgentFailure> {
        self.simple(Op::Stat { path: path.into() }).await
    }

    /// The directories made are given to `owner` (a user spec; root when `None`).
    #[tracing::instrument(level = "debug", name = "agent.make_dir", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn make_dir(
        &self,
        path: &str,
        recursive: bool,
        owner: Option<&str>,
    ) -> Result<(), AgentFailure> {
        let _: serde_json::Value = self
            .simple(Op::MakeDir {
                path: path.into(),
                recursive,
                owner: owner.map(str::to_string),
            })
            .await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "agent.remove", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), AgentFailure> {
        let _: serde_json::Value = self
            .simple(Op::Remove {
                path: path.into(),
                recursive,
            })
            .await?;
        Ok(())
    }

    /// The TCP ports listening inside the sandbox (the agent's own included).
    #[tracing::instrument(level = "debug", name = "agent.list_ports", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn list_ports(&self) -> Result<PortList, AgentFailure> {
        self.simple(Op::ListPorts).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protocol-1 agent on `127.0.0.<n>`:49983 that knows `stat` and `read_file` of one
    /// file (`kind` as given) and refuses newer requests, as an agent in a sandbox restored
    /// from an old snapshot does.
    async fn old_agent(
        ip: Ipv4Addr,
        kind: EntryKind,
        data: Vec<u8>,
    ) -> tokio::task::JoinHandle<()> {
        let listener = tokio::net::TcpListener::bind((ip, proto::AGENT_PORT))
            .await
            .expect("bind the fake agent");
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let data = data.clone();
                tokio::spawn(async move {
                    let Ok(frame) = proto::read_frame(&mut s).await else {
                        return;
                    };
                    let v: serde_json::Value = serde_json::from_slice(&frame.payload).unwrap();
                    let info = FileInfo {
                        kind,
                        size: data.len() as u64,
                        mode: 0o644,
                        mtime: 0,
                    };
                    if v["v"].as_u64() != Some(1) {
                        let e = AgentError {
                            code: AgentErrorCode::UnsupportedVersion,
                            message: "agent speaks protocol version 1".into(),
                        };
                        let _ = proto::write_json(&mut s, FrameKind::Error, &e).await;
                        return;
                    }
                    let _ = proto::write_json(&mut s, FrameKind::Ok, &info).await;
                    if v["op"] == "read_file" {
                        for chunk in data.chunks(1000) {
                            let _ = proto::write_frame(&mut s, FrameKind::Data, chunk).await;
                        }
                        let _ = proto::write_frame(&mut s, FrameKind::End, &[]).await;
                    }
                });
            }
        })
    }

    #[tokio::test]
    async fn bounded_reads_fall_back_for_old_agents() {
        let n = 10 + (std::process::id() % 200) as u8;
        let ip = Ipv4Addr::new(127, 0, 77, n);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 256) as u8).collect();
        let fake = old_agent(ip, EntryKind::File, data.clone()).await;
        let agent = AgentClient::new("sbtest", ip);
        // A window: the host skips and stops itself.
        let (info, got) = agent.read_bounded("/f", 2500, 3000).await.unwrap();
        assert_eq!(info.size, 10_000);
        assert_eq!(got, data[2500..5500]);
        // The limit holds whatever the agent sends.
        let (_, got) = agent.read_bounded("/f", 0, 10).await.unwrap();
        assert_eq!(got, data[..10]);
        fake.abort();

        // A FIFO (as `stat` reports it) is refused before it is opened.
        let ip = Ipv4Addr::new(127, 0, 78, n);
        let fake = old_agent(ip, EntryKind::Other, Vec::new()).await;
        let agent = AgentClient::new("sbtest", ip);
        match agent.read_bounded("/fifo", 0, 10).await {
            Err(AgentFailure::Refused(e)) => assert_eq!(e.code, AgentErrorCode::NotRegularFile),
            other => panic!("expected not_regular_file, got {other:?}"),
        }
        fake.abort();
    }
}
