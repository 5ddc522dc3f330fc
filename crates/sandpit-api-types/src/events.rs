//! The workspace's lifecycle event stream (`GET /v1/events`).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// One lifecycle event (Server-Sent Events: the SSE `id` is `seq`, the event name is `type`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct LifecycleEvent {
    /// Position in the workspace's log; resume after it with `Last-Event-ID`.
    pub seq: i64,
    /// `created`, `started` (`detail.path`: `pool`, `snapshot`, `boot_snapshot` or `cold`),
    /// `suspended` (`detail.reason`: `requested` or `idle`), `woken`, `forked`
    /// (`detail.parent`), `failed` (`detail.reason`), `destroyed`, `build_finished`
    /// (`detail.template`, `detail.status`, `detail.error`), `secret_injected`
    /// (`detail.secret`, `detail.host`: the proxy put that secret's value into a request of
    /// the sandbox; never the value).
    #[serde(rename = "type")]
    pub kind: String,
    /// The sandbox it is about (none for builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// What else the event says.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    /// When it happened (RFC 3339).
    pub at: String,
}

/// Where a stream starts.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
pub struct EventsQuery {
    /// Start after this `seq` (as `Last-Event-ID` does; the header wins). `0`: everything
    /// kept. Without either, the stream starts with the next event.
    pub after: Option<i64>,
}
