//! Named snapshots (and template layers) in object storage, so a sandbox starts on any node:
//! the node that made one uploads it in the background, and a node that lacks it fetches it
//! (every byte verified against the reference in the database) and publishes it by rename
//! before it boots from it. See [`crate::remote`] for the seam.
//!
//! Invariants:
//! - A snapshot's directory is complete or absent: a fetch lands in a temporary directory
//!   beside it and is renamed into place; a failed fetch leaves nothing and changes no row.
//! - A snapshot's record changes only from the record an upload started from
//!   (compare-and-set), so a delete that overtook an upload wins and the upload's image is
//!   forgotten.
//! - Local files are used only for a snapshot whose row exists: every create looks the row
//!   up first, and a delete removes the deleting node's copy (other nodes' copies are
//!   removed by their next reconciliation).
#![expect(
    clippy::disallowed_methods,
    reason = "snapshot directories, staging and fetched image directories are node-owned paths under the data dir (a snapshot's files travel inside its disk image)"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Node;
use super::uploads::{FILES_DIR, MEMORY_DIR, Upload, forget_in_background};
use crate::Stored;
use crate::error::{ControlError, DisplayChain};
use crate::remote::{ImageKind, ImageStore, Pushed, RemoteImage, RemoteState};
use crate::store::SnapshotRow;
use crate::util::{now_ms, random_hex};

/// Where named snapshot `id` lives on this node: `files/` (what the runtime's `copy_files`
/// made) and `memory/` (a memory image, when it has one).
pub fn snapshot_dir(node: &Node, id: &str) -> PathBuf {
    node.cfg.data_dir.join("snapshots").join(id)
}

/// The record a new snapshot is inserted with when this node has an image store: its
/// upload is under way ([`start_snapshot_upload`] starts it once the row exists).
pub(super) fn uploading_record(node: &Node, has_memory: bool) -> Option<String> {
    node.image_store()?;
    let record = RemoteImage {
        state: RemoteState::Uploading,
        upload: random_hex(8),
        reference: None,
        runtime: node.runtime.build(),
        memory: has_memory,
        bytes: None,
        uploaded: None,
        error: None,
        at: now_ms(),
    };
    Some(Stored::encode(&record).raw().to_string())
}

/// After a snapshot's row was inserted with an [`uploading_record`]: upload its directory
/// in the background (hard links staged under `images-tmp/`, so a delete meanwhile only
/// unlinks names). Without an image store or such a record, nothing.
pub(super) fn start_snapshot_upload(node: &Arc<Node>, snap: &SnapshotRow) {
    let (Some(images), Some(raw)) = (node.image_store().cloned(), snap.remote_image.clone()) else {
        return;
    };
    let Ok(record) = serde_json::from_str::<RemoteImage>(&raw) else {
        return;
    };
    if record.state != RemoteState::Uploading {
        return;
    }
    let cancel = CancellationToken::new();
    let task = {
        let (node, id, cancel) = (node.clone(), snap.id.clone(), cancel.clone());
        let dir = snapshot_dir(&node, &id);
        let stage = node.staging_dir(&id, "push");
        tokio::spawn(async move {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => None,
                r = upload_snapshot(&node, &*images, &id, &dir, &stage, record.memory) => Some(r),
            };
            if stage.exists()
                && let Err(e) = sandpit_fs::remove_tree(&stage)
            {
                tracing::warn!(path = %stage.display(), error = %e, "removing an upload's staging directory");
            }
            finish_snapshot_upload(&node, &images, &id, &record, &raw, outcome).await;
        })
    };
    let old = node
        .uploads
        .lock()
        .expect("upload map poisoned")
        .insert(snap.id.clone(), Upload { cancel, done: task });
    if let Some(old) = old {
        old.cancel.cancel();
    }
}

/// Stage hard links to the snapshot's packed files and memory image, and push them.
/// `Ok(None)`: its files cannot move (not on a disk image).
async fn upload_snapshot(
    node: &Node,
    images: &dyn ImageStore,
    id: &str,
    dir: &Path,
    stage: &Path,
    memory: bool,
) -> Result<Option<Pushed>, String> {
    let memory_from = dir.join(MEMORY_DIR);
    let memory_from = memory.then_some(memory_from.as_path());
    let Some((pushed, took)) = super::uploads::stage_and_push(
        node,
        images,
        &dir.join(FILES_DIR),
        memory_from,
        stage,
        ImageKind::Snapshot,
    )
    .await?
    else {
        return Ok(None);
    };
    tracing::info!(snapshot = %id, bytes = pushed.bytes, uploaded = pushed.uploaded, ms = took.as_millis() as u64, "snapshot stored remotely");
    Ok(Some(pushed))
}

/// Record how a snapshot's upload ended, if its row still holds the record the upload
/// started from; otherwise (deleted meanwhile) forget what it pushed.
async fn finish_snapshot_upload(
    node: &Node,
    images: &Arc<dyn ImageStore>,
    id: &str,
    started: &RemoteImage,
    started_raw: &str,
    outcome: Option<Result<Option<Pushed>, String>>,
) {
    let mut record = started.clone();
    record.at = now_ms();
    let mut pushed_ref = None;
    let next = match outcome {
        // Cancelled (the snapshot is being deleted): no upload runs any more.
        None => None,
        Some(Ok(Some(p))) => {
            record.state = RemoteState::Stored;
            record.reference = Some(p.reference.clone());
            record.bytes = Some(p.bytes);
            record.uploaded = Some(p.uploaded);
            pushed_ref = Some(p.reference);
            Some(Stored::encode(&record))
        }
        Some(Ok(None)) => {
            record.state = RemoteState::Unsupported;
            record.error = Some(
                "its files are not on a disk image (the server runs with --disk-limit off), so sandboxes start from it only on this node".into(),
            );
            Some(Stored::encode(&record))
        }
        Some(Err(e)) => {
            tracing::error!(snapshot = %id, error = %e, "snapshot upload failed; it is used only on this node");
            record.state = RemoteState::Failed;
            record.error = Some(e);
            Some(Stored::encode(&record))
        }
    };
    let recorded = node
        .store
        .snapshots
        .set_remote_image(id, Some(started_raw), next.as_ref().map(|s| s.raw()))
        .await;
    node.uploads.lock().expect("upload map poisoned").remove(id);
    match recorded {
        Ok(true) => {}
        Ok(false) => {
            if let Some(r) = pushed_ref {
                forget_in_background(images.clone(), r);
            }
        }
        Err(e) => {
            tracing::error!(snapshot = %id, error = %DisplayChain(&e), "recording a snapshot upload's result")
        }
    }
}

/// The stored remote image of snapshot `snap`, if it has one.
pub fn stored_snapshot(snap: &SnapshotRow) -> Option<RemoteImage> {
    snap.remote_image
        .as_deref()
        .and_then(|r| serde_json::from_str::<RemoteImage>(r).ok())
        .filter(|r| r.state == RemoteState::Stored && r.reference.is_some())
}

/// The API's view of a snapshot's record (a record that does not decode shows nothing).
pub fn snapshot_image_api(snap: &SnapshotRow) -> Option<sandpit_api_types::SandboxImage> {
    snap.remote_image
        .as_deref()
        .and_then(|r| serde_json::from_str::<RemoteImage>(r).ok())
        .map(|r| r.to_api())
}

/// Before a sandbox starts from snapshot `snap` here: fetch its files and memory image if
/// this node lacks them. 503 `snapshot_not_stored` when they are not in object storage,
/// 503 `snapshot_fetch_failed` when the fetch fails (a missing object, a digest mismatch);
/// either way nothing is left behind. The caller looked the row up (it exists).
pub async fn ensure_snapshot(node: &Arc<Node>, snap: &SnapshotRow) -> Result<(), ControlError> {
    let dir = snapshot_dir(node, &snap.id);
    if dir.is_dir() {
        return Ok(());
    }
    // One fetch per snapshot at a time on this node; the others then find it in place.
    let lock = node.lock_of(&snap.id);
    let _guard = lock.write().await;
    if dir.is_dir() {
        return Ok(());
    }
    let (Some(images), Some(record)) = (node.image_store().cloned(), stored_snapshot(snap)) else {
        let state = snap
            .remote_image
            .as_deref()
            .and_then(|r| serde_json::from_str::<RemoteImage>(r).ok())
            .map(|r| r.state.as_str())
            .unwrap_or("none");
        return Err(ControlError::Unavailable {
            code: "snapshot_not_stored",
            message: format!(
                "snapshot {} is on another node and not in object storage (remote state: {state}); create from it on the node that took it{}",
                snap.id,
                if node.image_store().is_none() {
                    ", or run the servers with --object-store"
                } else {
                    ", or retry once its upload is stored"
                }
            ),
        });
    };
    node.ensure_free_disk()?;
    let reference = record
        .reference
        .clone()
        .expect("stored_snapshot checked it");
    let fetched = node.staging_dir(&snap.id, "pull");
    let pulled = super::uploads::fetch(
        &*images,
        &reference,
        &fetched,
        ImageKind::Snapshot,
        "snapshot_fetch_failed",
        &format!("snapshot {}", snap.id),
    )
    .await;
    let result = match pulled {
        Ok(_) => publish_snapshot(node, &record, &fetched, &dir).await,
        Err(e) => Err(e),
    };
    if let Err(e) = sandpit_fs::remove_tree(&fetched) {
        tracing::warn!(path = %fetched.display(), error = %e, "removing a fetched snapshot");
    }
    result
}

/// Put a fetched snapshot in place: its files through the runtime (which refuses anything
/// it does not pack), its memory image when this node's runtime build wrote it, in a
/// temporary directory renamed to `dir`.
async fn publish_snapshot(
    node: &Node,
    record: &RemoteImage,
    fetched: &Path,
    dir: &Path,
) -> Result<(), ControlError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let tmp: PathBuf = parent.join(format!(".tmp-{name}-{}", random_hex(4)));
    let made = async {
        std::fs::create_dir(&tmp).map_err(ControlError::files(format!(
            "snapshot directory {}",
            tmp.display()
        )))?;
        node.runtime
            .unpack_files(&fetched.join(FILES_DIR), &tmp.join(FILES_DIR))
            .await?;
        if record.memory && record.runtime == node.runtime.build() {
            std::fs::rename(fetched.join(MEMORY_DIR), tmp.join(MEMORY_DIR)).map_err(
                ControlError::files(format!("memory image of {}", tmp.display())),
            )?;
        }
        match std::fs::rename(&tmp, dir) {
            Ok(()) => Ok(()),
            // Published meanwhile (by another process sharing this data dir): keep that one.
            Err(_) if dir.is_dir() => Ok(()),
            Err(e) => Err(ControlError::files(format!("publishing {}", dir.display()))(e)),
        }
    }
    .await;
    if tmp.exists()
        && let Err(e) = sandpit_fs::remove_tree(&tmp)
    {
        tracing::warn!(path = %tmp.display(), error = %e, "removing a temporary snapshot directory");
    }
    made
}

/// After snapshot `snap`'s row was deleted: stop its upload here (if one runs) and forget
/// its remote image. The caller removes the local directory.
pub(super) async fn forget_snapshot(node: &Node, snap: &SnapshotRow) {
    super::uploads::stop_upload(node, &snap.id).await;
    if let (Some(images), Some(record)) = (node.image_store().cloned(), stored_snapshot(snap))
        && let Some(reference) = record.reference
    {
        forget_in_background(images, reference);
    }
}

/// After a restart: upload this node's snapshots whose upload never finished (or never
/// started: taken without an image store). Copies fetched from object storage are stored
/// already and are skipped. How many started.
pub(super) async fn resume_snapshot_uploads(node: &Arc<Node>) -> Result<usize, ControlError> {
    if node.image_store().is_none() {
        return Ok(0);
    }
    let mut n = 0;
    for id in node.store.snapshots.ids().await? {
        if !snapshot_dir(node, &id).is_dir() {
            continue;
        }
        let Some(snap) = node.store.snapshots.by_id(&id).await? else {
            continue;
        };
        let unfinished = match snap.remote_image.as_deref() {
            None => true,
            Some(r) => serde_json::from_str::<RemoteImage>(r)
                .map(|r| r.state == RemoteState::Uploading)
                .unwrap_or(false),
        };
        if !unfinished {
            continue;
        }
        let Some(record) = uploading_record(node, snap.has_memory) else {
            continue;
        };
        if !node
            .store
            .snapshots
            .set_remote_image(&id, snap.remote_image.as_deref(), Some(&record))
            .await?
        {
            continue;
        }
        let snap = SnapshotRow {
            remote_image: Some(record),
            ..snap
        };
        start_snapshot_upload(node, &snap);
        n += 1;
    }
    if n > 0 {
        tracing::info!(snapshots = n, "uploads of named snapshots started again");
    }
    Ok(n)
}

pub use super::images::{layer_dir, valid_layer_id};

/// After a build published template `t`'s layers (or at start-up, for layers not stored
/// yet): upload, in the background, each of its layers that object storage lacks. Without
/// an image store, nothing. Ends with the node's shutdown.
pub fn upload_layers(node: &Arc<Node>, t: &crate::store::TemplateRow) {
    let Some(images) = node.image_store().cloned() else {
        return;
    };
    let ids = match super::images::layer_ids(t) {
        Ok(ids) if !ids.is_empty() => ids,
        Ok(_) => return,
        Err(e) => {
            tracing::warn!(template = %t.id, error = %DisplayChain(&e), "layers of a template do not decode; not uploaded");
            return;
        }
    };
    let (node, template) = (node.clone(), t.id.clone());
    tokio::spawn(async move {
        let work = async {
            for id in ids {
                if let Err(e) = upload_layer(&node, &*images, &id).await {
                    tracing::error!(template = %template, layer = %id, error = %e, "layer upload failed; only nodes holding it start this template");
                }
            }
        };
        tokio::select! {
            _ = node.shutdown.cancelled() => {}
            () = work => {}
        }
    });
}

/// Upload layer `id` unless it is stored already or not here. Uploads of one layer on this
/// node take turns (the second finds it stored).
async fn upload_layer(node: &Node, images: &dyn ImageStore, id: &str) -> Result<(), String> {
    if !valid_layer_id(id) {
        return Err("not a layer id".into());
    }
    let lock = node.lock_of(&format!("layer:{id}"));
    let _guard = lock.write().await;
    let stored = node.store.layers.get(id).await;
    if stored.map_err(|e| DisplayChain(&e).to_string())?.is_some() {
        return Ok(());
    }
    let dir = layer_dir(node, id);
    if !dir.is_dir() {
        return Ok(());
    }
    let stage = node.staging_dir(id, "push");
    let started = std::time::Instant::now();
    let pushed = images.push_layer(&dir, &stage).await;
    if stage.exists()
        && let Err(e) = sandpit_fs::remove_tree(&stage)
    {
        tracing::warn!(path = %stage.display(), error = %e, "removing a layer upload's staging directory");
    }
    let pushed = pushed.map_err(|e| format!("uploading: {}", DisplayChain(&*e)))?;
    if !crate::remote::valid_reference(&pushed.reference) {
        return Err("the image store returned an unusable reference".into());
    }
    node.store
        .layers
        .record(id, &pushed.reference, pushed.bytes, now_ms())
        .await
        .map_err(|e| DisplayChain(&e).to_string())?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(layer = %id, bytes = pushed.bytes, uploaded = pushed.uploaded, ms = (secs * 1000.0) as u64, "layer stored remotely");
    Ok(())
}

/// Before a sandbox of template `template_id` starts (or wakes after moving) here: fetch
/// each of its layers this node lacks from object storage, unpack it (the hardened
/// unpacker, into the layer store's `tmp/`) and publish it by rename. 503
/// `layer_not_stored` when one is neither here nor stored, `layer_fetch_failed` when a
/// fetch fails; nothing is left behind either way.
pub async fn ensure_layers(node: &Node, template_id: &str) -> Result<(), ControlError> {
    let Some(t) = node.store.templates.by_id(template_id).await? else {
        return Ok(()); // the boot says so
    };
    for id in super::images::layer_ids(&t)? {
        if layer_dir(node, &id).is_dir() {
            continue;
        }
        let lock = node.lock_of(&format!("layer:{id}"));
        let _guard = lock.write().await;
        if layer_dir(node, &id).is_dir() {
            continue;
        }
        fetch_layer(node, &t.name, &id).await?;
    }
    Ok(())
}

async fn fetch_layer(node: &Node, template: &str, id: &str) -> Result<(), ControlError> {
    let failed = |detail: String| ControlError::Unavailable {
        code: "layer_fetch_failed",
        message: format!(
            "fetching layer {id} of template {template:?} from object storage: {detail}"
        ),
    };
    let record = match (node.image_store(), node.store.layers.get(id).await?) {
        (Some(_), Some(r)) if valid_layer_id(id) => r,
        _ => {
            return Err(ControlError::Unavailable {
                code: "layer_not_stored",
                message: format!(
                    "template {template:?} was built on another node and its layer {id} is not in object storage; create it where it was built, or build it again"
                ),
            });
        }
    };
    if !crate::remote::valid_reference(&record.reference) {
        return Err(failed("its recorded reference is unusable".into()));
    }
    node.ensure_free_disk()?;
    let images = node.image_store().cloned().expect("checked above");
    let store_dir = node.cfg.data_dir.join("images");
    for d in ["tmp", "layers"] {
        std::fs::create_dir_all(store_dir.join(d)).map_err(ControlError::files(format!(
            "layer store {}",
            store_dir.display()
        )))?;
    }
    let tmp = store_dir
        .join("tmp")
        .join(format!("fetch-{id}-{}", random_hex(4)));
    let stage = node.staging_dir(id, "pull");
    let started = std::time::Instant::now();
    let pulled = images.pull_layer(&record.reference, &tmp, &stage).await;
    let result = match pulled {
        Ok(bytes) => match std::fs::rename(&tmp, layer_dir(node, id)) {
            Ok(()) => {
                let secs = started.elapsed().as_secs_f64();
                tracing::info!(layer = %id, bytes, ms = (secs * 1000.0) as u64, "layer fetched from object storage");
                Ok(())
            }
            // Published meanwhile by another process on this data dir: keep that one.
            Err(_) if layer_dir(node, id).is_dir() => Ok(()),
            Err(e) => Err(failed(format!("publishing it: {e}"))),
        },
        Err(e) => Err(failed(DisplayChain(&*e).to_string())),
    };
    for leftover in [&tmp, &stage] {
        if leftover.exists()
            && let Err(e) = sandpit_fs::remove_tree(leftover)
        {
            tracing::warn!(path = %leftover.display(), error = %e, "removing what a layer fetch left");
        }
    }
    result
}

/// After a restart: upload the layers of every template in use whose layers are here and
/// not stored yet (an upload that never finished, or templates built before the node had an
/// image store). How many templates were looked at.
pub(super) async fn resume_layer_uploads(node: &Arc<Node>) -> Result<usize, ControlError> {
    if node.image_store().is_none() {
        return Ok(0);
    }
    let mut n = 0;
    for t in node.store.templates.ready_with_layers().await? {
        let ids = super::images::layer_ids(&t).unwrap_or_default();
        let mut missing = false;
        for id in &ids {
            if layer_dir(node, id).is_dir() && node.store.layers.get(id).await?.is_none() {
                missing = true;
            }
        }
        if missing {
            upload_layers(node, &t);
            n += 1;
        }
    }
    Ok(n)
}
