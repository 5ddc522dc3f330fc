//! Named volumes: create, delete, and the rules of mounting them into sandboxes.
//!
//! A volume lives on its home node (`volumes/<id>/`, made by `Runtime::create_volume`) and is
//! mounted only by sandboxes of that node. Among sandboxes that hold their volumes (creating,
//! running, suspended) a volume has at most one read-write mount; read-only mounts are not
//! limited, alongside a writer too (a fork child reads its parent's volumes while the
//! parent writes). The check and the rows it decides on are made under `Node::volume_lock`.
//! Callers authorize first.
//!
//! Moves: with an image store, a draining node sends the volumes no sandbox of it mounts to
//! object storage ([`move_all`]): the image is pushed first, then one conditional update
//! gives the row to [`STORED_VOLUME`], then the local copy goes. The node of the next create
//! that mounts it fetches it (verified) and takes the row with one conditional update
//! ([`bring_here`]) before any sandbox row exists, so a failed fetch changes nothing and of
//! two nodes one wins.

use sandpit_api_types::{
    CreateVolumeRequest, MAX_VOLUME_MOUNTS, Volume, VolumeMountRequest, normalize_volume_path,
    parse_volume_size, paths_nest, valid_volume_name,
};
use sandpit_runtime::VolumeMount;

use super::Node;
use crate::error::ControlError;
use crate::remote::ImageKind;
use crate::store::{STORED_VOLUME, StoredVolume, VolumeMountRow, VolumeRow};
use crate::util::{new_id, now_ms, rfc3339};

/// A volume's size when the request names none and the node has no disk limit.
const DEFAULT_SIZE_UNBOUNDED: u64 = 1 << 30;
/// The largest volume when the node has no disk limit.
const MAX_SIZE_UNBOUNDED: u64 = 64 << 30;

/// The default size of a new volume: a `small` sandbox's disk.
pub fn default_size(node: &Node) -> u64 {
    node.cfg.disk_limit.unwrap_or(DEFAULT_SIZE_UNBOUNDED)
}

/// The largest volume: a `large` sandbox's disk (four `small` ones).
pub fn max_size(node: &Node) -> u64 {
    node.cfg
        .disk_limit
        .map_or(MAX_SIZE_UNBOUNDED, |d| d.saturating_mul(4))
}

/// The smallest volume (ext4 needs room for its journal).
pub const MIN_SIZE: u64 = 16 << 20;

pub fn to_api(v: &VolumeRow) -> Volume {
    Volume {
        name: v.name.clone(),
        size_bytes: v.size_bytes as u64,
        node: v.node_id.clone(),
        created_at: rfc3339(v.created_at),
    }
}

fn check_name(name: &str) -> Result<(), ControlError> {
    if valid_volume_name(name) {
        return Ok(());
    }
    Err(ControlError::invalid(
        "invalid_volume_name",
        "a volume name is 1 to 63 characters of [a-z0-9-]",
    ))
}

fn not_found(name: &str) -> ControlError {
    ControlError::not_found("volume_not_found", format!("no volume {name:?}"))
}

/// 409 `volume_on_another_node` unless `v` is homed on this node (or only in object
/// storage: the create that mounts it brings it here first, [`bring_here`]).
fn ensure_here(node: &Node, v: &VolumeRow) -> Result<(), ControlError> {
    if v.node_id == node.cfg.node_id || v.node_id == STORED_VOLUME {
        return Ok(());
    }
    Err(ControlError::conflict(
        "volume_on_another_node",
        format!(
            "volume {:?} is on node {:?}: send the request to that node's server (a volume moves only when its node drains)",
            v.name, v.node_id
        ),
    ))
}

/// `POST /v1/volumes`: checked (name, size, quota) before anything is made; the image is
/// made before the row, and removed again if the row cannot be written.
pub async fn create(
    node: &Node,
    workspace_id: &str,
    req: &CreateVolumeRequest,
) -> Result<VolumeRow, ControlError> {
    check_name(&req.name)?;
    let size = match &req.size {
        None => default_size(node),
        Some(text) => parse_volume_size(text).ok_or_else(|| {
            ControlError::invalid(
                "invalid_volume_size",
                "a size is a number with an optional unit: 1G, 512M, 64MiB",
            )
        })?,
    };
    let max = max_size(node);
    if !(MIN_SIZE..=max).contains(&size) {
        return Err(ControlError::invalid(
            "invalid_volume_size",
            format!("a volume is {} MiB to {} MiB", MIN_SIZE >> 20, max >> 20),
        ));
    }
    if node
        .store
        .volumes
        .get(workspace_id, &req.name)
        .await?
        .is_some()
    {
        return Err(ControlError::conflict(
            "volume_exists",
            format!("a volume named {:?} exists already", req.name),
        ));
    }
    let quota = node.cfg.quotas.max_volumes;
    if quota > 0 && node.store.volumes.list(workspace_id).await?.len() >= quota as usize {
        return Err(volumes_quota(quota));
    }
    node.ensure_free_disk()?;
    let row = VolumeRow {
        id: new_id("vol"),
        workspace_id: workspace_id.into(),
        name: req.name.clone(),
        size_bytes: size as i64,
        node_id: node.cfg.node_id.clone(),
        created_at: now_ms(),
        remote_image: None,
    };
    let dir = node.volume_dir(&row.id);
    node.runtime.create_volume(&dir, size).await?;
    let inserted = node.store.volumes.insert(&row, quota).await;
    match inserted {
        Ok(true) => Ok(row),
        other => {
            if let Err(e) = node.runtime.delete_volume(&dir).await {
                tracing::error!(volume = %row.id, error = %crate::DisplayChain(&e), "removing a volume that was not recorded");
            }
            match other {
                Ok(_) => Err(volumes_quota(quota)),
                Err(e) => Err(e),
            }
        }
    }
}

fn volumes_quota(max: u32) -> ControlError {
    ControlError::Kept {
        limit: "max_volumes",
        value: max,
        what: "delete volumes this workspace no longer needs".into(),
    }
}

/// A volume of the workspace by name; 404 `volume_not_found`.
pub async fn get(node: &Node, workspace_id: &str, name: &str) -> Result<VolumeRow, ControlError> {
    check_name(name)?;
    node.store
        .volumes
        .get(workspace_id, name)
        .await?
        .ok_or_else(|| not_found(name))
}

/// `DELETE /v1/volumes/{name}`: refused (409 `volume_in_use`) while a sandbox that is not
/// destroyed or failed mounts it or a snapshot refers to it; then the row goes, then the
/// image (a crash between leaves a directory no row names, removed at the next start).
pub async fn delete(node: &Node, workspace_id: &str, name: &str) -> Result<(), ControlError> {
    let v = get(node, workspace_id, name).await?;
    ensure_here(node, &v)?;
    let _decide = node.volume_lock.lock().await;
    if v.node_id == STORED_VOLUME {
        // Only in object storage: any node deletes it (if no node took it meanwhile).
        if let Some(user) = node.store.volumes.user(&v.id).await? {
            return Err(ControlError::conflict(
                "volume_in_use",
                format!("volume {name:?} is in use: {user}"),
            ));
        }
        if node.store.volumes.delete(&v.id).await?
            && let (Some(images), Some(stored)) = (node.image_store().cloned(), stored_of(&v))
            && let Err(e) = images.forget(&stored.reference).await
        {
            tracing::warn!(volume = %v.id, error = %crate::DisplayChain(&*e), "forgetting a deleted volume's image");
        }
        return Ok(());
    }
    if let Some(user) = node.store.volumes.user(&v.id).await? {
        return Err(ControlError::conflict(
            "volume_in_use",
            format!("volume {name:?} is in use: {user}"),
        ));
    }
    let dir = node.volume_dir(&v.id);
    // The runtime refuses while anything of it is still mounted: nothing changed then.
    node.runtime.delete_volume(&dir).await?;
    node.store.volumes.delete(&v.id).await?;
    Ok(())
}

/// The mounts a create asks for, checked (names, paths, count, duplicates, nesting, the
/// volumes exist in the workspace and live on this node). Changes nothing. The read-write
/// rule is checked by [`check_writers`].
pub async fn resolve(
    node: &Node,
    workspace_id: &str,
    reqs: &[VolumeMountRequest],
) -> Result<Vec<VolumeMountRow>, ControlError> {
    if reqs.len() > MAX_VOLUME_MOUNTS {
        return Err(ControlError::invalid(
            "invalid_volumes",
            format!("a sandbox mounts at most {MAX_VOLUME_MOUNTS} volumes"),
        ));
    }
    let mut paths: Vec<String> = Vec::with_capacity(reqs.len());
    for r in reqs {
        check_name(&r.name)?;
        let path = normalize_volume_path(&r.path).map_err(|why| {
            ControlError::invalid(
                "invalid_volume_path",
                format!("volume path {:?}: {why}", r.path.escape_debug().to_string()),
            )
        })?;
        if let Some(other) = paths.iter().find(|p| paths_nest(p, &path)) {
            return Err(ControlError::invalid(
                "invalid_volumes",
                format!("volume paths {other} and {path} overlap"),
            ));
        }
        paths.push(path);
    }
    let mut out = Vec::with_capacity(reqs.len());
    for (r, path) in reqs.iter().zip(paths) {
        if reqs.iter().filter(|o| o.name == r.name).count() > 1 {
            return Err(ControlError::invalid(
                "invalid_volumes",
                format!("volume {:?} is named twice", r.name),
            ));
        }
        let v = node
            .store
            .volumes
            .get(workspace_id, &r.name)
            .await?
            .ok_or_else(|| not_found(&r.name))?;
        ensure_here(node, &v)?;
        out.push(VolumeMountRow {
            volume_id: v.id,
            path,
            read_only: r.read_only,
        });
    }
    Ok(out)
}

/// The volumes a snapshot refers to, as a sandbox started from it mounts them (they exist:
/// a volume a snapshot refers to is never deleted). 409 `volume_on_another_node` for one
/// homed elsewhere.
pub async fn of_snapshot(
    node: &Node,
    snapshot_id: &str,
) -> Result<Vec<VolumeMountRow>, ControlError> {
    let refs = node.store.volumes.snapshot_refs(snapshot_id).await?;
    for r in &refs {
        let v = node
            .store
            .volumes
            .by_id(&r.volume_id)
            .await?
            .ok_or_else(|| {
                ControlError::Internal(format!(
                    "volume {} of snapshot {snapshot_id} is gone",
                    r.volume_id
                ))
            })?;
        ensure_here(node, &v)?;
    }
    Ok(refs)
}

/// 409 `volume_busy` if another live sandbox (than `except`) mounts one of `mounts`'
/// read-write volumes read-write. Call under `Node::volume_lock` up to the rows it decides
/// on for the answer to hold.
pub async fn check_writers(
    node: &Node,
    mounts: &[VolumeMountRow],
    except: &str,
) -> Result<(), ControlError> {
    for m in mounts.iter().filter(|m| !m.read_only) {
        if let Some(writer) = node.store.volumes.writer(&m.volume_id, except).await? {
            let name = node
                .store
                .volumes
                .by_id(&m.volume_id)
                .await?
                .map_or_else(|| m.volume_id.clone(), |v| v.name);
            return Err(ControlError::conflict(
                "volume_busy",
                format!(
                    "volume {name:?} is mounted read-write by sandbox {writer}: mount it read-only, or destroy that sandbox first"
                ),
            ));
        }
    }
    Ok(())
}

/// What the runtime mounts for sandbox `sandbox_id` (its recorded mounts).
pub async fn runtime_mounts(
    node: &Node,
    sandbox_id: &str,
) -> Result<Vec<VolumeMount>, ControlError> {
    Ok(node
        .store
        .volumes
        .mounts_of(sandbox_id)
        .await?
        .into_iter()
        .map(|m| VolumeMount {
            dir: node.volume_dir(&m.volume_id),
            destination: m.path,
            read_only: m.read_only,
        })
        .collect())
}

/// Remove volume directories no row names (a crash between a delete's row and its image,
/// or a create's image and its row). Best effort; at start-up, after the runtime released
/// its orphans.
pub async fn remove_orphans(node: &Node) -> Result<(), ControlError> {
    let known: std::collections::HashSet<String> = node
        .store
        .volumes
        .on_node(&node.cfg.node_id)
        .await?
        .into_iter()
        .map(|v| v.id)
        .collect();
    let root = node.cfg.data_dir.join("volumes");
    #[expect(
        clippy::disallowed_methods,
        reason = "the volumes directory of the data dir is host-owned; only its entries' names are read"
    )]
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vol_") || known.contains(&name) {
            continue;
        }
        tracing::info!(volume = %name, "removing a volume no row names");
        if let Err(e) = node.runtime.delete_volume(&e.path()).await {
            tracing::error!(volume = %name, error = %crate::DisplayChain(&e), "removing an orphaned volume");
        }
    }
    Ok(())
}

/// The stored image of a volume that left its node, if the row records one that decodes.
fn stored_of(v: &VolumeRow) -> Option<StoredVolume> {
    serde_json::from_str(v.remote_image.as_deref()?).ok()
}

/// Send volume `v`, homed here and mounted by no sandbox, to object storage and give up
/// this node's copy. `Ok(false)` when it cannot move now (no image store, not here, in use,
/// or something changed it meanwhile: then nothing changed).
pub async fn move_away(node: &Node, v: &VolumeRow) -> Result<bool, ControlError> {
    let Some(images) = node.image_store().cloned() else {
        return Ok(false);
    };
    if v.node_id != node.cfg.node_id {
        return Ok(false);
    }
    // No create mounts it while it moves: they decide under the same lock.
    let _decide = node.volume_lock.lock().await;
    if node.store.volumes.sandbox_user(&v.id).await?.is_some() {
        return Ok(false);
    }
    let dir = node.volume_dir(&v.id);
    let stage = node.staging_dir(&v.id, "push");
    let pushed = async {
        node.runtime.pack_volume(&dir, &stage).await?;
        images
            .push(&stage, ImageKind::Volume)
            .await
            .map_err(|e| ControlError::Unavailable {
                code: "volume_upload_failed",
                message: format!("uploading volume {}: {}", v.id, crate::DisplayChain(&*e)),
            })
    }
    .await;
    if stage.exists()
        && let Err(e) = sandpit_fs::remove_tree(&stage)
    {
        tracing::warn!(path = %stage.display(), error = %e, "removing a volume's staging directory");
    }
    let pushed = pushed?;
    let record = serde_json::to_string(&StoredVolume {
        reference: pushed.reference.clone(),
        bytes: pushed.bytes,
    })
    .expect("a record serializes");
    if !node
        .store
        .volumes
        .store_away(&v.id, &node.cfg.node_id, &record)
        .await?
    {
        let _ = images.forget(&pushed.reference).await;
        return Ok(false);
    }
    if let Err(e) = node.runtime.delete_volume(&dir).await {
        tracing::warn!(volume = %v.id, error = %crate::DisplayChain(&e), "removing a volume's copy after it moved");
    }
    tracing::info!(volume = %v.id, bytes = pushed.bytes, uploaded = pushed.uploaded, "volume moved to object storage");
    Ok(true)
}

/// A drain: send every volume of this node that no sandbox mounts to object storage. How
/// many moved.
pub async fn move_all(node: &Node) -> usize {
    let volumes = match node.store.volumes.on_node(&node.cfg.node_id).await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %crate::DisplayChain(&e), "drain: listing this node's volumes");
            return 0;
        }
    };
    let mut moved = 0;
    for v in volumes {
        match move_away(node, &v).await {
            Ok(true) => moved += 1,
            Ok(false) => {
                tracing::info!(volume = %v.id, "drain: the volume stays (a sandbox here mounts it)")
            }
            Err(e) => {
                tracing::warn!(volume = %v.id, error = %crate::DisplayChain(&e), "drain: the volume stays")
            }
        }
    }
    moved
}

/// Before a create that mounts `mounts`: fetch each of them that lives only in object
/// storage and take it here. Nothing changes on failure (503 `volume_fetch_failed`), and
/// a volume another node took meanwhile answers 409 `volume_on_another_node`.
pub async fn bring_here(node: &Node, mounts: &[VolumeMountRow]) -> Result<(), ControlError> {
    for m in mounts {
        let Some(v) = node.store.volumes.by_id(&m.volume_id).await? else {
            continue;
        };
        if v.node_id != STORED_VOLUME {
            continue;
        }
        let (Some(images), Some(stored)) = (node.image_store().cloned(), stored_of(&v)) else {
            return Err(ControlError::Unavailable {
                code: "volume_not_stored",
                message: format!(
                    "volume {:?} is in object storage, which this node is not configured with",
                    v.name
                ),
            });
        };
        let _decide = node.volume_lock.lock().await;
        let fetched = node.staging_dir(&v.id, "pull");
        let dir = node.volume_dir(&v.id);
        let placed = async {
            super::uploads::fetch(
                &*images,
                &stored.reference,
                &fetched,
                ImageKind::Volume,
                "volume_fetch_failed",
                &format!("volume {:?}", v.name),
            )
            .await?;
            node.runtime.unpack_volume(&fetched, &dir).await?;
            Ok::<_, ControlError>(())
        }
        .await;
        if fetched.exists() {
            let _ = sandpit_fs::remove_tree(&fetched);
        }
        placed?;
        if !node
            .store
            .volumes
            .bring_here(&v.id, &node.cfg.node_id)
            .await?
        {
            let _ = node.runtime.delete_volume(&dir).await;
            return Err(ControlError::conflict(
                "volume_on_another_node",
                format!(
                    "volume {:?} was taken by another node meanwhile; retry",
                    v.name
                ),
            ));
        }
        let reference = stored.reference;
        tokio::spawn(async move {
            if let Err(e) = images.forget(&reference).await {
                tracing::warn!(%reference, error = %crate::DisplayChain(&*e), "forgetting a volume's image after it moved");
            }
        });
        tracing::info!(volume = %v.id, "took a volume from object storage");
    }
    Ok(())
}
