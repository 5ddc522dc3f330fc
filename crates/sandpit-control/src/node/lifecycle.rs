//! The sandbox state machine: create, suspend, wake, destroy, and access to a running
//! sandbox's agent. Every transition holds the sandbox's write lock; every agent operation
//! holds its read lock (see [`Node`]).
//!
//! ```text
//!   create ──► creating ──► running ◄──► suspended
//!                 │            │             │
//!                 ▼            ▼             ▼
//!               failed ──────► destroyed ◄───┘
//! ```
#![expect(
    clippy::disallowed_methods,
    reason = "checkpoint images are host-owned"
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sandpit_api_types::{
    CreateSandboxRequest, EgressPolicy, MAX_EPHEMERAL_TIMEOUT_SECS, PreviewSettings, SandboxMode,
    parse_duration,
};
use tracing::Instrument;
use tracing::field::Empty;

use super::Node;
use crate::create::{self, Size};
use crate::error::{ControlError, DisplayChain, decode};
use crate::phases::{self, Phase};
use crate::store::{Sandbox, SnapshotRow, TemplateStatus, VolumeMountRow};
use crate::util::{new_sandbox_id, now_ms};
use crate::{SandboxId, Status, Stored, Transition, WorkspaceId};

use super::boot::{
    Admitted, boot, claim_slot, egress_rules, existing, insert_with_slot, log_phases,
    mark_suspended, owned, release_slot, running_note, validate_egress, write_resolv_conf,
};

/// Validate a create request into a row (not yet inserted), the snapshot it starts from,
/// if any, and the volumes it mounts (the request's, or the snapshot's). Changes nothing.
pub async fn prepare_create(
    node: &Node,
    workspace_id: &str,
    req: &CreateSandboxRequest,
) -> Result<(Sandbox, Option<SnapshotRow>, Vec<VolumeMountRow>), ControlError> {
    // What the request alone decides, before any lookup.
    let now = now_ms();
    let defaults = create::Defaults {
        timeout: node.cfg.default_timeout,
        idle_timeout: node.cfg.default_idle_timeout,
    };
    let create::Lifetimes {
        timeout_ms,
        idle_timeout_ms,
        expires_at,
    } = create::check_request(req, &defaults, now)?;
    if req.snapshot.is_some() && !req.secrets.is_empty() {
        return Err(ControlError::invalid(
            "invalid_secrets",
            "a sandbox started from a snapshot holds no new secrets: name none",
        ));
    }
    if req.snapshot.is_some() && !req.volumes.is_empty() {
        return Err(ControlError::invalid(
            "invalid_volumes",
            "a sandbox started from a snapshot mounts the volumes its sandbox had: name no volumes",
        ));
    }
    let mut volumes = super::volumes::resolve(node, workspace_id, &req.volumes).await?;
    node.ensure_taking_new().await?;
    let snapshot = match &req.snapshot {
        Some(snap_id) => Some(
            node.store
                .snapshots
                .get(workspace_id, snap_id)
                .await?
                .ok_or_else(|| {
                    ControlError::not_found(
                        "snapshot_not_found",
                        format!("no snapshot {snap_id:?}"),
                    )
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
    let template = node
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
            ControlError::not_found(
                "template_not_found",
                format!("no template {:?}", req.template),
            )
        })?;
    if template.status != TemplateStatus::Ready {
        return Err(ControlError::conflict(
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
        _ => super::images::image_config(&template)?
            .env
            .into_iter()
            .chain(req.env.clone())
            .collect(),
    };
    validate_egress(node, &egress)?;
    if let Some(snap) = &snapshot {
        volumes = super::volumes::of_snapshot(node, &snap.id).await?;
    }
    // Answered early here; decided again under the volume lock when the row is written.
    super::volumes::check_writers(node, &volumes, "").await?;
    let id = new_sandbox_id();
    let row = Sandbox {
        runtime_id: format!("{}-{}", node.cfg.prefix, id),
        id: SandboxId::new(id),
        workspace_id: WorkspaceId::from(workspace_id),
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
        node_id: node.cfg.node_id.clone(),
        remote_image: None,
    };
    Ok((row, snapshot, volumes))
}

/// How [`boot_template`] started a sandbox.
enum TemplateBoot {
    Cold,
    /// From the template's boot snapshot (its start command already runs);
    /// `resolv_current`: it holds the node's resolv.conf.
    Snapshot {
        resolv_current: bool,
    },
}

/// Start a new sandbox from its template: restore the template's boot snapshot when there is
/// one (and they are enabled), otherwise boot cold.
async fn boot_template(node: &Node, row: &Sandbox) -> Result<TemplateBoot, ControlError> {
    if node.cfg.boot_snapshots
        && let Some(dir) = super::images::boot_snapshot(node, &row.template_id)
    {
        let resolv_current = super::templates::boot_snapshot_resolv_current(node, &dir);
        phases::timed(
            Phase::Copy,
            node.runtime
                .copy_files(&dir.join("files"), &node.state_dir(&row.id)),
        )
        .await?;
        match boot(node, row, Some(&dir.join("memory"))).await {
            Ok(()) => return Ok(TemplateBoot::Snapshot { resolv_current }),
            Err(e) => {
                tracing::warn!(sandbox = %row.id, error = %DisplayChain(&e), "restoring the template's boot snapshot failed; booting cold");
            }
        }
    }
    boot(node, row, None).await.map(|()| TemplateBoot::Cold)
}

/// Start a validated, admitted create ([`prepare_create`]; the caller checked its rates):
/// hand out a pooled sandbox, or claim a slot (the store checks the running quota) and
/// restore the snapshot, the template's boot snapshot, or boot cold; then wait for the
/// agent. The one place that chooses how a sandbox starts. On failure the sandbox is torn
/// down and its row says why.
pub async fn create(
    node: &Arc<Node>,
    row: Sandbox,
    snapshot: Option<SnapshotRow>,
    volumes: Vec<VolumeMountRow>,
    admitted: &Admitted<'_>,
) -> Result<Sandbox, ControlError> {
    let t0 = std::time::Instant::now();
    let mut path = if snapshot.is_some() {
        "snapshot"
    } else {
        "cold"
    };
    let template = row.template_id.clone();
    let span = tracing::debug_span!(
        "sandbox.create",
        sandbox.id = %row.id,
        sandbox.template_id = %template,
        sandbox.create_path = Empty,
        otel.status_code = Empty,
    );
    let created = create_timed(node, row, snapshot, volumes, admitted, &mut path)
        .instrument(span.clone())
        .await;
    span.record("sandbox.create_path", path);
    crate::trace::outcome(&span, &created);
    node.metrics.observe("create", path, t0, &created);
    if let Ok(row) = &created {
        node.event(
            &row.id,
            "created",
            serde_json::json!({"template": template}),
        )
        .await;
        node.event(&row.id, "started", serde_json::json!({"path": path}))
            .await;
    }
    created
}

/// [`create`], saying which way the sandbox started in `path`.
async fn create_timed(
    node: &Arc<Node>,
    mut row: Sandbox,
    snapshot: Option<SnapshotRow>,
    volumes: Vec<VolumeMountRow>,
    admitted: &Admitted<'_>,
    path: &mut &'static str,
) -> Result<Sandbox, ControlError> {
    // What it starts from must be on this node: fetched from object storage if it is not,
    // before any row or slot exists, so a failed fetch changes nothing.
    crate::node::stored::ensure_layers(node, &row.template_id).await?;
    if let Some(snap) = &snapshot {
        crate::node::stored::ensure_snapshot(node, snap).await?;
    }
    super::volumes::bring_here(node, &volumes).await?;
    // A pooled sandbox booted without secrets: one holding them starts on its own.
    let holds_secrets =
        node.secrets.get().is_some() && node.store.secrets.held(&row.id).await?.is_some();
    if snapshot.is_none() && volumes.is_empty() && node.cfg.warm_pool > 0 && !holds_secrets {
        let pooled = crate::node::pool::take(node, &row, admitted).await?;
        let result = if pooled.is_some() { "hit" } else { "miss" };
        node.metrics
            .pool_takes
            .get_or_create(&crate::metrics::ResultLabels { result })
            .inc();
        if let Some(pooled) = pooled {
            *path = "pool";
            return Ok(pooled);
        }
    }
    let lock = node.lock_of(&row.id);
    let _guard = lock.write().await;
    if volumes.is_empty() {
        admitted
            .count(insert_with_slot(node, &mut row), |_| 1)
            .await?;
    } else {
        // Who writes a volume is decided and recorded under one lock: two creates never
        // both mount it read-write.
        let _decide = node.volume_lock.lock().await;
        super::volumes::check_writers(node, &volumes, &row.id).await?;
        admitted
            .count(insert_with_slot(node, &mut row), |_| 1)
            .await?;
        if let Err(e) = node.store.volumes.add_mounts(&row.id, &volumes).await {
            node.store
                .sandboxes
                .mark_failed(
                    &row.id,
                    &format!("could not record its volumes: {}", DisplayChain(&e)),
                    now_ms(),
                )
                .await?;
            return Err(e);
        }
    }
    crate::faults::point("create.inserted");
    let started = std::time::Instant::now();
    let booted = match &snapshot {
        Some(snap) => crate::node::fork::boot_from_snapshot(node, &row, snap).await,
        None => match boot_template(node, &row).await {
            Ok(TemplateBoot::Cold) => {
                // Booted cold: start the template's start command (if it has one).
                match write_resolv_conf(node, &row).await {
                    Ok(()) => {
                        phases::timed(
                            Phase::Start,
                            crate::node::templates::start_and_wait(node, &row),
                        )
                        .await
                    }
                    Err(e) => Err(e),
                }
            }
            Ok(TemplateBoot::Snapshot { resolv_current }) => {
                *path = "boot_snapshot";
                if resolv_current {
                    Ok(())
                } else {
                    write_resolv_conf(node, &row).await
                }
            }
            Err(e) => Err(e),
        },
    };
    let booted = match (booted, &snapshot) {
        (Ok(()), Some(_)) => write_resolv_conf(node, &row).await,
        (other, _) => other,
    };
    let booted = match booted {
        Ok(()) => crate::secrets::install_ca(node, &row).await,
        other => other,
    };
    if let Err(e) = booted {
        tracing::error!(sandbox = %row.id, error = %DisplayChain(&e), "create failed");
        // The slot too: boot releases it on its own failures, not when a later step fails
        // (detach is idempotent).
        node.teardown(&row.id, &row.runtime_id, row.slot.map(|s| s as u32))
            .await;
        node.store
            .sandboxes
            .mark_failed(
                &row.id,
                &format!("could not start: {}", DisplayChain(&e)),
                now_ms(),
            )
            .await?;
        return Err(e);
    }
    crate::faults::point("create.booted");
    let now = now_ms();
    phases::timed(
        Phase::Store,
        node.store
            .sandboxes
            .transition(&row.id, Transition::Started, None, now),
    )
    .await?;
    tracing::info!(sandbox = %row.id, elapsed_ms = started.elapsed().as_millis() as u64, "sandbox running");
    log_phases(&row.id, "create");
    row.status = Status::Running;
    Ok(row)
}

/// Destroy a sandbox: idempotent, works in every state.
pub async fn destroy(node: &Arc<Node>, id: &str) -> Result<(), ControlError> {
    // A running exec holds the read lock: end it rather than wait for it.
    node.cancel_of(id).cancel();
    let guard = node.lock_of(id).write_owned().await;
    destroy_locked(node, id, guard).await
}

/// The reaper's destroy: skipped (until its next round) while an exec or file transfer holds
/// the sandbox, so one busy sandbox never stalls the reaper.
pub async fn destroy_if_free(node: &Arc<Node>, id: &str) -> Result<bool, ControlError> {
    let Ok(guard) = node.lock_of(id).try_write_owned() else {
        return Ok(false);
    };
    destroy_locked(node, id, guard).await.map(|()| true)
}

async fn destroy_locked(
    node: &Arc<Node>,
    id: &str,
    guard: tokio::sync::OwnedRwLockWriteGuard<()>,
) -> Result<(), ControlError> {
    let Some(row) = node.store.sandboxes.get(id).await? else {
        return Ok(());
    };
    if row.status == Status::Destroyed {
        return Ok(());
    }
    super::moves::stop_upload(node, id).await;
    let mut row = row;
    if super::moves::answers_here(node, &row).await? {
        // Nothing of it runs; its files are on a node that is gone or leaving (which
        // removes what it no longer owns when it starts again). Take the row over to
        // settle it here.
        let runtime_id = format!("{}-{}", node.cfg.prefix, id);
        if !node
            .store
            .sandboxes
            .move_to(id, &row.node_id, &node.cfg.node_id, &runtime_id, now_ms())
            .await?
        {
            return Err(ControlError::conflict(
                "sandbox_busy",
                "another node took this sandbox over meanwhile; retry",
            ));
        }
        row = existing(node, id).await?;
    }
    node.ensure_mine(&row)?;
    super::moves::drop_remote(node, &row).await?;
    node.previews.cut(id).await;
    node.teardown(&row.id, &row.runtime_id, row.slot.map(|s| s as u32))
        .await;
    crate::faults::point("destroy.torn_down");
    node.store.sandboxes.mark_destroyed(id, now_ms()).await?;
    drop(guard);
    node.forget_lock(id);
    node.event(id, "destroyed", serde_json::json!({})).await;
    tracing::info!(sandbox = %id, "destroyed");
    Ok(())
}

/// What a client is told about a sandbox that died under it.
pub const STOPPED_REASON: &str =
    "the sandbox stopped unexpectedly: it hit its memory or process limit, or was killed";

/// After an agent operation failed: if the sandbox's runtime has stopped (killed by its
/// memory or process limit, or from outside), settle its row the way a restart would
/// (`Node::reconcile`): an ephemeral sandbox is torn down and failed with the reason, a
/// persistent one is suspended with its files. Returns whether it had died (the client is
/// then told [`STOPPED_REASON`], 409 `sandbox_stopped`). Takes the write lock: the caller must hold no guard.
pub async fn settle_if_dead(node: &Arc<Node>, id: &str) -> bool {
    let _guard = node.lock_of(id).write_owned().await;
    let Ok(Some(row)) = node.store.sandboxes.get(id).await else {
        return false;
    };
    if row.status != Status::Running || !node.is_mine(&row) {
        return false;
    }
    match node.runtime.status(&row.runtime_id).await {
        Ok(sandpit_runtime::RuntimeStatus::Running) => return false,
        Err(e) => {
            tracing::error!(sandbox = %id, error = %DisplayChain(&e), "checking whether the sandbox runs");
            return false;
        }
        Ok(_) => {}
    }
    tracing::warn!(sandbox = %id, mode = row.mode.as_str(), "the sandbox died");
    node.previews.cut(id).await;
    let now = now_ms();
    let settled = if crate::recovery::after_death(row.mode)
        == crate::recovery::Recovery::SuspendLost
    {
        // The files are on disk; the network slot goes (a suspended sandbox holds none).
        if let Err(e) = node
            .runtime
            .stop(&row.runtime_id, &node.state_dir(id))
            .await
        {
            tracing::error!(sandbox = %id, error = %DisplayChain(&e), "stopping a dead sandbox");
        }
        mark_suspended(node, &row, Some(STOPPED_REASON), None).await
    } else {
        node.teardown(&row.id, &row.runtime_id, row.slot.map(|s| s as u32))
            .await;
        node.store
            .sandboxes
            .mark_failed(id, STOPPED_REASON, now)
            .await
    };
    if let Err(e) = settled {
        tracing::error!(sandbox = %id, error = %DisplayChain(&e), "recording a dead sandbox");
    }
    true
}

/// Stop a sandbox without saving its memory (status `suspended`): the next wake boots it
/// afresh with its files. A memory image from an earlier suspend is discarded.
pub async fn shutdown(node: &Arc<Node>, id: &str) -> Result<Sandbox, ControlError> {
    let lock = node.lock_of(id);
    let _guard = lock.write().await;
    let row = existing(node, id).await?;
    if !matches!(row.status, Status::Running | Status::Suspended) {
        return Err(ControlError::conflict(
            "invalid_state",
            format!("a {} sandbox cannot be shut down", row.status),
        ));
    }
    node.runtime
        .stop(&row.runtime_id, &node.state_dir(id))
        .await?;
    let image = node.checkpoint_dir(id);
    if image.exists() {
        std::fs::remove_dir_all(&image).map_err(|source| ControlError::Files {
            what: format!("removing the memory image of {id}"),
            source,
        })?;
    }
    mark_suspended(
        node,
        &row,
        Some("shut down: the next start boots afresh with its files"),
        None,
    )
    .await?;
    tracing::info!(sandbox = %id, "shut down");
    log_phases(id, "shutdown");
    existing(node, id).await
}

/// `Kept{max_suspended}` when `workspace` may not have `n` more sandboxes that are or will
/// be suspended ([`super::Quotas::max_suspended`]): for creating persistent sandboxes (which
/// suspend when idle) and for hibernating or shutting down a running ephemeral one.
pub async fn check_suspendable(node: &Node, workspace: &str, n: u32) -> Result<(), ControlError> {
    let max = node.cfg.quotas.max_suspended;
    if max == 0 {
        return Ok(());
    }
    let held = node.store.sandboxes.count_suspendable(workspace).await? as u32;
    if held + n > max {
        return Err(ControlError::Kept {
            limit: "max_suspended",
            value: max,
            what: format!(
                "this workspace keeps {held} sandboxes that are or will be suspended (persistent or hibernated); destroy some"
            ),
        });
    }
    Ok(())
}

/// Save a running sandbox's memory to disk and stop it, freeing its RAM.
pub async fn suspend(node: &Arc<Node>, id: &str) -> Result<Sandbox, ControlError> {
    let lock = node.lock_of(id);
    let guard = lock.write_owned().await;
    suspend_locked(node, id, guard, "requested").await
}

/// The reaper's suspend: only if the sandbox is still idle and nothing holds it (a running
/// exec or file transfer counts as activity). Returns whether it was suspended.
pub async fn suspend_if_idle(node: &Arc<Node>, id: &str) -> Result<bool, ControlError> {
    let Ok(guard) = node.lock_of(id).try_write_owned() else {
        node.store.sandboxes.touch(id, now_ms()).await?;
        return Ok(false);
    };
    let row = existing(node, id).await?;
    let idle_for = now_ms() - row.last_active_at;
    if row.status != Status::Running || row.idle_timeout_ms.is_none_or(|t| idle_for < t) {
        return Ok(false);
    }
    suspend_locked(node, id, guard, "idle").await.map(|_| true)
}

async fn suspend_locked(
    node: &Arc<Node>,
    id: &str,
    guard: tokio::sync::OwnedRwLockWriteGuard<()>,
    reason: &'static str,
) -> Result<Sandbox, ControlError> {
    let t0 = std::time::Instant::now();
    let span = tracing::debug_span!(
        "sandbox.hibernate",
        sandbox.id = %id,
        sandbox.hibernate_reason = reason,
        otel.status_code = Empty,
    );
    let suspended = suspend_locked_untimed(node, id, guard)
        .instrument(span.clone())
        .await;
    crate::trace::outcome(&span, &suspended);
    node.metrics.observe("hibernate", "", t0, &suspended);
    if suspended.is_ok() {
        node.event(id, "suspended", serde_json::json!({"reason": reason}))
            .await;
    }
    suspended
}

async fn suspend_locked_untimed(
    node: &Arc<Node>,
    id: &str,
    _guard: tokio::sync::OwnedRwLockWriteGuard<()>,
) -> Result<Sandbox, ControlError> {
    let row = existing(node, id).await?;
    match row.status {
        Status::Suspended => return Ok(row),
        Status::Running => {}
        other => {
            return Err(ControlError::conflict(
                "invalid_state",
                format!("a {other} sandbox cannot be suspended"),
            ));
        }
    }
    let started = std::time::Instant::now();
    // Preview connections hold no lock (see `crate::preview`); cut them so no connected TCP
    // endpoint makes the checkpoint fail.
    node.previews.cut(id).await;
    let image = node.checkpoint_dir(id);
    let state_dir = node.state_dir(id);
    let mut note = None;
    // Its network goes while the runtime releases the stopped sandbox (they need nothing of
    // each other): the slot is given back below only if this succeeded.
    let mut detached = None;
    let (net, slot) = (node.net.clone(), row.slot);
    let meanwhile: sandpit_runtime::Meanwhile<'_> = Box::pin(async {
        if let Some(slot) = slot {
            detached = Some(phases::timed(Phase::Netns, net.detach(slot as u32)).await);
        }
    });
    if let Err(e) = node
        .runtime
        .checkpoint_then(&row.runtime_id, &image, meanwhile)
        .await
    {
        // The runtime may have killed the sandbox; its files are on disk either way. The
        // next wake boots it afresh.
        tracing::error!(sandbox = %id, error = %DisplayChain(&e), "checkpoint failed; suspending without memory");
        let _ = std::fs::remove_dir_all(&image);
        note = Some(format!(
            "memory snapshot failed ({}); files were kept",
            DisplayChain(&e)
        ));
        // A successful checkpoint has stopped the sandbox already; a failed one may not have.
        node.runtime.stop(&row.runtime_id, &state_dir).await?;
    }
    crate::faults::point("hibernate.checkpointed");
    mark_suspended(node, &row, note.as_deref(), detached).await?;
    if let Err(e) = super::moves::start_upload(node, &row).await {
        tracing::error!(sandbox = %id, error = %DisplayChain(&e), "starting the upload of the image; it wakes only here");
    }
    tracing::info!(sandbox = %id, elapsed_ms = started.elapsed().as_millis() as u64, "suspended");
    log_phases(id, "hibernate");
    Ok(node.store.sandboxes.get(id).await?.unwrap_or(row))
}

/// Restore a suspended sandbox (or boot it with its files if no memory image exists).
pub async fn wake(
    node: &Arc<Node>,
    id: &str,
    admitted: &Admitted<'_>,
) -> Result<Sandbox, ControlError> {
    let t0 = std::time::Instant::now();
    let span = tracing::debug_span!("sandbox.wake", sandbox.id = %id, otel.status_code = Empty);
    let woken = wake_untimed(node, id, admitted)
        .instrument(span.clone())
        .await;
    crate::trace::outcome(&span, &woken);
    node.metrics.observe("wake", "", t0, &woken);
    if woken.is_ok() {
        node.event(id, "woken", serde_json::json!({})).await;
    }
    woken
}

async fn wake_untimed(
    node: &Arc<Node>,
    id: &str,
    admitted: &Admitted<'_>,
) -> Result<Sandbox, ControlError> {
    let lock = node.lock_of(id);
    let _guard = lock.write().await;
    super::moves::stop_upload(node, id).await;
    let (row, moved_note) = match node.store.sandboxes.get(id).await? {
        // Suspended on a node that is gone (or draining, the image stored): take it over
        // from object storage.
        Some(r) if super::moves::answers_here(node, &r).await? => {
            super::moves::take_over(node, &r).await?
        }
        _ => (existing(node, id).await?, None),
    };
    match row.status {
        Status::Running => return Ok(row),
        Status::Suspended => {}
        other => {
            return Err(ControlError::conflict(
                "invalid_state",
                format!("a {other} sandbox cannot be woken"),
            ));
        }
    }
    // A woken sandbox runs again: it counts against the running quota like a new one (the
    // slot claim below checks it in the store).
    let mut row = row;
    // Suspended sandboxes hold no network slot: claim a free one (503 `capacity_exhausted`
    // when none is, and the sandbox stays suspended, intact). A row from before slots were
    // released on suspend may still hold one.
    if row.slot.is_none() {
        admitted.count(claim_slot(node, &mut row), |_| 1).await?;
    } else {
        // The store counts it already: a suspended sandbox holding a slot is being woken.
        admitted.counted_already().await;
    }
    let started = std::time::Instant::now();
    let image = node.checkpoint_dir(id);
    let has_image = node.runtime.has_image(&image);
    let mut lost_memory = moved_note;
    if let Err(e) = boot(node, &row, has_image.then_some(image.as_path())).await {
        if !has_image {
            tracing::error!(sandbox = %id, error = %DisplayChain(&e), "wake failed");
            release_slot(node, &row).await?;
            return Err(e);
        }
        // The memory image would not come back (twice). The files are intact: start the
        // sandbox from them rather than leave it unusable, and say what was lost.
        tracing::error!(sandbox = %id, error = %DisplayChain(&e), "restore failed; starting the sandbox from its files");
        if let Err(e2) = boot(node, &row, None).await {
            tracing::error!(sandbox = %id, error = %DisplayChain(&e2), "wake failed");
            release_slot(node, &row).await?;
            return Err(e2);
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
    phases::timed(Phase::Store, async {
        let note = running_note(node, id, lost_memory).await?;
        node.store
            .sandboxes
            .transition(id, Transition::Wake, note.as_deref(), now)
            .await?;
        node.store.sandboxes.touch(id, now).await?;
        super::moves::after_wake(node, &row).await
    })
    .await?;
    tracing::info!(sandbox = %id, elapsed_ms = started.elapsed().as_millis() as u64, restored = has_image, "woken");
    log_phases(id, "wake");
    Ok(node.store.sandboxes.get(id).await?.unwrap_or(row))
}

/// Replace a sandbox's egress policy: validated like at create (400, nothing changed), then
/// stored; applied at once to a running sandbox, and on wake to a suspended one (wake attaches
/// the network with the stored rules). 409 for sandboxes that will never run again.
///
/// Holds the sandbox's read lock, so no transition (which would attach or detach the network
/// with the rules it read) runs in between, while execs and file transfers continue.
pub async fn set_egress(
    node: &Node,
    workspace_id: &str,
    id: &str,
    policy: &EgressPolicy,
) -> Result<Sandbox, ControlError> {
    let valid = validate_egress(node, policy)?;
    let lock = node.lock_of(id);
    let _guard = lock.read().await;
    let _serial = node.egress_lock.lock().await;
    let row = owned(node, workspace_id, id).await?;
    if !matches!(row.status, Status::Running | Status::Suspended) {
        return Err(ControlError::conflict(
            "invalid_state",
            format!(
                "the egress policy of a {} sandbox cannot change",
                row.status
            ),
        ));
    }
    let now = now_ms();
    let stored = Stored::encode(policy);
    node.store.sandboxes.set_egress(id, &stored, now).await?;
    let json = stored.raw();
    if row.status == Status::Running {
        let slot = row
            .slot
            .ok_or_else(|| ControlError::Internal(format!("running sandbox {id} has no slot")))?;
        node.net
            .set_egress(slot as u32, &egress_rules(&valid))
            .await?;
    }
    tracing::info!(sandbox = %id, egress = %json, applied = row.status == Status::Running, "egress policy changed");
    Ok(node.store.sandboxes.get(id).await?.unwrap_or(row))
}

/// Change a sandbox's preview privacy. Applies to the next request: open preview
/// connections are not cut.
pub async fn set_preview(
    node: &Node,
    workspace_id: &str,
    id: &str,
    preview: PreviewSettings,
) -> Result<Sandbox, ControlError> {
    let row = owned(node, workspace_id, id).await?;
    if matches!(row.status, Status::Destroyed | Status::Failed) {
        return Err(ControlError::conflict(
            "invalid_state",
            format!("a {} sandbox cannot change", row.status),
        ));
    }
    node.store
        .sandboxes
        .set_preview_privacy(id, preview.privacy, now_ms())
        .await?;
    Ok(node.store.sandboxes.get(id).await?.unwrap_or(row))
}

/// Extend an ephemeral running sandbox's expiry. Holds the sandbox's read lock (no
/// transition runs in between, so "running" stays true until the expiry is stored), not
/// its write lock: an exec in progress must not hold up a keepalive, nor a queued keepalive
/// every exec after it.
pub async fn keepalive(
    node: &Node,
    workspace_id: &str,
    id: &str,
    timeout: &str,
) -> Result<Sandbox, ControlError> {
    let t = parse_duration(timeout).map_err(|m| ControlError::invalid("invalid_timeout", m))?;
    if t.is_zero() || t > Duration::from_secs(MAX_EPHEMERAL_TIMEOUT_SECS) {
        return Err(ControlError::invalid(
            "invalid_timeout",
            "timeout must be between 1s and 24h",
        ));
    }
    let lock = node.lock_of(id);
    let _guard = lock.read().await;
    let row = owned(node, workspace_id, id).await?;
    if row.mode != SandboxMode::Ephemeral || row.status != Status::Running {
        return Err(ControlError::conflict(
            "invalid_state",
            format!(
                "keepalive needs a running ephemeral sandbox; this one is {} and {}",
                row.mode.as_str(),
                row.status
            ),
        ));
    }
    let now = now_ms();
    node.store
        .sandboxes
        .set_expiry(id, now + t.as_millis() as i64, now)
        .await?;
    Ok(node.store.sandboxes.get(id).await?.unwrap_or(row))
}

/// Change a sandbox's size preset (CPU, memory and disk) in place. A running sandbox gets
/// the new CPU and memory limits at once and its disk grown (`Runtime::update_resources`; a
/// disk never shrinks, so a smaller size keeps the larger disk); a suspended one gets them
/// at its wake. Refused, with nothing changed: 400 `invalid_size`; 409 `invalid_state` for
/// a sandbox that will not run again or is busy changing state; 409 `host_lacks_memory`
/// when the host's available memory cannot cover the growth; 507 `host_disk_full` when a
/// disk would grow past the host's reserve; 409 `resize_refused` when the runtime refuses
/// (less memory than the sandbox uses now).
///
/// Holds the sandbox's write lock: no exec starts and no transition runs while limits
/// change.
pub async fn resize(
    node: &Node,
    workspace_id: &str,
    id: &str,
    size: &str,
) -> Result<Sandbox, ControlError> {
    let new = Size::checked(size)?;
    let lock = node.lock_of(id);
    let _guard = lock.write().await;
    let row = owned(node, workspace_id, id).await?;
    if !matches!(row.status, Status::Running | Status::Suspended) {
        return Err(ControlError::conflict(
            "invalid_state",
            format!("a {} sandbox cannot be resized", row.status),
        ));
    }
    let old = Size::checked(&row.size)?;
    if old == new {
        return Ok(row);
    }
    if row.status == Status::Running {
        if new.memory_bytes > old.memory_bytes {
            let growth_mib = ((new.memory_bytes - old.memory_bytes) >> 20) as i64;
            if let Some(available) = crate::membership::available_memory_mib()
                && available < growth_mib
            {
                return Err(ControlError::conflict(
                    "host_lacks_memory",
                    format!(
                        "the host has {available} MiB of memory available, less than the {growth_mib} MiB this resize adds"
                    ),
                ));
            }
        }
        let disk_bytes = super::boot::size_disk(node, new.name);
        if disk_bytes > super::boot::size_disk(node, old.name) {
            node.ensure_free_disk()?;
        }
        let resources = sandpit_runtime::Resources {
            cpu_millis: new.cpu_millis,
            memory_bytes: new.memory_bytes,
            disk_bytes,
        };
        match node
            .runtime
            .update_resources(&row.runtime_id, &node.state_dir(id), &resources)
            .await
        {
            Ok(()) => {}
            Err(sandpit_runtime::RuntimeError::Resize { reason, .. }) => {
                return Err(ControlError::conflict("resize_refused", reason));
            }
            Err(e) => return Err(e.into()),
        }
    }
    node.store
        .sandboxes
        .set_size(id, new.name, now_ms())
        .await?;
    tracing::info!(sandbox = %id, from = old.name, to = new.name, running = row.status == Status::Running, "resized");
    Ok(node.store.sandboxes.get(id).await?.unwrap_or(row))
}
