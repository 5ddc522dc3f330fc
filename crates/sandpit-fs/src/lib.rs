//! Handle-relative access to file trees a tenant controls: build contexts, layers under
//! assembly, unpacked archives, exported writable layers.
//!
//! The host never walks such a tree by path. A [`TreeDir`] is an open directory; every
//! operation names a child relative to it, and every multi-component path is opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, so neither `..`,
//! an absolute path, nor a symlink in any component (planted by the tenant, or swapped in
//! while we work) can take an operation outside the tree. Modes, owners and times are applied
//! through handles or with `AT_SYMLINK_NOFOLLOW`, never through a name that could be a link.
//! An entry that is replaced (a later archive entry of the same name, a `COPY` over a
//! symlink) is unlinked first, never written through. Reads that land in server memory are
//! capped ([`TreeDir::read_capped`]) and refuse anything that is not a regular file (a FIFO
//! would block, `/dev/zero` never ends).
//!
//! The guarantee is tested with property tests that throw random sequences of operations
//! with hostile names and symlinks at a tree next to a canary directory.
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        reason = "unit tests build host-side fixtures by path"
    )
)]

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// What went wrong, with the path inside the tree it concerned (the tenant's own path,
/// never a host path beyond the tree).
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: a symlink or a path leaving the tree (symlinks are not followed)")]
    Escape { path: String },
    #[error("{path} is not a regular file")]
    NotRegular { path: String },
    #[error("{path} is larger than {limit} bytes")]
    TooLarge { path: String, limit: u64 },
    #[error("{path:?} is not a plain relative path")]
    BadPath { path: String },
    #[error("{path} is in the way and is not a directory")]
    NotADirectory { path: String },
}

impl FsError {
    /// Whether the named entry (or one of its parents) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FsError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// The kind of an entry, as `lstat` sees it (symlinks are never followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// FIFOs, sockets, device nodes.
    Other,
}

/// An entry's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits with set-id and sticky bits (`& 0o7777`).
    pub mode: u32,
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    /// The raw `st_mode` (kind bits included), e.g. to tell a whiteout (a 0/0 char device).
    pub raw_mode: u32,
    pub rdev: u64,
}

impl Meta {
    fn of(st: &rustix::fs::Stat) -> Meta {
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => Kind::Dir,
            FileType::RegularFile => Kind::File,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        };
        Meta {
            kind,
            mode: st.st_mode & 0o7777,
            size: st.st_size as u64,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: st.st_mtime,
            raw_mode: st.st_mode,
            rdev: st.st_rdev,
        }
    }
}

/// What [`TreeDir::make_dirs`] does with a non-directory in the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InTheWay {
    /// Unlink it and make a directory (later entries replace earlier ones).
    Replace,
    /// Fail with [`FsError::NotADirectory`] (or [`FsError::Escape`] for a symlink).
    Refuse,
}

/// An open directory of a tenant-controlled tree. Children are reached only relative to it.
#[derive(Debug)]
pub struct TreeDir {
    fd: OwnedFd,
    /// Where this handle sits inside its tree (for messages only; never opened).
    at: PathBuf,
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

/// A relative path made of plain components only (no `..`, `.`, root or empty path).
pub fn check_rel(rel: &Path) -> Result<(), FsError> {
    let bad = || FsError::BadPath {
        path: rel.display().to_string(),
    };
    if rel.as_os_str().is_empty() {
        return Ok(());
    }
    for c in rel.components() {
        match c {
            Component::Normal(n) if !n.as_bytes().contains(&0) => {}
            _ => return Err(bad()),
        }
    }
    Ok(())
}

/// A single plain name (no `/`, not `.` or `..`, not empty).
pub fn check_name(name: &OsStr) -> Result<(), FsError> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(FsError::BadPath {
            path: name.to_string_lossy().into_owned(),
        });
    }
    Ok(())
}

impl TreeDir {
    /// Open the root of a tree at a host-owned path (the caller made or chose it; nothing
    /// of the tenant's is in it). The last component must not be a symlink.
    pub fn open(path: &Path) -> Result<TreeDir, FsError> {
        let fd = rustix::fs::open(path, DIR_FLAGS, Mode::empty()).map_err(|e| FsError::Io {
            what: "opening",
            path: path.display().to_string(),
            source: e.into(),
        })?;
        Ok(TreeDir {
            fd,
            at: PathBuf::new(),
        })
    }

    /// Create the host-owned directory `path` (and its parents) if missing, then open it.
    pub fn create(path: &Path) -> Result<TreeDir, FsError> {
        #[expect(
            clippy::disallowed_methods,
            reason = "the root of a new tree is a host-owned path the caller chose"
        )]
        std::fs::create_dir_all(path).map_err(|source| FsError::Io {
            what: "creating",
            path: path.display().to_string(),
            source,
        })?;
        TreeDir::open(path)
    }

    /// Where this handle sits inside its tree (for messages).
    pub fn path(&self) -> &Path {
        &self.at
    }

    fn show(&self, rel: impl AsRef<Path>) -> String {
        let p = self.at.join(rel);
        if p.as_os_str().is_empty() {
            ".".into()
        } else {
            p.display().to_string()
        }
    }

    fn io(&self, what: &'static str, rel: impl AsRef<Path>, e: impl Into<io::Error>) -> FsError {
        let source: io::Error = e.into();
        let path = self.show(rel);
        // ELOOP: a symlink on the way; EXDEV: a path leaving the tree.
        let escape =
            [rustix::io::Errno::LOOP, rustix::io::Errno::XDEV].map(|e| Some(e.raw_os_error()));
        if escape.contains(&source.raw_os_error()) {
            FsError::Escape { path }
        } else {
            FsError::Io { what, path, source }
        }
    }

    /// Open the directory `rel` beneath this one (no symlink in any component).
    pub fn open_dir(&self, rel: &Path) -> Result<TreeDir, FsError> {
        check_rel(rel)?;
        let target: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let fd = match rustix::fs::openat2(&self.fd, target, DIR_FLAGS, Mode::empty(), beneath()) {
            Ok(fd) => fd,
            // O_DIRECTORY | O_NOFOLLOW on a symlink says ENOTDIR: name it for what it is.
            Err(rustix::io::Errno::NOTDIR)
                if self.lstat(rel).ok().flatten().map(|m| m.kind) == Some(Kind::Symlink) =>
            {
                return Err(FsError::Escape {
                    path: self.show(rel),
                });
            }
            Err(e) => return Err(self.io("opening", rel, e)),
        };
        Ok(TreeDir {
            fd,
            at: self.at.join(rel),
        })
    }

    /// The parent directory of `rel` (opened beneath this one) and `rel`'s last name.
    fn split<'a>(&self, rel: &'a Path) -> Result<(TreeDir, &'a OsStr), FsError> {
        check_rel(rel)?;
        let name = rel.file_name().ok_or_else(|| FsError::BadPath {
            path: rel.display().to_string(),
        })?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        Ok((self.open_dir(parent)?, name))
    }

    /// `lstat` of the entry `rel` beneath this directory; `None` when it does not exist.
    pub fn lstat(&self, rel: &Path) -> Result<Option<Meta>, FsError> {
        if rel.as_os_str().is_empty() {
            return self.meta().map(Some);
        }
        let (dir, name) = match self.split(rel) {
            Ok(x) => x,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        dir.stat_name(name)
    }

    /// `lstat` of the child `name`; `None` when it does not exist.
    pub fn stat_name(&self, name: &OsStr) -> Result<Option<Meta>, FsError> {
        check_name(name)?;
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Meta::of(&st))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(self.io("inspecting", name, e)),
        }
    }

    /// This directory's own metadata.
    pub fn meta(&self) -> Result<Meta, FsError> {
        rustix::fs::fstat(&self.fd)
            .map(|st| Meta::of(&st))
            .map_err(|e| self.io("inspecting", "", e))
    }

    /// The children's names with their kinds, sorted by name.
    pub fn entries(&self) -> Result<Vec<(OsString, Meta)>, FsError> {
        let dir = rustix::fs::Dir::read_from(&self.fd).map_err(|e| self.io("listing", "", e))?;
        let mut out = Vec::new();
        for entry in dir {
            let entry = entry.map_err(|e| self.io("listing", "", e))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = OsStr::from_bytes(name).to_os_string();
            // d_type can be unknown on some file systems: ask lstat.
            if let Some(meta) = self.stat_name(&name)? {
                out.push((name, meta));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Open the regular file `rel` for reading. Symlinks, FIFOs, devices and sockets are
    /// refused (a FIFO is opened non-blocking, so refusing it never waits).
    pub fn open_file(&self, rel: &Path) -> Result<File, FsError> {
        check_rel(rel)?;
        let fd = rustix::fs::openat2(
            &self.fd,
            rel,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
            beneath(),
        )
        .map_err(|e| self.io("opening", rel, e))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| self.io("inspecting", rel, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(FsError::NotRegular {
                path: self.show(rel),
            });
        }
        rustix::fs::fcntl_setfl(&fd, OFlags::RDONLY).map_err(|e| self.io("opening", rel, e))?;
        Ok(File::from(fd))
    }

    /// Read the regular file `rel` whole, refusing it when it is over `cap` bytes.
    pub fn read_capped(&self, rel: &Path, cap: u64) -> Result<Vec<u8>, FsError> {
        let f = self.open_file(rel)?;
        let too_large = || FsError::TooLarge {
            path: self.show(rel),
            limit: cap,
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len > cap {
            return Err(too_large());
        }
        let mut out = Vec::with_capacity(len as usize);
        f.take(cap + 1)
            .read_to_end(&mut out)
            .map_err(|e| self.io("reading", rel, e))?;
        if out.len() as u64 > cap {
            return Err(too_large());
        }
        Ok(out)
    }

    /// The target of the symlink `rel` (not followed).
    pub fn read_link(&self, rel: &Path) -> Result<OsString, FsError> {
        let (dir, name) = self.split(rel)?;
        rustix::fs::readlinkat(&dir.fd, name, Vec::new())
            .map(|c| OsStr::from_bytes(c.as_bytes()).to_os_string())
            .map_err(|e| self.io("reading the link", rel, e))
    }

    /// The child directory `name`, made if missing. A non-directory in the way is replaced
    /// or refused as `in_the_way` says. The new directory gets `mode` (an existing one keeps
    /// its own).
    pub fn make_dir(
        &self,
        name: &OsStr,
        mode: u32,
        in_the_way: InTheWay,
    ) -> Result<TreeDir, FsError> {
        check_name(name)?;
        match self.stat_name(name)? {
            Some(m) if m.kind == Kind::Dir => {}
            Some(m) => match in_the_way {
                InTheWay::Replace => {
                    self.remove(name)?;
                    self.mkdir(name, mode)?;
                }
                InTheWay::Refuse if m.kind == Kind::Symlink => {
                    return Err(FsError::Escape {
                        path: self.show(name),
                    });
                }
                InTheWay::Refuse => {
                    return Err(FsError::NotADirectory {
                        path: self.show(name),
                    });
                }
            },
            None => self.mkdir(name, mode)?,
        }
        let fd = rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty())
            .map_err(|e| self.io("opening", name, e))?;
        Ok(TreeDir {
            fd,
            at: self.at.join(name),
        })
    }

    fn mkdir(&self, name: &OsStr, mode: u32) -> Result<(), FsError> {
        rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode))
            .map_err(|e| self.io("creating the directory", name, e))
    }

    /// [`TreeDir::make_dir`] for every component of `rel`; returns the last one.
    pub fn make_dirs(
        &self,
        rel: &Path,
        mode: u32,
        in_the_way: InTheWay,
    ) -> Result<TreeDir, FsError> {
        check_rel(rel)?;
        let mut dir = self.open_dir(Path::new(""))?;
        for c in rel.components() {
            dir = dir.make_dir(c.as_os_str(), mode, in_the_way)?;
        }
        Ok(dir)
    }

    /// Remove the child `name` whatever it is, a directory with everything in it (through
    /// handles, so a symlink inside is unlinked, never followed). Missing is fine.
    pub fn remove(&self, name: &OsStr) -> Result<(), FsError> {
        check_name(name)?;
        match self.stat_name(name)? {
            None => Ok(()),
            Some(m) if m.kind == Kind::Dir => {
                let child = rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty())
                    .map_err(|e| self.io("opening", name, e))?;
                TreeDir {
                    fd: child,
                    at: self.at.join(name),
                }
                .clear()?;
                rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR)
                    .map_err(|e| self.io("removing", name, e))
            }
            Some(_) => rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())
                .map_err(|e| self.io("removing", name, e)),
        }
    }

    /// Remove everything inside this directory.
    pub fn clear(&self) -> Result<(), FsError> {
        for (name, _) in self.entries()? {
            self.remove(&name)?;
        }
        Ok(())
    }

    /// Remove the child directory `name` if it is an empty directory; anything else stays.
    pub fn remove_empty_dir(&self, name: &OsStr) -> bool {
        check_name(name).is_ok() && rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR).is_ok()
    }

    /// Unlink the child `name` if it is a regular file; anything else stays.
    pub fn remove_file(&self, name: &OsStr) -> Result<bool, FsError> {
        match self.stat_name(name)? {
            Some(m) if m.kind == Kind::File => {
                rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())
                    .map(|()| true)
                    .map_err(|e| self.io("removing", name, e))
            }
            _ => Ok(false),
        }
    }

    /// Create the regular file `name` (replacing whatever was there) for writing, mode 0600
    /// until the caller sets its own through the handle.
    pub fn create_file(&self, name: &OsStr) -> Result<File, FsError> {
        self.remove(name)?;
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| self.io("creating", name, e))?;
        Ok(File::from(fd))
    }

    /// Create the symlink `name` → `target` (replacing whatever was there). The target is
    /// stored as text and never resolved here.
    pub fn symlink(&self, target: &OsStr, name: &OsStr) -> Result<(), FsError> {
        self.remove(name)?;
        rustix::fs::symlinkat(target, &self.fd, name)
            .map_err(|e| self.io("creating the symlink", name, e))
    }

    /// Hard-link the regular file `src_name` of `src` as `name` here (replacing whatever was
    /// there). Anything but a regular file is refused as a source.
    pub fn hard_link(&self, src: &TreeDir, src_name: &OsStr, name: &OsStr) -> Result<(), FsError> {
        match src.stat_name(src_name)? {
            Some(m) if m.kind == Kind::File => {}
            _ => {
                return Err(FsError::NotRegular {
                    path: src.show(src_name),
                });
            }
        }
        self.remove(name)?;
        rustix::fs::linkat(&src.fd, src_name, &self.fd, name, AtFlags::empty())
            .map_err(|e| self.io("hard-linking", name, e))
    }

    /// Create the special file `name` (replacing whatever was there): a FIFO, or an
    /// overlayfs whiteout (a 0/0 character device).
    pub fn mknod(&self, name: &OsStr, node: Node) -> Result<(), FsError> {
        self.remove(name)?;
        let (kind, mode, dev) = match node {
            Node::Fifo { mode } => (FileType::Fifo, mode, 0),
            Node::Whiteout => (FileType::CharacterDevice, 0, rustix::fs::makedev(0, 0)),
        };
        rustix::fs::mknodat(&self.fd, name, kind, Mode::from_raw_mode(mode), dev)
            .map_err(|e| self.io("creating", name, e))
    }

    /// Set the owner of the child `name` (a symlink itself, not what it names).
    pub fn chown(&self, name: &OsStr, uid: u32, gid: u32) -> Result<(), FsError> {
        check_name(name)?;
        rustix::fs::chownat(
            &self.fd,
            name,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io("setting the owner of", name, e))
    }

    /// Set the modification (and access) time of the child `name`, not following a symlink.
    /// Best effort: a file system that refuses leaves the time as it is.
    pub fn set_time(&self, name: &OsStr, secs: i64) {
        if check_name(name).is_err() {
            return;
        }
        let _ = rustix::fs::utimensat(&self.fd, name, &times(secs), AtFlags::SYMLINK_NOFOLLOW);
    }

    /// Set this directory's owner, mode (set-id bits included) and time through its handle,
    /// in that order (a chown clears set-id bits).
    pub fn set_attrs(
        &self,
        owner: Option<(u32, u32)>,
        mode: u32,
        mtime: Option<i64>,
    ) -> Result<(), FsError> {
        set_attrs(&self.fd, owner, mode, mtime)
            .map_err(|e| self.io("setting the attributes of", "", e))
    }

    /// Set the extended attribute `key` on this directory through its handle.
    pub fn set_xattr(&self, key: &str, value: &[u8]) -> Result<(), FsError> {
        rustix::fs::fsetxattr(&self.fd, key, value, rustix::fs::XattrFlags::empty())
            .map_err(|e| self.io("setting an attribute on", "", e))
    }
}

/// Remove the tree at the host-owned path `path` (its parent is the host's; what is inside
/// may be a tenant's) through handles: symlinks inside are unlinked, never followed.
/// Missing is fine.
pub fn remove_tree(path: &Path) -> Result<(), FsError> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(FsError::BadPath {
            path: path.display().to_string(),
        });
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    match TreeDir::open(parent) {
        Ok(dir) => dir.remove(name),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

impl AsFd for TreeDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A special file [`TreeDir::mknod`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Fifo { mode: u32 },
    Whiteout,
}

/// Owner, mode and time of an open file or directory, through its handle: chown first
/// (it clears set-id bits), then the mode, then the time.
pub fn set_attrs(
    fd: impl AsFd,
    owner: Option<(u32, u32)>,
    mode: u32,
    mtime: Option<i64>,
) -> io::Result<()> {
    if let Some((u, g)) = owner {
        rustix::fs::fchown(
            &fd,
            Some(rustix::fs::Uid::from_raw(u)),
            Some(rustix::fs::Gid::from_raw(g)),
        )?;
    }
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode & 0o7777))?;
    if let Some(t) = mtime {
        let _ = rustix::fs::futimens(&fd, &times(t));
    }
    Ok(())
}

fn times(secs: i64) -> rustix::fs::Timestamps {
    let t = rustix::fs::Timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    rustix::fs::Timestamps {
        last_access: t,
        last_modification: t,
    }
}

#[cfg(test)]
mod tests;
