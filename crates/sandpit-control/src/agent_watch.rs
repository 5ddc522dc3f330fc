//! The host side of the agent's file watches (protocol version 4): a connection that streams
//! batches of changes until it is dropped, which resets it and ends the watch in the agent.

use std::time::Duration;

use sandpit_agent_proto::client as proto_client;
use sandpit_agent_proto::{WatchEvent, WatchRequest};
use tokio::net::TcpStream;

use crate::agent::{AgentClient, AgentFailure};
use crate::agent_terminal::failure;
use crate::error::ControlError;

/// How long the agent may take to put its watches in place.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// An open watch. Dropping it ends the watch (the connection resets).
pub struct AgentWatch {
    sandbox: String,
    stream: TcpStream,
}

impl AgentWatch {
    /// The next batch of changes; `None` once the watched path is gone. Not cancel-safe:
    /// drop the watch after dropping this future mid-way.
    pub async fn next(&mut self) -> Result<Option<Vec<WatchEvent>>, AgentFailure> {
        proto_client::read_watch_batch(&mut self.stream)
            .await
            .map_err(|e| failure(&self.sandbox, e))
    }
}

impl AgentClient {
    /// Start a watch; returns once the agent's watches are in place, so every change after
    /// this returns is reported. `unsupported_version` from an agent older than version 4.
    #[tracing::instrument(level = "debug", name = "agent.watch", skip_all, fields(sandbox.id = %self.sandbox))]
    pub async fn watch(&self, req: WatchRequest) -> Result<AgentWatch, AgentFailure> {
        let mut stream = self.terminal_conn().await?;
        match tokio::time::timeout(START_TIMEOUT, proto_client::watch(&mut stream, req)).await {
            Ok(r) => r.map_err(|e| failure(&self.sandbox, e))?,
            Err(_) => {
                return Err(AgentFailure::Broken(ControlError::Agent {
                    sandbox: self.sandbox.clone(),
                    what: format!("watch: no answer within {START_TIMEOUT:?}"),
                }));
            }
        }
        Ok(AgentWatch {
            sandbox: self.sandbox.clone(),
            stream,
        })
    }
}
