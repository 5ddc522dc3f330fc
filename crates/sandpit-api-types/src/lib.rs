//! Request and response types of the Sandpit HTTP API, shared by the server, the Rust SDK and
//! the CLI. Pure data: serde + OpenAPI schemas, no I/O.
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        reason = "unit tests build host-side fixtures by path"
    )
)]

pub mod duration;
pub mod events;
pub mod org;
pub mod preview;
pub mod sandbox;
pub mod secrets;
pub mod server_timing;
pub mod templates;
pub mod terminal;
pub mod usage;
pub mod volumes;
pub mod webhooks;

pub use duration::{format_duration, parse_duration};
pub use events::*;
pub use org::*;
pub use preview::*;
pub use sandbox::*;
pub use secrets::*;
pub use templates::*;
pub use terminal::*;
pub use usage::*;
pub use volumes::*;
pub use webhooks::*;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every 4xx and 5xx response of the `/v1` API.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// A machine-readable `code` (stable, snake_case) and a human-readable `message`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}
