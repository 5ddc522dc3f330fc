//! `/v1/sandboxes`: create, list, get, destroy, keepalive, wake, hibernate, exec.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sandpit_agent_proto as proto;
use sandpit_api_types::{
    CreateSandboxRequest, DEFAULT_EXEC_TIMEOUT_SECS, EgressPolicy, ErrorBody, ExecEvent,
    ExecRequest, ExecResponse, ForkRequest, ForkResponse, KeepaliveRequest, ListQuery,
    MAX_EXEC_TIMEOUT_SECS, Sandbox, SandboxList, SandboxStatus, Snapshot, SnapshotList,
    UpdateSandboxRequest, parse_duration,
};
use tokio::sync::mpsc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiJson, ApiQuery, OptionalJson};
use crate::auth::Auth;
use crate::error::{ApiError, ControlError};
use crate::extract::{OwnedSandbox, scope};
use crate::idempotency;
use crate::lifecycle::{self, to_api};
use crate::server::Server;
use sandpit_control::agent::{AgentFailure, ExecOutput};

/// Most output kept per stream by the non-streaming exec; the rest is dropped and noted.
const MAX_CAPTURE: usize = 16 << 20;

pub fn router() -> OpenApiRouter<Arc<Server>> {
    OpenApiRouter::new()
        .routes(routes!(create_sandbox, list_sandboxes))
        .routes(routes!(get_sandbox, destroy_sandbox, update_sandbox))
        .routes(routes!(keepalive))
        .routes(routes!(set_egress))
        .routes(routes!(wake))
        .routes(routes!(hibernate))
        .routes(routes!(shutdown))
        .routes(routes!(exec))
        .routes(routes!(exec_stream))
        .routes(routes!(fork))
        .routes(routes!(create_snapshot, list_snapshots))
        .routes(routes!(delete_snapshot))
}

/// Create a sandbox and wait until it runs. With an `Idempotency-Key` header, a repeat of
/// the same request replays the first response instead of creating another sandbox.
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes",
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$", description = "Makes the request safe to retry: a repeat with the same key and body replays the first response (1-255 visible ASCII characters, kept 24 h)")),
    request_body = CreateSandboxRequest,
    responses(
        (status = 201, description = "Sandbox created and running", body = Sandbox, headers(("Server-Timing" = String, description = "Where the time went: `phase;dur=ms` per phase, then `total` (milliseconds; see the README, Timings)"))),
        (status = 400, description = "Invalid mode, size, timeout, egress policy or Idempotency-Key", body = ErrorBody),
        (status = 404, description = "Template, snapshot or volume not found", body = ErrorBody),
        (status = 409, description = "A request with this Idempotency-Key is still running, a volume is mounted read-write by another live sandbox (`volume_busy`) or is on another node (`volume_on_another_node`)", body = ErrorBody),
        (status = 422, description = "This Idempotency-Key was used with a different request", body = ErrorBody),
        (status = 429, description = "Rate limit or running-sandbox quota reached (see Retry-After)", body = ErrorBody),
        (status = 500, description = "A stored record the sandbox needs (the snapshot's or template's policy, environment or spec) does not decode (`corrupt_record`); nothing was made", body = ErrorBody),
        (status = 503, description = "No network slot is free (`capacity_exhausted`), or the node is draining (`node_draining`)", body = ErrorBody),
        (status = 507, description = "The host's data filesystem is below its free-space reserve (`host_disk_full`), or a persistent sandbox would pass the workspace's max_suspended (`quota_exceeded`); nothing was made", body = ErrorBody),
    ))]
async fn create_sandbox(
    State(server): State<Arc<Server>>,
    auth: Auth,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CreateSandboxRequest>,
) -> Result<Response, ApiError> {
    auth.require("sandbox_create")?;
    let key = idempotency::key_of(&headers)?;
    let hash = idempotency::request_hash("create", &req);
    let (s, a) = (server.clone(), auth.clone());
    idempotency::once(&server, &auth, key, hash, async move {
        let row = lifecycle::server_timed(lifecycle::create(&s, &a.workspace_id, &req)).await?;
        Ok((
            StatusCode::CREATED,
            serde_json::to_value(to_api(&row)).expect("serializes"),
        ))
    })
    .await
}

/// List the workspace's sandboxes: every one not destroyed, or those with `status`.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    params(ListQuery),
    responses(
        (status = 200, description = "The sandboxes", body = SandboxList),
        (status = 400, description = "Unknown status", body = ErrorBody),
    ))]
async fn list_sandboxes(
    State(server): State<Arc<Server>>,
    auth: Auth,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<SandboxList>, ApiError> {
    auth.require("sandbox_read")?;
    let status = match q.status.as_deref().map(|s| (s, SandboxStatus::parse(s))) {
        None => None,
        Some((_, Some(s))) => Some(s.into()),
        Some((s, None)) => {
            return Err(ApiError::bad_request(
                "invalid_status",
                format!(
                    "status must be creating, running, suspended, destroyed or failed, not {s:?}"
                ),
            ));
        }
    };
    let rows = server
        .store
        .sandboxes
        .list(&auth.workspace_id, status)
        .await?;
    Ok(Json(SandboxList {
        sandboxes: rows.iter().map(to_api).collect(),
    }))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "The sandbox", body = Sandbox),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
    ))]
async fn get_sandbox(sb: OwnedSandbox<scope::SandboxRead>) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(to_api(sb.row())))
}

/// Change a sandbox's settings: its preview privacy (`{"preview":{"privacy":"public"}}`)
/// and its size (`{"size":"large"}`: a running sandbox gets the new CPU and memory limits
/// at once and its disk grown; a disk never shrinks). Omitted fields stay as they are; the
/// size changes first, so a refused resize changes nothing.
#[utoipa::path(patch, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = UpdateSandboxRequest,
    responses(
        (status = 200, description = "The updated sandbox", body = Sandbox),
        (status = 400, description = "Invalid settings", body = ErrorBody),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
        (status = 409, description = "Sandbox destroyed or failed; resize refused (resize_refused: less memory than it uses; host_lacks_memory)", body = ErrorBody),
        (status = 507, description = "Growing the disk would pass the host's disk reserve", body = ErrorBody),
    ))]
async fn update_sandbox(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::VmManage>,
    ApiJson(req): ApiJson<UpdateSandboxRequest>,
) -> Result<Json<Sandbox>, ApiError> {
    let mut row = None;
    if let Some(size) = &req.size {
        row = Some(lifecycle::resize(&server, &sb, size).await?);
    }
    if let Some(preview) = req.preview {
        row = Some(lifecycle::set_preview(&server, &sb, preview).await?);
    }
    let row = match row {
        Some(row) => row,
        None => lifecycle::current(&server, &sb).await?,
    };
    Ok(Json(to_api(&row)))
}

/// Destroy a sandbox and everything it holds. Idempotent.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 204, description = "Destroyed (or already was)"),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
    ))]
async fn destroy_sandbox(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::VmManage>,
) -> Result<StatusCode, ApiError> {
    lifecycle::destroy(&server, sb.id()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Extend the expiry of a running ephemeral sandbox.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/keepalive", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = KeepaliveRequest,
    responses(
        (status = 200, description = "Timeout extended", body = Sandbox),
        (status = 400, description = "Invalid timeout", body = ErrorBody),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
        (status = 409, description = "Not ephemeral, or not running", body = ErrorBody),
    ))]
async fn keepalive(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::VmManage>,
    ApiJson(req): ApiJson<KeepaliveRequest>,
) -> Result<Json<Sandbox>, ApiError> {
    let row = lifecycle::keepalive(&server, &sb, &req.timeout).await?;
    Ok(Json(to_api(&row)))
}

/// Replace the egress policy. A running sandbox gets it at once, without restart (open
/// connections included: their next packet meets the new rules); a suspended one on wake.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/egress", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = EgressPolicy,
    responses(
        (status = 200, description = "Policy stored (and applied if the sandbox runs)", body = Sandbox),
        (status = 400, description = "Invalid egress policy", body = ErrorBody),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
        (status = 409, description = "Sandbox is destroyed or failed", body = ErrorBody),
    ))]
async fn set_egress(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::VmManage>,
    ApiJson(policy): ApiJson<EgressPolicy>,
) -> Result<Json<Sandbox>, ApiError> {
    let row = lifecycle::set_egress(&server, &sb, &policy).await?;
    Ok(Json(to_api(&row)))
}

/// Wake a suspended sandbox (200 if it already runs).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/wake", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Sandbox woken (or was already running)", body = Sandbox, headers(("Server-Timing" = String, description = "Where the time went: `phase;dur=ms` per phase, then `total` (milliseconds; see the README, Timings)"))),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
        (status = 409, description = "Sandbox is in a state that cannot be woken", body = ErrorBody),
        (status = 429, description = "The workspace runs as many sandboxes as it may (`running_quota_exceeded`, with Retry-After)", body = ErrorBody),
        (status = 503, description = "No network slot is free (`capacity_exhausted`); the sandbox stays suspended", body = ErrorBody),
    ))]
async fn wake(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::VmManage>,
) -> Result<Json<Sandbox>, ApiError> {
    let row = lifecycle::server_timed(lifecycle::wake(&server, sb.id())).await?;
    Ok(Json(to_api(&row)))
}

/// Save memory and processes to disk and stop (status `suspended`).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/hibernate", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Sandbox suspended (or already was)", body = Sandbox, headers(("Server-Timing" = String, description = "Where the time went: `phase;dur=ms` per phase, then `total` (milliseconds; see the README, Timings)"))),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
        (status = 409, description = "Sandbox is in a state that cannot be suspended", body = ErrorBody),
        (status = 507, description = "The workspace keeps as many suspended sandboxes as it may (`quota_exceeded`, max_suspended)", body = ErrorBody),
    ))]
async fn hibernate(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::VmManage>,
) -> Result<Json<Sandbox>, ApiError> {
    lifecycle::check_may_suspend(&server, &sb).await?;
    let row = lifecycle::server_timed(lifecycle::suspend(&server, sb.id())).await?;
    Ok(Json(to_api(&row)))
}

/// Stop without saving memory (status `suspended`); the next wake boots afresh with the
/// sandbox's files.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/shutdown", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Sandbox stopped, files kept", body = Sandbox, headers(("Server-Timing" = String, description = "Where the time went: `phase;dur=ms` per phase, then `total` (milliseconds; see the README, Timings)"))),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
        (status = 409, description = "Sandbox is destroyed, failed or still being created", body = ErrorBody),
        (status = 507, description = "The workspace keeps as many suspended sandboxes as it may (`quota_exceeded`, max_suspended)", body = ErrorBody),
    ))]
async fn shutdown(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::VmManage>,
) -> Result<Json<Sandbox>, ApiError> {
    lifecycle::check_may_suspend(&server, &sb).await?;
    let row = lifecycle::server_timed(lifecycle::shutdown(&server, sb.id())).await?;
    Ok(Json(to_api(&row)))
}

/// Check an exec request and turn it into the agent's.
fn agent_exec(req: ExecRequest) -> Result<(proto::ExecRequest, Duration), ApiError> {
    let timeout = match &req.timeout {
        Some(t) => parse_duration(t).map_err(|m| ApiError::bad_request("invalid_timeout", m))?,
        None => Duration::from_secs(DEFAULT_EXEC_TIMEOUT_SECS),
    };
    if timeout.is_zero() || timeout > Duration::from_secs(MAX_EXEC_TIMEOUT_SECS) {
        return Err(ApiError::bad_request(
            "invalid_timeout",
            "timeout must be between 1ms and 5m",
        ));
    }
    let (shell, argv) = match (req.command, req.argv) {
        (Some(c), None) if !c.trim().is_empty() => (Some(c), None),
        (None, Some(a)) if !a.is_empty() && !a[0].is_empty() => (None, Some(a)),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_command",
                "give either command or argv, not both",
            ));
        }
        _ => {
            return Err(ApiError::bad_request(
                "missing_command",
                "command (or argv) is required",
            ));
        }
    };
    if let Some(cwd) = &req.cwd {
        proto::normalize_path(cwd).map_err(|e| ApiError::bad_request("invalid_path", e.message))?;
    }
    if req
        .env
        .keys()
        .any(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        return Err(ApiError::bad_request(
            "invalid_env",
            "environment variable names must be non-empty and contain no '=' or NUL",
        ));
    }
    if let Some(user) = &req.user {
        proto::check_user_spec(user).map_err(|m| ApiError::bad_request("invalid_user", m))?;
    }
    Ok((
        proto::ExecRequest {
            argv,
            shell,
            cwd: req.cwd,
            env: req
                .env
                .into_iter()
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .collect(),
            timeout_ms: Some(timeout.as_millis() as u64),
            stdin: false,
            user: req.user,
        },
        timeout,
    ))
}

fn destroyed_during_exec() -> ApiError {
    ApiError::conflict(
        "sandbox_destroyed",
        "the sandbox was destroyed while the command ran",
    )
}

/// Map an agent failure to what the client sees.
pub fn agent_failure(f: AgentFailure) -> ApiError {
    match f {
        AgentFailure::Broken(e) => e.into(),
        AgentFailure::TooLarge { limit } => ApiError::bad_request(
            "file_too_large",
            format!("file exceeds the upload limit of {limit} bytes"),
        ),
        AgentFailure::Body(m) => ApiError::bad_request(
            "invalid_body",
            format!("reading the request body failed: {m}"),
        ),
        AgentFailure::Refused(e) => {
            use proto::AgentErrorCode as C;
            let (status, code) = match e.code {
                C::NotFound => (StatusCode::NOT_FOUND, "file_not_found"),
                C::IsDirectory => (StatusCode::BAD_REQUEST, "is_directory"),
                C::NotDirectory => (StatusCode::BAD_REQUEST, "not_directory"),
                C::InvalidPath => (StatusCode::BAD_REQUEST, "invalid_path"),
                C::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
                C::AlreadyExists => (StatusCode::CONFLICT, "already_exists"),
                C::NotEmpty => (StatusCode::CONFLICT, "not_empty"),
                C::SpawnFailed => (StatusCode::BAD_REQUEST, "spawn_failed"),
                C::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
                C::NoSpace => (StatusCode::INSUFFICIENT_STORAGE, "disk_full"),
                C::NotRegularFile => (StatusCode::BAD_REQUEST, "not_regular_file"),
                C::TooManyTerminals => (StatusCode::CONFLICT, "too_many_terminals"),
                C::TooManyWatches => (StatusCode::CONFLICT, "too_many_watches"),
                C::UserNotFound => (StatusCode::BAD_REQUEST, "user_not_found"),
                // Only a newer operation or field gets this (users, for one).
                C::UnsupportedVersion => (StatusCode::NOT_IMPLEMENTED, "agent_too_old"),
                C::Io => (StatusCode::INTERNAL_SERVER_ERROR, "agent_error"),
            };
            ApiError::new(status, code, e.message)
        }
    }
}

/// Run a command to completion and return its output.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = ExecRequest,
    responses(
        (status = 200, description = "Command completed (check exit_code)", body = ExecResponse),
        (status = 400, description = "Missing command, invalid timeout, invalid_user or user_not_found", body = ErrorBody),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
        (status = 409, description = "Sandbox not running", body = ErrorBody),
    ))]
async fn exec(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::SandboxEditCode>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<Json<ExecResponse>, ApiError> {
    let id = sb.id().to_string();
    let (mut req, timeout) = agent_exec(req)?;
    let (agent, guard, row) = lifecycle::running_agent(&server, &sb).await?;
    req.env = lifecycle::exec_env(&row, std::mem::take(&mut req.env))?;
    if req.cwd.is_none() {
        req.cwd = sandpit_control::node::images::default_cwd(&server, &row).await;
    }
    if req.user.is_none() {
        req.user = sandpit_control::node::images::default_user(&server, &row).await?;
    }
    let (tx, mut rx) = mpsc::channel(64);
    let collect = async {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(item) = rx.recv().await {
            let (buf, data) = match item {
                ExecOutput::Stdout(d) => (&mut stdout, d),
                ExecOutput::Stderr(d) => (&mut stderr, d),
                ExecOutput::Started(_) => continue,
            };
            let room = MAX_CAPTURE.saturating_sub(buf.len());
            buf.extend_from_slice(&data[..data.len().min(room)]);
        }
        (stdout, stderr)
    };
    let cancel = server.cancel_of(&id);
    let t0 = std::time::Instant::now();
    let run = async {
        tokio::select! {
            r = tokio::time::timeout(timeout + Duration::from_secs(10), agent.exec(req, tx)) => Some(r),
            // Dropping the exec resets the connection: the agent kills the command.
            _ = cancel.cancelled() => None,
        }
    };
    let (result, (stdout, stderr)) = tokio::join!(run, collect);
    let ran: Result<(), ()> = match &result {
        Some(Ok(Ok(_))) => Ok(()),
        _ => Err(()),
    };
    server.metrics.observe("exec", "", t0, &ran);
    // Cancelled by the liveness watch (the sandbox died) or by a destroy.
    let died = server.died(&id);
    drop(guard);
    let Some(result) = result else {
        if died {
            // Answer once the sandbox is settled, so the client's next look agrees.
            return Err(lifecycle::settle_if_dead(&server, &id)
                .await
                .unwrap_or_else(lifecycle::stopped_error));
        }
        return Err(destroyed_during_exec());
    };
    let status = match result {
        Ok(Ok(status)) => status,
        Ok(Err(AgentFailure::Refused(e))) => return Err(agent_failure(AgentFailure::Refused(e))),
        // The agent is gone or silent: maybe the whole sandbox died (memory or process
        // limit); if so, say so and settle it.
        broken => {
            if let Some(e) = lifecycle::settle_if_dead(&server, &id).await {
                return Err(e);
            }
            broken
                .map_err(|_| ControlError::AgentTimeout {
                    sandbox: id.clone(),
                    secs: timeout.as_secs() + 10,
                    last: "the command's output did not end after its timeout".into(),
                })?
                .map_err(agent_failure)?
        }
    };
    server
        .store
        .sandboxes
        .touch(&id, crate::util::now_ms())
        .await?;
    Ok(Json(ExecResponse {
        exit_code: status.exit_code,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        duration_ms: status.duration_ms,
        timed_out: status.timed_out,
    }))
}

/// An exec output chunk as a stream event; `seq` numbers stdout and stderr together.
fn output_event(item: ExecOutput, seq: &mut u64) -> ExecEvent {
    let b64 = base64::engine::general_purpose::STANDARD;
    match item {
        ExecOutput::Started(pid) => ExecEvent::Started { pid },
        ExecOutput::Stdout(d) => {
            *seq += 1;
            ExecEvent::Stdout {
                seq: *seq,
                data: b64.encode(d),
            }
        }
        ExecOutput::Stderr(d) => {
            *seq += 1;
            ExecEvent::Stderr {
                seq: *seq,
                data: b64.encode(d),
            }
        }
    }
}

/// The SSE frame of an event; its event name equals its `type`.
fn sse(ev: ExecEvent) -> Event {
    let name = match &ev {
        ExecEvent::Started { .. } => "started",
        ExecEvent::Stdout { .. } => "stdout",
        ExecEvent::Stderr { .. } => "stderr",
        ExecEvent::Exit { .. } => "exit",
        ExecEvent::Error { .. } => "error",
    };
    Event::default()
        .event(name)
        .json_data(&ev)
        .expect("event serializes")
}

/// Run a command and stream its output as Server-Sent Events (`started`, `stdout`,
/// `stderr`, `exit` or `error`). Closing the stream kills the command.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec/stream", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = ExecRequest,
    responses(
        (status = 200, description = "An event stream of ExecEvent objects", body = ExecEvent, content_type = "text/event-stream"),
        (status = 400, description = "Missing command, invalid timeout, invalid_user or user_not_found", body = ErrorBody),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
        (status = 409, description = "Sandbox not running", body = ErrorBody),
    ))]
async fn exec_stream(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::SandboxEditCode>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let id = sb.id().to_string();
    let (mut req, timeout) = agent_exec(req)?;
    let (agent, guard, row) = lifecycle::running_agent(&server, &sb).await?;
    req.env = lifecycle::exec_env(&row, std::mem::take(&mut req.env))?;
    if req.cwd.is_none() {
        req.cwd = sandpit_control::node::images::default_cwd(&server, &row).await;
    }
    if req.user.is_none() {
        req.user = sandpit_control::node::images::default_user(&server, &row).await?;
    }
    let (events_tx, events_rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let cancel = server.cancel_of(&id);
    tokio::spawn(async move {
        let _guard = guard; // the read lock lives as long as the command
        let (tx, mut rx) = mpsc::channel(64);
        let run = tokio::time::timeout(timeout + Duration::from_secs(10), agent.exec(req, tx));
        tokio::pin!(run);
        let mut seq = 0u64;
        let finished = loop {
            tokio::select! {
                out = &mut run => break out,
                _ = cancel.cancelled() => {
                    let e = if server.died(&id) {
                        drop(_guard);
                        lifecycle::settle_if_dead(&server, &id)
                            .await
                            .unwrap_or_else(lifecycle::stopped_error)
                    } else {
                        destroyed_during_exec()
                    };
                    let _ = events_tx.send(Ok(sse(ExecEvent::Error { code: e.code.into(), message: e.message }))).await;
                    return; // dropping `run` resets the connection; the agent kills the command
                }
                Some(item) = rx.recv() => {
                    if events_tx.send(Ok(sse(output_event(item, &mut seq)))).await.is_err() {
                        return; // client gone: dropping `run` resets the connection; the agent kills the command
                    }
                }
            }
        };
        // Output that arrived just before the exit frame.
        while let Ok(item) = rx.try_recv() {
            let _ = events_tx.send(Ok(sse(output_event(item, &mut seq)))).await;
        }
        drop(_guard);
        let dead = match &finished {
            Ok(Ok(_)) | Ok(Err(AgentFailure::Refused(_))) => None,
            _ => lifecycle::settle_if_dead(&server, &id).await,
        };
        let last = match finished {
            _ if dead.is_some() => {
                let e = dead.expect("checked");
                ExecEvent::Error {
                    code: e.code.into(),
                    message: e.message,
                }
            }
            Ok(Ok(s)) => ExecEvent::Exit {
                exit_code: s.exit_code,
                duration_ms: s.duration_ms,
                timed_out: s.timed_out,
            },
            Ok(Err(f)) => {
                let e = agent_failure(f);
                ExecEvent::Error {
                    code: e.code.into(),
                    message: e.message,
                }
            }
            Err(_) => ExecEvent::Error {
                code: "agent_unreachable".into(),
                message: "the agent stopped answering".into(),
            },
        };
        let _ = events_tx.send(Ok(sse(last))).await;
    });
    Ok(
        Sse::new(tokio_stream::wrappers::ReceiverStream::new(events_rx))
            .keep_alive(KeepAlive::default()),
    )
}

/// Fork a running or suspended sandbox into `count` children with its files, memory and
/// settings. The parent keeps running (it pauses briefly while its memory is saved). With an
/// `Idempotency-Key` header, a repeat of the same request replays the first response.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", tag = "sandboxes",
    params(("id" = String, Path, description = "Parent sandbox id"), ("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$", description = "Makes the request safe to retry: a repeat with the same key and body replays the first response (1-255 visible ASCII characters, kept 24 h)")),
    request_body = Option<ForkRequest>,
    responses(
        (status = 201, description = "One result per child: a sandbox or an error", body = ForkResponse, headers(("Server-Timing" = String, description = "Where the time went: `phase;dur=ms` per phase, then `total` (milliseconds; see the README, Timings)"))),
        (status = 400, description = "Invalid count or Idempotency-Key", body = ErrorBody),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
        (status = 409, description = "The parent cannot be copied in its state, or a request with this Idempotency-Key is still running", body = ErrorBody),
        (status = 422, description = "This Idempotency-Key was used with a different request", body = ErrorBody),
        (status = 429, description = "Rate limit or running-sandbox quota reached (see Retry-After)", body = ErrorBody),
        (status = 503, description = "The node is draining (`node_draining`); nothing was made", body = ErrorBody),
        (status = 507, description = "The host's data filesystem is below its free-space reserve (`host_disk_full`), or the workspace keeps as many suspended sandboxes as it may (`quota_exceeded`, max_suspended); nothing was made", body = ErrorBody),
    ))]
async fn fork(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::SandboxCreate>,
    headers: HeaderMap,
    OptionalJson(req): OptionalJson<ForkRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency::key_of(&headers)?;
    let hash = idempotency::request_hash(&format!("fork {}", sb.id()), &req);
    let (s, owned) = (server.clone(), sb.clone());
    idempotency::once(&server, sb.auth(), key, hash, async move {
        let results =
            lifecycle::server_timed(crate::fork::fork(&s, &owned, req.count.unwrap_or(1))).await?;
        let body = ForkResponse { sandboxes: results };
        Ok((
            StatusCode::CREATED,
            serde_json::to_value(body).expect("serializes"),
        ))
    })
    .await
}

/// Save the sandbox's files and memory as a named snapshot; create sandboxes from it with
/// `{"snapshot": id}`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/snapshots", tag = "snapshots",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 201, description = "Snapshot taken", body = Snapshot),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
        (status = 409, description = "The sandbox cannot be copied in its state", body = ErrorBody),
        (status = 507, description = "The host's data filesystem is below its free-space reserve (`host_disk_full`), or the workspace keeps as many snapshots as it may (`quota_exceeded`, max_snapshots); nothing was made", body = ErrorBody),
    ))]
async fn create_snapshot(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::VmManage>,
) -> Result<(StatusCode, Json<Snapshot>), ApiError> {
    let snap = crate::fork::take_snapshot(&server, &sb).await?;
    Ok((
        StatusCode::CREATED,
        Json(crate::fork::snapshot_to_api(&snap)),
    ))
}

/// The sandbox's snapshots, oldest first.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/snapshots", tag = "snapshots",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Snapshots with their disk use", body = SnapshotList),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
    ))]
async fn list_snapshots(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::SandboxRead>,
) -> Result<Json<SnapshotList>, ApiError> {
    let rows = server
        .store
        .snapshots
        .list(sb.workspace_id(), sb.id())
        .await?;
    Ok(Json(SnapshotList {
        snapshots: rows.iter().map(crate::fork::snapshot_to_api).collect(),
    }))
}

/// Delete a snapshot and its files.
#[utoipa::path(delete, path = "/v1/snapshots/{id}", tag = "snapshots",
    params(("id" = String, Path, description = "Snapshot id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "Snapshot not found", body = ErrorBody),
    ))]
async fn delete_snapshot(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require("vm_manage")?;
    crate::fork::delete_snapshot(&server, &auth.workspace_id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
