//! Garbage collection of the layer store: layers and build cache entries that nothing
//! references any more are removed.
//!
//! What is referenced is the caller's to say (the template versions, sandboxes and
//! snapshots in the database); this module adds what may still be in use without the
//! database knowing, and removes the rest:
//! - a build in progress writes layers and reads cache entries before any row names them.
//!   Every build holds a [`BuildLease`] (a shared `flock` on `<images>/gc.lock`) from
//!   before its first cache lookup until its result is recorded; collection needs a
//!   [`GcLease`] (the exclusive lock, never waited for), so it runs only while no build
//!   does, in this process or another on the same data dir, and no build starts until it
//!   ends. The caller takes the lease *before* it reads what is referenced.
//! - a layer or cache entry younger than `min_age` is kept (a failed build's steps stay
//!   cached for the rebuild that fixes it).
//! - a cache entry is kept when every layer it names is kept (a hit must find its layers);
//!   otherwise it goes, so no hit ever names a collected layer.
//!
//! Layers are tenants' trees: they are removed through [`sandpit_fs::remove_tree`], which
//! never follows a symlink. A name under `layers/` that is not a [`LayerId`] is left alone.
#![expect(
    clippy::disallowed_methods,
    reason = "the store's own layout under the data dir (names are checked ids and keys); layer trees are removed only through sandpit_fs"
)]

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::ImageError;
use crate::store::{CacheEntry, LayerId, LayerStore};

/// Held by a build from before its first cache lookup until its result is recorded:
/// collection does not run meanwhile. Released on drop.
#[must_use = "the lease holds only while it lives"]
#[derive(Debug)]
pub struct BuildLease {
    _file: File,
}

/// Held while collecting: no build runs or starts meanwhile. Released on drop.
#[must_use = "the lease holds only while it lives"]
#[derive(Debug)]
pub struct GcLease {
    _file: File,
}

/// What a collection removed (or, in a dry run, would remove).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    /// Layers and their size on disk (blocks), in bytes.
    pub layers: Vec<(LayerId, u64)>,
    /// Build cache entries.
    pub cache_entries: usize,
    /// Layers kept (referenced or young).
    pub kept: usize,
}

impl Collected {
    pub fn bytes(&self) -> u64 {
        self.layers.iter().map(|(_, b)| b).sum()
    }
}

impl LayerStore {
    fn lock_file(&self) -> Result<File, ImageError> {
        let path = self.root().join("gc.lock");
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(ImageError::files("opening the collection lock", &path))
    }

    /// Take a build's lease, waiting while a collection runs (blocking: call it from a
    /// blocking task).
    pub fn build_lease(&self) -> Result<BuildLease, ImageError> {
        let file = self.lock_file()?;
        file.lock_shared().map_err(ImageError::files(
            "taking a build lease",
            self.root().join("gc.lock"),
        ))?;
        Ok(BuildLease { _file: file })
    }

    /// The collection lease, or `None` while a build holds its lease.
    pub fn try_gc_lease(&self) -> Result<Option<GcLease>, ImageError> {
        let file = self.lock_file()?;
        match file.try_lock() {
            Ok(()) => Ok(Some(GcLease { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(ImageError::files(
                "taking the collection lease",
                self.root().join("gc.lock"),
            )(e)),
        }
    }

    /// The layer a stored path names (`…/layers/<id>`, whatever the data dir was called
    /// when it was recorded), if any.
    pub fn layer_id_of(path: &Path) -> Option<LayerId> {
        let parent = path.parent()?;
        if parent.file_name()? != "layers" {
            return None;
        }
        LayerId::parse(path.file_name()?.to_str()?)
    }

    /// Remove every layer not in `referenced`, not younger than `min_age` and not named by
    /// a kept cache entry, and every cache entry that names a removed layer (see the module
    /// doc). `dry_run`: remove nothing, report what would go. Needs the [`GcLease`].
    pub fn collect(
        &self,
        _lease: &GcLease,
        referenced: &HashSet<LayerId>,
        min_age: Duration,
        dry_run: bool,
    ) -> Result<Collected, ImageError> {
        let now = SystemTime::now();
        let young = |m: &std::fs::Metadata| {
            m.modified()
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_none_or(|age| age < min_age)
        };
        let layers_dir = self.root().join("layers");
        let mut present = Vec::new();
        for e in read_dir(&layers_dir)? {
            let Some(id) = e.file_name().to_str().and_then(LayerId::parse) else {
                continue;
            };
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            present.push((id, meta));
        }
        let mut keep: HashSet<LayerId> = referenced.clone();
        keep.extend(
            present
                .iter()
                .filter(|(_, m)| young(m))
                .map(|(id, _)| id.clone()),
        );
        // Cache entries: young ones keep their layers; old ones are kept only whole.
        let mut entries = Vec::new();
        for e in read_dir(&self.root().join("cache"))? {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let layers: Option<Vec<LayerId>> = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str::<CacheEntry>(&t).ok())
                .map(|c| {
                    c.layers
                        .iter()
                        .filter_map(|l| Self::layer_id_of(l))
                        .collect()
                });
            if young(&meta)
                && let Some(l) = &layers
            {
                keep.extend(l.iter().cloned());
            }
            entries.push((path, meta, layers));
        }
        let mut out = Collected::default();
        for (path, meta, layers) in entries {
            let whole = layers
                .as_ref()
                .is_some_and(|l| l.iter().all(|id| keep.contains(id)));
            if young(&meta) || whole {
                continue;
            }
            out.cache_entries += 1;
            if !dry_run {
                std::fs::remove_file(&path)
                    .map_err(ImageError::files("removing a cache entry", &path))?;
            }
        }
        for (id, _) in present {
            if keep.contains(&id) {
                out.kept += 1;
                continue;
            }
            let path = self.layer_path(&id);
            let bytes = disk_usage(&path);
            if !dry_run {
                sandpit_fs::remove_tree(&path).map_err(|e| ImageError::Tree {
                    what: format!("removing layer {}", id.as_str()),
                    source: e,
                })?;
                let _ = std::fs::remove_file(self.root().join("sources").join(id.as_str()));
            }
            out.layers.push((id, bytes));
        }
        Ok(out)
    }
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>, ImageError> {
    std::fs::read_dir(dir)
        .and_then(|d| d.collect::<Result<Vec<_>, _>>())
        .map_err(ImageError::files("listing the layer store", dir))
}

/// Bytes of the files in a tree (apparent sizes), walked through handles (never through a
/// symlink); what cannot be read counts as 0.
pub fn disk_usage(path: &Path) -> u64 {
    fn walk(dir: &sandpit_fs::TreeDir, depth: usize) -> u64 {
        let Ok(entries) = dir.entries() else {
            return 0;
        };
        let mut total = 0;
        for (name, meta) in entries {
            total += meta.size;
            if meta.kind == sandpit_fs::Kind::Dir
                && depth < 4096
                && let Ok(sub) = dir.open_dir(Path::new(&name))
            {
                total += walk(&sub, depth + 1);
            }
        }
        total
    }
    sandpit_fs::TreeDir::open(path).map_or(0, |d| walk(&d, 0))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::ImageConfig;
    use crate::store::CacheKey;

    fn layer(store: &LayerStore, name: &str) -> (LayerId, PathBuf) {
        let id = LayerId::from_key(&CacheKey::root(name));
        let p = store.layer_path(&id);
        std::fs::create_dir_all(p.join("etc")).unwrap();
        std::fs::write(p.join("etc/f"), vec![7u8; 10_000]).unwrap();
        (id, p)
    }

    #[test]
    fn collects_unreferenced_layers_and_the_cache_entries_naming_them_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let store = LayerStore::open(dir.path().join("images")).unwrap();
        let (used, used_path) = layer(&store, "used");
        let (unused, unused_path) = layer(&store, "unused");
        // A hostile layer: a symlink to a canary outside the store.
        let canary = dir.path().join("canary");
        std::fs::create_dir(&canary).unwrap();
        std::fs::write(canary.join("keep"), "x").unwrap();
        std::os::unix::fs::symlink(&canary, unused_path.join("link")).unwrap();
        std::fs::create_dir_all(store.root().join("layers/not-an-id")).unwrap();
        let entry = |layers: Vec<PathBuf>| CacheEntry {
            layers,
            config: ImageConfig::default(),
        };
        store
            .put_cache(&CacheKey::root("a"), &entry(vec![used_path.clone()]))
            .unwrap();
        store
            .put_cache(
                &CacheKey::root("b"),
                &entry(vec![used_path.clone(), unused_path.clone()]),
            )
            .unwrap();
        let referenced: HashSet<LayerId> = [used.clone()].into();

        // Everything is young: nothing goes.
        let lease = store.try_gc_lease().unwrap().unwrap();
        let none = store
            .collect(&lease, &referenced, Duration::from_secs(3600), false)
            .unwrap();
        assert_eq!(
            (none.layers.len(), none.cache_entries, none.kept),
            (0, 0, 2)
        );

        // A build holds its lease: no collection.
        drop(lease);
        let build = store.build_lease().unwrap();
        assert!(store.try_gc_lease().unwrap().is_none());
        drop(build);
        let lease = store.try_gc_lease().unwrap().unwrap();

        let dry = store
            .collect(&lease, &referenced, Duration::ZERO, true)
            .unwrap();
        assert_eq!(
            dry.layers.iter().map(|l| &l.0).collect::<Vec<_>>(),
            [&unused]
        );
        assert!(unused_path.exists(), "a dry run removes nothing");
        let done = store
            .collect(&lease, &referenced, Duration::ZERO, false)
            .unwrap();
        assert_eq!(done, dry);
        assert!(done.bytes() >= 10_000, "{done:?}");
        assert_eq!(done.cache_entries, 1);
        assert!(!unused_path.exists() && used_path.exists());
        assert!(canary.join("keep").exists(), "the link was not followed");
        assert!(store.root().join("layers/not-an-id").exists());
        assert!(store.cached(&CacheKey::root("a")).is_some());
        assert!(
            !store
                .root()
                .join(format!("cache/{}.json", CacheKey::root("b").0))
                .exists()
        );
    }

    #[test]
    fn a_stored_path_names_its_layer_whatever_the_data_dir_was_called() {
        let id = LayerId::from_key(&CacheKey::root("x"));
        let p = PathBuf::from("./rel/images/layers").join(id.as_str());
        assert_eq!(LayerStore::layer_id_of(&p), Some(id));
        assert_eq!(
            LayerStore::layer_id_of(Path::new("/data/templates/base/rootfs")),
            None
        );
        assert_eq!(
            LayerStore::layer_id_of(Path::new("/x/layers/../../etc")),
            None
        );
    }
}
