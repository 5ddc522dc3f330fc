//! `GET /v1/usage`: what a workspace uses of its limits.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One limit of a workspace and what it uses of it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct UsageItem {
    /// The limit; 0 when there is none.
    pub limit: u32,
    pub used: u32,
    /// When an hourly allowance is whole again (RFC 3339); absent for counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<String>,
}

/// A workspace's use of each of its limits (reading it spends nothing).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct WorkspaceUsage {
    pub workspace_id: String,
    /// API requests this hour.
    pub requests_hourly: UsageItem,
    /// Sandboxes created (or forked) this hour.
    pub sandboxes_hourly: UsageItem,
    /// Sandboxes creating or running.
    pub running: UsageItem,
    /// Sandboxes suspended, and persistent ones that will be when idle.
    pub suspended: UsageItem,
    /// Templates kept (every version; deleted ones aside).
    pub templates: UsageItem,
    /// Template builds running or waiting.
    pub builds: UsageItem,
    pub snapshots: UsageItem,
    pub volumes: UsageItem,
}
