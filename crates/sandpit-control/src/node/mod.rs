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

pub mod boot;
pub mod catalog;
pub mod drain;
pub mod fork;
pub mod images;
pub mod lifecycle;
pub mod moves;
pub mod pool;
mod reaper;
pub mod secrets;
pub mod stored;
pub mod templates;
mod uploads;
pub mod volumes;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sandpit_net::SandboxNetwork;
use sandpit_runtime::Runtime;
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

use crate::error::{ControlError, DisplayChain};
use crate::store::{Sandbox, Store};

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
        "volumes",
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
    /// This node's name in the fleet (`store::Nodes`): the owner recorded on its sandboxes.
    pub node_id: String,
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
    /// How long lifecycle events stay in the log (`GET /v1/events`).
    pub events_retention: Duration,
}

/// [`NodeConfig::events_retention`] unless configured: a week.
pub const DEFAULT_EVENTS_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Per-workspace limits on what a workspace runs and keeps (0: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quotas {
    /// Sandboxes running (or creating) at once.
    pub max_running: u32,
    /// Sandboxes that are or will be suspended (persistent or hibernated).
    pub max_suspended: u32,
    /// Named snapshots kept.
    pub max_snapshots: u32,
    /// Templates kept (deleted ones aside).
    pub max_templates: u32,
    /// Template builds under way at once.
    pub max_builds: u32,
    /// Volumes kept.
    pub max_volumes: u32,
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
    /// Set while the fleet has this node draining: it takes no new sandboxes.
    draining: std::sync::atomic::AtomicBool,
    /// Where suspended sandboxes' images go so other nodes can wake them (set once at
    /// start-up; none: they wake only here).
    images: std::sync::OnceLock<Arc<dyn crate::remote::ImageStore>>,
    /// Held while deciding who mounts a volume and recording it (the read-write check and
    /// the rows it decides on), and while deleting one. A volume's sandboxes all run on its
    /// home node, so one node's lock is enough.
    pub volume_lock: tokio::sync::Mutex<()>,
    /// Uploads under way, by sandbox (see [`moves`]). Guards only the map.
    uploads: Mutex<HashMap<String, uploads::Upload>>,
    /// This node's Prometheus metrics (and its HTTP edge's).
    pub metrics: crate::metrics::Metrics,
    /// Set once at start-up when the server has a secrets key ([`crate::secrets`]);
    /// unset, the secrets routes answer `secrets_disabled`.
    pub secrets: std::sync::OnceLock<Arc<crate::secrets::SecretsState>>,
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
            draining: Default::default(),
            images: Default::default(),
            volume_lock: tokio::sync::Mutex::new(()),
            uploads: Default::default(),
            metrics: Default::default(),
            secrets: Default::default(),
        })
    }

    /// Append a sandbox's lifecycle event to its workspace's log (`GET /v1/events`).
    /// Best-effort: a failed append is logged, never fails the operation it describes.
    pub async fn event(&self, sandbox_id: &str, kind: &str, detail: serde_json::Value) {
        if let Err(e) = self
            .store
            .events
            .append_for_sandbox(sandbox_id, kind, &detail, crate::util::now_ms())
            .await
        {
            tracing::warn!(sandbox = %sandbox_id, kind, error = %crate::DisplayChain(&e), "appending an event");
        }
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
    /// Whether this node runs `row`'s sandbox. Only the owner boots, stops, tears down,
    /// settles or talks to a sandbox: another node's slot numbers name other addresses (on
    /// another host, maybe one of this node's own sandboxes).
    pub fn is_mine(&self, row: &Sandbox) -> bool {
        row.node_id == self.cfg.node_id
    }

    /// 503 `sandbox_on_another_node` unless this node runs `row`'s sandbox.
    pub fn ensure_mine(&self, row: &Sandbox) -> Result<(), ControlError> {
        if self.is_mine(row) {
            return Ok(());
        }
        Err(ControlError::Unavailable {
            code: "sandbox_on_another_node",
            message: format!(
                "sandbox {} runs on node {:?}, which this server does not relay to (servers relay only with a shared --node-secret): send the request to that node's server",
                row.id, row.node_id
            ),
        })
    }

    /// Take new sandboxes (false) or not (true): what the fleet's drain status says.
    /// Whether this call started the drain (it was not draining before): the caller then
    /// moves the node's sandboxes away ([`drain::hibernate_all`]).
    pub fn set_draining(&self, draining: bool) -> bool {
        let was = self
            .draining
            .swap(draining, std::sync::atomic::Ordering::SeqCst);
        draining && !was
    }

    /// Whether the fleet has this node draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// 503 `node_draining` while the node is draining: creates and forks are refused (its
    /// own sandboxes keep running, suspend and wake). The flag follows the fleet's status at
    /// each heartbeat; when it says draining, the database is asked, so an undrain counts
    /// at once (placement, which reads the database, may already send new sandboxes here).
    pub async fn ensure_taking_new(&self) -> Result<(), ControlError> {
        if !self.is_draining() {
            return Ok(());
        }
        if let Ok(Some(n)) = self.store.nodes.get(&self.cfg.node_id).await
            && n.status == crate::store::NodeStatus::Live
        {
            self.set_draining(false);
            return Ok(());
        }
        Err(ControlError::Unavailable {
            code: "node_draining",
            message:
                "this node is draining and takes no new sandboxes (sandpit nodes undrain ends it)"
                    .into(),
        })
    }

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

    /// The directory of volume `id` (the runtime's: see `Runtime::create_volume`).
    pub fn volume_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("volumes").join(id)
    }

    pub fn checkpoint_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("checkpoints").join(id)
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
}
