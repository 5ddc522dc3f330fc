//! Looking after images in the store: whether one is there, forgetting one, and removing
//! blobs no image needs any more.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use object_store::ObjectStoreExt;

use crate::manifest::Sha256Digest;
use crate::pull::fetch_manifest;
use crate::push::head_size;
use crate::{ImageRef, Limits, ObjectsError, Store};

/// Whether the store holds the manifest of `image`. Since a push writes the manifest after
/// its blobs and [`gc`] removes only unreferenced blobs, `true` means the image can be
/// pulled (barring corruption or someone deleting blobs by hand, which a pull detects).
pub async fn has(store: &Store, image: ImageRef) -> Result<bool, ObjectsError> {
    let key = store.key(&format!("manifests/sha256/{}", image.hex()));
    Ok(head_size(store, &key).await?.is_some())
}

/// Delete the manifest of `image`. Idempotent: a missing manifest is fine. Its blobs stay
/// (other images may share them) until [`gc`] finds them unreferenced.
pub async fn delete_manifest(store: &Store, image: ImageRef) -> Result<(), ObjectsError> {
    let key = store.key(&format!("manifests/sha256/{}", image.hex()));
    match store.inner().delete(&key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(source) => Err(ObjectsError::Delete {
            key: key.to_string(),
            source,
        }),
    }
}

/// What a [`gc`] run found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Manifests read (every one must decode, or nothing is deleted).
    pub manifests: usize,
    /// Blobs (chunks) some manifest references.
    pub blobs_kept: usize,
    /// Unreferenced blobs younger than the grace period, left for a later run.
    pub blobs_young: usize,
    /// Unreferenced blobs deleted.
    pub blobs_deleted: usize,
    /// Their total size.
    pub bytes_deleted: u64,
    /// Keys under `manifests/` or `blobs/` that are not named as this crate names them;
    /// never touched.
    pub foreign: usize,
}

/// Delete the blobs that no manifest references and that are older than `grace`. The
/// blobs a manifest references are the chunks of its files: every digest in every file's
/// chunk list.
///
/// Contract:
/// - Fails closed: if any manifest cannot be read or decoded (under `limits`), it returns
///   that error and deletes nothing, since it cannot tell what that image needs.
/// - `grace` protects the blobs of a push under way (uploaded, manifest not yet written).
///   It cannot protect an old unreferenced blob that a concurrent push found present and
///   skipped: run gc when no push is under way (e.g. under a lock the callers share), or
///   accept that such a push's image may later fail to pull with
///   [`ObjectsError::BlobMissing`] (it never pulls wrong data).
/// - Keys it does not recognize are left alone.
pub async fn gc(store: &Store, grace: Duration, limits: &Limits) -> Result<GcReport, ObjectsError> {
    let mut report = GcReport::default();
    let cutoff = SystemTime::now()
        .checked_sub(grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);

    let mut referenced: HashSet<Sha256Digest> = HashSet::new();
    let prefix = store.key("manifests/sha256");
    let mut images = Vec::new();
    let mut listing = store.inner().list(Some(&prefix));
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|source| ObjectsError::List {
            prefix: prefix.to_string(),
            source,
        })?;
        match name_digest(&prefix, &meta.location) {
            Some(d) => images.push(ImageRef(d)),
            None => report.foreign += 1,
        }
    }
    for image in images {
        let manifest = fetch_manifest(store, image, limits).await?;
        referenced.extend(manifest.digests());
        report.manifests += 1;
    }

    let prefix = store.key("blobs/sha256");
    let mut listing = store.inner().list(Some(&prefix));
    let mut doomed = Vec::new();
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|source| ObjectsError::List {
            prefix: prefix.to_string(),
            source,
        })?;
        match name_digest(&prefix, &meta.location) {
            None => report.foreign += 1,
            Some(d) if referenced.contains(&d) => report.blobs_kept += 1,
            Some(_) if SystemTime::from(meta.last_modified) > cutoff => report.blobs_young += 1,
            Some(_) => doomed.push((meta.location, meta.size)),
        }
    }
    for (key, size) in doomed {
        match store.inner().delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => {
                return Err(ObjectsError::Delete {
                    key: key.to_string(),
                    source,
                });
            }
        }
        report.blobs_deleted += 1;
        report.bytes_deleted += size;
    }
    tracing::info!(?report, store = %store, "object store gc");
    Ok(report)
}

/// The digest a key directly under `prefix` names, if it is `<prefix>/<64 lowercase hex>`.
fn name_digest(
    prefix: &object_store::path::Path,
    key: &object_store::path::Path,
) -> Option<Sha256Digest> {
    let mut rest = key.prefix_match(prefix)?;
    let name = rest.next()?;
    if rest.next().is_some() {
        return None;
    }
    Sha256Digest::parse_hex(name.as_ref())
}
