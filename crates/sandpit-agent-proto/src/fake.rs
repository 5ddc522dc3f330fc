//! `FakeAgent`: a minimal in-process agent speaking this protocol, for tests of the host side
//! without a sandbox (feature `fake`). It listens on the address it is given (a test hands it
//! the loopback address a fake network gave the sandbox), answers `Ping`, and keeps files in a
//! host directory standing for the sandbox's files (parent directories of a written file are
//! made as needed: they stand for the template's): `WriteFile`, `ReadFile`,
//! `ReadRegular`, `Stat`, `MakeDir`, `Remove` work there (paths checked with
//! [`crate::normalize_path`], so nothing leaves it). `ListPorts` lists nothing; `Exec` and
//! `ListDir` are refused with `bad_request` (it runs no processes). Terminals run nothing
//! either: a fake terminal echoes what an attachment types back to that attachment and keeps
//! it for replay; create, list, resize and kill (which removes it, with or without a signal)
//! keep the bookkeeping the real agent does.
//!
//! Dropping it stops listening and resets the connections it serves, as a sandbox that stops.
#![expect(
    clippy::disallowed_methods,
    reason = "the fake's files live in a directory the test chose (a temporary one)"
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::{
    AgentError, AgentErrorCode, EntryKind, FileInfo, FrameKind, MAX_TERMINALS, Op,
    PROTOCOL_VERSION, PingReply, PortList, Request, TerminalCreate, TerminalInfo, TerminalList,
    TerminalSize, WriteReply, normalize_path, read_frame, validate_terminal_id, write_frame,
    write_json,
};

/// The fake terminals, by id, with what was typed into each (their scrollback). The lock is
/// never held across an await.
type Terminals = Mutex<BTreeMap<String, (TerminalInfo, Vec<u8>)>>;

/// A running fake agent; stops when dropped.
pub struct FakeAgent {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeAgent {
    /// Listen on `addr` (port 0: any) and serve requests with `root` as the sandbox's files.
    /// An address in use is retried for a second: the agent of the sandbox's last run may
    /// still be letting go of it (dropping an agent stops it at its task's next turn).
    pub async fn spawn(addr: SocketAddr, root: PathBuf) -> std::io::Result<FakeAgent> {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 200 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                other => break other?,
            }
        };
        let addr = listener.local_addr()?;
        let served = Arc::new(AtomicU64::new(0));
        let counter = served.clone();
        let root = Arc::new(root);
        let terminals: Arc<Terminals> = Arc::default();
        let task = tokio::spawn(async move {
            // Owns the connections: they end with the agent.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        counter.fetch_add(1, Ordering::Relaxed);
                        let root = root.clone();
                        let terminals = terminals.clone();
                        conns.spawn(async move { serve(stream, &root, &terminals).await });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(FakeAgent { addr, served, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn refuse(code: AgentErrorCode, message: impl Into<String>) -> AgentError {
    AgentError {
        code,
        message: message.into(),
    }
}

fn io_refusal(e: &std::io::Error) -> AgentError {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound => AgentErrorCode::NotFound,
        std::io::ErrorKind::AlreadyExists => AgentErrorCode::AlreadyExists,
        std::io::ErrorKind::PermissionDenied => AgentErrorCode::PermissionDenied,
        _ => AgentErrorCode::Io,
    };
    refuse(code, e.to_string())
}

/// `path` (normalized) below `root`.
fn host_path(root: &Path, path: &str) -> Result<PathBuf, AgentError> {
    let norm = normalize_path(path)?;
    Ok(root.join(norm.trim_start_matches('/')))
}

fn info(meta: &std::fs::Metadata) -> FileInfo {
    use std::os::unix::fs::MetadataExt;
    let kind = if meta.is_dir() {
        EntryKind::Dir
    } else if meta.is_file() {
        EntryKind::File
    } else if meta.file_type().is_symlink() {
        EntryKind::Symlink
    } else {
        EntryKind::Other
    };
    FileInfo {
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        mtime: meta.mtime(),
    }
}

/// One connection: one request, its answer.
async fn serve(
    mut s: TcpStream,
    root: &Path,
    terminals: &Terminals,
) -> Result<(), crate::ProtoError> {
    let first = read_frame(&mut s).await?;
    let req: Request = match first.parse() {
        Ok(r) => r,
        Err(_) => {
            let e = refuse(AgentErrorCode::BadRequest, "not a request");
            return write_json(&mut s, FrameKind::Error, &e).await;
        }
    };
    let answer: Result<serde_json::Value, AgentError> = match req.op {
        Op::Ping => Ok(serde_json::json!(PingReply {
            protocol: PROTOCOL_VERSION,
            agent_version: "fake".into(),
            uptime_ms: None,
        })),
        Op::ListPorts => Ok(serde_json::json!(PortList { ports: Vec::new() })),
        Op::Stat { path } => host_path(root, &path).and_then(|p| {
            std::fs::symlink_metadata(p)
                .map(|m| serde_json::json!(info(&m)))
                .map_err(|e| io_refusal(&e))
        }),
        Op::MakeDir {
            path, recursive, ..
        } => host_path(root, &path).and_then(|p| {
            let made = if recursive {
                std::fs::create_dir_all(p)
            } else {
                std::fs::create_dir(p)
            };
            made.map(|()| serde_json::json!({}))
                .map_err(|e| io_refusal(&e))
        }),
        Op::Remove { path, recursive } => host_path(root, &path).and_then(|p| {
            let removed = match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() && recursive => std::fs::remove_dir_all(&p),
                Ok(m) if m.is_dir() => std::fs::remove_dir(&p),
                Ok(_) => std::fs::remove_file(&p),
                Err(e) => Err(e),
            };
            removed
                .map(|()| serde_json::json!({}))
                .map_err(|e| io_refusal(&e))
        }),
        Op::WriteFile {
            path,
            create_parents,
            ..
        } => return write_file(&mut s, root, &path, create_parents).await,
        Op::ReadFile { path } => return read_file(&mut s, root, &path, 0, u64::MAX).await,
        Op::ReadRegular {
            path,
            offset,
            limit,
        } => return read_file(&mut s, root, &path, offset, limit).await,
        Op::TerminalCreate(req) => terminal_create(terminals, req).map(|i| serde_json::json!(i)),
        Op::TerminalList => {
            let terminals = terminals.lock().expect("fake terminals lock");
            let terminals = terminals.values().map(|(info, _)| info.clone()).collect();
            Ok(serde_json::json!(TerminalList { terminals }))
        }
        Op::TerminalResize { id, cols, rows } => {
            TerminalSize { cols, rows }.validate().and_then(|size| {
                let mut terminals = terminals.lock().expect("fake terminals lock");
                let (info, _) = terminals
                    .get_mut(&id)
                    .ok_or_else(|| unknown_terminal(&id))?;
                (info.cols, info.rows) = (size.cols, size.rows);
                Ok(serde_json::json!({}))
            })
        }
        Op::TerminalKill { id, .. } => {
            let removed = terminals.lock().expect("fake terminals lock").remove(&id);
            match removed {
                Some(_) => Ok(serde_json::json!({})),
                None => Err(unknown_terminal(&id)),
            }
        }
        Op::TerminalAttach { id, replay } => {
            return terminal_attach(&mut s, terminals, &id, replay).await;
        }
        Op::Exec(_) | Op::ListDir { .. } | Op::Watch(_) => Err(refuse(
            AgentErrorCode::BadRequest,
            "the fake agent does not implement this operation",
        )),
    };
    match answer {
        Ok(v) => write_json(&mut s, FrameKind::Ok, &v).await,
        Err(e) => write_json(&mut s, FrameKind::Error, &e).await,
    }
}

fn unknown_terminal(id: &str) -> AgentError {
    refuse(AgentErrorCode::NotFound, format!("no terminal {id:?}"))
}

fn terminal_create(terminals: &Terminals, req: TerminalCreate) -> Result<TerminalInfo, AgentError> {
    let size = TerminalSize {
        cols: req.cols,
        rows: req.rows,
    }
    .validate()?;
    let mut terminals = terminals.lock().expect("fake terminals lock");
    if terminals.len() >= MAX_TERMINALS {
        return Err(refuse(
            AgentErrorCode::TooManyTerminals,
            "too many terminals",
        ));
    }
    let id = match req.id {
        Some(id) => {
            validate_terminal_id(&id)?;
            if terminals.contains_key(&id) {
                return Err(refuse(AgentErrorCode::AlreadyExists, id));
            }
            id
        }
        None => (1..)
            .map(|n| format!("t{n}"))
            .find(|id| !terminals.contains_key(id))
            .expect("fewer than MAX_TERMINALS ids are taken"),
    };
    let argv = match (req.argv, req.shell) {
        (Some(argv), None) if !argv.is_empty() => argv,
        (None, Some(shell)) => vec!["/bin/sh".into(), "-c".into(), shell],
        (None, None) => vec!["-sh".into()],
        _ => return Err(refuse(AgentErrorCode::BadRequest, "bad argv or shell")),
    };
    let info = TerminalInfo {
        id: id.clone(),
        pid: 1000 + terminals.len() as u32,
        argv,
        cols: size.cols,
        rows: size.rows,
        exit_code: None,
        created_at: 0,
        pipes: req.pipes,
    };
    terminals.insert(id, (info.clone(), Vec::new()));
    Ok(info)
}

/// Echo what the host types back to it, until it closes.
async fn terminal_attach(
    s: &mut TcpStream,
    terminals: &Terminals,
    id: &str,
    replay: bool,
) -> Result<(), crate::ProtoError> {
    let found = terminals
        .lock()
        .expect("fake terminals lock")
        .get(id)
        .cloned();
    let Some((info, scrollback)) = found else {
        return write_json(s, FrameKind::Error, &unknown_terminal(id)).await;
    };
    write_json(s, FrameKind::Started, &info).await?;
    if replay && !scrollback.is_empty() {
        write_frame(s, FrameKind::Stdout, &scrollback).await?;
    }
    loop {
        let f = read_frame(s).await?;
        match f.kind {
            FrameKind::Stdin => {
                if let Some((_, kept)) = terminals.lock().expect("fake terminals lock").get_mut(id)
                {
                    kept.extend_from_slice(&f.payload);
                    let over = kept
                        .len()
                        .saturating_sub(crate::DEFAULT_SCROLLBACK as usize);
                    kept.drain(..over);
                }
                write_frame(s, FrameKind::Stdout, &f.payload).await?;
            }
            FrameKind::Resize => {
                let size: TerminalSize = f.parse()?;
                if let Some((info, _)) = terminals.lock().expect("fake terminals lock").get_mut(id)
                {
                    (info.cols, info.rows) = (size.cols, size.rows);
                }
            }
            _ => {}
        }
    }
}

async fn write_file(
    s: &mut TcpStream,
    root: &Path,
    path: &str,
    _create_parents: bool,
) -> Result<(), crate::ProtoError> {
    let mut data = Vec::new();
    loop {
        let f = read_frame(s).await?;
        match f.kind {
            FrameKind::Data => data.extend_from_slice(&f.payload),
            FrameKind::End => break,
            _ => {
                let e = refuse(AgentErrorCode::BadRequest, "write aborted");
                return write_json(s, FrameKind::Error, &e).await;
            }
        }
    }
    let written = host_path(root, path).and_then(|p| {
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_refusal(&e))?;
        }
        std::fs::write(&p, &data).map_err(|e| io_refusal(&e))
    });
    match written {
        Ok(()) => {
            let reply = WriteReply {
                size: data.len() as u64,
            };
            write_json(s, FrameKind::Ok, &reply).await
        }
        Err(e) => write_json(s, FrameKind::Error, &e).await,
    }
}

async fn read_file(
    s: &mut TcpStream,
    root: &Path,
    path: &str,
    offset: u64,
    limit: u64,
) -> Result<(), crate::ProtoError> {
    let read = host_path(root, path).and_then(|p| {
        let meta = std::fs::symlink_metadata(&p).map_err(|e| io_refusal(&e))?;
        if meta.is_dir() {
            return Err(refuse(AgentErrorCode::IsDirectory, path));
        }
        if !meta.is_file() {
            return Err(refuse(AgentErrorCode::NotRegularFile, path));
        }
        let bytes = std::fs::read(&p).map_err(|e| io_refusal(&e))?;
        Ok((info(&meta), bytes))
    });
    let (info, bytes) = match read {
        Ok(r) => r,
        Err(e) => return write_json(s, FrameKind::Error, &e).await,
    };
    write_json(s, FrameKind::Ok, &info).await?;
    let start = (offset as usize).min(bytes.len());
    let end = start
        .saturating_add(limit.min(usize::MAX as u64) as usize)
        .min(bytes.len());
    for chunk in bytes[start..end].chunks(crate::DATA_CHUNK) {
        write_frame(s, FrameKind::Data, chunk).await?;
    }
    write_frame(s, FrameKind::End, &[]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ping_and_write() {
        let dir = std::env::temp_dir().join(format!("fake-agent-{}", std::process::id()));
        let agent = FakeAgent::spawn("127.0.0.1:0".parse().unwrap(), dir.clone())
            .await
            .unwrap();
        let mut s = TcpStream::connect(agent.addr()).await.unwrap();
        write_json(&mut s, FrameKind::Request, &Request::new(Op::Ping))
            .await
            .unwrap();
        let f = read_frame(&mut s).await.unwrap();
        assert_eq!(f.kind, FrameKind::Ok);
        let reply: PingReply = f.parse().unwrap();
        assert_eq!(reply.protocol, PROTOCOL_VERSION);

        let mut s = TcpStream::connect(agent.addr()).await.unwrap();
        let op = Op::WriteFile {
            path: "/etc/x".into(),
            mode: None,
            create_parents: true,
            owner: None,
        };
        write_json(&mut s, FrameKind::Request, &Request::new(op))
            .await
            .unwrap();
        write_frame(&mut s, FrameKind::Data, b"hi").await.unwrap();
        write_frame(&mut s, FrameKind::End, &[]).await.unwrap();
        assert_eq!(read_frame(&mut s).await.unwrap().kind, FrameKind::Ok);
        assert_eq!(std::fs::read(dir.join("etc/x")).unwrap(), b"hi");
        assert_eq!(agent.connections(), 2);
        drop(agent);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn terminals_echo_and_replay() {
        use crate::client::{self, TerminalEvent};
        let dir = std::env::temp_dir().join(format!("fake-agent-t-{}", std::process::id()));
        let agent = FakeAgent::spawn("127.0.0.1:0".parse().unwrap(), dir.clone())
            .await
            .unwrap();
        let conn = || TcpStream::connect(agent.addr());
        let req = TerminalCreate {
            id: Some("main".into()),
            cols: 80,
            rows: 24,
            ..Default::default()
        };
        let info = client::terminal_create(&mut conn().await.unwrap(), req.clone())
            .await
            .unwrap();
        assert_eq!(
            (info.id.as_str(), info.cols, info.exit_code),
            ("main", 80, None)
        );
        match client::terminal_create(&mut conn().await.unwrap(), req).await {
            Err(crate::ProtoError::Refused(e)) => assert_eq!(e.code, AgentErrorCode::AlreadyExists),
            other => panic!("{other:?}"),
        }

        let mut s = conn().await.unwrap();
        client::terminal_attach(&mut s, "main", false)
            .await
            .unwrap();
        client::send_input(&mut s, b"ls\n").await.unwrap();
        assert_eq!(
            client::read_terminal_event(&mut s).await.unwrap(),
            TerminalEvent::Output(b"ls\n".to_vec())
        );
        client::send_resize(
            &mut s,
            TerminalSize {
                cols: 100,
                rows: 30,
            },
        )
        .await
        .unwrap();
        // Frames are handled in order: once this echo is back, the resize was applied.
        client::send_input(&mut s, b"x").await.unwrap();
        assert_eq!(
            client::read_terminal_event(&mut s).await.unwrap(),
            TerminalEvent::Output(b"x".to_vec())
        );
        drop(s);

        let mut s = conn().await.unwrap();
        client::terminal_attach(&mut s, "main", true).await.unwrap();
        assert_eq!(
            client::read_terminal_event(&mut s).await.unwrap(),
            TerminalEvent::Output(b"ls\nx".to_vec())
        );
        let list = client::terminal_list(&mut conn().await.unwrap())
            .await
            .unwrap();
        assert_eq!((list.len(), list[0].cols, list[0].rows), (1, 100, 30));
        client::terminal_kill(&mut conn().await.unwrap(), "main", None)
            .await
            .unwrap();
        assert!(
            client::terminal_list(&mut conn().await.unwrap())
                .await
                .unwrap()
                .is_empty()
        );
        drop(agent);
        let _ = std::fs::remove_dir_all(dir);
    }
}
