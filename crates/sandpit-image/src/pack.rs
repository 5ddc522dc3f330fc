//! Packing a stored layer (a directory in overlayfs format) into one tar archive that
//! [`crate::unpack::unpack_into`] turns back into the same tree, so a layer can travel
//! through object storage to a node that lacks it.
//!
//! A layer is a tenant's tree (a `RUN` step's writable layer, or an image's): it is walked
//! through `sandpit-fs` handles only. Every directory is opened beneath its parent's handle
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, every file with `O_NOFOLLOW` and
//! checked to be regular after it is open, a symlink is read as text and never followed.
//!
//! The archive is what the unpacker takes, in OCI form: overlayfs whiteouts (0/0 character
//! devices) become `.wh.<name>` entries, an opaque directory (`trusted.overlay.opaque=y`)
//! gets a `.wh..wh..opq` entry; files that share an inode become hard links to the first
//! one's path. Kept: kinds, permission bits with set-id and sticky bits, owners,
//! modification times (whole seconds, from 1970 on), symlink targets byte for byte (long
//! ones as GNU long-link entries), FIFOs. Refused, so a layer that would not come back the
//! same is never stored: names that are not UTF-8 (the unpacker refuses them) or begin with
//! `.wh.` (they would come back as whiteouts), device nodes other than whiteouts, sockets.
//! The same [`UnpackLimits`] as an unpack bound entries, bytes and depth. The layer's root
//! directory's own attributes are not carried (an unpacked layer's root is the store's, as
//! for a pulled layer).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;

use sandpit_fs::{Kind, Meta, TreeDir};

use crate::ImageError;
use crate::unpack::UnpackLimits;

/// The xattr that marks an overlayfs opaque directory.
const OPAQUE: &str = "trusted.overlay.opaque";

/// Totals of one pack.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PackStats {
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
    pub whiteouts: u64,
    pub hard_links: u64,
}

/// Write the layer whose root is the open directory `root` to `out` as a tar archive,
/// within `limits` (over one: [`ImageError::ArchiveTooLarge`]).
pub fn pack_layer(
    root: &TreeDir,
    out: impl Write,
    limits: &UnpackLimits,
) -> Result<PackStats, ImageError> {
    let mut p = Packer {
        tar: tar::Builder::new(out),
        limits: *limits,
        stats: PackStats::default(),
        inodes: HashMap::new(),
        layer: root.path().display().to_string(),
    };
    p.dir(root, &[], 0)?;
    p.tar
        .into_inner()
        .and_then(|mut w| w.flush())
        .map_err(|e| p_err(&p.layer, format!("writing the archive: {e}")))?;
    Ok(p.stats)
}

fn p_err(layer: &str, detail: String) -> ImageError {
    ImageError::Pack {
        layer: layer.to_string(),
        detail,
    }
}

struct Packer<W: Write> {
    tar: tar::Builder<W>,
    limits: UnpackLimits,
    stats: PackStats,
    /// Files seen with more than one link, by (device, inode): the archive path of the
    /// first, which later ones link to.
    inodes: HashMap<(u64, u64), Vec<u8>>,
    layer: String,
}

impl<W: Write> Packer<W> {
    fn err(&self, detail: String) -> ImageError {
        p_err(&self.layer, detail)
    }

    fn tree(&self, what: &str) -> impl FnOnce(sandpit_fs::FsError) -> ImageError {
        let what = what.to_string();
        move |e| match e {
            sandpit_fs::FsError::Escape { path } => ImageError::UnsafePath { path },
            e => ImageError::Tree { what, source: e },
        }
    }

    /// Count one entry against the limits.
    fn count(&mut self) -> Result<(), ImageError> {
        self.stats.entries += 1;
        if self.stats.entries > self.limits.max_entries {
            return Err(ImageError::ArchiveTooLarge {
                limit: format!("{} entries", self.limits.max_entries),
            });
        }
        Ok(())
    }

    /// The directory `dir` at archive path `at` (components), `depth` components deep:
    /// its opaque marker, then each child in name order.
    fn dir(&mut self, dir: &TreeDir, at: &[u8], depth: usize) -> Result<(), ImageError> {
        if is_opaque(dir) {
            self.count()?;
            self.stats.whiteouts += 1;
            let mut h = header(tar::EntryType::Regular, 0o644, 0, None);
            self.append(&mut h, &join(at, b".wh..wh..opq"), std::io::empty())?;
        }
        let entries = dir.entries().map_err(self.tree("listing a directory"))?;
        for (name, meta) in entries {
            let bytes = name.as_bytes();
            let path = join(at, bytes);
            let shown = String::from_utf8_lossy(&path).into_owned();
            if std::str::from_utf8(bytes).is_err() {
                return Err(self.err(format!("{shown}: the name is not UTF-8")));
            }
            if bytes.starts_with(b".wh.") {
                return Err(self.err(format!(
                    "{shown}: a name beginning with .wh. would come back as a whiteout"
                )));
            }
            if depth + 1 > self.limits.max_depth {
                return Err(ImageError::ArchiveTooLarge {
                    limit: format!("a path depth of {}", self.limits.max_depth),
                });
            }
            self.count()?;
            match meta.kind {
                Kind::Dir => {
                    let mut h = header(tar::EntryType::Directory, meta.mode, 0, Some(&meta));
                    let mut dir_path = path.clone();
                    dir_path.push(b'/');
                    self.append(&mut h, &dir_path, std::io::empty())?;
                    let child = dir
                        .open_dir(std::path::Path::new(&name))
                        .map_err(self.tree("opening a directory"))?;
                    self.dir(&child, &path, depth + 1)?;
                }
                Kind::File => self.file(dir, &name, &path, &meta)?,
                Kind::Symlink => {
                    let target = dir
                        .read_link(std::path::Path::new(&name))
                        .map_err(self.tree("reading a symlink"))?;
                    let mut h = header(tar::EntryType::Symlink, meta.mode, 0, Some(&meta));
                    self.link_name(&mut h, target.as_bytes())?;
                    self.append(&mut h, &path, std::io::empty())?;
                }
                Kind::Other if is_whiteout(&meta) => {
                    self.stats.whiteouts += 1;
                    let mut h = header(tar::EntryType::Regular, 0o644, 0, None);
                    self.append(
                        &mut h,
                        &join(at, &[b".wh.", bytes].concat()),
                        std::io::empty(),
                    )?;
                }
                Kind::Other if meta.raw_mode & 0o170000 == 0o010000 => {
                    let mut h = header(tar::EntryType::Fifo, meta.mode, 0, Some(&meta));
                    self.append(&mut h, &path, std::io::empty())?;
                }
                Kind::Other => {
                    return Err(self.err(format!(
                        "{shown}: a device node or socket (mode {:o}) cannot be stored",
                        meta.raw_mode
                    )));
                }
            }
        }
        Ok(())
    }

    /// A regular file: its content, or a hard link to the first path of its inode.
    fn file(
        &mut self,
        dir: &TreeDir,
        name: &OsStr,
        path: &[u8],
        meta: &Meta,
    ) -> Result<(), ImageError> {
        let file = dir
            .open_file(std::path::Path::new(name))
            .map_err(self.tree("opening a file"))?;
        let st = file
            .metadata()
            .map_err(|e| self.err(format!("inspecting a file: {e}")))?;
        if st.nlink() > 1 {
            if let Some(first) = self.inodes.get(&(st.dev(), st.ino())).cloned() {
                self.stats.hard_links += 1;
                let mut h = header(tar::EntryType::Link, meta.mode, 0, Some(meta));
                self.link_name(&mut h, &first)?;
                return self.append(&mut h, path, std::io::empty());
            }
            self.inodes.insert((st.dev(), st.ino()), path.to_vec());
        }
        // The size of the open file, which is what is read (the entry's lstat came first).
        let size = st.len();
        if self.stats.bytes.saturating_add(size) > self.limits.max_bytes {
            return Err(ImageError::ArchiveTooLarge {
                limit: format!("{} bytes unpacked", self.limits.max_bytes),
            });
        }
        self.stats.bytes += size;
        let mut h = header(tar::EntryType::Regular, meta.mode, size, Some(meta));
        let shown = String::from_utf8_lossy(path).into_owned();
        self.append(
            &mut h,
            path,
            Exact {
                inner: file,
                left: size,
                path: shown,
            },
        )
    }

    /// Set the header's link name to exactly `target` (no normalization), through a GNU
    /// long-link entry when it does not fit.
    fn link_name(&mut self, h: &mut tar::Header, target: &[u8]) -> Result<(), ImageError> {
        let slot = &mut h.as_old_mut().linkname;
        if target.len() <= slot.len() {
            slot.fill(0);
            slot[..target.len()].copy_from_slice(target);
            return Ok(());
        }
        let mut long = tar::Header::new_gnu();
        long.set_entry_type(tar::EntryType::GNULongLink);
        long.set_size(target.len() as u64 + 1);
        let name = b"././@LongLink";
        long.as_old_mut().name[..name.len()].copy_from_slice(name);
        long.set_cksum();
        self.tar
            .append(&long, target.chain(&[0u8][..]))
            .map_err(|e| self.err(format!("writing the archive: {e}")))
    }

    fn append(
        &mut self,
        h: &mut tar::Header,
        path: &[u8],
        data: impl Read,
    ) -> Result<(), ImageError> {
        self.tar
            .append_data(h, OsStr::from_bytes(path), data)
            .map_err(|e| {
                p_err(
                    &self.layer,
                    format!("writing {}: {e}", String::from_utf8_lossy(path)),
                )
            })
    }
}

/// `at/name` as archive path bytes.
fn join(at: &[u8], name: &[u8]) -> Vec<u8> {
    if at.is_empty() {
        return name.to_vec();
    }
    [at, b"/", name].concat()
}

/// A header of `kind` with `mode` and `size`, and the owner and time of `meta` (root's and
/// 0 without one).
fn header(kind: tar::EntryType, mode: u32, size: u64, meta: Option<&Meta>) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode & 0o7777);
    h.set_size(size);
    let (uid, gid, mtime) = meta.map_or((0, 0, 0), |m| (m.uid, m.gid, m.mtime));
    h.set_uid(u64::from(uid));
    h.set_gid(u64::from(gid));
    h.set_mtime(u64::try_from(mtime).unwrap_or(0));
    h
}

/// An overlayfs whiteout: a character device with device number 0/0.
fn is_whiteout(meta: &Meta) -> bool {
    meta.raw_mode & 0o170000 == 0o020000 && meta.rdev == 0
}

/// Whether the open directory carries `trusted.overlay.opaque=y`.
fn is_opaque(dir: &TreeDir) -> bool {
    let mut value = [0u8; 8];
    matches!(rustix::fs::fgetxattr(dir, OPAQUE, &mut value), Ok(1) if value[0] == b'y')
}

/// Exactly `left` bytes of a file: a file that shrank while it was read is an error, never
/// a short entry that would corrupt the rest of the archive; one that grew is cut at the
/// size its header gave.
struct Exact<R> {
    inner: R,
    left: u64,
    path: String,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{} shrank while it was packed", self.path),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
