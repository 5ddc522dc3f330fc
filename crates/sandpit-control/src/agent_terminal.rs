//! The host side of the agent's terminals (protocol version 3): create, list, resize, kill,
//! and attachments that stream a terminal's output and take its input.
//!
//! Every connection here is made to close with a reset: `SO_LINGER` 0 is set as soon as it
//! is connected, so whatever drops it (an error, a detach, a cut before a checkpoint) leaves
//! no TCP endpoint behind in the sandbox (see [`crate::agent`]). An attachment is split with
//! [`TcpStream::split`] (borrowed halves), never `into_split`, whose write half would send a
//! FIN on drop.

use std::time::Duration;

use sandpit_agent_proto::client::{self as proto_client, TerminalEvent};
use sandpit_agent_proto::{ProtoError, TerminalCreate, TerminalInfo, TerminalSize};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use crate::agent::{AgentClient, AgentFailure};
use crate::error::{ControlError, DisplayChain};

/// How long connecting to the agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a terminal operation other than an attachment may take once connected.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// An open attachment to one terminal. Dropping it detaches (the connection resets; the
/// terminal goes on in the agent).
pub struct TerminalAttachment {
    sandbox: String,
    stream: TcpStream,
}

impl TerminalAttachment {
    /// The two directions, to drive at once in one task.
    pub fn split(&mut self) -> (AttachmentReader<'_>, AttachmentWriter<'_>) {
        let (r, w) = self.stream.split();
        (
            AttachmentReader {
                sandbox: &self.sandbox,
                r,
            },
            AttachmentWriter {
                sandbox: &self.sandbox,
                w,
            },
        )
    }
}

/// Reads an attachment's output and its end.
pub struct AttachmentReader<'a> {
    sandbox: &'a str,
    r: ReadHalf<'a>,
}

impl AttachmentReader<'_> {
    /// The next output, or the exit. Not cancel-safe: drop the attachment after dropping
    /// this future mid-way.
    pub async fn next(&mut self) -> Result<TerminalEvent, AgentFailure> {
        proto_client::read_terminal_event(&mut self.r)
            .await
            .map_err(|e| failure(self.sandbox, e))
    }
}

/// Types into an attached terminal and resizes it.
pub struct AttachmentWriter<'a> {
    sandbox: &'a str,
    w: WriteHalf<'a>,
}

impl AttachmentWriter<'_> {
    pub async fn input(&mut self, bytes: &[u8]) -> Result<(), AgentFailure> {
        proto_client::send_input(&mut self.w, bytes)
            .await
            .map_err(|e| failure(self.sandbox, e))
    }

    /// Close the stdin of a terminal on pipes (protocol version 6; a pty ignores it).
    pub async fn close_stdin(&mut self) -> Result<(), AgentFailure> {
        proto_client::send_stdin_close(&mut self.w)
            .await
            .map_err(|e| failure(self.sandbox, e))
    }

    /// Detach with an acknowledgement: send a resize the agent must refuse. The agent reads
    /// an attachment's next frame only once the input before it was handed to the process,
    /// so the refusal (an `Error` the reader sees, which ends the attachment) says that
    /// every earlier frame was taken.
    pub async fn detach_acknowledged(&mut self) -> Result<(), AgentFailure> {
        proto_client::send_resize(&mut self.w, TerminalSize { cols: 0, rows: 0 })
            .await
            .map_err(|e| failure(self.sandbox, e))
    }

    /// `size` must be valid ([`TerminalSize::validate`]): the agent ends an attachment that
    /// sends a malformed frame.
    pub async fn resize(&mut self, size: TerminalSize) -> Result<(), AgentFailure> {
        proto_client::send_resize(&mut self.w, size)
            .await
            .map_err(|e| failure(self.sandbox, e))
    }
}

impl AgentClient {
    /// A fresh connection to the agent that resets when dropped.
    pub(crate) async fn terminal_conn(&self) -> Result<TcpStream, ControlError> {
        let broken = |what: String| ControlError::Agent {
            sandbox: self.sandbox.clone(),
            what,
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr))
            .await
            .map_err(|_| broken("connect timed out".into()))?
            .map_err(|e| broken(format!("connect: {e}")))?;
        // From here on, dropping the stream resets it.
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .map_err(|e| broken(format!("setting SO_LINGER: {e}")))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// One short terminal operation on its own connection, bounded in time.
    async fn terminal_call<T>(
        &self,
        call: impl AsyncFnOnce(&mut TcpStream) -> Result<T, ProtoError>,
    ) -> Result<T, AgentFailure> {
        let mut stream = self.terminal_conn().await?;
        match tokio::time::timeout(CALL_TIMEOUT, call(&mut stream)).await {
            Ok(r) => r.map_err(|e| failure(&self.sandbox, e)),
            Err(_) => Err(AgentFailure::Broken(ControlError::Agent {
                sandbox: self.sandbox.clone(),
                what: format!("no answer within {CALL_TIMEOUT:?}"),
            })),
        }
    }

    /// Start a terminal.
    #[tracing::instrument(level = "debug", name = "agent.terminal_create", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn terminal_create(&self, req: TerminalCreate) -> Result<TerminalInfo, AgentFailure> {
        self.terminal_call(async |s| proto_client::terminal_create(s, req).await)
            .await
    }

    /// The agent's terminals, sorted by id.
    #[tracing::instrument(level = "debug", name = "agent.terminal_list", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn terminal_list(&self) -> Result<Vec<TerminalInfo>, AgentFailure> {
        self.terminal_call(async |s| proto_client::terminal_list(s).await)
            .await
    }

    /// Signal a terminal's process group, or (`signal` absent) kill and remove it.
    #[tracing::instrument(level = "debug", name = "agent.terminal_kill", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn terminal_kill(&self, id: &str, signal: Option<i32>) -> Result<(), AgentFailure> {
        self.terminal_call(async |s| proto_client::terminal_kill(s, id, signal).await)
            .await
    }

    /// Resize a terminal without being attached.
    #[tracing::instrument(level = "debug", name = "agent.terminal_resize", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn terminal_resize(&self, id: &str, size: TerminalSize) -> Result<(), AgentFailure> {
        self.terminal_call(async |s| proto_client::terminal_resize(s, id, size).await)
            .await
    }

    /// Attach to a terminal: its info once the agent accepted, and the attachment, whose
    /// first output is the scrollback when `replay`.
    #[tracing::instrument(level = "debug", name = "agent.terminal_attach", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn terminal_attach(
        &self,
        id: &str,
        replay: bool,
    ) -> Result<(TerminalInfo, TerminalAttachment), AgentFailure> {
        let mut stream = self.terminal_conn().await?;
        let info = match tokio::time::timeout(
            CALL_TIMEOUT,
            proto_client::terminal_attach(&mut stream, id, replay),
        )
        .await
        {
            Ok(r) => r.map_err(|e| failure(&self.sandbox, e))?,
            Err(_) => {
                return Err(AgentFailure::Broken(ControlError::Agent {
                    sandbox: self.sandbox.clone(),
                    what: format!("attach: no answer within {CALL_TIMEOUT:?}"),
                }));
            }
        };
        Ok((
            info,
            TerminalAttachment {
                sandbox: self.sandbox.clone(),
                stream,
            },
        ))
    }
}

/// A refusal stays a refusal; anything else broke the connection.
pub(crate) fn failure(sandbox: &str, e: ProtoError) -> AgentFailure {
    match e {
        ProtoError::Refused(e) => AgentFailure::Refused(e),
        e => AgentFailure::Broken(ControlError::Agent {
            sandbox: sandbox.to_string(),
            what: DisplayChain(&e).to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use sandpit_agent_proto::AgentErrorCode;
    use sandpit_agent_proto::fake::FakeAgent;

    use super::*;

    #[tokio::test]
    async fn terminals_over_the_fake_agent() {
        let dir = tempfile::tempdir().unwrap();
        let n = 10 + (std::process::id() % 200) as u8;
        let ip = Ipv4Addr::new(127, 0, 79, n);
        let fake = FakeAgent::spawn(
            SocketAddr::from((ip, sandpit_agent_proto::AGENT_PORT)),
            dir.path().into(),
        )
        .await
        .unwrap();
        let agent = AgentClient::new("sbtest", ip);
        let info = agent
            .terminal_create(TerminalCreate {
                id: Some("t1".into()),
                cols: 80,
                rows: 24,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(info.id, "t1");

        // Typed bytes come back (the fake echoes), and survive a detach for a replay.
        let (_, mut att) = agent.terminal_attach("t1", false).await.unwrap();
        {
            let (mut r, mut w) = att.split();
            w.input(b"hello").await.unwrap();
            w.resize(TerminalSize {
                cols: 100,
                rows: 30,
            })
            .await
            .unwrap();
            assert_eq!(
                r.next().await.unwrap(),
                TerminalEvent::Output(b"hello".to_vec())
            );
        }
        drop(att);
        let (info, mut att) = agent.terminal_attach("t1", true).await.unwrap();
        assert_eq!((info.cols, info.rows), (100, 30));
        let (mut r, _) = att.split();
        assert_eq!(
            r.next().await.unwrap(),
            TerminalEvent::Output(b"hello".to_vec())
        );

        agent
            .terminal_resize("t1", TerminalSize { cols: 20, rows: 10 })
            .await
            .unwrap();
        let list = agent.terminal_list().await.unwrap();
        assert_eq!((list.len(), list[0].cols), (1, 20));

        // Unknown ids are refusals the server can map, not broken connections.
        for r in [
            agent.terminal_kill("nope", None).await,
            agent.terminal_attach("nope", true).await.map(drop),
        ] {
            match r {
                Err(AgentFailure::Refused(e)) => assert_eq!(e.code, AgentErrorCode::NotFound),
                other => panic!("{other:?}"),
            }
        }
        agent.terminal_kill("t1", None).await.unwrap();
        assert!(agent.terminal_list().await.unwrap().is_empty());
        drop(fake);
    }
}
