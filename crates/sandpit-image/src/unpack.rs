//! Unpacking a layer tarball into a directory in overlayfs format.
//!
//! OCI whiteouts become overlayfs ones: `.wh.<name>` a 0/0 character device `<name>`, and
//! `.wh..wh..opq` the `trusted.overlay.opaque=y` attribute on its directory. Everything goes
//! through `sandpit-fs` handles: every entry's parent is opened with `openat2(RESOLVE_BENEATH
//! | RESOLVE_NO_SYMLINKS)` from the layer's root, so neither `..` nor a symlink planted by an
//! earlier entry can make a later one land outside; a later entry replaces an earlier one by
//! unlinking it; hard links must name a file of the same layer. Owners, modes and times are
//! kept and applied through handles; directory modes are applied last, so a read-only
//! directory still gets its entries. [`UnpackLimits`] bound bytes, entries and depth.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use sandpit_fs::{InTheWay, Node, TreeDir};

use crate::ImageError;

/// Totals of one unpack.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
}

/// Open a layer blob (a host-owned path in the layer store), undoing gzip or zstd
/// compression (detected from its first bytes).
pub fn open_blob(path: &Path) -> Result<Box<dyn Read + Send>, ImageError> {
    #[expect(
        clippy::disallowed_methods,
        reason = "blobs live in the layer store under their digest: a host-owned path"
    )]
    let f = File::open(path).map_err(ImageError::files("opening a layer blob", path))?;
    decompress(f)
}

/// A reader of an archive held in memory (a build context from a request), undoing gzip or
/// zstd compression.
pub fn decompress_bytes(bytes: bytes::Bytes) -> Result<Box<dyn Read + Send>, ImageError> {
    let magic: [u8; 4] = std::array::from_fn(|i| bytes.get(i).copied().unwrap_or(0));
    decompressor(magic, std::io::Cursor::new(bytes))
}

/// A reader of `f` from its start, undoing gzip or zstd compression (detected from its
/// first bytes).
pub fn decompress(mut f: File) -> Result<Box<dyn Read + Send>, ImageError> {
    use std::io::{Seek, SeekFrom};
    let mut magic = [0u8; 4];
    let n = f
        .read(&mut magic)
        .and_then(|n| f.seek(SeekFrom::Start(0)).map(|_| n))
        .map_err(ImageError::files("reading an archive", ""))?;
    magic[n..].fill(0);
    decompressor(magic, BufReader::with_capacity(1 << 20, f))
}

/// `r` (at the archive's start, whose first bytes are `magic`, zero-padded) read through
/// the decoder those bytes name: gzip, zstd, or none.
fn decompressor(
    magic: [u8; 4],
    r: impl std::io::BufRead + Send + 'static,
) -> Result<Box<dyn Read + Send>, ImageError> {
    Ok(if magic[..2] == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(r)
                .map_err(ImageError::files("reading a zstd archive", ""))?,
        )
    } else {
        Box::new(r)
    })
}

/// How whiteout entries are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// An image layer: turn them into overlayfs whiteouts.
    Overlay,
    /// A plain archive (`ADD local.tar`): no special meaning, unpacked as files.
    Plain,
}

/// Bounds on one archive. Exceeding one ends the unpack with
/// [`ImageError::ArchiveTooLarge`] naming it (API code `archive_too_large`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Bytes of file content written (what a gzip bomb inflates to).
    pub max_bytes: u64,
    /// Archive entries of any kind.
    pub max_entries: u64,
    /// Path components of one entry.
    pub max_depth: usize,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_bytes: 10 << 30,
            max_entries: 1_000_000,
            max_depth: 256,
        }
    }
}

static DEFAULT_LIMITS: std::sync::RwLock<Option<UnpackLimits>> = std::sync::RwLock::new(None);

impl UnpackLimits {
    /// The limits every unpack without explicit ones uses (the server sets them from its
    /// configuration at start).
    pub fn current() -> UnpackLimits {
        DEFAULT_LIMITS
            .read()
            .map(|l| l.unwrap_or_default())
            .unwrap_or_default()
    }

    /// Replace the process-wide limits [`UnpackLimits::current`] returns.
    pub fn set_current(limits: UnpackLimits) {
        if let Ok(mut l) = DEFAULT_LIMITS.write() {
            *l = Some(limits);
        }
    }
}

/// Unpack the tar stream `reader` into the existing directory `dest` (a host-owned path:
/// the layer's or context's fresh directory), with the current limits.
pub fn unpack(
    reader: impl Read,
    dest: &Path,
    whiteouts: Whiteouts,
) -> Result<UnpackStats, ImageError> {
    let root = TreeDir::open(dest).map_err(|e| ImageError::Tree {
        what: "opening the layer directory".into(),
        source: e,
    })?;
    unpack_into(reader, &root, whiteouts, &UnpackLimits::current())
}

/// Unpack the tar stream `reader` into the open directory `root`, the way containerd does:
/// entries land in archive order and a later entry replaces an earlier one of the same name
/// (the earlier one is unlinked, never written through, whatever the kinds); a symlink is
/// never followed, in a parent or as the entry itself; hard links name a regular file of
/// this archive; device nodes are skipped with a log line; modes (set-id bits included),
/// owners and times are applied through handles to what this archive made. Directory modes
/// are applied last (deepest first), re-opened beneath the root without following symlinks,
/// so a directory replaced later by a symlink gets nothing.
pub fn unpack_into(
    reader: impl Read,
    root: &TreeDir,
    whiteouts: Whiteouts,
    limits: &UnpackLimits,
) -> Result<UnpackStats, ImageError> {
    let layer = root.path().display().to_string();
    let bad = |detail: String| ImageError::Unpack {
        layer: layer.clone(),
        detail,
    };
    let tree = |what: &str| {
        let what = what.to_string();
        move |e: sandpit_fs::FsError| match e {
            sandpit_fs::FsError::Escape { path } | sandpit_fs::FsError::BadPath { path } => {
                ImageError::UnsafePath { path }
            }
            e => ImageError::Tree { what, source: e },
        }
    };
    let too_large = |limit: String| ImageError::ArchiveTooLarge { limit };
    let mut archive = tar::Archive::new(reader);
    let mut stats = UnpackStats::default();
    // Directory modes, owners and times, applied at the end (deepest first).
    let mut dirs: Vec<(PathBuf, u32, u64)> = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("reading the archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("reading the archive: {e}")))?;
        stats.entries += 1;
        if stats.entries > limits.max_entries {
            return Err(too_large(format!("{} entries", limits.max_entries)));
        }
        let raw = entry.path_bytes().into_owned();
        let Some(rel) = clean_path(&raw)? else {
            continue;
        }; // the root itself
        if rel.components().count() > limits.max_depth {
            return Err(too_large(format!("a path depth of {}", limits.max_depth)));
        }
        let name = rel
            .file_name()
            .expect("clean paths have a last component")
            .to_owned();
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        let header = entry.header().clone();
        let kind = header.entry_type();
        // Metadata entries carry no path of their own.
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            continue;
        }
        let parent = root
            .make_dirs(&parent_rel, 0o755, InTheWay::Refuse)
            .map_err(tree("creating a parent directory"))?;
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let owner = (
            header.uid().unwrap_or(0) as u32,
            header.gid().unwrap_or(0) as u32,
        );
        let mtime = header.mtime().unwrap_or(0);
        let name_str = name.to_string_lossy();
        if whiteouts == Whiteouts::Overlay && name_str.starts_with(".wh.") {
            stats.whiteouts += 1;
            if name_str == ".wh..wh..opq" {
                parent
                    .set_xattr("trusted.overlay.opaque", b"y")
                    .map_err(tree("marking a directory opaque"))?;
            } else {
                let hidden = OsStr::new(&name_str[4..]);
                if sandpit_fs::check_name(hidden).is_err() {
                    return Err(ImageError::UnsafePath {
                        path: String::from_utf8_lossy(&raw).into(),
                    });
                }
                parent
                    .mknod(hidden, Node::Whiteout)
                    .map_err(tree("writing a whiteout"))?;
            }
            continue;
        }
        match kind {
            tar::EntryType::Directory => {
                parent
                    .make_dir(&name, 0o755, InTheWay::Replace)
                    .map_err(tree("creating a directory"))?;
                dirs.push((rel, mode, mtime));
                let (u, g) = owner;
                parent
                    .chown(&name, u, g)
                    .map_err(tree("setting an owner"))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = header.size().unwrap_or(0);
                if stats.bytes.saturating_add(size) > limits.max_bytes {
                    return Err(too_large(format!("{} bytes unpacked", limits.max_bytes)));
                }
                let mut file = parent.create_file(&name).map_err(tree("creating a file"))?;
                // Bounded by the header's size and by the limit, whatever the stream claims.
                let room = limits.max_bytes - stats.bytes;
                let written = std::io::copy(&mut (&mut entry).take(room.min(size)), &mut file)
                    .map_err(ImageError::files("writing a file", &rel))?;
                stats.bytes += written;
                sandpit_fs::set_attrs(&file, Some(owner), mode, Some(mtime as i64))
                    .map_err(ImageError::files("setting a file's owner and mode", &rel))?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad(format!("symlink {} has no target", rel.display())))?;
                parent
                    .symlink(OsStr::from_bytes(&link), &name)
                    .map_err(tree("creating a symlink"))?;
                let (u, g) = owner;
                parent
                    .chown(&name, u, g)
                    .map_err(tree("setting an owner"))?;
                parent.set_time(&name, mtime as i64);
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad(format!("hard link {} has no target", rel.display())))?;
                let Some(src_rel) = clean_path(&link)? else {
                    return Err(ImageError::UnsafePath {
                        path: String::from_utf8_lossy(&link).into(),
                    });
                };
                let src_parent = root
                    .open_dir(src_rel.parent().unwrap_or(Path::new("")))
                    .map_err(|_| ImageError::UnsafePath {
                        path: src_rel.display().to_string(),
                    })?;
                let src_name = src_rel.file_name().expect("clean").to_owned();
                parent
                    .hard_link(&src_parent, &src_name, &name)
                    .map_err(|e| ImageError::Tree {
                        what: format!(
                            "hard-linking {} to {} (it must be a file of the same layer)",
                            rel.display(),
                            src_rel.display()
                        ),
                        source: e,
                    })?;
            }
            tar::EntryType::Fifo => {
                parent
                    .mknod(&name, Node::Fifo { mode: mode & 0o777 })
                    .map_err(tree("creating a fifo"))?;
                let (u, g) = owner;
                parent
                    .chown(&name, u, g)
                    .map_err(tree("setting an owner"))?;
                parent.set_time(&name, mtime as i64);
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                // Device nodes are the runtime's business (gVisor provides /dev); a layer
                // carrying them gets nothing. What was there by that name is gone.
                parent.remove(&name).map_err(tree("replacing an entry"))?;
                tracing::info!(path = %rel.display(), "skipping a device node in an archive");
            }
            other => {
                tracing::info!(path = %rel.display(), kind = ?other, "skipping an unknown archive entry type")
            }
        }
    }
    // Deepest first; of two entries for one directory the later one (kept after the earlier
    // by the stable sort) wins.
    dirs.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.components().count()));
    for (rel, mode, mtime) in dirs {
        // Replaced by a symlink or a file since: it is not ours to chmod any more.
        let Ok(dir) = root.open_dir(&rel) else {
            continue;
        };
        dir.set_attrs(None, mode, Some(mtime as i64))
            .map_err(tree("setting a directory's mode"))?;
    }
    Ok(stats)
}

/// An archive path made relative and free of `.`; `None` for the root itself. `..` is
/// refused outright (not clamped: an archive that tries is not trusted further).
pub fn clean_path(raw: &[u8]) -> Result<Option<PathBuf>, ImageError> {
    let text = std::str::from_utf8(raw).map_err(|_| ImageError::UnsafePath {
        path: String::from_utf8_lossy(raw).into(),
    })?;
    let mut out = PathBuf::new();
    for c in Path::new(text).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(ImageError::UnsafePath { path: text.into() });
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn tarball(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_600_000_000);
        h
    }

    fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, body: &[u8], mode: u32) {
        let mut h = header(tar::EntryType::Regular, mode, body.len() as u64);
        b.append_data(&mut h, path, body).unwrap();
    }

    /// Writes a raw path (append_data refuses `..`, which is what we want to test).
    fn add_raw(
        b: &mut tar::Builder<Vec<u8>>,
        path: &str,
        kind: tar::EntryType,
        link: Option<&str>,
    ) {
        let mut h = header(kind, 0o644, 0);
        h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(l) = link {
            h.as_gnu_mut().unwrap().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
    }

    #[test]
    fn unpacks_files_links_modes_and_owners() {
        let tar = tarball(|b| {
            let mut d = header(tar::EntryType::Directory, 0o555, 0);
            b.append_data(&mut d, "ro/", std::io::empty()).unwrap();
            add_file(b, "ro/file", b"hello", 0o4755);
            add_file(b, "./usr/bin/tool", b"#!/bin/sh\n", 0o755);
            add_raw(
                b,
                "usr/bin/alias",
                tar::EntryType::Symlink,
                Some("/usr/bin/tool"),
            );
            add_raw(
                b,
                "usr/bin/hard",
                tar::EntryType::Link,
                Some("usr/bin/tool"),
            );
        });
        let dir = tempfile::tempdir().unwrap();
        let stats = unpack(&tar[..], dir.path(), Whiteouts::Overlay).unwrap();
        assert_eq!(stats.bytes, 15);
        let f = std::fs::metadata(dir.path().join("ro/file")).unwrap();
        assert_eq!(f.mode() & 0o7777, 0o4755, "set-uid kept after chown");
        assert_eq!((f.uid(), f.gid()), (1000, 1000));
        assert_eq!(f.mtime(), 1_600_000_000);
        assert_eq!(
            std::fs::metadata(dir.path().join("ro")).unwrap().mode() & 0o777,
            0o555
        );
        assert_eq!(
            std::fs::read_link(dir.path().join("usr/bin/alias")).unwrap(),
            Path::new("/usr/bin/tool")
        );
        let (a, b) = (
            std::fs::metadata(dir.path().join("usr/bin/tool")).unwrap(),
            std::fs::metadata(dir.path().join("usr/bin/hard")).unwrap(),
        );
        assert_eq!(a.ino(), b.ino());
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        let tar = tarball(|b| {
            add_file(b, "etc/.wh.gone", b"", 0o644);
            let mut d = header(tar::EntryType::Directory, 0o755, 0);
            b.append_data(&mut d, "opaque/", std::io::empty()).unwrap();
            add_file(b, "opaque/.wh..wh..opq", b"", 0o644);
            add_file(b, "opaque/kept", b"x", 0o644);
        });
        let dir = tempfile::tempdir().unwrap();
        let stats = unpack(&tar[..], dir.path(), Whiteouts::Overlay).unwrap();
        assert_eq!(stats.whiteouts, 2);
        let w = std::fs::symlink_metadata(dir.path().join("etc/gone")).unwrap();
        assert_eq!(w.mode() & libc_s_ifmt(), 0o020000, "a character device");
        assert_eq!(w.rdev(), 0);
        assert!(!dir.path().join("etc/.wh.gone").exists());
        let mut v = [0u8; 4];
        let n = rustix::fs::lgetxattr(dir.path().join("opaque"), "trusted.overlay.opaque", &mut v)
            .unwrap();
        assert_eq!(&v[..n], b"y");
        assert!(dir.path().join("opaque/kept").exists());
        // A plain archive keeps them as files.
        let plain = tempfile::tempdir().unwrap();
        unpack(&tar[..], plain.path(), Whiteouts::Plain).unwrap();
        assert!(plain.path().join("etc/.wh.gone").is_file());
    }

    fn libc_s_ifmt() -> u32 {
        0o170000
    }

    #[test]
    fn nothing_escapes_the_layer() {
        let outside = tempfile::tempdir().unwrap();
        // `..` in a path.
        let tar = tarball(|b| add_raw(b, "../escape", tar::EntryType::Regular, None));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            unpack(&tar[..], dir.path(), Whiteouts::Overlay),
            Err(ImageError::UnsafePath { .. })
        ));
        // A symlink to outside, then a file through it.
        let link = outside.path().display().to_string();
        let tar = tarball(|b| {
            add_raw(b, "evil", tar::EntryType::Symlink, Some(&link));
            add_file(b, "evil/planted", b"x", 0o644);
        });
        let dir = tempfile::tempdir().unwrap();
        assert!(unpack(&tar[..], dir.path(), Whiteouts::Overlay).is_err());
        assert!(!outside.path().join("planted").exists());
        // A relative symlink climbing out, then a whiteout through it.
        let tar = tarball(|b| {
            add_raw(b, "up", tar::EntryType::Symlink, Some("../../../../.."));
            add_file(b, "up/tmp/.wh.x", b"", 0o644);
        });
        let dir = tempfile::tempdir().unwrap();
        assert!(unpack(&tar[..], dir.path(), Whiteouts::Overlay).is_err());
        // A hard link to a file outside.
        let secret = outside.path().join("secret");
        std::fs::write(&secret, "s").unwrap();
        let tar = tarball(|b| {
            add_raw(
                b,
                "h",
                tar::EntryType::Link,
                Some(&format!("../{}", secret.display())),
            )
        });
        let dir = tempfile::tempdir().unwrap();
        assert!(unpack(&tar[..], dir.path(), Whiteouts::Overlay).is_err());
        let tar = tarball(|b| {
            add_raw(b, "evil", tar::EntryType::Symlink, Some(&link));
            add_raw(b, "h", tar::EntryType::Link, Some("evil/secret"));
        });
        let dir = tempfile::tempdir().unwrap();
        assert!(unpack(&tar[..], dir.path(), Whiteouts::Overlay).is_err());
        assert!(!dir.path().join("h").exists());
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let tar = tarball(|b| {
            add_file(b, "a", b"one", 0o644);
            add_raw(b, "a", tar::EntryType::Symlink, Some("b"));
        });
        let dir = tempfile::tempdir().unwrap();
        unpack(&tar[..], dir.path(), Whiteouts::Overlay).unwrap();
        assert_eq!(
            std::fs::read_link(dir.path().join("a")).unwrap(),
            Path::new("b")
        );
    }

    #[test]
    fn a_directory_replaced_by_a_symlink_gets_no_mode_through_it() {
        // Hole 2 of #12: `x/` with mode 4777, then `x` -> a host file; the directory mode
        // applied at the end must not land on the host file.
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "host").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        let tar = tarball(|b| {
            let mut d = header(tar::EntryType::Directory, 0o4777, 0);
            b.append_data(&mut d, "x/", std::io::empty()).unwrap();
            add_raw(
                b,
                "x",
                tar::EntryType::Symlink,
                Some(&victim.display().to_string()),
            );
        });
        let dir = tempfile::tempdir().unwrap();
        unpack(&tar[..], dir.path(), Whiteouts::Plain).unwrap();
        assert_eq!(std::fs::metadata(&victim).unwrap().mode() & 0o7777, 0o644);
        assert!(dir.path().join("x").is_symlink());
    }

    #[test]
    fn every_kind_replaces_every_kind() {
        let tar = tarball(|b| {
            let mut d = header(tar::EntryType::Directory, 0o755, 0);
            b.append_data(&mut d, "a/", std::io::empty()).unwrap();
            add_file(b, "a/inner", b"x", 0o644);
            add_file(b, "a", b"file now", 0o600);
            add_raw(b, "b", tar::EntryType::Symlink, Some("/etc"));
            let mut d = header(tar::EntryType::Directory, 0o700, 0);
            b.append_data(&mut d, "b/", std::io::empty()).unwrap();
            add_file(b, "b/inside", b"y", 0o644);
            add_file(b, "c", b"z", 0o644);
            add_raw(b, "c", tar::EntryType::Char, None);
        });
        let dir = tempfile::tempdir().unwrap();
        unpack(&tar[..], dir.path(), Whiteouts::Plain).unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"file now");
        let b = std::fs::symlink_metadata(dir.path().join("b")).unwrap();
        assert!(b.is_dir() && b.mode() & 0o777 == 0o700);
        assert!(dir.path().join("b/inside").is_file());
        assert!(
            !dir.path().join("c").exists(),
            "a device node replaces and is skipped"
        );
    }

    #[test]
    fn hard_links_name_only_regular_files_of_the_layer() {
        let tar = tarball(|b| {
            add_raw(b, "l", tar::EntryType::Symlink, Some("/etc/passwd"));
            add_raw(b, "h", tar::EntryType::Link, Some("l"));
        });
        let dir = tempfile::tempdir().unwrap();
        assert!(unpack(&tar[..], dir.path(), Whiteouts::Plain).is_err());
        assert!(!dir.path().join("h").exists());
    }

    #[test]
    fn limits_end_the_unpack_naming_the_limit() {
        let small = UnpackLimits {
            max_bytes: 1000,
            max_entries: 5,
            max_depth: 3,
        };
        let run = |tar: Vec<u8>| {
            let dir = tempfile::tempdir().unwrap();
            let root = TreeDir::open(dir.path()).unwrap();
            unpack_into(&tar[..], &root, Whiteouts::Plain, &small)
        };
        let many = tarball(|b| (0..6).for_each(|i| add_file(b, &format!("f{i}"), b"", 0o644)));
        assert!(
            matches!(run(many), Err(ImageError::ArchiveTooLarge { limit }) if limit == "5 entries")
        );
        let deep = tarball(|b| add_file(b, "a/b/c/d", b"", 0o644));
        assert!(
            matches!(run(deep), Err(ImageError::ArchiveTooLarge { limit }) if limit.contains("depth"))
        );
        let big = tarball(|b| {
            add_file(b, "a", &[0u8; 600], 0o644);
            add_file(b, "b", &[0u8; 600], 0o644);
        });
        assert!(
            matches!(run(big), Err(ImageError::ArchiveTooLarge { limit }) if limit.contains("bytes"))
        );
        // A gzip bomb: 64 MiB of zeros in about 64 KiB, stopped at the byte limit.
        let bomb = tarball(|b| add_file(b, "zeros", &vec![0u8; 64 << 20], 0o644));
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut e, &bomb).unwrap();
        let gz = e.finish().unwrap();
        assert!(gz.len() < 1 << 20);
        let dir = tempfile::tempdir().unwrap();
        let root = TreeDir::open(dir.path()).unwrap();
        let limits = UnpackLimits {
            max_bytes: 1 << 20,
            ..UnpackLimits::default()
        };
        let r = unpack_into(
            flate2::read::GzDecoder::new(&gz[..]),
            &root,
            Whiteouts::Plain,
            &limits,
        );
        assert!(matches!(r, Err(ImageError::ArchiveTooLarge { .. })));
    }

    /// One archive entry of the property test: names collide on purpose; symlinks point at
    /// the canary (absolute and climbing).
    #[derive(Debug, Clone)]
    enum E {
        Dir(&'static str, u32),
        File(&'static str, u32),
        Symlink(&'static str, &'static str),
        Hard(&'static str, &'static str),
        Whiteout(&'static str),
    }

    fn name() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just("x"),
            Just("y"),
            Just("x/y"),
            Just("x/y/z"),
            Just("y/x"),
            Just("x/.wh..wh..opq")
        ]
    }

    fn entry() -> impl Strategy<Value = E> {
        let mode = prop_oneof![
            Just(0o4777u32),
            Just(0o2755),
            Just(0o777),
            Just(0o000),
            Just(0o644)
        ];
        let target = prop_oneof![
            Just("CANARY"),
            Just("CANARY/file"),
            Just("../../canary"),
            Just("../canary/file"),
            Just("x")
        ];
        prop_oneof![
            (name(), mode.clone()).prop_map(|(n, m)| E::Dir(n, m)),
            (name(), mode).prop_map(|(n, m)| E::File(n, m)),
            (name(), target).prop_map(|(n, t)| E::Symlink(n, t)),
            (name(), name()).prop_map(|(n, t)| E::Hard(n, t)),
            name().prop_map(E::Whiteout),
        ]
    }

    fn canary_state(dir: &Path) -> Vec<(String, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        for p in [dir.to_path_buf(), dir.join("file")] {
            let m = std::fs::symlink_metadata(&p).unwrap();
            let body = if m.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            out.push((p.display().to_string(), m.mode(), m.uid(), body));
        }
        out.push((
            "entries".into(),
            std::fs::read_dir(dir).unwrap().count() as u32,
            0,
            Vec::new(),
        ));
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Random entry sequences (dirs, files, symlinks, hard links, whiteouts; same names,
        /// set-id modes) never create, modify, chmod or delete anything outside the layer.
        #[test]
        fn archives_never_touch_anything_outside(entries in proptest::collection::vec(entry(), 1..16), overlay in any::<bool>()) {
            let top = tempfile::tempdir().unwrap();
            let canary = top.path().join("canary");
            std::fs::create_dir(&canary).unwrap();
            std::fs::write(canary.join("file"), "canary").unwrap();
            let layer = top.path().join("layer");
            std::fs::create_dir(&layer).unwrap();
            let before = canary_state(&canary);
            let abs = canary.display().to_string();
            let tar = tarball(|b| {
                for e in &entries {
                    match e {
                        E::Dir(n, m) => {
                            let mut h = header(tar::EntryType::Directory, *m, 0);
                            b.append_data(&mut h, format!("{n}/"), std::io::empty()).unwrap();
                        }
                        E::File(n, m) => add_file(b, n, b"data", *m),
                        E::Symlink(n, t) => {
                            let t = t.replace("CANARY", &abs);
                            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                            b.append_link(&mut h, n, &t).unwrap();
                        }
                        E::Hard(n, t) => add_raw(b, n, tar::EntryType::Link, Some(t)),
                        E::Whiteout(n) => {
                            let p = Path::new(n);
                            let w = match p.parent().filter(|p| !p.as_os_str().is_empty()) {
                                Some(d) => format!("{}/.wh.{}", d.display(), p.file_name().unwrap().to_string_lossy()),
                                None => format!(".wh.{n}"),
                            };
                            add_file(b, &w, b"", 0o644);
                        }
                    }
                }
            });
            let mode = if overlay { Whiteouts::Overlay } else { Whiteouts::Plain };
            let _ = unpack(&tar[..], &layer, mode);
            prop_assert_eq!(canary_state(&canary), before);
            prop_assert_eq!(std::fs::read_dir(top.path()).unwrap().count(), 2);
        }
    }

    #[test]
    fn reads_gzip_and_zstd() {
        let tar = tarball(|b| add_file(b, "f", b"data", 0o644));
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("l.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, &tar).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        let zst = dir.path().join("l.zst");
        std::fs::write(&zst, zstd::encode_all(&tar[..], 1).unwrap()).unwrap();
        for blob in [gz, zst] {
            let out = tempfile::tempdir().unwrap();
            unpack(open_blob(&blob).unwrap(), out.path(), Whiteouts::Overlay).unwrap();
            assert_eq!(std::fs::read(out.path().join("f")).unwrap(), b"data");
        }
    }
}
