//! A node's membership in the fleet: it registers ([`Membership::join`]), renews its lease
//! by heartbeat with its load ([`Membership::beat`]), learns from the answer whether an
//! operator set it draining, and, at each beat, declares lost any node whose lease lapsed
//! ([`sweep`]; one statement, so each loss is declared once however many nodes sweep).
//!
//! A heartbeat that comes back [`Heartbeat::Fenced`] means the fleet no longer trusts this
//! registration (the lease lapsed and the node was declared lost, or another process
//! registered under the same name). The member registers again under a new epoch and says
//! so in the log. (Once sandboxes are owned by nodes, a fenced node must first give up what
//! the fleet settled while it was away; today every sandbox is the local node's.)

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::{ControlError, DisplayChain};
use crate::node::Node;
use crate::store::{Heartbeat, NodeInfo, NodeLoad, NodeStatus, Store};

/// Shortest lease a member takes: below it, a busy database would fence healthy nodes.
pub const MIN_LEASE: Duration = Duration::from_secs(3);

/// This process's registration as one node of the fleet.
pub struct Membership {
    store: Store,
    info: NodeInfo,
    lease: Duration,
    epoch: AtomicI64,
    status: Mutex<NodeStatus>,
}

fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
}

impl Membership {
    /// Register `info` for a lease of `lease` (at least [`MIN_LEASE`]), measured by the
    /// database's clock.
    pub async fn join(
        store: Store,
        info: NodeInfo,
        lease: Duration,
    ) -> Result<Arc<Membership>, ControlError> {
        let lease = lease.max(MIN_LEASE);
        let now = store.nodes.now().await?;
        let epoch = store.nodes.register(&info, now, lease_ms(lease)).await?;
        let status = store
            .nodes
            .get(&info.id)
            .await?
            .map_or(NodeStatus::Live, |n| n.status);
        tracing::info!(node = %info.id, epoch, status = status.as_str(), "joined the fleet");
        Ok(Arc::new(Membership {
            store,
            info,
            lease,
            epoch: AtomicI64::new(epoch),
            status: Mutex::new(status),
        }))
    }

    pub fn id(&self) -> &str {
        &self.info.id
    }

    /// The current registration's epoch.
    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// What the last answered heartbeat said: live, or draining (take no new sandboxes).
    pub fn status(&self) -> NodeStatus {
        *self.status.lock().expect("status poisoned")
    }

    /// How often [`Membership::spawn`] beats: a third of the lease, so two beats may fail
    /// before the lease lapses.
    pub fn interval(&self) -> Duration {
        self.lease / 3
    }

    /// One heartbeat with `load`. Fenced: registers again (a new epoch) and returns
    /// `Fenced`, so the caller knows the fleet saw this node as gone.
    pub async fn beat(&self, load: &NodeLoad) -> Result<Heartbeat, ControlError> {
        let now = self.store.nodes.now().await?;
        let answer = self
            .store
            .nodes
            .heartbeat(&self.info.id, self.epoch(), load, now, lease_ms(self.lease))
            .await?;
        match answer {
            Heartbeat::Renewed(status) => {
                *self.status.lock().expect("status poisoned") = status;
            }
            Heartbeat::Fenced => {
                let epoch = self
                    .store
                    .nodes
                    .register(&self.info, now, lease_ms(self.lease))
                    .await?;
                tracing::warn!(
                    node = %self.info.id,
                    old_epoch = self.epoch(),
                    epoch,
                    "the fleet no longer trusted this node's lease (declared lost, or registered again elsewhere); registered anew"
                );
                self.epoch.store(epoch, Ordering::SeqCst);
            }
        }
        Ok(answer)
    }

    /// Beat every [`Membership::interval`] with the load `load` measures, telling
    /// `on_status` the status each answered beat gives (the node stops taking new
    /// sandboxes while draining) and calling `on_fenced` when a beat found this node
    /// fenced (the fleet may have settled its sandboxes meanwhile: `Node::drop_settled`),
    /// and sweeping lost nodes after each beat, until `stop`.
    /// Store errors are logged and retried at the next beat (the lease covers two missed
    /// ones).
    pub fn spawn<F, Fut>(
        self: &Arc<Self>,
        load: F,
        on_status: impl Fn(NodeStatus) + Send + 'static,
        on_fenced: impl Fn() + Send + 'static,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = NodeLoad> + Send,
    {
        let me = self.clone();
        on_status(me.status());
        tokio::spawn(async move {
            let mut told = me.status();
            let mut tick = tokio::time::interval(me.interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let l = load().await;
                match me.beat(&l).await {
                    Ok(Heartbeat::Fenced) => on_fenced(),
                    Ok(Heartbeat::Renewed(_)) => {}
                    Err(e) => {
                        tracing::error!(node = %me.info.id, error = %DisplayChain(&e), "heartbeat failed");
                        continue;
                    }
                }
                let status = me.status();
                on_status(status);
                if status != told {
                    // Logged after `on_status` acted on it.
                    tracing::info!(node = %me.info.id, status = status.as_str(), "fleet status changed");
                    told = status;
                }
                match sweep(&me.store).await {
                    Ok(lost) if !lost.is_empty() => {
                        tracing::warn!(nodes = ?lost, "declared nodes lost: their leases lapsed");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %DisplayChain(&e), "sweeping lost nodes failed");
                    }
                }
            }
        })
    }
}

/// Why a lost node's running sandboxes failed.
pub const NODE_LOST: &str = "its node stopped renewing its lease and was declared lost: \
     the sandbox's processes and memory are gone with it";

/// Why a lost node's running sandbox is suspended (it had a hibernation image in object
/// storage: it wakes on another node from it).
pub const NODE_LOST_RESTORABLE: &str = "its node stopped renewing its lease and was declared lost: \
     the sandbox wakes on another node from its last hibernation image; what it did after that \
     hibernation is lost";

/// Why a lost node's template build failed.
pub const BUILD_NODE_LOST: &str =
    "the node running the build stopped renewing its lease and was declared lost; build again";

/// Declare lost every node whose lease lapsed by the database's clock, and settle the
/// sandboxes of every lost node (running persistent ones whose last hibernation image is
/// stored remotely are suspended for any node to restore from it, [`NODE_LOST_RESTORABLE`];
/// other running ones fail with [`NODE_LOST`], pooled ones go; suspended ones keep their
/// files on the lost node), its template builds (failed) and its
/// pending idempotent requests (released, so a retry runs). Idempotent: a sweeper that died
/// between the two steps is made up for by the next. The nodes this call declared.
pub async fn sweep(store: &Store) -> Result<Vec<String>, ControlError> {
    let now = store.nodes.now().await?;
    let lost = store.nodes.expire(now).await?;
    let restorable = store
        .sandboxes
        .restore_from_images_on_lost_nodes(NODE_LOST_RESTORABLE, now)
        .await?;
    if !restorable.is_empty() {
        tracing::warn!(sandboxes = ?restorable, "the running sandboxes of lost nodes wake elsewhere from their last hibernation image");
    }
    let settled = store.sandboxes.settle_on_lost_nodes(NODE_LOST, now).await?;
    if !settled.is_empty() {
        tracing::warn!(sandboxes = ?settled, "settled the sandboxes of lost nodes");
    }
    let builds = store
        .templates
        .fail_builds_on_lost_nodes(BUILD_NODE_LOST, now)
        .await?;
    if builds > 0 {
        tracing::warn!(builds, "failed the template builds of lost nodes");
    }
    store.idempotency.release_on_lost_nodes().await?;
    Ok(lost)
}

/// The fleet as placement sees it now: every node whose lease holds (by the database's
/// clock), its free slots counted from the store (fresh: a create a moment ago counts,
/// which a heartbeat would say only later), its memory from its last heartbeat, draining
/// ones marked so. Locality sets are empty until templates and images are fleet-wide.
pub async fn placement_view(
    store: &Store,
) -> Result<Vec<crate::placement::NodeLoad>, ControlError> {
    let now = store.nodes.now().await?;
    let used: std::collections::HashMap<String, i64> =
        store.sandboxes.slots_by_node().await?.into_iter().collect();
    Ok(store
        .nodes
        .alive(now)
        .await?
        .into_iter()
        .map(|n| {
            let held = used.get(&n.info.id).copied().unwrap_or(0);
            let to_u32 = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
            crate::placement::NodeLoad {
                free_memory_mib: n.load.free_memory_mib.max(0) as u64,
                total_memory_mib: n.info.memory_mib.max(0) as u64,
                free_slots: to_u32(n.info.slots - held),
                total_slots: to_u32(n.info.slots),
                draining: n.status == NodeStatus::Draining,
                runsc_build: n.info.runsc_build,
                id: n.info.id,
                templates: n.load.templates.into_iter().collect(),
                images: n.load.images.into_iter().collect(),
            }
        })
        .collect())
}

/// Where a new sandbox should run: a node chosen best-of-3 over [`placement_view`], or
/// `None` when no node can take one (the caller creates locally, and its own admission
/// gives the precise answer: draining, no slot).
pub async fn place_new(store: &Store) -> Result<Option<String>, ControlError> {
    let view = placement_view(store).await?;
    let want = crate::placement::Want::default();
    Ok(
        crate::placement::choose(&view, &want, crate::placement::DEFAULT_K, &mut rand::rng())
            .ok()
            .map(|p| p.node_id),
    )
}

/// Where a sandbox that needs local files should run: a node chosen best-of-3 among those
/// holding every layer in `layers` (layer ids, content-addressed, so equal on every node)
/// and the snapshot `image`, if one is named. When none of those can take it, any live node
/// that can get what it lacks from object storage (every missing layer and the snapshot
/// stored there, and the layers of the snapshot's template), still preferring nodes that
/// hold some of it (locality); the node that gets it fetches before it boots
/// (`node::stored`). `None` when no live node holds them or can fetch them.
pub async fn place_holding(
    store: &Store,
    layers: &[String],
    image: Option<&str>,
) -> Result<Option<String>, ControlError> {
    let view = placement_view(store).await?;
    let holds = |n: &crate::placement::NodeLoad| {
        layers.iter().all(|l| n.templates.contains(l)) && image.is_none_or(|i| n.images.contains(i))
    };
    let holders: Vec<_> = view.iter().filter(|n| holds(n)).cloned().collect();
    let want = crate::placement::Want::default();
    // (The random generator is made at each use: it may not be held across an await.)
    if let Ok(p) = crate::placement::choose(
        &holders,
        &want,
        crate::placement::DEFAULT_K,
        &mut rand::rng(),
    ) {
        return Ok(Some(p.node_id));
    }
    // What a node lacking some of it would fetch: is it all in object storage?
    let mut needed: Vec<String> = layers.to_vec();
    let mut image_stored = false;
    if let Some(id) = image {
        let Some(snap) = store.snapshots.by_id(id).await? else {
            return Ok(None);
        };
        image_stored = crate::node::stored::stored_snapshot(&snap).is_some();
        if let Some(t) = store.templates.by_id(&snap.template_id).await? {
            needed.extend(crate::node::images::layer_ids(&t)?);
        }
    }
    let stored: std::collections::HashSet<String> =
        store.layers.stored(&needed).await?.into_iter().collect();
    let eligible: Vec<_> = view
        .into_iter()
        .filter(|n| {
            needed
                .iter()
                .all(|l| n.templates.contains(l) || stored.contains(l))
                && image.is_none_or(|i| n.images.contains(i) || image_stored)
        })
        .collect();
    let want = crate::placement::Want {
        template_id: needed.last().map(String::as_str),
        image_id: image,
        ..Default::default()
    };
    Ok(crate::placement::choose(
        &eligible,
        &want,
        crate::placement::DEFAULT_K,
        &mut rand::rng(),
    )
    .ok()
    .map(|p| p.node_id))
}

/// Most entries of each locality list a heartbeat reports.
const MAX_LOCALITY: usize = 10_000;

/// Names of the entries of a node-owned directory (at most [`MAX_LOCALITY`]).
fn dir_names(dir: &std::path::Path) -> Vec<String> {
    #[expect(
        clippy::disallowed_methods,
        reason = "the node's own layer and snapshot directories"
    )]
    let entries = std::fs::read_dir(dir);
    entries
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| !n.starts_with('.'))
                .take(MAX_LOCALITY)
                .collect()
        })
        .unwrap_or_default()
}

/// What this host has free for sandboxes: network slots no sandbox holds, and the host's
/// available memory (`MemAvailable`); and what it holds on its own disk for placement's
/// locality: its template layers (content-addressed ids, in `templates`) and its named
/// snapshots (in `images`). Hibernation images are not listed: a hibernated sandbox wakes
/// on its own node, or moves through object storage.
pub async fn local_load(node: &Node) -> Result<NodeLoad, ControlError> {
    let used = node
        .store
        .sandboxes
        .used_slots(&node.cfg.node_id)
        .await?
        .len() as i64;
    let capacity = i64::from(node.net.capacity());
    Ok(NodeLoad {
        free_memory_mib: available_memory_mib().unwrap_or(0),
        free_slots: (capacity - used).max(0),
        templates: dir_names(&node.cfg.data_dir.join("images").join("layers")),
        images: dir_names(&node.cfg.data_dir.join("snapshots")),
    })
}

/// `MemAvailable` from `/proc/meminfo`, MiB.
pub fn available_memory_mib() -> Option<i64> {
    #[expect(
        clippy::disallowed_methods,
        reason = "/proc/meminfo is the kernel's, not a tenant's"
    )]
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

/// Total memory (`MemTotal`), MiB.
pub fn total_memory_mib() -> Option<i64> {
    #[expect(
        clippy::disallowed_methods,
        reason = "/proc/meminfo is the kernel's, not a tenant's"
    )]
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_field(&text, "MemTotal:")
}

fn parse_mem_available(text: &str) -> Option<i64> {
    meminfo_field(text, "MemAvailable:")
}

fn meminfo_field(text: &str, key: &str) -> Option<i64> {
    let kib: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            address: "http://127.0.0.1:7879".into(),
            runsc_build: "test".into(),
            memory_mib: 1024,
            slots: 8,
        }
    }

    #[test]
    fn meminfo_is_read_in_mib_and_garbage_is_none() {
        let text = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20480000 kB\n";
        assert_eq!(parse_mem_available(text), Some(20_000));
        assert_eq!(meminfo_field(text, "MemTotal:"), Some(24_000));
        assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
        assert_eq!(parse_mem_available(""), None);
        assert!(available_memory_mib().is_some_and(|m| m > 0));
    }

    /// A member that the fleet declared lost finds out at its next beat and joins again
    /// under a new epoch; a drain set by an operator reaches it through the beat.
    #[tokio::test]
    async fn a_lost_member_is_fenced_then_registers_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("t.db")).await.unwrap();
        let me = Membership::join(store.clone(), info("n1"), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!((me.epoch(), me.status()), (1, NodeStatus::Live));
        assert_eq!(me.interval(), Duration::from_secs(10));
        let load = NodeLoad {
            free_memory_mib: 100,
            free_slots: 3,
            ..Default::default()
        };
        assert_eq!(
            me.beat(&load).await.unwrap(),
            Heartbeat::Renewed(NodeStatus::Live)
        );
        assert!(sweep(&store).await.unwrap().is_empty(), "its lease holds");

        // Another replica, long after the lease, declares it lost.
        let later = store.nodes.now().await.unwrap() + 31_000;
        assert_eq!(store.nodes.expire(later).await.unwrap(), vec!["n1"]);
        assert_eq!(me.beat(&load).await.unwrap(), Heartbeat::Fenced);
        assert_eq!(me.epoch(), 2);
        assert_eq!(
            me.beat(&load).await.unwrap(),
            Heartbeat::Renewed(NodeStatus::Live)
        );
        let row = store.nodes.get("n1").await.unwrap().unwrap();
        assert_eq!(
            (row.status, row.epoch, row.load.free_slots),
            (NodeStatus::Live, 2, 3)
        );

        assert!(store.nodes.set_draining("n1", true).await.unwrap());
        me.beat(&load).await.unwrap();
        assert_eq!(me.status(), NodeStatus::Draining);
        // A lease shorter than the floor is raised to it.
        let short = Membership::join(store, info("n2"), Duration::from_millis(10))
            .await
            .unwrap();
        assert_eq!(short.interval(), MIN_LEASE / 3);
    }

    /// A node declared lost takes its template builds (failed) and its pending idempotent
    /// requests (released) with it; a live node's stay.
    #[tokio::test]
    async fn a_lost_node_fails_its_builds_and_releases_its_keys_only() {
        use crate::store::{TemplateRow, TemplateStatus};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("t.db")).await.unwrap();
        let _n1 = Membership::join(store.clone(), info("n1"), Duration::from_secs(30))
            .await
            .unwrap();
        let _n2 = Membership::join(store.clone(), info("n2"), Duration::from_secs(3600))
            .await
            .unwrap();
        store.tenants.insert_org("org_ws", "o", 1).await.unwrap();
        let ws = crate::store::WorkspaceRow {
            id: "ws".into(),
            org_id: "org_ws".into(),
            name: "w".into(),
        };
        store.tenants.insert_workspace(&ws, 1).await.unwrap();
        let building = |id: &str| TemplateRow {
            workspace_id: Some("ws".into()),
            status: TemplateStatus::Building,
            source: "dockerfile".into(),
            ..TemplateRow::builtin(id, id, "t", "/rootfs".into(), 5)
        };
        for (id, node) in [("t1", "n1"), ("t2", "n2")] {
            store
                .templates
                .insert(&building(id), 0, 0, node)
                .await
                .unwrap();
            assert!(
                store
                    .idempotency
                    .begin(node, "ws", id, "h", 1, i64::MAX)
                    .await
                    .unwrap()
                    .is_none()
            );
        }
        let later = store.nodes.now().await.unwrap() + 31_000;
        assert_eq!(store.nodes.expire(later).await.unwrap(), vec!["n1"]);
        sweep(&store).await.unwrap();
        let t1 = store.templates.by_id("t1").await.unwrap().unwrap();
        assert_eq!(
            (t1.status, t1.error.as_deref()),
            (TemplateStatus::Failed, Some(BUILD_NODE_LOST))
        );
        assert_eq!(
            store.templates.by_id("t2").await.unwrap().unwrap().status,
            TemplateStatus::Building
        );
        assert!(
            store
                .idempotency
                .begin("n2", "ws", "t1", "h", 2, i64::MAX)
                .await
                .unwrap()
                .is_none(),
            "n1's key was released: a retry runs"
        );
        assert!(
            store
                .idempotency
                .begin("n1", "ws", "t2", "h", 2, i64::MAX)
                .await
                .unwrap()
                .is_some(),
            "n2's request still runs"
        );
    }
}
