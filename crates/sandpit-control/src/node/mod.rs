//! A node: the sandboxes one host runs, and everything that drives them. It holds the
//! store, the runtime and network backends (injected as trait objects), the per-sandbox
//! locks and cancellation, and runs crash reconciliation, the liveness watch and the reaper.
//! The orchestration lives in its submodules: [`lifecycle`] (create, suspend, wake, destroy),
//! [`fork`] (fork and snapshots), [`pool`] (the warm pool) and [`templates`] (template
//! start-up and boot snapshots). Nothing here knows HTTP; callers authorize first.
#![expect(
    clippy::disallowed_methods,
    reason = "the data dir's own layout (state dirs hold disk images; tenant trees in them are removed through sandpit_fs)"
)]

pub mod fork;
pub mod lifecycle;
pub mod pool;
pub mod templates;

#[cfg(test)]
mod tests;

use crate::Status;
use crate::recovery::{self, Recovery};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sandpit_net::SandboxNetwork;
use sandpit_runtime::Runtime;
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

use crate::error::{ControlError, DisplayChain};
use crate::store::Store;
use crate::util::now_ms;

/// Make the directories a node keeps under its data dir (idempotent), and remove the
/// temporary memory images a crash may have left (nothing refers to them).
pub fn make_data_dirs(data_dir: &Path) -> Result<(), ControlError> {
    let _ = std::fs::remove_dir_all(data_dir.join("images-tmp"));
    for dir in [
        "",
        "sandboxes",
        "checkpoints",
        "snapshots",
        "images-tmp",
        "templates",
    ] {
        let p = data_dir.join(dir);
        std::fs::create_dir_all(&p)
            .map_err(ControlError::files(format!("directory {}", p.display())))?;
    }
    Ok(())
}

/// What a node is told (the server builds it from its own configuration).
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// Starts the runtime ids of this node's sandboxes (`<prefix>-<sandbox id>`).
    pub prefix: String,
    /// How often the reaper looks for expired and idle sandboxes.
    pub reaper_interval: Duration,
    /// How long a new or woken sandbox's agent may take to answer.
    pub agent_ready_timeout: Duration,
    /// Ephemeral sandboxes' timeout when the request names none.
    pub default_timeout: Duration,
    /// Persistent sandboxes' idle timeout when the request names none.
    pub default_idle_timeout: Duration,
    /// Booted, idle sandboxes of the base template kept ready for create (0 disables).
    pub warm_pool: u32,
    /// Take a boot snapshot of the base template and start sandboxes by restoring it.
    pub boot_snapshots: bool,
    /// Free space the data filesystem keeps (see [`Node::ensure_free_disk`]). 0: no check.
    pub min_free_disk: u64,
    /// How often the liveness watch looks for running sandboxes that died.
    pub liveness_interval: Duration,
    /// Disk of a `small` sandbox (`medium` twice, `large` four times); `None`: unbounded.
    pub disk_limit: Option<u64>,
    /// Per-workspace quotas the node's store transactions enforce (0: unlimited).
    pub quotas: Quotas,
}

/// Per-workspace limits on what a workspace runs and keeps (0: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quotas {
    /// Sandboxes running (or creating) at once.
    pub max_running: u32,
    /// Sandboxes that are or will be suspended (persistent or hibernated).
    pub max_suspended: u32,
    /// Named snapshots kept.
    pub max_snapshots: u32,
}

/// A running node. Shared as `Arc<Node>` by the server and background tasks.
pub struct Node {
    pub cfg: NodeConfig,
    pub store: Store,
    pub runtime: Arc<dyn Runtime>,
    pub net: Arc<dyn SandboxNetwork>,
    /// The read-only layer holding `/.sandpit/agent`, stacked over every template.
    pub agent_layer: PathBuf,
    /// What every new sandbox gets as `/etc/resolv.conf`.
    pub resolv_conf: String,
    /// Per-sandbox lifecycle locks. Transitions (create, suspend, wake, destroy) hold the
    /// write side; exec and file operations hold the read side, so a checkpoint never runs
    /// while a connection to the agent is open. The std mutex guards only the map.
    locks: Mutex<HashMap<String, Arc<RwLock<()>>>>,
    /// Per-sandbox cancellation of agent operations (exec): destroy cancels it so that a
    /// running command ends at once instead of delaying the destroy. Guards only the map.
    cancels: Mutex<HashMap<String, CancellationToken>>,
    /// Sandboxes the liveness watch found dead and is settling; their cancellation token is
    /// cancelled so operations in flight end at once. Guards only the set.
    deaths: Mutex<std::collections::HashSet<String>>,
    /// Held while choosing a network slot and inserting the row that claims it.
    pub slot_lock: tokio::sync::Mutex<()>,
    /// Wakes the warm-pool refill task after a hand-out.
    pub pool_refill: tokio::sync::Notify,
    /// Serializes egress policy updates, so the policy stored last is the one applied last.
    /// (They hold a sandbox's read lock, not its write lock, so a running exec does not
    /// delay them; two of them must still not interleave.)
    pub egress_lock: tokio::sync::Mutex<()>,
    /// Live preview connections, cut before a checkpoint.
    pub previews: crate::live::LiveConnections,
    pub shutdown: CancellationToken,
}

impl Node {
    /// A node over an opened store and the backends the caller built (`sandpit serve`:
    /// gVisor and the host network; tests: the recording fakes). `agent_layer` is the
    /// read-only layer with the agent; `resolv_conf` what every new sandbox gets. Call
    /// [`Node::reconcile`] before serving.
    pub fn new(
        cfg: NodeConfig,
        store: Store,
        runtime: Arc<dyn Runtime>,
        net: Arc<dyn SandboxNetwork>,
        agent_layer: PathBuf,
        resolv_conf: String,
    ) -> Arc<Node> {
        Arc::new(Node {
            cfg,
            store,
            runtime,
            net,
            agent_layer,
            resolv_conf,
            locks: Mutex::new(HashMap::new()),
            cancels: Mutex::new(HashMap::new()),
            deaths: Mutex::new(Default::default()),
            slot_lock: tokio::sync::Mutex::new(()),
            pool_refill: tokio::sync::Notify::new(),
            egress_lock: tokio::sync::Mutex::new(()),
            previews: Default::default(),
            shutdown: CancellationToken::new(),
        })
    }

    /// The lifecycle lock of one sandbox.
    pub fn lock_of(&self, id: &str) -> Arc<RwLock<()>> {
        let mut map = self.locks.lock().expect("lock map poisoned");
        map.entry(id.to_string()).or_default().clone()
    }

    pub fn forget_lock(&self, id: &str) {
        self.locks.lock().expect("lock map poisoned").remove(id);
        self.cancels.lock().expect("cancel map poisoned").remove(id);
    }

    /// Cancelled when the sandbox is being destroyed; agent operations select on it.
    pub fn cancel_of(&self, id: &str) -> CancellationToken {
        let mut map = self.cancels.lock().expect("cancel map poisoned");
        map.entry(id.to_string()).or_default().clone()
    }

    /// Record that sandbox `id` died and end the operations in flight on it. False if it
    /// was recorded already.
    pub fn note_death(&self, id: &str) -> bool {
        if !self
            .deaths
            .lock()
            .expect("death set poisoned")
            .insert(id.to_string())
        {
            return false;
        }
        self.cancel_of(id).cancel();
        true
    }

    /// Whether the liveness watch found `id` dead and has not settled it yet.
    pub fn died(&self, id: &str) -> bool {
        self.deaths.lock().expect("death set poisoned").contains(id)
    }

    /// After a death is settled: forget it, and give the sandbox a fresh cancellation token
    /// (a woken sandbox's operations must not start cancelled).
    pub fn forget_death(&self, id: &str) {
        if self.deaths.lock().expect("death set poisoned").remove(id) {
            self.cancels.lock().expect("cancel map poisoned").remove(id);
        }
    }

    /// `DiskFull` when the data filesystem has less than `min_free_disk` free (for what
    /// makes new files: creates, forks, snapshots, builds).
    pub fn ensure_free_disk(&self) -> Result<(), ControlError> {
        if self.cfg.min_free_disk == 0 {
            return Ok(());
        }
        let free = match rustix::fs::statvfs(&self.cfg.data_dir) {
            Ok(st) => st.f_bavail.saturating_mul(st.f_frsize),
            Err(e) => {
                tracing::warn!(error = %e, "statvfs of the data directory");
                return Ok(());
            }
        };
        if free >= self.cfg.min_free_disk {
            return Ok(());
        }
        tracing::warn!(
            free,
            reserve = self.cfg.min_free_disk,
            "the host's data filesystem is low on space"
        );
        Err(ControlError::DiskFull {
            message: format!(
                "the host has {} MiB free for sandboxes, below its reserve of {} MiB; destroy sandboxes or snapshots, or ask the operator to free space",
                free >> 20,
                self.cfg.min_free_disk >> 20
            ),
        })
    }

    pub fn state_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("sandboxes").join(id)
    }

    pub fn checkpoint_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("checkpoints").join(id)
    }

    /// Bring the store, the runtime, the network and the data directory into agreement after
    /// a crash or a host reboot. Afterwards every sandbox the store knows is running,
    /// suspended with its files (and memory image, if one was taken) or failed with a reason,
    /// and nothing exists that the store does not know.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), ControlError> {
        let rows = self
            .store
            .sandboxes
            .with_status(&[
                Status::Creating,
                Status::Running,
                Status::Suspended,
                Status::Pooled,
            ])
            .await?;
        let now = now_ms();
        let mut keep_runtime = HashSet::new();
        let mut keep_net = HashSet::new();
        let mut keep_dirs = HashSet::new();
        for row in rows {
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
                            Some(s) => crate::agent::AgentClient::new(
                                &row.id,
                                self.net.addrs(s).sandbox_ip,
                            )
                            .wait_ready(Duration::from_secs(3))
                            .await
                            .is_ok(),
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
                        let adopted = match lifecycle::stored_rules(&row) {
                            Ok(rules) => self.net.adopt(s, &rules).map_err(ControlError::from),
                            Err(_) => match lifecycle::rules_or_deny(self, &row).await {
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
                    }
                    keep_runtime.insert(row.runtime_id.clone());
                    keep_net.extend(slot);
                    keep_dirs.insert(row.id.clone());
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
                    keep_dirs.insert(row.id.clone());
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
                    keep_dirs.insert(row.id.clone());
                }
                Recovery::Nothing => {}
            }
        }
        // Orphans: anything under our names that the store does not account for.
        if let Err(e) = self
            .runtime
            .remove_orphans(&keep_runtime, &self.cfg.data_dir.join("sandboxes"))
            .await
        {
            tracing::error!(error = %DisplayChain(&e), "cleaning up orphaned sandboxes");
        }
        // Running sandboxes hold a namespace; suspended ones do not.
        for slot in self.net.list_slots().await? {
            if !keep_net.contains(&slot) {
                tracing::info!(slot, "removing orphaned network slot");
                self.net.detach(slot).await?;
            }
        }
        for dir in ["sandboxes", "checkpoints"] {
            remove_unknown_dirs(&self.cfg.data_dir.join(dir), &keep_dirs);
        }
        // Snapshot directories whose row is gone (a crash between the two) are garbage.
        let snapshots: HashSet<String> = self.store.snapshots.ids().await?.into_iter().collect();
        remove_unknown_dirs(&self.cfg.data_dir.join("snapshots"), &snapshots);
        Ok(())
    }

    /// Best-effort removal of everything a sandbox holds outside the store: runtime, files,
    /// memory image, network. Logs what fails; never panics.
    pub async fn teardown(&self, id: &str, runtime_id: &str, slot: Option<u32>) {
        if let Err(e) = self.runtime.destroy(runtime_id, &self.state_dir(id)).await {
            tracing::error!(sandbox = %id, error = %DisplayChain(&e), "destroying the runtime sandbox");
        }
        let ckpt = self.checkpoint_dir(id);
        if ckpt.exists()
            && let Err(e) = std::fs::remove_dir_all(&ckpt)
        {
            tracing::error!(sandbox = %id, error = %e, "removing the memory image");
        }
        if let Some(s) = slot
            && let Err(e) = self.net.detach(s).await
        {
            tracing::error!(sandbox = %id, error = %DisplayChain(&e), "removing the network slot");
        }
    }

    /// Start the reaper: destroys ephemeral sandboxes whose timeout passed and suspends
    /// persistent ones idle for longer than their idle timeout. Stops with `shutdown`.
    /// The liveness watch: finds running sandboxes whose runtime stopped (killed by a limit or
    /// from outside), ends the operations in flight on them and settles them in the
    /// background, so a death is noticed within `liveness_interval` rather than at the next
    /// call. Sandboxes in a transition (their write lock taken or asked for) are left alone.
    async fn watch_liveness(self: &Arc<Self>) {
        let rows = match self.store.sandboxes.running().await {
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
                node.forget_death(&id);
            });
        }
    }

    pub fn spawn_reaper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(node.cfg.reaper_interval);
            let mut last_watch = std::time::Instant::now();
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
                match node.store.sandboxes.expired(now).await {
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
                match node.store.sandboxes.idle(now).await {
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
