//! HTTP routes: one module per resource, assembled into one router with its OpenAPI document.

pub mod events;
pub mod files;
pub mod org;
pub mod ports;
pub mod previews;
pub mod sandboxes;
mod schema_rules;
pub mod secrets;
pub mod templates;
pub mod terminals;
pub mod usage;
pub mod volumes;
pub mod watch;
pub mod webhooks;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::error::ApiError;
use crate::server::Server;

/// Largest JSON request body.

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sandpit API",
        description = "Self-hosted sandboxes: create from a template, exec, files, suspend and wake.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    modifiers(&BearerAuth),
    // The JSON messages of a terminal's WebSocket, which no route body names.
    components(schemas(sandpit_api_types::TerminalMessage)),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The responses every route can give whatever its handler does, added to each operation
/// that does not describe them itself: the token check (401) and scope check (403), the
/// per-workspace rate limit (429), the JSON body and query extractors (400, 413), and an
/// unknown id in the path (404). Documented here once so no route can forget them.
struct CommonResponses;

impl utoipa::Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::RefOr;
        use utoipa::openapi::path::ParameterIn;
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                let params = op.parameters.iter().flatten().filter_map(|p| match p {
                    RefOr::T(p) => Some(p),
                    RefOr::Ref(_) => None,
                });
                let (mut has_query, mut has_path) = (false, false);
                for p in params {
                    has_query |= p.parameter_in == ParameterIn::Query;
                    has_path |= p.parameter_in == ParameterIn::Path;
                }
                let json_body = match &op.request_body {
                    Some(RefOr::T(b)) => b.content.contains_key("application/json"),
                    _ => false,
                };
                let mut add = |status: &str, description: &str| {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| RefOr::T(error_response(description)));
                };
                add(
                    "401",
                    "Missing, malformed, unknown, revoked or expired token (`unauthorized`)",
                );
                add("403", "The token lacks the scope this operation needs");
                add(
                    "429",
                    "The workspace's rate limit is reached (`rate_limited`, with Retry-After)",
                );
                add(
                    "503",
                    "The database is out of reach (`database_unavailable`, with Retry-After)",
                );
                if json_body {
                    add(
                        "400",
                        "The body is not a JSON object of this operation's shape (`invalid_json`)",
                    );
                    add("413", "The body exceeds 1 MiB (`body_too_large`)");
                }
                if has_query {
                    add("400", "Invalid query string (`invalid_query`)");
                }
                if has_path {
                    add("404", "Not found");
                }
            }
        }
    }
}

fn error_response(description: &str) -> utoipa::openapi::Response {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

fn router() -> OpenApiRouter<Arc<Server>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(sandboxes::router())
        .merge(files::router())
        .merge(ports::router())
        .merge(previews::router())
        .merge(templates::router())
        .merge(terminals::router())
        .merge(watch::router())
        .merge(volumes::router())
        .merge(secrets::router())
        .merge(org::router())
        .merge(events::router())
        .merge(usage::router())
        .merge(webhooks::router())
}

/// The OpenAPI document of every route.
pub use crate::extract::{ApiJson, ApiQuery, OptionalJson};

pub fn openapi() -> utoipa::openapi::OpenApi {
    (*router_and_doc().1).clone()
}

/// The routes and their document, with the responses common to all of them added (a
/// modifier in `#[openapi(...)]` would run before the routes are merged). Made once per
/// process (tens of milliseconds): [`app`] is built again for each MCP tool call.
fn router_and_doc() -> (Router<Arc<Server>>, Arc<utoipa::openapi::OpenApi>) {
    static PARTS: std::sync::LazyLock<(Router<Arc<Server>>, Arc<utoipa::openapi::OpenApi>)> =
        std::sync::LazyLock::new(|| {
            let (api, mut doc) = router().split_for_parts();
            utoipa::Modify::modify(&CommonResponses, &mut doc);
            // A rule without a target fails `every_schema_rule_has_a_target`.
            let _missing = schema_rules::apply(&mut doc);
            (api, Arc::new(doc))
        });
    PARTS.clone()
}

/// The whole HTTP application.
pub fn app(server: Arc<Server>) -> Router {
    let (api, doc) = router_and_doc();
    api.route(
        "/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move { axum::Json((*doc).clone()) }
        }),
    )
    .route("/healthz", get(|| async { "ok" }))
    // Between nodes only (signed with the node secret): a draining node hands its
    // hibernated sandboxes to others.
    .route(
        crate::forward::INTERNAL_WAKE,
        axum::routing::post(crate::forward::internal_wake),
    )
    // The CodeSandbox-compatible surface (seed 000 and the agent gateway).
    .merge(crate::compat::router())
    // The E2B control API (envd requests are taken out by `e2b::envd::route` below).
    .merge(crate::e2b::router())
    // MCP over streamable HTTP; its tools run `/v1` requests through this same app.
    .merge(crate::mcp::router())
    // The web console's static files (`/ui/`), embedded at build time.
    .merge(crate::ui::router())
    // Names the matched route template for the request metrics (outermost layer below).
    .route_layer(axum::middleware::from_fn(crate::metrics::tag_route))
    .fallback(|| async { ApiError::not_found("route_not_found", "no such route") })
    .method_not_allowed_fallback(|| async {
        ApiError::new(
            axum::http::StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not take that method",
        )
    })
    // Requests about another node's sandbox go to that node, once the token is resolved.
    .layer(axum::middleware::from_fn_with_state(
        server.clone(),
        crate::forward::to_owner,
    ))
    // envd requests of the E2B SDKs (an `E2b-Sandbox-Id` header) go to the E2B envd
    // routes; they carry an envd token, no API token, and answer on the sandbox's node.
    .layer(axum::middleware::from_fn_with_state(
        server.clone(),
        crate::e2b::envd::route,
    ))
    // Rate limits per workspace, inside the preview router (previews carry no API token).
    .layer(axum::middleware::from_fn_with_state(
        server.clone(),
        crate::limits::enforce,
    ))
    // E2B's hosts (`49983-<id>.<preview domain>` is envd, `<port>-<id>.…` a preview), outside
    // the rate limits as previews are.
    .layer(axum::middleware::from_fn_with_state(
        server.clone(),
        crate::e2b::host::route,
    ))
    // Preview hosts never reach the routes above (applied after the fallback, so it wraps
    // every route and the fallback).
    .layer(axum::middleware::from_fn_with_state(
        server.clone(),
        crate::preview::route_by_host,
    ))
    // Every request is counted and timed, previews and envd included.
    .layer(axum::middleware::from_fn_with_state(
        server.clone(),
        crate::metrics::record,
    ))
    // Outermost: the request's span (joined to the caller's `traceparent`), around all else.
    .layer(axum::middleware::from_fn(crate::trace::span))
    .with_state(server)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_schema_rule_has_a_target() {
        let (_, mut doc) = super::router().split_for_parts();
        let missing = super::schema_rules::apply(&mut doc);
        assert!(
            missing.is_empty(),
            "schema rules without a target: {missing:?}"
        );
    }

    use axum::body::Bytes;
    use sandpit_api_types::WorkspaceCreateRequest;

    /// An array (or any other non-object) is refused even where serde would read it as the
    /// struct's fields in order: `["x"]` once created a workspace named x.
    #[test]
    fn json_bodies_must_be_objects() {
        for body in [r#"["x"]"#, " [\"x\"]", r#""x""#, "1", "null", "true"] {
            let err = crate::extract::parse_json::<WorkspaceCreateRequest>(&Bytes::from(body))
                .err()
                .unwrap_or_else(|| panic!("{body} was accepted"));
            assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err.code, "invalid_json", "{body}");
        }
        let ok =
            crate::extract::parse_json::<WorkspaceCreateRequest>(&Bytes::from(" {\"name\":\"x\"}"));
        assert!(ok.is_ok());
    }

    /// The checked-in OpenAPI document matches the code. To refresh it:
    /// `SANDPIT_UPDATE_OPENAPI=1 cargo test -p sandpit-server openapi`.
    #[test]
    fn openapi_document_is_current() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi/sandpit.json");
        let current = super::openapi()
            .to_pretty_json()
            .expect("document serializes")
            + "\n";
        if std::env::var_os("SANDPIT_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &current).expect("write openapi/sandpit.json");
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == current,
            "openapi/sandpit.json is stale: run `SANDPIT_UPDATE_OPENAPI=1 cargo test -p sandpit-server openapi`"
        );
    }
}
