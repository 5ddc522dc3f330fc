//! Distributed tracing at the HTTP edge: one server span per request, joined to the caller's
//! trace when the request carries a W3C `traceparent` (the CodeSandbox SDK sends one), and
//! the current trace handed on when a request is relayed to another node.
//!
//! The spans are `tracing` spans at debug level; the binary decides whether they leave the
//! process (`sandpit serve --otlp-endpoint`, which installs the OpenTelemetry layer and the
//! W3C propagator). Without it they are disabled at their call site and the propagator is
//! OpenTelemetry's no-op one, so this layer costs next to nothing.
//!
//! **Invariant:** a span's attributes are the method, the route template (never the path:
//! it holds ids and file paths), the status code and store-issued ids, never a header,
//! a query or a body. A malformed `traceparent` is ignored: the request starts a new trace.

use axum::extract::Request;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Outermost layer: the request's server span, a child of the caller's span if it sent a
/// valid `traceparent`. Named `METHOD /route/{template}` once the route is known.
pub async fn span(req: Request, next: Next) -> Response {
    let method = crate::metrics::method_label(req.method());
    let span = tracing::debug_span!(
        "http.request",
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = method,
        http.route = Empty,
        http.response.status_code = Empty,
    );
    if span.is_disabled() {
        return next.run(req).await;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HeaderExtractor(req.headers()))
    });
    // Fails only when no OpenTelemetry layer sees the span: then there is nothing to join.
    let _ = span.set_parent(parent);
    // The route template: known here already when this layer runs after routing; else
    // from the response (a request relayed to another node answers before the route's own
    // layers run).
    let matched = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_string());
    let resp = next.run(req).instrument(span.clone()).await;
    let route = matched.as_deref().or(crate::metrics::route_of(&resp));
    // (Renamed through OpenTelemetry: the span has started, so `otel.name` no longer would.)
    span.context().span().update_name(match route {
        Some(r) => format!("{method} {r}"),
        None => method.to_string(),
    });
    if let Some(r) = route {
        span.record("http.route", r);
    }
    let status = resp.status();
    span.record("http.response.status_code", status.as_u16());
    // A server span is in error for 5xx only: a 4xx is the client's (OpenTelemetry's HTTP
    // conventions).
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    resp
}

/// Put the current span's trace context into `headers` (`traceparent`, `tracestate`),
/// replacing the caller's: for a request relayed to another node, whose spans then hang
/// under this one. Does nothing when traces are not exported.
pub fn inject(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers));
    });
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(key.as_bytes()),
            axum::http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
