//! The HTTP side of the metrics (`sandpit_control::metrics` holds them): a middleware that
//! counts and times every request by its matched route template, and the metrics listener
//! (`--metrics-listen`, loopback by default) that answers `GET /metrics` in the Prometheus
//! text format. The listener is separate from the API so that scraping needs no token and
//! the numbers (workspace ids, counts) are never on the API's address.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sandpit_control::metrics::{CodeLabels, HttpLabels, RouteLabels};

use crate::server::Server;

/// The error code of an [`crate::error::ApiError`] response, for the metrics.
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

/// The route template that answered, set by [`tag_route`].
#[derive(Clone, Debug)]
struct RouteTag(String);

/// Route layer: remember which route template matched.
pub async fn tag_route(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let mut resp = next.run(req).await;
    if let Some(r) = route {
        resp.extensions_mut().insert(RouteTag(r));
    }
    resp
}

/// A request method as a label (metrics, spans): only the standard methods become label
/// values; anything else is `other`.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// The route template that answered `resp` (set by [`tag_route`]); `None` for requests no
/// route matched (previews, E2B envd, unknown paths).
pub fn route_of(resp: &Response) -> Option<&str> {
    resp.extensions().get::<RouteTag>().map(|r| r.0.as_str())
}

/// Outer layer: count and time the request. Requests no route matched (previews, E2B
/// envd, unknown paths) count under `other`.
pub async fn record(State(server): State<Arc<Server>>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let method = method_label(req.method()).to_string();
    let resp = next.run(req).await;
    let route = route_of(&resp).unwrap_or("other").to_string();
    let status = resp.status().as_u16();
    let m = &server.metrics;
    m.http_requests
        .get_or_create(&HttpLabels {
            route: route.clone(),
            method: method.clone(),
            status,
        })
        .inc();
    m.http_duration
        .get_or_create(&RouteLabels { route, method })
        .observe(t0.elapsed().as_secs_f64());
    if resp.status() == StatusCode::TOO_MANY_REQUESTS {
        let code = resp
            .extensions()
            .get::<ErrorCode>()
            .map_or("other", |c| c.0);
        m.rate_limited
            .get_or_create(&CodeLabels { code: code.into() })
            .inc();
    }
    resp
}

/// The metrics listener's application: `GET /metrics`, nothing else.
pub fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .fallback(|| async { (StatusCode::NOT_FOUND, "only /metrics is served here\n") })
        .with_state(server)
}

async fn scrape(State(server): State<Arc<Server>>) -> Response {
    match server.store.sandboxes.census(&server.cfg.node_id).await {
        Ok(census) => server.metrics.set_census(&census),
        Err(e) => {
            tracing::warn!(error = %sandpit_control::DisplayChain(&e), "metrics: counting sandboxes");
        }
    }
    let disk = rustix::fs::statvfs(&server.cfg.data_dir)
        .ok()
        .map(|st| st.f_bavail.saturating_mul(st.f_frsize));
    let memory = sandpit_control::membership::available_memory_mib()
        .and_then(|mib| u64::try_from(mib).ok())
        .map(|mib| mib << 20);
    server.metrics.set_host(disk, memory);
    let mut resp = server.metrics.render().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}
