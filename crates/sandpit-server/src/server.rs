//! The server's configuration and start-up: it opens the store, builds the control layer's
//! [`Node`] over the backends the caller made, bootstraps on first start and reconciles
//! what a crash left. [`Server`] adds what only the HTTP edge needs (rate limits, the
//! template build logs) and derefs to its node.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sandpit_control::node::{NodeConfig, Quotas, images};
use sandpit_control::{ControlError, Node};
use sandpit_net::SandboxNetwork;
use sandpit_runtime::Runtime;

use crate::store::Store;

/// Everything `sandpit serve` can be told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// The database: `sqlite://<path>` or `postgres://…`; `None`: the SQLite file
    /// `<data_dir>/sandpit.db`.
    pub database: Option<String>,
    /// Starts the runtime ids of this server's sandboxes (`<prefix>-<sandbox id>`), so
    /// several servers coexist on one host. 1–6 characters `[a-z0-9]`; the network and the
    /// runtime the caller builds carry the same prefix in their own names.
    pub prefix: String,
    /// This server's node name in the fleet (`sandpit serve --node-name`): the owner of the
    /// sandboxes it runs.
    pub node_id: String,
    /// The fleet's shared secret: with it, requests about another node's sandbox are
    /// relayed to that node (signed with it); without it, they answer 503.
    pub node_secret: Option<String>,
    /// An API replica (`sandpit serve --api-only`): it runs no sandboxes (its backends are
    /// [`crate::replica`]'s) and relays every request that needs a node to one. Needs a
    /// node secret.
    pub api_only: bool,
    /// The static `sandpit-agent` binary to inject into every sandbox.
    pub agent_bin: PathBuf,
    /// Largest upload, in bytes (seed 003: 100 MB).
    pub upload_limit: u64,
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
    /// Previews are served at `<sandbox id>-<port>.<preview_domain>` (see [`crate::preview`]).
    pub preview_domain: String,
    /// A preview request to a suspended sandbox wakes it; otherwise it gets 503.
    pub preview_wake: bool,
    /// The listener serves HTTPS (`sandpit serve --tls-cert`): preview cookies are `Secure`.
    pub tls: bool,
    /// An upload whose body sends nothing for this long is aborted (and nothing is written).
    pub body_idle_timeout: Duration,
    /// Rate limits and quotas per workspace (see [`crate::limits`]).
    pub limits: crate::limits::LimitsConfig,
    /// Registries (`host:port`) template builds reach over plain HTTP; loopback ones always.
    pub insecure_registries: Vec<String>,
    /// Registries pulls may reach on loopback, private or host addresses (otherwise refused,
    /// see `sandpit_net::dial`).
    pub allowed_registries: Vec<sandpit_net::Endpoint>,
    /// Free space the host's data filesystem keeps: below it, creates, forks, snapshots and
    /// template builds answer 507 `host_disk_full` (wakes and hibernates still run). Sandbox
    /// disks are sparse, so their limits can add up to more than the host has. 0: no check.
    pub min_free_disk: u64,
    /// How often the reaper looks for running sandboxes that died (see
    /// `Node::watch_liveness`).
    pub liveness_interval: Duration,
    /// Disk of a `small` sandbox (`medium` gets twice, `large` four times): the files it
    /// writes live on an ext4 image of that size. `None`: no bound but the host's free space.
    pub disk_limit: Option<u64>,
    /// How long lifecycle events stay in the log (`GET /v1/events`).
    pub events_retention: Duration,
    /// Webhook endpoints (`host[:port]`) deliveries may reach on loopback, private or host
    /// addresses (otherwise refused, see `sandpit_net::dial`; never the pool or link-local).
    pub webhook_allow_hosts: Vec<sandpit_net::Endpoint>,
    /// The delay before a failed delivery's first retry; it doubles with each attempt, up to
    /// an hour (see [`crate::webhooks`]).
    pub webhook_retry_base: Duration,
    /// The master key of workspace secrets; `None`: the secrets routes answer
    /// `secrets_disabled` (see `sandpit_control::secrets`).
    pub secrets_key: Option<sandpit_control::secrets::MasterKey>,
    /// PEM files of CAs the secrets proxy trusts upstream besides the host's roots.
    pub secrets_extra_ca: Vec<PathBuf>,
}

impl ServerConfig {
    /// Defaults for a data directory.
    pub fn new(data_dir: PathBuf, agent_bin: PathBuf) -> Self {
        ServerConfig {
            data_dir,
            database: None,
            prefix: "sp".into(),
            node_id: "local".into(),
            node_secret: None,
            api_only: false,
            agent_bin,
            upload_limit: 100 * 1024 * 1024,
            reaper_interval: Duration::from_secs(1),
            agent_ready_timeout: Duration::from_secs(20),
            default_timeout: Duration::from_secs(15 * 60),
            default_idle_timeout: Duration::from_secs(30 * 60),
            warm_pool: 2,
            boot_snapshots: false,
            preview_domain: "localhost".into(),
            preview_wake: true,
            tls: false,
            body_idle_timeout: Duration::from_secs(30),
            limits: Default::default(),
            insecure_registries: Vec::new(),
            allowed_registries: Vec::new(),
            disk_limit: Some(10 << 30),
            liveness_interval: Duration::from_secs(2),
            events_retention: sandpit_control::node::DEFAULT_EVENTS_RETENTION,
            webhook_allow_hosts: Vec::new(),
            webhook_retry_base: crate::webhooks::DEFAULT_RETRY_BASE,
            min_free_disk: 2 << 30,
            secrets_key: None,
            secrets_extra_ca: Vec::new(),
        }
    }
}

/// The running server: the control layer's node plus the HTTP edge's own state. Shared as
/// `Arc<Server>` by routes and background tasks; derefs to its [`Node`] (store, backends,
/// locks).
pub struct Server {
    pub cfg: ServerConfig,
    pub node: Arc<Node>,
    /// Per-workspace rate limiters and the early answers of the quotas.
    pub limits: crate::limits::Limits,
    /// Image layers and the build cache (`<data dir>/images`).
    pub images: sandpit_image::LayerStore,
    /// Running template builds' event logs.
    pub builds: crate::builds::Builds,
    /// What the E2B envd layer knows of the processes it started (the agent holds them).
    pub e2b_processes: crate::e2b::envd::Processes,
    /// Open `GET /v1/events` streams per workspace.
    pub event_streams: crate::routes::events::EventStreams,
}

impl std::ops::Deref for Server {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

impl ServerConfig {
    /// What the control layer's node is told.
    pub fn node_config(&self) -> NodeConfig {
        NodeConfig {
            data_dir: self.data_dir.clone(),
            node_id: self.node_id.clone(),
            prefix: self.prefix.clone(),
            reaper_interval: self.reaper_interval,
            agent_ready_timeout: self.agent_ready_timeout,
            default_timeout: self.default_timeout,
            default_idle_timeout: self.default_idle_timeout,
            warm_pool: self.warm_pool,
            boot_snapshots: self.boot_snapshots,
            min_free_disk: self.min_free_disk,
            liveness_interval: self.liveness_interval,
            disk_limit: self.disk_limit,
            quotas: Quotas {
                max_running: self.limits.max_running,
                max_suspended: self.limits.max_suspended,
                max_snapshots: self.limits.max_snapshots,
                max_templates: self.limits.max_templates,
                max_builds: self.limits.max_builds,
                max_volumes: self.limits.max_volumes,
            },
            events_retention: self.events_retention,
        }
    }
}

impl Server {
    /// Open everything, bootstrap on first start, reconcile what a crash may have left.
    /// Returns the server and, on first start without a preset, the generated admin token.
    ///
    /// The caller builds the backends: the `runtime` (`sandpit serve`: gVisor, its state under
    /// `<data dir>/runsc`; tests: `FakeRuntime`) and the `net`work (`Network`; tests:
    /// `FakeNetwork`), whose nameservers go into every sandbox's `/etc/resolv.conf`. The
    /// server only calls their traits.
    pub async fn start(
        cfg: ServerConfig,
        runtime: Arc<dyn Runtime>,
        net: Arc<dyn SandboxNetwork>,
        bootstrap_token: Option<&str>,
    ) -> Result<(Arc<Server>, Option<String>), ControlError> {
        sandpit_control::node::make_data_dirs(&cfg.data_dir)?;
        let store = match &cfg.database {
            Some(url) => Store::connect(url).await?,
            None => Store::open_sqlite(&cfg.data_dir.join("sandpit.db")).await?,
        };
        let nameservers = net.config().nameservers.clone();
        net.init().await?;
        // An API replica starts no sandbox: no agent to inject, no base template to build.
        let agent_layer = if cfg.api_only {
            cfg.data_dir.join("agent")
        } else {
            images::install_agent_layer(&cfg.data_dir, &cfg.agent_bin)?
        };
        if nameservers.is_empty() && !cfg.api_only {
            tracing::warn!(
                "the host has no nameserver a sandbox can reach (only loopback ones?): sandboxes get no DNS; set --dns"
            );
        } else {
            tracing::info!(?nameservers, "sandbox nameservers");
        }
        let resolv_conf = crate::dns::resolv_conf(&nameservers);
        let images = sandpit_image::LayerStore::open(cfg.data_dir.join("images"))
            .map_err(|e| ControlError::Internal(format!("opening the layer store: {e}")))?;
        images.clean_temp();
        store
            .templates
            .fail_interrupted_builds(
                &cfg.node_id,
                "the server stopped during the build",
                crate::util::now_ms(),
            )
            .await?;
        let node = Node::new(
            cfg.node_config(),
            store,
            runtime,
            net,
            agent_layer,
            resolv_conf,
        );
        if let Some(key) = &cfg.secrets_key {
            let upstream = sandpit_control::secrets::upstream_config(&cfg.secrets_extra_ca)?;
            let state = sandpit_control::secrets::SecretsState::new(
                sandpit_control::secrets::SecretsConfig {
                    key: key.clone(),
                    upstream,
                },
            );
            let _ = node.secrets.set(Arc::new(state));
        }
        let server = Arc::new(Server {
            limits: crate::limits::Limits::new(cfg.limits),
            cfg,
            node,
            images,
            builds: Default::default(),
            e2b_processes: Default::default(),
            event_streams: Default::default(),
        });
        if !server.cfg.api_only {
            images::ensure_base(&server.node).await?;
            crate::builds::register_toolchain(&server).await?;
        }
        let token = crate::auth::bootstrap(&server, bootstrap_token).await?;
        server.node.reconcile().await?;
        // Requests that held an idempotency key died with the last process: a retry runs.
        server
            .store
            .idempotency
            .clear_pending(&server.node.cfg.node_id)
            .await?;
        // Webhook attempts this node had under way died too: due again now.
        server
            .store
            .webhooks
            .release_leases(&server.node.cfg.node_id)
            .await?;
        Ok((server, token))
    }

    /// Start the node's reaper (timeouts, idle suspends, the liveness watch) and the edge's
    /// own housekeeping (forgetting refilled rate-limit state and the E2B processes of gone
    /// sandboxes; hourly garbage collection of unreferenced layers, [`crate::gc`]) and the
    /// webhook deliveries ([`crate::webhooks`]). All stop with `shutdown`.
    pub fn spawn_reaper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let reaper = self.node.spawn_reaper();
        let gc = crate::gc::spawn(self);
        let webhooks = crate::webhooks::spawn(self);
        let server = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = server.shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        server.limits.prune();
                        server.e2b_processes.prune(&server.store).await;
                    }
                }
            }
            let _ = reaper.await;
            let _ = gc.await;
            let _ = webhooks.await;
        })
    }
}
