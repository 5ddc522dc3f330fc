//! Previews: requests for `http://<sandbox id>-<port>.<preview domain>` that reach the
//! server's own listener are reverse-proxied to `<sandbox address>:<port>` (HTTP/1.1,
//! WebSocket and other upgrades included); every other Host goes to the API.
//!
//! Private sandboxes need a preview token of that sandbox: query `preview_token` (answered
//! with a redirect that stores it in the cookie and drops it from the URL), header
//! `csb-preview-token`, or cookie `csb_preview_token`. The token never reaches the sandbox.
//! The check (token, or public) comes before anything else: no touch, wake, lock or
//! connection for a request that fails it.
//!
//! Every preview host is another tenant's origin under one shared domain, so:
//! - the redirect that stores a query token goes to a path on the same host, never to a
//!   host a crafted path names (`//evil.example/` is not a path, [`same_host_location`]);
//! - the token cookie is host-only (no `Domain`): it reaches the one preview host that set
//!   it, and a sandbox's own `Set-Cookie` is made host-only too ([`host_only_set_cookie`]),
//!   so no preview can plant or read cookies of its neighbours; when several token cookies
//!   arrive (a sibling planted one anyway), each is tried;
//! - an upgrade (WebSocket) to a private preview authorized by the cookie must come from a
//!   page of that preview host ([`upgrade_origin_allowed`]): browsers attach cookies to
//!   cross-site WebSocket handshakes, so without it any page could open the socket with the
//!   victim's cookie.
//!
//! A request to a suspended sandbox wakes it (unless the server runs with `--preview-wake
//! false`: 503 `sandbox_suspended`). Proxied connections do not hold the sandbox's
//! lock (a long-lived WebSocket would block hibernation forever); instead every connection to
//! a sandbox is registered in [`Previews`], and `lifecycle::suspend` cuts them all, with
//! resets, before it checkpoints: gVisor refuses to checkpoint a sandbox holding a connected
//! TCP endpoint, and a refused checkpoint kills the sandbox.
//!
//! Invariant: every socket to a sandbox is closed with a reset (`SO_LINGER` 0, never
//! `shutdown`), like agent connections.

use crate::csb_store::CsbTables;
use sandpit_control::Status;
use sandpit_control::live::ConnGuard;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use sandpit_api_types::{ErrorBody, ErrorDetail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::auth::hash_token;
use crate::error::DisplayChain;
use crate::server::Server;
use crate::store::Sandbox;
use crate::util::now_ms;

/// Query parameter carrying a preview token.
pub const TOKEN_QUERY: &str = "preview_token";
/// Header carrying a preview token.
pub const TOKEN_HEADER: &str = "csb-preview-token";
/// Cookie carrying a preview token.
pub const TOKEN_COOKIE: &str = "csb_preview_token";

/// How long connecting to a sandbox port may take (a closed port answers with a reset at
/// once; this bounds a sandbox that does not answer at all).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After one side of an upgraded connection ends, how long the other may still drain.
const DRAIN: Duration = Duration::from_secs(2);

/// The sandbox and port a Host names: `<sb + 16 hex>-<port>.<domain>`, with or without a
/// `:port` suffix, case-insensitive.
pub fn parse_host(host: &str, domain: &str) -> Option<(String, u16)> {
    if host.starts_with('[') {
        return None;
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => host,
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let label = name.strip_suffix(&domain)?.strip_suffix('.')?;
    let (id, port) = label.rsplit_once('-')?;
    let hex = id.strip_prefix("sb")?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    Some((id.to_string(), port))
}

/// The host a request names: its URI's authority (HTTP/2) or its `Host` header.
fn host_of(req: &Request) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// Middleware: preview hosts go to the proxy, everything else to `next` (the API).
pub async fn route_by_host(
    State(server): State<Arc<Server>>,
    req: Request,
    next: Next,
) -> Response {
    let host = req.uri().host().map(str::to_string).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
    });
    match host
        .as_deref()
        .and_then(|h| parse_host(h, &server.cfg.preview_domain))
    {
        Some((id, port)) => proxy(server, req, &id, port).await,
        None => next.run(req).await,
    }
}

/// An error page: HTML for browsers, the API's JSON error body otherwise.
fn page(html: bool, status: StatusCode, code: &str, message: &str) -> Response {
    if html {
        let esc = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        let body = format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{status}</title></head>\
             <body style=\"font-family:sans-serif;max-width:40em;margin:4em auto\">\
             <h1>{status}</h1><p>{}</p><p><code>{}</code></p></body></html>\n",
            esc(message),
            esc(code)
        );
        return (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response();
    }
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.to_string(),
            message: message.to_string(),
        },
    };
    (status, axum::Json(body)).into_response()
}

fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

/// Split the preview token out of a query string: (token, the rest).
fn split_query(query: Option<&str>) -> (Option<String>, String) {
    let Some(query) = query else {
        return (None, String::new());
    };
    let mut token = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == TOKEN_QUERY {
            token = Some(v.to_string());
        } else {
            rest.push(pair);
        }
    }
    (token, rest.join("&"))
}

/// Most token cookies tried on one request (a browser sends one per matching cookie).
const MAX_COOKIE_TOKENS: usize = 4;

/// The preview tokens from the cookie headers (every cookie of that name, non-empty), and
/// the header without them.
fn split_cookies(headers: &HeaderMap) -> (Vec<String>, Option<String>) {
    let mut tokens = Vec::new();
    let mut rest = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some((k, v)) if k.trim() == TOKEN_COOKIE => {
                    let v = v.trim();
                    if !v.is_empty() && tokens.len() < MAX_COOKIE_TOKENS {
                        tokens.push(v.to_string());
                    }
                }
                _ => rest.push(pair),
            }
        }
    }
    let rest = (!rest.is_empty()).then(|| rest.join("; "));
    (tokens, rest)
}

/// Where the redirect that stores a query token sends the browser: the request's path and
/// the rest of its query, on the same host. A path that starts with `//` or `/\` would be
/// read by a browser as another host (`//evil.example/` is protocol-relative), so leading
/// slashes and backslashes collapse into one `/`.
pub fn same_host_location(path: &str, query: &str) -> String {
    let rest = path.trim_start_matches(['/', '\\']);
    let mut location = format!("/{rest}");
    if !query.is_empty() {
        location.push('?');
        location.push_str(query);
    }
    location
}

/// The `Set-Cookie` value that stores a preview token: host-only (no `Domain`, so it goes
/// back to this one preview host and to no sibling under the preview domain), for every
/// path, out of scripts' reach, not sent on cross-site subrequests, `Secure` when the
/// client came over TLS, and no longer lived than the token.
pub fn token_cookie(token: &str, max_age_secs: Option<i64>, secure: bool) -> String {
    let mut cookie = format!("{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax");
    if secure {
        cookie.push_str("; Secure");
    }
    if let Some(secs) = max_age_secs {
        cookie.push_str(&format!("; Max-Age={}", secs.max(1)));
    }
    cookie
}

/// A sandbox's `Set-Cookie`, made host-only: its `Domain` attribute is dropped, so a preview
/// cannot set cookies for its neighbours under the preview domain. `None` (the header is
/// dropped) for a cookie named like the preview token cookie.
pub fn host_only_set_cookie(value: &str) -> Option<String> {
    let mut parts = value.split(';');
    let first = parts.next()?.trim();
    let name = first.split_once('=').map_or(first, |(k, _)| k).trim();
    if name.eq_ignore_ascii_case(TOKEN_COOKIE) {
        return None;
    }
    let kept: Vec<&str> = std::iter::once(first)
        .chain(parts.map(str::trim).filter(|attr| {
            let key = attr.split_once('=').map_or(*attr, |(k, _)| k).trim();
            !attr.is_empty() && !key.eq_ignore_ascii_case("domain")
        }))
        .collect();
    Some(kept.join("; "))
}

/// Whether an upgrade to a private preview authorized by the token cookie may proceed: a
/// browser names the page that opens a WebSocket in `Origin` and attaches the cookie even
/// when that page is another site (or another tenant's preview), so the page must be on the
/// preview's own host. No `Origin` (not a browser): allowed, the client presented the
/// cookie itself.
pub fn upgrade_origin_allowed(headers: &HeaderMap, host: &str) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false; // `null` (sandboxed frames, file pages) and garbage
    };
    if !matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") {
        return false;
    }
    let normalize = |h: &str| h.trim().trim_end_matches('/').to_ascii_lowercase();
    let (o, h) = (normalize(authority), normalize(host));
    if o == h {
        return true;
    }
    // An origin omits the scheme's default port; the Host header may name it.
    let strip_default = |a: &str| {
        a.strip_suffix(":80")
            .or_else(|| a.strip_suffix(":443"))
            .map(str::to_string)
            .unwrap_or_else(|| a.to_string())
    };
    strip_default(&o) == strip_default(&h)
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Make every cookie a sandbox sets host-only (see [`host_only_set_cookie`]).
fn host_only_cookies(headers: &mut HeaderMap) {
    let cookies: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .cloned()
        .collect();
    if cookies.is_empty() {
        return;
    }
    headers.remove(header::SET_COOKIE);
    for c in cookies {
        if let Some(v) = c
            .to_str()
            .ok()
            .and_then(host_only_set_cookie)
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            headers.append(header::SET_COOKIE, v);
        }
    }
}

/// Remove hop-by-hop headers, including those the Connection header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(name);
    }
}

pub(crate) fn upgrade_of(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|s| s.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// Why a preview request was refused: status, code, message.
type Refusal = (StatusCode, &'static str, String);

/// Check a preview token against the sandbox. Returns its expiry.
async fn check_token(server: &Server, row: &Sandbox, token: &str) -> Result<Option<i64>, Refusal> {
    let unauthorized = |code, message: &str| (StatusCode::UNAUTHORIZED, code, message.to_string());
    let found = server
        .store
        .previews
        .token_by_hash(&row.id, &hash_token(token))
        .await
        .map_err(|e| {
            tracing::error!(error = %DisplayChain(&e), "looking up a preview token");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal server error; see the server log".to_string(),
            )
        })?;
    let Some(t) = found.filter(|t| t.workspace_id == row.workspace_id) else {
        return Err(unauthorized(
            "preview_token_invalid",
            "this preview token is not valid for this sandbox",
        ));
    };
    if t.revoked_at.is_some() {
        return Err(unauthorized(
            "preview_token_revoked",
            "this preview token was revoked",
        ));
    }
    if t.expires_at.is_some_and(|at| at <= now_ms()) {
        return Err(unauthorized(
            "preview_token_expired",
            "this preview token has expired",
        ));
    }
    Ok(t.expires_at)
}

/// Serve a request for port `port` of sandbox `id` (a preview host, or E2B's
/// `<port>-<id>` host): every check of the module docs first.
pub(crate) async fn proxy(server: Arc<Server>, req: Request, id: &str, port: u16) -> Response {
    let html = wants_html(req.headers());
    let refuse = |(status, code, message): Refusal| page(html, status, code, &message);
    let not_found = || {
        refuse((
            StatusCode::NOT_FOUND,
            "preview_not_found",
            format!("there is no preview {id}-{port}"),
        ))
    };
    if port == sandpit_agent_proto::AGENT_PORT {
        return not_found();
    }
    let row = match server.store.sandboxes.get(id).await {
        Ok(Some(row)) if !matches!(row.status, Status::Destroyed | Status::Failed) => row,
        Ok(_) => return not_found(),
        Err(e) => {
            tracing::error!(error = %DisplayChain(&e), "preview: reading the sandbox");
            return refuse((
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal server error; see the server log".into(),
            ));
        }
    };

    let (query_token, rest_query) = split_query(req.uri().query());
    let header_token = req
        .headers()
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (cookie_tokens, other_cookies) = split_cookies(req.headers());
    // A page on one of the workspace's trusted preview hosts needs no token (seed 000).
    if row.preview_privacy != sandpit_api_types::PreviewPrivacy::Public
        && !trusted_origin(&server, &row.workspace_id, req.headers()).await
    {
        // The query's token, else the header's, else each cookie's until one is valid.
        let (candidates, from_cookie): (Vec<String>, bool) =
            match (query_token.clone(), header_token) {
                (Some(t), _) | (None, Some(t)) => (vec![t], false),
                (None, None) => (cookie_tokens, true),
            };
        let candidates: Vec<String> = candidates.into_iter().filter(|t| !t.is_empty()).collect();
        if candidates.is_empty() {
            return refuse((
                StatusCode::UNAUTHORIZED,
                "preview_token_required",
                format!(
                    "this preview is private: add ?{TOKEN_QUERY}=<token> once (a cookie keeps it), \
                     or send the {TOKEN_HEADER} header"
                ),
            ));
        }
        let mut checked = None;
        for candidate in &candidates {
            match check_token(&server, &row, candidate).await {
                Ok(expiry) => {
                    checked = Some(Ok((candidate.clone(), expiry)));
                    break;
                }
                Err(r) => {
                    if checked.is_none() {
                        checked = Some(Err(r));
                    }
                }
            }
        }
        let (token, expires_at) = match checked.expect("at least one candidate") {
            Ok(found) => found,
            Err(r) => return refuse(r),
        };
        if from_cookie
            && upgrade_of(req.headers()).is_some()
            && !upgrade_origin_allowed(req.headers(), &host_of(&req))
        {
            tracing::warn!(sandbox = id, origin = ?req.headers().get(header::ORIGIN), "preview: cross-origin upgrade refused");
            return refuse((
                StatusCode::FORBIDDEN,
                "preview_origin_forbidden",
                "a WebSocket to a private preview authorized by its cookie must be opened by a \
                 page of the same preview host (or send the preview token in the \
                 csb-preview-token header)"
                    .to_string(),
            ));
        }
        if query_token.is_some() {
            // Keep the token in a cookie and out of the address bar, history and logs.
            let location = same_host_location(req.uri().path(), &rest_query);
            let secure = server.cfg.tls
                || req
                    .headers()
                    .get("x-forwarded-proto")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|p| p.eq_ignore_ascii_case("https"));
            let cookie = token_cookie(&token, expires_at.map(|at| (at - now_ms()) / 1000), secure);
            let mut resp = StatusCode::TEMPORARY_REDIRECT.into_response();
            let h = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&location) {
                h.insert(header::LOCATION, v);
            }
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                h.insert(header::SET_COOKIE, v);
            }
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return resp;
        }
    }
    // Another node's sandbox: its node serves the preview (checking the token again), once
    // this server has authorized the request. A request relayed to us is never relayed on.
    if !server.is_mine(&row)
        && let Some(secret) = server.cfg.node_secret.clone()
        && !crate::forward::is_relayed(&secret, &req)
    {
        let address = match crate::forward::route_of(&server, &row).await {
            // Hibernated on a node that is gone or draining: the wake below takes it over.
            Ok(crate::forward::Route::Here) => None,
            Ok(crate::forward::Route::Relay(address)) => Some(address),
            Err(e) => return refuse((e.status, e.code, e.message)),
        };
        if let Some(address) = address {
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            return match crate::forward::relay(&server, &secret, req, &address, &pq).await {
                Ok(resp) => resp,
                Err(e) => refuse((e.status, e.code, e.message)),
            };
        }
    }
    server.previews.touch(&server.store, id);

    let (stream, guard) = match connect(&server, id, port).await {
        Ok(c) => c,
        Err(r) => return refuse(r),
    };
    match forward(&server, req, id, stream, guard, &rest_query, other_cookies).await {
        Ok(resp) => resp,
        Err(r) => refuse(r),
    }
}

/// Connect to the sandbox's port, waking the sandbox if it is suspended. The connection is
/// registered (under the sandbox's read lock, so no suspend runs in between) and set to
/// close with a reset.
async fn connect(
    server: &Arc<Server>,
    id: &str,
    port: u16,
) -> Result<(TcpStream, ConnGuard), Refusal> {
    let internal = |e: &dyn std::error::Error| {
        tracing::error!(sandbox = id, error = %DisplayChain(e), "preview");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal server error; see the server log".to_string(),
        )
    };
    for _ in 0..3 {
        let row = match server.store.sandboxes.get(id).await {
            Ok(Some(row)) => row,
            Ok(None) => break,
            Err(e) => return Err(internal(&e)),
        };
        // Another node's slot numbers name other addresses: never connect to them here
        // (unless it is hibernated on a node that is gone or draining: the wake below
        // takes it over).
        if !server.is_mine(&row) && !crate::forward::moves_here(server, &row).await {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "sandbox_on_another_node",
                format!(
                    "this preview's sandbox runs on node {:?}; this server does not reach it",
                    row.node_id
                ),
            ));
        }
        match row.status {
            Status::Running => {
                let lock = server.lock_of(id);
                let _read = lock.read().await;
                let row = match server.store.sandboxes.get(id).await {
                    Ok(Some(row)) if row.status == Status::Running => row,
                    Ok(_) => continue,
                    Err(e) => return Err(internal(&e)),
                };
                let Some(slot) = row.slot else {
                    break;
                };
                let ip = server.net.addrs(slot as u32).sandbox_ip;
                let guard = server.previews.register(id);
                let connected =
                    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((ip, port))).await;
                return match connected {
                    Ok(Ok(stream)) => {
                        // From here on, dropping the stream resets it (see the module docs).
                        let _ = stream.set_zero_linger();
                        let _ = stream.set_nodelay(true);
                        Ok((stream, guard))
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err((
                        StatusCode::BAD_GATEWAY,
                        "port_not_open",
                        format!(
                            "nothing listens on port {port} in sandbox {id} (a server must listen \
                             on 0.0.0.0 or ::, not only on 127.0.0.1)"
                        ),
                    )),
                    Ok(Err(e)) => Err((
                        StatusCode::BAD_GATEWAY,
                        "upstream_unreachable",
                        format!("connecting to port {port} of sandbox {id}: {e}"),
                    )),
                    Err(_) => Err((
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        format!("port {port} of sandbox {id} did not answer"),
                    )),
                };
            }
            Status::Suspended if !server.cfg.preview_wake => {
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "sandbox_suspended",
                    format!(
                        "sandbox {id} is hibernated; wake it through the API \
                         (previews do not wake sandboxes on this server)"
                    ),
                ));
            }
            Status::Suspended => {
                if let Err(e) = crate::lifecycle::wake(server, id).await {
                    tracing::warn!(sandbox = id, code = e.code, message = %e.message, "preview: wake failed");
                    return Err((
                        StatusCode::SERVICE_UNAVAILABLE,
                        "sandbox_unavailable",
                        format!("sandbox {id} could not be woken: {}", e.message),
                    ));
                }
            }
            Status::Creating => {
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "sandbox_starting",
                    format!("sandbox {id} is still starting; retry in a moment"),
                ));
            }
            _ => break,
        }
    }
    Err((
        StatusCode::NOT_FOUND,
        "preview_not_found",
        format!("there is no preview {id}-{port}"),
    ))
}

/// Send the request over `stream` and relay the response; for an accepted upgrade, relay
/// bytes both ways until either side closes or the sandbox is suspended.
async fn forward(
    server: &Arc<Server>,
    req: Request,
    id: &str,
    stream: TcpStream,
    guard: ConnGuard,
    query: &str,
    cookies: Option<String>,
) -> Result<Response, Refusal> {
    let bad_gateway = |what: &str, e: &dyn std::error::Error| {
        tracing::info!(sandbox = id, error = %DisplayChain(e), "preview: {what}");
        (
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("the sandbox's server failed: {what}"),
        )
    };
    let (mut parts, body) = req.into_parts();
    let upgrade = upgrade_of(&parts.headers);
    let client_upgrade = upgrade
        .as_ref()
        .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());

    let mut headers = std::mem::take(&mut parts.headers);
    strip_hop_by_hop(&mut headers);
    headers.remove(TOKEN_HEADER);
    headers.remove(header::COOKIE);
    if let Some(c) = cookies.and_then(|c| HeaderValue::from_str(&c).ok()) {
        headers.insert(header::COOKIE, c);
    }
    if let Some(proto) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto.clone());
    }
    // HTTP/2 clients name the host in the URI only; HTTP/1.1 needs the header.
    if !headers.contains_key(header::HOST)
        && let Some(v) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        headers.insert(header::HOST, v);
    }
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert("x-forwarded-host", host);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(ip) = peer {
        let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert("x-forwarded-for", v);
        }
    }
    let path = if query.is_empty() {
        parts.uri.path().to_string()
    } else {
        format!("{}?{query}", parts.uri.path())
    };
    let mut upstream_req = axum::http::Request::new(body);
    *upstream_req.method_mut() = parts.method.clone();
    *upstream_req.uri_mut() = path
        .parse()
        .map_err(|e: axum::http::uri::InvalidUri| bad_gateway("building the request", &e))?;
    *upstream_req.headers_mut() = headers;

    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(ResetStream(stream)))
            .await
            .map_err(|e| bad_gateway("handshake", &e))?;
    let cancel = guard.cancel_token();
    let conn_guard = guard.clone();
    tokio::spawn(async move {
        let _guard = conn_guard;
        tokio::select! {
            _ = conn.with_upgrades() => {}
            _ = cancel.cancelled() => {}
        }
    });
    let mut resp = sender
        .send_request(upstream_req)
        .await
        .map_err(|e| bad_gateway("sending the request", &e))?;
    drop(sender);

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err((
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "the sandbox's server switched protocols unasked".into(),
            ));
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let server = server.clone();
        let id = id.to_string();
        let cancel = guard.cancel_token();
        tokio::spawn(async move {
            let _guard = guard;
            let both = async { tokio::try_join!(client_upgrade, upstream_upgrade) };
            let (client, upstream) = tokio::select! {
                r = both => match r {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::info!(sandbox = %id, error = %e, "preview: upgrade failed");
                        return;
                    }
                },
                _ = cancel.cancelled() => return,
            };
            relay(
                &server,
                &id,
                TokioIo::new(client),
                TokioIo::new(upstream),
                cancel,
            )
            .await;
        });
        let (mut parts, _) = resp.into_parts();
        host_only_cookies(&mut parts.headers);
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    drop(guard);
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    host_only_cookies(&mut parts.headers);
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Copy bytes both ways until one side ends (the other then gets [`DRAIN`] to finish) or
/// `cancel` fires. Traffic counts as activity.
async fn relay<C, U>(server: &Server, id: &str, client: C, upstream: U, cancel: CancellationToken)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let touch = || server.previews.touch(&server.store, id);
    let up = copy(&mut cr, &mut uw, touch);
    let down = async {
        copy(&mut ur, &mut cw, touch).await;
        let _ = cw.shutdown().await;
    };
    tokio::pin!(up, down);
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = &mut up => {
            tokio::select! {
                _ = tokio::time::timeout(DRAIN, &mut down) => {}
                _ = cancel.cancelled() => {}
            }
        }
        _ = &mut down => {
            tokio::select! {
                _ = tokio::time::timeout(DRAIN, &mut up) => {}
                _ = cancel.cancelled() => {}
            }
        }
    }
}

/// Copy until end of stream or an error, calling `on_data` for every chunk.
async fn copy<R, W>(r: &mut R, w: &mut W, on_data: impl Fn())
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() || w.flush().await.is_err() {
                    return;
                }
                on_data();
            }
        }
    }
}

/// A socket to a sandbox whose `shutdown` does nothing: it is only ever closed by dropping,
/// which (with `SO_LINGER` 0) resets it, so no endpoint inside the sandbox is left closing.
struct ResetStream(TcpStream);

impl AsyncRead for ResetStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResetStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Make and store a preview token for a sandbox (only its hash is kept). Returns the row and
/// the token, which is shown once. The REST surfaces (`/v1`, CodeSandbox's) call this.
/// Characters of a preview token kept (in clear) to tell tokens apart: the prefix and 8
/// hex digits.
const SHOWN_PREFIX: usize = crate::auth::PREVIEW_TOKEN_PREFIX.len() + 8;

pub(crate) async fn mint_token(
    server: &Server,
    sandbox_id: &str,
    workspace_id: &str,
    expires_at: Option<i64>,
) -> Result<(crate::store::PreviewTokenRow, String), sandpit_control::ControlError> {
    let token = crate::auth::generate_token_with(crate::auth::PREVIEW_TOKEN_PREFIX);
    let row = crate::store::PreviewTokenRow {
        id: crate::util::new_id("ptok"),
        sandbox_id: sandbox_id.to_string(),
        workspace_id: workspace_id.to_string(),
        token_prefix: token[..SHOWN_PREFIX].to_string(),
        expires_at,
        revoked_at: None,
        created_at: now_ms(),
    };
    server
        .store
        .previews
        .insert_token(&row, &hash_token(&token))
        .await?;
    Ok((row, token))
}

// ---- trusted preview hosts (stored with the CodeSandbox tables, `/workspace/preview_hosts`) ----

/// The host (with port, if any) of the page a browser request comes from: `Origin`, or the
/// `Referer`'s authority.
pub(crate) fn requesting_host(headers: &HeaderMap) -> Option<String> {
    let url = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))?
        .to_str()
        .ok()?;
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    (!authority.is_empty()).then(|| authority.to_ascii_lowercase())
}

/// Whether `host` matches a trusted entry: exactly, or under a `*.` wildcard; an entry
/// without a port matches any port.
pub fn matches(entry: &str, host: &str) -> bool {
    let (e_name, e_port) = split_port(entry);
    let (h_name, h_port) = split_port(host);
    if e_port.is_some() && e_port != h_port {
        return false;
    }
    match e_name.strip_prefix("*.") {
        Some(suffix) => h_name.len() > suffix.len() && h_name.ends_with(&format!(".{suffix}")),
        None => e_name == h_name,
    }
}

fn split_port(h: &str) -> (&str, Option<&str>) {
    match h.rsplit_once(':') {
        Some((n, p)) if p.chars().all(|c| c.is_ascii_digit()) => (n, Some(p)),
        _ => (h, None),
    }
}

/// Whether a preview request comes from a page on one of the workspace's trusted hosts.
pub async fn trusted_origin(server: &Server, workspace_id: &str, headers: &HeaderMap) -> bool {
    let Some(host) = requesting_host(headers) else {
        return false;
    };
    match server.store.csb().list_preview_hosts(workspace_id).await {
        Ok(list) => list.iter().any(|(entry, _)| matches(entry, &host)),
        Err(e) => {
            tracing::error!(error = %crate::error::DisplayChain(&e), "reading preview hosts");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sb0123456789abcdef";

    proptest::proptest! {
        /// Whatever a Host header holds, a match names a well-formed sandbox id (lowercase
        /// `sb` + 16 hex digits) and a nonzero port under the preview domain, and the
        /// canonical host of that match parses to the same thing.
        #[test]
        fn preview_hosts_parse_only_to_well_formed_targets(
            host in "(sb[0-9a-fA-F]{14,18}|[a-z.]{0,4}|)(-[0-9+]{0,6})?(\\.|)(localhost|evil|localhost\\.evil|)(:[0-9a-z]{0,5})?\\.?",
            noise in ".{0,12}",
        ) {
            for h in [host.clone(), format!("{noise}{host}"), format!("{host}{noise}")] {
                if let Some((id, port)) = parse_host(&h, "localhost") {
                    proptest::prop_assert!(id.len() == 18 && id.starts_with("sb"));
                    proptest::prop_assert!(id[2..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
                    proptest::prop_assert!(port > 0);
                    proptest::prop_assert_eq!(
                        parse_host(&format!("{id}-{port}.localhost"), "localhost"),
                        Some((id.clone(), port))
                    );
                    proptest::prop_assert!(h.to_ascii_lowercase().contains(&id));
                }
            }
        }
    }

    #[test]
    fn parses_preview_hosts() {
        let ok = Some((ID.to_string(), 8080));
        assert_eq!(parse_host(&format!("{ID}-8080.localhost"), "localhost"), ok);
        assert_eq!(
            parse_host(&format!("{ID}-8080.localhost:7878"), "localhost"),
            ok
        );
        assert_eq!(
            parse_host("SB0123456789ABCDEF-8080.LocalHost.", "localhost"),
            ok
        );
        assert_eq!(
            parse_host(
                &format!("{ID}-8080.preview.example.com"),
                "preview.example.com"
            ),
            ok
        );
        for bad in [
            "localhost:7878".to_string(),
            "127.0.0.1:7878".to_string(),
            "[::1]:7878".to_string(),
            format!("{ID}-8080.localhost.evil"),
            format!("x.{ID}-8080.localhost"),
            format!("{ID}-0.localhost"),
            format!("{ID}-65536.localhost"),
            format!("{ID}-+80.localhost"),
            format!("{ID}8080.localhost"),
            "sb0123-8080.localhost".to_string(),
            "sb0123456789abcdeg-8080.localhost".to_string(),
            format!("{ID}-8080.localhost:x"),
            format!("{ID}-8080localhost"),
        ] {
            assert_eq!(parse_host(&bad, "localhost"), None, "{bad}");
        }
    }

    #[test]
    fn takes_the_token_out_of_queries_and_cookies() {
        assert_eq!(
            split_query(Some("a=1&preview_token=spp_x&b=2")),
            (Some("spp_x".into()), "a=1&b=2".into())
        );
        assert_eq!(split_query(Some("a=1")), (None, "a=1".into()));
        assert_eq!(split_query(None), (None, String::new()));
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; csb_preview_token=spp_y"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(
            split_cookies(&h),
            (vec!["spp_y".to_string()], Some("a=1; b=2".into()))
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("csb_preview_token=t"),
        );
        assert_eq!(split_cookies(&h), (vec!["t".to_string()], None));
        // A cookie a sibling planted does not hide the real one: both are kept (in order).
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("csb_preview_token=planted; csb_preview_token=mine; x=1"),
        );
        assert_eq!(
            split_cookies(&h),
            (
                vec!["planted".to_string(), "mine".to_string()],
                Some("x=1".into())
            )
        );
    }

    #[test]
    fn redirects_stay_on_the_preview_host() {
        assert_eq!(same_host_location("/", ""), "/");
        assert_eq!(same_host_location("/a/b", "x=1"), "/a/b?x=1");
        for evil in [
            "//evil.example/",
            "///evil.example/",
            "/\\evil.example/",
            "/\\/evil.example",
            "\\\\evil.example",
        ] {
            let loc = same_host_location(evil, "");
            assert!(loc.starts_with('/'), "{evil}: {loc}");
            assert!(
                !loc.starts_with("//") && !loc.starts_with("/\\"),
                "{evil} -> {loc} names another host"
            );
            assert!(loc.ends_with("evil.example/") || loc.ends_with("evil.example"));
        }
        // Parsed as a URI reference against the preview host, it stays there.
        let loc = same_host_location("//evil.example/x", "a=1");
        let uri: axum::http::Uri = loc.parse().unwrap();
        assert!(uri.authority().is_none(), "{loc}");
        assert_eq!(loc, "/evil.example/x?a=1");
    }

    #[test]
    fn the_token_cookie_is_host_only() {
        let c = token_cookie("spp_t", Some(60), false);
        assert_eq!(
            c,
            "csb_preview_token=spp_t; Path=/; HttpOnly; SameSite=Lax; Max-Age=60"
        );
        assert!(!c.to_ascii_lowercase().contains("domain"));
        let c = token_cookie("spp_t", None, true);
        assert!(c.contains("; Secure") && !c.contains("Max-Age"));
        assert!(token_cookie("t", Some(-5), false).ends_with("Max-Age=1"));
    }

    #[test]
    fn sandbox_cookies_are_made_host_only() {
        assert_eq!(
            host_only_set_cookie("sid=1; Domain=localhost; Path=/; HttpOnly").as_deref(),
            Some("sid=1; Path=/; HttpOnly")
        );
        assert_eq!(
            host_only_set_cookie("sid=1;domain=.preview.example.com").as_deref(),
            Some("sid=1")
        );
        assert_eq!(host_only_set_cookie("a=b").as_deref(), Some("a=b"));
        // A sandbox cannot set (or shadow) the preview token cookie.
        assert_eq!(
            host_only_set_cookie("csb_preview_token=x; Domain=localhost"),
            None
        );
        let mut h = HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("a=1; Domain=localhost"),
        );
        h.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("csb_preview_token=x"),
        );
        host_only_cookies(&mut h);
        let got: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(got, ["a=1", "b=2"]);
    }

    #[test]
    fn upgrades_need_the_preview_hosts_own_origin() {
        let host = format!("{ID}-8080.localhost:7878");
        let with = |origin: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ORIGIN, HeaderValue::from_static(origin));
            h
        };
        assert!(upgrade_origin_allowed(&HeaderMap::new(), &host));
        let same = format!("http://{ID}-8080.localhost:7878");
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_str(&same).unwrap());
        assert!(upgrade_origin_allowed(&h, &host));
        let mut h = HeaderMap::new();
        h.insert(
            header::ORIGIN,
            HeaderValue::from_str(&same.to_uppercase().replace("HTTP", "http")).unwrap(),
        );
        assert!(upgrade_origin_allowed(&h, &host));
        for bad in [
            "http://evil.example",
            "http://sb0123456789abcdee-8080.localhost:7878",
            "http://sb0123456789abcdef-8081.localhost:7878",
            "http://sb0123456789abcdef-8080.localhost:7879",
            "null",
            "file://",
            "chrome-extension://sb0123456789abcdef-8080.localhost:7878",
        ] {
            assert!(!upgrade_origin_allowed(&with(bad), &host), "{bad}");
        }
        // Default ports: an origin omits them, a Host header may not.
        assert!(upgrade_origin_allowed(
            &with("https://sb0123456789abcdef-8080.preview.example.com"),
            "sb0123456789abcdef-8080.preview.example.com:443"
        ));
    }

    #[test]
    fn strips_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(upgrade_of(&h).unwrap(), "websocket");
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        assert!(upgrade_of(&h).is_none());
    }

    #[test]
    fn origins_match_entries() {
        assert!(matches("app.example.com", "app.example.com"));
        assert!(matches("app.example.com", "app.example.com:8443"));
        assert!(!matches("app.example.com:3000", "app.example.com:8443"));
        assert!(matches("*.example.com", "a.b.example.com"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(!matches("*.example.com", "evilexample.com"));
        let mut h = HeaderMap::new();
        h.insert(
            header::REFERER,
            "https://u@App.example.com:8443/x?y".parse().unwrap(),
        );
        assert_eq!(requesting_host(&h).as_deref(), Some("app.example.com:8443"));
        h.insert(header::ORIGIN, "http://localhost:3000".parse().unwrap());
        assert_eq!(requesting_host(&h).as_deref(), Some("localhost:3000"));
    }
}
