//! E2B compatibility: the control API the unmodified `e2b` SDKs call (`control`) and envd,
//! the in-sandbox daemon they talk to for commands and files (`envd`), answered by the
//! server itself and translated to the agent protocol. Not in the OpenAPI document: the
//! SDKs are the specification (see `docs/e2b-compat.md` for what is supported).
//!
//! Control-plane calls authenticate with `X-API-KEY: <Sandpit API token>` (the same check
//! as `Authorization: Bearer`, see [`crate::auth::resolve`]); envd calls with the sandbox's
//! envd access token (`X-Access-Token`), handed out by create and connect, stored hashed.
//! envd requests are recognised by their `E2b-Sandbox-Id` header ([`envd::route`]) or
//! their host `49983-<id>.<preview domain>` ([`host::route`], which also serves
//! `getHost(port)`'s `<port>-<id>.<preview domain>` as a preview).
//!
//! Errors are `{"code": <HTTP status>, "message"}` on the control plane and envd's HTTP
//! routes, and Connect errors (`{"code": "not_found", …}`) on envd's RPC routes.

pub mod connect;
pub mod control;
pub mod envd;
pub mod host;
pub mod store;
pub mod watch;

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::server::Server;

/// The envd version Sandpit reports: the SDKs gate features on it. 0.4.0: the default user
/// is not named on each call, stdin is chosen at start; below 0.5.2 (no `CloseStdin`) and
/// 0.5.7 (uploads are multipart, never octet-stream).
pub const ENVD_VERSION: &str = "0.4.0";
/// The port the SDKs put in `E2b-Sandbox-Port` for envd.
pub const ENVD_PORT: &str = "49983";
/// The `clientID` of every sandbox.
pub const CLIENT_ID: &str = "sandpit";

/// The control-plane routes, merged into the main router.
pub fn router() -> Router<Arc<Server>> {
    control::router()
}

/// An error in E2B's shape: `{"code": <status>, "message"}` with that HTTP status (the JS
/// SDK reads the code from the body, Python from the status).
#[derive(Debug)]
pub struct E2bError(pub ApiError);

impl From<ApiError> for E2bError {
    fn from(e: ApiError) -> Self {
        E2bError(e)
    }
}

impl From<sandpit_control::ControlError> for E2bError {
    fn from(e: sandpit_control::ControlError) -> Self {
        E2bError(e.into())
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let e = self.0;
        let body = serde_json::json!({"code": e.status.as_u16(), "message": e.message});
        (e.status, Json(body)).into_response()
    }
}
