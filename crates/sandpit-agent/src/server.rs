//! The TCP server: host-only listener and per-connection request dispatch.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use sandpit_agent_proto::{
    AgentError, AgentErrorCode, Frame, FrameKind, Op, PROTOCOL_VERSION, PingReply, ProtoError,
    Request, TerminalSize,
};
use tokio::net::{TcpListener, TcpStream};

use crate::conn::{Conn, agent_error};
use crate::terminal::{self, Terminals};
use crate::{exec, files, ports, watch};

/// How long a new connection may take to send its request.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// Env var that lets 127.0.0.1 connect (tests).
pub const ALLOW_LOOPBACK_ENV: &str = "SANDPIT_AGENT_ALLOW_LOOPBACK";

/// Run the server until the process is killed.
/// When this `serve` started (see [`PingReply::uptime_ms`]).
static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

pub fn serve(addr: SocketAddr) -> ExitCode {
    STARTED.get_or_init(std::time::Instant::now);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(addr))
}

/// Large socket buffers (inherited by accepted connections): uploads stream through gVisor's
/// netstack, whose throughput the default receive window limits.
const SOCKET_BUFFER: u32 = 4 << 20;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn run(addr: SocketAddr) -> ExitCode {
    let listener = match listen(addr) {
        Ok(l) => l,
        Err(e) => {
            log!("cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    // Tests read this line; never panic if stdout is closed.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "listening on {local}").and_then(|()| stdout.flush());
    let allow_loopback = std::env::var(ALLOW_LOOPBACK_ENV).is_ok_and(|v| v == "1");
    // Accept with blocking calls on a thread of its own, not through the runtime's epoll:
    // after a gVisor restore, a listener registered with epoll before the checkpoint was
    // seen (rarely, under load) never to report readiness again, leaving the agent alive
    // but deaf. A blocking accept registers anew on every call. Connections are all made
    // after the restore (the host resets its connections before a checkpoint), so their
    // epoll registrations are fresh.
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            log!("cannot take the listener: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = listener.set_nonblocking(false) {
        log!("cannot make the listener blocking: {e}");
        return ExitCode::FAILURE;
    }
    // The terminals live as long as this process, whatever happens to connections.
    let terminals = Arc::new(Terminals::new());
    let rt = tokio::runtime::Handle::current();
    let acceptor = tokio::task::spawn_blocking(move || {
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    rt.spawn(admit(stream, peer, allow_loopback, terminals.clone()));
                }
                Err(e) => {
                    // EINTR after a gVisor restore, EMFILE, ECONNABORTED...: never give up.
                    log!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    });
    let _ = acceptor.await;
    log!("the accept loop ended");
    ExitCode::FAILURE
}

/// Serve an accepted connection if it comes from the host; reset it otherwise.
async fn admit(
    stream: std::net::TcpStream,
    peer: SocketAddr,
    allow_loopback: bool,
    terminals: Arc<Terminals>,
) {
    if let Err(e) = stream.set_nonblocking(true) {
        log!("connection from {peer}: {e}");
        return;
    }
    let stream = match TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            log!("connection from {peer}: {e}");
            return;
        }
    };
    let allowed = stream
        .local_addr()
        .is_ok_and(|local| peer_allowed(local, peer, allow_loopback));
    if allowed {
        handle(stream, &terminals).await;
    } else {
        log!("rejected connection from {peer}");
        // Reset, so no closing endpoint is left behind.
        let _ = stream.set_zero_linger();
        drop(stream);
    }
}

/// Only the host may connect: the first address of the /30 holding the connection's local
/// address (the sandbox is `.2`, the host `.1`). Loopback only when `allow_loopback`.
pub fn peer_allowed(local: SocketAddr, peer: SocketAddr, allow_loopback: bool) -> bool {
    let (IpAddr::V4(local), IpAddr::V4(peer)) =
        (local.ip().to_canonical(), peer.ip().to_canonical())
    else {
        return false;
    };
    if local.is_loopback() || peer.is_loopback() {
        return allow_loopback && peer == Ipv4Addr::LOCALHOST;
    }
    let host = (u32::from(local) & !3) | 1;
    u32::from(peer) == host
}

async fn handle(stream: TcpStream, terminals: &Terminals) {
    let mut conn = Conn::new(stream);
    let first = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, conn.recv()).await {
        // Silent host: reset.
        Err(_) => return,
        Ok(Err(ProtoError::Closed | ProtoError::Read(_))) => return,
        Ok(Err(e)) => Err(agent_error(AgentErrorCode::BadRequest, e.to_string())),
        Ok(Ok(frame)) => parse_request(&frame),
    };
    let result = match first {
        Ok(req) => dispatch(&mut conn, req.op, terminals).await,
        Err(err) => conn.send_error(&err).await,
    };
    match result {
        Ok(()) | Err(ProtoError::Closed | ProtoError::Read(_) | ProtoError::Write(_)) => {}
        Err(e) => log!("connection: {e}"),
    }
    conn.finish().await;
}

/// Decode the opening frame, checking the version before the operation so that a newer
/// operation from a newer host is reported as `unsupported_version`.
pub fn parse_request(frame: &Frame) -> Result<Request, AgentError> {
    let bad = |m: String| agent_error(AgentErrorCode::BadRequest, m);
    if frame.kind != FrameKind::Request {
        return Err(bad(format!(
            "expected a request frame, got kind {}",
            frame.kind as u8
        )));
    }
    let value: serde_json::Value =
        serde_json::from_slice(&frame.payload).map_err(|e| bad(format!("bad request: {e}")))?;
    let Some(v) = value.get("v").and_then(|v| v.as_u64()) else {
        return Err(bad("request has no version \"v\"".into()));
    };
    if v > u64::from(PROTOCOL_VERSION) {
        return Err(agent_error(
            AgentErrorCode::UnsupportedVersion,
            format!("agent speaks protocol version {PROTOCOL_VERSION}, request is version {v}"),
        ));
    }
    serde_json::from_value(value).map_err(|e| bad(format!("bad request: {e}")))
}

async fn dispatch(conn: &mut Conn, op: Op, terminals: &Terminals) -> Result<(), ProtoError> {
    let reply = match op {
        Op::Ping => Ok(to_value(&PingReply {
            protocol: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: STARTED
                .get()
                .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
        })),
        Op::Exec(req) => return exec::run(conn, req).await,
        Op::ReadFile { path } => return files::read_file(conn, &path).await,
        Op::ReadRegular {
            path,
            offset,
            limit,
        } => return files::read_regular(conn, &path, offset, limit).await,
        Op::WriteFile {
            path,
            mode,
            create_parents,
            owner,
        } => return files::write_file(conn, &path, mode, create_parents, owner.as_deref()).await,
        Op::ListDir { path } => files::list_dir(&path).await.map(|r| to_value(&r)),
        Op::Stat { path } => files::stat(&path).await.map(|r| to_value(&r)),
        Op::MakeDir {
            path,
            recursive,
            owner,
        } => files::make_dir(&path, recursive, owner.as_deref())
            .await
            .map(|()| empty()),
        Op::Remove { path, recursive } => files::remove(&path, recursive).await.map(|()| empty()),
        Op::ListPorts => ports::list().await.map(|r| to_value(&r)),
        Op::TerminalCreate(req) => terminals.create(req).map(|r| to_value(&r)),
        Op::TerminalAttach { id, replay } => {
            return terminal::attach(conn, terminals, &id, replay).await;
        }
        Op::TerminalList => Ok(to_value(&terminals.list())),
        Op::TerminalKill { id, signal } => terminals.kill(&id, signal).map(|()| empty()),
        Op::Watch(req) => return watch::run(conn, req).await,
        Op::TerminalResize { id, cols, rows } => terminals
            .resize(&id, TerminalSize { cols, rows })
            .map(|()| empty()),
    };
    match reply {
        Ok(value) => {
            let frame = Frame::json(FrameKind::Ok, &value);
            if frame.payload.len() > sandpit_agent_proto::MAX_FRAME_LEN {
                let err = agent_error(
                    AgentErrorCode::Io,
                    format!("reply of {} bytes is too large", frame.payload.len()),
                );
                return conn.send_error(&err).await;
            }
            conn.send(FrameKind::Ok, &frame.payload).await
        }
        Err(err) => conn.send_error(&err).await,
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("protocol types serialize")
}

fn empty() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_the_host_of_the_slash_30_may_connect() {
        let local = sa("10.77.0.6:49983");
        assert!(peer_allowed(local, sa("10.77.0.5:1234"), false));
        assert!(!peer_allowed(local, sa("10.77.0.6:1234"), false));
        assert!(!peer_allowed(local, sa("10.77.0.1:1234"), false));
        assert!(!peer_allowed(local, sa("10.77.0.9:1234"), true));
        let local = sa("10.0.0.2:49983");
        assert!(peer_allowed(local, sa("10.0.0.1:1"), false));
        assert!(peer_allowed(
            sa("[::ffff:10.0.0.2]:1"),
            sa("[::ffff:10.0.0.1]:2"),
            false
        ));
        assert!(!peer_allowed(sa("[::1]:1"), sa("[::1]:2"), true));
    }

    #[test]
    fn loopback_only_when_allowed() {
        let local = sa("127.0.0.1:49983");
        assert!(!peer_allowed(local, sa("127.0.0.1:5555"), false));
        assert!(peer_allowed(local, sa("127.0.0.1:5555"), true));
        assert!(!peer_allowed(local, sa("127.0.0.2:5555"), true));
    }

    #[test]
    fn parses_requests_and_checks_versions() {
        let frame = |kind, s: &str| Frame {
            kind,
            payload: s.as_bytes().to_vec(),
        };
        let req = parse_request(&frame(FrameKind::Request, r#"{"v":1,"op":"ping"}"#)).unwrap();
        assert_eq!(req.op, Op::Ping);
        let code = |f: &Frame| parse_request(f).unwrap_err().code;
        assert_eq!(
            code(&frame(FrameKind::Request, r#"{"v":7,"op":"teleport"}"#)),
            AgentErrorCode::UnsupportedVersion
        );
        // Version 3 is this agent's: its operations parse, and older requests still do.
        let req = parse_request(&frame(
            FrameKind::Request,
            r#"{"v":3,"op":"terminal_attach","id":"t1"}"#,
        ))
        .unwrap();
        assert_eq!(
            req.op,
            Op::TerminalAttach {
                id: "t1".into(),
                replay: false
            }
        );
        let req = parse_request(&frame(
            FrameKind::Request,
            r#"{"v":2,"op":"read_regular","path":"/x","offset":0,"limit":5}"#,
        ))
        .unwrap();
        assert!(matches!(req.op, Op::ReadRegular { limit: 5, .. }));
        let req = parse_request(&frame(
            FrameKind::Request,
            r#"{"v":1,"op":"read_file","path":"/x"}"#,
        ))
        .unwrap();
        assert!(matches!(req.op, Op::ReadFile { .. }));
        assert_eq!(
            code(&frame(FrameKind::Request, r#"{"v":1,"op":"teleport"}"#)),
            AgentErrorCode::BadRequest
        );
        assert_eq!(
            code(&frame(FrameKind::Request, r#"{"op":"ping"}"#)),
            AgentErrorCode::BadRequest
        );
        assert_eq!(
            code(&frame(FrameKind::Request, "{")),
            AgentErrorCode::BadRequest
        );
        assert_eq!(
            code(&frame(FrameKind::Data, r#"{"v":1,"op":"ping"}"#)),
            AgentErrorCode::BadRequest
        );
    }
}
