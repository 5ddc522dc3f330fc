//! The parts every transition is made of: a sandbox's network slot (claimed in the store,
//! under the running quota), its egress rules (decoded fail-closed), the spec the runtime
//! boots or restores it from, the boot itself with the wait for its agent, and the rows the
//! node makes for its own sandboxes. Used by `lifecycle`, `fork`, `pool` and `templates`;
//! uses none of them.
#![expect(clippy::disallowed_methods, reason = "netns paths are host-owned")]

use std::collections::BTreeMap;
use std::time::Duration;

use sandpit_api_types::{EgressPolicy, PreviewSettings, ValidEgress, format_duration};
use sandpit_net::{EgressRules, Ipv4Net};
use sandpit_runtime::phases::{self, Phase};
use sandpit_runtime::{NetworkAttachment, Resources, SandboxSpec};

use super::Node;
use crate::agent::AgentClient;
use crate::create::Size;
use crate::error::{ControlError, DisplayChain};
use crate::store::Sandbox;
use crate::util::{new_sandbox_id, now_ms, rfc3339};
use crate::{Status, Stored, Transition};

use super::images::{AGENT_PATH_IN_SANDBOX, local_layers};

/// The workspace that owns pooled sandboxes (created by a migration; no token exists for it).
pub const POOL_WORKSPACE: &str = "ws_system";
/// The size pooled sandboxes boot with; requests for another size bypass the pool.
pub const POOL_SIZE: &str = "small";
/// The runtime's resources for a size preset (`crate::create::SIZES`).
pub fn size_resources(name: &str) -> Option<Resources> {
    Size::parse(name).map(|s| Resources {
        cpu_millis: s.cpu_millis,
        memory_bytes: s.memory_bytes,
        disk_bytes: None,
    })
}

/// The disk a sandbox of `size` gets when its files are first made: the node's
/// `disk_limit` for `small`, scaled by the size's memory for the others.
pub fn size_disk(node: &Node, size: &str) -> Option<u64> {
    let base = node.cfg.disk_limit?;
    let memory = size_resources(size).map_or(1 << 30, |r| r.memory_bytes);
    Some(base.saturating_mul((memory >> 30).max(1)))
}

/// The API view of a row.
pub fn to_api(row: &Sandbox) -> sandpit_api_types::Sandbox {
    // Display only: what a corrupt record shows is no default anything acts on (the
    // operations that need these records decode them fail-closed).
    let env: BTreeMap<String, String> = row.env.decode(String::new).unwrap_or_default();
    sandpit_api_types::Sandbox {
        id: row.id.to_string(),
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
        image: row
            .remote_image
            .as_ref()
            .filter(|_| row.status == crate::domain::Status::Suspended)
            .and_then(|r| r.decode(String::new).ok())
            .map(|r| r.to_api()),
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

/// A policy from a request: checked, with the node's pool in the always-denied set.
pub fn validate_egress(node: &Node, policy: &EgressPolicy) -> Result<ValidEgress, ControlError> {
    let pool = node.net.config().pool;
    policy
        .validate_within(Some(sandpit_api_types::Cidr {
            addr: pool.addr,
            prefix_len: pool.prefix_len,
        }))
        .map_err(|(code, m)| ControlError::invalid(code, m))
}

pub fn stored_rules(row: &Sandbox) -> Result<EgressRules, ControlError> {
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
pub async fn running_note(
    node: &Node,
    id: &str,
    note: Option<String>,
) -> Result<Option<String>, ControlError> {
    let reset = node
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
pub async fn rules_or_deny(node: &Node, row: &Sandbox) -> Result<EgressRules, ControlError> {
    match stored_rules(row) {
        Ok(rules) => Ok(rules),
        Err(e) => {
            let why = format!(
                "{EGRESS_RESET_NOTE} ({}); it was set to deny_all",
                DisplayChain(&e)
            );
            tracing::error!(sandbox = %row.id, error = %DisplayChain(&e), "egress policy does not decode: denying all egress");
            let deny = Stored::encode(&deny_all());
            node.store
                .sandboxes
                .replace_egress(&row.id, &deny, &why, now_ms())
                .await?;
            let valid = deny_all().validate().expect("deny_all is valid");
            Ok(egress_rules(&valid))
        }
    }
}

/// Room a caller holds for new sandboxes in front of the store (the HTTP edge's early quota
/// answer, which counts the store's running units plus the room it handed out). The store
/// write that starts counting a sandbox runs under the caller's `lock`, and `hand_back`
/// returns that much room in the same critical section, so the caller's count never sees a
/// sandbox twice, nor misses it. The store's own check (under the workspace's admission
/// lock) decides; this only keeps the early answer exact.
pub struct Admitted<'a> {
    /// Held by the caller while it counts and hands out room.
    pub lock: &'a tokio::sync::Mutex<()>,
    /// Give back room for this many sandboxes (the store counts them now).
    pub hand_back: &'a (dyn Fn(u32) + Send + Sync),
}

impl Admitted<'_> {
    /// Run `write`, a store write that makes `made(&output)` sandboxes count as running,
    /// and hand that much room back, under the caller's lock.
    pub async fn count<T>(
        &self,
        write: impl std::future::Future<Output = Result<T, ControlError>>,
        made: impl FnOnce(&T) -> u32,
    ) -> Result<T, ControlError> {
        let _counting = self.lock.lock().await;
        let out = write.await;
        if let Ok(v) = &out {
            (self.hand_back)(made(v));
        }
        out
    }

    /// Hand back room for one sandbox the store already counts as running (a sandbox being
    /// woken that still holds its slot), under the caller's lock.
    pub async fn counted_already(&self) {
        let _counting = self.lock.lock().await;
        (self.hand_back)(1);
    }
}

/// The running quota a workspace's rows are held to in the store: the configured one for
/// tenants, none for the node's own sandboxes (warm pool, builds, boot snapshots).
pub fn running_quota(node: &Node, workspace: &str) -> u32 {
    if workspace == POOL_WORKSPACE {
        0
    } else {
        node.cfg.quotas.max_running
    }
}

/// Claim the lowest free network slot by inserting the row that holds it. The insert is the
/// authoritative running-quota check (`Sandboxes::insert_admitted`: under the workspace's
/// admission lock in the store, so it holds across servers sharing a database); the
/// in-process `Limits::admit` before it answers early, with the SDK's headers.
pub async fn insert_with_slot(node: &Node, row: &mut Sandbox) -> Result<(), ControlError> {
    phases::timed(Phase::Slot, async {
        let _guard = node.slot_lock.lock().await;
        row.slot = Some(lowest_free_slot(node).await?);
        let quota = running_quota(node, &row.workspace_id);
        node.store.sandboxes.insert_admitted(row, quota).await
    })
    .await
}

/// The lowest network slot no row holds; `NoSlot` when every one is taken. Call with
/// `slot_lock` held, up to the store write that takes the slot.
pub(super) async fn lowest_free_slot(node: &Node) -> Result<i64, ControlError> {
    let used: std::collections::HashSet<i64> = node
        .store
        .sandboxes
        .used_slots(&node.cfg.node_id)
        .await?
        .into_iter()
        .collect();
    (0..node.net.capacity() as i64)
        .find(|s| !used.contains(s))
        .ok_or(ControlError::NoSlot)
}

/// Claim the lowest free network slot for an existing row that holds none (a suspended
/// sandbox waking). `NoSlot` (503 `capacity_exhausted`) when every slot is taken.
pub(super) async fn claim_slot(node: &Node, row: &mut Sandbox) -> Result<(), ControlError> {
    phases::timed(Phase::Slot, async {
        let _guard = node.slot_lock.lock().await;
        let slot = lowest_free_slot(node).await?;
        let quota = running_quota(node, &row.workspace_id);
        node.store
            .sandboxes
            .claim_slot_admitted(row, slot, quota, now_ms())
            .await?;
        row.slot = Some(slot);
        Ok(())
    })
    .await
}

/// Record a stopped sandbox as suspended, with `note` in its `error`, and give its network
/// slot back (namespace, veth and nftables chain go): a suspended sandbox holds no slot,
/// otherwise one tenant's hibernated sandboxes could hold every slot and starve every other
/// tenant's creates. The wake claims a free slot and restores into it. If the namespace
/// cannot be removed now, the sandbox keeps its slot (the wake reuses it; a restart's
/// reconciliation removes it). `detached`: how removing the namespace went, if the caller
/// did it already. The caller holds the sandbox's write lock.
pub(super) async fn mark_suspended(
    node: &Node,
    row: &Sandbox,
    note: Option<&str>,
    detached: Option<Result<(), sandpit_net::NetError>>,
) -> Result<(), ControlError> {
    let now = now_ms();
    let detached = match (row.slot, detached) {
        (None, _) => Ok(()),
        (Some(_), Some(done)) => done,
        (Some(slot), None) => phases::timed(Phase::Netns, node.net.detach(slot as u32)).await,
    };
    if let Err(e) = detached {
        tracing::error!(sandbox = %row.id, error = %DisplayChain(&e), "removing a suspended sandbox's network slot; it keeps the slot");
        return node
            .store
            .sandboxes
            .transition(&row.id, Transition::Suspend, note, now)
            .await;
    }
    phases::timed(
        Phase::Store,
        node.store.sandboxes.mark_suspended(&row.id, note, now),
    )
    .await
}

/// Give a stopped sandbox's network slot back: its namespace goes and its row holds none.
/// A suspended sandbox holds no slot; waking claims one ([`wake`]).
pub(super) async fn release_slot(node: &Node, row: &Sandbox) -> Result<(), ControlError> {
    if let Some(slot) = row.slot {
        node.net.detach(slot as u32).await?;
    }
    node.store.sandboxes.release_slot(&row.id, now_ms()).await
}

/// The spec the runtime boots or restores a sandbox from.
pub async fn spec_for(node: &Node, row: &Sandbox) -> Result<SandboxSpec, ControlError> {
    let template = node
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
    let addrs = node.net.addrs(slot as u32);
    // The sandbox's own environment is sent with every exec (see `exec_env`), not baked
    // into the init process: a memory image or a pooled sandbox can then serve any owner.
    let env = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        "HOME=/root".to_string(),
    ];
    let volumes = super::volumes::runtime_mounts(node, &row.id).await?;
    Ok(SandboxSpec {
        volumes,
        id: row.runtime_id.clone(),
        layers: local_layers(node, &template)?
            .into_iter()
            .chain([node.agent_layer.clone()])
            .collect(),
        state_dir: node.state_dir(&row.id),
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
            disk_bytes: size_disk(node, &row.size),
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
    env.insert("SANDPIT_SANDBOX_ID".into(), row.id.to_string());
    env.extend(request);
    Ok(env.into_iter().collect())
}

pub fn agent_of(node: &Node, row: &Sandbox) -> Option<AgentClient> {
    if !node.is_mine(row) {
        return None;
    }
    row.slot
        .map(|s| AgentClient::new(&row.id, node.net.addrs(s as u32).sandbox_ip))
}

/// Boot (or restore, when `image` is given) a sandbox whose row exists and whose slot is
/// claimed, and wait for its agent. On failure, releases what it took (runtime, network).
#[tracing::instrument(level = "debug", name = "sandbox.boot", skip_all,
    fields(sandbox.id = %row.id, sandbox.from_image = image.is_some()))]
pub async fn boot(
    node: &Node,
    row: &Sandbox,
    image: Option<&std::path::Path>,
) -> Result<(), ControlError> {
    match boot_once(node, row, image).await {
        // Seen once under heavy load: a restore whose agent never answered over the
        // namespace kept from before the suspend. The failed attempt removed the namespace;
        // a second restore gets a fresh one.
        Err(e) if image.is_some() => {
            tracing::warn!(sandbox = %row.id, error = %DisplayChain(&e), "restore failed; retrying once with a rebuilt network");
            boot_once(node, row, image).await
        }
        other => other,
    }
}

pub(super) async fn boot_once(
    node: &Node,
    row: &Sandbox,
    image: Option<&std::path::Path>,
) -> Result<(), ControlError> {
    let spec = spec_for(node, row).await?;
    boot_spec(node, row, &spec, image).await
}

/// [`boot`] from a given spec (a template build boots over its own layers), without retry.
pub async fn boot_spec(
    node: &Node,
    row: &Sandbox,
    spec: &SandboxSpec,
    image: Option<&std::path::Path>,
) -> Result<(), ControlError> {
    let slot = row.slot.expect("spec_for checked the slot") as u32;
    let rules = rules_or_deny(node, row).await?;
    let t_net = std::time::Instant::now();
    match node.net.attach(slot, &rules).await {
        Ok(_) => {}
        // Kept from before a suspend: make sure it carries the current policy.
        Err(sandpit_net::NetError::SlotBusy { .. }) if node.net.addrs(slot).netns_path.exists() => {
            node.net.set_egress(slot, &rules).await?
        }
        // Half of it is gone (a host reboot takes the namespace but the store remembers
        // the slot): rebuild it.
        Err(sandpit_net::NetError::SlotBusy { .. }) => {
            node.net.detach(slot).await?;
            node.net.attach(slot, &rules).await?;
        }
        Err(e) => return Err(e.into()),
    }
    phases::record(Phase::Netns, t_net, std::time::Instant::now());
    // Its secrets reach the proxy (and its web traffic is redirected) before it runs.
    if let Err(e) = crate::secrets::attach(node, &row.id, slot).await {
        let _ = node.net.detach(slot).await;
        return Err(e);
    }
    let restore_began = std::time::Instant::now();
    let started = match image {
        Some(dir) => node.runtime.restore(spec, dir).await,
        None => node.runtime.start(spec).await,
    };
    let result = match started {
        Ok(()) if image.is_some() => {
            phases::timed(
                Phase::Agent,
                wait_restored_agent(node, row, spec, restore_began),
            )
            .await
        }
        Ok(()) => phases::timed(
            Phase::Agent,
            agent_of(node, row)
                .expect("slot checked")
                .wait_ready(node.cfg.agent_ready_timeout),
        )
        .await
        .map(|_| ()),
        Err(e) => Err(e.into()),
    };
    if let Err(e) = &result {
        if matches!(e, ControlError::AgentTimeout { .. }) {
            let state = node
                .runtime
                .diagnose(&row.runtime_id, &spec.state_dir)
                .await;
            tracing::warn!(sandbox = %row.id, restore = image.is_some(), %state, "the agent did not answer");
        }
        let _ = node.runtime.stop(&row.runtime_id, &spec.state_dir).await;
        let _ = node.net.detach(slot).await;
    }
    result
}

/// The command name of the agent's node process (a re-exec of `/proc/self/exe`), the
/// child its PID 1 restarts when it dies.
const AGENT_SERVE_COMM: &str = "exe";

/// Wait for a restored sandbox's agent. Seen under load: a restored sandbox, alive, whose
/// agent never answers (the same image again restores deaf). Its init still works, so after
/// half the wait the agent's node process is killed; init starts a new one and the
/// sandbox's memory is kept.
pub(super) async fn wait_restored_agent(
    node: &Node,
    row: &Sandbox,
    spec: &SandboxSpec,
    restore_began: std::time::Instant,
) -> Result<(), ControlError> {
    let agent = agent_of(node, row).expect("slot checked");
    let half = node.cfg.agent_ready_timeout / 2;
    let first = match agent.wait_ready(half).await {
        Ok(reply) => {
            if started_after(&reply, restore_began) {
                // Its `serve` died after the restore (a crash: init started another), so
                // what it held in memory (processes, terminals) is gone; the sandbox's
                // memory otherwise is kept. Seen under load on both ptrace and systrap.
                node.metrics.agent_restarts.inc();
                tracing::warn!(sandbox = %row.id, uptime_ms = ?reply.uptime_ms, "the restored agent restarted after the restore (it crashed); its processes and terminals are lost");
            }
            return Ok(());
        }
        Err(e) => e,
    };
    let state = node
        .runtime
        .diagnose(&row.runtime_id, &spec.state_dir)
        .await;
    tracing::warn!(sandbox = %row.id, error = %DisplayChain(&first), %state, "restored agent does not answer; restarting it");
    match node
        .runtime
        .kill_init_children(&row.runtime_id, AGENT_SERVE_COMM)
        .await
    {
        Ok(0) | Err(_) => return Err(first),
        Ok(_) => {}
    }
    node.metrics.agent_restarts.inc();
    agent.wait_ready(half).await?;
    tracing::info!(sandbox = %row.id, "the restarted agent answers; memory kept");
    Ok(())
}

/// Whether the agent that answered started after `restore_began`: younger than the time
/// since (a restored agent is as old as before the checkpoint, plus the time since).
fn started_after(
    reply: &sandpit_agent_proto::PingReply,
    restore_began: std::time::Instant,
) -> bool {
    reply
        .uptime_ms
        .is_some_and(|up| u128::from(up) < restore_began.elapsed().as_millis())
}

/// Write a new sandbox's `/etc/resolv.conf` through its agent (only at create: a sandbox
/// that later boots again keeps whatever it has, edits included).
pub async fn write_resolv_conf(node: &Node, row: &Sandbox) -> Result<(), ControlError> {
    let body = futures::stream::iter([Ok::<_, std::convert::Infallible>(bytes::Bytes::from(
        node.resolv_conf.clone(),
    ))]);
    let agent = agent_of(node, row).expect("slot checked");
    phases::timed(
        Phase::Resolv,
        agent.write_file("/etc/resolv.conf", None, body, 1 << 16),
    )
    .await
    .map(drop)
    .map_err(|f| ControlError::Agent {
        sandbox: row.id.to_string(),
        what: format!("writing /etc/resolv.conf: {f:?}"),
    })
}

/// Log at debug what the operation measured so far, by phase (only under a measurement:
/// the API's lifecycle routes run one, see `sandpit_runtime::phases`).
pub(super) fn log_phases(id: &str, op: &'static str) {
    if tracing::enabled!(tracing::Level::DEBUG)
        && let Some(timings) = phases::current()
    {
        tracing::debug!(sandbox = %id, op, phases = %timings, "phases");
    }
}

/// The current row of sandbox `id` of `workspace_id` (the caller authorized the request
/// for it); `NotFound` if it is gone. A sandbox never changes workspace: one that did is
/// never acted on.
pub async fn owned(node: &Node, workspace_id: &str, id: &str) -> Result<Sandbox, ControlError> {
    let row = existing(node, id).await?;
    if row.workspace_id != workspace_id {
        return Err(ControlError::Internal(format!(
            "sandbox {} changed workspace",
            row.id
        )));
    }
    Ok(row)
}

/// A sandbox by id, or `NotFound` (callers have checked the workspace already).
/// 503 `sandbox_on_another_node` if another node runs it.
pub(super) async fn existing(node: &Node, id: &str) -> Result<Sandbox, ControlError> {
    let row = node.store.sandboxes.get(id).await?.ok_or_else(|| {
        ControlError::not_found("sandbox_not_found", format!("no sandbox {id:?}"))
    })?;
    node.ensure_mine(&row)?;
    Ok(row)
}

/// A row for a sandbox the node runs for itself (warm pool, template boot snapshot):
/// owned by the system workspace, egress denied, not yet inserted.
pub fn system_row(node: &Node, template_id: &str, template_name: &str) -> Sandbox {
    let now = now_ms();
    let id = new_sandbox_id();
    Sandbox {
        runtime_id: format!("{}-{}", node.cfg.prefix, id),
        id: id.into(),
        workspace_id: POOL_WORKSPACE.into(),
        template_id: template_id.into(),
        template_name: template_name.into(),
        mode: sandpit_api_types::SandboxMode::Ephemeral,
        status: Status::Creating,
        size: POOL_SIZE.into(),
        env: Stored::encode(&Default::default()),
        metadata: Stored::encode(&Default::default()),
        egress: Stored::from_raw(r#"{"mode":"deny_all"}"#.into()),
        timeout_ms: None,
        idle_timeout_ms: None,
        expires_at: None,
        last_active_at: now,
        slot: None,
        error: None,
        created_at: now,
        updated_at: now,
        preview_privacy: sandpit_api_types::PreviewPrivacy::Private,
        node_id: node.cfg.node_id.clone(),
        remote_image: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_resolve() {
        assert_eq!(size_resources("small").unwrap().cpu_millis, 1000);
        assert!(size_resources("huge").is_none());
    }

    #[test]
    fn an_agent_younger_than_the_restore_started_after_it() {
        let reply = |uptime_ms| sandpit_agent_proto::PingReply {
            protocol: 1,
            agent_version: "x".into(),
            uptime_ms,
        };
        let began = std::time::Instant::now() - Duration::from_secs(2);
        // A restored agent: older than the restore (its time before the checkpoint counts).
        assert!(!started_after(&reply(Some(60_000)), began));
        // One init started after the restore.
        assert!(started_after(&reply(Some(300)), began));
        // An agent from before the field: nothing is known, nothing is claimed.
        assert!(!started_after(&reply(None), began));
    }
}
