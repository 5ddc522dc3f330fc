//! The manifest: what a directory image holds, and the strict decoder for it.
//!
//! A manifest is JSON (format 2) giving the image's kind, its `chunk_bytes`, the
//! directory's own mode, its subdirectories `{path, mode}` and its regular files
//! `{path, mode, size, chunks}`, each list sorted by path bytes. A file is cut into
//! `chunk_bytes`-sized chunks (the last one shorter when `size` is not a multiple);
//! `chunks` lists the ones holding a non-zero byte as `[offset, "sha256:<hex>"]`, sorted by
//! offset, each the digest of that chunk's bytes (its blob). Every chunk not listed is all
//! zeros: a hole, stored nowhere and left a hole on pull. The manifest's sha256 is the
//! image's [`ImageRef`], so a manifest (and through its digests, every byte of every file)
//! is verified end to end. The chunking depends on the bytes only, never on how the source
//! file was allocated, so equal directories give equal manifests.
//!
//! Decoding fails closed: an unknown format version (format 1, one blob per file, is no
//! longer read) or field, a `chunk_bytes` that is not a power of two within
//! [`MIN_CHUNK_BYTES`]..=[`MAX_CHUNK_BYTES`], a path that is absolute, empty,
//! non-normalized (`a//b`, `./a`, trailing `/`) or has a `..` component, a duplicate path,
//! an entry whose parent is not a listed directory, a mode with bits beyond `0o777`, an
//! unsorted list, a chunk offset that is not a multiple of `chunk_bytes`, not below the
//! file's size, repeated or out of order, a digest that is not `sha256:<64 lowercase hex>`,
//! or sizes and counts over the caller's [`Limits`] are all refused before anything is
//! written.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::ObjectsError;

/// The manifest format this crate writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 2;

/// The chunk size a push uses: 4 MiB. Small enough that re-pushing a disk image after a
/// few writes uploads a few MiB per touched region, that an all-zero stretch of an ext4
/// image is found as a hole at a fine grain, and that a handful of chunks in flight keep
/// memory at tens of MiB; large enough that per-request costs (a HEAD and a PUT per
/// chunk) stay small against the transfer itself and a 10 GiB file lists at most 2 560
/// chunks (~220 KiB of manifest).
pub const DEFAULT_CHUNK_BYTES: u64 = 4 << 20;

/// Smallest `chunk_bytes` a manifest may have (64 KiB).
pub const MIN_CHUNK_BYTES: u64 = 64 << 10;

/// Largest `chunk_bytes` a manifest may have (64 MiB), which bounds what a pull holds in
/// memory per chunk.
pub const MAX_CHUNK_BYTES: u64 = 64 << 20;

/// Longest relative path (bytes) an image may hold.
pub const MAX_PATH_BYTES: usize = 4096;

/// Longest single path component (bytes), as on Linux file systems.
pub const MAX_NAME_BYTES: usize = 255;

/// Deepest nesting of directories an image may hold.
pub const MAX_DEPTH: usize = 128;

/// A sha256 digest, written `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Sha256Digest(pub(crate) [u8; 32]);

impl Sha256Digest {
    pub(crate) fn of(bytes: &[u8]) -> Sha256Digest {
        Sha256Digest(Sha256::digest(bytes).into())
    }

    pub(crate) fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parse `sha256:<64 lowercase hex>`; nothing else (no uppercase, no other algorithm).
    pub(crate) fn parse(s: &str) -> Option<Sha256Digest> {
        let hex = s.strip_prefix("sha256:")?;
        Sha256Digest::parse_hex(hex)
    }

    /// Parse exactly 64 lowercase hex digits.
    pub(crate) fn parse_hex(hex: &str) -> Option<Sha256Digest> {
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex, &mut out).ok()?;
        Some(Sha256Digest(out))
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Sha256Digest::parse(&s)
            .ok_or_else(|| serde::de::Error::custom("digest is not sha256:<64 lowercase hex>"))
    }
}

/// An image in the store, named by the sha256 of its manifest: `sha256:<64 lowercase hex>`.
///
/// Two pushes of byte-identical directories (same paths, modes and contents, same kind)
/// yield the same reference. It is safe to store in a database row and to show to an
/// operator; it reveals nothing but a digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef(pub(crate) Sha256Digest);

impl ImageRef {
    /// The 64 lowercase hex digits of the manifest's sha256 (no `sha256:` prefix).
    pub fn hex(&self) -> String {
        self.0.hex()
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageRef({})", self.0)
    }
}

impl FromStr for ImageRef {
    type Err = ObjectsError;

    /// Parse `sha256:<64 lowercase hex>`, as [`ImageRef`]'s `Display` writes it; anything
    /// else (uppercase, another algorithm, a bare hex string) is refused.
    fn from_str(s: &str) -> Result<ImageRef, ObjectsError> {
        Sha256Digest::parse(s)
            .map(ImageRef)
            .ok_or(ObjectsError::InvalidRef {
                reason: "expected sha256:<64 lowercase hex digits>",
            })
    }
}

impl Serialize for ImageRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for ImageRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Sha256Digest::deserialize(d).map(ImageRef)
    }
}

/// What an image holds; recorded in the manifest (so it is part of the reference) and
/// returned by a pull so the caller can check it got what it asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageKind {
    /// A gVisor checkpoint image of a hibernated sandbox (`runsc checkpoint --image-path`).
    Checkpoint,
    /// A named snapshot's directory (its files and memory).
    Snapshot,
    /// A template layer directory.
    Layer,
    /// A named volume's disk image.
    Volume,
}

/// Bounds on what a push reads and a pull accepts. Exceeding one is an error that leaves
/// nothing behind; the defaults fit checkpoint images of large sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most files plus directories in one image (default 100 000).
    pub max_entries: usize,
    /// Largest single file (default 256 GiB).
    pub max_file_bytes: u64,
    /// Largest sum of file sizes (default 1 TiB).
    pub max_total_bytes: u64,
    /// Largest manifest a pull downloads (default 16 MiB; 100 000 entries fit in ~15 MiB).
    pub max_manifest_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_entries: 100_000,
            max_file_bytes: 256 << 30,
            max_total_bytes: 1 << 40,
            max_manifest_bytes: 16 << 20,
        }
    }
}

/// A manifest as stored (format 2). Field order and list order are fixed, so equal
/// directories serialize to equal bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Manifest {
    pub(crate) format: u32,
    pub(crate) kind: ImageKind,
    /// The size of every chunk but a file's last.
    pub(crate) chunk_bytes: u64,
    /// The image root's own permission bits.
    pub(crate) mode: u32,
    /// Every subdirectory, sorted by path bytes.
    pub(crate) dirs: Vec<DirEntry>,
    /// Every regular file, sorted by path bytes.
    pub(crate) files: Vec<FileEntry>,
}

/// A subdirectory of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DirEntry {
    pub(crate) path: String,
    pub(crate) mode: u32,
}

/// A regular file of the image and the blobs holding its non-zero chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileEntry {
    pub(crate) path: String,
    pub(crate) mode: u32,
    pub(crate) size: u64,
    /// The chunks holding a non-zero byte, sorted by offset; every other chunk is zeros.
    pub(crate) chunks: Vec<Chunk>,
}

/// One stored chunk of a file: its offset (a multiple of the manifest's `chunk_bytes`) and
/// the digest of its bytes. Written `[offset, "sha256:<hex>"]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub(crate) offset: u64,
    pub(crate) digest: Sha256Digest,
}

impl Serialize for Chunk {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.offset, self.digest).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Chunk {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (offset, digest) = <(u64, Sha256Digest)>::deserialize(d)?;
        Ok(Chunk { offset, digest })
    }
}

impl FileEntry {
    /// The length of the chunk at `offset` (an offset below `size`): `chunk_bytes`, or
    /// what is left of the file for its last chunk.
    pub(crate) fn chunk_len(&self, offset: u64, chunk_bytes: u64) -> u64 {
        (self.size - offset).min(chunk_bytes)
    }
}

impl Manifest {
    /// The canonical bytes (compact JSON) and their digest, the image's reference.
    pub(crate) fn encode(&self) -> (Vec<u8>, ImageRef) {
        let bytes = serde_json::to_vec(self).expect("a manifest always serializes");
        let digest = Sha256Digest::of(&bytes);
        (bytes, ImageRef(digest))
    }

    /// Decode and check manifest bytes fetched for `image`: the bytes must hash to the
    /// reference, parse as format 2 exactly, and pass [`Manifest::check`].
    pub(crate) fn decode(
        image: ImageRef,
        bytes: &[u8],
        limits: &Limits,
    ) -> Result<Manifest, ObjectsError> {
        let bad = |reason: String| ObjectsError::BadManifest { image, reason };
        let actual = Sha256Digest::of(bytes);
        if actual != image.0 {
            return Err(bad(format!("its content has digest {actual}")));
        }
        // Look at the version first, so a future format gets a clear message rather than
        // a complaint about a field this version does not know.
        #[derive(Deserialize)]
        struct Version {
            format: serde_json::Value,
        }
        let version: Version =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a manifest: {e}")))?;
        if version.format != FORMAT_VERSION {
            return Err(bad(format!(
                "unknown format {} (this build reads {FORMAT_VERSION})",
                version.format
            )));
        }
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a manifest: {e}")))?;
        manifest.check(limits).map_err(bad)?;
        Ok(manifest)
    }

    /// The rules every manifest obeys, whoever wrote it (see the module docs).
    pub(crate) fn check(&self, limits: &Limits) -> Result<(), String> {
        if self.format != FORMAT_VERSION {
            return Err(format!("unknown format {}", self.format));
        }
        let cb = self.chunk_bytes;
        if !cb.is_power_of_two() || !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&cb) {
            return Err(format!(
                "chunk_bytes {cb} is not a power of two from {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES}"
            ));
        }
        check_mode(self.mode).map_err(|e| format!("root: {e}"))?;
        let entries = self.dirs.len().saturating_add(self.files.len());
        if entries > limits.max_entries {
            return Err(format!(
                "{entries} entries, over the limit of {}",
                limits.max_entries
            ));
        }
        let mut dirs: HashSet<&str> = HashSet::with_capacity(self.dirs.len());
        let mut prev: Option<&str> = None;
        for d in &self.dirs {
            check_path(&d.path)?;
            check_mode(d.mode).map_err(|e| format!("{}: {e}", d.path))?;
            if prev.is_some_and(|p| p.as_bytes() >= d.path.as_bytes()) {
                return Err(format!("directory {} is out of order or repeated", d.path));
            }
            prev = Some(&d.path);
            check_parent(&d.path, &dirs)?;
            dirs.insert(&d.path);
        }
        let mut total: u64 = 0;
        let mut prev: Option<&str> = None;
        for f in &self.files {
            check_path(&f.path)?;
            check_mode(f.mode).map_err(|e| format!("{}: {e}", f.path))?;
            if prev.is_some_and(|p| p.as_bytes() >= f.path.as_bytes()) {
                return Err(format!("file {} is out of order or repeated", f.path));
            }
            prev = Some(&f.path);
            if dirs.contains(f.path.as_str()) {
                return Err(format!("{} is both a file and a directory", f.path));
            }
            check_parent(&f.path, &dirs)?;
            if f.size > limits.max_file_bytes {
                return Err(format!(
                    "{} has {} bytes, over the limit of {}",
                    f.path, f.size, limits.max_file_bytes
                ));
            }
            // Offsets aligned, below the size, strictly increasing (so none repeats).
            let mut next: u64 = 0;
            for c in &f.chunks {
                if c.offset % cb != 0 {
                    return Err(format!(
                        "{}: chunk offset {} is not a multiple of {cb}",
                        f.path, c.offset
                    ));
                }
                if c.offset >= f.size {
                    return Err(format!(
                        "{}: chunk offset {} is not below its size {}",
                        f.path, c.offset, f.size
                    ));
                }
                if c.offset < next {
                    return Err(format!(
                        "{}: chunk offset {} is out of order or repeated",
                        f.path, c.offset
                    ));
                }
                // offset < size <= u64::MAX, but offset + cb may not fit: saturate, as
                // nothing can follow the last possible chunk anyway.
                next = c.offset.saturating_add(cb);
            }
            total = total
                .checked_add(f.size)
                .filter(|t| *t <= limits.max_total_bytes)
                .ok_or_else(|| {
                    format!(
                        "files add up to more than the limit of {} bytes",
                        limits.max_total_bytes
                    )
                })?;
        }
        Ok(())
    }

    /// The sum of the file sizes (checked not to overflow by [`Manifest::check`]).
    pub(crate) fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Every chunk digest the image needs (with repeats).
    pub(crate) fn digests(&self) -> impl Iterator<Item = Sha256Digest> + '_ {
        self.files
            .iter()
            .flat_map(|f| f.chunks.iter().map(|c| c.digest))
    }
}

/// Permission bits only: set-id and sticky bits are never carried.
fn check_mode(mode: u32) -> Result<(), String> {
    if mode & !0o777 != 0 {
        return Err(format!("mode {mode:#o} has bits beyond 0o777"));
    }
    Ok(())
}

/// A normalized relative path: components separated by single `/`, none empty, `.` or
/// `..`, no NUL, within the length and depth bounds.
pub(crate) fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("an entry has an empty path".into());
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(format!(
            "a path is longer than {MAX_PATH_BYTES} bytes: {}…",
            path.chars().take(64).collect::<String>()
        ));
    }
    let mut depth = 0;
    for c in path.split('/') {
        depth += 1;
        if c.is_empty() || c == "." || c == ".." || c.contains('\0') {
            return Err(format!("{path:?} is not a normalized relative path"));
        }
        if c.len() > MAX_NAME_BYTES {
            return Err(format!(
                "{path:?} has a component longer than {MAX_NAME_BYTES} bytes"
            ));
        }
    }
    if depth > MAX_DEPTH {
        return Err(format!("{path:?} is deeper than {MAX_DEPTH} levels"));
    }
    Ok(())
}

/// The entry's parent is the root or a directory listed before it.
fn check_parent(path: &str, dirs: &HashSet<&str>) -> Result<(), String> {
    match path.rsplit_once('/') {
        None => Ok(()),
        Some((parent, _)) if dirs.contains(parent) => Ok(()),
        Some((parent, _)) => Err(format!(
            "{path}: its parent {parent} is not a listed directory"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CB: u64 = DEFAULT_CHUNK_BYTES;

    /// A file of `size` bytes whose chunks at `offsets` hold data.
    fn chunked(path: &str, size: u64, offsets: &[u64]) -> FileEntry {
        FileEntry {
            path: path.into(),
            mode: 0o644,
            size,
            chunks: offsets
                .iter()
                .map(|&offset| Chunk {
                    offset,
                    digest: Sha256Digest([offset as u8; 32]),
                })
                .collect(),
        }
    }

    fn file(path: &str, size: u64) -> FileEntry {
        chunked(path, size, if size == 0 { &[] } else { &[0] })
    }

    fn dir(path: &str) -> DirEntry {
        DirEntry {
            path: path.into(),
            mode: 0o755,
        }
    }

    fn manifest(dirs: Vec<DirEntry>, files: Vec<FileEntry>) -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            kind: ImageKind::Checkpoint,
            chunk_bytes: CB,
            mode: 0o700,
            dirs,
            files,
        }
    }

    #[test]
    fn a_good_manifest_passes_and_round_trips() {
        let m = manifest(
            vec![dir("a"), dir("a/b")],
            vec![
                file("a/b/c", 3),
                file("a/e", 0),
                // 10 GiB with data in its first, third and last chunks.
                chunked("disk", 10 << 30, &[0, 2 * CB, (10 << 30) - CB]),
                // All holes.
                chunked("holes", 3 * CB + 1, &[]),
                file("top", 9),
            ],
        );
        m.check(&Limits::default()).unwrap();
        let (bytes, image) = m.encode();
        let back = Manifest::decode(image, &bytes, &Limits::default()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.total_bytes(), 12 + (10 << 30) + 3 * CB + 1);
        assert_eq!(back.digests().count(), 5);
        // The chunk list is compact: `[offset,"sha256:…"]`.
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains(&format!(r#""chunks":[[0,"sha256:{}"]]"#, "00".repeat(32))));
        // Encoding is deterministic.
        assert_eq!(m.clone().encode().1, image);
    }

    #[test]
    fn chunk_lengths_follow_the_size() {
        let f = chunked("f", 2 * CB + 5, &[0, CB, 2 * CB]);
        assert_eq!(f.chunk_len(0, CB), CB);
        assert_eq!(f.chunk_len(2 * CB, CB), 5);
    }

    #[test]
    fn paths_must_be_normalized_and_relative() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "./a",
            "a/.",
            "a/",
            "a\0b",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?} accepted");
        }
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert!(check_path(&long).is_err());
        let deep = vec!["d"; MAX_DEPTH + 1].join("/");
        assert!(check_path(&deep).is_err());
        assert!(check_path("a/b.c/..d/.e").is_ok());
    }

    #[test]
    fn structure_rules_are_enforced() {
        let l = Limits::default();
        // Duplicate, unsorted, missing parent, file over a dir, bad modes.
        assert!(
            manifest(vec![], vec![file("a", 1), file("a", 1)])
                .check(&l)
                .is_err()
        );
        assert!(
            manifest(vec![], vec![file("b", 1), file("a", 1)])
                .check(&l)
                .is_err()
        );
        assert!(manifest(vec![], vec![file("a/b", 1)]).check(&l).is_err());
        assert!(
            manifest(vec![dir("a")], vec![file("a", 1)])
                .check(&l)
                .is_err()
        );
        let mut setuid = file("a", 1);
        setuid.mode = 0o4755;
        assert!(manifest(vec![], vec![setuid]).check(&l).is_err());
    }

    #[test]
    fn chunk_rules_are_enforced() {
        let l = Limits::default();
        let ok = |f: FileEntry| manifest(vec![], vec![f]).check(&l);
        ok(chunked("a", 3 * CB, &[0, CB, 2 * CB])).unwrap();
        ok(chunked("a", 2 * CB + 1, &[2 * CB])).unwrap();
        for (label, f) in [
            ("misaligned", chunked("a", 3 * CB, &[1])),
            ("misaligned later", chunked("a", 3 * CB, &[0, CB + 4096])),
            ("at the size", chunked("a", 2 * CB, &[2 * CB])),
            ("beyond the size", chunked("a", CB, &[4 * CB])),
            ("empty file with a chunk", chunked("a", 0, &[0])),
            ("repeated", chunked("a", 3 * CB, &[CB, CB])),
            ("unsorted", chunked("a", 3 * CB, &[2 * CB, CB])),
        ] {
            assert!(ok(f).is_err(), "{label} accepted");
        }
        for cb in [
            0,
            1,
            MIN_CHUNK_BYTES / 2,
            MIN_CHUNK_BYTES + 1,
            3 << 20,
            MAX_CHUNK_BYTES * 2,
            u64::MAX,
        ] {
            let mut m = manifest(vec![], vec![]);
            m.chunk_bytes = cb;
            assert!(m.check(&l).is_err(), "chunk_bytes {cb} accepted");
        }
        for cb in [MIN_CHUNK_BYTES, MAX_CHUNK_BYTES] {
            let mut m = manifest(vec![], vec![chunked("a", 3 * cb, &[0, 2 * cb])]);
            m.chunk_bytes = cb;
            m.check(&l).unwrap();
        }
    }

    #[test]
    fn limits_are_enforced() {
        let l = Limits {
            max_entries: 2,
            max_file_bytes: 10,
            max_total_bytes: 15,
            max_manifest_bytes: 1 << 20,
        };
        assert!(manifest(vec![], vec![file("a", 11)]).check(&l).is_err());
        assert!(
            manifest(vec![], vec![file("a", 10), file("b", 10)])
                .check(&l)
                .is_err()
        );
        assert!(
            manifest(vec![dir("d")], vec![file("a", 1), file("b", 1)])
                .check(&l)
                .is_err()
        );
        let huge = Limits {
            max_file_bytes: u64::MAX,
            max_total_bytes: u64::MAX,
            ..Limits::default()
        };
        assert!(
            manifest(vec![], vec![file("a", u64::MAX), file("b", u64::MAX)])
                .check(&huge)
                .is_err()
        );
    }

    #[test]
    fn decode_refuses_wrong_digest_version_and_unknown_fields() {
        let l = Limits::default();
        let m = manifest(vec![], vec![file("a", 1)]);
        let (bytes, image) = m.encode();
        let other = ImageRef(Sha256Digest([0; 32]));
        assert!(Manifest::decode(other, &bytes, &l).is_err());
        Manifest::decode(image, &bytes, &l).unwrap();

        let d = format!("sha256:{}", "ab".repeat(32));
        let head = r#"{"format":2,"kind":"layer","chunk_bytes":4194304,"mode":448"#;
        for text in [
            // Format 1 (one blob per file) is no longer read.
            format!(
                r#"{{"format":1,"kind":"layer","mode":448,"dirs":[],"files":[{{"path":"a","mode":420,"size":1,"digest":"{d}"}}]}}"#
            ),
            r#"{"format":3,"kind":"layer","chunk_bytes":4194304,"mode":448,"dirs":[],"files":[]}"#.to_string(),
            r#"{"format":"2","kind":"layer","chunk_bytes":4194304,"mode":448,"dirs":[],"files":[]}"#.to_string(),
            format!(r#"{head},"dirs":[],"files":[],"x":1}}"#),
            r#"{"format":2,"kind":"other","chunk_bytes":4194304,"mode":448,"dirs":[],"files":[]}"#.to_string(),
            r#"{"format":2,"format":2,"kind":"layer","chunk_bytes":4194304,"mode":448,"dirs":[],"files":[]}"#.to_string(),
            r#"{"format":2,"kind":"layer","mode":448,"dirs":[],"files":[]}"#.to_string(),
            format!(
                r#"{head},"dirs":[],"files":[{{"path":"a","mode":420,"size":1,"chunks":[[0,"{d}",1]]}}]}}"#
            ),
            format!(
                r#"{head},"dirs":[],"files":[{{"path":"a","mode":420,"size":1,"chunks":[[0]]}}]}}"#
            ),
            format!(
                r#"{head},"dirs":[],"files":[{{"path":"a","mode":420,"size":1,"chunks":[[-1,"{d}"]]}}]}}"#
            ),
            format!(
                r#"{head},"dirs":[],"files":[{{"path":"a","mode":420,"size":1,"chunks":[{{"offset":0,"digest":"{d}"}}]}}]}}"#
            ),
            format!(
                r#"{head},"dirs":[],"files":[{{"path":"a","mode":420,"size":1,"digest":"{d}","chunks":[]}}]}}"#
            ),
            format!(r#"{head},"dirs":[],"files":[{{"path":"a","mode":420,"size":1}}]}}"#),
            "not json".to_string(),
        ] {
            let image = ImageRef(Sha256Digest::of(text.as_bytes()));
            let err = Manifest::decode(image, text.as_bytes(), &l).unwrap_err();
            assert!(
                matches!(err, ObjectsError::BadManifest { .. }),
                "{text}: {err}"
            );
        }
        // The same shape with a well-formed chunk list decodes.
        let text = format!(
            r#"{head},"dirs":[],"files":[{{"path":"a","mode":420,"size":1,"chunks":[[0,"{d}"]]}}]}}"#
        );
        let image = ImageRef(Sha256Digest::of(text.as_bytes()));
        Manifest::decode(image, text.as_bytes(), &l).unwrap();

        let text = r#"{"format":1,"kind":"layer","mode":448,"dirs":[],"files":[]}"#;
        let image = ImageRef(Sha256Digest::of(text.as_bytes()));
        let err = Manifest::decode(image, text.as_bytes(), &l).unwrap_err();
        assert!(err.to_string().contains("unknown format 1"), "{err}");
    }

    #[test]
    fn image_refs_parse_strictly() {
        let hex = "ab".repeat(32);
        let r: ImageRef = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(r.to_string(), format!("sha256:{hex}"));
        assert_eq!(r.hex(), hex);
        for bad in [
            hex.clone(),
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha512:{hex}"),
            format!("sha256:{}", &hex[1..]),
            format!("sha256:{hex}0"),
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<ImageRef>(&json).unwrap(), r);
        assert!(serde_json::from_str::<ImageRef>("\"sha256:00\"").is_err());
    }
}
