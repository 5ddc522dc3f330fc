//! MCP (the Model Context Protocol) at `POST /mcp`: the "Streamable HTTP" transport, answered
//! with `application/json` (never a stream), stateless (no `Mcp-Session-Id`), protocol
//! revisions 2024-11-05 to 2025-11-25 through the `initialize` handshake.
//!
//! Authorization is the REST API's: the request needs an API token (`Authorization: Bearer`),
//! checked before its body is read. Each tool call then runs the equivalent `/v1/...` request
//! through the server's own router in-process, carrying the caller's token, so scopes,
//! workspace checks, rate limits, validation, relaying to another node and errors are exactly
//! the REST API's: a REST error becomes a tool result with `isError: true` carrying its code
//! and message. Malformed JSON-RPC gets a JSON-RPC error (-32700, -32600, -32601, -32602).
//!
//! Every read is bounded: the request body ([`MAX_BODY`]), a batch ([`MAX_BATCH`]), the REST
//! answers a tool reads ([`MAX_FILE_READ`] for a file, [`MAX_REST_BODY`] otherwise) and the
//! command output a tool returns ([`MAX_OUTPUT`] per stream, the rest cut with a flag).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;
use sandpit_api_types::{
    CreateSandboxRequest, EgressPolicy, ErrorBody, ExecRequest, ExecResponse, PreviewPrivacy,
    PreviewTokenCreateRequest, Sandbox, SandboxMode,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tower::ServiceExt;
use tracing::Instrument;

use crate::auth::API_KEY_HEADER;
use crate::server::Server;

/// Where the endpoint answers.
pub const PATH: &str = "/mcp";
/// Largest request body (a `write_file` carries the file in it).
pub const MAX_BODY: usize = 8 << 20;
/// Most messages in one JSON-RPC batch.
pub const MAX_BATCH: usize = 32;
/// Largest file `read_file` returns.
pub const MAX_FILE_READ: usize = 4 << 20;
/// Most bytes of stdout (and of stderr) `run_command` returns.
pub const MAX_OUTPUT: usize = 1 << 20;
/// Largest REST answer a tool reads (an exec's output is capped at 16 MiB per stream, which
/// JSON escaping can make larger).
pub const MAX_REST_BODY: usize = 64 << 20;
/// The protocol revisions `initialize` agrees to, newest first.
pub const PROTOCOL_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

const PROTOCOL_HEADER: &str = "mcp-protocol-version";

// JSON-RPC 2.0 error codes.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const INTERNAL_ERROR: i64 = -32603;
/// A server-defined code: the request carried no valid API token.
const UNAUTHORIZED: i64 = -32001;

/// The MCP route (merged into [`crate::routes::app`]; `GET` and `DELETE` get the app's 405).
pub fn router() -> Router<Arc<Server>> {
    Router::new().route(PATH, post(handle))
}

/// A JSON-RPC error object (protocol-level: the request itself is wrong).
#[derive(Debug)]
struct RpcError {
    code: i64,
    message: String,
    data: Option<Value>,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }
    fn params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message)
    }
    fn to_value(&self) -> Value {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(data) = &self.data {
            e["data"] = data.clone();
        }
        e
    }
}

/// A failed tool call: the REST API's status, code and message (or one in the same shape).
#[derive(Debug)]
struct ToolFailure {
    status: u16,
    code: String,
    message: String,
}

impl ToolFailure {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ToolFailure {
            status: status.as_u16(),
            code: code.to_string(),
            message: message.into(),
        }
    }
}

impl From<crate::error::ApiError> for ToolFailure {
    fn from(e: crate::error::ApiError) -> Self {
        ToolFailure::new(e.status, e.code, e.message)
    }
}

/// A whole HTTP answer that is one JSON-RPC error without an id.
fn http_error(status: StatusCode, err: RpcError) -> Response {
    let body = json!({"jsonrpc": "2.0", "id": Value::Null, "error": err.to_value()});
    (status, axum::Json(body)).into_response()
}

async fn handle(State(server): State<Arc<Server>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    // Authorize before anything: the body is not even read for an unknown caller.
    if parts.extensions.get::<crate::auth::Auth>().is_none()
        && let Err(e) = crate::auth::resolve(&server, &parts.headers).await
    {
        let mut err = RpcError::new(UNAUTHORIZED, e.message);
        if e.status != StatusCode::UNAUTHORIZED {
            err.code = INTERNAL_ERROR;
        }
        err.data = Some(json!({"code": e.code, "status": e.status.as_u16()}));
        let unauthorized = e.status == StatusCode::UNAUTHORIZED;
        let mut resp = http_error(e.status, err);
        if unauthorized {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        return resp;
    }
    if let Some(v) = parts.headers.get(PROTOCOL_HEADER)
        && !PROTOCOL_VERSIONS
            .iter()
            .any(|p| v.as_bytes() == p.as_bytes())
    {
        let mut err = RpcError::new(
            INVALID_REQUEST,
            format!(
                "unsupported MCP-Protocol-Version {:?}; this server speaks {}",
                String::from_utf8_lossy(v.as_bytes()),
                PROTOCOL_VERSIONS.join(", ")
            ),
        );
        err.data = Some(json!({"supported": PROTOCOL_VERSIONS}));
        return http_error(StatusCode::BAD_REQUEST, err);
    }
    let json_body = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json_body {
        return http_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            RpcError::new(INVALID_REQUEST, "Content-Type must be application/json"),
        );
    }
    let bytes = match read_bounded(body, MAX_BODY).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return http_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                RpcError::new(
                    INVALID_REQUEST,
                    format!("the body exceeds {MAX_BODY} bytes"),
                ),
            );
        }
        Err(BodyError::Broken(e)) => {
            return http_error(
                StatusCode::BAD_REQUEST,
                RpcError::new(INVALID_REQUEST, format!("the body could not be read: {e}")),
            );
        }
    };
    let message: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return http_error(
                StatusCode::BAD_REQUEST,
                RpcError::new(PARSE_ERROR, format!("the body is not JSON: {e}")),
            );
        }
    };
    let caller = Caller::new(server, &parts);
    match message {
        Value::Array(batch) => {
            if batch.is_empty() || batch.len() > MAX_BATCH {
                return http_error(
                    StatusCode::BAD_REQUEST,
                    RpcError::new(
                        INVALID_REQUEST,
                        format!("a batch holds 1 to {MAX_BATCH} messages"),
                    ),
                );
            }
            let mut answers = Vec::new();
            for m in batch {
                match message_kind(m) {
                    Ok(Some(req)) => answers.push(caller.answer(req).await),
                    Ok(None) => {}
                    Err(e) => answers.push(error_reply(Value::Null, e)),
                }
            }
            if answers.is_empty() {
                return StatusCode::ACCEPTED.into_response();
            }
            axum::Json(Value::Array(answers)).into_response()
        }
        m => match message_kind(m) {
            Ok(Some(req)) => axum::Json(caller.answer(req).await).into_response(),
            Ok(None) => StatusCode::ACCEPTED.into_response(),
            Err(e) => http_error(StatusCode::BAD_REQUEST, e),
        },
    }
}

/// A JSON-RPC request (a message with a method and an id).
struct RpcRequest {
    id: Value,
    method: String,
    params: Map<String, Value>,
}

/// A request to answer, `None` for a notification or a response (nothing to answer), or
/// why the message is not JSON-RPC.
fn message_kind(message: Value) -> Result<Option<RpcRequest>, RpcError> {
    let Value::Object(mut m) = message else {
        return Err(RpcError::new(
            INVALID_REQUEST,
            "a message must be a JSON-RPC object",
        ));
    };
    if m.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(RpcError::new(
            INVALID_REQUEST,
            "\"jsonrpc\" must be \"2.0\"",
        ));
    }
    let id = m.remove("id");
    if let Some(id) = &id
        && !(id.is_string() || id.is_i64() || id.is_u64())
    {
        return Err(RpcError::new(
            INVALID_REQUEST,
            "\"id\" must be a string or an integer",
        ));
    }
    let Some(method) = m.remove("method") else {
        // A response to a request of ours (this server sends none): nothing to answer.
        return if id.is_some() && (m.contains_key("result") || m.contains_key("error")) {
            Ok(None)
        } else {
            Err(RpcError::new(
                INVALID_REQUEST,
                "a request needs a \"method\"",
            ))
        };
    };
    let Value::String(method) = method else {
        return Err(RpcError::new(
            INVALID_REQUEST,
            "\"method\" must be a string",
        ));
    };
    let params = match m.remove("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => {
            return Err(RpcError::new(
                INVALID_REQUEST,
                "\"params\" must be an object",
            ));
        }
    };
    Ok(id.map(|id| RpcRequest { id, method, params }))
}

fn error_reply(id: Value, e: RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": e.to_value()})
}

/// Who called, for the REST requests the tools make on their behalf.
struct Caller {
    server: Arc<Server>,
    /// The caller's token headers, passed on as they came.
    credentials: Vec<(header::HeaderName, HeaderValue)>,
    /// The client's address (failed-token accounting of the rate limiter).
    client: Option<ConnectInfo<SocketAddr>>,
    /// The port the client reached this server on, for preview URLs.
    port: Option<u16>,
}

impl Caller {
    fn new(server: Arc<Server>, parts: &axum::http::request::Parts) -> Self {
        let credentials = [
            header::AUTHORIZATION,
            header::HeaderName::from_static(API_KEY_HEADER),
        ]
        .into_iter()
        .filter_map(|name| parts.headers.get(&name).map(|v| (name, v.clone())))
        .collect();
        Caller {
            server,
            credentials,
            client: parts.extensions.get::<ConnectInfo<SocketAddr>>().cloned(),
            port: host_port(&parts.headers, parts.uri.authority()),
        }
    }

    async fn answer(&self, req: RpcRequest) -> Value {
        match self.dispatch(&req.method, req.params).await {
            Ok(result) => json!({"jsonrpc": "2.0", "id": req.id, "result": result}),
            Err(e) => error_reply(req.id, e),
        }
    }

    async fn dispatch(&self, method: &str, params: Map<String, Value>) -> Result<Value, RpcError> {
        match method {
            "initialize" => initialize(&params),
            "ping" => Ok(json!({})),
            "tools/list" => Ok(json!({"tools": tool_list()})),
            "tools/call" => {
                let name = match params.get("name") {
                    Some(Value::String(n)) => n.clone(),
                    _ => return Err(RpcError::params("tools/call needs a \"name\" string")),
                };
                let args = match params.get("arguments") {
                    None | Some(Value::Null) => Map::new(),
                    Some(Value::Object(a)) => a.clone(),
                    Some(_) => return Err(RpcError::params("\"arguments\" must be an object")),
                };
                let outcome = self.call(&name, args).await?;
                Ok(tool_result(outcome))
            }
            // Lists this server has nothing in (clients may ask whatever it announced).
            // Not announced, but some clients list them anyway: nothing here but tools.
            "resources/list" => Ok(json!({"resources": []})),
            "resources/templates/list" => Ok(json!({"resourceTemplates": []})),
            "prompts/list" => Ok(json!({"prompts": []})),
            other => Err(RpcError::new(
                METHOD_NOT_FOUND,
                format!("unknown method {other:?}"),
            )),
        }
    }

    /// Run one tool: `Err` when the call itself is malformed (unknown tool, arguments not of
    /// its schema), `Ok(Err)` when the operation failed.
    async fn call(
        &self,
        name: &str,
        args: Map<String, Value>,
    ) -> Result<Result<Value, ToolFailure>, RpcError> {
        let args = Value::Object(args);
        Ok(match name {
            "create_sandbox" => self.create_sandbox(parse_args(args)?).await,
            "list_sandboxes" => self.list_sandboxes(parse_args(args)?).await,
            "run_command" => self.run_command(parse_args(args)?).await,
            "read_file" => self.read_file(parse_args(args)?).await,
            "write_file" => self.write_file(parse_args(args)?).await,
            "list_files" => self.list_files(parse_args(args)?).await,
            "preview_url" => self.preview_url(parse_args(args)?).await,
            "hibernate" => {
                let a: IdArgs = parse_args(args)?;
                let path = format!("/v1/sandboxes/{}/hibernate", a.sandbox_id);
                self.rest_json::<Sandbox>(Method::POST, &path, None)
                    .await
                    .map(|s| sandbox_view(&s))
            }
            "destroy" => {
                let a: IdArgs = parse_args(args)?;
                let id = a.sandbox_id;
                self.rest(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
                    .await
                    .map(|_| json!({"id": id.0, "destroyed": true}))
            }
            other => return Err(RpcError::params(format!("unknown tool {other:?}"))),
        })
    }

    async fn create_sandbox(&self, a: CreateArgs) -> Result<Value, ToolFailure> {
        let req = CreateSandboxRequest {
            template: a.template.unwrap_or_else(|| "base".into()),
            mode: a.mode.unwrap_or_default(),
            timeout: a.timeout,
            idle_timeout: a.idle_timeout,
            env: a.env,
            metadata: a.metadata,
            egress: a.egress,
            size: a.size,
            ..Default::default()
        };
        let body = serde_json::to_value(&req).map_err(internal)?;
        let s: Sandbox = self
            .rest_json(Method::POST, "/v1/sandboxes", Some(body))
            .await?;
        Ok(sandbox_view(&s))
    }

    async fn list_sandboxes(&self, a: ListArgs) -> Result<Value, ToolFailure> {
        let mut path = "/v1/sandboxes".to_string();
        if let Some(status) = &a.status {
            path.push('?');
            path.push_str(&query(&[("status", status)]));
        }
        let list: sandpit_api_types::SandboxList = self.rest_json(Method::GET, &path, None).await?;
        let sandboxes: Vec<Value> = list.sandboxes.iter().map(sandbox_view).collect();
        Ok(json!({"sandboxes": sandboxes}))
    }

    async fn run_command(&self, a: RunArgs) -> Result<Value, ToolFailure> {
        let id = &a.sandbox_id;
        let req = ExecRequest {
            command: Some(a.command),
            timeout: a.timeout,
            cwd: a.cwd,
            env: a.env,
            user: a.user,
            ..Default::default()
        };
        let body = serde_json::to_value(&req).map_err(internal)?;
        let out: ExecResponse = self
            .rest_json(
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                Some(body),
            )
            .await?;
        let (stdout, stdout_truncated) = cut(out.stdout, MAX_OUTPUT);
        let (stderr, stderr_truncated) = cut(out.stderr, MAX_OUTPUT);
        Ok(json!({
            "exit_code": out.exit_code,
            "stdout": stdout,
            "stderr": stderr,
            "stdout_truncated": stdout_truncated,
            "stderr_truncated": stderr_truncated,
            "timed_out": out.timed_out,
            "duration_ms": out.duration_ms,
        }))
    }

    async fn read_file(&self, a: ReadArgs) -> Result<Value, ToolFailure> {
        let id = &a.sandbox_id;
        let path = format!("/v1/sandboxes/{id}/files?{}", query(&[("path", &a.path)]));
        let bytes = self
            .rest_limited(Method::GET, &path, None, MAX_FILE_READ)
            .await?;
        let (encoding, content) = match (a.encoding.as_deref(), std::str::from_utf8(&bytes)) {
            (Some("base64"), _) | (None, Err(_)) => ("base64", B64.encode(&bytes)),
            (_, Ok(text)) => ("utf8", text.to_string()),
            (Some(_), Err(_)) => {
                return Err(ToolFailure::new(
                    StatusCode::BAD_REQUEST,
                    "not_utf8",
                    "the file is not UTF-8 text; read it with encoding \"base64\"",
                ));
            }
        };
        Ok(json!({"path": a.path, "size": bytes.len(), "encoding": encoding, "content": content}))
    }

    async fn write_file(&self, a: WriteArgs) -> Result<Value, ToolFailure> {
        let id = &a.sandbox_id;
        let data = match a.encoding.as_deref() {
            None | Some("utf8") => a.content.into_bytes(),
            Some("base64") => B64.decode(a.content.as_bytes()).map_err(|e| {
                ToolFailure::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_base64",
                    format!("content is not base64: {e}"),
                )
            })?,
            Some(other) => {
                return Err(ToolFailure::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_encoding",
                    format!("encoding {other:?} is not utf8 or base64"),
                ));
            }
        };
        let len = data.len();
        let path = format!("/v1/sandboxes/{id}/files?{}", query(&[("path", &a.path)]));
        self.rest(Method::PUT, &path, Some(Upload::Bytes(data.into())))
            .await?;
        Ok(json!({"path": a.path, "bytes_written": len}))
    }

    async fn list_files(&self, a: ListFilesArgs) -> Result<Value, ToolFailure> {
        let id = &a.sandbox_id;
        let dir = a.path.unwrap_or_else(|| "/".into());
        let path = format!("/v1/sandboxes/{id}/files/list?{}", query(&[("path", &dir)]));
        let list: sandpit_api_types::FileList = self.rest_json(Method::GET, &path, None).await?;
        serde_json::to_value(&list).map_err(internal)
    }

    async fn preview_url(&self, a: PreviewArgs) -> Result<Value, ToolFailure> {
        let id = &a.sandbox_id;
        let port = crate::routes::ports::parse_port(&a.port.to_string())?;
        // The REST lookup authorizes (this workspace's sandbox, the token's scopes).
        let sb: Sandbox = self
            .rest_json(Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .await?;
        let host = format!("{id}-{port}.{}", self.server.cfg.preview_domain);
        let authority = match self.port {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let mut url = format!("http://{authority}/");
        let mut out = json!({
            "url": "",
            "host": host,
            "port": port,
            "privacy": sb.preview.privacy.as_str(),
        });
        if sb.preview.privacy == PreviewPrivacy::Private {
            let body = serde_json::to_value(PreviewTokenCreateRequest {
                expires_at: a.token_expires_at,
            })
            .map_err(internal)?;
            let token: sandpit_api_types::PreviewToken = self
                .rest_json(
                    Method::POST,
                    &format!("/v1/sandboxes/{id}/preview-tokens"),
                    Some(body),
                )
                .await?;
            let secret = token.token.unwrap_or_default();
            url.push('?');
            url.push_str(&query(&[(crate::preview::TOKEN_QUERY, &secret)]));
            out["token_id"] = json!(token.token_id);
            out["token_expires_at"] = json!(token.expires_at);
        }
        out["url"] = json!(url);
        Ok(out)
    }

    /// A REST call whose 2xx answer is `T` as JSON.
    async fn rest_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<T, ToolFailure> {
        let bytes = self.rest(method, path, body.map(Upload::Json)).await?;
        serde_json::from_slice(&bytes).map_err(internal)
    }

    async fn rest(
        &self,
        method: Method,
        path: &str,
        body: Option<Upload>,
    ) -> Result<Bytes, ToolFailure> {
        self.rest_limited(method, path, body, MAX_REST_BODY).await
    }

    /// Run `method path` through the app (the same router, middleware and extractors as a
    /// request from outside) with the caller's token; the 2xx body read up to `limit` bytes,
    /// anything else as the REST error it is.
    async fn rest_limited(
        &self,
        method: Method,
        path: &str,
        body: Option<Upload>,
        limit: usize,
    ) -> Result<Bytes, ToolFailure> {
        let mut req = Request::builder().method(method).uri(path);
        for (name, value) in &self.credentials {
            req = req.header(name, value);
        }
        let body = match body {
            None => Body::empty(),
            Some(Upload::Json(v)) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(serde_json::to_vec(&v).map_err(internal)?)
            }
            Some(Upload::Bytes(b)) => {
                req = req
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header(header::CONTENT_LENGTH, b.len());
                Body::from(b)
            }
        };
        let mut req = req.body(body).map_err(internal)?;
        if let Some(client) = &self.client {
            req.extensions_mut().insert(*client);
        }
        // The call runs as a task of its own: polled from the runtime, not from inside this
        // handler's poll, its stack is as deep as the same request's from outside. (Nested,
        // a debug build's exec that wakes the sandbox overflowed a 2 MiB worker stack and
        // took the server down.) Dropping this call aborts it, as hyper drops the request
        // of a client that left.
        let app = crate::routes::app(self.server.clone());
        let call = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
            app.oneshot(req).in_current_span(),
        ));
        let resp = match call.await {
            Ok(Ok(resp)) => resp,
            Ok(Err(never)) => match never {},
            Err(e) => return Err(internal(format!("the request's task failed: {e}"))),
        };
        let status = resp.status();
        let declared = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if status.is_success() && declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large(limit));
        }
        let bytes = match read_bounded(resp.into_body(), limit).await {
            Ok(b) => b,
            Err(BodyError::TooLarge) => return Err(too_large(limit)),
            Err(BodyError::Broken(e)) => {
                return Err(ToolFailure::new(
                    StatusCode::BAD_GATEWAY,
                    "response_broken",
                    format!("the answer broke off: {e}"),
                ));
            }
        };
        if status.is_success() {
            return Ok(bytes);
        }
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => ToolFailure {
                status: status.as_u16(),
                code: e.error.code,
                message: e.error.message,
            },
            Err(_) => ToolFailure::new(
                status,
                "http_error",
                format!("the request failed with HTTP {status}"),
            ),
        })
    }
}

enum Upload {
    Json(Value),
    Bytes(Bytes),
}

fn too_large(limit: usize) -> ToolFailure {
    ToolFailure::new(
        StatusCode::BAD_REQUEST,
        "response_too_large",
        format!(
            "the answer exceeds {limit} bytes (read a part of a file with run_command, e.g. head -c)"
        ),
    )
}

fn internal(e: impl std::fmt::Display) -> ToolFailure {
    tracing::error!(error = %e, "mcp tool");
    ToolFailure::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal server error; see the server log",
    )
}

enum BodyError {
    TooLarge,
    Broken(String),
}

/// A body, read whole, refused past `limit` bytes.
async fn read_bounded(body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BodyError::Broken(e.to_string()))?;
        if buf.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.into())
}

/// The port of the request's `Host` (or absolute URI), if it names one.
fn host_port(headers: &HeaderMap, authority: Option<&axum::http::uri::Authority>) -> Option<u16> {
    if let Some(a) = authority {
        return a.port_u16();
    }
    let host = headers.get(header::HOST)?.to_str().ok()?;
    host.parse::<axum::http::uri::Authority>().ok()?.port_u16()
}

fn query(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

/// A sandbox id from a tool's arguments, safe as a path segment: never a `/`, `?`, `%` or
/// `..` that would name another route (anything else is refused as invalid params).
#[derive(Debug)]
struct SandboxId(String);

impl<'de> Deserialize<'de> for SandboxId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let id = String::deserialize(d)?;
        if valid_id(&id) {
            Ok(SandboxId(id))
        } else {
            Err(serde::de::Error::custom(format!(
                "{id:?} is not a sandbox id"
            )))
        }
    }
}

impl std::fmt::Display for SandboxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `s` cut to at most `max` bytes on a character boundary, and whether it was cut.
fn cut(mut s: String, max: usize) -> (String, bool) {
    if s.len() <= max {
        return (s, false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    (s, true)
}

fn parse_args<T: DeserializeOwned>(args: Value) -> Result<T, RpcError> {
    serde_json::from_value(args).map_err(|e| RpcError::params(format!("invalid arguments: {e}")))
}

fn initialize(params: &Map<String, Value>) -> Result<Value, RpcError> {
    let Some(asked) = params.get("protocolVersion").and_then(Value::as_str) else {
        return Err(RpcError::params(
            "initialize needs a \"protocolVersion\" string",
        ));
    };
    // The client's revision when this server speaks it, else the newest it does (the client
    // decides whether it can go on).
    let version = PROTOCOL_VERSIONS
        .iter()
        .find(|v| **v == asked)
        .unwrap_or(&PROTOCOL_VERSIONS[0]);
    Ok(json!({
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": false}},
        "serverInfo": {"name": "sandpit", "title": "Sandpit", "version": env!("CARGO_PKG_VERSION")},
        "instructions": "Sandpit runs untrusted code in gVisor sandboxes. Create one with \
            create_sandbox (template \"base\" unless told otherwise), run shell commands in it \
            with run_command, move files with read_file / write_file / list_files, open a \
            server it runs with preview_url, and destroy it when done. A hibernated sandbox \
            wakes on its next command.",
    }))
}

/// The `tools/call` result of an operation.
fn tool_result(outcome: Result<Value, ToolFailure>) -> Value {
    match outcome {
        Ok(v) => {
            let text = serde_json::to_string_pretty(&v).unwrap_or_default();
            json!({"content": [{"type": "text", "text": text}], "structuredContent": v, "isError": false})
        }
        Err(f) => {
            let err = json!({"error": {"code": f.code, "message": f.message, "status": f.status}});
            json!({
                "content": [{"type": "text", "text": format!("error {} {}: {}", f.status, f.code, f.message)}],
                "structuredContent": err,
                "isError": true,
            })
        }
    }
}

/// What a tool shows of a sandbox.
fn sandbox_view(s: &Sandbox) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    // The other fields are the REST API's; `id` and `status` are what an agent needs most.
    if let Value::Object(m) = &mut v {
        m.remove("image");
    }
    v
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdArgs {
    sandbox_id: SandboxId,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateArgs {
    template: Option<String>,
    mode: Option<SandboxMode>,
    timeout: Option<String>,
    idle_timeout: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    egress: Option<EgressPolicy>,
    size: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    status: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunArgs {
    sandbox_id: SandboxId,
    command: String,
    cwd: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    timeout: Option<String>,
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadArgs {
    sandbox_id: SandboxId,
    path: String,
    encoding: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteArgs {
    sandbox_id: SandboxId,
    path: String,
    content: String,
    encoding: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListFilesArgs {
    sandbox_id: SandboxId,
    path: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewArgs {
    sandbox_id: SandboxId,
    port: u32,
    token_expires_at: Option<String>,
}

/// The tools with their JSON Schemas (`tools/list`).
fn tool_list() -> Value {
    let id = json!({
        "type": "string",
        "description": "The sandbox's id (from create_sandbox or list_sandboxes)",
        "pattern": "^[A-Za-z0-9_-]{1,64}$",
    });
    let path = |what: &str| json!({"type": "string", "description": what});
    let string_map = |what: &str| json!({"type": "object", "additionalProperties": {"type": "string"}, "description": what});
    let duration = |what: &str| json!({"type": "string", "pattern": r"^\s*([0-9]+(ms|s|m|h|d))+\s*$", "description": what});
    let only_id = json!({
        "type": "object",
        "properties": {"sandbox_id": id},
        "required": ["sandbox_id"],
        "additionalProperties": false,
    });
    json!([
        {
            "name": "create_sandbox",
            "title": "Create a sandbox",
            "description": "Create a sandbox from a template and wait until it runs. Returns the sandbox, its `id` among it. Egress (outbound network) follows the template's policy unless `egress` is given: {\"mode\":\"deny_all\"} cuts it off, {\"mode\":\"deny_all\",\"allow_domains\":[\"pypi.org\",\"*.pythonhosted.org\"]} allows only those names' web traffic.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "template": {"type": "string", "description": "Template name or id (default \"base\")"},
                    "mode": {"type": "string", "enum": ["ephemeral", "persistent"], "description": "ephemeral (default): destroyed when its timeout passes; persistent: hibernated when idle, woken on use"},
                    "timeout": duration("Ephemeral: lifetime before it is destroyed, e.g. 30m (max 24h, default 15m)"),
                    "idle_timeout": duration("Persistent: inactivity before it hibernates, e.g. 30m"),
                    "env": string_map("Environment variables for every command"),
                    "metadata": string_map("Labels kept with the sandbox"),
                    "size": {"type": "string", "enum": ["small", "medium", "large"], "description": "CPU, memory and disk preset (default small)"},
                    "egress": {
                        "type": "object",
                        "description": "Outbound network policy",
                        "properties": {
                            "mode": {"type": "string", "enum": ["allow_all", "deny_all"]},
                            "allow_domains": {"type": "array", "items": {"type": "string"}, "description": "With deny_all: names (example.com, *.example.com) whose web traffic (TCP 80/443) and DNS pass"},
                            "allow_cidrs": {"type": "array", "items": {"type": "string"}, "description": "With deny_all: address ranges to allow"},
                            "deny_cidrs": {"type": "array", "items": {"type": "string"}, "description": "Address ranges to block, checked first"},
                            "allow_ports": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 65535}, "description": "Restrict allow_cidrs to these TCP ports"},
                        },
                        "required": ["mode"],
                        "additionalProperties": false,
                    },
                },
                "additionalProperties": false,
            },
        },
        {
            "name": "list_sandboxes",
            "title": "List sandboxes",
            "description": "List this workspace's sandboxes (those not destroyed unless `status` says otherwise).",
            "inputSchema": {
                "type": "object",
                "properties": {"status": {"type": "string", "enum": ["creating", "running", "suspended", "destroyed", "failed"]}},
                "additionalProperties": false,
            },
            "annotations": {"readOnlyHint": true},
        },
        {
            "name": "run_command",
            "title": "Run a command",
            "description": "Run a shell command line (/bin/sh -c) in a sandbox and wait for it. Returns exit_code, stdout and stderr (each cut at 1 MiB). A hibernated sandbox is woken first.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "sandbox_id": id,
                    "command": {"type": "string", "description": "The shell command line"},
                    "cwd": path("Working directory (absolute)"),
                    "env": string_map("Extra environment variables"),
                    "timeout": duration("Kill it after this long, e.g. 30s (max 5m, default 60s)"),
                    "user": {"type": "string", "description": "Run as this user (name, uid, name:group); default the template's"},
                },
                "required": ["sandbox_id", "command"],
                "additionalProperties": false,
            },
        },
        {
            "name": "read_file",
            "title": "Read a file",
            "description": "Read a file of a sandbox (at most 4 MiB). Returns its content as UTF-8 text, or base64 when it is not text or when asked.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "sandbox_id": id,
                    "path": path("Absolute path of the file"),
                    "encoding": {"type": "string", "enum": ["utf8", "base64"], "description": "Default: utf8 when the file is text, else base64"},
                },
                "required": ["sandbox_id", "path"],
                "additionalProperties": false,
            },
            "annotations": {"readOnlyHint": true},
        },
        {
            "name": "write_file",
            "title": "Write a file",
            "description": "Write a file in a sandbox (created or replaced whole, parent directories made).",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "sandbox_id": id,
                    "path": path("Absolute path of the file"),
                    "content": {"type": "string", "description": "The file's content"},
                    "encoding": {"type": "string", "enum": ["utf8", "base64"], "description": "How content is encoded (default utf8)"},
                },
                "required": ["sandbox_id", "path", "content"],
                "additionalProperties": false,
            },
        },
        {
            "name": "list_files",
            "title": "List a directory",
            "description": "List a directory of a sandbox: name, kind (file, dir, symlink, other), size, mode, modified_at.",
            "inputSchema": {
                "type": "object",
                "properties": {"sandbox_id": id, "path": path("Absolute path of the directory (default /)")},
                "required": ["sandbox_id"],
                "additionalProperties": false,
            },
            "annotations": {"readOnlyHint": true},
        },
        {
            "name": "preview_url",
            "title": "Preview URL of a port",
            "description": "The URL at which a sandbox's HTTP server on `port` is reachable through this Sandpit server. For a private sandbox (the default) a preview token is made and put in the URL; the first visit trades it for a cookie.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "sandbox_id": id,
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535, "description": "TCP port the sandbox listens on"},
                    "token_expires_at": {"type": "string", "format": "date-time", "description": "When the preview token stops working (RFC 3339; default never: revoke it through the API)"},
                },
                "required": ["sandbox_id", "port"],
                "additionalProperties": false,
            },
        },
        {
            "name": "hibernate",
            "title": "Hibernate a sandbox",
            "description": "Save a sandbox's memory and files to disk and stop it; it costs no CPU or memory until its next command, which wakes it with its processes.",
            "inputSchema": only_id,
        },
        {
            "name": "destroy",
            "title": "Destroy a sandbox",
            "description": "Destroy a sandbox and everything in it.",
            "inputSchema": only_id,
            "annotations": {"destructiveHint": true},
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_classified() {
        let req = message_kind(json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
            .expect("valid")
            .expect("a request");
        assert_eq!(req.method, "ping");
        assert_eq!(req.id, json!(1));
        // A notification and a response: nothing to answer.
        assert!(
            message_kind(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
                .expect("valid")
                .is_none()
        );
        assert!(
            message_kind(json!({"jsonrpc": "2.0", "id": "s1", "result": {}}))
                .expect("valid")
                .is_none()
        );
        for bad in [
            json!([1]),
            json!("ping"),
            json!({"id": 1, "method": "ping"}),
            json!({"jsonrpc": "1.0", "id": 1, "method": "ping"}),
            json!({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}),
            json!({"jsonrpc": "2.0", "id": {}, "method": "ping"}),
            json!({"jsonrpc": "2.0", "id": 1, "method": 7}),
            json!({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": [1]}),
            json!({"jsonrpc": "2.0", "id": 1}),
        ] {
            let e = message_kind(bad.clone())
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert_eq!(e.code, INVALID_REQUEST, "{bad}");
        }
    }

    #[test]
    fn initialize_agrees_on_a_revision() {
        for v in PROTOCOL_VERSIONS {
            let mut p = Map::new();
            p.insert("protocolVersion".into(), json!(v));
            assert_eq!(initialize(&p).expect("ok")["protocolVersion"], json!(v));
        }
        let mut p = Map::new();
        p.insert("protocolVersion".into(), json!("1999-01-01"));
        assert_eq!(
            initialize(&p).expect("ok")["protocolVersion"],
            json!(PROTOCOL_VERSIONS[0])
        );
        assert_eq!(
            initialize(&Map::new()).expect_err("refused").code,
            INVALID_PARAMS
        );
    }

    #[test]
    fn ids_cannot_name_another_route() {
        assert!(valid_id("sb0123456789abcdef"));
        for bad in [
            "",
            "../templates",
            "a/b",
            "a?b",
            "a%2Fb",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(!valid_id(bad), "{bad}");
            let args = json!({"sandbox_id": bad});
            let e = parse_args::<IdArgs>(args).expect_err("refused");
            assert_eq!(e.code, INVALID_PARAMS);
        }
    }

    #[test]
    fn output_is_cut_on_a_character_boundary() {
        assert_eq!(cut("abc".into(), 3), ("abc".into(), false));
        assert_eq!(cut("héllo".into(), 2), ("h".into(), true));
        assert_eq!(cut("héllo".into(), 3), ("hé".into(), true));
    }

    #[test]
    fn every_tool_has_an_object_schema_and_a_handler_name() {
        let tools = tool_list();
        let names: Vec<&str> = tools
            .as_array()
            .expect("array")
            .iter()
            .map(|t| {
                assert_eq!(t["inputSchema"]["type"], "object", "{t}");
                assert!(
                    t["description"].as_str().is_some_and(|d| !d.is_empty()),
                    "{t}"
                );
                t["name"].as_str().expect("name")
            })
            .collect();
        assert_eq!(
            names,
            [
                "create_sandbox",
                "list_sandboxes",
                "run_command",
                "read_file",
                "write_file",
                "list_files",
                "preview_url",
                "hibernate",
                "destroy"
            ]
        );
    }
}
