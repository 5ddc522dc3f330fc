//! The node's image store over object storage: `sandpit-objects` behind the control layer's
//! [`ImageStore`] seam (`sandpit serve --object-store URL`): hibernation images, named
//! snapshots and template layers, each pushed as its own manifest kind and refused when
//! pulled as another.

use std::path::Path;

use async_trait::async_trait;
use sandpit_control::remote::{self, BoxError, ImageStore, Pushed};
use sandpit_objects::{ImageKind, ImageRef, Limits, Progress, Store};

/// The manifest kind of each of the control layer's image kinds.
fn kind_of(kind: remote::ImageKind) -> ImageKind {
    match kind {
        remote::ImageKind::Hibernation => ImageKind::Checkpoint,
        remote::ImageKind::Snapshot => ImageKind::Snapshot,
        remote::ImageKind::Layer => ImageKind::Layer,
    }
}

/// Images as content-addressed manifests of 4 MiB chunks.
pub struct ObjectImages {
    store: Store,
    limits: Limits,
}

impl ObjectImages {
    pub fn new(store: Store) -> ObjectImages {
        ObjectImages {
            store,
            limits: Limits::default(),
        }
    }
}

#[async_trait]
impl ImageStore for ObjectImages {
    async fn push(&self, dir: &Path, kind: remote::ImageKind) -> Result<Pushed, BoxError> {
        let progress = Progress::new();
        let (store, dir, limits, p) = (
            self.store.clone(),
            dir.to_path_buf(),
            self.limits,
            progress.clone(),
        );
        let image = sandpit_objects::push_dir(&store, &dir, kind_of(kind), &limits, &p).await?;
        let counts = progress.counts();
        Ok(Pushed {
            reference: image.to_string(),
            bytes: counts.bytes_hashed,
            uploaded: counts.bytes_uploaded,
        })
    }

    async fn pull(
        &self,
        reference: &str,
        dest: &Path,
        kind: remote::ImageKind,
    ) -> Result<u64, BoxError> {
        let image: ImageRef = reference.parse()?;
        let (store, d, limits) = (self.store.clone(), dest.to_path_buf(), self.limits);
        let pulled =
            sandpit_objects::pull_dir(&store, image, &d, &limits, &Progress::new()).await?;
        if pulled.kind != kind_of(kind) {
            sandpit_fs::remove_tree(dest)?;
            return Err(format!(
                "image {reference} is a {:?}, not a {:?}",
                pulled.kind,
                kind_of(kind)
            )
            .into());
        }
        Ok(pulled.bytes)
    }

    async fn forget(&self, reference: &str) -> Result<(), BoxError> {
        let image: ImageRef = reference.parse()?;
        Ok(sandpit_objects::delete_manifest(&self.store, image).await?)
    }
}
