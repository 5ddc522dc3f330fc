//! `/v1/sandboxes/{id}/terminals`: processes on a pseudo-terminal, kept by the sandbox's
//! agent (so they outlive every connection, and a suspend), listed, created, resized and
//! killed over REST and attached over a WebSocket.
//!
//! An attachment holds no sandbox lock while it lives: a WebSocket may stay open for hours,
//! and a lock held that long would hold off hibernation. Like a proxied preview connection,
//! it is registered in the sandbox's live connections (`server.previews`) under the read
//! lock, while the agent connection is made; the lock is then released. A suspend (or a
//! destroy, or a fork's checkpoint) cuts it: the agent connection is reset (the terminal
//! goes on in the agent and is checkpointed with it) and the client gets close code 1012;
//! it reconnects, which wakes the sandbox, with `replay=true` to redraw.
//!
//! On the WebSocket, binary messages are terminal bytes both ways; text messages are JSON
//! [`TerminalMessage`]s: `resize` from the client, `exit` (before the close) and `error` (a
//! refused control message) from the server. Every message is at most
//! [`proto::MAX_FRAME_LEN`] bytes; a larger one closes the socket with 1009.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use sandpit_agent_proto::{self as proto, client::TerminalEvent};
use sandpit_api_types::{
    DEFAULT_TERMINAL_COLS, DEFAULT_TERMINAL_ROWS, ErrorBody, Terminal, TerminalAttachQuery,
    TerminalCreateRequest, TerminalList, TerminalMessage, TerminalResizeRequest,
    validate_terminal_size,
};
use sandpit_control::agent::AgentFailure;
use sandpit_control::agent_terminal::TerminalAttachment;
use sandpit_control::live::ConnGuard;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiQuery, OptionalJson};
use crate::error::ApiError;
use crate::extract::{OwnedSandbox, scope};
use crate::lifecycle;
use crate::server::Server;
use crate::util::rfc3339;

/// How long the server waits for a client to take its last messages (exit, close).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

pub fn router() -> OpenApiRouter<Arc<Server>> {
    OpenApiRouter::new()
        .routes(routes!(list_terminals, create_terminal))
        .routes(routes!(kill_terminal))
        .routes(routes!(resize_terminal))
        .routes(routes!(attach_terminal))
}

/// A terminal id from the path: `[A-Za-z0-9_-]{1,64}`.
fn check_id(id: &str) -> Result<(), ApiError> {
    proto::validate_terminal_id(id)
        .map_err(|e| ApiError::bad_request("invalid_terminal_id", e.message))
}

fn size(cols: u32, rows: u32) -> Result<proto::TerminalSize, ApiError> {
    let (cols, rows) = validate_terminal_size(cols, rows)
        .map_err(|m| ApiError::bad_request("invalid_terminal_size", m))?;
    Ok(proto::TerminalSize { cols, rows })
}

fn terminal(t: proto::TerminalInfo) -> Terminal {
    Terminal {
        id: t.id,
        pid: t.pid,
        argv: t.argv,
        cols: t.cols,
        rows: t.rows,
        exit_code: t.exit_code,
        created_at: rfc3339(t.created_at.saturating_mul(1000)),
    }
}

/// Map an agent failure of a terminal operation to what the client sees.
fn terminal_failure(f: AgentFailure) -> ApiError {
    use proto::AgentErrorCode as C;
    match f {
        AgentFailure::Refused(e) => match e.code {
            C::NotFound => ApiError::not_found("terminal_not_found", e.message),
            C::AlreadyExists => ApiError::conflict("terminal_exists", e.message),
            C::UnsupportedVersion => ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "agent_too_old",
                format!(
                    "this sandbox's agent predates terminals, or running them as the template's USER: {}",
                    e.message
                ),
            ),
            _ => super::sandboxes::agent_failure(AgentFailure::Refused(e)),
        },
        f => super::sandboxes::agent_failure(f),
    }
}

/// Check a create request and turn it into the agent's (environment and working directory
/// are added once the sandbox's row is read).
fn agent_create(req: TerminalCreateRequest) -> Result<proto::TerminalCreate, ApiError> {
    if let Some(id) = &req.id {
        check_id(id)?;
    }
    let size = size(
        req.cols.unwrap_or(DEFAULT_TERMINAL_COLS),
        req.rows.unwrap_or(DEFAULT_TERMINAL_ROWS),
    )?;
    let (shell, argv) = match (req.command, req.argv) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_command",
                "give either command or argv, not both",
            ));
        }
        (Some(c), None) if c.trim().is_empty() || c.contains('\0') => {
            return Err(ApiError::bad_request(
                "invalid_command",
                "command must be a non-empty line without NUL",
            ));
        }
        (None, Some(a))
            if a.is_empty() || a[0].is_empty() || a.iter().any(|s| s.contains('\0')) =>
        {
            return Err(ApiError::bad_request(
                "invalid_command",
                "argv must name a program, without NUL bytes",
            ));
        }
        (c, a) => (c, a),
    };
    if let Some(cwd) = &req.cwd {
        proto::normalize_path(cwd).map_err(|e| ApiError::bad_request("invalid_path", e.message))?;
    }
    if req
        .env
        .iter()
        .any(|(k, v)| k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0'))
    {
        return Err(ApiError::bad_request(
            "invalid_env",
            "environment variable names must be non-empty and contain no '=' or NUL; values no NUL",
        ));
    }
    Ok(proto::TerminalCreate {
        id: req.id,
        argv,
        shell,
        cwd: req.cwd,
        env: req.env.into_iter().collect(),
        cols: size.cols,
        rows: size.rows,
        scrollback_bytes: None,
        user: None,
        ..Default::default()
    })
}

/// The sandbox's terminals, running and exited (an exited one stays until it is deleted).
/// Wakes a suspended sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/terminals", tag = "terminals",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "The terminals, by id", body = TerminalList),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
        (status = 409, description = "Sandbox not running", body = ErrorBody),
        (status = 501, description = "The sandbox's agent predates terminals (agent_too_old)", body = ErrorBody),
    ))]
async fn list_terminals(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::SandboxRead>,
) -> Result<Json<TerminalList>, ApiError> {
    let (agent, _guard, _) = lifecycle::running_agent(&server, &sb).await?;
    let list = agent.terminal_list().await.map_err(terminal_failure)?;
    Ok(Json(TerminalList {
        terminals: list.into_iter().map(terminal).collect(),
    }))
}

/// Start a process on a new pseudo-terminal: `command` (through `/bin/sh -c`), `argv`, or
/// by default the login shell of the template's `USER` (else root), which it runs as.
/// Attach to it to type and see its output.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/terminals", tag = "terminals",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = TerminalCreateRequest,
    responses(
        (status = 201, description = "The terminal runs", body = Terminal),
        (status = 400, description = "Invalid id, size, command, cwd or env, or the program could not start (spawn_failed)", body = ErrorBody),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
        (status = 409, description = "Sandbox not running, the id is taken (terminal_exists), or the sandbox holds 64 terminals (too_many_terminals)", body = ErrorBody),
        (status = 501, description = "The sandbox's agent predates terminals (agent_too_old)", body = ErrorBody),
    ))]
async fn create_terminal(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::SandboxEditCode>,
    OptionalJson(req): OptionalJson<TerminalCreateRequest>,
) -> Result<(StatusCode, Json<Terminal>), ApiError> {
    let mut req = agent_create(req)?;
    let (agent, _guard, row) = lifecycle::running_agent(&server, &sb).await?;
    req.env = lifecycle::exec_env(&row, std::mem::take(&mut req.env))?;
    if req.cwd.is_none() {
        req.cwd = sandpit_control::node::images::default_cwd(&server, &row).await;
    }
    req.user = sandpit_control::node::images::default_user(&server, &row).await?;
    let info = agent.terminal_create(req).await.map_err(terminal_failure)?;
    Ok((StatusCode::CREATED, Json(terminal(info))))
}

/// Kill a terminal's processes (SIGKILL to its process group) and forget it. Attached
/// clients get its exit.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/terminals/{terminal_id}", tag = "terminals",
    params(
        ("id" = String, Path, description = "Sandbox id"),
        ("terminal_id" = String, Path, description = "Terminal id"),
    ),
    responses(
        (status = 204, description = "Killed and removed"),
        (status = 400, description = "Malformed terminal id (invalid_terminal_id)", body = ErrorBody),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox or terminal not found (terminal_not_found)", body = ErrorBody),
        (status = 409, description = "Sandbox not running", body = ErrorBody),
        (status = 501, description = "The sandbox's agent predates terminals (agent_too_old)", body = ErrorBody),
    ))]
async fn kill_terminal(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::SandboxEditCode>,
    Path((_sandbox, tid)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    check_id(&tid)?;
    let (agent, _guard, _) = lifecycle::running_agent(&server, &sb).await?;
    agent
        .terminal_kill(&tid, None)
        .await
        .map_err(terminal_failure)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Change a terminal's window size (its foreground processes get SIGWINCH).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/terminals/{terminal_id}/resize", tag = "terminals",
    params(
        ("id" = String, Path, description = "Sandbox id"),
        ("terminal_id" = String, Path, description = "Terminal id"),
    ),
    request_body = TerminalResizeRequest,
    responses(
        (status = 204, description = "Resized"),
        (status = 400, description = "Malformed terminal id or size (invalid_terminal_id, invalid_terminal_size)", body = ErrorBody),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox or terminal not found (terminal_not_found)", body = ErrorBody),
        (status = 409, description = "Sandbox not running", body = ErrorBody),
        (status = 501, description = "The sandbox's agent predates terminals (agent_too_old)", body = ErrorBody),
    ))]
async fn resize_terminal(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::SandboxEditCode>,
    Path((_sandbox, tid)): Path<(String, String)>,
    super::ApiJson(req): super::ApiJson<TerminalResizeRequest>,
) -> Result<StatusCode, ApiError> {
    check_id(&tid)?;
    let size = size(req.cols, req.rows)?;
    let (agent, _guard, _) = lifecycle::running_agent(&server, &sb).await?;
    agent
        .terminal_resize(&tid, size)
        .await
        .map_err(terminal_failure)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Attach to a terminal over a WebSocket: binary messages carry its bytes both ways, text
/// messages JSON control (`{"type":"resize","cols":..,"rows":..}` from the client;
/// `{"type":"exit","exit_code":..}` before the server closes with 1000, and
/// `{"type":"error",..}` for a refused control message). Any number of clients may attach
/// at once. Closing detaches; the terminal goes on. When the sandbox is suspended the server
/// closes with 1012: reconnect (which wakes it) with `replay=true` to redraw.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/terminals/{terminal_id}/attach", tag = "terminals",
    params(
        ("id" = String, Path, description = "Sandbox id"),
        ("terminal_id" = String, Path, description = "Terminal id"),
        TerminalAttachQuery,
    ),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket upgrade (websocket_required), or a malformed terminal id", body = ErrorBody),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox or terminal not found (terminal_not_found)", body = ErrorBody),
        (status = 409, description = "Sandbox not running", body = ErrorBody),
        (status = 501, description = "The sandbox's agent predates terminals (agent_too_old)", body = ErrorBody),
    ))]
async fn attach_terminal(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::SandboxEditCode>,
    Path((_sandbox, tid)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<TerminalAttachQuery>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws.map_err(|_| {
        ApiError::bad_request("websocket_required", "connect with a WebSocket upgrade")
    })?;
    check_id(&tid)?;
    let id = sb.id().to_string();
    let (agent, guard, _) = lifecycle::running_agent(&server, &sb).await?;
    // Registered under the read lock, so no suspend runs between this and the agent
    // connection; the lock goes once both exist (see the module docs).
    let live = server.previews.register(&id);
    let (_, attachment) = agent
        .terminal_attach(&tid, q.replay.unwrap_or(true))
        .await
        .map_err(terminal_failure)?;
    drop(guard);
    Ok(ws
        // A browser offers `sandpit.v1` next to its `bearer.<token>` (see `auth`); the
        // answer names `sandpit.v1` only, never the token.
        .protocols([crate::auth::WS_SUBPROTOCOL])
        .max_message_size(proto::MAX_FRAME_LEN)
        .max_frame_size(proto::MAX_FRAME_LEN)
        .on_upgrade(move |socket| relay(server, id, attachment, live, socket))
        .into_response())
}

/// Why an attachment ended.
enum End {
    /// The terminal's process exited.
    Exit(i32),
    /// The client closed or went away.
    ClientGone,
    /// The client sent something the WebSocket refused (a message too large).
    ClientError(String),
    /// The agent connection broke.
    AgentGone,
    /// A suspend, destroy or fork cut the sandbox's live connections.
    Cut,
}

/// Relay between the client's WebSocket and the agent's attachment until either ends or the
/// connection is cut. The agent connection is reset and the registration dropped before the
/// client hears how it ended, so a cut never waits on a slow client.
async fn relay(
    server: Arc<Server>,
    id: String,
    mut attachment: TerminalAttachment,
    live: ConnGuard,
    socket: WebSocket,
) {
    let cancel = live.cancel_token();
    let (sink, mut stream) = socket.split();
    // Both directions send: output from the agent, refusals of control messages.
    let sink = tokio::sync::Mutex::new(sink);
    let end = {
        let (mut reader, mut writer) = attachment.split();
        let to_client = async {
            loop {
                match reader.next().await {
                    Ok(TerminalEvent::Output(bytes) | TerminalEvent::Stderr(bytes)) => {
                        if sink
                            .lock()
                            .await
                            .send(Message::Binary(bytes.into()))
                            .await
                            .is_err()
                        {
                            return End::ClientGone;
                        }
                    }
                    Ok(TerminalEvent::Exit(status)) => return End::Exit(status.exit_code),
                    Err(e) => {
                        tracing::info!(sandbox = %id, error = ?e, "terminal attachment: agent connection ended");
                        return End::AgentGone;
                    }
                }
            }
        };
        let from_client = async {
            while let Some(msg) = stream.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => return End::ClientError(e.to_string()),
                };
                let sent = match msg {
                    Message::Binary(bytes) => {
                        server.previews.touch(&server.store, &id);
                        writer.input(&bytes).await
                    }
                    Message::Text(text) => match control(text.as_str()) {
                        Ok(size) => {
                            server.previews.touch(&server.store, &id);
                            writer.resize(size).await
                        }
                        Err(refusal) => {
                            let text = serde_json::to_string(&refusal).unwrap_or_default();
                            if sink
                                .lock()
                                .await
                                .send(Message::Text(text.into()))
                                .await
                                .is_err()
                            {
                                return End::ClientGone;
                            }
                            Ok(())
                        }
                    },
                    Message::Close(_) => return End::ClientGone,
                    Message::Ping(_) | Message::Pong(_) => Ok(()),
                };
                if sent.is_err() {
                    return End::AgentGone;
                }
            }
            End::ClientGone
        };
        tokio::select! {
            end = to_client => end,
            end = from_client => end,
            _ = cancel.cancelled() => End::Cut,
        }
    };
    // The agent connection resets here; then the cut (if any) may go on.
    drop(attachment);
    drop(live);
    let mut sink = sink.into_inner();
    let last: Vec<Message> = match end {
        End::Exit(exit_code) => vec![
            Message::Text(
                serde_json::to_string(&TerminalMessage::Exit { exit_code })
                    .unwrap_or_default()
                    .into(),
            ),
            close(close_code::NORMAL, "the terminal exited"),
        ],
        End::ClientGone => vec![],
        End::ClientError(e) if e.contains("too long") || e.contains("too big") => {
            vec![close(close_code::SIZE, "message larger than 1 MiB")]
        }
        End::ClientError(e) => {
            tracing::debug!(sandbox = %id, error = %e, "terminal attachment: bad WebSocket input");
            vec![close(close_code::PROTOCOL, "invalid WebSocket message")]
        }
        End::AgentGone => vec![close(
            close_code::ERROR,
            "the connection to the terminal broke; reconnect",
        )],
        End::Cut => vec![close(
            close_code::RESTART,
            "the sandbox is being suspended, forked or destroyed; reconnect to go on",
        )],
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        for m in last {
            if sink.send(m).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    })
    .await;
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// A control message from the client: a valid new size, or the refusal to send back.
fn control(text: &str) -> Result<proto::TerminalSize, TerminalMessage> {
    let refuse = |code: &str, message: String| TerminalMessage::Error {
        code: code.into(),
        message,
    };
    match serde_json::from_str::<TerminalMessage>(text) {
        Ok(TerminalMessage::Resize { cols, rows }) => {
            size(cols, rows).map_err(|e| refuse(e.code, e.message))
        }
        Ok(_) => Err(refuse(
            "invalid_message",
            "a client sends only {\"type\":\"resize\",\"cols\":..,\"rows\":..}".into(),
        )),
        Err(e) => Err(refuse(
            "invalid_message",
            format!("not a terminal control message: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_are_checked_before_anything() {
        let ok = agent_create(TerminalCreateRequest::default()).unwrap();
        assert_eq!((ok.cols, ok.rows, ok.argv, ok.shell), (80, 24, None, None));
        let bad = [
            (
                TerminalCreateRequest {
                    cols: Some(0),
                    ..Default::default()
                },
                "invalid_terminal_size",
            ),
            (
                TerminalCreateRequest {
                    rows: Some(99999),
                    ..Default::default()
                },
                "invalid_terminal_size",
            ),
            (
                TerminalCreateRequest {
                    id: Some("../x".into()),
                    ..Default::default()
                },
                "invalid_terminal_id",
            ),
            (
                TerminalCreateRequest {
                    command: Some("sh".into()),
                    argv: Some(vec!["sh".into()]),
                    ..Default::default()
                },
                "invalid_command",
            ),
            (
                TerminalCreateRequest {
                    argv: Some(vec![]),
                    ..Default::default()
                },
                "invalid_command",
            ),
            (
                TerminalCreateRequest {
                    cwd: Some("../etc".into()),
                    ..Default::default()
                },
                "invalid_path",
            ),
            (
                TerminalCreateRequest {
                    env: [("A=B".to_string(), "x".to_string())].into(),
                    ..Default::default()
                },
                "invalid_env",
            ),
        ];
        for (req, code) in bad {
            assert_eq!(agent_create(req.clone()).unwrap_err().code, code, "{req:?}");
        }
    }

    /// Over the fakes (no root): an attachment streams both ways and holds no lock, so a
    /// suspend goes through while it is open, cutting it with 1012; the sandbox then wakes
    /// for the next attach.
    #[tokio::test]
    async fn an_attachment_never_holds_off_a_suspend() {
        use tokio_tungstenite::tungstenite::{Message as WsMessage, client::IntoClientRequest};

        let h = crate::tests::Harness::new(|_| {}).await;
        let row = h
            .create(sandpit_api_types::SandboxMode::Persistent)
            .await
            .unwrap();
        let (addr, serving) = h.serve().await;
        let http = reqwest::Client::new();
        let base = format!("http://{addr}/v1/sandboxes/{}", row.id);
        let made = http
            .post(format!("{base}/terminals"))
            .bearer_auth(crate::tests::TOKEN)
            .json(&serde_json::json!({"id": "t1"}))
            .send()
            .await
            .unwrap();
        assert_eq!(made.status().as_u16(), 201);
        let attach = || async {
            let mut req = format!("ws://{addr}/v1/sandboxes/{}/terminals/t1/attach", row.id)
                .into_client_request()
                .unwrap();
            req.headers_mut().insert(
                "authorization",
                format!("Bearer {}", crate::tests::TOKEN).parse().unwrap(),
            );
            tokio_tungstenite::connect_async(req)
                .await
                .map(|(ws, _)| ws)
        };
        let mut ws = attach().await.unwrap();
        ws.send(WsMessage::Binary(b"hello".to_vec().into()))
            .await
            .unwrap();
        // The fake terminal echoes what is typed.
        match ws.next().await {
            Some(Ok(WsMessage::Binary(b))) => assert_eq!(&b[..], b"hello"),
            other => panic!("{other:?}"),
        }

        // The suspend runs with the attachment open and cuts it.
        let suspended = tokio::time::timeout(
            Duration::from_secs(10),
            crate::lifecycle::suspend(&h.server, &row.id),
        )
        .await
        .expect("the suspend is not held off by the attachment")
        .unwrap();
        assert_eq!(suspended.status, sandpit_control::Status::Suspended);
        let code = loop {
            match ws.next().await {
                Some(Ok(WsMessage::Close(f))) => break f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(code, Some(close_code::RESTART));

        // The next attach wakes the sandbox (the fake agent of the restored sandbox has no
        // terminals: a 404 from a running sandbox).
        match attach().await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 404)
            }
            other => panic!("{:?}", other.map(drop)),
        }
        assert_eq!(
            h.row(&row.id).await.status,
            sandpit_control::Status::Running
        );
        serving.abort();
    }

    /// A browser cannot set `Authorization` on a WebSocket: the web console offers its token
    /// as the `bearer.<token>` subprotocol next to `sandpit.v1`, and the answer names only
    /// `sandpit.v1`. A wrong token there is a 401 like any other.
    #[tokio::test]
    async fn a_browser_attaches_with_its_token_as_a_subprotocol() {
        use tokio_tungstenite::tungstenite::{Message as WsMessage, client::IntoClientRequest};

        let h = crate::tests::Harness::new(|_| {}).await;
        let row = h
            .create(sandpit_api_types::SandboxMode::Ephemeral)
            .await
            .unwrap();
        let (addr, serving) = h.serve().await;
        let made = reqwest::Client::new()
            .post(format!("http://{addr}/v1/sandboxes/{}/terminals", row.id))
            .bearer_auth(crate::tests::TOKEN)
            .json(&serde_json::json!({"id": "t1"}))
            .send()
            .await
            .unwrap();
        assert_eq!(made.status().as_u16(), 201);
        let url = format!("ws://{addr}/v1/sandboxes/{}/terminals/t1/attach", row.id);
        let attach = |protocols: String| {
            let mut req = url.as_str().into_client_request().unwrap();
            req.headers_mut()
                .insert("sec-websocket-protocol", protocols.parse().unwrap());
            tokio_tungstenite::connect_async(req)
        };

        let (mut ws, resp) = attach(format!("sandpit.v1, bearer.{}", crate::tests::TOKEN))
            .await
            .unwrap();
        assert_eq!(resp.headers()["sec-websocket-protocol"], "sandpit.v1");
        ws.send(WsMessage::Binary(b"typed".to_vec().into()))
            .await
            .unwrap();
        match ws.next().await {
            Some(Ok(WsMessage::Binary(b))) => assert_eq!(&b[..], b"typed"),
            other => panic!("{other:?}"),
        }
        drop(ws);

        for protocols in ["sandpit.v1, bearer.sp_not_a_token", "sandpit.v1, bearer."] {
            match attach(protocols.to_string()).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                    assert_eq!(resp.status().as_u16(), 401, "{protocols}")
                }
                other => panic!("{protocols}: {:?}", other.map(drop)),
            }
        }
        serving.abort();
    }

    #[test]
    fn control_messages_are_checked() {
        assert_eq!(
            control(r#"{"type":"resize","cols":120,"rows":40}"#).unwrap(),
            proto::TerminalSize {
                cols: 120,
                rows: 40
            }
        );
        for (text, code) in [
            (
                r#"{"type":"resize","cols":0,"rows":40}"#,
                "invalid_terminal_size",
            ),
            (
                r#"{"type":"resize","cols":99999,"rows":40}"#,
                "invalid_terminal_size",
            ),
            (r#"{"type":"exit","exit_code":1}"#, "invalid_message"),
            ("not json", "invalid_message"),
        ] {
            match control(text) {
                Err(TerminalMessage::Error { code: c, .. }) => assert_eq!(c, code, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
