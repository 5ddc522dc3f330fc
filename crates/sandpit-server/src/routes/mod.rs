//! HTTP routes: one module per resource, assembled into one router with its OpenAPI document.

pub mod files;
pub mod org;
pub mod ports;
pub mod previews;
pub mod sandboxes;
pub mod templates;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::routing::get;
use serde::de::DeserializeOwned;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::error::ApiError;
use crate::server::Server;

/// Largest JSON request body.
const MAX_JSON_BODY: usize = 1 << 20;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sandpit API",
        description = "Self-hosted sandboxes: create from a template, exec, files, suspend and wake.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    modifiers(&BearerAuth),
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

fn router() -> OpenApiRouter<Arc<Server>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(sandboxes::router())
        .merge(files::router())
        .merge(ports::router())
        .merge(previews::router())
        .merge(templates::router())
        .merge(org::router())
}

/// The OpenAPI document of every route.
pub fn openapi() -> utoipa::openapi::OpenApi {
    router().split_for_parts().1
}

/// The whole HTTP application.
pub fn app(server: Arc<Server>) -> Router {
    let (api, doc) = router().split_for_parts();
    let doc = Arc::new(doc);
    api.route(
        "/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move { axum::Json((*doc).clone()) }
        }),
    )
    .route("/healthz", get(|| async { "ok" }))
    // The CodeSandbox-compatible surface (seed 000 and the agent gateway).
    .merge(crate::compat::router())
    .fallback(|| async { ApiError::not_found("route_not_found", "no such route") })
    .method_not_allowed_fallback(|| async {
        ApiError::new(
            axum::http::StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not take that method",
        )
    })
    // Rate limits per workspace, inside the preview router (previews carry no API token).
    .layer(axum::middleware::from_fn_with_state(
        server.clone(),
        crate::limits::enforce,
    ))
    // Preview hosts never reach the routes above (applied after the fallback, so it wraps
    // every route and the fallback).
    .layer(axum::middleware::from_fn_with_state(
        server.clone(),
        crate::preview::route_by_host,
    ))
    .with_state(server)
}

/// A JSON body, parsed whatever the Content-Type says (so `curl -d` works), with errors in
/// the API's shape.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let body = read_body(req).await?;
        parse_json(&body).map(ApiJson)
    }
}

/// An optional JSON body: empty means `T::default()`.
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let body = read_body(req).await?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        parse_json(&body).map(OptionalJson)
    }
}

async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), MAX_JSON_BODY)
        .await
        .map_err(|_| {
            ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "request body exceeds 1 MiB",
            )
        })
}

fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid request body: {e}")))
}

/// Query parameters with errors in the API's shape.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str(query)
            .map(ApiQuery)
            .map_err(|e| {
                ApiError::bad_request("invalid_query", format!("invalid query string: {e}"))
            })
    }
}

#[cfg(test)]
mod tests {
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
