//! The drain: a node the fleet set draining hibernates its running sandboxes, so that (with
//! an image store) each can move to another node ([`super::moves`]); the server then asks
//! other nodes to take them over.

use std::sync::Arc;

use super::Node;
use crate::Status;
use crate::error::DisplayChain;

/// The drain: hibernate every sandbox running on this node, so that (with an image store)
/// each can wake on another node. Sandboxes that cannot be hibernated are left running and
/// logged. Returns the ids hibernated, in order.
pub async fn hibernate_all(node: &Arc<Node>) -> Vec<String> {
    let rows = match node
        .store
        .sandboxes
        .with_status(&node.cfg.node_id, &[Status::Running])
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(error = %DisplayChain(&e), "drain: listing running sandboxes");
            return Vec::new();
        }
    };
    let mut done = Vec::new();
    for row in rows {
        if !node.is_draining() {
            tracing::info!("drain ended early: the node was undrained");
            break;
        }
        match super::lifecycle::suspend(node, &row.id).await {
            Ok(_) => done.push(row.id.to_string()),
            Err(e) => {
                tracing::error!(sandbox = %row.id, error = %DisplayChain(&e), "drain: hibernating failed; it keeps running here")
            }
        }
    }
    tracing::info!(
        hibernated = done.len(),
        "drain: running sandboxes hibernated"
    );
    done
}
