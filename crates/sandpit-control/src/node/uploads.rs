//! What the background uploads to object storage share ([`super::moves`] for hibernated
//! sandboxes, [`super::stored`] for named snapshots and template layers): the node's image
//! store, the staging directory of hard links, the registry of uploads under way (each
//! cancelled and awaited by whoever needs its files back), and forgetting an image.
#![expect(
    clippy::disallowed_methods,
    reason = "staging directories and checkpoint images are node-owned paths under the data dir"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Node;
use crate::error::{ControlError, DisplayChain};
use crate::remote::{ImageKind, ImageStore, Pushed};
use crate::util::random_hex;

/// An upload under way: cancelled and awaited by whoever needs the files back.
pub(crate) struct Upload {
    pub(super) cancel: CancellationToken,
    pub(super) done: tokio::task::JoinHandle<()>,
}

/// Subdirectories of a pushed image: the memory image and the packed files.
pub(super) const MEMORY_DIR: &str = "memory";
pub(super) const FILES_DIR: &str = "files";

impl Node {
    /// Configure where suspended sandboxes' images go. Once, before serving.
    pub fn set_image_store(&self, store: Arc<dyn ImageStore>) {
        if self.images.set(store).is_err() {
            tracing::warn!("the image store was set already; keeping the first");
        }
    }

    /// The configured image store, if any.
    pub fn image_store(&self) -> Option<&Arc<dyn ImageStore>> {
        self.images.get()
    }

    /// Where uploads stage their hard links and take-overs their fetched images.
    pub(super) fn staging_dir(&self, id: &str, what: &str) -> PathBuf {
        self.cfg
            .data_dir
            .join("images-tmp")
            .join(format!("{id}.{what}-{}", random_hex(4)))
    }
}

/// Hard-link every regular file of the flat, node-written directory `from` into `to`.
fn link_flat_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            return Err(std::io::Error::other(format!(
                "{} is not a regular file",
                entry.path().display()
            )));
        }
        std::fs::hard_link(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

/// Drop image `reference` from the store without waiting (a failure only leaves bytes for
/// the store's collection).
pub(super) fn forget_in_background(images: Arc<dyn ImageStore>, reference: String) {
    tokio::spawn(async move {
        if let Err(e) = images.forget(&reference).await {
            tracing::warn!(%reference, error = %DisplayChain(&*e), "forgetting a remote image");
        }
    });
}

/// Before a transition that uses or removes a sandbox's files (wake, destroy): cancel its
/// upload, if one runs, and wait until it no longer reads them. The caller holds the
/// sandbox's write lock.
pub(super) async fn stop_upload(node: &Node, id: &str) {
    let upload = node.uploads.lock().expect("upload map poisoned").remove(id);
    if let Some(u) = upload {
        u.cancel.cancel();
        let _ = u.done.await;
    }
}

/// Stage a sandbox's files (`Runtime::pack_files` of `files_from`) and, if given, hard
/// links to the memory image in `memory_from` under the missing `stage`, and push it as
/// `kind`. `Ok(None)`: the files cannot move. The caller removes `stage`.
pub(super) async fn stage_and_push(
    node: &Node,
    images: &dyn ImageStore,
    files_from: &Path,
    memory_from: Option<&Path>,
    stage: &Path,
    kind: ImageKind,
) -> Result<Option<(Pushed, std::time::Duration)>, String> {
    std::fs::create_dir_all(stage).map_err(|e| format!("staging: {e}"))?;
    if !node
        .runtime
        .pack_files(files_from, &stage.join(FILES_DIR))
        .await
        .map_err(|e| format!("packing the files: {}", DisplayChain(&e)))?
    {
        return Ok(None);
    }
    let mem = stage.join(MEMORY_DIR);
    std::fs::create_dir(&mem).map_err(|e| format!("staging: {e}"))?;
    if let Some(from) = memory_from {
        link_flat_dir(from, &mem).map_err(|e| format!("staging the memory image: {e}"))?;
    }
    let started = std::time::Instant::now();
    let pushed = images
        .push(stage, kind)
        .await
        .map_err(|e| format!("uploading: {}", DisplayChain(&*e)))?;
    if !crate::remote::valid_reference(&pushed.reference) {
        return Err("the image store returned an unusable reference".into());
    }
    Ok(Some((pushed, started.elapsed())))
}

/// Fetch image `reference` of `kind` into the missing `dest` (verified by the store) and
/// log its size and rate under `what`. A failure is 503 with `code`, naming `what`.
pub(super) async fn fetch(
    images: &dyn ImageStore,
    reference: &str,
    dest: &Path,
    kind: ImageKind,
    code: &'static str,
    what: &str,
) -> Result<u64, ControlError> {
    let started = std::time::Instant::now();
    let bytes =
        images
            .pull(reference, dest, kind)
            .await
            .map_err(|e| ControlError::Unavailable {
                code,
                message: format!("fetching {what} from object storage: {}", DisplayChain(&*e)),
            })?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        what,
        bytes,
        ms = (secs * 1000.0) as u64,
        mb_per_s = (bytes as f64 / 1e6 / secs.max(1e-3)) as u64,
        "fetched from object storage"
    );
    Ok(bytes)
}
