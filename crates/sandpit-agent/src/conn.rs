//! One host connection: incoming frames via a reader task, outgoing frames, reset-only close.
//!
//! gVisor refuses to checkpoint a sandbox holding a connected or closing TCP endpoint, so the
//! agent never closes first with a FIN: after its terminal frame it reads until the host closes
//! (the host resets), and every socket it drops has `SO_LINGER` 0 and is never `shutdown`,
//! so dropping it sends a reset and leaves nothing behind.

use std::time::Duration;

use sandpit_agent_proto::{
    AgentError, AgentErrorCode, Frame, FrameKind, MAX_FRAME_LEN, ProtoError, read_frame,
};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long the agent waits for the host to close after the terminal frame.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(60);

/// A host connection.
pub struct Conn {
    rx: mpsc::Receiver<Result<Frame, ProtoError>>,
    wr: Option<OwnedWriteHalf>,
    reader: JoinHandle<()>,
}

impl Conn {
    /// Take over an accepted stream.
    pub fn new(stream: TcpStream) -> Conn {
        let _ = stream.set_nodelay(true);
        let _ = stream.set_zero_linger();
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::channel(4);
        let reader = tokio::spawn(read_loop(rd, tx));
        Conn {
            rx,
            wr: Some(wr),
            reader,
        }
    }

    /// The next frame from the host. Cancel safe. After an error, always `Closed`.
    pub async fn recv(&mut self) -> Result<Frame, ProtoError> {
        self.rx.recv().await.unwrap_or(Err(ProtoError::Closed))
    }

    /// Send one frame (header and payload in one write).
    pub async fn send(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), ProtoError> {
        if payload.len() > MAX_FRAME_LEN {
            return Err(ProtoError::TooLarge(payload.len()));
        }
        let mut buf = Vec::with_capacity(5 + payload.len());
        buf.push(kind as u8);
        buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(payload);
        let wr = self.wr.as_mut().expect("write half present until drop");
        wr.write_all(&buf).await.map_err(ProtoError::Write)
    }

    /// Send a frame with a JSON payload.
    pub async fn send_json<T: Serialize>(
        &mut self,
        kind: FrameKind,
        value: &T,
    ) -> Result<(), ProtoError> {
        let frame = Frame::json(kind, value);
        self.send(kind, &frame.payload).await
    }

    /// Send an `Error` frame.
    pub async fn send_error(&mut self, err: &AgentError) -> Result<(), ProtoError> {
        self.send_json(FrameKind::Error, err).await
    }

    /// A pending socket error (e.g. the host reset the connection), without reading.
    pub fn take_error(&self) -> Option<std::io::Error> {
        let wr = self.wr.as_ref()?;
        let stream: &TcpStream = wr.as_ref();
        stream.take_error().ok().flatten()
    }

    /// Wait (at most [`CLOSE_TIMEOUT`]) until the host closes, discarding anything it sends,
    /// then drop the socket with a reset.
    pub async fn finish(mut self) {
        let drain = async { while self.rx.recv().await.is_some() {} };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain).await;
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
        // Dropping an OwnedWriteHalf would shutdown(SHUT_WR), i.e. send a FIN and leave the
        // endpoint closing. `forget` skips that; the last half dropped closes with a reset.
        if let Some(wr) = self.wr.take() {
            wr.forget();
        }
    }
}

async fn read_loop(mut rd: OwnedReadHalf, tx: mpsc::Sender<Result<Frame, ProtoError>>) {
    loop {
        match read_frame(&mut rd).await {
            Ok(frame) => {
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
            Err(e @ (ProtoError::Closed | ProtoError::Read(_))) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                break;
            }
        }
    }
    // The stream is out of sync: discard bytes until the host closes.
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = rd.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// An [`AgentError`].
pub fn agent_error(code: AgentErrorCode, message: impl Into<String>) -> AgentError {
    AgentError {
        code,
        message: message.into(),
    }
}
