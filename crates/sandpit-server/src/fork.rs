//! Fork and named snapshots. Both freeze a sandbox (a memory image plus a copy of its files
//! taken while it is stopped), then start new sandboxes from that pair.
//!
//! What the parent of a running fork sees: it is checkpointed and restored in place, so its
//! processes pause for a few hundred milliseconds and blocking system calls return EINTR once;
//! open TCP connections through previews are cut (gVisor cannot checkpoint them).
#![expect(
    clippy::disallowed_methods,
    reason = "checkpoint images and snapshot dirs are written by runsc and the server under the data dir (a sandbox's files travel inside its disk image)"
)]

use sandpit_control::{Status, Transition};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use sandpit_api_types::{ErrorBodyRef, ErrorDetail, ForkResult, Snapshot};

use crate::error::{ApiError, ControlError, DisplayChain};
use crate::extract::Authorized;
use crate::lifecycle::{boot, current, insert_with_slot, to_api};
use crate::server::Server;
use crate::store::{Sandbox, SnapshotRow};
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

pub fn snapshot_dir(server: &Server, id: &str) -> PathBuf {
    server.cfg.data_dir.join("snapshots").join(id)
}

fn temp_image_dir(server: &Server) -> PathBuf {
    server.cfg.data_dir.join("images-tmp").join(random_hex(8))
}

/// Stop `row` with its memory saved (if running) so its files can be copied. The caller
/// holds the sandbox's write lock.
async fn freeze(server: &Arc<Server>, row: &Sandbox) -> Result<Frozen, ApiError> {
    match row.status {
        Status::Running => {
            // Open preview connections would make gVisor refuse the checkpoint.
            server.previews.cut(&row.id).await;
            let image = temp_image_dir(server);
            if let Err(e) = server.runtime.checkpoint(&row.runtime_id, &image).await {
                // gVisor kills a sandbox whose checkpoint it refuses: bring it back with its
                // files, then tell the caller why nothing was copied.
                tracing::error!(sandbox = %row.id, error = %DisplayChain(&e), "checkpoint for a copy failed");
                let _ = std::fs::remove_dir_all(&image);
                let _ = server
                    .runtime
                    .stop(&row.runtime_id, &server.state_dir(&row.id))
                    .await;
                if let Some(slot) = row.slot {
                    let _ = server.net.detach(slot as u32).await;
                }
                if let Err(e) = boot(server, row, None).await {
                    server
                        .store
                        .sandboxes
                        .mark_failed(
                            &row.id,
                            &format!("lost after a failed checkpoint: {}", DisplayChain(&e)),
                            now_ms(),
                        )
                        .await?;
                }
                return Err(ApiError::conflict(
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
            let image = server.checkpoint_dir(&row.id);
            Ok(Frozen {
                image: server.runtime.has_image(&image).then_some(image),
                temporary: false,
                was_running: false,
            })
        }
        other => Err(ApiError::conflict(
            "invalid_state",
            format!("a {other} sandbox cannot be copied"),
        )),
    }
}

/// Bring a frozen sandbox back as it was. If its memory cannot be restored it boots with its
/// files, and if even that fails it is marked failed.
async fn thaw(server: &Arc<Server>, row: &Sandbox, frozen: &Frozen) -> Result<(), ControlError> {
    if !frozen.was_running {
        return Ok(());
    }
    let Err(e) = boot(server, row, frozen.image.as_deref()).await else {
        return Ok(());
    };
    tracing::error!(sandbox = %row.id, error = %DisplayChain(&e), "restoring after a copy failed; booting with files");
    if let Err(e) = boot(server, row, None).await {
        server
            .store
            .sandboxes
            .mark_failed(
                &row.id,
                &format!("could not be restarted after a copy: {}", DisplayChain(&e)),
                now_ms(),
            )
            .await?;
        return Ok(());
    }
    server
        .store
        .sandboxes
        .note_running(
            &row.id,
            Some("memory was lost while copying; files were kept"),
            now_ms(),
        )
        .await?;
    Ok(())
}

fn error_result(e: ApiError) -> ForkResult {
    ForkResult::Err(ErrorBodyRef {
        error: ErrorDetail {
            code: e.code.to_string(),
            message: e.message,
        },
    })
}

/// A new row that copies `parent`'s settings.
fn child_of(server: &Server, parent: &Sandbox) -> Sandbox {
    let now = now_ms();
    let id = new_sandbox_id();
    Sandbox {
        runtime_id: format!("{}-{}", server.cfg.prefix, id),
        id,
        status: Status::Creating,
        expires_at: parent.timeout_ms.map(|t| now + t),
        last_active_at: now,
        slot: None,
        error: None,
        created_at: now,
        updated_at: now,
        ..parent.clone()
    }
}

/// Boot a child from the parent's image (or cold, when there is none) and mark it running;
/// on failure tear it down and mark it failed.
async fn start_child(server: &Arc<Server>, row: Sandbox, image: Option<&Path>) -> ForkResult {
    let lock = server.lock_of(&row.id);
    let _guard = lock.write().await;
    match boot(server, &row, image).await {
        Ok(()) => {
            let now = now_ms();
            let note = crate::lifecycle::running_note(server, &row.id, None)
                .await
                .unwrap_or_default();
            if let Err(e) = server
                .store
                .sandboxes
                .transition(&row.id, Transition::Started, note.as_deref(), now)
                .await
            {
                return error_result(e.into());
            }
            let mut row = row;
            row.status = Status::Running;
            ForkResult::Ok(Box::new(to_api(&row)))
        }
        Err(e) => {
            let message = format!("could not start: {}", DisplayChain(&e));
            server.teardown(&row.id, &row.runtime_id, None).await;
            let _ = server
                .store
                .sandboxes
                .mark_failed(&row.id, &message, now_ms())
                .await;
            error_result(e.into())
        }
    }
}

/// `POST /v1/sandboxes/{id}/fork`: `count` children with the parent's files, memory and
/// settings, each in its own network slot. Returns one result per child, in order.
pub async fn fork(
    server: &Arc<Server>,
    sb: &Authorized,
    count: u32,
) -> Result<Vec<ForkResult>, ApiError> {
    let parent_id = sb.id();
    if !(1..=MAX_FORK).contains(&count) {
        return Err(ApiError::bad_request(
            "invalid_count",
            format!("count must be between 1 and {MAX_FORK}"),
        ));
    }
    server.ensure_free_disk()?;
    // Held until the children's rows are in the store, which then counts them as running.
    let mut reservation = server
        .limits
        .admit(
            &server.store,
            sb.workspace_id(),
            count,
            sb.row().mode == sandpit_api_types::SandboxMode::Persistent,
        )
        .await?;
    let lock = server.lock_of(parent_id);
    let guard = lock.write().await;
    let parent = current(server, sb).await?;
    let started = std::time::Instant::now();
    let frozen = freeze(server, &parent).await?;

    // Claim slots and copy files while the parent is stopped, so every child sees the same
    // files as the memory image.
    let mut pending: Vec<Result<Sandbox, ApiError>> = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let mut row = child_of(server, &parent);
        let inserted = server
            .limits
            .fill(
                &mut reservation,
                insert_with_slot(server, &mut row),
                |r: &Result<(), _>| r.is_ok() as u32,
            )
            .await;
        if let Err(e) = inserted {
            pending.push(Err(e.into()));
            continue;
        }
        let copied = server
            .runtime
            .copy_files(&server.state_dir(&parent.id), &server.state_dir(&row.id))
            .await;
        match copied {
            Ok(()) => pending.push(Ok(row)),
            Err(e) => {
                let e = ControlError::from(e);
                server.teardown(&row.id, &row.runtime_id, None).await;
                let _ = server
                    .store
                    .sandboxes
                    .mark_failed(
                        &row.id,
                        &format!("copying files: {}", DisplayChain(&e)),
                        now_ms(),
                    )
                    .await;
                pending.push(Err(e.into()));
            }
        }
    }
    drop(reservation);
    let copied_ms = started.elapsed().as_millis() as u64;
    crate::faults::point("fork.copied");

    // The parent comes back while its children start: both restore from the same image.
    let parent_back = async {
        let thawed = thaw(server, &parent, &frozen).await;
        crate::faults::point("fork.parent_restored");
        drop(guard);
        thawed
    };
    let image = frozen.image.as_deref();
    let children = futures::stream::iter(pending)
        .map(|p| async move {
            match p {
                Ok(row) => start_child(server, row, image).await,
                Err(e) => error_result(e),
            }
        })
        .buffered(PARALLEL_RESTORES)
        .collect::<Vec<ForkResult>>();
    let (thawed, results) = tokio::join!(parent_back, children);
    if frozen.temporary
        && let Some(dir) = &frozen.image
    {
        let _ = std::fs::remove_dir_all(dir);
    }
    tracing::info!(parent = %parent_id, count, copied_ms, elapsed_ms = started.elapsed().as_millis() as u64, "forked");
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
    }
}

/// `POST /v1/sandboxes/{id}/snapshots`: save the sandbox's files and memory under a new
/// snapshot id. A running sandbox keeps running (see the module docs for what it sees).
pub async fn take_snapshot(server: &Arc<Server>, sb: &Authorized) -> Result<SnapshotRow, ApiError> {
    let sandbox_id = sb.id();
    server.ensure_free_disk()?;
    // Refused early when the workspace keeps its limit already; the insert checks again
    // (atomically), for snapshots taken at the same time.
    let max = server.limits.cfg.max_snapshots;
    if max > 0 && server.store.snapshots.count(sb.workspace_id()).await? >= i64::from(max) {
        return Err(snapshots_quota(max));
    }
    let lock = server.lock_of(sandbox_id);
    let _guard = lock.write().await;
    let row = current(server, sb).await?;
    let frozen = freeze(server, &row).await?;
    let id = new_id("snap");
    let dir = snapshot_dir(server, &id);
    let saved = save_snapshot(server, &row, &frozen, &dir).await;
    thaw(server, &row, &frozen).await?;
    let has_memory = match saved {
        Ok(has_memory) => has_memory,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            if frozen.temporary
                && let Some(image) = &frozen.image
            {
                let _ = std::fs::remove_dir_all(image);
            }
            return Err(e.into());
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
        workspace_id: row.workspace_id.clone(),
        sandbox_id: row.id.clone(),
        template_id: row.template_id.clone(),
        template_name: row.template_name.clone(),
        size: row.size.clone(),
        env: row.env.raw().to_string(),
        egress: row.egress.raw().to_string(),
        has_memory,
        size_bytes: disk_usage(&dir) as i64,
        created_at: now_ms(),
    };
    if !server.store.snapshots.insert(&snap, max).await? {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(snapshots_quota(max));
    }
    Ok(snap)
}

fn snapshots_quota(max: u32) -> ApiError {
    ApiError::quota(
        axum::http::StatusCode::INSUFFICIENT_STORAGE,
        "max_snapshots",
        max,
        "delete snapshots this workspace no longer needs",
    )
}

/// Copy the frozen sandbox's files (and, for a suspended one, its image) into `dir`.
/// Returns whether the snapshot has memory.
async fn save_snapshot(
    server: &Server,
    row: &Sandbox,
    frozen: &Frozen,
    dir: &Path,
) -> Result<bool, ControlError> {
    std::fs::create_dir_all(dir).map_err(|source| ControlError::Files {
        what: format!("snapshot directory {}", dir.display()),
        source,
    })?;
    server
        .runtime
        .copy_files(&server.state_dir(&row.id), &dir.join("files"))
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

/// Start a new sandbox (row inserted, slot claimed) from a snapshot's files and memory.
pub async fn boot_from_snapshot(
    server: &Server,
    row: &Sandbox,
    snap: &SnapshotRow,
) -> Result<(), ControlError> {
    let dir = snapshot_dir(server, &snap.id);
    server
        .runtime
        .copy_files(&dir.join("files"), &server.state_dir(&row.id))
        .await?;
    let memory = dir.join("memory");
    boot(server, row, snap.has_memory.then_some(memory.as_path())).await
}

/// `DELETE /v1/snapshots/{id}`: the snapshot and its files go; sandboxes started from it are
/// unaffected (they have their own copies).
pub async fn delete_snapshot(
    server: &Server,
    workspace_id: &str,
    id: &str,
) -> Result<(), ApiError> {
    if !server.store.snapshots.delete(workspace_id, id).await? {
        return Err(ApiError::not_found(
            "snapshot_not_found",
            format!("no snapshot {id:?}"),
        ));
    }
    let dir = snapshot_dir(server, id);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        tracing::error!(snapshot = %id, error = %e, "removing snapshot files");
    }
    Ok(())
}
