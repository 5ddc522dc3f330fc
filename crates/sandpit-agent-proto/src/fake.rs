//! `FakeAgent`: a minimal in-process agent speaking this protocol, for tests of the host side
//! without a sandbox (feature `fake`). It listens on the address it is given (a test hands it
//! the loopback address a fake network gave the sandbox), answers `Ping`, and keeps files in a
//! host directory standing for the sandbox's files (parent directories of a written file are
//! made as needed: they stand for the template's): `WriteFile`, `ReadFile`,
//! `ReadRegular`, `Stat`, `MakeDir`, `Remove` work there (paths checked with
//! [`crate::normalize_path`], so nothing leaves it). `ListPorts` lists nothing; `Exec` and
//! `ListDir` are refused with `bad_request` (it runs no processes).
//!
//! Dropping it stops listening and resets the connections it serves, as a sandbox that stops.
#![expect(
    clippy::disallowed_methods,
    reason = "the fake's files live in a directory the test chose (a temporary one)"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::{
    AgentError, AgentErrorCode, EntryKind, FileInfo, FrameKind, Op, PROTOCOL_VERSION, PingReply,
    PortList, Request, WriteReply, normalize_path, read_frame, write_frame, write_json,
};

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
        let task = tokio::spawn(async move {
            // Owns the connections: they end with the agent.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        counter.fetch_add(1, Ordering::Relaxed);
                        let root = root.clone();
                        conns.spawn(async move { serve(stream, &root).await });
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
async fn serve(mut s: TcpStream, root: &Path) -> Result<(), crate::ProtoError> {
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
        })),
        Op::ListPorts => Ok(serde_json::json!(PortList { ports: Vec::new() })),
        Op::Stat { path } => host_path(root, &path).and_then(|p| {
            std::fs::symlink_metadata(p)
                .map(|m| serde_json::json!(info(&m)))
                .map_err(|e| io_refusal(&e))
        }),
        Op::MakeDir { path, recursive } => host_path(root, &path).and_then(|p| {
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
        Op::Exec(_) | Op::ListDir { .. } => Err(refuse(
            AgentErrorCode::BadRequest,
            "the fake agent does not implement this operation",
        )),
    };
    match answer {
        Ok(v) => write_json(&mut s, FrameKind::Ok, &v).await,
        Err(e) => write_json(&mut s, FrameKind::Error, &e).await,
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
}
