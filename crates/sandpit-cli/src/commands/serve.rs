//! `sandpit serve`: start the server, print the bootstrap token once, serve until signalled.
#![expect(
    clippy::disallowed_methods,
    reason = "the operator's agent binary candidates"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sandpit_server::{Server, ServerConfig};

/// The metrics listener's default address (9464: the OpenTelemetry Prometheus exporter's).
const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// Serve `GET /metrics` on `listen` (`off`: not at all) until the server shuts down.
async fn serve_metrics(server: &Arc<Server>, listen: &str) -> anyhow::Result<()> {
    if listen == "off" {
        return Ok(());
    }
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("--metrics-listen {listen:?} is not an address (or `off`)"))?;
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if listen == DEFAULT_METRICS_LISTEN => {
            tracing::warn!(error = %e, "metrics: {listen} is taken; serving no metrics (set --metrics-listen)");
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("binding --metrics-listen {listen}")),
    };
    tracing::info!(listen = %listener.local_addr()?, "metrics listening");
    let app = sandpit_server::metrics::router(server.clone());
    let shutdown = server.shutdown.clone();
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics listener");
        }
    });
    Ok(())
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SANDPIT_LISTEN", default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// Where `GET /metrics` (Prometheus) is served, apart from the API; `off` serves none.
    /// If the default address is taken, the server runs without it (and says so); an
    /// address given here must bind.
    #[arg(long, env = "SANDPIT_METRICS_LISTEN", default_value = DEFAULT_METRICS_LISTEN)]
    metrics_listen: String,
    /// Where the database, templates and sandboxes live.
    #[arg(long, env = "SANDPIT_DATA_DIR", default_value = "./.sandpit")]
    data_dir: PathBuf,
    /// The database: `postgres://user:password@host/db` (the database must exist; the
    /// schema is created) or `sqlite://<path>`. Default: the SQLite file
    /// `<data dir>/sandpit.db`. (`--control` is the same: the fleet's control layer is its
    /// database.)
    #[arg(long, env = "SANDPIT_DATABASE", visible_alias = "control")]
    database: Option<String>,
    /// Run no sandboxes: answer the API and relay every request that needs a node to the
    /// fleet's nodes (`sandpit node`). Needs the fleet's --database (`postgres://…`) and
    /// --node-secret; needs no root, runsc or agent binary.
    #[arg(long, env = "SANDPIT_API_ONLY")]
    api_only: bool,
    /// Prefix for every host object this server creates (netns, veths, nftables table,
    /// cgroups, runsc containers): 1-6 characters [a-z0-9]. Servers sharing a host need
    /// different prefixes and pools.
    #[arg(long, env = "SANDPIT_PREFIX", default_value = "sp")]
    prefix: String,
    /// The cgroup sandboxes are placed under (`<this>/<sandbox>`, in every hierarchy).
    /// Relative (default `sandpit-<prefix>`): below the server's own cgroup. Starting with
    /// `/`: from the hierarchy's root, outside the server's: what a systemd service on
    /// cgroup v2 needs (`deploy/systemd/sandpit.service` gives `/sandpit`), since there a
    /// cgroup that holds the server's process cannot hand its controllers to children.
    #[arg(long, env = "SANDPIT_CGROUP_PARENT", value_parser = parse_cgroup_parent)]
    cgroup_parent: Option<String>,
    /// This node's name in the fleet (`sandpit nodes`): 1-63 characters [a-z0-9-]. Default:
    /// the host name, lowercased, other characters as `-`.
    #[arg(long, env = "SANDPIT_NODE_NAME")]
    node_name: Option<String>,
    /// How long the node's fleet lease lasts without a heartbeat (it beats every third of
    /// it), e.g. 15s; at least 3s.
    #[arg(long, env = "SANDPIT_NODE_LEASE", default_value = "15s")]
    node_lease: String,
    /// The secret the fleet's servers share (at least 16 characters): with it, a request
    /// about a sandbox that another server runs is relayed to that server, signed with it.
    /// Without it, such requests answer 503 `sandbox_on_another_node`.
    #[arg(long, env = "SANDPIT_NODE_SECRET", hide_env_values = true)]
    node_secret: Option<String>,
    /// Where the fleet's other servers reach this one (`http://host:port`). Default:
    /// `http://` and the listen address.
    #[arg(long, env = "SANDPIT_NODE_ADDRESS")]
    node_address: Option<String>,
    /// Object storage for hibernation images, named snapshots and template layers
    /// (`file:///path` or `s3://bucket[/prefix]?endpoint=…&region=…`; S3 credentials from
    /// the `AWS_*` environment). With it, each is uploaded in the background; a hibernated
    /// sandbox wakes on another node when its own is lost or draining, and a node that lacks
    /// a snapshot or a template's layers fetches them.
    #[arg(long, env = "SANDPIT_OBJECT_STORE")]
    object_store: Option<String>,
    /// Address pool for sandboxes, split into /30 slots.
    #[arg(long, env = "SANDPIT_POOL", default_value = "10.88.0.0/16")]
    pool: String,
    /// gVisor platform: ptrace, systrap or kvm.
    #[arg(long, env = "SANDPIT_PLATFORM", default_value = "ptrace")]
    platform: String,
    /// The runsc binary.
    #[arg(long, env = "SANDPIT_RUNSC", default_value = "runsc")]
    runsc: PathBuf,
    /// The static sandpit-agent binary (default: next to this binary, then the static build
    /// output of scripts/build-agent).
    #[arg(long, env = "SANDPIT_AGENT_BIN")]
    agent_bin: Option<PathBuf>,
    /// Largest upload in bytes.
    #[arg(long, env = "SANDPIT_UPLOAD_LIMIT", default_value_t = 100 * 1024 * 1024)]
    upload_limit: u64,
    /// An upload whose body sends nothing for this long is aborted, e.g. 30s.
    #[arg(long, env = "SANDPIT_BODY_IDLE_TIMEOUT", default_value = "30s")]
    body_idle_timeout: String,
    /// How long lifecycle events stay in the log (`GET /v1/events`), e.g. 7d or 12h.
    #[arg(long, env = "SANDPIT_EVENTS_RETENTION", default_value = "7d")]
    events_retention: String,
    /// How often expired and idle sandboxes are looked for, e.g. 1s.
    #[arg(long, env = "SANDPIT_REAPER_INTERVAL", default_value = "1s")]
    reaper_interval: String,
    /// How long a booted or restored sandbox's agent may take to answer. A restored agent
    /// silent for half of it is restarted (memory kept).
    #[arg(long, env = "SANDPIT_AGENT_READY_TIMEOUT", default_value = "20s")]
    agent_ready_timeout: String,
    /// Nameservers for sandboxes' /etc/resolv.conf, comma-separated IPv4 addresses
    /// (default: the host's, loopback ones excluded; queries follow each sandbox's egress
    /// policy).
    #[arg(long, env = "SANDPIT_DNS", value_delimiter = ',')]
    dns: Option<Vec<std::net::Ipv4Addr>>,
    /// Previews are served at http://<sandbox id>-<port>.<preview domain> on this listener
    /// (the names must resolve to this server: *.localhost does in browsers).
    #[arg(long, env = "SANDPIT_PREVIEW_DOMAIN", default_value = "localhost")]
    preview_domain: String,
    /// Whether a preview request to a hibernated sandbox wakes it (`false`: such requests
    /// get 503 `sandbox_suspended` until the sandbox is woken through the API).
    #[arg(long, env = "SANDPIT_PREVIEW_WAKE", default_value_t = true, action = clap::ArgAction::Set)]
    preview_wake: bool,
    /// Admin token to create on first start (otherwise one is generated and printed once).
    #[arg(long, env = "SANDPIT_BOOTSTRAP_TOKEN", hide_env_values = true)]
    bootstrap_token: Option<String>,
    /// Booted, idle sandboxes of the base template kept ready, so create hands one out
    /// instead of booting (0 disables).
    #[arg(long, env = "SANDPIT_WARM_POOL", default_value_t = 2)]
    warm_pool: u32,
    /// Start sandboxes by restoring a memory snapshot of the booted template instead of
    /// booting it. Off by default: for the busybox `base` template a cold boot is faster
    /// (see bench/); it pays off for templates with slow start-up.
    #[arg(long, env = "SANDPIT_BOOT_SNAPSHOTS")]
    boot_snapshots: bool,
    /// API requests per workspace per hour, spendable in one burst and refilled evenly
    /// (0: unlimited). Over it: 429 `rate_limited` with Retry-After.
    #[arg(long, env = "SANDPIT_RATE_LIMIT_REQUESTS", default_value_t = 36_000)]
    rate_limit_requests: u32,
    /// Sandboxes created (a fork counts each child) per workspace per hour (0: unlimited).
    /// Over it: 429 `sandbox_rate_limited`.
    #[arg(long, env = "SANDPIT_RATE_LIMIT_SANDBOXES", default_value_t = 1_000)]
    rate_limit_sandboxes: u32,
    /// Sandboxes creating or running at once per workspace; hibernated ones do not count
    /// (0: unlimited). Over it: 429 `running_quota_exceeded`.
    #[arg(long, env = "SANDPIT_MAX_RUNNING", default_value_t = 200)]
    max_running: u32,
    /// API requests with an invalid, expired or revoked token per client address per hour
    /// (0: unlimited). Past it: 429 `auth_rate_limited` instead of 401.
    #[arg(
        long,
        env = "SANDPIT_RATE_LIMIT_AUTH_FAILURES",
        default_value_t = 1_000
    )]
    rate_limit_auth_failures: u32,
    /// Templates a workspace keeps, deleted ones aside (0: unlimited). Past it: 507
    /// `quota_exceeded`.
    #[arg(long, env = "SANDPIT_MAX_TEMPLATES", default_value_t = 100)]
    max_templates: u32,
    /// Snapshots a workspace keeps (0: unlimited). Past it: 507 `quota_exceeded`.
    #[arg(long, env = "SANDPIT_MAX_SNAPSHOTS", default_value_t = 500)]
    max_snapshots: u32,
    /// Volumes a workspace keeps (0: unlimited). Past it: 507 `quota_exceeded`.
    #[arg(long, env = "SANDPIT_MAX_VOLUMES", default_value_t = 50)]
    max_volumes: u32,
    /// Template builds one workspace runs or queues at once (0: unlimited); the server runs
    /// 4 at a time in all. Past it: 429 `quota_exceeded` with Retry-After.
    #[arg(long, env = "SANDPIT_MAX_BUILDS", default_value_t = 2)]
    max_builds: u32,
    /// Sandboxes a workspace keeps suspended, counting its running persistent ones, which
    /// suspend when idle (0: unlimited). Suspended sandboxes hold no network slot, but they
    /// hold disk. Past it: 507 `quota_exceeded` on create, fork or hibernate.
    #[arg(long, env = "SANDPIT_MAX_SUSPENDED", default_value_t = 500)]
    max_suspended: u32,
    /// Registries (host:port) that template builds reach over plain HTTP, comma-separated
    /// (loopback registries always are).
    #[arg(long, env = "SANDPIT_INSECURE_REGISTRIES", value_delimiter = ',')]
    insecure_registries: Vec<String>,
    /// Registries (host or host:port, comma-separated) that template builds may pull from on
    /// loopback, private or this host's addresses; pulls to such addresses are refused
    /// otherwise. Never opens the sandbox pool or link-local (metadata) addresses.
    #[arg(long, env = "SANDPIT_ALLOWED_REGISTRIES", value_delimiter = ',')]
    allowed_registries: Vec<String>,
    /// Webhook endpoints (host or host:port, comma-separated) that deliveries may reach on
    /// loopback, private or this host's addresses; deliveries to such addresses are refused
    /// otherwise. Never opens the sandbox pool or link-local (metadata) addresses.
    #[arg(long, env = "SANDPIT_WEBHOOK_ALLOW_HOSTS", value_delimiter = ',')]
    webhook_allow_hosts: Vec<String>,
    /// The delay before a failed webhook delivery is tried again, e.g. 10s; it doubles with
    /// each attempt, up to an hour, until a day after the event.
    #[arg(long, env = "SANDPIT_WEBHOOK_RETRY_BASE", default_value = "10s")]
    webhook_retry_base: String,
    /// The master key of workspace secrets (`/v1/secrets`): a file holding 64 hex digits
    /// (`sandpit secrets generate-key`). Without it (or SANDPIT_SECRETS_KEY), the secrets
    /// routes answer 403 `secrets_disabled`. Every server of a fleet needs the same key.
    #[arg(long, env = "SANDPIT_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,
    /// Extra CA certificates (PEM files, comma-separated) the secrets proxy trusts for
    /// upstream servers besides the host's roots (an internal API behind a private CA).
    #[arg(long, env = "SANDPIT_SECRETS_EXTRA_CA", value_delimiter = ',')]
    secrets_extra_ca_file: Vec<PathBuf>,
    /// Disk of a `small` sandbox, e.g. 10G or 512M (`medium` gets twice, `large` four
    /// times). The files a sandbox writes live on a sparse ext4 image of that size, so a full
    /// sandbox gets ENOSPC and the host's disk is safe. `off`: no bound.
    #[arg(long, env = "SANDPIT_DISK_LIMIT", default_value = "10G", value_parser = parse_disk_limit)]
    disk_limit: DiskLimit,
    /// Free space the data directory's filesystem keeps, e.g. 2G: below it creates, forks,
    /// snapshots and template builds answer 507 `host_disk_full`. `off`: no check.
    #[arg(long, env = "SANDPIT_MIN_FREE_DISK", default_value = "2G", value_parser = parse_min_free)]
    min_free_disk: DiskLimit,
    /// Largest unpacked size of one archive a tenant hands in (build context, `ADD`ed
    /// tarball, image layer), e.g. 10G: past it the build fails with `archive_too_large`.
    #[arg(long, env = "SANDPIT_ARCHIVE_MAX_BYTES", default_value = "10G", value_parser = parse_size_required)]
    archive_max_bytes: u64,
    /// Most entries of one such archive.
    #[arg(long, env = "SANDPIT_ARCHIVE_MAX_ENTRIES", default_value_t = 1_000_000)]
    archive_max_entries: u64,
    /// Deepest path (in components) of one such archive's entries.
    #[arg(long, env = "SANDPIT_ARCHIVE_MAX_DEPTH", default_value_t = 256)]
    archive_max_depth: usize,
    /// Log as JSON lines.
    #[arg(long, env = "SANDPIT_LOG_JSON")]
    log_json: bool,
    /// Export traces over OTLP/HTTP (protobuf) to this collector, e.g.
    /// http://127.0.0.1:4318 (`/v1/traces` is appended unless given). Default:
    /// $OTEL_EXPORTER_OTLP_ENDPOINT; none: no export. A request's W3C `traceparent` is
    /// honoured; an unreachable collector drops spans, never slows requests.
    #[arg(long, env = "SANDPIT_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Serve HTTPS: the certificate chain (PEM, leaf first) for the API's host and the
    /// preview domain (`<preview domain>` and `*.<preview domain>`). With --tls-key.
    #[arg(long, env = "SANDPIT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1). With --tls-cert.
    #[arg(long, env = "SANDPIT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve HTTPS with a development CA kept in this directory (made on first use, e.g.
    /// /var/lib/sandpit/tls): a server certificate for localhost, this host's name, the
    /// listen address and the preview domain with its subdomains is made from it, again when
    /// those names change. Clients trust DIR/ca.pem. Not with --tls-cert.
    #[arg(long, env = "SANDPIT_TLS_DEV_CA", value_name = "DIR", conflicts_with_all = ["tls_cert", "tls_key"])]
    tls_dev_ca: Option<PathBuf>,
}

/// A size that must be given (no `off`).
fn parse_size_required(text: &str) -> Result<u64, String> {
    parse_size(text)?.ok_or_else(|| format!("{text:?}: give a size, e.g. 10G"))
}

/// `--min-free-disk`: a size (any, 0 included) or `off`.
fn parse_min_free(text: &str) -> Result<DiskLimit, String> {
    match text.trim() {
        "0" => Ok(DiskLimit(None)),
        t => parse_size(t).map(DiskLimit),
    }
}

/// `--disk-limit`: bytes, or `None` for `off`.
#[derive(Debug, Clone, Copy)]
struct DiskLimit(Option<u64>);

fn parse_disk_limit(text: &str) -> Result<DiskLimit, String> {
    let limit = parse_size(text)?;
    if let Some(bytes) = limit
        && bytes < sandpit_runtime_gvisor::MIN_DISK_BYTES
    {
        return Err(format!(
            "{text:?} is too small: a disk needs at least {} MiB",
            sandpit_runtime_gvisor::MIN_DISK_BYTES >> 20
        ));
    }
    Ok(DiskLimit(limit))
}

/// A size such as `10G`, `512M`, `64MiB` or a number of bytes; `off` is `None`.
fn parse_size(text: &str) -> Result<Option<u64>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(format!(
                "{text:?}: expected a size such as 10G or 512M, or off"
            ));
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: expected a size such as 10G or 512M, or off"))?;
    n.checked_mul(1 << shift)
        .map(Some)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn find_agent() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let candidates = [
        dir.join("sandpit-agent-static"),
        dir.join("../x86_64-unknown-linux-gnu/release/sandpit-agent"),
        dir.join("../../x86_64-unknown-linux-gnu/release/sandpit-agent"),
        PathBuf::from("target/x86_64-unknown-linux-gnu/release/sandpit-agent"),
    ];
    candidates.into_iter().find(|p| p.exists())
}

/// `sandpit node`: `serve` as one node of a fleet, which needs the fleet's database and
/// secret.
pub async fn run_node(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.api_only,
        "a node runs sandboxes: --api-only is for `sandpit serve`"
    );
    anyhow::ensure!(
        args.database.is_some(),
        "a node needs the fleet's database: give --control postgres://… (or a sqlite:// file that every server of the fleet, all on this host, shares)"
    );
    anyhow::ensure!(
        args.node_secret.is_some(),
        "a node needs the fleet's --node-secret: the API replicas relay to it with it"
    );
    run(args).await
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let otlp_endpoint = args.otlp_endpoint.clone().or_else(|| {
        std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
            .ok()
            .filter(|s| !s.is_empty())
    });
    let telemetry = crate::telemetry::init(args.log_json, otlp_endpoint.as_deref())?;
    if args.api_only {
        anyhow::ensure!(
            args.database.is_some(),
            "--api-only needs the fleet's database: give --database postgres://… (or a sqlite:// file that every server of the fleet, all on this host, shares)"
        );
        anyhow::ensure!(
            args.node_secret.is_some(),
            "--api-only needs --node-secret: an API replica relays every sandbox's requests to its node"
        );
    }
    let agent_bin = match args.agent_bin.clone().or_else(find_agent) {
        Some(bin) => bin,
        // A replica injects no agent.
        None if args.api_only => PathBuf::new(),
        None => anyhow::bail!(
            "no sandpit-agent binary found: run scripts/build-agent or set SANDPIT_AGENT_BIN"
        ),
    };
    let node_name = match args.node_name.clone() {
        Some(n) if sandpit_control::store::valid_node_id(&n) => n,
        Some(n) => anyhow::bail!(
            "--node-name {n:?}: 1-63 characters [a-z0-9-], not starting or ending with '-'"
        ),
        None => default_node_name(&args.data_dir, &args.prefix)?,
    };
    if let Some(s) = &args.node_secret {
        anyhow::ensure!(
            s.len() >= sandpit_server::forward::MIN_SECRET_LEN,
            "--node-secret must be at least {} characters",
            sandpit_server::forward::MIN_SECRET_LEN
        );
    }
    // Relays between the fleet's servers are plain HTTP (`forward.rs`), so a member that
    // speaks only TLS could not be relayed to.
    anyhow::ensure!(
        (args.tls_cert.is_none() && args.tls_dev_ca.is_none()) || args.node_secret.is_none(),
        "--tls-cert with --node-secret: the fleet's servers relay to one another over plain \
         HTTP; terminate TLS in front of a fleet (a proxy), or serve TLS from a single server"
    );
    // Checked before anything starts: a bad certificate or key stops here, with the reason.
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_dev_ca) {
        (Some(cert), Some(key), _) => Some(crate::tls::load(cert, key)?),
        (_, _, Some(dir)) => {
            let names = crate::dev_ca::names_for(&args.listen, &args.preview_domain);
            let (files, made) = crate::dev_ca::ensure(dir, &names)
                .with_context(|| format!("--tls-dev-ca {}", dir.display()))?;
            if made.ca {
                tracing::warn!(ca = %files.ca_cert.display(), "made a new development CA; {}", crate::dev_ca::trust_hint(&files));
            }
            if made.server {
                tracing::info!(cert = %files.server_cert.display(), ?names, "made a server certificate from the development CA");
            }
            Some(crate::tls::load(&files.server_cert, &files.server_key)?)
        }
        _ => None,
    };
    let node_address = args
        .node_address
        .clone()
        .unwrap_or_else(|| format!("http://{}", args.listen));
    anyhow::ensure!(
        node_address.starts_with("http://")
            && node_address.len() > "http://".len()
            && !node_address["http://".len()..].contains('/'),
        "--node-address {node_address:?}: give http://host:port"
    );
    let object_store = match &args.object_store {
        None => None,
        Some(url) => {
            let url = sandpit_objects::StoreUrl::parse(url).context("--object-store")?;
            let store =
                sandpit_objects::Store::open(&url, &sandpit_objects::StoreOptions::default())
                    .context("--object-store")?;
            Some(store)
        }
    };
    let node_lease: Duration = sandpit_api_types::parse_duration(&args.node_lease)
        .map_err(anyhow::Error::msg)
        .context("--node-lease")?;
    let events_retention: Duration = sandpit_api_types::parse_duration(&args.events_retention)
        .map_err(anyhow::Error::msg)
        .context("--events-retention")?;
    let reaper_interval: Duration = sandpit_api_types::parse_duration(&args.reaper_interval)
        .map_err(anyhow::Error::msg)
        .context("--reaper-interval")?;
    let agent_ready_timeout: Duration =
        sandpit_api_types::parse_duration(&args.agent_ready_timeout)
            .map_err(anyhow::Error::msg)
            .context("--agent-ready-timeout")?;
    let mut cfg = ServerConfig::new(args.data_dir.clone(), agent_bin);
    cfg.database = args.database.clone();
    cfg.agent_ready_timeout = agent_ready_timeout;
    cfg.prefix = args.prefix.clone();
    cfg.node_id = node_name.clone();
    cfg.node_secret = args.node_secret.clone();
    cfg.upload_limit = args.upload_limit;
    cfg.reaper_interval = reaper_interval;
    cfg.events_retention = events_retention;
    cfg.body_idle_timeout = sandpit_api_types::parse_duration(&args.body_idle_timeout)
        .map_err(anyhow::Error::msg)
        .context("--body-idle-timeout")?;
    cfg.warm_pool = args.warm_pool;
    cfg.boot_snapshots = args.boot_snapshots;
    cfg.preview_domain = args.preview_domain.clone();
    cfg.preview_wake = args.preview_wake;
    cfg.tls = tls.is_some();
    cfg.limits = sandpit_server::limits::LimitsConfig {
        requests_per_hour: args.rate_limit_requests,
        sandboxes_per_hour: args.rate_limit_sandboxes,
        max_running: args.max_running,
        auth_failures_per_hour: args.rate_limit_auth_failures,
        max_templates: args.max_templates,
        max_snapshots: args.max_snapshots,
        max_volumes: args.max_volumes,
        max_builds: args.max_builds,
        max_suspended: args.max_suspended,
    };
    cfg.insecure_registries = args.insecure_registries.clone();
    cfg.allowed_registries = endpoints(&args.allowed_registries, "--allowed-registries")?;
    cfg.webhook_allow_hosts = endpoints(&args.webhook_allow_hosts, "--webhook-allow-hosts")?;
    cfg.webhook_retry_base = sandpit_api_types::parse_duration(&args.webhook_retry_base)
        .map_err(anyhow::Error::msg)
        .context("--webhook-retry-base")?;
    anyhow::ensure!(
        !cfg.webhook_retry_base.is_zero(),
        "--webhook-retry-base must be more than 0"
    );
    cfg.secrets_key = match (&args.secrets_key_file, std::env::var("SANDPIT_SECRETS_KEY")) {
        (Some(path), _) => Some(
            sandpit_control::secrets::MasterKey::from_file(path).map_err(|e| {
                anyhow::anyhow!("--secrets-key-file: {}", sandpit_control::DisplayChain(&e))
            })?,
        ),
        (None, Ok(text)) => Some(sandpit_control::secrets::MasterKey::parse(&text).map_err(
            |e| anyhow::anyhow!("SANDPIT_SECRETS_KEY: {}", sandpit_control::DisplayChain(&e)),
        )?),
        (None, Err(_)) => None,
    };
    cfg.secrets_extra_ca = args
        .secrets_extra_ca_file
        .iter()
        .filter(|p| !p.as_os_str().is_empty())
        .cloned()
        .collect();
    cfg.disk_limit = args.disk_limit.0;
    sandpit_image::unpack::UnpackLimits::set_current(sandpit_image::unpack::UnpackLimits {
        max_bytes: args.archive_max_bytes,
        max_entries: args.archive_max_entries,
        max_depth: args.archive_max_depth,
    });
    cfg.min_free_disk = args.min_free_disk.0.unwrap_or(0);
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let net_config = sandpit_net::NetConfig {
        prefix: args.prefix.clone(),
        pool: args
            .pool
            .parse()
            .map_err(|e| anyhow::anyhow!("--pool {:?}: {e}", args.pool))?,
        nameservers: sandpit_server::dns::sandbox_nameservers(args.dns.as_deref()),
    };
    cfg.api_only = args.api_only;
    let backends = if args.api_only {
        cfg.warm_pool = 0;
        cfg.boot_snapshots = false;
        None
    } else {
        Some(node_backends(&args, &cfg, net_config.clone())?)
    };
    // Adopt and promptly reap the sandbox processes runsc leaves behind (see
    // `sandpit_runtime_gvisor::spawn_reaper`); stopped after the server.
    let reaper_stop = tokio_util::sync::CancellationToken::new();
    let runsc_reaper = backends
        .is_some()
        .then(|| sandpit_runtime_gvisor::spawn_reaper(reaper_stop.clone().cancelled_owned()));
    let (runtime, net, runsc_build): (
        Arc<dyn sandpit_runtime::Runtime>,
        Arc<dyn sandpit_net::SandboxNetwork>,
        String,
    ) = match backends {
        Some((runtime, net, build)) => (Arc::new(runtime), Arc::new(net), build),
        None => (
            Arc::new(sandpit_server::replica::NoRuntime),
            Arc::new(sandpit_server::replica::NoNetwork::new(net_config)),
            String::new(),
        ),
    };
    let (server, token) = Server::start(cfg, runtime, net, args.bootstrap_token.as_deref())
        .await
        .map_err(|e| anyhow::anyhow!("{}", sandpit_server::error::DisplayChain(&e)))
        .context("starting the server")?;
    if let Some(token) = token {
        // Shown once: only its hash is stored.
        eprintln!("\n  Admin token (shown once, store it now):\n\n    {token}\n");
    }
    if let Some(store) = object_store.filter(|_| !args.api_only) {
        tracing::info!(store = %store, "hibernation images, named snapshots and template layers go to object storage");
        server
            .node
            .set_image_store(Arc::new(crate::objects::ObjectImages::new(store)));
        let node = server.node.clone();
        tokio::spawn(async move {
            if let Err(e) = sandpit_control::node::moves::resume_uploads(&node).await {
                tracing::error!(error = %sandpit_server::error::DisplayChain(&e), "restarting unfinished uploads");
            }
        });
    }
    let reaper = server.spawn_reaper();
    let refill = sandpit_control::node::pool::spawn_refill(&server.node);
    let heartbeat = if args.api_only {
        tracing::info!(
            "API replica: this server runs no sandboxes and relays to the fleet's nodes"
        );
        None
    } else {
        Some(join_fleet(&server, node_address, runsc_build, node_lease).await?)
    };
    serve_metrics(&server, &args.metrics_listen).await?;
    if server.cfg.boot_snapshots {
        let s = server.clone();
        tokio::spawn(async move {
            if let Err(e) = sandpit_control::node::templates::take_boot_snapshot(&s.node).await {
                tracing::error!(error = %sandpit_server::error::DisplayChain(&e), "taking the base template's boot snapshot; creates boot cold");
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(listen = %args.listen, data_dir = %args.data_dir.display(), scheme, "sandpit serving");
    println!("listening on {scheme}://{local}");
    let app = sandpit_server::app(server.clone());
    match tls {
        Some(config) => {
            // (`tap_io` also gives the TLS listener axum's `ConnectInfo<SocketAddr>`.)
            let listener = axum::serve::ListenerExt::tap_io(
                crate::tls::TlsListener::new(listener, config)?,
                |tls| {
                    let _ = tls.get_ref().0.set_nodelay(true);
                },
            );
            serve_on(listener, app, server.shutdown.clone()).await?
        }
        None => {
            // Without TCP_NODELAY a streamed response (headers, then body: every preview
            // response) waits for the client's delayed ACK: +40 ms per request.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            serve_on(listener, app, server.shutdown.clone()).await?
        }
    }
    let _ = reaper.await;
    let _ = refill.await;
    if let Some(heartbeat) = heartbeat {
        let _ = heartbeat.await;
    }
    reaper_stop.cancel();
    if let Some(runsc_reaper) = runsc_reaper {
        let _ = runsc_reaper.await;
    }
    telemetry.shutdown().await;
    Ok(())
}

/// Serve the app on `listener` (plain TCP or TLS: one path) until SIGINT or SIGTERM.
async fn serve_on<L>(
    listener: L,
    app: axum::Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
    SocketAddr: for<'a> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'a, L>>,
{
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down; sandboxes keep running and are adopted on the next start");
        shutdown.cancel();
    })
    .await
    .context("serving")
}

/// A node's backends: the gVisor runtime, the host's network and the runsc build (a
/// memory image restores only on the same build). The server sees only their traits.
fn node_backends(
    args: &ServeArgs,
    cfg: &ServerConfig,
    net_config: sandpit_net::NetConfig,
) -> anyhow::Result<(
    sandpit_runtime_gvisor::GvisorRuntime,
    sandpit_net::Network,
    String,
)> {
    let net = sandpit_net::Network::new(net_config)?;
    if cfg.disk_limit.is_some() {
        sandpit_runtime_gvisor::check_disk_support()?;
    }
    let runsc_build = sandpit_runtime_gvisor::check_host(&args.runsc)
        .unwrap_or_else(|e| format!("unknown ({e})"));
    if let Some(why) = sandpit_runtime_gvisor::task_limit_shortfall(u64::from(args.max_running)) {
        tracing::warn!(
            max_running = args.max_running,
            "--max-running may not be reachable: {why}"
        );
    }
    let runtime =
        sandpit_runtime_gvisor::GvisorRuntime::new(sandpit_runtime_gvisor::GvisorConfig {
            runsc: args.runsc.clone(),
            root_dir: args.data_dir.join("runsc"),
            platform: args.platform.clone(),
            cgroup_parent: args
                .cgroup_parent
                .clone()
                .unwrap_or_else(|| format!("sandpit-{}", args.prefix)),
            debug_log_dir: None,
        })?;
    Ok((runtime, net, runsc_build))
}

/// `--cgroup-parent`: path components of letters, digits, '-', '_' and '.' (no `..`),
/// relative or absolute.
fn parse_cgroup_parent(s: &str) -> Result<String, String> {
    let s = s.trim_end_matches('/');
    let rest = s.strip_prefix('/').unwrap_or(s);
    let ok = !rest.is_empty()
        && s.len() <= 256
        && rest.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
    if ok {
        Ok(s.to_string())
    } else {
        Err(
            "a cgroup path: components of letters, digits, '-', '_', '.' (no '..'), \
             e.g. /sandpit or sandpit-sp"
                .to_string(),
        )
    }
}

/// Join the fleet as a node: a lease renewed with this node's load (`sandpit nodes`), a
/// drain that moves its sandboxes away, and the teardown of what was settled while it was
/// lost.
async fn join_fleet(
    server: &Arc<Server>,
    node_address: String,
    runsc_build: String,
    node_lease: Duration,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let membership = sandpit_control::membership::Membership::join(
        server.store.clone(),
        sandpit_control::store::NodeInfo {
            id: server.node.cfg.node_id.clone(),
            address: node_address,
            runsc_build,
            memory_mib: sandpit_control::membership::total_memory_mib().unwrap_or(0),
            slots: i64::from(server.net.capacity()),
        },
        node_lease,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{}", sandpit_server::error::DisplayChain(&e)))
    .context("joining the fleet")?;
    let node = server.node.clone();
    Ok(membership.spawn(
        move || {
            let node = node.clone();
            async move {
                sandpit_control::membership::local_load(&node)
                    .await
                    .unwrap_or_default()
            }
        },
        {
            let server = server.clone();
            move |status| {
                let draining = status == sandpit_control::store::NodeStatus::Draining;
                if server.node.set_draining(draining) {
                    tracing::info!("this node is draining: moving its sandboxes away");
                    tokio::spawn(sandpit_server::forward::drain_away(server.clone()));
                }
            }
        },
        {
            let node = server.node.clone();
            move || {
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(e) = node.drop_settled().await {
                        tracing::error!(error = %sandpit_server::error::DisplayChain(&e), "tearing down sandboxes settled while this node was lost");
                    }
                });
            }
        },
        server.shutdown.clone(),
    ))
}

/// The host name as a node name: lowercased, other characters as `-`, at most 63; `local`
/// when nothing is left.
/// This server's node name when `--node-name` is not given: the one it took before, kept
/// in `<data dir>/node-name` (its sandboxes are recorded under it: a host whose name
/// changes, like a container's, must not lose them), else one made from the host name and
/// the prefix (`<host>-<prefix>`) and kept there.
#[expect(
    clippy::disallowed_methods,
    reason = "the operator's data dir and the kernel's host name file, not a tenant's"
)]
fn default_node_name(data_dir: &std::path::Path, prefix: &str) -> anyhow::Result<String> {
    let kept = data_dir.join("node-name");
    if let Ok(text) = std::fs::read_to_string(&kept) {
        let name = text.trim();
        anyhow::ensure!(
            sandpit_control::store::valid_node_id(name),
            "{} holds {name:?}, not a node name: fix or remove it, or give --node-name",
            kept.display()
        );
        return Ok(name.to_string());
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    // With the prefix: servers on one host (which must use different prefixes) get
    // different names, so two of them sharing a database never take each other's rows.
    let name = node_name_from_host(&format!("{}-{prefix}", host.trim()));
    std::fs::create_dir_all(data_dir)
        .and_then(|()| std::fs::write(&kept, format!("{name}\n")))
        .with_context(|| format!("keeping the node name in {}", kept.display()))?;
    Ok(name)
}

fn node_name_from_host(host: &str) -> String {
    let mapped: String = host
        .trim()
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .take(63)
        .collect();
    let name = mapped.trim_matches('-').to_string();
    if sandpit_control::store::valid_node_id(&name) {
        name
    } else {
        "local".into()
    }
}

/// `host[:port]` items of a comma-separated flag. Empty items (`SANDPIT_…=` or a trailing
/// comma) name nothing.
fn endpoints(items: &[String], flag: &str) -> anyhow::Result<Vec<sandpit_net::Endpoint>> {
    items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<sandpit_net::Endpoint>()
                .map_err(|e| anyhow::anyhow!("{flag} {s:?}: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_parents_are_plain_paths() {
        for good in [
            "/sandpit",
            "sandpit-sp",
            "/system.slice/sandpit.service/",
            "a_b.c",
        ] {
            assert!(parse_cgroup_parent(good).is_ok(), "{good}");
        }
        assert_eq!(parse_cgroup_parent("/sandpit/").unwrap(), "/sandpit");
        for bad in [
            "", "/", "/a/../b", "..", "a//b", "a b", "a\nb", "/a/./b", "x$y", "a@b",
        ] {
            assert!(parse_cgroup_parent(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_default_node_name_is_kept_in_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let first = default_node_name(dir.path(), "t7").unwrap();
        assert!(sandpit_control::store::valid_node_id(&first));
        assert!(first.ends_with("-t7"), "{first}");
        std::fs::write(dir.path().join("node-name"), "kept-name\n").unwrap();
        assert_eq!(default_node_name(dir.path(), "t7").unwrap(), "kept-name");
        std::fs::write(dir.path().join("node-name"), "../bad").unwrap();
        assert!(default_node_name(dir.path(), "t7").is_err());
    }

    #[test]
    fn node_names_from_host_names() {
        assert_eq!(
            node_name_from_host("Box-1.example.com\n"),
            "box-1-example-com"
        );
        assert_eq!(node_name_from_host("---"), "local");
        assert_eq!(node_name_from_host(""), "local");
        assert_eq!(node_name_from_host("héllo"), "h-llo");
        assert_eq!(node_name_from_host(&"a".repeat(100)).len(), 63);
    }

    #[test]
    fn disk_limits() {
        let p = |t: &str| parse_disk_limit(t).map(|d| d.0);
        assert_eq!(p("10G"), Ok(Some(10 << 30)));
        assert_eq!(p("512M"), Ok(Some(512 << 20)));
        assert_eq!(p("64MiB"), Ok(Some(64 << 20)));
        assert_eq!(p("off"), Ok(None));
        assert_eq!(p("1073741824"), Ok(Some(1 << 30)));
        for bad in ["", "G", "10X", "-1G", "1M", "99999999999T"] {
            assert!(p(bad).is_err(), "{bad}");
        }
        let m = |t: &str| parse_min_free(t).map(|d| d.0);
        assert_eq!(m("2G"), Ok(Some(2 << 30)));
        assert_eq!(m("1M"), Ok(Some(1 << 20)));
        assert_eq!(m("0"), Ok(None));
        assert_eq!(m("off"), Ok(None));
        assert!(m("lots").is_err());
    }
}
