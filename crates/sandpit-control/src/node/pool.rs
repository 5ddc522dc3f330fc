//! The warm pool: sandboxes booted ahead of demand, idle, owned by the node's own
//! workspace, and handed out by create, which then only re-keys them for their owner
//! (workspace, settings, egress policy) instead of booting.
//!
//! A pooled sandbox is used once: it is never returned to the pool, so owners never share
//! state. Its environment is sent with each exec (see `lifecycle::exec_env`), and it boots
//! with egress denied until its owner's policy is applied at hand-out.
#![expect(clippy::disallowed_methods, reason = "/proc/meminfo is the kernel's")]

use crate::Transition;
use std::sync::Arc;
use std::time::Duration;

use super::Node;
use super::boot::{boot, insert_with_slot, stored_rules, system_row};
use super::images::BASE_TEMPLATE_ID;
use crate::error::{ControlError, DisplayChain};
use crate::phases::{self, Phase};
use crate::store::Sandbox;
use crate::util::now_ms;
/// Refilling stops while the host has less memory available than this.
const MIN_AVAILABLE_BYTES: u64 = 1 << 30;

/// Hand a pooled sandbox of `owner.template_id` to `owner` (a validated, not yet inserted
/// row). `None` when the pool has none (or is disabled): the caller boots one instead.
pub async fn take(
    node: &Arc<Node>,
    owner: &Sandbox,
    admitted: &super::boot::Admitted<'_>,
) -> Result<Option<Sandbox>, ControlError> {
    if node.cfg.warm_pool == 0 {
        return Ok(None);
    }
    // The owner's workspace counts the sandbox from here on (the store checks its running
    // quota in the same transaction).
    let taken = phases::timed(
        Phase::Pool,
        admitted.count(
            node.store.sandboxes.take_pooled(
                &owner.template_id,
                owner,
                super::boot::running_quota(node, &owner.workspace_id),
            ),
            |t| t.is_some() as u32,
        ),
    )
    .await?;
    let Some(id) = taken else {
        return Ok(None);
    };
    node.pool_refill.notify_one();
    let lock = node.lock_of(&id);
    let _guard = lock.write().await;
    let row = node
        .store
        .sandboxes
        .get(&id)
        .await?
        .ok_or_else(|| ControlError::Internal(format!("pooled sandbox {id} vanished")))?;
    let applied = match row.slot {
        Some(slot) => phases::timed(
            Phase::Netns,
            node.net.set_egress(slot as u32, &stored_rules(&row)?),
        )
        .await
        .map_err(ControlError::from),
        None => Err(ControlError::Internal(format!(
            "pooled sandbox {id} has no slot"
        ))),
    };
    // Never hand out a sandbox whose policy is not the owner's.
    if let Err(e) = applied {
        node.teardown(&row.id, &row.runtime_id, row.slot.map(|s| s as u32))
            .await;
        node.store
            .sandboxes
            .mark_failed(
                &row.id,
                &format!("applying the egress policy: {}", DisplayChain(&e)),
                now_ms(),
            )
            .await?;
        return Err(e);
    }
    tracing::info!(sandbox = %id, workspace = %row.workspace_id, "handed out from the warm pool");
    Ok(Some(row))
}

/// Boot one sandbox into the pool.
async fn fill_one(
    node: &Arc<Node>,
    template_id: &str,
    template_name: &str,
) -> Result<(), ControlError> {
    let mut row = system_row(node, template_id, template_name);
    let lock = node.lock_of(&row.id);
    let _guard = lock.write().await;
    insert_with_slot(node, &mut row).await?;
    // Its resolver is written now, not at hand-out: it is the node's (the same for every
    // owner), and the pool does not outlive the node process that wrote it.
    let booted = match boot(node, &row, None).await {
        Ok(()) => super::boot::write_resolv_conf(node, &row).await,
        Err(e) => Err(e),
    };
    if let Err(e) = booted {
        // The slot too (detach is idempotent: a failed boot released it already).
        node.teardown(&row.id, &row.runtime_id, row.slot.map(|s| s as u32))
            .await;
        node.store
            .sandboxes
            .mark_destroyed(&row.id, now_ms())
            .await?;
        return Err(e);
    }
    node.store
        .sandboxes
        .transition(&row.id, Transition::Parked, None, now_ms())
        .await?;
    Ok(())
}

/// Free memory the kernel reports (`MemAvailable`), if it can be read.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Keep `warm_pool` sandboxes of the base template ready: refill after each hand-out and
/// on a timer, one at a time, while memory allows. Stops with the node.
pub fn spawn_refill(node: &Arc<Node>) -> tokio::task::JoinHandle<()> {
    let node = node.clone();
    tokio::spawn(async move {
        let target = node.cfg.warm_pool as i64;
        if target == 0 {
            return;
        }
        loop {
            loop {
                let have = match node
                    .store
                    .sandboxes
                    .pooled_count(&node.cfg.node_id, BASE_TEMPLATE_ID)
                    .await
                {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::error!(error = %DisplayChain(&e), "warm pool: counting");
                        break;
                    }
                };
                if have >= target || node.shutdown.is_cancelled() {
                    break;
                }
                if mem_available().is_some_and(|m| m < MIN_AVAILABLE_BYTES) {
                    tracing::warn!("warm pool: less than 1 GiB of memory available; not refilling");
                    break;
                }
                if let Err(e) =
                    fill_one(&node, BASE_TEMPLATE_ID, super::images::BASE_TEMPLATE_NAME).await
                {
                    tracing::error!(error = %DisplayChain(&e), "warm pool: booting a sandbox");
                    break;
                }
            }
            tokio::select! {
                _ = node.shutdown.cancelled() => return,
                _ = node.pool_refill.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    })
}
