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
        remote::ImageKind::Volume => ImageKind::Volume,
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

    async fn push_layer(&self, layer: &Path, staging: &Path) -> Result<Pushed, BoxError> {
        let (layer, stage) = (layer.to_path_buf(), staging.to_path_buf());
        let packed = tokio::task::spawn_blocking(move || pack_layer(&layer, &stage)).await?;
        packed?;
        self.push(staging, remote::ImageKind::Layer).await
    }

    async fn pull_layer(
        &self,
        reference: &str,
        dest: &Path,
        staging: &Path,
    ) -> Result<u64, BoxError> {
        let bytes = self
            .pull(reference, staging, remote::ImageKind::Layer)
            .await?;
        let (archive, to) = (staging.join(LAYER_ARCHIVE), dest.to_path_buf());
        let unpacked = tokio::task::spawn_blocking(move || unpack_layer(&archive, &to)).await?;
        if let Err(e) = unpacked {
            let _ = sandpit_fs::remove_tree(dest);
            return Err(e);
        }
        Ok(bytes)
    }

    async fn forget(&self, reference: &str) -> Result<(), BoxError> {
        let image: ImageRef = reference.parse()?;
        Ok(sandpit_objects::delete_manifest(&self.store, image).await?)
    }
}

/// The one file of a pushed layer image.
const LAYER_ARCHIVE: &str = "layer.tar";

/// Pack the layer tree `layer` into `<staging>/layer.tar` (`sandpit_image::pack`: handles
/// only, no symlink followed, bounded by the unpack limits).
fn pack_layer(layer: &Path, staging: &Path) -> Result<(), BoxError> {
    let root = sandpit_fs::TreeDir::open(layer)?;
    let dir = sandpit_fs::TreeDir::create(staging)?;
    let file = dir.create_file(std::ffi::OsStr::new(LAYER_ARCHIVE))?;
    let out = std::io::BufWriter::with_capacity(1 << 20, file);
    let limits = sandpit_image::unpack::UnpackLimits::current();
    let stats = sandpit_image::pack::pack_layer(&root, out, &limits)?;
    tracing::debug!(layer = %layer.display(), entries = stats.entries, bytes = stats.bytes, "layer packed");
    Ok(())
}

/// Unpack the fetched (verified) archive `archive` into the missing directory `dest` with
/// the hardened unpacker and the current limits.
fn unpack_layer(archive: &Path, dest: &Path) -> Result<(), BoxError> {
    let parent = archive.parent().ok_or("no staging directory")?;
    let name = archive.file_name().ok_or("no archive name")?;
    let staging = sandpit_fs::TreeDir::open(parent)?;
    let file = staging.open_file(Path::new(name))?;
    let root = sandpit_fs::TreeDir::create(dest)?;
    sandpit_image::unpack::unpack_into(
        std::io::BufReader::with_capacity(1 << 20, file),
        &root,
        sandpit_image::unpack::Whiteouts::Overlay,
        &sandpit_image::unpack::UnpackLimits::current(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::disallowed_methods,
        reason = "test fixtures written and read by path in temporary dirs"
    )]
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A layer with a tenant's tricks goes through a `file://` object store and comes back
    /// the same: modes, an absolute symlink (not followed), a whiteout, an opaque directory,
    /// a hard link. A tampered archive is refused and leaves nothing.
    #[tokio::test]
    async fn a_layer_round_trips_through_object_storage() {
        let dir = tempfile::tempdir().unwrap();
        let url = sandpit_objects::StoreUrl::parse(&format!(
            "file://{}",
            dir.path().join("bucket").display()
        ))
        .unwrap();
        let images = ObjectImages::new(Store::open(&url, &Default::default()).unwrap());
        let layer = dir.path().join("layer");
        std::fs::create_dir_all(layer.join("usr/bin")).unwrap();
        std::fs::create_dir_all(layer.join("var/cache")).unwrap();
        std::fs::write(layer.join("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            layer.join("usr/bin/tool"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        std::fs::hard_link(layer.join("usr/bin/tool"), layer.join("usr/bin/again")).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", layer.join("shadow")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            layer.join("gone"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .unwrap();
        rustix::fs::setxattr(
            layer.join("var/cache"),
            "trusted.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();

        let pushed = images
            .push_layer(&layer, &dir.path().join("stage-push"))
            .await
            .unwrap();
        let dest = dir.path().join("fetched");
        images
            .pull_layer(&pushed.reference, &dest, &dir.path().join("stage-pull"))
            .await
            .unwrap();
        let tool = std::fs::metadata(dest.join("usr/bin/tool")).unwrap();
        assert_eq!(tool.mode() & 0o7777, 0o4755);
        assert_eq!(tool.nlink(), 2);
        assert_eq!(
            std::fs::read_link(dest.join("shadow")).unwrap(),
            Path::new("/etc/shadow")
        );
        let gone = std::fs::symlink_metadata(dest.join("gone")).unwrap();
        assert_eq!((gone.mode() & 0o170000, gone.rdev()), (0o020000, 0));
        let mut v = [0u8; 2];
        let n = rustix::fs::getxattr(dest.join("var/cache"), "trusted.overlay.opaque", &mut v);
        assert_eq!(n.ok(), Some(1));

        // Pulled as another kind: refused, nothing made.
        let other = dir.path().join("as-snapshot");
        assert!(
            images
                .pull(&pushed.reference, &other, remote::ImageKind::Snapshot)
                .await
                .is_err()
        );
        assert!(!other.exists());
    }
}
