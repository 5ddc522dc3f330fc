//! The sandbox state machine: create, suspend, wake, destroy, and access to a running
//! sandbox's agent. Every transition holds the sandbox's write lock; every agent operation
//! holds its read lock (see [`Server`]).
//!
//! ```text
//!   create ──► creating ──► running ◄──► suspended
//!                 │            │             │
//!                 ▼            ▼             ▼
//!               failed ──────► destroyed ◄───┘
//! ```
#![expect(
    clippy::disallowed_methods,
    reason = "checkpoint images and netns paths are host-owned"
)]

use crate::store::TemplateStatus;
use sandpit_control::{Status, Stored, Transition};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sandpit_api_types::{
    CreateSandboxRequest, EgressPolicy, MAX_EPHEMERAL_TIMEOUT_SECS, PreviewSettings, SandboxMode,
    ValidEgress, format_duration, parse_duration,
};
use sandpit_net::{EgressRules, Ipv4Net};
use sandpit_runtime::{NetworkAttachment, Resources, SandboxSpec};
use tokio::sync::OwnedRwLockReadGuard;

use sandpit_control::create::{self, Size};

use crate::error::{ApiError, ControlError, DisplayChain, decode};
use crate::extract::Authorized;
use crate::server::Server;
use crate::store::{Sandbox, SnapshotRow};
use crate::templates::AGENT_PATH_IN_SANDBOX;
use crate::util::{new_sandbox_id, now_ms, rfc3339};
use sandpit_control::agent::AgentClient;

/// The runtime's resources for a size preset (`sandpit_control::create::SIZES`).
pub fn size_resources(name: &str) -> Option<Resources> {
    Size::parse(name).map(|s| Resources {
        cpu_millis: s.cpu_millis,
        memory_bytes: s.memory_bytes,
        disk_bytes: None,
    })
}

/// The disk a sandbox of `size` gets when its files are first made: the server's
/// `disk_limit` for `small`, scaled by the size's memory for the others.
pub fn size_disk(server: &Server, size: &str) -> Option<u64> {
    let base = server.cfg.disk_limit?;
    let memory = size_resources(size).map_or(1 << 30, |r| r.memory_bytes);
    Some(base.saturating_mul((memory >> 30).max(1)))
}

/// The API view of a row.
pub fn to_api(row: &Sandbox) -> sandpit_api_types::Sandbox {
    // Display only: what a corrupt record shows is no default anything acts on (the
    // operations that need these records decode them fail-closed).
    let env: BTreeMap<String, String> = row.env.decode(String::new).unwrap_or_default();
    sandpit_api_types::Sandbox {
        id: row.id.clone(),
        status: row.status.to_api(),
        template: row.template_name.clone(),
        mode: row.mode,
        size: row.size.clone(),
        created_at: rfc3339(row.created_at),
        expires_at: row.expires_at.map(rfc3339),
        idle_timeout: row
            .idle_timeout_ms
            .map(|ms| format_duration(Duration::from_millis(ms as u64))),
        metadata: row.metadata.decode(String::new).unwrap_or_default(),
        env_keys: env.into_keys().collect(),
        // What is enforced: a policy that does not decode is treated as `deny_all` (see
        // [`rules_or_deny`]), never as the default `allow_all`.
        egress: row
            .egress
            .decode(String::new)
            .unwrap_or_else(|_| deny_all()),
        preview: PreviewSettings {
            privacy: row.preview_privacy,
        },
        error: row.error.clone(),
    }
}

pub fn egress_rules(v: &ValidEgress) -> EgressRules {
    let nets = |list: &[sandpit_api_types::Cidr]| {
        list.iter()
            .map(|c| Ipv4Net {
                addr: c.addr,
                prefix_len: c.prefix_len,
            })
            .collect()
    };
    EgressRules {
        allow_all: v.allow_all,
        allow_cidrs: nets(&v.allow_cidrs),
        deny_cidrs: nets(&v.deny_cidrs),
        allow_ports: v.allow_ports.clone(),
        allow_domains: v.allow_domains.clone(),
    }
}

/// A policy from a request: checked, with the server's pool in the always-denied set.
pub(crate) fn validate_egress(
    server: &Server,
    policy: &EgressPolicy,
) -> Result<ValidEgress, ApiError> {
    let pool = server.net.config().pool;
    policy
        .validate_within(Some(sandpit_api_types::Cidr {
            addr: pool.addr,
            prefix_len: pool.prefix_len,
        }))
        .map_err(|(code, m)| ApiError::bad_request(code, m))
}

pub(crate) fn stored_rules(row: &Sandbox) -> Result<EgressRules, ControlError> {
    let policy: EgressPolicy = row
        .egress
        .decode(|| format!("egress policy of {}", row.id))?;
    let valid = policy
        .validate_stored()
        .map_err(|(_, m)| ControlError::Internal(format!("egress of {}: {m}", row.id)))?;
    Ok(egress_rules(&valid))
}

/// How the `error` of a sandbox whose stored egress policy was replaced starts.
const EGRESS_RESET_NOTE: &str = "the stored egress policy could not be read";

/// The note a sandbox that has just (re)started keeps in its `error`: `note`, and the reason
/// its egress policy was reset to `deny_all` if that happened during the boot (the status
/// update that follows a boot would otherwise erase it).
pub(crate) async fn running_note(
    server: &Server,
    id: &str,
    note: Option<String>,
) -> Result<Option<String>, ControlError> {
    let reset = server
        .store
        .sandboxes
        .get(id)
        .await?
        .and_then(|r| r.error)
        .filter(|e| e.starts_with(EGRESS_RESET_NOTE));
    Ok(match (note, reset) {
        (Some(n), Some(r)) => Some(format!("{n}; {r}")),
        (n, r) => n.or(r),
    })
}

/// The `deny_all` policy.
pub fn deny_all() -> EgressPolicy {
    serde_json::from_str(r#"{"mode":"deny_all"}"#).expect("valid policy")
}

/// The rules of a sandbox's stored policy, failing closed: a policy that does not decode (or
/// no longer validates) is replaced in the store by `deny_all`, and the sandbox's `error`
/// says why, so what runs, what is stored and what the API shows agree.
pub(crate) async fn rules_or_deny(
    server: &Server,
    row: &Sandbox,
) -> Result<EgressRules, ControlError> {
    match stored_rules(row) {
        Ok(rules) => Ok(rules),
        Err(e) => {
            let why = format!(
                "{EGRESS_RESET_NOTE} ({}); it was set to deny_all",
                DisplayChain(&e)
            );
            tracing::error!(sandbox = %row.id, error = %DisplayChain(&e), "egress policy does not decode: denying all egress");
            let deny = Stored::encode(&deny_all());
            server
                .store
                .sandboxes
                .replace_egress(&row.id, &deny, &why, now_ms())
                .await?;
            let valid = deny_all().validate().expect("deny_all is valid");
            Ok(egress_rules(&valid))
        }
    }
}

/// Validate a create request into a row (not yet inserted). Changes nothing.
async fn validate_create(
    server: &Server,
    workspace_id: &str,
    req: &CreateSandboxRequest,
) -> Result<(Sandbox, Option<SnapshotRow>), ApiError> {
    // What the request alone decides, before any lookup.
    let now = now_ms();
    let defaults = create::Defaults {
        timeout: server.cfg.default_timeout,
        idle_timeout: server.cfg.default_idle_timeout,
    };
    let create::Lifetimes {
        timeout_ms,
        idle_timeout_ms,
        expires_at,
    } = create::check_request(req, &defaults, now)?;
    let snapshot = match &req.snapshot {
        Some(snap_id) => Some(
            server
                .store
                .snapshots
                .get(workspace_id, snap_id)
                .await?
                .ok_or_else(|| {
                    ApiError::not_found("snapshot_not_found", format!("no snapshot {snap_id:?}"))
                })?,
        ),
        None => None,
    };
    let size = req
        .size
        .clone()
        .or_else(|| snapshot.as_ref().map(|s| s.size.clone()))
        .unwrap_or_else(|| "small".into());
    // A snapshot's own size, checked like a request's.
    Size::checked(&size)?;
    let template = server
        .store
        .templates
        .find(
            workspace_id,
            snapshot
                .as_ref()
                .map(|s| s.template_id.as_str())
                .unwrap_or(&req.template),
        )
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "template_not_found",
                format!("no template {:?}", req.template),
            )
        })?;
    if template.status != TemplateStatus::Ready {
        return Err(ApiError::conflict(
            "template_not_ready",
            if template.status == TemplateStatus::NotBuilt {
                format!(
                    "template {:?} is built on demand: POST /v1/templates/{}/build (or `sandpit template build-builtin {}`) first",
                    req.template, template.name, template.name
                )
            } else {
                format!("template {:?} is {}", req.template, template.status)
            },
        ));
    }
    // Stored records fail closed: one that does not decode is a 500 `corrupt_record`, never
    // a default (the default policy is `allow_all`).
    let egress = match (&req.egress, &snapshot) {
        (Some(p), _) => p.clone(),
        (None, Some(snap)) => decode(
            || format!("egress policy of snapshot {}", snap.id),
            &snap.egress,
        )?,
        (None, None) => decode(
            || format!("default egress policy of template {}", template.id),
            &template.default_egress,
        )?,
    };
    let env: BTreeMap<String, String> = match &snapshot {
        Some(snap) if req.env.is_empty() => {
            decode(|| format!("environment of snapshot {}", snap.id), &snap.env)?
        }
        // The template's image environment (PATH and the like), then the request's.
        _ => crate::templates::image_config(&template)?
            .env
            .into_iter()
            .chain(req.env.clone())
            .collect(),
    };
    validate_egress(server, &egress)?;
    let id = new_sandbox_id();
    let row = Sandbox {
        runtime_id: format!("{}-{}", server.cfg.prefix, id),
        id,
        workspace_id: workspace_id.to_string(),
        template_id: template.id,
        template_name: template.name,
        mode: req.mode,
        status: Status::Creating,
        size,
        env: Stored::encode(&env),
        metadata: Stored::encode(&req.metadata),
        egress: Stored::encode(&egress),
        timeout_ms,
        idle_timeout_ms,
        expires_at,
        last_active_at: now,
        slot: None,
        error: None,
        created_at: now,
        updated_at: now,
        preview_privacy: req.preview.unwrap_or_default().privacy,
    };
    Ok((row, snapshot))
}

/// The running quota a workspace's rows are held to in the store: the configured one for
/// tenants, none for the server's own sandboxes (warm pool, builds, boot snapshots).
pub(crate) fn running_quota(server: &Server, workspace: &str) -> u32 {
    if workspace == crate::pool::POOL_WORKSPACE {
        0
    } else {
        server.limits.cfg.max_running
    }
}

/// Claim the lowest free network slot by inserting the row that holds it. The insert is the
/// authoritative running-quota check (`Sandboxes::insert_admitted`: under the workspace's
/// admission lock in the store, so it holds across servers sharing a database); the
/// in-process `Limits::admit` before it answers early, with the SDK's headers.
pub(crate) async fn insert_with_slot(
    server: &Server,
    row: &mut Sandbox,
) -> Result<(), ControlError> {
    let _guard = server.slot_lock.lock().await;
    row.slot = Some(lowest_free_slot(server).await?);
    let quota = running_quota(server, &row.workspace_id);
    server.store.sandboxes.insert_admitted(row, quota).await
}

/// The lowest network slot no row holds; `NoSlot` when every one is taken. Call with
/// `slot_lock` held, up to the store write that takes the slot.
async fn lowest_free_slot(server: &Server) -> Result<i64, ControlError> {
    let used: std::collections::HashSet<i64> = server
        .store
        .sandboxes
        .used_slots()
        .await?
        .into_iter()
        .collect();
    (0..server.net.capacity() as i64)
        .find(|s| !used.contains(s))
        .ok_or(ControlError::NoSlot)
}

/// Claim the lowest free network slot for an existing row that holds none (a suspended
/// sandbox waking). `NoSlot` (503 `capacity_exhausted`) when every slot is taken.
async fn claim_slot(server: &Server, row: &mut Sandbox) -> Result<(), ControlError> {
    let _guard = server.slot_lock.lock().await;
    let slot = lowest_free_slot(server).await?;
    let quota = running_quota(server, &row.workspace_id);
    server
        .store
        .sandboxes
        .claim_slot_admitted(row, slot, quota, now_ms())
        .await?;
    row.slot = Some(slot);
    Ok(())
}

/// Record a stopped sandbox as suspended, with `note` in its `error`, and give its network
/// slot back (namespace, veth and nftables chain go): a suspended sandbox holds no slot,
/// otherwise one tenant's hibernated sandboxes could hold every slot and starve every other
/// tenant's creates. The wake claims a free slot and restores into it. If the namespace
/// cannot be removed now, the sandbox keeps its slot (the wake reuses it; a restart's
/// reconciliation removes it). The caller holds the sandbox's write lock.
async fn mark_suspended(
    server: &Server,
    row: &Sandbox,
    note: Option<&str>,
) -> Result<(), ControlError> {
    let now = now_ms();
    if let Some(slot) = row.slot
        && let Err(e) = server.net.detach(slot as u32).await
    {
        tracing::error!(sandbox = %row.id, error = %DisplayChain(&e), "removing a suspended sandbox's network slot; it keeps the slot");
        return server
            .store
            .sandboxes
            .transition(&row.id, Transition::Suspend, note, now)
            .await;
    }
    server
        .store
        .sandboxes
        .mark_suspended(&row.id, note, now)
        .await
}

/// Give a stopped sandbox's network slot back: its namespace goes and its row holds none.
/// A suspended sandbox holds no slot; waking claims one ([`wake`]).
async fn release_slot(server: &Server, row: &Sandbox) -> Result<(), ControlError> {
    if let Some(slot) = row.slot {
        server.net.detach(slot as u32).await?;
    }
    server.store.sandboxes.release_slot(&row.id, now_ms()).await
}

/// The spec the runtime boots or restores a sandbox from.
pub(crate) async fn spec_for(server: &Server, row: &Sandbox) -> Result<SandboxSpec, ControlError> {
    let template = server
        .store
        .templates
        .by_id(&row.template_id)
        .await?
        .ok_or_else(|| {
            ControlError::Internal(format!(
                "template {} of {} is gone",
                row.template_id, row.id
            ))
        })?;
    let slot = row
        .slot
        .ok_or_else(|| ControlError::Internal(format!("sandbox {} has no network slot", row.id)))?;
    let addrs = server.net.addrs(slot as u32);
    // The sandbox's own environment is sent with every exec (see `exec_env`), not baked
    // into the init process: a memory image or a pooled sandbox can then serve any owner.
    let env = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        "HOME=/root".to_string(),
    ];
    Ok(SandboxSpec {
        id: row.runtime_id.clone(),
        layers: crate::templates::layers_of(&template)?
            .into_iter()
            .chain([server.agent_layer.clone()])
            .collect(),
        state_dir: server.state_dir(&row.id),
        args: vec![AGENT_PATH_IN_SANDBOX.to_string()],
        env,
        hostname: "sandbox".into(),
        network: Some(NetworkAttachment {
            netns_path: addrs.netns_path.clone(),
            ifname: addrs.sandbox_if.clone(),
            address: addrs.sandbox_ip,
            prefix_len: addrs.prefix_len,
            gateway: addrs.host_ip,
        }),
        resources: Resources {
            disk_bytes: size_disk(server, &row.size),
            ..size_resources(&row.size).unwrap_or(Resources {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
                disk_bytes: None,
            })
        },
    })
}

/// The environment of an exec: the sandbox's own (set at create) with the request's on top.
/// A stored environment that does not decode fails the exec (`corrupt_record`) rather than
/// run it without the variables its owner set.
pub fn exec_env(
    row: &Sandbox,
    request: Vec<(String, String)>,
) -> Result<Vec<(String, String)>, ControlError> {
    let mut env: BTreeMap<String, String> =
        row.env.decode(|| format!("environment of {}", row.id))?;
    env.insert("SANDPIT_SANDBOX_ID".into(), row.id.clone());
    env.extend(request);
    Ok(env.into_iter().collect())
}

pub fn agent_of(server: &Server, row: &Sandbox) -> Option<AgentClient> {
    row.slot
        .map(|s| AgentClient::new(&row.id, server.net.addrs(s as u32).sandbox_ip))
}

/// Boot (or restore, when `image` is given) a sandbox whose row exists and whose slot is
/// claimed, and wait for its agent. On failure, releases what it took (runtime, network).
pub(crate) async fn boot(
    server: &Server,
    row: &Sandbox,
    image: Option<&std::path::Path>,
) -> Result<(), ControlError> {
    match boot_once(server, row, image).await {
        // Seen once under heavy load: a restore whose agent never answered over the
        // namespace kept from before the suspend. The failed attempt removed the namespace;
        // a second restore gets a fresh one.
        Err(e) if image.is_some() => {
            tracing::warn!(sandbox = %row.id, error = %DisplayChain(&e), "restore failed; retrying once with a rebuilt network");
            boot_once(server, row, image).await
        }
        other => other,
    }
}

async fn boot_once(
    server: &Server,
    row: &Sandbox,
    image: Option<&std::path::Path>,
) -> Result<(), ControlError> {
    let spec = spec_for(server, row).await?;
    boot_spec(server, row, &spec, image).await
}

/// [`boot`] from a given spec (a template build boots over its own layers), without retry.
pub(crate) async fn boot_spec(
    server: &Server,
    row: &Sandbox,
    spec: &SandboxSpec,
    image: Option<&std::path::Path>,
) -> Result<(), ControlError> {
    let slot = row.slot.expect("spec_for checked the slot") as u32;
    let rules = rules_or_deny(server, row).await?;
    match server.net.attach(slot, &rules).await {
        Ok(_) => {}
        // Kept from before a suspend: make sure it carries the current policy.
        Err(sandpit_net::NetError::SlotBusy { .. })
            if server.net.addrs(slot).netns_path.exists() =>
        {
            server.net.set_egress(slot, &rules).await?
        }
        // Half of it is gone (a host reboot takes the namespace but the store remembers
        // the slot): rebuild it.
        Err(sandpit_net::NetError::SlotBusy { .. }) => {
            server.net.detach(slot).await?;
            server.net.attach(slot, &rules).await?;
        }
        Err(e) => return Err(e.into()),
    }
    let started = match image {
        Some(dir) => server.runtime.restore(spec, dir).await,
        None => server.runtime.start(spec).await,
    };
    let result = match started {
        Ok(()) if image.is_some() => wait_restored_agent(server, row, spec).await,
        Ok(()) => agent_of(server, row)
            .expect("slot checked")
            .wait_ready(server.cfg.agent_ready_timeout)
            .await
            .map(|_| ()),
        Err(e) => Err(e.into()),
    };
    if let Err(e) = &result {
        if matches!(e, ControlError::AgentTimeout { .. }) {
            let state = server
                .runtime
                .diagnose(&row.runtime_id, &spec.state_dir)
                .await;
            tracing::warn!(sandbox = %row.id, restore = image.is_some(), %state, "the agent did not answer");
        }
        let _ = server.runtime.stop(&row.runtime_id, &spec.state_dir).await;
        let _ = server.net.detach(slot).await;
    }
    result
}

/// The command name of the agent's server process (a re-exec of `/proc/self/exe`), the
/// child its PID 1 restarts when it dies.
const AGENT_SERVE_COMM: &str = "exe";

/// Wait for a restored sandbox's agent. Seen under load: a restored sandbox, alive, whose
/// agent never answers (the same image again restores deaf). Its init still works, so after
/// half the wait the agent's server process is killed; init starts a new one and the
/// sandbox's memory is kept.
async fn wait_restored_agent(
    server: &Server,
    row: &Sandbox,
    spec: &SandboxSpec,
) -> Result<(), ControlError> {
    let agent = agent_of(server, row).expect("slot checked");
    let half = server.cfg.agent_ready_timeout / 2;
    let first = match agent.wait_ready(half).await {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let state = server
        .runtime
        .diagnose(&row.runtime_id, &spec.state_dir)
        .await;
    tracing::warn!(sandbox = %row.id, error = %DisplayChain(&first), %state, "restored agent does not answer; restarting it");
    match server
        .runtime
        .kill_init_children(&row.runtime_id, AGENT_SERVE_COMM)
        .await
    {
        Ok(0) | Err(_) => return Err(first),
        Ok(_) => {}
    }
    agent.wait_ready(half).await?;
    tracing::info!(sandbox = %row.id, "the restarted agent answers; memory kept");
    Ok(())
}

/// Write a new sandbox's `/etc/resolv.conf` through its agent (only at create: a sandbox
/// that later boots again keeps whatever it has, edits included).
pub(crate) async fn write_resolv_conf(server: &Server, row: &Sandbox) -> Result<(), ControlError> {
    let body = futures::stream::iter([Ok::<_, std::convert::Infallible>(bytes::Bytes::from(
        server.resolv_conf.clone(),
    ))]);
    agent_of(server, row)
        .expect("slot checked")
        .write_file("/etc/resolv.conf", body, 1 << 16)
        .await
        .map(drop)
        .map_err(|f| ControlError::Agent {
            sandbox: row.id.clone(),
            what: format!("writing /etc/resolv.conf: {f:?}"),
        })
}

/// Start a new sandbox from its template: restore the template's boot snapshot when there is
/// one (and they are enabled), otherwise boot cold.
/// Returns true when it restored (the template's start command then already runs).
async fn boot_template(server: &Server, row: &Sandbox) -> Result<bool, ControlError> {
    if server.cfg.boot_snapshots
        && let Some(dir) = crate::templates::boot_snapshot(server, &row.template_id)
    {
        server
            .runtime
            .copy_files(&dir.join("files"), &server.state_dir(&row.id))
            .await?;
        match boot(server, row, Some(&dir.join("memory"))).await {
            Ok(()) => return Ok(true),
            Err(e) => {
                tracing::warn!(sandbox = %row.id, error = %DisplayChain(&e), "restoring the template's boot snapshot failed; booting cold");
            }
        }
    }
    boot(server, row, None).await.map(|()| false)
}

/// `POST /v1/sandboxes`: validate, claim a slot, boot, wait for the agent.
pub async fn create(
    server: &Arc<Server>,
    workspace_id: &str,
    req: &CreateSandboxRequest,
) -> Result<Sandbox, ApiError> {
    let (mut row, snapshot) = validate_create(server, workspace_id, req).await?;
    server.ensure_free_disk()?;
    // Held until the row is in the store, which then counts it as running.
    let mut reservation = server
        .limits
        .admit(
            &server.store,
            workspace_id,
            1,
            req.mode == SandboxMode::Persistent,
        )
        .await?;
    if snapshot.is_none()
        && let Some(pooled) = crate::pool::take(server, &row, &mut reservation).await?
    {
        return Ok(pooled);
    }
    let lock = server.lock_of(&row.id);
    let _guard = lock.write().await;
    server
        .limits
        .fill(
            &mut reservation,
            insert_with_slot(server, &mut row),
            |r: &Result<(), _>| r.is_ok() as u32,
        )
        .await?;
    drop(reservation);
    crate::faults::point("create.inserted");
    let started = std::time::Instant::now();
    let booted = match &snapshot {
        Some(snap) => crate::fork::boot_from_snapshot(server, &row, snap).await,
        None => match boot_template(server, &row).await {
            Ok(false) => {
                // Booted cold: start the template's start command (if it has one).
                match write_resolv_conf(server, &row).await {
                    Ok(()) => crate::templates::start_and_wait(server, &row).await,
                    Err(e) => Err(e),
                }
            }
            Ok(true) => write_resolv_conf(server, &row).await,
            Err(e) => Err(e),
        },
    };
    let booted = match (booted, &snapshot) {
        (Ok(()), Some(_)) => write_resolv_conf(server, &row).await,
        (other, _) => other,
    };
    if let Err(e) = booted {
        tracing::error!(sandbox = %row.id, error = %DisplayChain(&e), "create failed");
        // The slot too: boot releases it on its own failures, not when a later step fails
        // (detach is idempotent).
        server
            .teardown(&row.id, &row.runtime_id, row.slot.map(|s| s as u32))
            .await;
        server
            .store
            .sandboxes
            .mark_failed(
                &row.id,
                &format!("could not start: {}", DisplayChain(&e)),
                now_ms(),
            )
            .await?;
        return Err(e.into());
    }
    crate::faults::point("create.booted");
    let now = now_ms();
    server
        .store
        .sandboxes
        .transition(&row.id, Transition::Started, None, now)
        .await?;
    tracing::info!(sandbox = %row.id, elapsed_ms = started.elapsed().as_millis() as u64, "sandbox running");
    row.status = Status::Running;
    Ok(row)
}

/// The current row of a sandbox the caller was authorized for (see [`Authorized`]); 404 if
/// it is gone.
pub async fn current(server: &Server, sb: &Authorized) -> Result<Sandbox, ApiError> {
    let row = existing(server, sb.id()).await?;
    if row.workspace_id != sb.workspace_id() {
        // A tenant's sandbox never changes workspace; never act on one that did.
        return Err(ControlError::Internal(format!("sandbox {} changed workspace", row.id)).into());
    }
    Ok(row)
}

/// Destroy a sandbox: idempotent, works in every state.
pub async fn destroy(server: &Arc<Server>, id: &str) -> Result<(), ApiError> {
    // A running exec holds the read lock: end it rather than wait for it.
    server.cancel_of(id).cancel();
    let guard = server.lock_of(id).write_owned().await;
    destroy_locked(server, id, guard).await
}

/// The reaper's destroy: skipped (until its next round) while an exec or file transfer holds
/// the sandbox, so one busy sandbox never stalls the reaper.
pub async fn destroy_if_free(server: &Arc<Server>, id: &str) -> Result<bool, ApiError> {
    let Ok(guard) = server.lock_of(id).try_write_owned() else {
        return Ok(false);
    };
    destroy_locked(server, id, guard).await.map(|()| true)
}

async fn destroy_locked(
    server: &Arc<Server>,
    id: &str,
    guard: tokio::sync::OwnedRwLockWriteGuard<()>,
) -> Result<(), ApiError> {
    let Some(row) = server.store.sandboxes.get(id).await? else {
        return Ok(());
    };
    if row.status == Status::Destroyed {
        return Ok(());
    }
    server.previews.cut(id).await;
    server
        .teardown(&row.id, &row.runtime_id, row.slot.map(|s| s as u32))
        .await;
    crate::faults::point("destroy.torn_down");
    server.store.sandboxes.mark_destroyed(id, now_ms()).await?;
    drop(guard);
    server.forget_lock(id);
    tracing::info!(sandbox = %id, "destroyed");
    Ok(())
}

/// What a client is told about a sandbox that died under it.
pub const STOPPED_REASON: &str =
    "the sandbox stopped unexpectedly: it hit its memory or process limit, or was killed";

/// After an agent operation failed: if the sandbox's runtime has stopped (killed by its
/// memory or process limit, or from outside), settle its row the way a restart would
/// (`Server::reconcile`): an ephemeral sandbox is torn down and failed with the reason, a
/// persistent one is suspended with its files. Returns the error for the client, or `None`
/// when the sandbox still runs. Takes the write lock: the caller must hold no guard.
pub async fn settle_if_dead(server: &Arc<Server>, id: &str) -> Option<ApiError> {
    let _guard = server.lock_of(id).write_owned().await;
    let row = server.store.sandboxes.get(id).await.ok()??;
    if row.status != Status::Running {
        return None;
    }
    match server.runtime.status(&row.runtime_id).await {
        Ok(sandpit_runtime::RuntimeStatus::Running) => return None,
        Err(e) => {
            tracing::error!(sandbox = %id, error = %DisplayChain(&e), "checking whether the sandbox runs");
            return None;
        }
        Ok(_) => {}
    }
    tracing::warn!(sandbox = %id, mode = row.mode.as_str(), "the sandbox died");
    server.previews.cut(id).await;
    let now = now_ms();
    let settled = if sandpit_control::recovery::after_death(row.mode)
        == sandpit_control::recovery::Recovery::SuspendLost
    {
        // The files are on disk; the network slot goes (a suspended sandbox holds none).
        if let Err(e) = server
            .runtime
            .stop(&row.runtime_id, &server.state_dir(id))
            .await
        {
            tracing::error!(sandbox = %id, error = %DisplayChain(&e), "stopping a dead sandbox");
        }
        mark_suspended(server, &row, Some(STOPPED_REASON)).await
    } else {
        server
            .teardown(&row.id, &row.runtime_id, row.slot.map(|s| s as u32))
            .await;
        server
            .store
            .sandboxes
            .mark_failed(id, STOPPED_REASON, now)
            .await
    };
    if let Err(e) = settled {
        tracing::error!(sandbox = %id, error = %DisplayChain(&e), "recording a dead sandbox");
    }
    Some(stopped_error())
}

/// 409 `sandbox_stopped`: the sandbox died under the request.
pub fn stopped_error() -> ApiError {
    ApiError::conflict("sandbox_stopped", STOPPED_REASON)
}

/// A sandbox by id, or 404 (callers have checked the workspace already).
async fn existing(server: &Server, id: &str) -> Result<Sandbox, ApiError> {
    server
        .store
        .sandboxes
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found("sandbox_not_found", format!("no sandbox {id:?}")))
}

/// Stop a sandbox without saving its memory (status `suspended`): the next wake boots it
/// afresh with its files. A memory image from an earlier suspend is discarded.
pub async fn shutdown(server: &Arc<Server>, id: &str) -> Result<Sandbox, ApiError> {
    let lock = server.lock_of(id);
    let _guard = lock.write().await;
    let row = existing(server, id).await?;
    if !matches!(row.status, Status::Running | Status::Suspended) {
        return Err(ApiError::conflict(
            "invalid_state",
            format!("a {} sandbox cannot be shut down", row.status),
        ));
    }
    server
        .runtime
        .stop(&row.runtime_id, &server.state_dir(id))
        .await
        .map_err(ControlError::from)?;
    let image = server.checkpoint_dir(id);
    if image.exists() {
        std::fs::remove_dir_all(&image).map_err(|source| ControlError::Files {
            what: format!("removing the memory image of {id}"),
            source,
        })?;
    }
    mark_suspended(
        server,
        &row,
        Some("shut down: the next start boots afresh with its files"),
    )
    .await?;
    tracing::info!(sandbox = %id, "shut down");
    existing(server, id).await
}

/// 507 `quota_exceeded` when hibernating or shutting down `sb` would pass its workspace's
/// `max_suspended` (a running ephemeral sandbox; persistent ones count from their create).
pub async fn check_may_suspend(server: &Server, sb: &Authorized) -> Result<(), ApiError> {
    let row = current(server, sb).await?;
    if row.mode == SandboxMode::Persistent || row.status != Status::Running {
        return Ok(());
    }
    server
        .limits
        .check_suspendable(&server.store, sb.workspace_id(), 1)
        .await
}

/// Save a running sandbox's memory to disk and stop it, freeing its RAM.
pub async fn suspend(server: &Arc<Server>, id: &str) -> Result<Sandbox, ApiError> {
    let lock = server.lock_of(id);
    let guard = lock.write_owned().await;
    suspend_locked(server, id, guard).await
}

/// The reaper's suspend: only if the sandbox is still idle and nothing holds it (a running
/// exec or file transfer counts as activity). Returns whether it was suspended.
pub async fn suspend_if_idle(server: &Arc<Server>, id: &str) -> Result<bool, ApiError> {
    let Ok(guard) = server.lock_of(id).try_write_owned() else {
        server.store.sandboxes.touch(id, now_ms()).await?;
        return Ok(false);
    };
    let row = existing(server, id).await?;
    let idle_for = now_ms() - row.last_active_at;
    if row.status != Status::Running || row.idle_timeout_ms.is_none_or(|t| idle_for < t) {
        return Ok(false);
    }
    suspend_locked(server, id, guard).await.map(|_| true)
}

async fn suspend_locked(
    server: &Arc<Server>,
    id: &str,
    _guard: tokio::sync::OwnedRwLockWriteGuard<()>,
) -> Result<Sandbox, ApiError> {
    let row = existing(server, id).await?;
    match row.status {
        Status::Suspended => return Ok(row),
        Status::Running => {}
        other => {
            return Err(ApiError::conflict(
                "invalid_state",
                format!("a {other} sandbox cannot be suspended"),
            ));
        }
    }
    let started = std::time::Instant::now();
    // Preview connections hold no lock (see `crate::preview`); cut them so no connected TCP
    // endpoint makes the checkpoint fail.
    server.previews.cut(id).await;
    let image = server.checkpoint_dir(id);
    let state_dir = server.state_dir(id);
    let mut note = None;
    if let Err(e) = server.runtime.checkpoint(&row.runtime_id, &image).await {
        // The runtime may have killed the sandbox; its files are on disk either way. The
        // next wake boots it afresh.
        tracing::error!(sandbox = %id, error = %DisplayChain(&e), "checkpoint failed; suspending without memory");
        let _ = std::fs::remove_dir_all(&image);
        note = Some(format!(
            "memory snapshot failed ({}); files were kept",
            DisplayChain(&e)
        ));
        // A successful checkpoint has stopped the sandbox already; a failed one may not have.
        server
            .runtime
            .stop(&row.runtime_id, &state_dir)
            .await
            .map_err(ControlError::from)?;
    }
    crate::faults::point("hibernate.checkpointed");
    mark_suspended(server, &row, note.as_deref()).await?;
    tracing::info!(sandbox = %id, elapsed_ms = started.elapsed().as_millis() as u64, "suspended");
    Ok(server.store.sandboxes.get(id).await?.unwrap_or(row))
}

/// Restore a suspended sandbox (or boot it with its files if no memory image exists).
pub async fn wake(server: &Arc<Server>, id: &str) -> Result<Sandbox, ApiError> {
    let lock = server.lock_of(id);
    let _guard = lock.write().await;
    let row = existing(server, id).await?;
    match row.status {
        Status::Running => return Ok(row),
        Status::Suspended => {}
        other => {
            return Err(ApiError::conflict(
                "invalid_state",
                format!("a {other} sandbox cannot be woken"),
            ));
        }
    }
    // A woken sandbox runs again: it counts against the running quota like a new one.
    let mut room = server
        .limits
        .admit_wake(&server.store, &row.workspace_id)
        .await?;
    let mut row = row;
    // Suspended sandboxes hold no network slot: claim a free one (503 `capacity_exhausted`
    // when none is, and the sandbox stays suspended, intact). A row from before slots were
    // released on suspend may still hold one.
    if row.slot.is_none() {
        claim_slot(server, &mut row).await?;
    }
    let started = std::time::Instant::now();
    let image = server.checkpoint_dir(id);
    let has_image = server.runtime.has_image(&image);
    let mut lost_memory = None;
    if let Err(e) = boot(server, &row, has_image.then_some(image.as_path())).await {
        if !has_image {
            tracing::error!(sandbox = %id, error = %DisplayChain(&e), "wake failed");
            release_slot(server, &row).await?;
            return Err(e.into());
        }
        // The memory image would not come back (twice). The files are intact: start the
        // sandbox from them rather than leave it unusable, and say what was lost.
        tracing::error!(sandbox = %id, error = %DisplayChain(&e), "restore failed; starting the sandbox from its files");
        if let Err(e2) = boot(server, &row, None).await {
            tracing::error!(sandbox = %id, error = %DisplayChain(&e2), "wake failed");
            release_slot(server, &row).await?;
            return Err(e2.into());
        }
        lost_memory = Some(format!(
            "the memory snapshot could not be restored ({}); the sandbox was started from its files and its processes were lost",
            DisplayChain(&e)
        ));
    }
    crate::faults::point("wake.restored");
    if has_image {
        let _ = std::fs::remove_dir_all(&image);
    }
    let now = now_ms();
    let note = running_note(server, id, lost_memory).await?;
    server
        .limits
        .fill(
            &mut room,
            server
                .store
                .sandboxes
                .transition(id, Transition::Wake, note.as_deref(), now),
            |r: &Result<(), _>| r.is_ok() as u32,
        )
        .await?;
    server.store.sandboxes.touch(id, now).await?;
    tracing::info!(sandbox = %id, elapsed_ms = started.elapsed().as_millis() as u64, restored = has_image, "woken");
    Ok(server.store.sandboxes.get(id).await?.unwrap_or(row))
}

/// A running sandbox's agent, with the sandbox's read lock held for the operation. Wakes a
/// suspended sandbox first; 409 for sandboxes that cannot run.
pub async fn running_agent(
    server: &Arc<Server>,
    sb: &Authorized,
) -> Result<(AgentClient, OwnedRwLockReadGuard<()>, Sandbox), ApiError> {
    let id = sb.id();
    for _ in 0..3 {
        let row = current(server, sb).await?;
        match row.status {
            Status::Running => {
                let guard = server.lock_of(id).read_owned().await;
                // Re-check under the lock: a transition may have run meanwhile.
                let row = current(server, sb).await?;
                if row.status != Status::Running {
                    continue;
                }
                server.store.sandboxes.touch(id, now_ms()).await?;
                let agent = agent_of(server, &row).ok_or_else(|| {
                    ControlError::Internal(format!("running sandbox {id} has no slot"))
                })?;
                return Ok((agent, guard, row));
            }
            Status::Suspended => {
                wake(server, id).await?;
            }
            other => {
                return Err(ApiError::conflict(
                    "sandbox_not_running",
                    format!("the sandbox is {other}"),
                ));
            }
        }
    }
    Err(ApiError::conflict(
        "sandbox_busy",
        "the sandbox changed state during the request; retry",
    ))
}

/// Replace a sandbox's egress policy: validated like at create (400, nothing changed), then
/// stored; applied at once to a running sandbox, and on wake to a suspended one (wake attaches
/// the network with the stored rules). 409 for sandboxes that will never run again.
///
/// Holds the sandbox's read lock, so no transition (which would attach or detach the network
/// with the rules it read) runs in between, while execs and file transfers continue.
pub async fn set_egress(
    server: &Arc<Server>,
    sb: &Authorized,
    policy: &EgressPolicy,
) -> Result<Sandbox, ApiError> {
    let id = sb.id();
    let valid = validate_egress(server, policy)?;
    let lock = server.lock_of(id);
    let _guard = lock.read().await;
    let _serial = server.egress_lock.lock().await;
    let row = current(server, sb).await?;
    if !matches!(row.status, Status::Running | Status::Suspended) {
        return Err(ApiError::conflict(
            "invalid_state",
            format!(
                "the egress policy of a {} sandbox cannot change",
                row.status
            ),
        ));
    }
    let now = now_ms();
    let stored = Stored::encode(policy);
    server.store.sandboxes.set_egress(id, &stored, now).await?;
    let json = stored.raw();
    if row.status == Status::Running {
        let slot = row
            .slot
            .ok_or_else(|| ControlError::Internal(format!("running sandbox {id} has no slot")))?;
        server
            .net
            .set_egress(slot as u32, &egress_rules(&valid))
            .await
            .map_err(ControlError::from)?;
    }
    tracing::info!(sandbox = %id, egress = %json, applied = row.status == Status::Running, "egress policy changed");
    Ok(server.store.sandboxes.get(id).await?.unwrap_or(row))
}

/// Change a sandbox's preview privacy. Applies to the next request: open preview
/// connections are not cut.
pub async fn set_preview(
    server: &Arc<Server>,
    sb: &Authorized,
    preview: PreviewSettings,
) -> Result<Sandbox, ApiError> {
    let id = sb.id();
    let row = current(server, sb).await?;
    if matches!(row.status, Status::Destroyed | Status::Failed) {
        return Err(ApiError::conflict(
            "invalid_state",
            format!("a {} sandbox cannot change", row.status),
        ));
    }
    server
        .store
        .sandboxes
        .set_preview_privacy(id, preview.privacy, now_ms())
        .await?;
    Ok(server.store.sandboxes.get(id).await?.unwrap_or(row))
}

/// Extend an ephemeral running sandbox's expiry. Holds the sandbox's read lock (no
/// transition runs in between, so "running" stays true until the expiry is stored), not
/// its write lock: an exec in progress must not hold up a keepalive, nor a queued keepalive
/// every exec after it.
pub async fn keepalive(
    server: &Arc<Server>,
    sb: &Authorized,
    timeout: &str,
) -> Result<Sandbox, ApiError> {
    let id = sb.id();
    let t = parse_duration(timeout).map_err(|m| ApiError::bad_request("invalid_timeout", m))?;
    if t.is_zero() || t > Duration::from_secs(MAX_EPHEMERAL_TIMEOUT_SECS) {
        return Err(ApiError::bad_request(
            "invalid_timeout",
            "timeout must be between 1s and 24h",
        ));
    }
    let lock = server.lock_of(id);
    let _guard = lock.read().await;
    let row = current(server, sb).await?;
    if row.mode != SandboxMode::Ephemeral || row.status != Status::Running {
        return Err(ApiError::conflict(
            "invalid_state",
            format!(
                "keepalive needs a running ephemeral sandbox; this one is {} and {}",
                row.mode.as_str(),
                row.status
            ),
        ));
    }
    let now = now_ms();
    server
        .store
        .sandboxes
        .set_expiry(id, now + t.as_millis() as i64, now)
        .await?;
    Ok(server.store.sandboxes.get(id).await?.unwrap_or(row))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_resolve() {
        assert_eq!(size_resources("small").unwrap().cpu_millis, 1000);
        assert!(size_resources("huge").is_none());
    }
}
