//! Errors: [`ControlError`] for what failed inside the server, [`ApiError`] for what a client is
//! told (a stable code and an HTTP status; internal details are logged, never returned).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sandpit_api_types::{ErrorBody, ErrorDetail};

pub use sandpit_control::{ControlError, DisplayChain, decode};

/// An error a client sees: `{"error":{"code","message"}}` with an HTTP status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    /// A per-workspace limit is reached: `quota_exceeded`, with the limit's name (its
    /// `sandpit serve` flag) and value in the message. 429 for limits that free themselves
    /// (concurrent builds), 507 for those held until the tenant deletes something.
    pub fn quota(status: StatusCode, limit: &str, value: u32, what: &str) -> Self {
        Self::new(
            status,
            "quota_exceeded",
            format!("workspace limit {limit} = {value} reached: {what}"),
        )
    }
}

/// The one place the control layer's errors become HTTP answers.
impl From<sandpit_control::ControlError> for ApiError {
    fn from(e: sandpit_control::ControlError) -> Self {
        use sandpit_control::ControlError as C;
        match e {
            C::NotFound { code, message } => ApiError::not_found(code, message),
            C::Forbidden { code, message } => ApiError::forbidden(code, message),
            C::Conflict { code, message } => ApiError::conflict(code, message),
            C::Invalid { code, message } => ApiError::bad_request(code, message),
            C::Quota { code, message } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message)
            }
            C::Kept { limit, value, what } => {
                ApiError::quota(StatusCode::INSUFFICIENT_STORAGE, limit, value, &what)
            }
            C::Underway { limit, value, what } => {
                crate::limits::add_headers([(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("30"),
                )]);
                ApiError::quota(StatusCode::TOO_MANY_REQUESTS, limit, value, &what)
            }
            C::DiskFull { message } => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "host_disk_full", message)
            }
            C::Unavailable { code, message } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
            }
            C::NoSlot => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "capacity_exhausted",
                "no network slot is free; destroy sandboxes or enlarge the address pool",
            ),
            e @ C::AgentTimeout { .. } => {
                tracing::error!(error = %DisplayChain(&e), "agent unreachable");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "agent_unreachable",
                    "the sandbox's agent did not answer",
                )
            }
            e if e.is_database_unreachable() => {
                tracing::error!(error = %DisplayChain(&e), "database unreachable");
                crate::limits::add_headers([(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("5"),
                )]);
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the database is out of reach; retry shortly",
                )
            }
            e @ C::Corrupt { .. } => {
                tracing::error!(error = %DisplayChain(&e), "corrupt record");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "corrupt_record",
                    "a stored record this operation needs does not decode; nothing was done (see the server log)",
                )
            }
            e => {
                tracing::error!(error = %DisplayChain(&e), "internal error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal server error; see the server log",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        resp.extensions_mut()
            .insert(crate::metrics::ErrorCode(self.code));
        resp
    }
}

/// An [`ApiError`] in the CodeSandbox envelope.
pub struct CsbError(pub ApiError);

impl From<ApiError> for CsbError {
    fn from(e: ApiError) -> Self {
        CsbError(e)
    }
}

impl From<sandpit_control::ControlError> for CsbError {
    fn from(e: sandpit_control::ControlError) -> Self {
        CsbError(e.into())
    }
}

impl IntoResponse for CsbError {
    fn into_response(self) -> Response {
        let e = self.0;
        let body = serde_json::json!({
            "success": false,
            "errors": [e.message.clone()],
            "error": {"code": e.code, "message": e.message},
        });
        (e.status, Json(body)).into_response()
    }
}
