//! What keeps a node true to its store: reconciliation at start (after a crash or a host
//! reboot), the liveness watch (sandboxes that died under a limit or from outside) and the
//! reaper (timeouts, idle suspends, and once a minute pruning events and deliveries and
//! sweeping lineage CAs).
#![expect(
    clippy::disallowed_methods,
    reason = "the data dir's own layout (state dirs hold disk images; tenant trees in them are removed through sandpit_fs)"
)]

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::Node;
use super::{boot, lifecycle};
use crate::Status;
use crate::error::{ControlError, DisplayChain};
use crate::recovery::{self, Recovery};
use crate::store::Sandbox;
use crate::util::now_ms;

use futures::StreamExt;

/// Sandboxes settled at once by [`Node::reconcile`].
pub const RECONCILE_PARALLEL: usize = 16;

/// What [`Node::reconcile`] keeps of one sandbox.
#[derive(Default)]
struct Kept {
    runtime: Option<String>,
    slot: Option<u32>,
    dir: Option<String>,
}

impl Node {
    /// Bring the store, the runtime, the network and the data directory into agreement after
    /// a crash or a host reboot. Afterwards every sandbox the store knows is running,
    /// suspended with its files (and memory image, if one was taken) or failed with a reason,
    /// and nothing exists that the store does not know.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), ControlError> {
        // Rows from before sandboxes had owners were one server's: this node's now.
        let adopted = self
            .store
            .sandboxes
            .adopt_unowned(&self.cfg.node_id)
            .await?;
        if adopted > 0 {
            tracing::info!(adopted, node = %self.cfg.node_id, "adopted sandboxes recorded without a node");
        }
        let rows = self
            .store
            .sandboxes
            .with_status(
                &self.cfg.node_id,
                &[
                    Status::Creating,
                    Status::Running,
                    Status::Suspended,
                    Status::Pooled,
                ],
            )
            .await?;
        let now = now_ms();
        let mut keep_runtime = HashSet::new();
        let mut keep_net = HashSet::new();
        let mut keep_dirs = HashSet::new();
        // Rows are independent: [`RECONCILE_PARALLEL`] at a time (each mostly waits on
        // runsc, an agent or the store), so a host with a thousand sandboxes serves again
        // in seconds, not half an hour.
        let mut settled = futures::stream::iter(rows)
            .map(|row| self.reconcile_row(row, now))
            .buffered(RECONCILE_PARALLEL);
        let mut first_err = None;
        while let Some(r) = settled.next().await {
            match r {
                Ok(kept) => {
                    keep_runtime.extend(kept.runtime);
                    keep_net.extend(kept.slot);
                    keep_dirs.extend(kept.dir);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        drop(settled);
        if let Some(e) = first_err {
            return Err(e);
        }
        // Sandboxes the fleet settled while this node was away: torn down, slots freed.
        self.drop_settled().await?;
        // Orphans: anything under our names that the store does not account for.
        if let Err(e) = self
            .runtime
            .remove_orphans(&keep_runtime, &self.cfg.data_dir.join("sandboxes"))
            .await
        {
            tracing::error!(error = %DisplayChain(&e), "cleaning up orphaned sandboxes");
        }
        // Running sandboxes hold a namespace; suspended ones do not.
        let orphans = self
            .net
            .list_slots()
            .await?
            .into_iter()
            .filter(|slot| !keep_net.contains(slot));
        let mut detached = futures::stream::iter(orphans)
            .map(|slot| async move {
                tracing::info!(slot, "removing orphaned network slot");
                self.net.detach(slot).await
            })
            .buffer_unordered(RECONCILE_PARALLEL);
        let mut first_err = None;
        while let Some(r) = detached.next().await {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        drop(detached);
        if let Some(e) = first_err {
            return Err(e.into());
        }
        for dir in ["sandboxes", "checkpoints"] {
            remove_unknown_dirs(&self.cfg.data_dir.join(dir), &keep_dirs);
        }
        // Volume images whose row is gone (a crash between the two) are garbage.
        if let Err(e) = super::volumes::remove_orphans(self).await {
            tracing::error!(error = %DisplayChain(&e), "cleaning up orphaned volumes");
        }
        // Snapshot directories whose row is gone (a crash between the two) are garbage.
        let snapshots: HashSet<String> = self.store.snapshots.ids().await?.into_iter().collect();
        remove_unknown_dirs(&self.cfg.data_dir.join("snapshots"), &snapshots);
        Ok(())
    }

    /// Settle one sandbox found at start-up ([`Node::reconcile`]); what of it to keep.
    async fn reconcile_row(self: &Arc<Self>, row: Sandbox, now: i64) -> Result<Kept, ControlError> {
        let mut kept = Kept::default();
        let slot = row.slot.map(|s| s as u32);
        // Only a running sandbox is asked whether it still runs and answers.
        let answers = if row.status == Status::Running {
            let alive = matches!(
                self.runtime.status(&row.runtime_id).await,
                Ok(sandpit_runtime::RuntimeStatus::Running)
            );
            Some(
                alive
                    && match slot {
                        Some(s) => {
                            crate::agent::AgentClient::new(&row.id, self.net.addrs(s).sandbox_ip)
                                .wait_ready(Duration::from_secs(3))
                                .await
                                .is_ok()
                        }
                        None => false,
                    },
            )
        } else {
            None
        };
        match recovery::after_restart(row.status, row.mode, answers, slot.is_some()) {
            Recovery::DiscardPooled => {
                // The pool is refilled fresh after a restart.
                self.teardown(&row.id, &row.runtime_id, slot).await;
                self.store.sandboxes.mark_destroyed(&row.id, now).await?;
            }
            Recovery::FailInterruptedCreate => {
                tracing::warn!(sandbox = %row.id, "server stopped during create: cleaning up");
                self.teardown(&row.id, &row.runtime_id, slot).await;
                self.store
                    .sandboxes
                    .mark_failed(&row.id, recovery::INTERRUPTED_CREATE, now)
                    .await?;
            }
            Recovery::Adopt => {
                // Its nft rules survived; this process's domain filter learns them.
                if let Some(s) = slot {
                    // A stored policy that does not decode becomes deny_all (and is
                    // applied: the surviving rules were made from the old one).
                    let adopted = match boot::stored_rules(&row) {
                        Ok(rules) => self.net.adopt(s, &rules).map_err(ControlError::from),
                        Err(_) => match boot::rules_or_deny(self, &row).await {
                            Ok(rules) => self
                                .net
                                .set_egress(s, &rules)
                                .await
                                .map_err(ControlError::from),
                            Err(e) => Err(e),
                        },
                    };
                    if let Err(e) = adopted {
                        tracing::warn!(sandbox = %row.id, error = %DisplayChain(&e), "adopting the egress policy");
                    }
                    // Its secrets too (the proxy of the earlier process is gone).
                    if let Err(e) = crate::secrets::attach(self, &row.id, s).await {
                        tracing::warn!(sandbox = %row.id, error = %DisplayChain(&e), "adopting the secrets");
                    }
                }
                kept.runtime = Some(row.runtime_id.clone());
                kept.slot = slot;
                kept.dir = Some(row.id.to_string());
            }
            Recovery::SuspendLost => {
                // Its files are on disk; its memory is gone unless a checkpoint exists.
                tracing::warn!(sandbox = %row.id, "persistent sandbox stopped while the server was down: suspending it");
                let _ = self
                    .runtime
                    .stop(&row.runtime_id, &self.state_dir(&row.id))
                    .await;
                if let Some(s) = slot {
                    let _ = self.net.detach(s).await;
                }
                self.store
                    .sandboxes
                    .mark_suspended(&row.id, Some(recovery::LOST_WHILE_DOWN), now)
                    .await?;
                kept.dir = Some(row.id.to_string());
            }
            Recovery::FailLost => {
                tracing::warn!(sandbox = %row.id, "ephemeral sandbox stopped while the server was down: failing it");
                self.teardown(&row.id, &row.runtime_id, slot).await;
                self.store
                    .sandboxes
                    .mark_failed(&row.id, recovery::EPHEMERAL_LOST_WHILE_DOWN, now)
                    .await?;
            }
            Recovery::KeepSuspended { release_slot } => {
                // Nothing may run; files and image are kept. A suspended sandbox holds
                // no network slot (one suspended by an older server may still: its
                // namespace goes below, with the other orphans).
                let _ = self
                    .runtime
                    .stop(&row.runtime_id, &self.state_dir(&row.id))
                    .await;
                if release_slot {
                    self.store.sandboxes.release_slot(&row.id, now).await?;
                }
                kept.dir = Some(row.id.to_string());
            }
            Recovery::Nothing => {}
        }
        Ok(kept)
    }

    /// Tear down this node's sandboxes that the fleet settled while it was lost (failed
    /// or destroyed by another node's sweep, their slots still recorded): their runtime,
    /// network and files here go, and the slots are free again. Called when a heartbeat
    /// finds the node fenced, and at the end of every reconciliation. How many it tore
    /// down.
    pub async fn drop_settled(self: &Arc<Self>) -> Result<usize, ControlError> {
        let rows = self
            .store
            .sandboxes
            .settled_holding_slots(&self.cfg.node_id)
            .await?;
        for row in &rows {
            self.cancel_of(&row.id).cancel();
            let _guard = self.lock_of(&row.id).write_owned().await;
            self.previews.cut(&row.id).await;
            self.teardown(&row.id, &row.runtime_id, row.slot.map(|s| s as u32))
                .await;
            self.store.sandboxes.release_slot(&row.id, now_ms()).await?;
            tracing::warn!(sandbox = %row.id, status = row.status.as_str(), "tore down a sandbox the fleet settled while this node was lost");
        }
        Ok(rows.len() + self.drop_moved_away().await?)
    }

    /// Tear down what still runs here of sandboxes that are no longer this node's (the
    /// fleet restored them elsewhere from their image while this node was lost, or another
    /// node took them over), and the network slots no sandbox of this node holds. The
    /// slots are listed before the store is asked, so a slot attached meanwhile was claimed
    /// in the store first and is kept. How many sandboxes it tore down.
    async fn drop_moved_away(self: &Arc<Self>) -> Result<usize, ControlError> {
        let slots = self.net.list_slots().await?;
        let prefix = format!("{}-", self.cfg.prefix);
        let mut gone = 0;
        for runtime_id in self.runtime.list().await? {
            let Some(id) = runtime_id.strip_prefix(&prefix) else {
                continue;
            };
            // Only sandboxes the store knows as another node's: anything else is left to
            // the reconciliation at start.
            let Some(row) = self.store.sandboxes.get(id).await? else {
                continue;
            };
            if self.is_mine(&row) {
                continue;
            }
            let _guard = self.lock_of(id).write_owned().await;
            self.previews.cut(id).await;
            self.teardown(id, &runtime_id, None).await;
            tracing::warn!(sandbox = %id, owner = %row.node_id, "tore down a sandbox that left this node while it was lost");
            gone += 1;
        }
        let used: HashSet<i64> = self
            .store
            .sandboxes
            .used_slots(&self.cfg.node_id)
            .await?
            .into_iter()
            .collect();
        for slot in slots {
            if !used.contains(&i64::from(slot)) {
                tracing::info!(
                    slot,
                    "removing a network slot no sandbox of this node holds"
                );
                self.net.detach(slot).await?;
            }
        }
        Ok(gone)
    }

    /// Start the reaper: destroys ephemeral sandboxes whose timeout passed and suspends
    /// persistent ones idle for longer than their idle timeout. Stops with `shutdown`.
    /// The liveness watch: finds running sandboxes whose runtime stopped (killed by a limit or
    /// from outside), ends the operations in flight on them and settles them in the
    /// background, so a death is noticed within `liveness_interval` rather than at the next
    /// call. Sandboxes in a transition (their write lock taken or asked for) are left alone.
    async fn watch_liveness(self: &Arc<Self>) {
        let rows = match self.store.sandboxes.running(&self.cfg.node_id).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %DisplayChain(&e), "liveness watch: listing running sandboxes");
                return;
            }
        };
        let rows: Vec<(String, String)> = rows
            .into_iter()
            .filter(|(id, _)| self.lock_of(id).try_read().is_ok())
            .collect();
        let runtime_ids: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
        let dead = match self.runtime.dead(&runtime_ids).await {
            Ok(dead) => dead,
            Err(e) => {
                tracing::error!(error = %DisplayChain(&e), "liveness watch: asking the runtime");
                return;
            }
        };
        for (id, runtime_id) in rows {
            if !dead.contains(&runtime_id) || !self.note_death(&id) {
                continue;
            }
            tracing::warn!(sandbox = %id, "liveness watch: the sandbox no longer runs");
            let node = self.clone();
            tokio::spawn(async move {
                lifecycle::settle_if_dead(&node, &id).await;
                node.metrics.liveness_settlements.inc();
                node.forget_death(&id);
            });
        }
    }

    pub fn spawn_reaper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(node.cfg.reaper_interval);
            let mut last_watch = std::time::Instant::now();
            // Events are pruned once a minute (the first round prunes at once).
            let mut last_prune: Option<std::time::Instant> = None;
            loop {
                tokio::select! {
                    _ = node.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if last_watch.elapsed() >= node.cfg.liveness_interval {
                    last_watch = std::time::Instant::now();
                    node.watch_liveness().await;
                }
                let now = now_ms();
                if last_prune.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60)) {
                    last_prune = Some(std::time::Instant::now());
                    let retention =
                        i64::try_from(node.cfg.events_retention.as_millis()).unwrap_or(i64::MAX);
                    if let Err(e) = node.store.events.prune(now.saturating_sub(retention)).await {
                        tracing::warn!(error = %DisplayChain(&e), "reaper: pruning events");
                    }
                    // Their deliveries go with them (retries end a day after the event).
                    if let Err(e) = node
                        .store
                        .webhooks
                        .prune(now.saturating_sub(retention))
                        .await
                    {
                        tracing::warn!(error = %DisplayChain(&e), "reaper: pruning webhook deliveries");
                    }
                    // Lineage CAs nothing holds any more (and old ones on this node's disk).
                    crate::secrets::sweep(&node).await;
                }
                match node.store.sandboxes.expired(&node.cfg.node_id, now).await {
                    Ok(ids) => {
                        for id in ids {
                            match lifecycle::destroy_if_free(&node, &id).await {
                                Ok(true) => {
                                    tracing::info!(sandbox = %id, "timeout passed: destroyed")
                                }
                                Ok(false) => {}
                                Err(e) => {
                                    tracing::error!(sandbox = %id, error = ?e, "reaper: destroy failed")
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %DisplayChain(&e), "reaper: listing expired sandboxes")
                    }
                }
                match node.store.sandboxes.idle(&node.cfg.node_id, now).await {
                    Ok(ids) => {
                        for id in ids {
                            match lifecycle::suspend_if_idle(&node, &id).await {
                                Ok(true) => {
                                    tracing::info!(sandbox = %id, "idle timeout passed: suspended")
                                }
                                Ok(false) => {}
                                Err(e) => {
                                    tracing::error!(sandbox = %id, error = ?e, "reaper: suspend failed")
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %DisplayChain(&e), "reaper: listing idle sandboxes")
                    }
                }
            }
        })
    }
}

/// Remove every subdirectory of `root` whose name is not in `keep`.
fn remove_unknown_dirs(root: &Path, keep: &HashSet<String>) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !keep.contains(&name) {
            tracing::info!(path = %entry.path().display(), "removing orphaned directory");
            if let Err(e) = sandpit_fs::remove_tree(&entry.path()) {
                tracing::error!(path = %entry.path().display(), error = %e, "removing orphaned directory");
            }
        }
    }
}
