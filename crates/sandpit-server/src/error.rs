//! Errors: [`ServerError`] for what failed inside the server, [`ApiError`] for what a client is
//! told (a stable code and an HTTP status; internal details are logged, never returned).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sandpit_api_types::{ErrorBody, ErrorDetail};

/// What failed inside the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The control layer (its store, its domain rules).
    #[error("control")]
    Control(#[from] sandpit_control::ControlError),
    #[error("runtime")]
    Runtime(#[from] sandpit_runtime::RuntimeError),
    #[error("network")]
    Net(#[from] sandpit_net::NetError),
    #[error("talking to the agent of {sandbox}: {what}")]
    Agent { sandbox: String, what: String },
    #[error("agent of {sandbox} did not answer within {secs} s (last attempt: {last})")]
    AgentTimeout {
        sandbox: String,
        secs: u64,
        /// How the last attempt failed (refused, no answer, ...), for diagnosis.
        last: String,
    },
    #[error("preparing {what}")]
    Files {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no free network slot (pool exhausted)")]
    NoSlot,
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A stored record (a policy, an environment, a template's spec) does not decode:
    /// operations that need it fail closed with 500 `corrupt_record`, never with a default.
    #[error("the stored {what} does not decode")]
    Undecodable {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Decode a stored JSON record, failing closed: a record that does not decode is an error
/// naming `what`, never a default.
pub fn decode<T: serde::de::DeserializeOwned>(
    what: impl FnOnce() -> String,
    json: &str,
) -> Result<T, ServerError> {
    serde_json::from_str(json).map_err(|source| ServerError::Undecodable {
        what: what(),
        source,
    })
}

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

impl From<ServerError> for ApiError {
    fn from(e: ServerError) -> Self {
        // The control layer's errors map (and log) in one place.
        let e = match e {
            ServerError::Control(c) => return ApiError::from(c),
            e => e,
        };
        // The chain goes to the log; the client gets a code it can act on.
        tracing::error!(error = %DisplayChain(&e), "internal error");
        match e {
            ServerError::NoSlot => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "capacity_exhausted",
                "no network slot is free; destroy sandboxes or enlarge the address pool",
            ),
            ServerError::Undecodable { .. } => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "corrupt_record",
                "a stored record this operation needs does not decode; nothing was done (see the server log)",
            ),
            ServerError::AgentTimeout { .. } => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "agent_unreachable",
                "the sandbox's agent did not answer",
            ),
            _ => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal server error; see the server log",
            ),
        }
    }
}

/// The one place the control layer's errors become HTTP answers.
impl From<sandpit_control::ControlError> for ApiError {
    fn from(e: sandpit_control::ControlError) -> Self {
        use sandpit_control::ControlError as C;
        match e {
            C::NotFound { what } => ApiError::not_found("not_found", format!("{what} not found")),
            C::Forbidden { message } => ApiError::forbidden("forbidden", message),
            C::Conflict { code, message } => ApiError::conflict(code, message),
            C::Invalid { code, message } => ApiError::bad_request(code, message),
            C::Quota { code, message } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message)
            }
            C::DiskFull => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "host_disk_full",
                "the host's free-space reserve is reached; nothing was done",
            ),
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
        (self.status, Json(body)).into_response()
    }
}

/// Formats an error with its whole `source()` chain: `a: b: c`.
pub struct DisplayChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

/// An [`ApiError`] in the CodeSandbox envelope.
pub struct CsbError(pub ApiError);

impl From<ApiError> for CsbError {
    fn from(e: ApiError) -> Self {
        CsbError(e)
    }
}

impl From<crate::error::ServerError> for CsbError {
    fn from(e: crate::error::ServerError) -> Self {
        CsbError(e.into())
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
