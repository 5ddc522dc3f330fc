//! Lifecycle tests over the recording fakes (`FakeRuntime`, `FakeNetwork`, `FakeAgent`): no
//! root, no runsc, a temporary data dir; each runs in milliseconds.

mod architecture;
mod lifecycle;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sandpit_agent_proto::AGENT_PORT;
use sandpit_agent_proto::fake::FakeAgent;
use sandpit_api_types::{CreateSandboxRequest, SandboxMode};
use sandpit_net::fake::FakeNetwork;
use sandpit_runtime::fake::{FakeRuntime, InitGuard};

use crate::auth::Auth;
use crate::server::{Server, ServerConfig};
use crate::store::Sandbox;

pub(crate) const TOKEN: &str = "sp_test_token_for_the_fake_lifecycle";

/// A server over fakes in a temporary data dir.
pub(crate) struct Harness {
    /// Holds the data dir for the test's lifetime.
    _dir: tempfile::TempDir,
    pub rt: Arc<FakeRuntime>,
    pub net: Arc<FakeNetwork>,
    pub server: Arc<Server>,
    pub auth: Auth,
}

/// A runtime whose sandboxes run a [`FakeAgent`] on the address the network gave them, with
/// their `state_dir/upper` as their files.
pub(crate) fn runtime_with_agents() -> FakeRuntime {
    FakeRuntime::with_init(|spec| {
        let addr = spec
            .network
            .as_ref()
            .map(|n| SocketAddr::from((n.address, AGENT_PORT)));
        let root = spec.state_dir.join("upper");
        Box::pin(async move {
            let addr = addr.ok_or("the fake agent needs a network")?;
            let agent = FakeAgent::spawn(addr, root)
                .await
                .map_err(|e| format!("fake agent on {addr}: {e}"))?;
            Ok(Box::new(agent) as InitGuard)
        })
    })
}

/// What `Server::start` needs on disk without root: an agent binary it accepts (a static
/// ELF header is enough: it is never run) and a built `base` template (so busybox is not
/// needed).
fn prepare_data_dir(dir: &Path) -> std::path::PathBuf {
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    let agent = dir.join("fake-agent-bin");
    std::fs::write(&agent, elf).unwrap();
    let busybox = dir.join("data/templates/base/rootfs/bin");
    std::fs::create_dir_all(&busybox).unwrap();
    std::fs::write(busybox.join("busybox"), "").unwrap();
    agent
}

pub(crate) fn config(dir: &Path) -> ServerConfig {
    let agent = prepare_data_dir(dir);
    let mut cfg = ServerConfig::new(dir.join("data"), agent);
    cfg.prefix = "t".into();
    cfg.warm_pool = 0;
    cfg.disk_limit = None;
    cfg.min_free_disk = 0;
    cfg.agent_ready_timeout = Duration::from_secs(2);
    cfg
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
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let server = start(cfg, &rt, &net).await;
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            format!("Bearer {TOKEN}").parse().unwrap(),
        );
        let auth = crate::auth::resolve(&server, &headers).await.unwrap();
        Harness {
            _dir: dir,
            rt,
            net,
            server,
            auth,
        }
    }

    /// A new server process over the same data dir and the same backends (what survives a
    /// crash of the server: the runtime's sandboxes, the host's network, the files).
    pub async fn restart(&mut self) {
        self.server.shutdown.cancel();
        let cfg = self.server.cfg.clone();
        self.server = start(cfg, &self.rt, &self.net).await;
    }

    pub async fn create(&self, mode: SandboxMode) -> Result<Sandbox, crate::error::ApiError> {
        let req = CreateSandboxRequest {
            template: "base".into(),
            mode,
            ..Default::default()
        };
        crate::lifecycle::create(&self.server, &self.auth.workspace_id, &req).await
    }

    pub async fn row(&self, id: &str) -> Sandbox {
        self.server.store.sandboxes.get(id).await.unwrap().unwrap()
    }

    pub fn authorized(&self, row: Sandbox) -> crate::extract::Authorized {
        crate::extract::Authorized::made_for(&self.auth, row).unwrap()
    }
}

async fn start(cfg: ServerConfig, rt: &Arc<FakeRuntime>, net: &Arc<FakeNetwork>) -> Arc<Server> {
    let (server, _) = Server::start(cfg, rt.clone(), net.clone(), Some(TOKEN))
        .await
        .unwrap();
    server
}
