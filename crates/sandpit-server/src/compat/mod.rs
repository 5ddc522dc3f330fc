//! CodeSandbox compatibility: the seed-000 REST surface (`rest`) and the agent gateway
//! (`gateway`) at the `pitcher_url` that `POST /vm/{id}/start` hands out, so the unmodified
//! `@codesandbox/sdk` works against a Sandpit server. Both sit on the server's one listener.
//!
//! Responses use the CodeSandbox envelope (`success`, `errors`, `data`); errors are
//! [`crate::error::CsbError`]. Scopes map one to one onto Sandpit's:
//! `sandbox_create` (create, fork), `sandbox_read` (list, get), `vm_manage` (start,
//! hibernate, shutdown, delete, specs, tags, tokens) and `sandbox_edit_code` (a start by a
//! token without it hands out a read-only agent token).

pub mod download;
pub mod gateway;
pub mod preview_hosts;
pub mod rest;
pub mod shells;
pub mod tasks;
pub mod watch;
pub mod zip;

use std::sync::Arc;

use axum::Router;

use crate::server::Server;

/// The compatibility routes, merged into the main router (not in the OpenAPI document:
/// seed 000 is their specification).
pub fn router() -> Router<Arc<Server>> {
    rest::router()
        .merge(gateway::router())
        .merge(preview_hosts::router())
        .merge(download::router())
}

/// The rate limits `/meta/info` reports, in the SDK's shape (`limit` 0: unlimited; `reset`
/// in Unix seconds), from [`crate::limits::usage`] (which spends nothing).
pub async fn rate_limits(
    server: &crate::server::Server,
    workspace_id: &str,
) -> Result<serde_json::Value, sandpit_control::ControlError> {
    let u = crate::limits::usage(server, workspace_id).await?;
    let hourly = |a: &crate::limits::Allowance| {
        let mut v = serde_json::json!({"limit": a.limit, "remaining": a.remaining});
        if let Some(ms) = a.reset.as_deref().and_then(crate::util::parse_rfc3339) {
            v["reset"] = (ms / 1000).into();
        }
        v
    };
    Ok(serde_json::json!({
        "concurrent_vms": {"limit": u.running.limit, "remaining": u.running.remaining},
        "requests_hourly": hourly(&u.requests_hourly),
        "sandboxes_hourly": hourly(&u.sandboxes_hourly),
    }))
}
