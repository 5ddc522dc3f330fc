//! The edge over the recording fakes (`FakeRuntime`, `FakeNetwork`, `FakeAgent`): a whole
//! `Server` (no root, no runsc, a temporary data dir), for what the edge adds in front of
//! the control layer (rates and early quota answers). The orchestration itself is tested in
//! `sandpit_control::node`.

mod architecture;
mod edge;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sandpit_api_types::{CreateSandboxRequest, SandboxMode};
use sandpit_control::testing::{prepare_data_dir, runtime_with_agents};
use sandpit_net::fake::FakeNetwork;
use sandpit_runtime::fake::FakeRuntime;

use crate::auth::Auth;
use crate::server::{Server, ServerConfig};
use crate::store::Sandbox;

pub(crate) const TOKEN: &str = "sp_test_token_for_the_fake_lifecycle";

/// A server over fakes in a temporary data dir.
pub(crate) struct Harness {
    /// Holds the data dir for the test's lifetime.
    _dir: tempfile::TempDir,
    pub rt: Arc<FakeRuntime>,
    pub server: Arc<Server>,
    pub auth: Auth,
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
    /// A server over fakes whose configuration `tune` adjusts.
    pub async fn new(tune: impl FnOnce(&mut ServerConfig)) -> Harness {
        let rt = Arc::new(runtime_with_agents());
        let net = Arc::new(FakeNetwork::new(4));
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        tune(&mut cfg);
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
            server,
            auth,
        }
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

    /// The app on a loopback port: its address and the serving task.
    pub async fn serve(
        &self,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = crate::routes::app(self.server.clone());
        let serving = tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .await
        });
        (addr, serving)
    }
}

async fn start(cfg: ServerConfig, rt: &Arc<FakeRuntime>, net: &Arc<FakeNetwork>) -> Arc<Server> {
    let (server, _) = Server::start(cfg, rt.clone(), net.clone(), Some(TOKEN))
        .await
        .unwrap();
    server
}
