//! The layer store under `<data dir>/images`: unpacked layers (`layers/<id>/`), where pulled
//! layers came from (`sources/<id>`: one `registry/repository` a line), build cache entries
//! (`cache/<key>.json`) and temporary downloads (`tmp/`). Layers are named by
//! content (the compressed blob's digest for pulled layers, the step's cache key for built
//! ones), so templates share them; each is published by renaming a finished temporary
//! directory, so a crash never leaves half a layer under its final name.
#![expect(
    clippy::disallowed_methods,
    reason = "the store's own layout under the data dir (names are digests and keys); the tenant trees in tmp/ and layers/ are removed only through sandpit_fs"
)]

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ImageError;
use crate::config::ImageConfig;

/// A layer's name in the store: 32 hex digits (short, because overlayfs takes at most
/// 4095 bytes of mount options and every lower directory's path is one of them).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LayerId(String);

impl LayerId {
    /// The id of a pulled layer: its blob digest (`sha256:<hex>`), shortened.
    pub fn from_digest(digest: &str) -> Result<LayerId, ImageError> {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ImageError::Pull {
                reference: digest.into(),
                detail: "layer digest is not sha256:<64 hex digits>".into(),
            });
        }
        Ok(LayerId(hex[..32].to_ascii_lowercase()))
    }

    /// The id of a layer made by a build step with this cache key.
    pub fn from_key(key: &CacheKey) -> LayerId {
        LayerId(format!("b{}", &key.0[..31]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A stored id (from a template row or a cache entry), checked for shape.
    pub fn parse(s: &str) -> Option<LayerId> {
        (s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'b'))
            .then(|| LayerId(s.to_string()))
    }
}

/// A build step's identity: hash of the parent's key, the instruction and its inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CacheKey(pub String);

impl CacheKey {
    pub fn root(what: &str) -> CacheKey {
        CacheKey(hex::encode(Sha256::digest(what.as_bytes())))
    }

    pub fn child(&self, parts: &[&str]) -> CacheKey {
        let mut h = Sha256::new();
        h.update(self.0.as_bytes());
        for p in parts {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p.as_bytes());
        }
        CacheKey(hex::encode(h.finalize()))
    }
}

/// What a build step produced: the image after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// Layer directories, lowest first.
    pub layers: Vec<PathBuf>,
    pub config: ImageConfig,
}

#[derive(Debug, Clone)]
pub struct LayerStore {
    root: PathBuf,
}

impl LayerStore {
    /// Open (create) the store at `root` (`<data dir>/images`).
    pub fn open(root: impl Into<PathBuf>) -> Result<LayerStore, ImageError> {
        let root = root.into();
        for d in ["layers", "sources", "cache", "tmp"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p)
                .map_err(ImageError::files("creating the layer store", &p))?;
        }
        Ok(LayerStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn layer_path(&self, id: &LayerId) -> PathBuf {
        self.root.join("layers").join(id.as_str())
    }

    pub fn has_layer(&self, id: &LayerId) -> bool {
        self.layer_path(id).is_dir()
    }

    /// Remove a temporary file or directory [`LayerStore::temp_path`] handed out. What is in
    /// it may be a tenant's: it goes through handles, symlinks unlinked, never followed.
    pub fn discard_temp(&self, path: &Path) {
        if let Err(e) = sandpit_fs::remove_tree(path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a temporary tree");
        }
    }

    /// Records that `source` (`registry/repository`) served pulled layer `id` (its blob
    /// verified against the digest), so a later pull from there may reuse the layer once the
    /// registry confirms that pull's access (see [`crate::registry`]).
    pub fn add_layer_source(&self, id: &LayerId, source: &str) -> Result<(), ImageError> {
        use std::io::Write;
        if self.layer_has_source(id, source) {
            return Ok(());
        }
        let path = self.root.join("sources").join(id.as_str());
        // One short append per line: concurrent pulls interleave whole lines, and a lost line
        // only costs a download.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(format!("{source}\n").as_bytes()))
            .map_err(ImageError::files("recording a layer's source", &path))
    }

    /// Whether pulled layer `id` was stored from `source` before.
    pub fn layer_has_source(&self, id: &LayerId, source: &str) -> bool {
        std::fs::read_to_string(self.root.join("sources").join(id.as_str()))
            .is_ok_and(|text| text.lines().any(|l| l == source))
    }

    /// A fresh temporary path (not created) on the same file system as the layers.
    pub fn temp_path(&self, what: &str) -> PathBuf {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    /// Publish the finished directory `dir` as layer `id` (atomic rename). If another build
    /// published the same layer first, `dir` is removed and the existing one kept.
    pub fn publish_layer(&self, dir: &Path, id: &LayerId) -> Result<PathBuf, ImageError> {
        let dest = self.layer_path(id);
        match std::fs::rename(dir, &dest) {
            Ok(()) => Ok(dest),
            Err(_) if dest.is_dir() => {
                self.discard_temp(dir);
                Ok(dest)
            }
            Err(e) => Err(ImageError::files("publishing a layer", &dest)(e)),
        }
    }

    pub fn cached(&self, key: &CacheKey) -> Option<CacheEntry> {
        let text = std::fs::read_to_string(self.root.join("cache").join(format!("{}.json", key.0)))
            .ok()?;
        let entry: CacheEntry = serde_json::from_str(&text).ok()?;
        entry.layers.iter().all(|l| l.is_dir()).then_some(entry)
    }

    pub fn put_cache(&self, key: &CacheKey, entry: &CacheEntry) -> Result<(), ImageError> {
        let dest = self.root.join("cache").join(format!("{}.json", key.0));
        let tmp = self.temp_path("cache");
        std::fs::write(&tmp, serde_json::to_vec(entry).expect("entry serializes"))
            .map_err(ImageError::files("writing a cache entry", &tmp))?;
        std::fs::rename(&tmp, &dest).map_err(ImageError::files("writing a cache entry", &dest))
    }

    /// Remove what a crashed run left in `tmp/` (a killed mmdebstrap leaves `/proc`, `/sys`
    /// and `/dev` mounts in its target: they are detached first).
    pub fn clean_temp(&self) {
        unmount_below(&self.root.join("tmp"));
        if let Ok(entries) = std::fs::read_dir(self.root.join("tmp")) {
            for e in entries.flatten() {
                let p = e.path();
                self.discard_temp(&p);
            }
        }
    }
}

/// Detach every mount at or below `dir` (deepest first).
pub fn unmount_below(dir: &Path) {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(&dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        if let Err(e) = rustix::mount::unmount(&p, rustix::mount::UnmountFlags::DETACH) {
            tracing::warn!(path = %p.display(), error = %e, "detaching a leftover mount");
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ids_are_short_and_checked() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let id = LayerId::from_digest(&d).unwrap();
        assert_eq!(id.as_str().len(), 32);
        assert!(LayerId::from_digest("sha256:zz").is_err());
        assert!(LayerId::from_digest(&format!("sha256:{}/..", "a".repeat(61))).is_err());
        let k = CacheKey::root("scratch").child(&["RUN", "true"]);
        let built = LayerId::from_key(&k);
        assert_eq!(built.as_str().len(), 32);
        assert_eq!(LayerId::parse(built.as_str()), Some(built.clone()));
        assert_eq!(LayerId::parse("../../etc"), None);
    }

    #[test]
    fn layer_sources_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let store = LayerStore::open(dir.path()).unwrap();
        let id = LayerId::from_digest(&format!("sha256:{}", "cd".repeat(32))).unwrap();
        assert!(!store.layer_has_source(&id, "127.0.0.1:5000/app"));
        store.add_layer_source(&id, "127.0.0.1:5000/app").unwrap();
        store.add_layer_source(&id, "127.0.0.1:5000/app").unwrap();
        store
            .add_layer_source(&id, "docker.io/library/busybox")
            .unwrap();
        assert!(store.layer_has_source(&id, "127.0.0.1:5000/app"));
        assert!(store.layer_has_source(&id, "docker.io/library/busybox"));
        assert!(!store.layer_has_source(&id, "127.0.0.1:5000/ap"));
        let text = std::fs::read_to_string(dir.path().join("sources").join(id.as_str())).unwrap();
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b/c"), PathBuf::from("/a b/c"));
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn cache_keys_depend_on_every_part() {
        let root = CacheKey::root("scratch");
        assert_ne!(root.child(&["a", "bc"]), root.child(&["ab", "c"]));
        assert_eq!(root.child(&["x"]), CacheKey::root("scratch").child(&["x"]));
    }
}
