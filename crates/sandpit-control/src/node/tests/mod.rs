//! The node's orchestration over the recording fakes (`FakeRuntime`, `FakeNetwork`,
//! `FakeAgent`): create, suspend, wake, fork, destroy, the liveness settle and
//! reconciliation, with their failure paths. No root, no runsc, no HTTP: a temporary data
//! dir and a SQLite store; each test runs in milliseconds.

mod catalog;
mod lifecycle;
mod moves;
mod stored;
mod volumes;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sandpit_api_types::{CreateSandboxRequest, SandboxMode};
use sandpit_net::fake::FakeNetwork;
use sandpit_runtime::fake::FakeRuntime;

use crate::testing::{prepare_data_dir, runtime_with_agents};

use super::boot::Admitted;
use super::{Node, NodeConfig, Quotas, images};
use crate::ControlError;
use crate::store::{Sandbox, Store, WorkspaceRow};

/// What every test sandbox gets as `/etc/resolv.conf`.
const RESOLV_CONF: &str = "nameserver 192.0.2.53\n";

/// A node over fakes in a temporary data dir, with one tenant workspace.
pub(crate) struct Harness {
    /// Holds the data dir for the test's lifetime.
    _dir: tempfile::TempDir,
    pub rt: Arc<FakeRuntime>,
    pub net: Arc<FakeNetwork>,
    pub node: Arc<Node>,
    pub cfg: NodeConfig,
    pub workspace: String,
    agent_bin: PathBuf,
}

pub(crate) fn config(dir: &Path) -> NodeConfig {
    NodeConfig {
        node_id: "node-t".into(),
        data_dir: dir.join("data"),
        prefix: "t".into(),
        reaper_interval: Duration::from_secs(1),
        agent_ready_timeout: Duration::from_secs(2),
        default_timeout: Duration::from_secs(15 * 60),
        default_idle_timeout: Duration::from_secs(30 * 60),
        warm_pool: 0,
        boot_snapshots: false,
        min_free_disk: 0,
        liveness_interval: Duration::from_secs(2),
        disk_limit: None,
        quotas: Quotas::default(),
        events_retention: crate::node::DEFAULT_EVENTS_RETENTION,
    }
}

/// No room held in front of the store: what a caller without an early quota answer passes.
fn unreserved(lock: &tokio::sync::Mutex<()>) -> Admitted<'_> {
    Admitted {
        lock,
        hand_back: &|_| {},
    }
}

impl Harness {
    pub async fn new() -> Harness {
        Self::with(
            Arc::new(runtime_with_agents()),
            Arc::new(FakeNetwork::new(4)),
        )
        .await
    }

    pub async fn with(rt: Arc<FakeRuntime>, net: Arc<FakeNetwork>) -> Harness {
        Self::configured(rt, net, |_| {}).await
    }

    /// A node whose configuration `change` adjusts first (quotas, say).
    pub async fn configured(
        rt: Arc<FakeRuntime>,
        net: Arc<FakeNetwork>,
        change: impl FnOnce(&mut NodeConfig),
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let agent_bin = prepare_data_dir(dir.path());
        let mut cfg = config(dir.path());
        change(&mut cfg);
        let node = open(&cfg, &agent_bin, &rt, &net).await;
        let workspace = "ws_test".to_string();
        node.store
            .tenants
            .insert_org("org_test", "test", 0)
            .await
            .unwrap();
        node.store
            .tenants
            .insert_workspace(
                &WorkspaceRow {
                    id: workspace.clone(),
                    org_id: "org_test".into(),
                    name: "test".into(),
                },
                0,
            )
            .await
            .unwrap();
        Harness {
            _dir: dir,
            rt,
            net,
            node,
            cfg,
            workspace,
            agent_bin,
        }
    }

    /// A new node over the same data dir and the same backends (what survives a crash of
    /// the server: the runtime's sandboxes, the host's network, the files).
    pub async fn restart(&mut self) {
        self.node.shutdown.cancel();
        self.node = open(&self.cfg, &self.agent_bin, &self.rt, &self.net).await;
    }

    pub async fn create(&self, mode: SandboxMode) -> Result<Sandbox, ControlError> {
        self.create_from("base", mode).await
    }

    pub async fn create_from(
        &self,
        template: &str,
        mode: SandboxMode,
    ) -> Result<Sandbox, ControlError> {
        let req = CreateSandboxRequest {
            template: template.into(),
            mode,
            ..Default::default()
        };
        self.create_with(&req).await
    }

    /// Create from a whole request.
    pub async fn create_with(&self, req: &CreateSandboxRequest) -> Result<Sandbox, ControlError> {
        let (row, snapshot, volumes) =
            super::lifecycle::prepare_create(&self.node, &self.workspace, req).await?;
        let lock = tokio::sync::Mutex::new(());
        super::lifecycle::create(&self.node, row, snapshot, volumes, &unreserved(&lock)).await
    }

    pub async fn wake(&self, id: &str) -> Result<Sandbox, ControlError> {
        let lock = tokio::sync::Mutex::new(());
        super::lifecycle::wake(&self.node, id, &unreserved(&lock)).await
    }

    pub async fn fork(
        &self,
        id: &str,
        count: u32,
    ) -> Result<Vec<Result<Sandbox, ControlError>>, ControlError> {
        let lock = tokio::sync::Mutex::new(());
        super::fork::fork(&self.node, &self.workspace, id, count, &unreserved(&lock)).await
    }

    pub async fn row(&self, id: &str) -> Sandbox {
        self.node.store.sandboxes.get(id).await.unwrap().unwrap()
    }
}

/// Open a node the way `sandpit serve` does: store, agent layer, base template, then
/// reconcile.
async fn open(
    cfg: &NodeConfig,
    agent_bin: &Path,
    rt: &Arc<FakeRuntime>,
    net: &Arc<FakeNetwork>,
) -> Arc<Node> {
    super::make_data_dirs(&cfg.data_dir).unwrap();
    let store = Store::open_sqlite(&cfg.data_dir.join("sandpit.db"))
        .await
        .unwrap();
    let agent_layer = images::install_agent_layer(&cfg.data_dir, agent_bin).unwrap();
    let node = Node::new(
        cfg.clone(),
        store,
        rt.clone(),
        net.clone(),
        agent_layer,
        RESOLV_CONF.into(),
    );
    images::ensure_base(&node).await.unwrap();
    node.reconcile().await.unwrap();
    node
}
