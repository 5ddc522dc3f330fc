//! envd, the daemon the E2B SDKs talk to inside a sandbox, answered by the server: requests
//! that carry `E2b-Sandbox-Id` (the SDKs' plain-HTTP setup, `E2B_SANDBOX_URL`) are taken
//! out of the main router by [`route`] and translated to the agent protocol.
//!
//! Authorization: `X-Access-Token` must be one of the sandbox's envd tokens (create and
//! connect hand them out, stored hashed); nothing is looked up, woken or locked before.
//! The user (`Authorization: Basic base64("<user>:")` or `?username=`): `root`, or for
//! `user` and when none is named the template's `USER`, else the account `user` of `base`
//! (and of templates built from it), else root (`images::e2b_user`).
//!
//! Processes are agent terminals (on pipes, or a pty when asked; see the processes section
//! below): they belong to the sandbox, not to a stream, hold no lock, and are kept across a
//! pause, which cuts their streams.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;
use sandpit_agent_proto::client::TerminalEvent;
use sandpit_agent_proto::{self as proto, EntryKind, FileInfo};
use sandpit_control::Status;
use sandpit_control::agent::{AgentClient, AgentFailure};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower::ServiceExt;

use super::connect::{self, ConnectError};
use super::control::valid_id;
use super::store::E2bTables;
use super::{E2bError, ENVD_PORT};
use crate::auth::{Auth, hash_token};
use crate::error::ApiError;
use crate::extract::Authorized;
use crate::lifecycle;
use crate::routes::sandboxes::agent_failure;
use crate::server::Server;
use crate::util::rfc3339;

/// The header naming the sandbox of an envd request.
pub const SANDBOX_HEADER: &str = "e2b-sandbox-id";
/// The header naming the port.
pub const PORT_HEADER: &str = "e2b-sandbox-port";
/// Largest multipart upload read into memory.
pub const MAX_MULTIPART: u64 = 64 << 20;
/// Deepest `ListDir`.
pub const MAX_LIST_DEPTH: u32 = 8;
/// Most entries one `ListDir` returns.
pub const MAX_LIST_ENTRIES: usize = 10_000;
/// Most processes a sandbox runs through envd at once.
pub const MAX_PROCESSES: usize = 64;

/// Take envd requests out of the main router (a middleware on the whole app).
pub async fn route(State(server): State<Arc<Server>>, req: Request, next: Next) -> Response {
    if !req.headers().contains_key(SANDBOX_HEADER) {
        return next.run(req).await;
    }
    let port = req
        .headers()
        .get(PORT_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(ENVD_PORT);
    if port != ENVD_PORT {
        return E2bError(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "port_not_served",
            "only envd (port 49983) is served through E2b-Sandbox-Port; reach other ports through previews",
        ))
        .into_response();
    }
    // In a fleet, envd answers on the sandbox's node: a request that arrives at another
    // server (or an API replica) is relayed there once its envd token checks out; a relayed
    // one is answered here.
    if let Some(secret) = server.cfg.node_secret.clone()
        && !crate::forward::is_relayed(&secret, &req)
    {
        match owner_elsewhere(&server, req.headers()).await {
            Ok(Some(address)) => {
                let pq = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default();
                return crate::forward::relay(&server, &secret, req, &address, &pq)
                    .await
                    .unwrap_or_else(|e| E2bError(e).into_response());
            }
            Ok(None) => {}
            Err(e) => return E2bError(e).into_response(),
        }
    }
    match router().with_state(server).oneshot(req).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}

/// The address of the node an envd request belongs on, when that is not this server. The
/// envd token is checked first: nothing is relayed for a request that could not be
/// answered. Errors are those [`authorize`] gives (here before any relay).
async fn owner_elsewhere(
    server: &Arc<Server>,
    headers: &HeaderMap,
) -> Result<Option<String>, ApiError> {
    let Some(id) = headers
        .get(SANDBOX_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| valid_id(id))
    else {
        // `authorize` answers it.
        return Ok(None);
    };
    let Some(token) = headers
        .get("x-access-token")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty() && t.len() <= 256)
    else {
        return Ok(None);
    };
    if !server
        .store
        .e2b()
        .token_valid(id, &hash_token(token))
        .await?
    {
        return Ok(None);
    }
    let Some(row) = server.store.sandboxes.get(id).await? else {
        return Ok(None);
    };
    if row.status == Status::Destroyed || server.is_mine(&row) {
        return Ok(None);
    }
    match crate::forward::route_of(server, &row).await? {
        crate::forward::Route::Here => Ok(None),
        crate::forward::Route::Relay(address) => Ok(Some(address)),
    }
}

fn router() -> Router<Arc<Server>> {
    Router::new()
        .route("/health", get(health))
        .route("/files", get(download).post(upload))
        .route("/{service}/{method}", post(rpc))
        .fallback(|| async {
            E2bError(ApiError::not_found("route_not_found", "no such envd route"))
        })
}

/// The sandbox and user of an authorized envd request.
pub(super) struct Envd {
    pub(super) sb: Authorized,
    /// The agent's user spec (`None`: root).
    user: Option<String>,
    /// Where relative paths start.
    home: String,
}

fn basic_user(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(h) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || ApiError::bad_request("invalid_user", "Authorization must be Basic <user>:");
    let text = h.to_str().map_err(|_| bad())?;
    let Some(b64) = text.strip_prefix("Basic ") else {
        return Err(bad());
    };
    let raw = B64.decode(b64.trim()).map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let name = raw.split(':').next().unwrap_or("").to_string();
    Ok((!name.is_empty()).then_some(name))
}

/// Check the envd token, then load the sandbox and pick the user.
async fn authorize(
    server: &Arc<Server>,
    headers: &HeaderMap,
    username: Option<&str>,
) -> Result<Envd, ApiError> {
    let id = headers
        .get(SANDBOX_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| valid_id(id))
        .ok_or_else(|| ApiError::not_found("sandbox_not_found", "no such sandbox"))?
        .to_string();
    let token = headers
        .get("x-access-token")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty() && t.len() <= 256)
        .ok_or_else(|| ApiError::unauthorized("X-Access-Token is required"))?;
    if !server
        .store
        .e2b()
        .token_valid(&id, &hash_token(token))
        .await?
    {
        return Err(ApiError::unauthorized("unknown envd access token"));
    }
    let row = server
        .store
        .sandboxes
        .get(&id)
        .await?
        .filter(|r| r.status != Status::Destroyed)
        .ok_or_else(|| ApiError::not_found("sandbox_not_found", "no such sandbox"))?;
    let auth = Auth {
        token_id: format!("e2b-envd:{id}"),
        workspace_id: row.workspace_id.to_string(),
        org_id: String::new(),
        scopes: vec!["sandbox_edit_code".into()],
    };
    let named = match username {
        Some(u) if !u.is_empty() => Some(u.to_string()),
        _ => basic_user(headers)?,
    };
    let user = match named.as_deref() {
        None | Some("user") => sandpit_control::node::images::e2b_user(server, &row).await?,
        Some("root") => None,
        Some(u) => {
            proto::check_user_spec(u).map_err(|m| ApiError::bad_request("invalid_user", m))?;
            Some(u.to_string())
        }
    };
    let home = match user.as_deref() {
        None | Some("root") | Some("0") => "/root".to_string(),
        Some(u) => format!("/home/{}", u.split(':').next().unwrap_or(u)),
    };
    Ok(Envd {
        sb: Authorized::made_for(&auth, row)?,
        user,
        home,
    })
}

/// An absolute, normalized path: relative ones start at the user's home.
pub(super) fn resolve(envd: &Envd, path: &str) -> Result<String, ApiError> {
    let full = if path.starts_with('/') {
        path.to_string()
    } else if path.is_empty() {
        envd.home.clone()
    } else {
        format!("{}/{path}", envd.home)
    };
    proto::normalize_path(&full).map_err(|e| ApiError::bad_request("invalid_path", e.message))
}

// ---- HTTP routes ----

async fn health(State(server): State<Arc<Server>>, headers: HeaderMap) -> Response {
    match authorize(&server, &headers, None).await {
        Ok(e) if e.sb.row().status == Status::Running => StatusCode::NO_CONTENT.into_response(),
        Ok(_) => E2bError(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "sandbox_not_running",
            "the sandbox is not running",
        ))
        .into_response(),
        Err(e) => E2bError(e).into_response(),
    }
}

#[derive(Debug, Default, Deserialize)]
struct FileQuery {
    path: Option<String>,
    username: Option<String>,
}

fn file_query(uri: &axum::http::Uri) -> Result<FileQuery, ApiError> {
    serde_urlencoded::from_str(uri.query().unwrap_or(""))
        .map_err(|_| ApiError::bad_request("invalid_query", "invalid query string"))
}

async fn download(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Response, E2bError> {
    let q = file_query(&uri)?;
    let envd = authorize(&server, &headers, q.username.as_deref()).await?;
    let path = resolve(&envd, q.path.as_deref().unwrap_or(""))?;
    let (agent, guard, _) = lifecycle::running_agent(&server, &envd.sb).await?;
    let (info, stream) = agent.read_file(&path).await.map_err(agent_failure)?;
    // The lock goes with the body: no checkpoint while the file streams.
    let stream = stream.map(move |chunk| {
        let _ = &guard;
        chunk
    });
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size));
    Ok(resp)
}

/// One part of a `multipart/form-data` body.
struct Part<'a> {
    name: Option<String>,
    filename: Option<String>,
    data: &'a [u8],
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    (from..=hay.len() - needle.len()).find(|&i| &hay[i..i + needle.len()] == needle)
}

fn disposition_param(line: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=\"");
    let start = line.find(&pat)? + pat.len();
    let end = line[start..].find('"')? + start;
    Some(line[start..end].to_string())
}

/// Parse a `multipart/form-data` body (in memory, bounded by the caller).
fn parse_multipart<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<Part<'a>>, ApiError> {
    let bad = |m: &str| ApiError::bad_request("invalid_multipart", m.to_string());
    let delim = format!("--{boundary}");
    let delim = delim.as_bytes();
    let mut pos = find(body, delim, 0).ok_or_else(|| bad("no boundary in the body"))? + delim.len();
    let mut parts = Vec::new();
    loop {
        if body[pos..].starts_with(b"--") {
            return Ok(parts);
        }
        if !body[pos..].starts_with(b"\r\n") {
            return Err(bad("malformed boundary line"));
        }
        pos += 2;
        let head_end =
            find(body, b"\r\n\r\n", pos).ok_or_else(|| bad("unterminated part headers"))?;
        let head = std::str::from_utf8(&body[pos..head_end])
            .map_err(|_| bad("part headers are not UTF-8"))?;
        let (mut name, mut filename) = (None, None);
        for line in head.split("\r\n") {
            if line
                .to_ascii_lowercase()
                .starts_with("content-disposition:")
            {
                name = disposition_param(line, "name");
                filename = disposition_param(line, "filename");
            }
        }
        let data_start = head_end + 4;
        let mut end_delim = b"\r\n".to_vec();
        end_delim.extend_from_slice(delim);
        let data_end =
            find(body, &end_delim, data_start).ok_or_else(|| bad("unterminated part"))?;
        parts.push(Part {
            name,
            filename,
            data: &body[data_start..data_end],
        });
        if parts.len() > 1000 {
            return Err(bad("too many parts"));
        }
        pos = data_end + end_delim.len();
    }
}

async fn upload(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: Body,
) -> Result<Response, E2bError> {
    let q = file_query(&uri)?;
    let envd = authorize(&server, &headers, q.username.as_deref()).await?;
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let boundary = ctype
        .strip_prefix("multipart/form-data")
        .and_then(|rest| {
            rest.split(';')
                .find_map(|p| p.trim().strip_prefix("boundary="))
        })
        .map(|b| b.trim_matches('"').to_string())
        .filter(|b| !b.is_empty() && b.len() <= 200)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "uploads are multipart/form-data (envd 0.4)",
            )
        })?;
    let limit = server.cfg.upload_limit.min(MAX_MULTIPART);
    let bytes = axum::body::to_bytes(body, limit as usize + 64 * 1024)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "file_too_large",
                format!("an upload is at most {limit} bytes"),
            )
        })?;
    let parts = parse_multipart(&bytes, &boundary)?;
    let files: Vec<&Part> = parts
        .iter()
        .filter(|p| p.name.as_deref() == Some("file"))
        .collect();
    let mut targets = Vec::with_capacity(files.len());
    for f in &files {
        let named = if files.len() == 1 {
            q.path.clone().or_else(|| f.filename.clone())
        } else {
            f.filename.clone()
        };
        let named =
            named.ok_or_else(|| ApiError::bad_request("invalid_path", "a file has no path"))?;
        let path = resolve(&envd, &named)?;
        if path == "/" {
            return Err(ApiError::bad_request("invalid_path", "cannot write to /").into());
        }
        targets.push((path, f.data));
    }
    let (agent, _guard, _) = lifecycle::running_agent(&server, &envd.sb).await?;
    let mut out = Vec::new();
    for (path, data) in targets {
        let stream = futures::stream::iter([Ok::<_, Infallible>(Bytes::copy_from_slice(data))]);
        agent
            .write_file(&path, envd.user.as_deref(), stream, limit)
            .await
            .map_err(agent_failure)?;
        let name = path.rsplit('/').next().unwrap_or("").to_string();
        out.push(json!({"name": name, "type": "file", "path": path}));
    }
    Ok(axum::Json(Value::Array(out)).into_response())
}

// ---- Connect RPC ----

async fn rpc(
    State(server): State<Arc<Server>>,
    Path((service, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let streaming = matches!(
        (service.as_str(), method.as_str()),
        ("process.Process", "Start" | "Connect") | ("filesystem.Filesystem", "WatchDir")
    );
    let result = async {
        let envd = authorize(&server, &headers, None).await?;
        let bytes = axum::body::to_bytes(body, connect::MAX_MESSAGE + 5)
            .await
            .map_err(|_| ConnectError::new("resource_exhausted", "the message is too large"))?;
        if streaming {
            let msg = connect::stream_request(&bytes)?;
            return match method.as_str() {
                "Start" => start(&server, envd, msg, &headers).await,
                "Connect" if service == "process.Process" => {
                    connect_process(&server, envd, msg, &headers).await
                }
                "WatchDir" => super::watch::watch_dir(&server, envd, msg, &headers).await,
                _ => Err(ConnectError::new(
                    "unimplemented",
                    format!("{service}/{method} is not supported by Sandpit"),
                )),
            };
        }
        let value = match (service.as_str(), method.as_str()) {
            ("process.Process", "List") => list_processes(&server, &envd).await,
            ("process.Process", "SendSignal") => send_signal(&server, &envd, &bytes).await,
            ("process.Process", "SendInput") => send_input(&server, &envd, &bytes).await,
            ("process.Process", "CloseStdin") => close_stdin(&server, &envd, &bytes).await,
            ("process.Process", "Update") => update(&server, &envd, &bytes).await,
            ("filesystem.Filesystem", m) if super::watch::is_unary(m) => {
                super::watch::unary(&server, &envd, m, &bytes).await
            }
            ("filesystem.Filesystem", m) => filesystem(&server, &envd, m, &bytes).await,
            _ => Err(ConnectError::new(
                "unimplemented",
                format!("{service}/{method} is not supported by Sandpit"),
            )),
        }?;
        Ok(connect::unary(value))
    }
    .await;
    match result {
        Ok(resp) => resp,
        Err(e) if streaming => connect::stream_error(&e),
        Err(e) => e.into_response(),
    }
}

impl From<sandpit_control::ControlError> for ConnectError {
    fn from(e: sandpit_control::ControlError) -> Self {
        ConnectError::from_api(&e.into())
    }
}

pub(super) fn failed(f: AgentFailure) -> ConnectError {
    if let AgentFailure::Refused(e) = &f
        && e.code == proto::AgentErrorCode::AlreadyExists
    {
        return ConnectError::new("already_exists", e.message.clone());
    }
    ConnectError::from_api(&agent_failure(f))
}

// ---- filesystem ----

fn permissions(kind: EntryKind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        _ => '-',
    });
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn entry(path: &str, info: &FileInfo) -> Value {
    let name = path.rsplit('/').next().unwrap_or("");
    let kind = match info.kind {
        EntryKind::File => "FILE_TYPE_FILE",
        EntryKind::Dir => "FILE_TYPE_DIRECTORY",
        EntryKind::Symlink => "FILE_TYPE_SYMLINK",
        EntryKind::Other => "FILE_TYPE_UNSPECIFIED",
    };
    json!({
        "name": name,
        "type": kind,
        "path": path,
        "size": info.size.to_string(),
        "mode": info.mode,
        "permissions": permissions(info.kind, info.mode),
        "owner": "",
        "group": "",
        "modifiedTime": rfc3339(info.mtime.saturating_mul(1000)),
        "isSymlink": info.kind == EntryKind::Symlink,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PathMsg {
    path: String,
    depth: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MoveMsg {
    source: String,
    destination: String,
}

async fn filesystem(
    server: &Arc<Server>,
    envd: &Envd,
    method: &str,
    bytes: &[u8],
) -> Result<Value, ConnectError> {
    let (agent, _guard, _) = lifecycle::running_agent(server, &envd.sb).await?;
    match method {
        "Stat" => {
            let m: PathMsg = connect::parse(bytes)?;
            let path = resolve(envd, &m.path)?;
            let info = agent.stat(&path).await.map_err(failed)?;
            Ok(json!({"entry": entry(&path, &info)}))
        }
        "ListDir" => {
            let m: PathMsg = connect::parse(bytes)?;
            let path = resolve(envd, &m.path)?;
            let depth = m.depth.unwrap_or(1).clamp(1, MAX_LIST_DEPTH);
            let mut entries = Vec::new();
            list_into(&agent, &path, depth, &mut entries).await?;
            Ok(json!({"entries": entries}))
        }
        "MakeDir" => {
            let m: PathMsg = connect::parse(bytes)?;
            let path = resolve(envd, &m.path)?;
            if let Ok(info) = agent.stat(&path).await {
                let _ = info;
                return Err(ConnectError::new(
                    "already_exists",
                    format!("{path} already exists"),
                ));
            }
            agent
                .make_dir(&path, true, envd.user.as_deref())
                .await
                .map_err(failed)?;
            let info = agent.stat(&path).await.map_err(failed)?;
            Ok(json!({"entry": entry(&path, &info)}))
        }
        "Remove" => {
            let m: PathMsg = connect::parse(bytes)?;
            let path = resolve(envd, &m.path)?;
            if path == "/" {
                return Err(ConnectError::new("invalid_argument", "cannot remove /"));
            }
            agent.remove(&path, true).await.map_err(failed)?;
            Ok(json!({}))
        }
        "Move" => {
            let m: MoveMsg = connect::parse(bytes)?;
            let (src, dst) = (resolve(envd, &m.source)?, resolve(envd, &m.destination)?);
            if src == "/" || dst == "/" {
                return Err(ConnectError::new("invalid_argument", "cannot move /"));
            }
            agent.stat(&src).await.map_err(failed)?;
            let argv = vec!["mv".into(), "--".into(), src, dst.clone()];
            let (status, stderr) = agent
                .run_for_stderr(argv, Duration::from_secs(60))
                .await
                .map_err(failed)?;
            if status.exit_code != 0 {
                let msg = String::from_utf8_lossy(&stderr);
                return Err(ConnectError::new(
                    "internal",
                    format!("move failed: {}", msg.trim()),
                ));
            }
            let info = agent.stat(&dst).await.map_err(failed)?;
            Ok(json!({"entry": entry(&dst, &info)}))
        }
        other => Err(ConnectError::new(
            "unimplemented",
            format!("filesystem.Filesystem/{other} is not supported by Sandpit"),
        )),
    }
}

/// `path`'s entries, and theirs down to `depth` levels, bounded in number.
async fn list_into(
    agent: &AgentClient,
    path: &str,
    depth: u32,
    out: &mut Vec<Value>,
) -> Result<(), ConnectError> {
    let mut queue = vec![(path.to_string(), 1u32)];
    while let Some((dir, level)) = queue.pop() {
        let listing = agent.list_dir(&dir).await.map_err(failed)?;
        for e in listing.entries {
            if out.len() >= MAX_LIST_ENTRIES {
                return Err(ConnectError::new(
                    "resource_exhausted",
                    format!("more than {MAX_LIST_ENTRIES} entries"),
                ));
            }
            let child = if dir == "/" {
                format!("/{}", e.name)
            } else {
                format!("{dir}/{}", e.name)
            };
            out.push(entry(&child, &e.info));
            if e.info.kind == EntryKind::Dir && level < depth {
                queue.push((child, level + 1));
            }
        }
    }
    Ok(())
}

// ---- processes ----
//
// Every process started through envd is an agent terminal (protocol version 6: on pipes, or
// on a pty when the SDK asks for one) whose id starts with `e2b-`. It belongs to the agent,
// not to a connection: it outlives its output stream, holds no sandbox lock (a pause does
// not wait for it; it is checkpointed with the sandbox and runs on after a resume), and is
// listed, signalled, fed and reattached (`Connect`) by pid. A stream is an attachment,
// registered as a live connection of the sandbox so that a pause or a destroy cuts it.

/// Terminal ids of processes started through envd start with this.
const PROC_PREFIX: &str = "e2b-";
/// Default size of a pty the SDK did not size.
const DEFAULT_PTY: proto::TerminalSize = proto::TerminalSize { cols: 80, rows: 24 };

/// What the SDK lists of a process and the server alone knows (the agent shows argv only).
struct ProcMeta {
    config: Value,
    tag: Option<String>,
    /// Input for the stream now attached to the process, if any.
    input: Option<mpsc::Sender<ProcInput>>,
}

/// Input handed to the task that streams a process.
enum ProcInput {
    Bytes(Vec<u8>),
    Close,
}

/// Per sandbox, by terminal id; an entry without a live process is dropped when the
/// process is found gone. Held only for map operations.
#[derive(Default)]
pub struct Processes {
    map: Mutex<HashMap<(String, String), ProcMeta>>,
}

impl Processes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), ProcMeta>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forget the processes of sandboxes that are gone (destroyed, or their row removed):
    /// nothing else does for a sandbox that ended with no stream open and was never asked
    /// about again. Run by the server's housekeeping.
    pub async fn prune(&self, store: &sandpit_control::store::Store) {
        let sandboxes: std::collections::BTreeSet<String> =
            self.lock().keys().map(|(s, _)| s.clone()).collect();
        for id in sandboxes {
            let gone = match store.sandboxes.get(&id).await {
                Ok(row) => row.is_none_or(|r| r.status == Status::Destroyed),
                // Asked again at the next round.
                Err(_) => false,
            };
            if gone {
                self.lock().retain(|(s, _), _| *s != id);
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ProcessConfig {
    cmd: String,
    args: Vec<String>,
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PtyMsg {
    size: Option<PtySizeMsg>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PtySizeMsg {
    cols: u32,
    rows: u32,
}

impl PtyMsg {
    fn size(&self) -> Result<proto::TerminalSize, ConnectError> {
        let Some(sz) = &self.size else {
            return Ok(DEFAULT_PTY);
        };
        let dim = |d: u32| u16::try_from(d).unwrap_or(0);
        proto::TerminalSize {
            cols: dim(sz.cols),
            rows: dim(sz.rows),
        }
        .validate()
        .map_err(|e| ConnectError::new("invalid_argument", e.message))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StartMsg {
    process: ProcessConfig,
    pty: Option<PtyMsg>,
    tag: Option<String>,
    stdin: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Selector {
    pid: Option<u32>,
    tag: Option<String>,
}

/// A fresh terminal id for a process.
fn new_proc_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{PROC_PREFIX}{:x}-{n}", crate::util::now_ms())
}

/// The envd processes of a sandbox that still run. Exited ones (their streams are over or
/// were cut) are removed from the agent and from the server's table on the way.
async fn live_processes(
    server: &Server,
    agent: &AgentClient,
    sandbox: &str,
) -> Result<Vec<proto::TerminalInfo>, ConnectError> {
    let all = agent.terminal_list().await.map_err(failed)?;
    let (running, exited): (Vec<_>, Vec<_>) = all
        .into_iter()
        .filter(|t| t.id.starts_with(PROC_PREFIX))
        .partition(|t| t.exit_code.is_none());
    for t in &exited {
        tracing::debug!(sandbox, process = %t.id, pid = t.pid, exit_code = ?t.exit_code, "envd process exited; forgotten");
        // Gone already (another request removed it): nothing to do.
        let _ = agent.terminal_kill(&t.id, None).await;
    }
    let mut table = server.e2b_processes.lock();
    table.retain(|(s, tid), _| s != sandbox || running.iter().any(|t| &t.id == tid));
    Ok(running)
}

/// The running process a selector names.
async fn find_process(
    server: &Server,
    agent: &AgentClient,
    sandbox: &str,
    sel: &Selector,
) -> Result<proto::TerminalInfo, ConnectError> {
    let running = live_processes(server, agent, sandbox).await?;
    let by_tag = |t: &proto::TerminalInfo| {
        let table = server.e2b_processes.lock();
        table
            .get(&(sandbox.to_string(), t.id.clone()))
            .is_some_and(|m| m.tag.is_some() && m.tag == sel.tag)
    };
    running
        .into_iter()
        .find(|t| match (&sel.pid, &sel.tag) {
            (Some(pid), _) => t.pid == *pid,
            (None, Some(_)) => by_tag(t),
            (None, None) => false,
        })
        .ok_or_else(|| ConnectError::new("not_found", "no such process"))
}

async fn start(
    server: &Arc<Server>,
    envd: Envd,
    msg: &[u8],
    headers: &HeaderMap,
) -> Result<Response, ConnectError> {
    let m: StartMsg = connect::parse(msg)?;
    let pty = m.pty.as_ref().map(PtyMsg::size).transpose()?;
    let cfg = m.process;
    if cfg.cmd.is_empty() || cfg.cmd.contains('\0') || cfg.args.iter().any(|a| a.contains('\0')) {
        return Err(ConnectError::new(
            "invalid_argument",
            "cmd is required; cmd and args contain no NUL",
        ));
    }
    if cfg
        .envs
        .iter()
        .any(|(k, v)| k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0'))
    {
        return Err(ConnectError::new(
            "invalid_argument",
            "environment variable names must be non-empty and contain no '=' or NUL; values no NUL",
        ));
    }
    let id = envd.sb.id().to_string();
    let cwd = resolve(&envd, cfg.cwd.as_deref().unwrap_or(""))?;
    let config = json!({"cmd": cfg.cmd, "args": cfg.args, "envs": cfg.envs, "cwd": cwd});
    let (agent, guard, row) = lifecycle::running_agent(server, &envd.sb).await?;
    // Room for this one: exited processes go first.
    let running = live_processes(server, &agent, &id).await?;
    if running.len() >= MAX_PROCESSES {
        return Err(ConnectError::new(
            "resource_exhausted",
            format!("at most {MAX_PROCESSES} processes per sandbox"),
        ));
    }
    // The SDKs run everything as `/bin/bash -l -c <cmd>`; a template without bash (the
    // busybox `base`) runs the command line with `/bin/sh -c` instead.
    let (argv, shell) = if cfg.cmd == "/bin/bash" && agent.stat("/bin/bash").await.is_err() {
        match cfg.args.as_slice() {
            [l, c, line] if l == "-l" && c == "-c" => (None, Some(line.clone())),
            _ => (Some([vec!["/bin/sh".to_string()], cfg.args].concat()), None),
        }
    } else {
        (Some([vec![cfg.cmd], cfg.args].concat()), None)
    };
    let size = pty.unwrap_or(DEFAULT_PTY);
    let tid = new_proc_id();
    let req = proto::TerminalCreate {
        id: Some(tid.clone()),
        argv,
        shell,
        cwd: Some(cwd),
        env: lifecycle::exec_env(&row, cfg.envs.into_iter().collect())?,
        cols: size.cols,
        rows: size.rows,
        scrollback_bytes: Some(proto::MAX_SCROLLBACK),
        user: envd.user.clone(),
        pipes: pty.is_none(),
        stdin: pty.is_none() && m.stdin.unwrap_or(false),
    };
    let info = agent.terminal_create(req).await.map_err(failed)?;
    server.e2b_processes.lock().insert(
        (id.clone(), tid.clone()),
        ProcMeta {
            config,
            tag: m.tag,
            input: None,
        },
    );
    // Registered under the read lock, so no pause runs between this and the attachment;
    // the lock goes once both exist (as for terminals' WebSockets).
    let live = server.previews.register(&id);
    let attached = agent.terminal_attach(&tid, true).await;
    drop(guard);
    let (_, attachment) = attached.map_err(failed)?;
    Ok(stream_process(
        server.clone(),
        StreamOf {
            sandbox: id,
            tid,
            pid: info.pid,
            pty: pty.is_some(),
            agent,
        },
        attachment,
        live,
        headers,
    ))
}

/// `Connect`: stream a running process's further output.
async fn connect_process(
    server: &Arc<Server>,
    envd: Envd,
    msg: &[u8],
    headers: &HeaderMap,
) -> Result<Response, ConnectError> {
    #[derive(Debug, Default, Deserialize)]
    #[serde(default)]
    struct Msg {
        process: Selector,
    }
    let m: Msg = connect::parse(msg)?;
    let id = envd.sb.id().to_string();
    let (agent, guard, _) = lifecycle::running_agent(server, &envd.sb).await?;
    let info = find_process(server, &agent, &id, &m.process).await?;
    let live = server.previews.register(&id);
    let attached = agent.terminal_attach(&info.id, false).await;
    drop(guard);
    let (_, attachment) = attached.map_err(failed)?;
    Ok(stream_process(
        server.clone(),
        StreamOf {
            sandbox: id,
            tid: info.id,
            pid: info.pid,
            pty: !info.pipes,
            agent,
        },
        attachment,
        live,
        headers,
    ))
}

/// The process a stream shows.
struct StreamOf {
    sandbox: String,
    tid: String,
    pid: u32,
    pty: bool,
    agent: AgentClient,
}

/// How a stream ended.
enum StreamEnd {
    Exit(proto::ExitStatus),
    /// The client went away: the process goes on.
    ClientGone,
    Failed(ConnectError),
}

/// Stream a process's events as a Connect server stream: `start{pid}`, `data`, keepalives,
/// then `end` once it exited (and the process is removed), or an error when the sandbox's
/// live connections were cut (a pause or destroy) or the agent connection broke. While the
/// stream lives, input for the process goes through its attachment. `Connect-Timeout-Ms`
/// bounds the stream: the process is killed when it passes.
fn stream_process(
    server: Arc<Server>,
    of: StreamOf,
    mut attachment: sandpit_control::agent_terminal::TerminalAttachment,
    live: sandpit_control::live::ConnGuard,
    headers: &HeaderMap,
) -> Response {
    let connect::StreamTiming {
        keepalive,
        deadline: timeout,
    } = connect::StreamTiming::of(headers);
    let (in_tx, mut in_rx) = mpsc::channel::<ProcInput>(16);
    if let Some(meta) = server
        .e2b_processes
        .lock()
        .get_mut(&(of.sandbox.clone(), of.tid.clone()))
    {
        meta.input = Some(in_tx.clone());
    }
    let (body_tx, body_rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(async move {
        let cancel = live.cancel_token();
        let send = |frame: Bytes| {
            let body_tx = body_tx.clone();
            async move { body_tx.send(Ok(frame)).await.is_ok() }
        };
        if !send(connect::frame(
            0,
            &json!({"event": {"start": {"pid": of.pid}}}),
        ))
        .await
        {
            return;
        }
        let out_key = if of.pty { "pty" } else { "stdout" };
        let end = {
            let (mut reader, mut writer) = attachment.split();
            let to_client = async {
                loop {
                    let (key, bytes) = match reader.next().await {
                        Ok(TerminalEvent::Output(b)) => (out_key, b),
                        Ok(TerminalEvent::Stderr(b)) => ("stderr", b),
                        Ok(TerminalEvent::Exit(st)) => return StreamEnd::Exit(st),
                        Err(f) => return StreamEnd::Failed(failed(f)),
                    };
                    let data = json!({"event": {"data": {key: B64.encode(bytes)}}});
                    if !send(connect::frame(0, &data)).await {
                        return StreamEnd::ClientGone;
                    }
                }
            };
            let from_input = async {
                while let Some(input) = in_rx.recv().await {
                    let sent = match input {
                        ProcInput::Bytes(b) => writer.input(&b).await,
                        ProcInput::Close => writer.close_stdin().await,
                    };
                    if let Err(f) = sent {
                        return StreamEnd::Failed(failed(f));
                    }
                }
                std::future::pending().await
            };
            let pings = async {
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
                loop {
                    tick.tick().await;
                    if !send(connect::frame(0, &json!({"event": {"keepalive": {}}}))).await {
                        return StreamEnd::ClientGone;
                    }
                }
            };
            let deadline = async {
                match timeout {
                    Some(t) => {
                        tokio::time::sleep(t).await;
                        // The SDKs raise their timeout error on `deadline_exceeded`; the
                        // process ends with the call, as it would had it run in the call.
                        let _ = of.agent.terminal_kill(&of.tid, Some(9)).await;
                        StreamEnd::Failed(ConnectError::new(
                            "deadline_exceeded",
                            "the call's timeout (Connect-Timeout-Ms) passed: the process was killed",
                        ))
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                end = to_client => end,
                end = from_input => end,
                end = pings => end,
                end = deadline => end,
                _ = cancel.cancelled() => StreamEnd::Failed(ConnectError::new(
                    "unavailable",
                    "the sandbox was paused or stopped: the process goes on after a resume (reattach with Connect)",
                )),
            }
        };
        // The agent connection resets here (before the cut, if any, goes on).
        drop(attachment);
        drop(live);
        let key = (of.sandbox.clone(), of.tid.clone());
        if let Some(meta) = server.e2b_processes.lock().get_mut(&key)
            && meta.input.as_ref().is_some_and(|i| i.same_channel(&in_tx))
        {
            meta.input = None;
        }
        match end {
            StreamEnd::Exit(st) => {
                server.e2b_processes.lock().remove(&key);
                // Already removed by another request: nothing to do.
                let _ = of.agent.terminal_kill(&of.tid, None).await;
                server.previews.touch(&server.store, &of.sandbox);
                let status = match st.signal {
                    Some(9) => "signal: killed".to_string(),
                    Some(s) => format!("signal: {s}"),
                    None => format!("exit status {}", st.exit_code),
                };
                let end = json!({"event": {"end": {
                    "exitCode": st.exit_code, "exited": st.signal.is_none(), "status": status,
                }}});
                if send(connect::frame(0, &end)).await {
                    send(connect::end_frame(None)).await;
                }
            }
            StreamEnd::Failed(e) => {
                send(connect::end_frame(Some(&e))).await;
            }
            StreamEnd::ClientGone => {}
        }
    });
    connect::stream_body(body_rx)
}

async fn list_processes(server: &Arc<Server>, envd: &Envd) -> Result<Value, ConnectError> {
    let id = envd.sb.id();
    let (agent, guard, _) = lifecycle::running_agent(server, &envd.sb).await?;
    let running = live_processes(server, &agent, id).await?;
    drop(guard);
    let table = server.e2b_processes.lock();
    let list: Vec<Value> = running
        .iter()
        .map(|t| {
            let meta = table.get(&(id.to_string(), t.id.clone()));
            // A process started before a restart of this server: its argv is all there is.
            let config = meta.map(|m| m.config.clone()).unwrap_or_else(|| {
                let (cmd, args) = t.argv.split_first().map_or(("", &[][..]), |(c, a)| (c, a));
                json!({"cmd": cmd, "args": args, "envs": {}})
            });
            let mut v = json!({"pid": t.pid, "config": config});
            if let Some(tag) = meta.and_then(|m| m.tag.clone()) {
                v["tag"] = tag.into();
            }
            v
        })
        .collect();
    Ok(json!({"processes": list}))
}

/// Hand `input` to the process a selector names: through its live stream when it has one,
/// else through an attachment of its own.
async fn give_input(
    server: &Arc<Server>,
    envd: &Envd,
    sel: &Selector,
    input: ProcInput,
) -> Result<(), ConnectError> {
    let id = envd.sb.id();
    let (agent, guard, _) = lifecycle::running_agent(server, &envd.sb).await?;
    let info = find_process(server, &agent, id, sel).await?;
    let stream = server
        .e2b_processes
        .lock()
        .get(&(id.to_string(), info.id.clone()))
        .and_then(|m| m.input.clone());
    let input = match stream {
        Some(tx) => match tx.send(input).await {
            Ok(()) => return Ok(()),
            // The stream just ended: attach instead.
            Err(mpsc::error::SendError(input)) => input,
        },
        None => input,
    };
    let (_, mut attachment) = agent
        .terminal_attach(&info.id, false)
        .await
        .map_err(failed)?;
    drop(guard);
    let (mut reader, mut writer) = attachment.split();
    match input {
        ProcInput::Bytes(b) => writer.input(&b).await,
        ProcInput::Close => writer.close_stdin().await,
    }
    .map_err(failed)?;
    // The refusal that ends the attachment says the input was taken.
    writer.detach_acknowledged().await.map_err(failed)?;
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match reader.next().await {
                Ok(TerminalEvent::Exit(_)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    if acked.is_err() {
        return Err(ConnectError::new(
            "deadline_exceeded",
            "the process did not take the input in time",
        ));
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SignalMsg {
    process: Selector,
    signal: Value,
}

async fn send_signal(
    server: &Arc<Server>,
    envd: &Envd,
    bytes: &[u8],
) -> Result<Value, ConnectError> {
    let m: SignalMsg = connect::parse(bytes)?;
    let signal = match &m.signal {
        Value::String(s) if s == "SIGNAL_SIGKILL" => 9,
        Value::String(s) if s == "SIGNAL_SIGTERM" => 15,
        Value::Number(n) if n.as_i64() == Some(9) || n.as_i64() == Some(15) => {
            n.as_i64().unwrap_or(9) as i32
        }
        _ => {
            return Err(ConnectError::new(
                "invalid_argument",
                "signal must be SIGNAL_SIGKILL or SIGNAL_SIGTERM",
            ));
        }
    };
    let (agent, _guard, _) = lifecycle::running_agent(server, &envd.sb).await?;
    let info = find_process(server, &agent, envd.sb.id(), &m.process).await?;
    agent
        .terminal_kill(&info.id, Some(signal))
        .await
        .map_err(failed)?;
    // A SIGKILLed process is gone once this answers (the SDK lists right after a kill): wait
    // a little for the agent to record its exit.
    if signal == 9 {
        for _ in 0..40 {
            let list = agent.terminal_list().await.map_err(failed)?;
            if !list
                .iter()
                .any(|t| t.id == info.id && t.exit_code.is_none())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(json!({}))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct InputMsg {
    process: Selector,
    input: BTreeMap<String, String>,
}

async fn send_input(
    server: &Arc<Server>,
    envd: &Envd,
    bytes: &[u8],
) -> Result<Value, ConnectError> {
    let m: InputMsg = connect::parse(bytes)?;
    let data = match (m.input.get("stdin"), m.input.get("pty")) {
        (Some(b), None) | (None, Some(b)) => B64
            .decode(b)
            .map_err(|_| ConnectError::new("invalid_argument", "input is not base64"))?,
        _ => {
            return Err(ConnectError::new(
                "invalid_argument",
                "input must be one of stdin and pty",
            ));
        }
    };
    if data.len() > connect::MAX_MESSAGE {
        return Err(ConnectError::new(
            "resource_exhausted",
            "input is too large",
        ));
    }
    give_input(server, envd, &m.process, ProcInput::Bytes(data)).await?;
    Ok(json!({}))
}

async fn close_stdin(
    server: &Arc<Server>,
    envd: &Envd,
    bytes: &[u8],
) -> Result<Value, ConnectError> {
    #[derive(Debug, Default, Deserialize)]
    #[serde(default)]
    struct Msg {
        process: Selector,
    }
    let m: Msg = connect::parse(bytes)?;
    give_input(server, envd, &m.process, ProcInput::Close).await?;
    Ok(json!({}))
}

/// `Update`: resize a pty.
async fn update(server: &Arc<Server>, envd: &Envd, bytes: &[u8]) -> Result<Value, ConnectError> {
    #[derive(Debug, Default, Deserialize)]
    #[serde(default)]
    struct Msg {
        process: Selector,
        pty: Option<PtyMsg>,
    }
    let m: Msg = connect::parse(bytes)?;
    let Some(pty) = m.pty else {
        return Ok(json!({}));
    };
    let size = pty.size()?;
    let (agent, _guard, _) = lifecycle::running_agent(server, &envd.sb).await?;
    let info = find_process(server, &agent, envd.sb.id(), &m.process).await?;
    if info.pipes {
        return Err(ConnectError::new(
            "failed_precondition",
            "the process has no pty",
        ));
    }
    agent
        .terminal_resize(&info.id, size)
        .await
        .map_err(failed)?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_parses_and_refuses_garbage() {
        let body = b"--XB\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/tmp/a.txt\"\r\nContent-Type: application/octet-stream\r\n\r\nhello\r\n--XB--\r\n";
        let parts = parse_multipart(body, "XB").unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].name.as_deref(), Some("file"));
        assert_eq!(parts[0].filename.as_deref(), Some("/tmp/a.txt"));
        assert_eq!(parts[0].data, b"hello");
        for bad in [
            &b"nothing"[..],
            b"--XB\r\nno headers end",
            b"--XB\r\n\r\nunterminated",
        ] {
            assert!(parse_multipart(bad, "XB").is_err());
        }
    }

    #[test]
    fn permissions_render() {
        assert_eq!(permissions(EntryKind::File, 0o644), "-rw-r--r--");
        assert_eq!(permissions(EntryKind::Dir, 0o755), "drwxr-xr-x");
    }
}

#[cfg(test)]
mod prune_tests {
    use super::*;

    #[tokio::test]
    async fn processes_of_sandboxes_without_a_row_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = sandpit_control::store::Store::open_sqlite(&dir.path().join("t.db"))
            .await
            .unwrap();
        let procs = Processes::default();
        for tid in ["e2b-1", "e2b-2"] {
            procs.lock().insert(
                ("sb0000000000000001".into(), tid.into()),
                ProcMeta {
                    config: json!({}),
                    tag: None,
                    input: None,
                },
            );
        }
        procs.prune(&store).await;
        assert!(procs.lock().is_empty());
    }
}
