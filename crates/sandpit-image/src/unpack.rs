//! Unpacking a layer tarball into a directory in overlayfs format.
//!
//! OCI whiteouts become overlayfs ones: `.wh.<name>` a 0/0 character device `<name>`, and
//! `.wh..wh..opq` the `trusted.overlay.opaque=y` attribute on its directory. Every entry's
//! parent is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from the layer's
//! root, so neither `..` nor a symlink planted by an earlier entry can make a later one land
//! outside; hard links must name a file of the same layer. Owners, modes and times are
//! kept; directory modes are applied last, so a read-only directory still gets its entries.

use std::fs::File;
use std::io::{BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

use crate::ImageError;

/// Totals of one unpack.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
}

/// Open a layer blob, undoing gzip or zstd compression (detected from its first bytes).
pub fn open_blob(path: &Path) -> Result<Box<dyn Read + Send>, ImageError> {
    let mut f = File::open(path).map_err(ImageError::files("opening a layer blob", path))?;
    let mut magic = [0u8; 4];
    let n = f
        .read(&mut magic)
        .map_err(ImageError::files("reading a layer blob", path))?;
    let f = File::open(path).map_err(ImageError::files("opening a layer blob", path))?;
    let r = BufReader::with_capacity(1 << 20, f);
    Ok(if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(r)
                .map_err(ImageError::files("reading a zstd layer", path))?,
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

/// Unpack the tar stream `reader` into the existing empty directory `dest`.
pub fn unpack(
    reader: impl Read,
    dest: &Path,
    whiteouts: Whiteouts,
) -> Result<UnpackStats, ImageError> {
    let layer = dest.display().to_string();
    let bad = |detail: String| ImageError::Unpack {
        layer: layer.clone(),
        detail,
    };
    let root = rustix::fs::open(
        dest,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ImageError::files("opening the layer directory", dest)(e.into()))?;
    let mut archive = tar::Archive::new(reader);
    let mut stats = UnpackStats::default();
    // Directory modes and times, applied at the end (deepest first).
    let mut dirs: Vec<(PathBuf, u32, u64)> = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("reading the archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("reading the archive: {e}")))?;
        stats.entries += 1;
        let raw = entry.path_bytes().into_owned();
        let Some(rel) = clean_path(&raw)? else {
            continue;
        }; // the root itself
        let name = rel
            .file_name()
            .expect("clean paths have a last component")
            .to_owned();
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        let parent = ensure_parent(&root, dest, &parent_rel)?;
        let target = dest.join(&rel);
        let header = entry.header().clone();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = (
            header.uid().unwrap_or(0) as u32,
            header.gid().unwrap_or(0) as u32,
        );
        let mtime = header.mtime().unwrap_or(0);
        let name_str = name.to_string_lossy();
        if whiteouts == Whiteouts::Overlay && name_str.starts_with(".wh.") {
            stats.whiteouts += 1;
            if name_str == ".wh..wh..opq" {
                rustix::fs::lsetxattr(
                    dest.join(&parent_rel),
                    "trusted.overlay.opaque",
                    b"y",
                    rustix::fs::XattrFlags::empty(),
                )
                .map_err(|e| {
                    ImageError::files("marking a directory opaque", dest.join(&parent_rel))(
                        e.into(),
                    )
                })?;
            } else {
                let hidden = &name_str[4..];
                if hidden.is_empty() || hidden == "." || hidden == ".." {
                    return Err(ImageError::UnsafePath {
                        path: String::from_utf8_lossy(&raw).into(),
                    });
                }
                remove_existing(&parent, hidden);
                rustix::fs::mknodat(
                    &parent,
                    hidden,
                    FileType::CharacterDevice,
                    Mode::empty(),
                    rustix::fs::makedev(0, 0),
                )
                .map_err(|e| {
                    ImageError::files("writing a whiteout", parent_rel.join(hidden))(e.into())
                })?;
            }
            continue;
        }
        let kind = header.entry_type();
        if !kind.is_dir() {
            remove_existing(&parent, &name_str);
        }
        match kind {
            tar::EntryType::Directory => {
                match std::fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_existing(&parent, &name_str);
                        mkdir(&parent, &name_str, &target)?;
                    }
                    Err(_) => mkdir(&parent, &name_str, &target)?,
                }
                chown(&parent, &name_str, uid, gid, &target)?;
                dirs.push((target, mode, mtime));
                continue;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let fd = rustix::fs::openat(
                    &parent,
                    &*name_str,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| ImageError::files("creating a file", &target)(e.into()))?;
                let mut file = File::from(fd);
                stats.bytes += std::io::copy(&mut entry, &mut file)
                    .map_err(ImageError::files("writing a file", &target))?;
                chown(&parent, &name_str, uid, gid, &target)?;
                // After chown, which clears set-id bits.
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(ImageError::files("setting a file's mode", &target))?;
                set_mtime(&parent, &name_str, mtime);
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad(format!("symlink {} has no target", rel.display())))?;
                rustix::fs::symlinkat(&*link, &parent, &*name_str)
                    .map_err(|e| ImageError::files("creating a symlink", &target)(e.into()))?;
                chown(&parent, &name_str, uid, gid, &target)?;
                set_mtime(&parent, &name_str, mtime);
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
                let src_parent =
                    ensure_existing_parent(&root, dest, src_rel.parent().unwrap_or(Path::new("")))?;
                let src_name = src_rel.file_name().expect("clean").to_owned();
                rustix::fs::linkat(
                    &src_parent,
                    &*src_name.to_string_lossy(),
                    &parent,
                    &*name_str,
                    AtFlags::empty(),
                )
                .map_err(|e| {
                    ImageError::files(
                        format!(
                            "hard-linking to {} (it must be in the same layer)",
                            src_rel.display()
                        ),
                        &target,
                    )(e.into())
                })?;
            }
            tar::EntryType::Fifo => {
                rustix::fs::mknodat(
                    &parent,
                    &*name_str,
                    FileType::Fifo,
                    Mode::from_raw_mode(mode),
                    0,
                )
                .map_err(|e| ImageError::files("creating a fifo", &target)(e.into()))?;
                chown(&parent, &name_str, uid, gid, &target)?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                // Device nodes are the runtime's business (gVisor provides /dev); a layer
                // carrying them gets nothing.
                tracing::debug!(path = %rel.display(), "skipping a device node");
            }
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => {}
            other => {
                tracing::debug!(path = %rel.display(), kind = ?other, "skipping an unknown entry type")
            }
        }
    }
    dirs.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.components().count()));
    for (path, mode, mtime) in dirs {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(ImageError::files("setting a directory's mode", &path))?;
        let _ = rustix::fs::utimensat(
            rustix::fs::CWD,
            &path,
            &times(mtime),
            AtFlags::SYMLINK_NOFOLLOW,
        );
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

/// Open `rel` (a directory path inside the layer) beneath `root`, creating missing
/// directories; refuses symlinks on the way.
fn ensure_parent(root: &OwnedFd, dest: &Path, rel: &Path) -> Result<OwnedFd, ImageError> {
    let mut dir = rustix::fs::openat(
        root,
        ".",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ImageError::files("opening the layer directory", dest)(e.into()))?;
    let mut so_far = PathBuf::new();
    for c in rel.components() {
        so_far.push(c);
        let name = c.as_os_str().to_string_lossy().into_owned();
        match open_beneath(&dir, &name) {
            Ok(fd) => dir = fd,
            Err(rustix::io::Errno::NOENT) => {
                rustix::fs::mkdirat(&dir, &*name, Mode::from_raw_mode(0o755)).map_err(|e| {
                    ImageError::files("creating a directory", dest.join(&so_far))(e.into())
                })?;
                dir = open_beneath(&dir, &name).map_err(|e| {
                    ImageError::files("opening a directory", dest.join(&so_far))(e.into())
                })?;
            }
            Err(_) => {
                return Err(ImageError::UnsafePath {
                    path: so_far.display().to_string(),
                });
            }
        }
    }
    Ok(dir)
}

/// Like [`ensure_parent`] but creates nothing (hard-link sources must exist).
fn ensure_existing_parent(root: &OwnedFd, dest: &Path, rel: &Path) -> Result<OwnedFd, ImageError> {
    if rel.as_os_str().is_empty() {
        return rustix::fs::openat(
            root,
            ".",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ImageError::files("opening the layer directory", dest)(e.into()));
    }
    open_beneath(root, &rel.to_string_lossy()).map_err(|_| ImageError::UnsafePath {
        path: rel.display().to_string(),
    })
}

fn open_beneath(dir: &impl AsFd, rel: &str) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat2(
        dir,
        rel,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
}

fn mkdir(parent: &OwnedFd, name: &str, target: &Path) -> Result<(), ImageError> {
    rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o755))
        .map_err(|e| ImageError::files("creating a directory", target)(e.into()))
}

/// Remove whatever `name` is in `parent` (an earlier entry of the same layer).
fn remove_existing(parent: &OwnedFd, name: &str) {
    let Ok(st) = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) else {
        return;
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        if let Ok(fd) = rustix::fs::openat(
            parent,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            let path = PathBuf::from(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&fd)
            ));
            if let Ok(real) = std::fs::read_link(&path) {
                let _ = std::fs::remove_dir_all(real);
            }
        }
    } else {
        let _ = rustix::fs::unlinkat(parent, name, AtFlags::empty());
    }
}

fn chown(
    parent: &OwnedFd,
    name: &str,
    uid: u32,
    gid: u32,
    target: &Path,
) -> Result<(), ImageError> {
    rustix::fs::chownat(
        parent,
        name,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| ImageError::files("setting an owner", target)(e.into()))
}

fn times(mtime: u64) -> rustix::fs::Timestamps {
    let t = rustix::fs::Timespec {
        tv_sec: mtime as i64,
        tv_nsec: 0,
    };
    rustix::fs::Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn set_mtime(parent: &OwnedFd, name: &str, mtime: u64) {
    let _ = rustix::fs::utimensat(parent, name, &times(mtime), AtFlags::SYMLINK_NOFOLLOW);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

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
