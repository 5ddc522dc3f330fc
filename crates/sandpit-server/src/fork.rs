//! Fork and named snapshots at the HTTP edge: authorize, apply the workspace's rates and
//! early quota answers, then hand over to the control layer (`sandpit_control::node::fork`,
//! where the freeze, copy and restore live). Each child's outcome becomes a [`ForkResult`].

use std::sync::Arc;

use sandpit_api_types::{ErrorBodyRef, ErrorDetail, ForkResult, SandboxMode};
use sandpit_control::node::fork as node;

pub use sandpit_control::node::fork::{MAX_FORK, snapshot_to_api};

use crate::error::ApiError;
use crate::extract::Authorized;
use crate::lifecycle::to_api;
use crate::server::Server;
use crate::store::SnapshotRow;

/// `POST /v1/sandboxes/{id}/fork`: `count` children with the parent's files, memory and
/// settings, each in its own network slot. Returns one result per child, in order.
pub async fn fork(
    server: &Arc<Server>,
    sb: &Authorized,
    count: u32,
) -> Result<Vec<ForkResult>, ApiError> {
    if !(1..=MAX_FORK).contains(&count) {
        return Err(ApiError::bad_request(
            "invalid_count",
            format!("count must be between 1 and {MAX_FORK}"),
        ));
    }
    server.ensure_free_disk()?;
    // Held until the store counts the children's rows.
    let room = server
        .limits
        .admit(
            &server.node,
            sb.workspace_id(),
            count,
            sb.row().mode == SandboxMode::Persistent,
        )
        .await?;
    let room = std::sync::Mutex::new(room);
    let admitted = sandpit_control::node::boot::Admitted {
        lock: &server.limits.admission,
        hand_back: &|n| room.lock().expect("room poisoned").release(n),
    };
    let children = node::fork(&server.node, sb.workspace_id(), sb.id(), count, &admitted).await?;
    Ok(children
        .into_iter()
        .map(|child| match child {
            Ok(row) => ForkResult::Ok(Box::new(to_api(&row))),
            Err(e) => {
                let e = ApiError::from(e);
                ForkResult::Err(ErrorBodyRef {
                    error: ErrorDetail {
                        code: e.code.to_string(),
                        message: e.message,
                    },
                })
            }
        })
        .collect())
}

/// `POST /v1/sandboxes/{id}/snapshots`: save the sandbox's files and memory under a new
/// snapshot id. A running sandbox keeps running.
pub async fn take_snapshot(server: &Arc<Server>, sb: &Authorized) -> Result<SnapshotRow, ApiError> {
    Ok(node::take_snapshot(&server.node, sb.workspace_id(), sb.id()).await?)
}

/// `DELETE /v1/snapshots/{id}`.
pub async fn delete_snapshot(
    server: &Server,
    workspace_id: &str,
    id: &str,
) -> Result<(), ApiError> {
    Ok(node::delete_snapshot(&server.node, workspace_id, id).await?)
}
