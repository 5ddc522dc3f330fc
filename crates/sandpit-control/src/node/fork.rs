//! Fork and named snapshots. Both freeze a sandbox (a memory image plus a copy of its files
//! taken while it is stopped), then start new sandboxes from that pair.
//!
//! What the parent of a running fork sees: it is checkpointed and restored in place, so its
//! processes pause for a few hundred milliseconds and blocking system calls return EINTR once;
//! open TCP connections through previews are cut (gVisor cannot checkpoint them).
#![expect(
    clippy::disallowed_methods,
    reason = "checkpoint images and snapshot dirs are written by runsc and the node under the data dir (a sandbox's files travel inside its disk image)"
)]

use crate::{Status, Transition};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use sandpit_api_types::Snapshot;
use tracing::Instrument;

use super::Node;
use super::boot::{boot, insert_with_slot};
use crate::error::{ControlError, DisplayChain};
use crate::phases::{self, Phase};
use crate::store::{Sandbox, SnapshotRow, VolumeMountRow};
use crate::util::{new_id, new_sandbox_id, now_ms, random_hex, rfc3339};

/// Most children one fork call makes.
pub const MAX_FORK: u32 = 100;
/// Children restored at once.
const PARALLEL_RESTORES: usize = 4;

/// A sandbox stopped so its files can be copied.
struct Frozen {
    /// Its memory image, if it has one.
    image: Option<PathBuf>,
    /// The image was taken for this operation (delete it afterwards).
    temporary: bool,
    /// It was running and must be brought back.
    was_running: bool,
}

pub use super::stored::snapshot_dir;

fn temp_image_dir(node: &Node) -> PathBuf {
    node.cfg.data_dir.join("images-tmp").join(random_hex(8))
}

/// Stop `row` with its memory saved (if running) so its files can be copied. The caller
/// holds the sandbox's write lock.
async fn freeze(node: &Arc<Node>, row: &Sandbox) -> Result<Frozen, ControlError> {
    match row.status {
        Status::Running => {
            // Open preview connections would make gVisor refuse the checkpoint.
            node.previews.cut(&row.id).await;
            let image = temp_image_dir(node);
            if let Err(e) = node.runtime.checkpoint(&row.runtime_id, &image).await {
                // gVisor kills a sandbox whose checkpoint it refuses: bring it back with its
                // files, then tell the caller why nothing was copied.
                tracing::error!(sandbox = %row.id, error = %DisplayChain(&e), "checkpoint for a copy failed");
                let _ = std::fs::remove_dir_all(&image);
                let _ = node
                    .runtime
                    .stop(&row.runtime_id, &node.state_dir(&row.id))
                    .await;
                if let Some(slot) = row.slot {
                    let _ = node.net.detach(slot as u32).await;
                }
                if let Err(e) = boot(node, row, None).await {
                    node.store
                        .sandboxes
                        .mark_failed(
                            &row.id,
                            &format!("lost after a failed checkpoint: {}", DisplayChain(&e)),
                            now_ms(),
                        )
                        .await?;
                }
                return Err(ControlError::conflict(
                    "checkpoint_refused",
                    format!(
                        "the sandbox's memory could not be saved: {e}; it was restarted with its files"
                    ),
                ));
            }
            // The checkpoint stopped it; its network slot stays for the restore.
            Ok(Frozen {
                image: Some(image),
                temporary: true,
                was_running: true,
            })
        }
        Status::Suspended => {
            let image = node.checkpoint_dir(&row.id);
            Ok(Frozen {
                image: node.runtime.has_image(&image).then_some(image),
                temporary: false,
                was_running: false,
            })
        }
        other => Err(ControlError::conflict(
            "invalid_state",
            format!("a {other} sandbox cannot be copied"),
        )),
    }
}

/// Bring a frozen sandbox back as it was. If its memory cannot be restored it boots with its
/// files, and if even that fails it is marked failed.
async fn thaw(node: &Arc<Node>, row: &Sandbox, frozen: &Frozen) -> Result<(), ControlError> {
    if !frozen.was_running {
        return Ok(());
    }
    let Err(e) = boot(node, row, frozen.image.as_deref()).await else {
        return Ok(());
    };
    tracing::error!(sandbox = %row.id, error = %DisplayChain(&e), "restoring after a copy failed; booting with files");
    if let Err(e) = boot(node, row, None).await {
        node.store
            .sandboxes
            .mark_failed(
                &row.id,
                &format!("could not be restarted after a copy: {}", DisplayChain(&e)),
                now_ms(),
            )
            .await?;
        return Ok(());
    }
    node.store
        .sandboxes
        .note_running(
            &row.id,
            Some("memory was lost while copying; files were kept"),
            now_ms(),
        )
        .await?;
    Ok(())
}

/// A new row that copies `parent`'s settings.
fn child_of(node: &Node, parent: &Sandbox) -> Sandbox {
    let now = now_ms();
    let id = new_sandbox_id();
    Sandbox {
        runtime_id: format!("{}-{}", node.cfg.prefix, id),
        id: id.into(),
        status: Status::Creating,
        expires_at: parent.timeout_ms.map(|t| now + t),
        last_active_at: now,
        slot: None,
        error: None,
        created_at: now,
        updated_at: now,
        remote_image: None,
        ..parent.clone()
    }
}

/// Boot a child from the parent's image (or cold, when there is none) and mark it running;
/// on failure tear it down and mark it failed.
async fn start_child(
    node: &Arc<Node>,
    row: Sandbox,
    image: Option<&Path>,
) -> Result<Sandbox, ControlError> {
    let lock = node.lock_of(&row.id);
    let _guard = lock.write().await;
    match boot(node, &row, image).await {
        Ok(()) => {
            let now = now_ms();
            phases::timed(Phase::Store, async {
                let note = super::boot::running_note(node, &row.id, None)
                    .await
                    .unwrap_or_default();
                node.store
                    .sandboxes
                    .transition(&row.id, Transition::Started, note.as_deref(), now)
                    .await
            })
            .await?;
            let mut row = row;
            row.status = Status::Running;
            Ok(row)
        }
        Err(e) => {
            let message = format!("could not start: {}", DisplayChain(&e));
            node.teardown(&row.id, &row.runtime_id, None).await;
            let _ = node
                .store
                .sandboxes
                .mark_failed(&row.id, &message, now_ms())
                .await;
            Err(e)
        }
    }
}

/// `POST /v1/sandboxes/{id}/fork`: `count` children with the parent's files, memory and
/// settings, each in its own network slot. Returns one result per child, in order.
pub async fn fork(
    node: &Arc<Node>,
    workspace_id: &str,
    parent_id: &str,
    count: u32,
    admitted: &super::boot::Admitted<'_>,
) -> Result<Vec<Result<Sandbox, ControlError>>, ControlError> {
    let t0 = std::time::Instant::now();
    let span = tracing::debug_span!(
        "sandbox.fork",
        sandbox.id = %parent_id,
        sandbox.fork_count = count,
        otel.status_code = tracing::field::Empty,
    );
    let forked = fork_untimed(node, workspace_id, parent_id, count, admitted)
        .instrument(span.clone())
        .await;
    crate::trace::outcome(&span, &forked);
    node.metrics.observe("fork", "", t0, &forked);
    if let Ok(children) = &forked {
        for child in children.iter().flatten() {
            node.event(
                &child.id,
                "forked",
                serde_json::json!({"parent": parent_id}),
            )
            .await;
        }
    }
    forked
}

async fn fork_untimed(
    node: &Arc<Node>,
    workspace_id: &str,
    parent_id: &str,
    count: u32,
    admitted: &super::boot::Admitted<'_>,
) -> Result<Vec<Result<Sandbox, ControlError>>, ControlError> {
    if !(1..=MAX_FORK).contains(&count) {
        return Err(ControlError::invalid(
            "invalid_count",
            format!("count must be between 1 and {MAX_FORK}"),
        ));
    }
    node.ensure_taking_new().await?;
    node.ensure_free_disk()?;
    let lock = node.lock_of(parent_id);
    let guard = lock.write().await;
    let parent = super::boot::owned(node, workspace_id, parent_id).await?;
    let started = std::time::Instant::now();
    let frozen = freeze(node, &parent).await?;

    // Claim slots and copy files while the parent is stopped, so every child sees the same
    // files as the memory image.
    // Each insert checks the running quota in the store: children past it fail alone.
    // Children mount the parent's volumes read-only (one writer per volume: the parent).
    let child_volumes: Vec<VolumeMountRow> = match node.store.volumes.mounts_of(&parent.id).await {
        Ok(mounts) => mounts
            .into_iter()
            .map(|m| VolumeMountRow {
                read_only: true,
                ..m
            })
            .collect(),
        Err(e) => {
            thaw(node, &parent, &frozen).await?;
            return Err(e);
        }
    };
    let mut pending: Vec<Result<Sandbox, ControlError>> = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let mut row = child_of(node, &parent);
        if let Err(e) = admitted
            .count(insert_with_slot(node, &mut row), |_| 1)
            .await
        {
            pending.push(Err(e));
            continue;
        }
        // A child holds its parent's secrets: the same lineage (CA) and placeholders.
        let recorded = match node.store.secrets.held(&parent.id).await {
            Ok(Some(held)) => node.store.secrets.bind(&row.id, &held).await,
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        let recorded = match recorded {
            Ok(()) => node.store.volumes.add_mounts(&row.id, &child_volumes).await,
            Err(e) => Err(e),
        };
        let copied = match recorded {
            Ok(()) => {
                phases::timed(
                    Phase::Copy,
                    node.runtime
                        .copy_files(&node.state_dir(&parent.id), &node.state_dir(&row.id)),
                )
                .await
            }
            Err(e) => Err(sandpit_runtime::RuntimeError::Volume {
                dir: node.state_dir(&row.id),
                reason: format!("recording its volumes: {}", DisplayChain(&e)),
            }),
        };
        match copied {
            Ok(()) => pending.push(Ok(row)),
            Err(e) => {
                let e = ControlError::from(e);
                node.teardown(&row.id, &row.runtime_id, None).await;
                let _ = node
                    .store
                    .sandboxes
                    .mark_failed(
                        &row.id,
                        &format!("copying files: {}", DisplayChain(&e)),
                        now_ms(),
                    )
                    .await;
                pending.push(Err(e));
            }
        }
    }
    let copied_ms = started.elapsed().as_millis() as u64;
    crate::faults::point("fork.copied");

    // The parent comes back while its children start: both restore from the same image.
    let parent_back = async {
        let thawed = thaw(node, &parent, &frozen).await;
        crate::faults::point("fork.parent_restored");
        drop(guard);
        thawed
    };
    let image = frozen.image.as_deref();
    let children = futures::stream::iter(pending)
        .map(|p| async move {
            match p {
                Ok(row) => start_child(node, row, image).await,
                Err(e) => Err(e),
            }
        })
        .buffered(PARALLEL_RESTORES)
        .collect::<Vec<_>>();
    let (thawed, results) = tokio::join!(parent_back, children);
    if frozen.temporary
        && let Some(dir) = &frozen.image
    {
        let _ = std::fs::remove_dir_all(dir);
    }
    tracing::info!(parent = %parent_id, count, copied_ms, elapsed_ms = started.elapsed().as_millis() as u64, "forked");
    super::boot::log_phases(parent_id, "fork");
    thawed?;
    Ok(results)
}

/// Disk used below `dir`, in bytes (allocated blocks, so shared reflinks count fully).
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
            }
        }
    }
    total
}

pub fn snapshot_to_api(s: &SnapshotRow) -> Snapshot {
    Snapshot {
        id: s.id.clone(),
        sandbox_id: s.sandbox_id.clone(),
        template: s.template_name.clone(),
        created_at: rfc3339(s.created_at),
        size_bytes: s.size_bytes as u64,
        image: super::stored::snapshot_image_api(s),
    }
}

/// `POST /v1/sandboxes/{id}/snapshots`: save the sandbox's files and memory under a new
/// snapshot id. A running sandbox keeps running (see the module docs for what it sees).
pub async fn take_snapshot(
    node: &Arc<Node>,
    workspace_id: &str,
    sandbox_id: &str,
) -> Result<SnapshotRow, ControlError> {
    node.ensure_free_disk()?;
    // Refused early when the workspace keeps its limit already; the insert checks again
    // (atomically), for snapshots taken at the same time.
    let max = node.cfg.quotas.max_snapshots;
    if max > 0 && node.store.snapshots.count(workspace_id).await? >= i64::from(max) {
        return Err(snapshots_quota(max));
    }
    let lock = node.lock_of(sandbox_id);
    let _guard = lock.write().await;
    let row = super::boot::owned(node, workspace_id, sandbox_id).await?;
    let frozen = freeze(node, &row).await?;
    let id = new_id("snap");
    let dir = snapshot_dir(node, &id);
    let saved = save_snapshot(node, &row, &frozen, &dir).await;
    thaw(node, &row, &frozen).await?;
    let has_memory = match saved {
        Ok(has_memory) => has_memory,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            if frozen.temporary
                && let Some(image) = &frozen.image
            {
                let _ = std::fs::remove_dir_all(image);
            }
            return Err(e);
        }
    };
    // The parent is restored: the temporary image now belongs to the snapshot.
    if frozen.temporary
        && let Some(image) = &frozen.image
    {
        std::fs::rename(image, dir.join("memory")).map_err(|source| ControlError::Files {
            what: format!("moving the memory image into snapshot {id}"),
            source,
        })?;
    }
    let snap = SnapshotRow {
        id,
        workspace_id: row.workspace_id.to_string(),
        sandbox_id: row.id.to_string(),
        template_id: row.template_id.clone(),
        template_name: row.template_name.clone(),
        size: row.size.clone(),
        env: row.env.raw().to_string(),
        egress: row.egress.raw().to_string(),
        has_memory,
        size_bytes: disk_usage(&dir) as i64,
        created_at: now_ms(),
        remote_image: super::stored::uploading_record(node, has_memory),
    };
    // References first: they count only once the snapshot's row exists.
    let refs = node.store.volumes.mounts_of(&row.id).await?;
    node.store
        .volumes
        .add_snapshot_refs(&snap.id, &refs)
        .await?;
    if !node.store.snapshots.insert(&snap, max).await? {
        let _ = std::fs::remove_dir_all(&dir);
        let _ = node.store.volumes.forget_snapshot(&snap.id).await;
        return Err(snapshots_quota(max));
    }
    // In the background, after the answer: other nodes can start from it once stored.
    super::stored::start_snapshot_upload(node, &snap);
    Ok(snap)
}

fn snapshots_quota(max: u32) -> ControlError {
    ControlError::Kept {
        limit: "max_snapshots",
        value: max,
        what: "delete snapshots this workspace no longer needs".into(),
    }
}

/// Copy the frozen sandbox's files (and, for a suspended one, its image) into `dir`.
/// Returns whether the snapshot has memory.
async fn save_snapshot(
    node: &Node,
    row: &Sandbox,
    frozen: &Frozen,
    dir: &Path,
) -> Result<bool, ControlError> {
    std::fs::create_dir_all(dir).map_err(|source| ControlError::Files {
        what: format!("snapshot directory {}", dir.display()),
        source,
    })?;
    node.runtime
        .copy_files(&node.state_dir(&row.id), &dir.join("files"))
        .await?;
    match (&frozen.image, frozen.temporary) {
        (Some(image), false) => {
            // A suspended sandbox's own image: copy it, the sandbox still needs it to wake.
            copy_dir(image, &dir.join("memory"))?;
            Ok(true)
        }
        (Some(_), true) => Ok(true), // moved in after the parent is restored
        (None, _) => Ok(false),
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), ControlError> {
    let err = |source| ControlError::Files {
        what: format!("copying {} to {}", from.display(), to.display()),
        source,
    };
    std::fs::create_dir_all(to).map_err(err)?;
    for e in std::fs::read_dir(from).map_err(err)? {
        let e = e.map_err(err)?;
        if e.file_type().map_err(err)?.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).map_err(err)?;
        }
    }
    Ok(())
}

/// Start a new sandbox (row inserted, slot claimed) from a snapshot's files and memory
/// (in place: [`super::stored::ensure_snapshot`]). A snapshot fetched from a node whose
/// runtime build differs has no memory image here: it boots from its files.
pub async fn boot_from_snapshot(
    node: &Node,
    row: &Sandbox,
    snap: &SnapshotRow,
) -> Result<(), ControlError> {
    let dir = snapshot_dir(node, &snap.id);
    phases::timed(
        Phase::Copy,
        node.runtime
            .copy_files(&dir.join("files"), &node.state_dir(&row.id)),
    )
    .await?;
    let memory = dir.join("memory");
    let restore = snap.has_memory && node.runtime.has_image(&memory);
    boot(node, row, restore.then_some(memory.as_path())).await
}

/// `DELETE /v1/snapshots/{id}`: the snapshot, its files here and its image in object
/// storage go; sandboxes started from it are unaffected (they have their own copies).
/// Copies other nodes fetched are never used again (a create looks the row up first) and
/// are removed by those nodes' next reconciliation.
pub async fn delete_snapshot(
    node: &Node,
    workspace_id: &str,
    id: &str,
) -> Result<(), ControlError> {
    let not_found = || ControlError::not_found("snapshot_not_found", format!("no snapshot {id:?}"));
    if node.store.snapshots.get(workspace_id, id).await?.is_none() {
        return Err(not_found());
    }
    // No upload of it runs here past this point, so the record read next is its last
    // (an upload on another node that finishes later forgets its own image).
    super::uploads::stop_upload(node, id).await;
    let Some(snap) = node.store.snapshots.get(workspace_id, id).await? else {
        return Err(not_found());
    };
    if !node.store.snapshots.delete(workspace_id, id).await? {
        return Err(not_found());
    }
    super::stored::forget_snapshot(node, &snap).await;
    node.store.volumes.forget_snapshot(id).await?;
    let dir = snapshot_dir(node, id);
    if dir.exists()
        && let Err(e) = std::fs::remove_dir_all(&dir)
    {
        tracing::error!(snapshot = %id, error = %e, "removing snapshot files");
    }
    node.forget_lock(id);
    Ok(())
}
