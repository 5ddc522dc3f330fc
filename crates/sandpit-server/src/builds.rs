//! Template builds: from an image reference or a Dockerfile (async, with a replayable event
//! log per build). The rules on names, aliases, quotas and deletion are the control layer's
//! ([`sandpit_control::node::catalog`]); this module checks the request's build inputs,
//! registers the template there and drives the build: `sandpit-image` does the pulling
//! (over HTTP, which the control layer does not speak), unpacking and layer caching, and
//! [`ServerRunner`] runs `RUN` steps in builder sandboxes through the node.
#![expect(
    clippy::disallowed_methods,
    reason = "build logs, template dirs and boot snapshots are the server's own files; build contexts and RUN layers (tenant trees) go only through sandpit_fs"
)]

use crate::store::TemplateStatus;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use sandpit_api_types::{CreateTemplateRequest, EgressPolicy, Template, TemplateBuildEvent};
use sandpit_image::build::{BuildRequest, RunStep};
use sandpit_image::{BuildEvent, Builder, ImageConfig, ImageError, ReadyCheck, StepRunner};
use tokio::sync::broadcast;

use crate::error::{ApiError, ControlError, DisplayChain};
use crate::server::Server;
use crate::store::TemplateRow;
use crate::util::{now_ms, random_hex, rfc3339};
use sandpit_control::node::catalog;

/// Largest build context (decoded), in bytes.
pub const MAX_CONTEXT_BYTES: usize = 256 * 1024 * 1024;
/// How long one `RUN` step may run.
const RUN_STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Events of a running build kept for replay beyond which `log` events are dropped (steps
/// and the outcome are always kept).
const MAX_REPLAY_LOG_BYTES: usize = 4 * 1024 * 1024;

/// Most bytes of build output kept in a build's log file (`build.jsonl`); past it one marker
/// line says so and the rest of the output is dropped (steps and the outcome are still
/// written). A `RUN yes` must not fill the host's disk.
pub const MAX_LOG_FILE_BYTES: u64 = 16 << 20;
/// The line that ends a capped build log's output.
pub const LOG_CAPPED_MARKER: &str =
    "\n[sandpit: build output past 16 MiB is not kept; the step still runs to its end]\n";

/// How many template builds run at once on the server; later ones wait (status
/// `building`, a log line says so) so builds cannot take every network slot and core. One
/// workspace has at most `--max-builds` (default 2) builds under way, refused past it, so
/// with the defaults no tenant holds every slot.
const CONCURRENT_BUILDS: usize = 4;

/// Live builds' event logs, by template id. A finished build's log is on disk
/// (`templates/<id>/build.jsonl`) and leaves this map.
pub struct Builds {
    /// Guards only the map.
    live: Mutex<HashMap<String, Arc<BuildLog>>>,
    permits: tokio::sync::Semaphore,
}

impl Default for Builds {
    fn default() -> Self {
        Builds {
            live: Mutex::new(HashMap::new()),
            permits: tokio::sync::Semaphore::new(CONCURRENT_BUILDS),
        }
    }
}

/// One build's events: everything so far (for late subscribers) plus a live channel.
pub struct BuildLog {
    /// Guards the replay buffer; pushing and subscribing both hold it, so a subscriber
    /// sees every event exactly once.
    state: Mutex<LogState>,
    tx: broadcast::Sender<TemplateBuildEvent>,
    file: PathBuf,
}

struct LogState {
    events: Vec<TemplateBuildEvent>,
    log_bytes: usize,
    /// Output bytes written to the log file, and whether the cap was reached.
    file_log_bytes: u64,
    file_capped: bool,
    finished: bool,
}

impl BuildLog {
    fn push(&self, ev: TemplateBuildEvent) {
        use std::io::Write;
        let mut st = self.state.lock().expect("not poisoned");
        let mut lines = Vec::new();
        match &ev {
            TemplateBuildEvent::Log { .. } if st.file_capped => {}
            TemplateBuildEvent::Log { index, text } => {
                st.file_log_bytes += text.len() as u64;
                if st.file_log_bytes <= MAX_LOG_FILE_BYTES {
                    lines.push(ev.clone());
                } else {
                    st.file_capped = true;
                    lines.push(TemplateBuildEvent::Log {
                        index: *index,
                        text: LOG_CAPPED_MARKER.into(),
                    });
                }
            }
            _ => lines.push(ev.clone()),
        }
        if !lines.is_empty()
            && let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.file)
        {
            for line in &lines {
                let _ = writeln!(
                    f,
                    "{}",
                    serde_json::to_string(line).expect("event serializes")
                );
            }
        }
        let keep = match &ev {
            TemplateBuildEvent::Log { text, .. } => {
                st.log_bytes += text.len();
                st.log_bytes <= MAX_REPLAY_LOG_BYTES
            }
            TemplateBuildEvent::Finished { .. } => {
                st.finished = true;
                true
            }
            _ => true,
        };
        if keep {
            st.events.push(ev.clone());
        }
        let _ = self.tx.send(ev);
    }
}

/// Events so far and, while the build runs, a receiver for the rest.
pub type Subscription = (
    Vec<TemplateBuildEvent>,
    Option<broadcast::Receiver<TemplateBuildEvent>>,
);

impl Builds {
    fn open(&self, id: &str, file: PathBuf) -> Arc<BuildLog> {
        let (tx, _) = broadcast::channel(1024);
        let log = Arc::new(BuildLog {
            state: Mutex::new(LogState {
                events: Vec::new(),
                log_bytes: 0,
                file_log_bytes: 0,
                file_capped: false,
                finished: false,
            }),
            tx,
            file,
        });
        self.live
            .lock()
            .expect("not poisoned")
            .insert(id.to_string(), log.clone());
        log
    }

    fn close(&self, id: &str) {
        self.live.lock().expect("not poisoned").remove(id);
    }

    /// Subscribe to a build's events: live if it runs, else from its log file.
    pub fn subscribe(&self, server: &Server, template_id: &str) -> Subscription {
        if let Some(log) = self
            .live
            .lock()
            .expect("not poisoned")
            .get(template_id)
            .cloned()
        {
            let st = log.state.lock().expect("not poisoned");
            return (
                st.events.clone(),
                (!st.finished).then(|| log.tx.subscribe()),
            );
        }
        // Bounded: the file's output is capped (a log written before the cap existed is read
        // only so far).
        let mut text = Vec::new();
        if let Ok(f) = std::fs::File::open(build_log_path(server, template_id)) {
            use std::io::Read;
            let _ = f
                .take(MAX_LOG_FILE_BYTES + (4 << 20))
                .read_to_end(&mut text);
        }
        let events = String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (events, None)
    }
}

fn template_dir(server: &Server, id: &str) -> PathBuf {
    server.cfg.data_dir.join("templates").join(id)
}

fn build_log_path(server: &Server, id: &str) -> PathBuf {
    template_dir(server, id).join("build.jsonl")
}

/// What clients see of a template.
pub async fn view(
    server: &Server,
    workspace_id: &str,
    t: TemplateRow,
) -> Result<Template, ControlError> {
    let warm = server
        .store
        .sandboxes
        .pooled_count(&server.node.cfg.node_id, &t.id)
        .await? as u32;
    // Shown as far as it decodes; creating from a template whose records do not decode
    // fails with `corrupt_record`.
    let cfg = sandpit_control::node::images::image_config(&t).unwrap_or_default();
    let layers: Vec<PathBuf> = serde_json::from_str(&t.layers).unwrap_or_default();
    // Whether the plain name means this version now (its highest ready one).
    let latest = server
        .store
        .templates
        .find(workspace_id, &t.name)
        .await?
        .is_some_and(|n| n.id == t.id);
    Ok(Template {
        version: t.version,
        latest,
        warm,
        boot_snapshot: server.cfg.boot_snapshots
            && sandpit_control::node::images::boot_snapshot(server, &t.id).is_some(),
        aliases: server
            .store
            .templates
            .aliases_of(workspace_id, &t.id)
            .await?,
        start_command: cfg.start_command(),
        layers: layers.len().max(1) as u32,
        status: t.status.to_string(),
        error: t.error,
        source: t.source,
        id: t.id,
        name: t.name,
        description: t.description,
        created_at: rfc3339(t.created_at),
        default_egress: serde_json::from_str(&t.default_egress)
            .unwrap_or_else(|_| crate::lifecycle::deny_all()),
    })
}

/// Validate a create request, register the template (status `building`) and start its
/// build in the background. Nothing is changed when validation fails.
pub async fn create(
    server: &Arc<Server>,
    workspace_id: &str,
    req: CreateTemplateRequest,
) -> Result<TemplateRow, ApiError> {
    catalog::check_name(&req.name)?;
    let dockerfile = match (&req.image, &req.dockerfile) {
        (Some(image), None) => {
            sandpit_image::registry::parse_reference(image)
                .map_err(|e| ApiError::bad_request("invalid_image", e.to_string()))?;
            format!("FROM {image}\n")
        }
        (None, Some(d)) => d.clone(),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_source",
                "give exactly one of image and dockerfile",
            ));
        }
    };
    // Parse now, so a bad Dockerfile is a 400 naming its line, not a failed build.
    sandpit_image::dockerfile::parse(&dockerfile)
        .map_err(|e| ApiError::bad_request("invalid_dockerfile", e.to_string()))?;
    if req.context.is_some() && req.dockerfile.is_none() {
        return Err(ApiError::bad_request(
            "invalid_source",
            "context goes with a dockerfile",
        ));
    }
    let context = match &req.context {
        Some(b64) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| {
                    ApiError::bad_request("invalid_context", format!("context is not base64: {e}"))
                })?;
            if bytes.len() > MAX_CONTEXT_BYTES {
                return Err(ApiError::new(
                    axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                    "context_too_large",
                    format!("the build context exceeds {} MiB", MAX_CONTEXT_BYTES >> 20),
                ));
            }
            Some(bytes)
        }
        None => None,
    };
    server.ensure_free_disk()?;
    catalog::check_quotas(server, workspace_id).await?;
    for p in [&req.default_egress, &req.build_egress]
        .into_iter()
        .flatten()
    {
        sandpit_control::node::boot::validate_egress(server, p)?;
    }
    for a in &req.aliases {
        catalog::parse_alias(a)?;
    }
    if let Some(sandpit_api_types::ReadyCheck::Port(0)) = req.ready {
        return Err(ApiError::bad_request(
            "invalid_ready",
            "ready port must be 1–65535",
        ));
    }
    let credentials = match &req.registry_auth {
        None => sandpit_image::RegistryCredentials::Anonymous,
        Some(a) => match (&a.username, &a.password, &a.token) {
            (Some(u), Some(p), None) => sandpit_image::RegistryCredentials::Basic {
                username: u.clone(),
                password: p.clone(),
            },
            (None, None, Some(t)) => sandpit_image::RegistryCredentials::Bearer(t.clone()),
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_registry_auth",
                    "registry_auth takes username and password, or token",
                ));
            }
        },
    };
    // The context is unpacked before the row exists, so a bad archive changes nothing. It
    // is the tenant's tree: unpacked through handles, within the archive limits.
    let images = server.images.clone();
    let context_dir = images.temp_path("context");
    {
        let dir = context_dir.clone();
        let unpacked = tokio::task::spawn_blocking(move || -> Result<(), ImageError> {
            let root = sandpit_fs::TreeDir::create(&dir).map_err(|e| ImageError::Tree {
                what: "creating the context".into(),
                source: e,
            })?;
            if let Some(bytes) = context {
                let reader = sandpit_image::unpack::decompress_bytes(bytes.into())?;
                sandpit_image::unpack::unpack_into(
                    reader,
                    &root,
                    sandpit_image::unpack::Whiteouts::Plain,
                    &sandpit_image::unpack::UnpackLimits::current(),
                )?;
            }
            Ok(())
        })
        .await
        .map_err(|e| ControlError::Internal(format!("context task: {e}")))?;
        if let Err(e) = unpacked {
            images.discard_temp(&context_dir);
            return Err(match e {
                ImageError::ArchiveTooLarge { limit } => ApiError::bad_request(
                    "archive_too_large",
                    format!("the build context is over the limit of {limit}"),
                ),
                e => ApiError::bad_request(
                    "invalid_context",
                    format!("the build context is not a readable tar archive: {e}"),
                ),
            });
        }
    }
    let now = now_ms();
    let mut row = TemplateRow {
        id: format!("tpl_{}", random_hex(8)),
        name: req.name.clone(),
        version: 0, // numbered by `register`
        workspace_id: Some(workspace_id.to_string()),
        description: req.description.clone(),
        rootfs: String::new(),
        default_egress: serde_json::to_string(
            &req.default_egress.clone().unwrap_or_else(allow_all),
        )
        .expect("serializes"),
        created_at: now,
        layers: "[]".into(),
        config: "{}".into(),
        status: TemplateStatus::Building,
        error: None,
        source: match &req.image {
            Some(i) => format!("image:{i}"),
            None => "dockerfile".into(),
        },
        updated_at: now,
    };
    match catalog::register(server, &row).await {
        Ok(version) => row.version = version,
        Err(e) => {
            images.discard_temp(&context_dir);
            return Err(e.into());
        }
    }
    let _ = std::fs::create_dir_all(template_dir(server, &row.id));
    let log = server.builds.open(&row.id, build_log_path(server, &row.id));
    let job = BuildJob {
        server: server.clone(),
        template: row.clone(),
        request: BuildRequest {
            context: context_dir,
            dockerfile,
            build_args: req.build_args.clone(),
            pull: sandpit_image::PullOptions {
                credentials,
                insecure_registries: server.cfg.insecure_registries.clone(),
                dialer: Some(
                    server
                        .net
                        .dialer()
                        .with_exceptions(server.cfg.allowed_registries.clone()),
                ),
            },
        },
        ready: req.ready.clone().map(|r| match r {
            sandpit_api_types::ReadyCheck::Port(p) => ReadyCheck::Port(p),
            sandpit_api_types::ReadyCheck::Command(c) => ReadyCheck::Command(c),
        }),
        build_egress: req.build_egress.clone().unwrap_or_else(allow_all),
        aliases: req.aliases.clone(),
        log,
    };
    tokio::spawn(job.run());
    Ok(row)
}

/// A build's lease on the layer store (see `sandpit_image::gc`): held from before its first
/// cache lookup until its result is in its row. Waits while a collection runs.
async fn build_lease(server: &Server) -> Result<sandpit_image::gc::BuildLease, String> {
    let images = server.images.clone();
    tokio::task::spawn_blocking(move || images.build_lease())
        .await
        .map_err(|e| format!("build lease task: {e}"))?
        .map_err(|e| DisplayChain(&e).to_string())
}

fn allow_all() -> EgressPolicy {
    serde_json::from_str(r#"{"mode":"allow_all"}"#).expect("valid policy")
}

struct BuildJob {
    server: Arc<Server>,
    template: TemplateRow,
    request: BuildRequest,
    ready: Option<ReadyCheck>,
    build_egress: EgressPolicy,
    aliases: Vec<String>,
    log: Arc<BuildLog>,
}

impl BuildJob {
    async fn run(self) {
        let started = Instant::now();
        let id = self.template.id.clone();
        if self.server.builds.permits.available_permits() == 0 {
            self.log.push(TemplateBuildEvent::Log {
                index: 0,
                text: format!("waiting: {CONCURRENT_BUILDS} other builds are running\n"),
            });
        }
        let permit = self.server.builds.permits.acquire().await;
        // Garbage collection waits for this build's layers to be recorded in its row.
        let result = match build_lease(&self.server).await {
            Ok(lease) => {
                let r = self.build().await;
                drop(lease);
                r
            }
            Err(e) => Err(e),
        };
        drop(permit);
        let (status, error) = match &result {
            Ok(()) => ("ready", None),
            Err(e) => ("failed", Some(e.clone())),
        };
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.server
            .metrics
            .builds
            .get_or_create(&sandpit_control::metrics::ResultLabels { result: outcome })
            .observe(started.elapsed().as_secs_f64());
        if let Some(e) = &error {
            tracing::warn!(template = %id, error = %e, "template build failed");
        } else {
            tracing::info!(template = %id, elapsed_ms = started.elapsed().as_millis() as u64, "template built");
        }
        if let Some(ws) = &self.template.workspace_id {
            let detail = serde_json::json!({
                "template": self.template.name,
                "template_id": id,
                "status": status,
                "error": error,
                "elapsed_ms": started.elapsed().as_millis() as u64,
            });
            if let Err(e) = self
                .server
                .store
                .events
                .append(ws, "build_finished", None, &detail, now_ms())
                .await
            {
                tracing::warn!(template = %id, error = %DisplayChain(&e), "appending an event");
            }
        }
        self.server.images.discard_temp(&self.request.context);
        self.log.push(TemplateBuildEvent::Finished {
            status: status.into(),
            error,
            elapsed_ms: started.elapsed().as_millis() as u64,
        });
        self.server.builds.close(&id);
    }

    /// Build, verify, record. The error is what the client sees.
    async fn build(&self) -> Result<(), String> {
        let server = &self.server;
        let runner = Arc::new(ServerRunner {
            server: server.clone(),
            workspace_id: self.template.workspace_id.clone().unwrap_or_default(),
            template_id: self.template.id.clone(),
            template_name: self.template.name.clone(),
            egress: serde_json::to_string(&self.build_egress).expect("serializes"),
        });
        let builder = Builder {
            store: server.images.clone(),
            runner,
        };
        let log = self.log.clone();
        let metrics_of = server.clone();
        let events = move |e: BuildEvent| {
            if let BuildEvent::StepDone { cached, .. } = &e {
                let result = if *cached { "cached" } else { "run" };
                metrics_of
                    .metrics
                    .build_steps
                    .get_or_create(&sandpit_control::metrics::ResultLabels { result })
                    .inc();
            }
            log.push(event(e))
        };
        let outcome = builder.build(&self.request, &events).await;
        let fail = |e: String| async move {
            let _ = server
                .store
                .templates
                .finish_build(
                    &self.template.id,
                    TemplateStatus::Failed,
                    "[]",
                    "{}",
                    Some(&e),
                    now_ms(),
                )
                .await;
            e
        };
        let mut outcome = match outcome {
            Ok(o) => o,
            Err(e) => return Err(fail(e.to_string()).await),
        };
        if self.ready.is_some() {
            outcome.config.ready = self.ready.clone();
        }
        let layers = serde_json::to_string(&outcome.layers).expect("serializes");
        let config = serde_json::to_string(&outcome.config).expect("serializes");
        // Layers first (status still `building`): the verification sandbox boots from them.
        server
            .store
            .templates
            .finish_build(
                &self.template.id,
                TemplateStatus::Building,
                &layers,
                &config,
                None,
                now_ms(),
            )
            .await
            .map_err(|e| DisplayChain(&e).to_string())?;
        if let Err(e) = self.verify(&outcome.config).await {
            return Err(fail(e).await);
        }
        server
            .store
            .templates
            .finish_build(
                &self.template.id,
                TemplateStatus::Ready,
                &layers,
                &config,
                None,
                now_ms(),
            )
            .await
            .map_err(|e| DisplayChain(&e).to_string())?;
        let ws = self.template.workspace_id.clone().unwrap_or_default();
        for a in &self.aliases {
            if let Ok((ns, alias)) = catalog::parse_alias(a) {
                let _ = server
                    .store
                    .templates
                    .set_alias(&ws, ns, alias, &self.template.id, now_ms())
                    .await;
            }
        }
        // Its layers go to object storage in the background, so any node can start it.
        if let Ok(Some(row)) = server.store.templates.by_id(&self.template.id).await {
            sandpit_control::node::stored::upload_layers(&server.node, &row);
        }
        Ok(())
    }

    /// With a start command or a ready check: boot the template once, start the command,
    /// wait for the check and, when boot snapshots are on, keep that moment as the
    /// template's boot snapshot (sandboxes then restore with the command already running).
    async fn verify(&self, cfg: &ImageConfig) -> Result<(), String> {
        if cfg.start_command().is_none() && cfg.ready.is_none() {
            return Ok(());
        }
        let server = &self.server;
        let index = u32::MAX;
        self.log.push(TemplateBuildEvent::Log {
            index,
            text: "starting the template's start command and waiting until it is ready\n".into(),
        });
        let started = Instant::now();
        let result =
            sandpit_control::node::templates::verify_start(&server.node, &self.template, cfg).await;
        match result {
            Ok(()) => {
                self.log.push(TemplateBuildEvent::Log {
                    index,
                    text: format!("ready after {} ms\n", started.elapsed().as_millis()),
                });
                Ok(())
            }
            Err(e) => Err(format!(
                "the template's start command did not become ready: {}",
                DisplayChain(&e)
            )),
        }
    }
}

fn event(e: BuildEvent) -> TemplateBuildEvent {
    match e {
        BuildEvent::Step {
            index,
            total,
            line,
            instruction,
        } => TemplateBuildEvent::Step {
            index: index as u32,
            total: total as u32,
            line: line as u32,
            instruction,
        },
        BuildEvent::Log { index, text } => TemplateBuildEvent::Log {
            index: index as u32,
            text,
        },
        BuildEvent::StepDone {
            index,
            cached,
            elapsed_ms,
        } => TemplateBuildEvent::StepDone {
            index: index as u32,
            cached,
            elapsed_ms,
        },
    }
}

/// Runs a build's `RUN` steps in gVisor sandboxes owned by the server (system workspace),
/// with the build's egress policy, and resolves `FROM <template>` in the owner's workspace.
struct ServerRunner {
    server: Arc<Server>,
    workspace_id: String,
    template_id: String,
    template_name: String,
    /// JSON egress policy of the builder sandboxes.
    egress: String,
}

#[async_trait]
impl StepRunner for ServerRunner {
    async fn template(
        &self,
        name: &str,
    ) -> Result<Option<(Vec<PathBuf>, ImageConfig)>, ImageError> {
        let found = match self
            .server
            .store
            .templates
            .find(&self.workspace_id, name)
            .await
        {
            Ok(found) => found,
            // Not a template reference (`FROM debian:bookworm`): a registry image.
            Err(ControlError::Invalid { .. }) => None,
            Err(e) => return Err(ImageError::Runner(DisplayChain(&e).to_string())),
        };
        let Some(t) = found.filter(|t| t.status == TemplateStatus::Ready) else {
            return Ok(None);
        };
        let decoded = sandpit_control::node::images::layers_of(&t)
            .and_then(|layers| Ok((layers, sandpit_control::node::images::image_config(&t)?)));
        decoded
            .map(Some)
            .map_err(|e| ImageError::Runner(DisplayChain(&e).to_string()))
    }

    async fn run(
        &self,
        step: RunStep,
        log: &(dyn Fn(String) + Send + Sync),
    ) -> Result<i32, ImageError> {
        let step = sandpit_control::node::templates::BuildStep {
            template_id: &self.template_id,
            template_name: &self.template_name,
            egress: &self.egress,
            layers: &step.layers,
            argv: &step.argv,
            workdir: &step.workdir,
            env: &step.env,
            out: &step.out,
            timeout: RUN_STEP_TIMEOUT,
        };
        sandpit_control::node::templates::run_build_step(&self.server.node, step, log)
            .await
            .map_err(|e| ImageError::Runner(DisplayChain(&e).to_string()))
    }
}

/// The built-in `toolchain` template (Debian with bash, python3, node, git), built on
/// demand by [`build_toolchain`] and cached as a layer.
pub const TOOLCHAIN_ID: &str = "tpl_toolchain";
pub const TOOLCHAIN_NAME: &str = "toolchain";

fn toolchain_config() -> String {
    let cfg = ImageConfig {
        env: vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("LANG".into(), "C.UTF-8".into()),
            ("HOME".into(), "/root".into()),
        ],
        ..Default::default()
    };
    serde_json::to_string(&cfg).expect("serializes")
}

/// Register the toolchain template at start: `ready` when its layer exists (built before,
/// same sources and packages), `not_built` otherwise.
pub async fn register_toolchain(server: &Server) -> Result<(), ControlError> {
    server
        .store
        .templates.upsert(&TemplateRow::builtin(
            TOOLCHAIN_ID,
            TOOLCHAIN_NAME,
            "Debian with bash, python3, node, git and common tools (built on demand from the host's apt sources)",
            String::new(),
            now_ms(),
        ))
        .await?;
    let existing = match sandpit_image::toolchain::layer_id() {
        Ok(id) if server.images.has_layer(&id) => Some(server.images.layer_path(&id)),
        _ => None,
    };
    let (status, layers) = match existing {
        Some(p) => (
            TemplateStatus::Ready,
            serde_json::to_string(&[p]).expect("serializes"),
        ),
        None => (TemplateStatus::NotBuilt, "[]".to_string()),
    };
    server
        .store
        .templates
        .finish_build(
            TOOLCHAIN_ID,
            status,
            &layers,
            &toolchain_config(),
            None,
            now_ms(),
        )
        .await
}

/// `POST /v1/templates/{id}/build` for a built-in template built on demand: start its
/// build unless it is built or building. Returns the row as it is now.
pub async fn build_builtin(
    server: &Arc<Server>,
    workspace_id: &str,
    name_or_id: &str,
) -> Result<TemplateRow, ApiError> {
    let t = catalog::find(server, workspace_id, name_or_id).await?;
    if t.id != TOOLCHAIN_ID {
        return Err(ApiError::bad_request(
            "not_buildable",
            "only built-in templates built on demand (toolchain) are built this way; create a new template to rebuild",
        ));
    }
    if server
        .store
        .templates
        .claim_build(
            TOOLCHAIN_ID,
            &[TemplateStatus::NotBuilt, TemplateStatus::Failed],
            &server.node.cfg.node_id,
            now_ms(),
        )
        .await?
    {
        let log = server
            .builds
            .open(TOOLCHAIN_ID, build_log_path(server, TOOLCHAIN_ID));
        let _ = std::fs::create_dir_all(template_dir(server, TOOLCHAIN_ID));
        let _ = std::fs::remove_file(build_log_path(server, TOOLCHAIN_ID));
        let server2 = server.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            // Garbage collection waits until the layer is recorded in the row.
            let lease = build_lease(&server2).await;
            log.push(TemplateBuildEvent::Step {
                index: 1,
                total: 1,
                line: 0,
                instruction: format!(
                    "mmdebstrap {} + {}",
                    sandpit_image::toolchain::host_suite().unwrap_or_default(),
                    sandpit_image::toolchain::PACKAGES.join(" ")
                ),
            });
            let sink = {
                let log = log.clone();
                move |text: String| log.push(TemplateBuildEvent::Log { index: 1, text })
            };
            let built = match &lease {
                Ok(_) => sandpit_image::toolchain::ensure(&server2.images, &sink).await,
                Err(e) => Err(ImageError::Runner(e.clone())),
            };
            let (status, layers, error) = match built {
                Ok(p) => (
                    TemplateStatus::Ready,
                    serde_json::to_string(&[p]).expect("serializes"),
                    None,
                ),
                Err(e) => (TemplateStatus::Failed, "[]".into(), Some(e.to_string())),
            };
            let _ = server2
                .store
                .templates
                .finish_build(
                    TOOLCHAIN_ID,
                    status,
                    &layers,
                    &toolchain_config(),
                    error.as_deref(),
                    now_ms(),
                )
                .await;
            drop(lease);
            let elapsed_ms = started.elapsed().as_millis() as u64;
            if error.is_none() {
                log.push(TemplateBuildEvent::StepDone {
                    index: 1,
                    cached: false,
                    elapsed_ms,
                });
            }
            tracing::info!(
                status = status.as_str(),
                elapsed_ms,
                "toolchain template build ended"
            );
            log.push(TemplateBuildEvent::Finished {
                status: status.as_str().into(),
                error,
                elapsed_ms,
            });
            server2.builds.close(TOOLCHAIN_ID);
        });
    }
    Ok(server
        .store
        .templates
        .by_id(TOOLCHAIN_ID)
        .await?
        .expect("registered at start"))
}
