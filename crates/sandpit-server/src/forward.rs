//! Routing between nodes: a request about a sandbox that another node runs is relayed to
//! that node's server, whichever server received it.
//!
//! Only after the receiving server authorized it: the middleware runs behind the rate
//! limits, which resolve the token, and relays only a request whose token's workspace owns
//! the sandbox (anything else goes to the local route, which answers 401, 403 or 404 with
//! no side effect). The owner node checks the token again itself.
//!
//! The internal channel is authenticated with the fleet's shared node secret
//! (`sandpit serve --node-secret`): a relayed request carries the relaying node's name and
//! an HMAC-SHA256 over it, the method and the path, so a node handles it locally and never
//! relays it again. Without a secret nothing is relayed (another node's sandbox answers
//! 503 `sandbox_on_another_node`). Headers claiming a relay that do not verify are dropped.
//!
//! Relayed: the `/v1/sandboxes/{id}/…` routes, the CodeSandbox `/sandbox/{id}/…` and
//! `/vm/{id}/…` routes and the E2B `/sandboxes/{id}/…` and `/v2/sandboxes/{id}/…` routes
//! (E2B envd requests, by header, answer only on the sandbox's node), streams and WebSocket upgrades (terminals) included; a build's
//! event stream to the node running the build; a volume's delete, and creates mounting
//! it, to its home node. An API replica (`--api-only`) also relays what needs a node and
//! names no sandbox (template builds, volume creates, CodeSandbox creates) to a placed one.

use std::sync::Arc;
use std::time::Duration;

use crate::util::hmac_sha256;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;

use sandpit_control::Status;

use crate::csb_store::CsbTables;

use crate::auth::Auth;
use crate::error::{ApiError, DisplayChain};
use crate::server::Server;

/// The relaying node's name.
pub const FORWARDED_BY: &str = "x-sandpit-forwarded-by";
/// HMAC-SHA256(node secret, "<node>\n<method>\n<path and query>"), hex.
pub const NODE_AUTH: &str = "x-sandpit-node-auth";

/// How long connecting to another node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Shortest node secret `sandpit serve` takes.
pub const MIN_SECRET_LEN: usize = 16;

/// The sandbox id a path is about, for the routes that act on one sandbox.
pub fn sandbox_of_path(path: &str) -> Option<&str> {
    let rest = path
        .strip_prefix("/v1/sandboxes/")
        .or_else(|| path.strip_prefix("/sandbox/"))
        .or_else(|| path.strip_prefix("/vm/"))
        // The E2B control API (`crate::e2b`); its envd requests answer on the sandbox's node.
        .or_else(|| path.strip_prefix("/sandboxes/"))
        .or_else(|| path.strip_prefix("/v2/sandboxes/"))?;
    let id = rest.split('/').next()?;
    // Sandbox ids are `sb` + hex; the CodeSandbox `/vm/tag`, `/vm/running`, … are not.
    (id.len() > 2
        && id.starts_with("sb")
        && id.len() <= 64
        && id[2..].bytes().all(|b| b.is_ascii_hexdigit()))
    .then_some(id)
}

fn signature(secret: &str, node: &str, method: &str, path_and_query: &str) -> String {
    hex::encode(hmac_sha256(
        secret.as_bytes(),
        format!("{node}\n{method}\n{path_and_query}").as_bytes(),
    ))
}

/// Equal in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `headers` carry a relay signed with `secret` for this method and path; the
/// relaying node's name if so.
fn verified(
    secret: &str,
    headers: &HeaderMap,
    method: &str,
    path_and_query: &str,
) -> Option<String> {
    let node = headers.get(FORWARDED_BY)?.to_str().ok()?;
    let given = headers.get(NODE_AUTH)?.to_str().ok()?;
    let want = signature(secret, node, method, path_and_query);
    same(given.as_bytes(), want.as_bytes()).then(|| node.to_string())
}

/// The middleware: relay a request about another node's sandbox to that node (see the
/// module docs); everything else goes on to the local routes.
pub async fn to_owner(State(server): State<Arc<Server>>, mut req: Request, next: Next) -> Response {
    let Some(secret) = server.cfg.node_secret.clone() else {
        return next.run(req).await;
    };
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    if req.headers().contains_key(FORWARDED_BY) || req.headers().contains_key(NODE_AUTH) {
        if verified(&secret, req.headers(), req.method().as_str(), &pq).is_some() {
            // Relayed to us: ours to answer, never to relay again.
            return next.run(req).await;
        }
        req.headers_mut().remove(FORWARDED_BY);
        req.headers_mut().remove(NODE_AUTH);
    }
    if let Some(id) = gateway_sandbox(req.uri().path()) {
        let id = id.to_string();
        return match gateway_owner(&server, &id, req.uri().query()).await {
            Some(address) => relay(&server, &secret, req, &address, &pq)
                .await
                .unwrap_or_else(IntoResponse::into_response),
            None => next.run(req).await,
        };
    }
    let Some(auth) = req.extensions().get::<Auth>().cloned() else {
        return next.run(req).await;
    };
    let workspace = auth.workspace_id;
    if is_create(req.method(), req.uri().path()) {
        // A token that may not create is answered here (403), before any relay.
        if !auth.scopes.iter().any(|s| s == "sandbox_create") {
            return next.run(req).await;
        }
        return place_create(&server, &secret, &workspace, req, next, &pq).await;
    }
    if server.cfg.api_only && needs_a_node(req.method(), req.uri().path()) {
        return match other_node(&server).await {
            Some(address) => relay(&server, &secret, req, &address, &pq)
                .await
                .unwrap_or_else(IntoResponse::into_response),
            None => no_node().into_response(),
        };
    }
    if req.method() == axum::http::Method::DELETE
        && let Some(name) = req.uri().path().strip_prefix("/v1/volumes/")
        && !name.contains('/')
    {
        // A volume's files are on its home node: that node deletes it.
        if let Some(address) = volume_home(&server, &workspace, name).await {
            return relay(&server, &secret, req, &address, &pq)
                .await
                .unwrap_or_else(IntoResponse::into_response);
        }
        return next.run(req).await;
    }
    if let Some(template) = build_events_of(req.method(), req.uri().path()) {
        // A build's events are on the node that runs (or ran) it.
        return match build_node(&server, &workspace, template).await {
            Some(address) => relay(&server, &secret, req, &address, &pq)
                .await
                .unwrap_or_else(IntoResponse::into_response),
            None => next.run(req).await,
        };
    }
    let Some(id) = sandbox_of_path(req.uri().path()).map(str::to_string) else {
        return next.run(req).await;
    };
    let row = match server.store.sandboxes.get(&id).await {
        Ok(Some(row)) => row,
        Ok(None) => return next.run(req).await,
        Err(e) => return ApiError::from(e).into_response(),
    };
    if *row.workspace_id != workspace {
        return next.run(req).await;
    }
    if server.is_mine(&row) {
        // A draining node moves its hibernated sandboxes away: a request that would wake
        // one here goes to another node, which takes it over.
        if row.status == Status::Suspended
            && server.node.is_draining()
            && req.method() != axum::http::Method::GET
            && sandpit_control::node::moves::stored_image(&row).is_some()
            && let Some(address) = other_node(&server).await
        {
            return relay(&server, &secret, req, &address, &pq)
                .await
                .unwrap_or_else(IntoResponse::into_response);
        }
        return next.run(req).await;
    }
    match route_of(&server, &row).await {
        Ok(Route::Here) => next.run(req).await,
        Ok(Route::Relay(address)) => relay(&server, &secret, req, &address, &pq)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        Err(e) => e.into_response(),
    }
}

/// Where a request about another node's sandbox is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// By this server: the sandbox is hibernated on a node that is gone (or draining, its
    /// image stored), and a request that wakes it takes it over here (`node::moves`).
    Here,
    /// By the node at this address: the owner, or (from an API replica) a node that takes
    /// it over.
    Relay(String),
}

/// Where a request about `row`, which is not this node's sandbox, goes. 503
/// `node_unreachable` when its node's lease lapsed and no other node may take it; from an
/// API replica, 503 `no_node_available` when no node can.
pub async fn route_of(
    server: &Server,
    row: &sandpit_control::store::Sandbox,
) -> Result<Route, ApiError> {
    if sandpit_control::node::moves::answers_here(&server.node, row).await? {
        if !server.cfg.api_only {
            return Ok(Route::Here);
        }
        // A replica takes nothing over: a node does.
        return other_node(server)
            .await
            .map(Route::Relay)
            .ok_or_else(no_node);
    }
    match alive_node(server, &row.node_id).await? {
        Some(address) => Ok(Route::Relay(address)),
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node_unreachable",
            format!(
                "sandbox {} runs on node {:?}, whose lease has lapsed; retry when it is back",
                row.id, row.node_id
            ),
        )),
    }
}

/// 503 `no_node_available`: an API replica found no node to run a request on.
fn no_node() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_node_available",
        "no node of the fleet can take this request now (none holds a lease, or all are draining or full); retry later",
    )
}

/// In an API replica: a request that names no sandbox but needs a node (template builds,
/// deletions that remove a node's files, CodeSandbox and E2B creates). It goes to the node
/// placement chooses.
fn needs_a_node(method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    let template = path.strip_prefix("/v1/templates/");
    match *method {
        Method::POST => {
            path == "/v1/templates"
                || path == "/v1/volumes"
                || path == "/templates"
                || path == "/sandbox"
                // E2B creates, like CodeSandbox ones, run where they arrive.
                || path == "/v2/sandboxes"
                || template.is_some_and(|t| t.ends_with("/build") && t.matches('/').count() == 1)
        }
        Method::DELETE => {
            template.is_some_and(|t| !t.contains('/')) || path.starts_with("/v1/snapshots/")
        }
        _ => false,
    }
}

/// The address of the live node that holds `workspace`'s volume `name`, if that is another
/// node.
async fn volume_home(server: &Server, workspace: &str, name: &str) -> Option<String> {
    let volume = server.store.volumes.get(workspace, name).await.ok()??;
    if volume.node_id == server.node.cfg.node_id
        || volume.node_id == sandpit_control::store::STORED_VOLUME
    {
        return None;
    }
    alive_node(server, &volume.node_id).await.ok().flatten()
}

/// The template a `GET /v1/templates/{id}/build` (its build's events) names.
fn build_events_of<'a>(method: &axum::http::Method, path: &'a str) -> Option<&'a str> {
    if method != axum::http::Method::GET {
        return None;
    }
    let id = path
        .strip_prefix("/v1/templates/")?
        .strip_suffix("/build")?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// The address of the live node that runs (or ran) the build of `workspace`'s template
/// `id`, if that is another node.
async fn build_node(server: &Server, workspace: &str, id: &str) -> Option<String> {
    // Percent-decoded as the route's path parameter is (names never hold `&`, `=` or `+`).
    let decoded: Vec<(String, String)> = serde_urlencoded::from_str(&format!("t={id}")).ok()?;
    let [(_, id)] = decoded.as_slice() else {
        return None;
    };
    let t = sandpit_control::node::catalog::find(&server.node, workspace, id)
        .await
        .ok()?;
    let node = server.store.templates.build_node(&t.id).await.ok()??;
    if node == server.node.cfg.node_id {
        return None;
    }
    alive_node(server, &node).await.ok().flatten()
}

/// Where the CodeSandbox agent gateway listens (`<prefix>/<sandbox id>?token=…`; the
/// gateway itself is `compat::gateway`).
pub const GATEWAY_PATH_PREFIX: &str = "/csb/agent";

/// The sandbox of a CodeSandbox agent gateway path (`/csb/agent/{id}`).
fn gateway_sandbox(path: &str) -> Option<&str> {
    let id = path
        .strip_prefix(GATEWAY_PATH_PREFIX)?
        .strip_prefix('/')?
        .split('/')
        .next()?;
    sandbox_of_path(&format!("/vm/{id}"))
        .is_some()
        .then_some(id)
}

/// Where to relay a gateway connection: the address of the node running its sandbox, if
/// that is another node whose lease holds and the query's agent token is valid for the
/// sandbox (checked, not spent: the owner checks and spends it). `None`: answered here
/// (the local route rejects a bad token or names the state).
async fn gateway_owner(server: &Server, id: &str, query: Option<&str>) -> Option<String> {
    let query: std::collections::HashMap<String, String> =
        serde_urlencoded::from_str(query.unwrap_or("")).ok()?;
    let token = query.get("token").filter(|t| !t.is_empty())?;
    let grant = server
        .store
        .csb()
        .agent_token(id, &crate::auth::hash_token(token))
        .await
        .ok()
        .flatten()
        .filter(|t| t.expires_at > crate::util::now_ms())?;
    let row = server.store.sandboxes.get(id).await.ok().flatten()?;
    if row.workspace_id != grant.workspace_id || server.is_mine(&row) {
        return None;
    }
    match route_of(server, &row).await.ok()? {
        Route::Relay(address) => Some(address),
        Route::Here => None,
    }
}

/// A request that makes a new sandbox on whichever node takes it (forks stay with their
/// parent, relayed by its id; CodeSandbox creates stay where they arrive).
fn is_create(method: &axum::http::Method, path: &str) -> bool {
    method == axum::http::Method::POST && path == "/v1/sandboxes"
}

/// Largest create body looked at for placement; a larger one is created where it arrives
/// (and its handler answers for it).
const PLACEABLE_BODY: usize = 64 * 1024;

/// Whether a create body may run on any node: it names no snapshot and boots the base
/// template, the one every node holds. (A built template's layers and a snapshot's files
/// are placed by `membership::place_holding`: on a node holding them, or, once they are in
/// object storage, on any node, which fetches them.)
fn runs_anywhere(body: &[u8]) -> bool {
    let Ok(serde_json::Value::Object(req)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return false;
    };
    let snapshot = req.get("snapshot").is_some_and(|s| !s.is_null());
    let template = req.get("template").and_then(|t| t.as_str()).unwrap_or("");
    !snapshot
        && (template == sandpit_control::node::images::BASE_TEMPLATE_NAME
            || template == sandpit_control::node::images::BASE_TEMPLATE_ID)
}

/// The home node of the first volume a create body names (one of the workspace's), if any.
async fn volume_node_of(server: &Server, workspace: &str, body: &[u8]) -> Option<String> {
    let serde_json::Value::Object(req) = serde_json::from_slice(body).ok()? else {
        return None;
    };
    let name = req
        .get("volumes")?
        .as_array()?
        .first()?
        .get("name")?
        .as_str()?;
    let volume = server.store.volumes.get(workspace, name).await.ok()??;
    // Only in object storage: the node that takes the create fetches it.
    (volume.node_id != sandpit_control::store::STORED_VOLUME).then_some(volume.node_id)
}

/// What a create body needs on the node that runs it: the layer ids of the template it
/// names (one the workspace sees), and the snapshot it names. `None` when it names neither
/// or does not parse (the create runs where it arrived, whose handler answers for it).
async fn local_files_of(
    server: &Server,
    workspace: &str,
    body: &[u8],
) -> Option<(Vec<String>, Option<String>)> {
    let serde_json::Value::Object(req) = serde_json::from_slice(body).ok()? else {
        return None;
    };
    let snapshot = req
        .get("snapshot")
        .and_then(|s| s.as_str())
        .map(str::to_string);
    if let Some(snapshot) = snapshot {
        // The snapshot's own node holds its template's layers too.
        return Some((Vec::new(), Some(snapshot)));
    }
    let name = req.get("template")?.as_str()?;
    let template = server.store.templates.find(workspace, name).await.ok()??;
    let layers = sandpit_control::node::images::layers_of(&template).ok()?;
    // Layers of the image store (`<data dir>/images/layers/<id>`); the base rootfs a
    // `FROM base` stacks on is on every node.
    let ids: Vec<String> = layers
        .iter()
        .filter(|p| p.parent().and_then(|d| d.file_name()) == Some("layers".as_ref()))
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .collect();
    (!ids.is_empty()).then_some((ids, None))
}

/// Place a create: on the node `membership::place_new` chooses, relayed there unless it is
/// this one. When no node can take it, or the chosen one cannot be reached before the
/// request was sent, this node answers (its own admission says why it cannot, if it
/// cannot); an API replica answers 503 `no_node_available` (or 502 `node_unreachable`).
async fn place_create(
    server: &Arc<Server>,
    secret: &str,
    workspace: &str,
    req: Request,
    next: Next,
    pq: &str,
) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, PLACEABLE_BODY).await else {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("a create request is at most {PLACEABLE_BODY} bytes"),
        )
        .into_response();
    };
    // A create that mounts volumes runs on their node (volumes do not move): relayed
    // there, or 503 `node_unreachable` while that node is away.
    if let Some(home) = volume_node_of(server, workspace, &bytes).await {
        let req = Request::from_parts(parts, Body::from(bytes));
        if home == server.node.cfg.node_id && !server.cfg.api_only {
            return next.run(req).await;
        }
        return match alive_node(server, &home).await {
            Ok(Some(address)) => relay(server, secret, req, &address, pq)
                .await
                .unwrap_or_else(IntoResponse::into_response),
            Ok(None) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "node_unreachable",
                format!("the volumes this sandbox mounts are on node {home:?}, whose lease has lapsed; retry when it is back"),
            )
            .into_response(),
            Err(e) => e.into_response(),
        };
    }
    let anywhere = runs_anywhere(&bytes);
    let needs = if anywhere {
        None
    } else {
        local_files_of(server, workspace, &bytes).await
    };
    let req = Request::from_parts(parts, Body::from(bytes));
    // An API replica creates nothing itself: where a node would create here, it answers
    // why no node can.
    let api_only = server.cfg.api_only;
    let chosen = match (anywhere, needs) {
        (true, _) => sandpit_control::membership::place_new(&server.store).await,
        // A built template's layers and a snapshot's files are on the nodes that hold them.
        (false, Some((layers, snapshot))) => {
            sandpit_control::membership::place_holding(&server.store, &layers, snapshot.as_deref())
                .await
        }
        // A body this server does not understand: its own handler answers for it, or
        // from a replica, any node's does.
        (false, None) if api_only => sandpit_control::membership::place_new(&server.store).await,
        (false, None) => return next.run(req).await,
    };
    let chosen = match chosen {
        Ok(c) => c,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let Some(node) = chosen.filter(|n| *n != server.node.cfg.node_id) else {
        return match api_only {
            true => no_node().into_response(),
            false => next.run(req).await,
        };
    };
    let address = match alive_node(server, &node).await {
        Ok(Some(a)) => a,
        Ok(None) if api_only => return no_node().into_response(),
        Ok(None) => return next.run(req).await,
        Err(e) => return e.into_response(),
    };
    let stream = match connect(&address).await {
        Ok(s) => s,
        Err(e) if api_only => {
            return unreachable(&address, "connecting", &e).into_response();
        }
        Err(e) => {
            tracing::warn!(node = %node, error = %DisplayChain(&e), "placement chose a node this server cannot reach; creating here");
            return next.run(req).await;
        }
    };
    tracing::debug!(node = %node, "create placed on another node");
    relay_over(server, secret, req, stream, &address, pq)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// The route a node calls on another to have it take over and wake one of its hibernated
/// sandboxes (a drain). Not part of the public API: only a signed relay is served.
pub const INTERNAL_WAKE: &str = "/internal/v1/sandboxes/{id}/wake";

/// `POST /internal/v1/sandboxes/{id}/wake`, from another node (signed): take the sandbox
/// over and wake it, under its workspace's running quota. 404 for anything unsigned.
pub async fn internal_wake(
    State(server): State<Arc<Server>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    req: Request,
) -> Result<axum::Json<sandpit_api_types::Sandbox>, ApiError> {
    let signed = server
        .cfg
        .node_secret
        .as_deref()
        .is_some_and(|secret| is_relayed(secret, &req));
    if !signed {
        return Err(ApiError::not_found("route_not_found", "no such route"));
    }
    let row = crate::lifecycle::wake(&server, &id).await?;
    Ok(axum::Json(sandpit_control::node::boot::to_api(&row)))
}

/// Have another node take over and wake this node's hibernated sandbox `id` (after a
/// drain). The node's answer, or why none could be asked.
pub async fn hand_over(server: &Arc<Server>, id: &str) -> Result<String, String> {
    let Some(secret) = server.cfg.node_secret.clone() else {
        return Err("no node secret: nodes cannot call each other".into());
    };
    let Some(address) = other_node(server).await else {
        return Err("no other node can take it".into());
    };
    let path = INTERNAL_WAKE.replace("{id}", id);
    let req = Request::builder()
        .method(axum::http::Method::POST)
        .uri(&path)
        .body(Body::empty())
        .map_err(|e| e.to_string())?;
    let resp = relay(server, &secret, req, &address, &path)
        .await
        .map_err(|e| e.message)?;
    if resp.status().is_success() {
        Ok(address)
    } else {
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 64 * 1024)
            .await
            .unwrap_or_default();
        Err(format!(
            "{address} answered {status}: {}",
            String::from_utf8_lossy(&body)
        ))
    }
}

/// How long a drain waits for one sandbox's image to reach object storage.
const DRAIN_UPLOAD_WAIT: Duration = Duration::from_secs(600);

/// A drain that just started on this node: hibernate its running sandboxes and, once each
/// image is in object storage, have another node take it over and wake it (processes and
/// files intact). Without an image store or a node secret they cannot move: they keep
/// running here, and the drain only stops new sandboxes.
pub async fn drain_away(server: Arc<Server>) {
    if server.node.image_store().is_none() || server.cfg.node_secret.is_none() {
        tracing::info!(
            "drain: no object store or node secret, so this node's sandboxes cannot move; they keep running here"
        );
        return;
    }
    let ids = sandpit_control::node::drain::hibernate_all(&server.node).await;
    let mut moving = tokio::task::JoinSet::new();
    for id in ids {
        let server = server.clone();
        moving.spawn(async move {
            match sandpit_control::node::moves::wait_stored(&server.node, &id, DRAIN_UPLOAD_WAIT)
                .await
            {
                Ok(Some(_)) => match hand_over(&server, &id).await {
                    Ok(address) => {
                        tracing::info!(sandbox = %id, to = %address, "drain: woken on another node")
                    }
                    Err(e) => {
                        tracing::warn!(sandbox = %id, error = %e, "drain: no other node woke it; it wakes elsewhere at its next request")
                    }
                },
                Ok(None) => {
                    tracing::warn!(sandbox = %id, "drain: its image did not reach object storage; it stays here")
                }
                Err(e) => {
                    tracing::error!(sandbox = %id, error = %DisplayChain(&e), "drain: waiting for the upload")
                }
            }
        });
    }
    while moving.join_next().await.is_some() {}
    // Volumes no sandbox here mounts go to object storage; the next create that mounts
    // one, on any node, takes it.
    let volumes = sandpit_control::node::volumes::move_all(&server.node).await;
    tracing::info!(volumes, "drain: done");
}

/// Whether this node answers for `row`, another node's sandbox (`moves::answers_here`): a
/// request that wakes it takes it over here.
pub async fn moves_here(server: &Server, row: &sandpit_control::store::Sandbox) -> bool {
    !server.cfg.api_only
        && sandpit_control::node::moves::answers_here(&server.node, row)
            .await
            .unwrap_or(false)
}

/// The address of the node placement chooses for a new sandbox, if it is another one.
pub async fn other_node(server: &Server) -> Option<String> {
    let chosen = sandpit_control::membership::place_new(&server.store)
        .await
        .ok()
        .flatten()?;
    if chosen == server.node.cfg.node_id {
        return None;
    }
    alive_node(server, &chosen).await.ok().flatten()
}

async fn connect(address: &str) -> std::io::Result<tokio::net::TcpStream> {
    let authority = address
        .strip_prefix("http://")
        .unwrap_or(address)
        .trim_end_matches('/');
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(authority))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Whether `req` is a relay from another node, signed with `secret`.
pub fn is_relayed(secret: &str, req: &Request) -> bool {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or_default();
    verified(secret, req.headers(), req.method().as_str(), pq).is_some()
}

/// The address of node `id` if its lease holds.
pub async fn alive_node(server: &Server, id: &str) -> Result<Option<String>, ApiError> {
    let now = server.store.nodes.now().await?;
    Ok(server
        .store
        .nodes
        .get(id)
        .await?
        .filter(|n| n.status != sandpit_control::store::NodeStatus::Lost && n.lease_until > now)
        .map(|n| n.info.address))
}

/// 502 `node_unreachable`: relaying to the node at `address` failed at `what`.
fn unreachable(address: &str, what: &str, e: &dyn std::error::Error) -> ApiError {
    tracing::warn!(node = address, error = %DisplayChain(e), "relay to another node: {what}");
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "node_unreachable",
        format!("the node running this sandbox did not answer ({what})"),
    )
}

/// Send `req` to the node at `address` (`http://host:port`) as a signed relay and hand
/// back its answer; for an accepted upgrade, relay bytes both ways.
pub async fn relay(
    server: &Server,
    secret: &str,
    req: Request,
    address: &str,
    path_and_query: &str,
) -> Result<Response, ApiError> {
    let unreachable = |what: &str, e: &dyn std::error::Error| unreachable(address, what, e);
    let stream = connect(address)
        .await
        .map_err(|e| unreachable("connecting", &e))?;
    relay_over(server, secret, req, stream, address, path_and_query).await
}

/// [`relay`] over a connection already made.
async fn relay_over(
    server: &Server,
    secret: &str,
    req: Request,
    stream: tokio::net::TcpStream,
    address: &str,
    path_and_query: &str,
) -> Result<Response, ApiError> {
    let unreachable = |what: &str, e: &dyn std::error::Error| unreachable(address, what, e);
    let (mut parts, body) = req.into_parts();
    let upgrade = crate::preview::upgrade_of(&parts.headers);
    let client_upgrade = upgrade
        .as_ref()
        .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    let mut headers = std::mem::take(&mut parts.headers);
    crate::preview::strip_hop_by_hop(&mut headers);
    // The node's spans hang under this request's.
    crate::trace::inject(&mut headers);
    if let Some(proto) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto.clone());
    }
    let me = &server.node.cfg.node_id;
    let sig = signature(secret, me, parts.method.as_str(), path_and_query);
    headers.insert(
        FORWARDED_BY,
        HeaderValue::from_str(me).map_err(|e| unreachable("naming this node", &e))?,
    );
    headers.insert(
        NODE_AUTH,
        HeaderValue::from_str(&sig).map_err(|e| unreachable("signing", &e))?,
    );
    let mut upstream = axum::http::Request::new(body);
    *upstream.method_mut() = parts.method.clone();
    *upstream.uri_mut() = path_and_query
        .parse()
        .map_err(|e: axum::http::uri::InvalidUri| unreachable("building the request", &e))?;
    *upstream.headers_mut() = headers;

    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable("handshake", &e))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = sender
        .send_request(upstream)
        .await
        .map_err(|e| unreachable("sending the request", &e))?;
    // The node did the work and answered; this server dies before its client hears it.
    sandpit_control::faults::point("relay.answered");
    drop(sender);
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "node_unreachable",
                "the node switched protocols unasked",
            ));
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let _ = tokio::io::copy_bidirectional(
                        &mut TokioIo::new(client),
                        &mut TokioIo::new(upstream),
                    )
                    .await;
                }
                Err(e) => tracing::info!(error = %e, "relay to another node: upgrade failed"),
            }
        });
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    let (mut parts, body) = resp.into_parts();
    crate::preview::strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, Body::new(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_base_creates_without_a_snapshot_are_placed_elsewhere() {
        for body in [
            r#"{"template":"base"}"#,
            r#"{"template":"tpl_base","mode":"persistent"}"#,
            r#"{"template":"base","snapshot":null}"#,
        ] {
            assert!(runs_anywhere(body.as_bytes()), "{body}");
        }
        for body in [
            r#"{"template":"web"}"#,
            r#"{"snapshot":"snap_1"}"#,
            r#"{"template":"base","snapshot":"snap_1"}"#,
            r#"{}"#,
            r#"["base"]"#,
            "not json",
            "",
        ] {
            assert!(!runs_anywhere(body.as_bytes()), "{body}");
        }
    }

    #[test]
    fn gateway_paths_name_their_sandbox() {
        assert_eq!(gateway_sandbox("/csb/agent/sb0123abcd"), Some("sb0123abcd"));
        assert_eq!(
            gateway_sandbox("/csb/agent/sb0123abcd/"),
            Some("sb0123abcd")
        );
        assert_eq!(gateway_sandbox("/csb/agent/../x"), None);
        assert_eq!(gateway_sandbox("/csb/agent/"), None);
        assert_eq!(gateway_sandbox("/csb/agentsb0123"), None);
        assert_eq!(gateway_sandbox("/v1/sandboxes/sb0123abcd"), None);
    }

    #[test]
    fn only_single_sandbox_paths_are_relayed() {
        let id = "sb0123456789abcdef";
        for p in [
            format!("/v1/sandboxes/{id}"),
            format!("/v1/sandboxes/{id}/exec"),
            format!("/v1/sandboxes/{id}/terminals/t1/attach"),
            format!("/vm/{id}/hibernate"),
            format!("/sandbox/{id}/fork"),
            format!("/sandboxes/{id}"),
            format!("/sandboxes/{id}/pause"),
            format!("/v2/sandboxes/{id}/connect"),
        ] {
            assert_eq!(sandbox_of_path(&p), Some(id), "{p}");
        }
        for p in [
            "/v1/sandboxes",
            "/v1/sandboxes/",
            "/v1/templates/sb01",
            "/vm/tag",
            "/vm/running",
            "/vm/alias/a/b",
            "/sandbox",
            "/v1/sandboxes/sb",
            "/v1/sandboxes/sbXYZ/exec",
            "/v1/sandboxes/../x",
            "/v2/sandboxes",
            "/sandboxes",
            "/sandboxes/x",
        ] {
            assert_eq!(sandbox_of_path(p), None, "{p}");
        }
    }

    #[test]
    fn a_relay_verifies_only_with_the_secret_node_method_and_path() {
        let mut h = HeaderMap::new();
        let sig = signature(
            "s3cret-s3cret-s3cret",
            "node-a",
            "POST",
            "/v1/sandboxes/sb01/exec",
        );
        h.insert(FORWARDED_BY, HeaderValue::from_static("node-a"));
        h.insert(NODE_AUTH, HeaderValue::from_str(&sig).unwrap());
        let ok = |secret: &str, method: &str, pq: &str, h: &HeaderMap| {
            verified(secret, h, method, pq).is_some()
        };
        assert!(ok(
            "s3cret-s3cret-s3cret",
            "POST",
            "/v1/sandboxes/sb01/exec",
            &h
        ));
        assert!(!ok(
            "another-secret-xx",
            "POST",
            "/v1/sandboxes/sb01/exec",
            &h
        ));
        assert!(!ok(
            "s3cret-s3cret-s3cret",
            "GET",
            "/v1/sandboxes/sb01/exec",
            &h
        ));
        assert!(!ok(
            "s3cret-s3cret-s3cret",
            "POST",
            "/v1/sandboxes/sb02/exec",
            &h
        ));
        let mut other = h.clone();
        other.insert(FORWARDED_BY, HeaderValue::from_static("node-b"));
        assert!(!ok(
            "s3cret-s3cret-s3cret",
            "POST",
            "/v1/sandboxes/sb01/exec",
            &other
        ));
        let mut none = h.clone();
        none.remove(NODE_AUTH);
        assert!(!ok(
            "s3cret-s3cret-s3cret",
            "POST",
            "/v1/sandboxes/sb01/exec",
            &none
        ));
    }
}
