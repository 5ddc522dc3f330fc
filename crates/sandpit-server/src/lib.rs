//! The Sandpit server: HTTP API, auth, sandbox lifecycle and the store.
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        reason = "unit tests build host-side fixtures by path"
    )
)]

pub mod auth;
pub mod builds;
pub mod compat;
pub mod csb_store;
pub mod dns;
pub mod e2b;
pub mod error;
pub mod extract;
pub mod fork;
pub mod forward;
pub mod gc;
pub mod idempotency;
pub mod lifecycle;
pub mod limits;
pub mod mcp;
pub mod metrics;
pub mod preview;
pub mod replica;
pub mod routes;
pub mod server;
pub mod store;
pub mod trace;
pub mod ui;
pub mod util;
pub mod webhooks;

#[cfg(test)]
mod tests;

pub use routes::{app, openapi};
pub use server::{Server, ServerConfig};
