//! Moving hibernated sandboxes between nodes through object storage (see [`crate::remote`]):
//! the background upload after a suspend, the take-over by another node when the owner is
//! lost or draining, and the drain that hibernates a node's sandboxes so they can move.
//!
//! Invariants:
//! - Only the owner uploads, only while the sandbox is suspended; every record of the
//!   upload's result is conditional on the record it started from, so a wake, destroy or
//!   later suspend that overtook it wins.
//! - A sandbox's files are never read for an upload while it could run: a wake or destroy
//!   cancels the upload and waits for it before touching them ([`stop_upload`]).
//! - A take-over fetches first and moves the row second (one conditional UPDATE): a failed
//!   fetch changes nothing, and of two nodes taking the same sandbox one wins and the other
//!   removes what it fetched.
#![expect(
    clippy::disallowed_methods,
    reason = "checkpoint images, staging and pulled image directories are node-owned paths under the data dir"
)]

use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Node;
pub(super) use super::uploads::stop_upload;
use super::uploads::{FILES_DIR, MEMORY_DIR, Upload, forget_in_background};
use crate::error::{ControlError, DisplayChain};
use crate::remote::{ImageKind, ImageStore, RemoteImage, RemoteState};
use crate::store::Sandbox;
use crate::util::{now_ms, random_hex};
use crate::{Status, Stored};

/// After a suspend (the caller holds the sandbox's write lock and the row is suspended):
/// record the upload as under way and start it in the background. Without an image store,
/// nothing.
pub(super) async fn start_upload(node: &Arc<Node>, row: &Sandbox) -> Result<(), ControlError> {
    let Some(images) = node.image_store().cloned() else {
        return Ok(());
    };
    // Its volumes stay on this node, so it cannot wake anywhere else: nothing to upload.
    if !node.store.volumes.mounts_of(&row.id).await?.is_empty() {
        return Ok(());
    }
    let memory = node.runtime.has_image(&node.checkpoint_dir(&row.id));
    let record = RemoteImage {
        state: RemoteState::Uploading,
        upload: random_hex(8),
        reference: None,
        runtime: node.runtime.build(),
        memory,
        bytes: None,
        uploaded: None,
        error: None,
        at: now_ms(),
    };
    let stored = Stored::encode(&record);
    let current = node.store.sandboxes.get(&row.id).await?;
    let expect = current
        .as_ref()
        .and_then(|r| r.remote_image.as_ref())
        .map(|r| r.raw().to_string());
    // The image of the previous hibernation, kept while the sandbox ran (see
    // [`after_wake`]): replaced by this one, forgotten once this upload ends.
    let previous = current
        .as_ref()
        .and_then(stored_image)
        .and_then(|r| r.reference);
    if !node
        .store
        .sandboxes
        .set_remote_image(
            &row.id,
            &node.cfg.node_id,
            expect.as_deref(),
            Some(stored.raw()),
            record.at,
        )
        .await?
    {
        return Ok(());
    }
    let cancel = CancellationToken::new();
    let task = {
        let (node, id, cancel) = (node.clone(), row.id.to_string(), cancel.clone());
        let state_dir = node.state_dir(&id);
        let stage = node.staging_dir(&id, "push");
        tokio::spawn(async move {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => None,
                r = upload(&node, &*images, &id, &state_dir, &stage, memory) => Some(r),
            };
            // Also after a cancel: its hard links would keep a disk's blocks alive.
            if stage.exists()
                && let Err(e) = sandpit_fs::remove_tree(&stage)
            {
                tracing::warn!(path = %stage.display(), error = %e, "removing an upload's staging directory");
            }
            let pushed = finish_upload(&node, &images, &id, &record, stored.raw(), outcome).await;
            // The row no longer names the previous image (this upload's record replaced
            // it), unless this push produced the very same content.
            if let Some(previous) = previous
                && pushed.as_deref() != Some(previous.as_str())
            {
                forget_in_background(images.clone(), previous);
            }
        })
    };
    let old = node
        .uploads
        .lock()
        .expect("upload map poisoned")
        .insert(row.id.to_string(), Upload { cancel, done: task });
    if let Some(old) = old {
        old.cancel.cancel();
    }
    Ok(())
}

/// Stage hard links to the memory image and the packed files, and push them. `Ok(None)`:
/// the files cannot move.
async fn upload(
    node: &Node,
    images: &dyn ImageStore,
    id: &str,
    state_dir: &Path,
    stage: &Path,
    memory: bool,
) -> Result<Option<crate::remote::Pushed>, String> {
    let memory_from = node.checkpoint_dir(id);
    let memory_from = memory.then_some(memory_from.as_path());
    let Some((pushed, took)) = super::uploads::stage_and_push(
        node,
        images,
        state_dir,
        memory_from,
        stage,
        ImageKind::Hibernation,
    )
    .await?
    else {
        return Ok(None);
    };
    let secs = took.as_secs_f64();
    tracing::info!(sandbox = %id, bytes = pushed.bytes, uploaded = pushed.uploaded, ms = (secs * 1000.0) as u64, mb_per_s = (pushed.uploaded as f64 / 1e6 / secs.max(1e-3)) as u64, "image stored remotely");
    Ok(Some(pushed))
}

/// Record how an upload ended, if the row still holds the record it started from. The
/// reference the row holds now, if this upload stored one and it was recorded.
async fn finish_upload(
    node: &Node,
    images: &Arc<dyn ImageStore>,
    id: &str,
    started: &RemoteImage,
    started_raw: &str,
    outcome: Option<Result<Option<crate::remote::Pushed>, String>>,
) -> Option<String> {
    let mut record = started.clone();
    record.at = now_ms();
    let mut pushed_ref = None;
    match outcome {
        None => {
            tracing::info!(sandbox = %id, "upload cancelled (the sandbox woke or went)");
            // No upload runs any more: a record left `uploading` would never end (if the
            // wake that cancelled it fails, the sandbox stays suspended, here only).
            if let Err(e) = node
                .store
                .sandboxes
                .set_remote_image(id, &node.cfg.node_id, Some(started_raw), None, record.at)
                .await
            {
                tracing::warn!(sandbox = %id, error = %DisplayChain(&e), "clearing a cancelled upload's record");
            }
            return None;
        }
        Some(Ok(Some(p))) => {
            record.state = RemoteState::Stored;
            record.reference = Some(p.reference.clone());
            record.bytes = Some(p.bytes);
            record.uploaded = Some(p.uploaded);
            pushed_ref = Some(p.reference);
        }
        Some(Ok(None)) => {
            record.state = RemoteState::Unsupported;
            record.error = Some(
                "its files are not on a disk image (the server runs with --disk-limit off), so it wakes only on its own node".into(),
            );
        }
        Some(Err(e)) => {
            tracing::error!(sandbox = %id, error = %e, "upload failed; the sandbox wakes only on this node");
            record.state = RemoteState::Failed;
            record.error = Some(e);
        }
    }
    let stored = Stored::encode(&record);
    let recorded = node
        .store
        .sandboxes
        .set_remote_image(
            id,
            &node.cfg.node_id,
            Some(started_raw),
            Some(stored.raw()),
            record.at,
        )
        .await;
    node.uploads.lock().expect("upload map poisoned").remove(id);
    match recorded {
        Ok(true) => pushed_ref,
        Ok(false) => {
            // Overtaken: the image describes a state the sandbox left.
            if let Some(r) = pushed_ref {
                forget_in_background(images.clone(), r);
            }
            None
        }
        Err(e) => {
            tracing::error!(sandbox = %id, error = %DisplayChain(&e), "recording an upload's result");
            None
        }
    }
}

/// After a wake: a stored image stays recorded while the sandbox runs, as its latest image:
/// if its node is lost before the next hibernation, the fleet restores it from that image
/// elsewhere (`membership::sweep`), and the next hibernation's upload replaces it. Any other
/// record (failed, unsupported) goes.
pub(super) async fn after_wake(node: &Node, row: &Sandbox) -> Result<(), ControlError> {
    if stored_image(row).is_some() {
        return Ok(());
    }
    drop_remote(node, row).await
}

/// After a destroy (or a wake without a stored image): the remote image describes a state
/// the sandbox left; drop it.
pub(super) async fn drop_remote(node: &Node, row: &Sandbox) -> Result<(), ControlError> {
    let Some(raw) = &row.remote_image else {
        return Ok(());
    };
    node.store
        .sandboxes
        .clear_remote_image(&row.id, now_ms())
        .await?;
    if let (Some(images), Ok(record)) = (node.image_store().cloned(), raw.decode(String::new))
        && let Some(reference) = record.reference
    {
        forget_in_background(images, reference);
    }
    Ok(())
}

/// Whether node `owner` can wake its own sandboxes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Its lease holds and it takes sandboxes: it wakes its own.
    Live,
    /// Its lease holds but it is draining: its hibernated sandboxes move once their image
    /// is stored; until then it keeps them.
    Draining,
    /// Lost, lapsed or forgotten: its hibernated sandboxes move if their image is stored,
    /// and can be destroyed from any node.
    Gone,
}

/// The state of node `owner`, by the database's clock.
pub async fn owner_state(node: &Node, owner: &str) -> Result<Owner, ControlError> {
    let now = node.store.nodes.now().await?;
    Ok(match node.store.nodes.get(owner).await? {
        None => Owner::Gone,
        Some(n) if n.status == crate::store::NodeStatus::Lost || n.lease_until <= now => {
            Owner::Gone
        }
        Some(n) if n.status == crate::store::NodeStatus::Draining => Owner::Draining,
        Some(_) => Owner::Live,
    })
}

/// Whether this node answers for `row`, another node's sandbox, rather than its owner:
/// it is suspended and its owner is gone, or draining with the image stored remotely (a
/// wake then takes it over here).
pub async fn answers_here(node: &Node, row: &Sandbox) -> Result<bool, ControlError> {
    if node.is_mine(row) || row.status != Status::Suspended {
        return Ok(false);
    }
    Ok(match owner_state(node, &row.node_id).await? {
        Owner::Live => false,
        Owner::Draining => stored_image(row).is_some(),
        Owner::Gone => true,
    })
}

/// The stored remote image of `row`, if it has one.
pub fn stored_image(row: &Sandbox) -> Option<RemoteImage> {
    row.remote_image
        .as_ref()
        .and_then(|r| r.decode(String::new).ok())
        .filter(|r| r.state == RemoteState::Stored && r.reference.is_some())
}

/// Take suspended sandbox `row`, owned by another node, over to this one: fetch its image,
/// put its files and memory image in place, and move the row here. The caller holds the
/// sandbox's write lock (on this node) and checked that the owner is gone or draining.
/// 503 `image_not_stored` when its image is not in object storage; the row is unchanged
/// on any failure. Returns the moved row, and a note when its memory image cannot be used
/// here (the wake then boots it from its files and keeps the note).
pub(super) async fn take_over(
    node: &Arc<Node>,
    row: &Sandbox,
) -> Result<(Sandbox, Option<String>), ControlError> {
    let (Some(images), Some(record)) = (node.image_store().cloned(), stored_image(row)) else {
        let state = row
            .remote_image
            .as_ref()
            .and_then(|r| r.decode(String::new).ok())
            .map(|r: RemoteImage| r.state.as_str())
            .unwrap_or("none");
        return Err(ControlError::Unavailable {
            code: "image_not_stored",
            message: format!(
                "sandbox {} was suspended on node {:?}, which is lost or draining, and its image is not in object storage (remote state: {state}); it wakes when that node is back",
                row.id, row.node_id
            ),
        });
    };
    node.ensure_taking_new().await?;
    node.ensure_free_disk()?;
    // Its template's layers first (a built template's are where it was built).
    super::stored::ensure_layers(node, &row.template_id).await?;
    let reference = record.reference.clone().expect("stored_image checked it");
    let fetched = node.staging_dir(&row.id, "pull");
    super::uploads::fetch(
        &*images,
        &reference,
        &fetched,
        ImageKind::Hibernation,
        "image_fetch_failed",
        &format!("sandbox {}'s image", row.id),
    )
    .await?;
    let result = place_fetched(node, row, &record, &fetched).await;
    if let Err(e) = sandpit_fs::remove_tree(&fetched) {
        tracing::warn!(path = %fetched.display(), error = %e, "removing a fetched image");
    }
    result
}

async fn place_fetched(
    node: &Arc<Node>,
    row: &Sandbox,
    record: &RemoteImage,
    fetched: &Path,
) -> Result<(Sandbox, Option<String>), ControlError> {
    let id = row.id.as_str();
    let runtime_id = format!("{}-{}", node.cfg.prefix, id);
    let (state_dir, ckpt) = (node.state_dir(id), node.checkpoint_dir(id));
    // Left from an earlier stay here (the sandbox moved away and back): stale.
    node.teardown(id, &runtime_id, None).await;
    node.runtime
        .unpack_files(&fetched.join(FILES_DIR), &state_dir)
        .await?;
    let same_build = record.runtime == node.runtime.build();
    let mem = fetched.join(MEMORY_DIR);
    let note = if !record.memory {
        None
    } else if same_build {
        std::fs::rename(&mem, &ckpt).map_err(ControlError::files(format!(
            "memory image {}",
            ckpt.display()
        )))?;
        None
    } else {
        Some(format!(
            "moved from node {:?}, whose runtime ({}) differs from this node's ({}): started from its files, its processes were lost",
            row.node_id,
            record.runtime,
            node.runtime.build()
        ))
    };
    let now = now_ms();
    if !node
        .store
        .sandboxes
        .move_to(id, &row.node_id, &node.cfg.node_id, &runtime_id, now)
        .await?
    {
        node.teardown(id, &runtime_id, None).await;
        return Err(ControlError::conflict(
            "sandbox_busy",
            "another node took this sandbox over meanwhile; retry",
        ));
    }
    tracing::info!(sandbox = %id, from = %row.node_id, memory = record.memory && same_build, "took over a sandbox from another node");
    Ok((super::boot::existing(node, id).await?, note))
}

/// Wait until sandbox `id`'s upload ends (or `within` passes) and return its record if it
/// is stored remotely and the sandbox is still suspended here.
pub async fn wait_stored(
    node: &Node,
    id: &str,
    within: std::time::Duration,
) -> Result<Option<RemoteImage>, ControlError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let Some(row) = node.store.sandboxes.get(id).await? else {
            return Ok(None);
        };
        if row.status != Status::Suspended || !node.is_mine(&row) {
            return Ok(None);
        }
        let record: Option<RemoteImage> = row
            .remote_image
            .as_ref()
            .and_then(|r| r.decode(String::new).ok());
        match record {
            Some(r) if r.state == RemoteState::Uploading => {}
            Some(r) if r.state == RemoteState::Stored => return Ok(Some(r)),
            _ => return Ok(None),
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// After a restart: this node's suspended sandboxes whose upload was under way when the
/// process stopped upload again (a record left `uploading` would never end otherwise).
/// So do this node's named snapshots that are not stored yet ([`super::stored`]).
/// Call once the image store is set. How many restarted.
pub async fn resume_uploads(node: &Arc<Node>) -> Result<usize, ControlError> {
    if node.image_store().is_none() {
        return Ok(0);
    }
    let snapshots = super::stored::resume_snapshot_uploads(node).await?;
    super::stored::resume_layer_uploads(node).await?;
    let rows = node
        .store
        .sandboxes
        .with_status(&node.cfg.node_id, &[Status::Suspended])
        .await?;
    let mut n = 0;
    for row in rows {
        let unfinished = match &row.remote_image {
            None => true,
            Some(r) => r
                .decode(String::new)
                .map(|r: RemoteImage| r.state == RemoteState::Uploading)
                .unwrap_or(true),
        };
        if !unfinished {
            continue;
        }
        let lock = node.lock_of(&row.id);
        let _guard = lock.write().await;
        start_upload(node, &row).await?;
        n += 1;
    }
    if n > 0 {
        tracing::info!(
            sandboxes = n,
            "uploads of suspended sandboxes' images started again"
        );
    }
    Ok(n + snapshots)
}
