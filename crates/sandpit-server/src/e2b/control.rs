//! The E2B control API (`api.e2b.app` in the hosted service): create, list, get, kill,
//! set timeout, pause and connect/resume, mapped onto Sandpit's lifecycle
//! ([`crate::lifecycle`]). A sandbox created here is ephemeral: E2B's `timeout` is its
//! expiry, extended by set-timeout and connect.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use sandpit_control::Status;

use super::store::E2bTables;
use super::{CLIENT_ID, E2bError, ENVD_VERSION};
use crate::auth::{Auth, generate_token_with, hash_token};
use crate::error::ApiError;
use crate::extract::Authorized;
use crate::lifecycle;
use crate::server::Server;
use crate::store::Sandbox;
use crate::util::{now_ms, rfc3339};

type E2bResult = Result<Response, E2bError>;

/// envd access tokens start with this.
pub const ENVD_TOKEN_PREFIX: &str = "spe_";
/// E2B's default sandbox timeout, in seconds.
pub const DEFAULT_TIMEOUT_SECS: i64 = 300;
/// Longest timeout (Sandpit's longest ephemeral timeout).
pub const MAX_TIMEOUT_SECS: i64 = 24 * 3600;
/// How long a paused sandbox is kept waiting for a resume (E2B keeps paused sandboxes 30 days).
pub const PAUSED_KEPT: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

pub fn router() -> Router<Arc<Server>> {
    Router::new()
        .route("/v2/sandboxes", get(list_sandboxes).post(create_sandbox))
        .route("/sandboxes", post(create_sandbox))
        .route("/sandboxes/{id}", get(get_sandbox).delete(kill_sandbox))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/pause", post(pause_sandbox))
        .route("/sandboxes/{id}/resume", post(resume_sandbox))
        .route("/sandboxes/{id}/connect", post(connect_sandbox))
        .route("/v2/sandboxes/{id}/connect", post(connect_sandbox))
}

/// The caller, from `X-API-KEY` (or `Authorization: Bearer`), with errors in E2B's shape.
pub struct E2bAuth(pub Auth);

impl FromRequestParts<Arc<Server>> for E2bAuth {
    type Rejection = E2bError;

    async fn from_request_parts(parts: &mut Parts, server: &Arc<Server>) -> Result<Self, E2bError> {
        Ok(E2bAuth(Auth::from_request_parts(parts, server).await?))
    }
}

/// The `domain` the SDKs derive a sandbox's hosts from (see [`super::host::sandbox_domain`]).
pub struct SandboxDomain(pub String);

impl FromRequestParts<Arc<Server>> for SandboxDomain {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        server: &Arc<Server>,
    ) -> Result<Self, std::convert::Infallible> {
        let host = super::host::request_host(&parts.uri, &parts.headers);
        Ok(SandboxDomain(super::host::sandbox_domain(
            &server.cfg.preview_domain,
            host.as_deref(),
        )))
    }
}

/// The caller's sandbox (scope first, then 404 for an unknown, destroyed or another
/// workspace's sandbox).
async fn own(server: &Server, auth: &Auth, scope: &str, id: &str) -> Result<Authorized, E2bError> {
    auth.require(scope)?;
    if !valid_id(id) {
        return Err(not_found(id).into());
    }
    Ok(Authorized::load_csb(server, auth, id).await?)
}

/// Sandbox ids are `sb` + hex: anything else is not looked up.
pub fn valid_id(id: &str) -> bool {
    id.len() > 2
        && id.len() <= 64
        && id.starts_with("sb")
        && id[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn not_found(id: &str) -> ApiError {
    let shown: String = id.chars().take(64).collect();
    ApiError::not_found("sandbox_not_found", format!("sandbox {shown:?} not found"))
}

fn parse_body<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    if body.len() > crate::extract::MAX_JSON_BODY {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the body exceeds 1 MiB",
        ));
    }
    crate::extract::parse_json(body)
}

fn check_timeout(secs: i64) -> Result<i64, ApiError> {
    if !(1..=MAX_TIMEOUT_SECS).contains(&secs) {
        return Err(ApiError::bad_request(
            "invalid_timeout",
            format!("timeout must be between 1 and {MAX_TIMEOUT_SECS} seconds"),
        ));
    }
    Ok(secs)
}

/// A new envd access token for the sandbox, if the caller may run code in it.
async fn mint_envd_token(
    server: &Server,
    auth: &Auth,
    sandbox_id: &str,
) -> Result<Option<String>, ApiError> {
    if !auth.scopes.iter().any(|s| s == "sandbox_edit_code") {
        return Ok(None);
    }
    let token = generate_token_with(ENVD_TOKEN_PREFIX);
    server
        .store
        .e2b()
        .insert_token(sandbox_id, &hash_token(&token), now_ms())
        .await?;
    Ok(Some(token))
}

async fn template_id(server: &Server, row: &Sandbox) -> Result<String, ApiError> {
    Ok(server
        .store
        .e2b()
        .template_of(&row.workspace_id, &row.id)
        .await?
        .unwrap_or_else(|| row.template_name.clone()))
}

/// The `Sandbox` answer of create and connect.
async fn created_view(
    server: &Server,
    auth: &Auth,
    row: &Sandbox,
    token: Option<String>,
    domain: &str,
) -> Result<Value, ApiError> {
    Ok(json!({
        "sandboxID": row.id,
        "templateID": template_id(server, row).await?,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": token,
        "domain": domain,
        "alias": null,
        "workspace": auth.workspace_id,
    }))
}

fn state_of(status: Status) -> Option<&'static str> {
    match status {
        Status::Creating | Status::Running => Some("running"),
        Status::Suspended => Some("paused"),
        _ => None,
    }
}

/// A sandbox as `GET /v2/sandboxes` and `GET /sandboxes/{id}` show it.
fn listed_view(row: &Sandbox, template: &str) -> Result<Value, ApiError> {
    let metadata: BTreeMap<String, String> =
        row.metadata.decode(|| format!("metadata of {}", row.id))?;
    let res = lifecycle::size_resources(&row.size);
    let started = rfc3339(row.created_at);
    Ok(json!({
        "templateID": template,
        "sandboxID": row.id,
        "clientID": CLIENT_ID,
        "startedAt": started,
        "endAt": row.expires_at.map(rfc3339).unwrap_or_else(|| started.clone()),
        "cpuCount": res.as_ref().map_or(1, |r| r.cpu_millis.div_ceil(1000)),
        "memoryMB": res.as_ref().map_or(512, |r| r.memory_bytes >> 20),
        "diskSizeMB": 0,
        "state": state_of(row.status).unwrap_or("running"),
        "envdVersion": ENVD_VERSION,
        "metadata": metadata,
    }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<i64>,
    metadata: Option<BTreeMap<String, String>>,
    env_vars: Option<BTreeMap<String, String>>,
    #[serde(rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    network: Option<NetworkOpts>,
}

/// The part of E2B's `network` Sandpit reads.
#[derive(Debug, Default, Deserialize)]
struct NetworkOpts {
    /// `false`: the sandbox's ports need a preview token (E2B's default is public).
    allow_public_traffic: Option<bool>,
}

async fn create_sandbox(
    State(server): State<Arc<Server>>,
    E2bAuth(auth): E2bAuth,
    SandboxDomain(domain): SandboxDomain,
    body: Bytes,
) -> E2bResult {
    auth.require("sandbox_create")?;
    let body: NewSandbox = parse_body(&body)?;
    let asked = body.template_id.unwrap_or_else(|| "base".into());
    // As in E2B, `getHost(port)` is open to anyone unless the create says otherwise.
    let public = body.network.as_ref().and_then(|n| n.allow_public_traffic) != Some(false);
    let timeout = check_timeout(body.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS))?;
    let template = if asked == "base" {
        sandpit_control::node::images::BASE_TEMPLATE_NAME.to_string()
    } else {
        asked.clone()
    };
    // A template made from a sandbox (`POST /templates`, a snapshot) boots from its files
    // and memory, as on the CodeSandbox surface.
    let snapshot = server
        .store
        .snapshots
        .get(&auth.workspace_id, &template)
        .await?
        .map(|s| s.id);
    let req = sandpit_api_types::CreateSandboxRequest {
        template: if snapshot.is_some() {
            String::new()
        } else {
            template
        },
        snapshot,
        mode: sandpit_api_types::SandboxMode::Ephemeral,
        timeout: Some(format!("{timeout}s")),
        env: body.env_vars.unwrap_or_default(),
        metadata: body.metadata.unwrap_or_default(),
        egress: (body.allow_internet_access == Some(false)).then(lifecycle::deny_all),
        preview: Some(sandpit_api_types::PreviewSettings {
            privacy: if public {
                sandpit_api_types::PreviewPrivacy::Public
            } else {
                sandpit_api_types::PreviewPrivacy::Private
            },
        }),
        ..Default::default()
    };
    let row = lifecycle::create(&server, &auth.workspace_id, &req).await?;
    let made = async {
        server
            .store
            .e2b()
            .insert_sandbox(&row.id, &auth.workspace_id, &asked)
            .await?;
        let token = mint_envd_token(&server, &auth, &row.id).await?;
        created_view(&server, &auth, &row, token, &domain).await
    }
    .await;
    match made {
        Ok(view) => Ok((StatusCode::CREATED, Json(view)).into_response()),
        Err(e) => {
            // Nothing half-made stays behind.
            let _ = lifecycle::destroy(&server, &row.id).await;
            Err(e.into())
        }
    }
}

/// `GET /v2/sandboxes?state=running&state=paused&metadata=k%3Dv&limit&nextToken`: one page
/// (no `x-next-token`).
async fn list_sandboxes(
    State(server): State<Arc<Server>>,
    E2bAuth(auth): E2bAuth,
    uri: axum::http::Uri,
) -> E2bResult {
    auth.require("sandbox_read")?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(uri.query().unwrap_or(""))
        .map_err(|_| ApiError::bad_request("invalid_query", "invalid query string"))?;
    let mut states: Vec<String> = Vec::new();
    let mut wanted: Vec<(String, String)> = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "state" => states.extend(v.split(',').map(|s| s.trim().to_string())),
            "metadata" => {
                let m: Vec<(String, String)> = serde_urlencoded::from_str(&v).map_err(|_| {
                    ApiError::bad_request("invalid_query", "metadata must be k=v&k2=v2")
                })?;
                wanted.extend(m);
            }
            _ => {}
        }
    }
    if let Some(bad) = states.iter().find(|s| *s != "running" && *s != "paused") {
        let shown: String = bad.chars().take(32).collect();
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("state must be running or paused, not {shown:?}"),
        )
        .into());
    }
    let rows = server
        .store
        .sandboxes
        .list(&auth.workspace_id, None)
        .await?;
    let mut out = Vec::new();
    for row in rows {
        let Some(state) = state_of(row.status) else {
            continue;
        };
        if !states.is_empty() && !states.iter().any(|s| s == state) {
            continue;
        }
        let template = template_id(&server, &row).await?;
        let view = listed_view(&row, &template)?;
        if !wanted
            .iter()
            .all(|(k, v)| view["metadata"].get(k).and_then(Value::as_str) == Some(v.as_str()))
        {
            continue;
        }
        out.push(view);
    }
    Ok(Json(Value::Array(out)).into_response())
}

async fn get_sandbox(
    State(server): State<Arc<Server>>,
    E2bAuth(auth): E2bAuth,
    SandboxDomain(domain): SandboxDomain,
    Path(id): Path<String>,
) -> E2bResult {
    let sb = own(&server, &auth, "sandbox_read", &id).await?;
    let row = lifecycle::current(&server, &sb).await?;
    if state_of(row.status).is_none() {
        return Err(not_found(&id).into());
    }
    let template = template_id(&server, &row).await?;
    let mut view = listed_view(&row, &template)?;
    view["domain"] = Value::String(domain);
    Ok(Json(view).into_response())
}

async fn kill_sandbox(
    State(server): State<Arc<Server>>,
    E2bAuth(auth): E2bAuth,
    Path(id): Path<String>,
) -> E2bResult {
    let sb = own(&server, &auth, "vm_manage", &id).await?;
    lifecycle::destroy(&server, sb.id()).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Default, Deserialize)]
struct TimeoutBody {
    timeout: Option<i64>,
}

async fn set_timeout(
    State(server): State<Arc<Server>>,
    E2bAuth(auth): E2bAuth,
    Path(id): Path<String>,
    body: Bytes,
) -> E2bResult {
    let sb = own(&server, &auth, "vm_manage", &id).await?;
    let body: TimeoutBody = parse_body(&body)?;
    let secs = check_timeout(
        body.timeout
            .ok_or_else(|| ApiError::bad_request("invalid_timeout", "timeout is required"))?,
    )?;
    lifecycle::keepalive(&server, &sb, &format!("{secs}s")).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn pause_sandbox(
    State(server): State<Arc<Server>>,
    E2bAuth(auth): E2bAuth,
    Path(id): Path<String>,
) -> E2bResult {
    let sb = own(&server, &auth, "vm_manage", &id).await?;
    if sb.row().status == Status::Suspended {
        return Err(ApiError::conflict("already_paused", "the sandbox is already paused").into());
    }
    lifecycle::check_may_suspend(&server, &sb).await?;
    lifecycle::suspend(&server, sb.id()).await?;
    // As on E2B, a paused sandbox waits to be resumed rather than running out its timeout:
    // it is kept for PAUSED_KEPT, and a resume starts a timeout afresh.
    let now = crate::util::now_ms();
    server
        .store
        .sandboxes
        .set_expiry(sb.id(), now + PAUSED_KEPT.as_millis() as i64, now)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Resume (if paused) and extend the timeout: 201 when it was paused, 200 when running.
async fn resume(
    server: &Arc<Server>,
    auth: &Auth,
    id: &str,
    timeout: Option<i64>,
    refuse_running: bool,
    domain: &str,
) -> E2bResult {
    let sb = own(server, auth, "vm_manage", id).await?;
    let timeout = timeout.map(check_timeout).transpose()?;
    let was_paused = match sb.row().status {
        Status::Suspended => true,
        Status::Running | Status::Creating => false,
        _ => return Err(not_found(id).into()),
    };
    if refuse_running && !was_paused {
        return Err(ApiError::conflict("not_paused", "the sandbox is not paused").into());
    }
    if was_paused {
        lifecycle::wake(server, id).await?;
    }
    // A resumed sandbox gets the timeout asked for, or the default one (its pause had set
    // the expiry PAUSED_KEPT away).
    match timeout {
        Some(secs) => {
            lifecycle::keepalive(server, &sb, &format!("{secs}s")).await?;
        }
        None if was_paused => {
            lifecycle::keepalive(server, &sb, &format!("{DEFAULT_TIMEOUT_SECS}s")).await?;
        }
        None => {}
    }
    let row = lifecycle::current(server, &sb).await?;
    let token = mint_envd_token(server, auth, id).await?;
    let view = created_view(server, auth, &row, token, domain).await?;
    let status = if was_paused {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

async fn connect_sandbox(
    State(server): State<Arc<Server>>,
    E2bAuth(auth): E2bAuth,
    SandboxDomain(domain): SandboxDomain,
    Path(id): Path<String>,
    body: Bytes,
) -> E2bResult {
    let body: TimeoutBody = parse_body(&body)?;
    resume(&server, &auth, &id, body.timeout, false, &domain).await
}

/// The older `POST /sandboxes/{id}/resume`: 409 when running.
async fn resume_sandbox(
    State(server): State<Arc<Server>>,
    E2bAuth(auth): E2bAuth,
    SandboxDomain(domain): SandboxDomain,
    Path(id): Path<String>,
    body: Bytes,
) -> E2bResult {
    let body: TimeoutBody = parse_body(&body)?;
    resume(&server, &auth, &id, body.timeout, true, &domain).await
}
