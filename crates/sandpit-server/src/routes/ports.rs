//! `/v1/sandboxes/{id}/ports`: the TCP ports listening inside a sandbox, and waiting for one
//! to open.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sandpit_agent_proto as proto;
use sandpit_api_types::{ErrorBody, Port, PortList, PortWaitQuery, parse_duration};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiQuery;
use crate::error::ApiError;
use crate::extract::{Authorized, OwnedSandbox, scope};
use crate::lifecycle;
use crate::server::Server;
use sandpit_control::agent::AgentFailure;

/// Longest `wait`.
const MAX_WAIT: Duration = Duration::from_secs(300);
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// How often `wait` asks the agent.
const POLL: Duration = Duration::from_millis(100);

pub fn router() -> OpenApiRouter<Arc<Server>> {
    OpenApiRouter::new()
        .routes(routes!(list_ports))
        .routes(routes!(wait_port))
}

/// A port from a path segment: 1-65535, not the agent's.
pub fn parse_port(text: &str) -> Result<u16, ApiError> {
    match text.parse::<u16>() {
        Ok(proto::AGENT_PORT) => Err(ApiError::bad_request(
            "invalid_port",
            format!(
                "port {} is reserved for the sandbox agent",
                proto::AGENT_PORT
            ),
        )),
        Ok(p) if p > 0 => Ok(p),
        _ => Err(ApiError::bad_request(
            "invalid_port",
            format!("{text:?} is not a port (1-65535)"),
        )),
    }
}

/// The sandbox's listening ports, the agent's own left out. Wakes a suspended sandbox.
async fn ports_of(server: &Arc<Server>, sb: &Authorized) -> Result<Vec<Port>, ApiError> {
    let (agent, _guard, _) = lifecycle::running_agent(server, sb).await?;
    let list = agent.list_ports().await.map_err(|f| match f {
        AgentFailure::Refused(e) if e.code == proto::AgentErrorCode::BadRequest => ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "agent_too_old",
            format!(
                "this sandbox's agent cannot list ports (it predates the operation): {}",
                e.message
            ),
        ),
        f => super::sandboxes::agent_failure(f),
    })?;
    Ok(list
        .ports
        .into_iter()
        .filter(|p| p.port != proto::AGENT_PORT)
        .map(|p| Port {
            port: p.port,
            address: p.address,
        })
        .collect())
}

/// The TCP ports listening inside the sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/ports", tag = "ports",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Listening ports", body = PortList),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
        (status = 409, description = "Sandbox not running", body = ErrorBody),
    ))]
async fn list_ports(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::SandboxRead>,
) -> Result<Json<PortList>, ApiError> {
    Ok(Json(PortList {
        ports: ports_of(&server, &sb).await?,
    }))
}

/// Wait until a TCP port listens inside the sandbox. Answers as soon as it does, with the
/// sockets listening on it; 504 `port_wait_timeout` when `timeout` passes first.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/ports/{port}/wait", tag = "ports",
    params(
        ("id" = String, Path, description = "Sandbox id"),
        ("port" = u16, Path, minimum = 1, maximum = 65535, description = "TCP port (not the agent's, 49983)"),
        PortWaitQuery
    ),
    responses(
        (status = 200, description = "The port listens", body = PortList),
        (status = 400, description = "Invalid port or timeout", body = ErrorBody),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
        (status = 409, description = "Sandbox not running", body = ErrorBody),
        (status = 504, description = "The port did not open in time (port_wait_timeout)", body = ErrorBody),
    ))]
async fn wait_port(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::SandboxRead>,
    Path((_sandbox, port)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<PortWaitQuery>,
) -> Result<Json<PortList>, ApiError> {
    let port = parse_port(&port)?;
    let timeout = match &q.timeout {
        Some(t) => parse_duration(t).map_err(|m| ApiError::bad_request("invalid_timeout", m))?,
        None => DEFAULT_WAIT,
    };
    if timeout > MAX_WAIT {
        return Err(ApiError::bad_request(
            "invalid_timeout",
            "timeout must be at most 5m",
        ));
    }
    let deadline = Instant::now() + timeout;
    loop {
        // The sandbox's lock is held only while asking, so a wait never delays a suspend.
        let open: Vec<Port> = ports_of(&server, &sb)
            .await?
            .into_iter()
            .filter(|p| p.port == port)
            .collect();
        if !open.is_empty() {
            return Ok(Json(PortList { ports: open }));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "port_wait_timeout",
                format!(
                    "nothing listened on port {port} within {}",
                    sandpit_api_types::format_duration(timeout)
                ),
            ));
        }
        tokio::time::sleep(POLL.min(deadline - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_checked() {
        assert_eq!(parse_port("8080").unwrap(), 8080);
        for bad in ["0", "65536", "-1", "http", "49983", ""] {
            assert_eq!(parse_port(bad).unwrap_err().code, "invalid_port", "{bad}");
        }
    }
}
