//! File operations: read, write (atomic, via a temporary file), list, stat, mkdir, remove.

use std::fs::{Metadata, Permissions};
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sandpit_agent_proto::{
    AgentError, AgentErrorCode, DATA_CHUNK, DirEntry, DirListing, EntryKind, FileInfo, FrameKind,
    ProtoError, WriteReply, normalize_path,
};
use tokio::fs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::conn::{Conn, agent_error};
use crate::users;

/// Default permission bits of a new file.
pub const DEFAULT_MODE: u32 = 0o644;

/// Map an I/O error on `path` to an [`AgentError`].
pub fn map_io(path: &str, e: &io::Error) -> AgentError {
    use io::ErrorKind as K;
    let code = match e.kind() {
        K::NotFound => AgentErrorCode::NotFound,
        K::PermissionDenied => AgentErrorCode::PermissionDenied,
        K::AlreadyExists => AgentErrorCode::AlreadyExists,
        K::NotADirectory => AgentErrorCode::NotDirectory,
        K::IsADirectory => AgentErrorCode::IsDirectory,
        K::DirectoryNotEmpty => AgentErrorCode::NotEmpty,
        K::StorageFull | K::QuotaExceeded => AgentErrorCode::NoSpace,
        _ => AgentErrorCode::Io,
    };
    agent_error(code, format!("{path}: {e}"))
}

/// The protocol's view of a file's metadata.
pub fn file_info(meta: &Metadata) -> FileInfo {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        EntryKind::File
    } else {
        EntryKind::Other
    };
    FileInfo {
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        mtime: meta.mtime(),
    }
}

fn is_directory(path: &str) -> AgentError {
    agent_error(
        AgentErrorCode::IsDirectory,
        format!("{path}: is a directory"),
    )
}

/// `ReadFile`: `Ok` + [`FileInfo`], `Data` chunks of at most [`DATA_CHUNK`], `End`.
pub async fn read_file(conn: &mut Conn, path: &str) -> Result<(), ProtoError> {
    let (path, mut file, info) = match open_for_read(path).await {
        Ok(x) => x,
        Err(e) => return conn.send_error(&e).await,
    };
    conn.send_json(FrameKind::Ok, &info).await?;
    let mut buf = vec![0u8; DATA_CHUNK];
    loop {
        match file.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => conn.send(FrameKind::Data, &buf[..n]).await?,
            Err(e) => return conn.send_error(&map_io(&path, &e)).await,
        }
    }
    conn.send(FrameKind::End, &[]).await
}

/// `ReadRegular` (version 2): like [`read_file`] for a regular file only, from byte `offset`,
/// at most `limit` bytes. The file is opened without blocking (a FIFO with no writer would
/// otherwise hold the connection forever) and checked through its handle, so a path swapped
/// for a FIFO or device between a check and the open is refused too.
pub async fn read_regular(
    conn: &mut Conn,
    path: &str,
    offset: u64,
    limit: u64,
) -> Result<(), ProtoError> {
    let (path, mut file, info) = match open_regular(path, offset).await {
        Ok(x) => x,
        Err(e) => return conn.send_error(&e).await,
    };
    conn.send_json(FrameKind::Ok, &info).await?;
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut left = limit;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        match file.read(&mut buf[..want]).await {
            Ok(0) => break,
            Ok(n) => {
                conn.send(FrameKind::Data, &buf[..n]).await?;
                left -= n as u64;
            }
            Err(e) => return conn.send_error(&map_io(&path, &e)).await,
        }
    }
    conn.send(FrameKind::End, &[]).await
}

async fn open_regular(path: &str, offset: u64) -> Result<(String, fs::File, FileInfo), AgentError> {
    use std::os::unix::fs::OpenOptionsExt;
    use tokio::io::AsyncSeekExt;
    let path = normalize_path(path)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(&path)
        .map_err(|e| map_io(&path, &e))?;
    let meta = file.metadata().map_err(|e| map_io(&path, &e))?;
    if meta.is_dir() {
        return Err(is_directory(&path));
    }
    if !meta.file_type().is_file() {
        return Err(agent_error(
            AgentErrorCode::NotRegularFile,
            format!("{path}: not a regular file"),
        ));
    }
    let info = file_info(&meta);
    let mut file = fs::File::from_std(file);
    if offset > 0 {
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| map_io(&path, &e))?;
    }
    Ok((path, file, info))
}

async fn open_for_read(path: &str) -> Result<(String, fs::File, FileInfo), AgentError> {
    let path = normalize_path(path)?;
    let meta = fs::metadata(&path).await.map_err(|e| map_io(&path, &e))?;
    if meta.is_dir() {
        return Err(is_directory(&path));
    }
    let file = fs::File::open(&path).await.map_err(|e| map_io(&path, &e))?;
    let meta = file.metadata().await.map_err(|e| map_io(&path, &e))?;
    if meta.is_dir() {
        return Err(is_directory(&path));
    }
    let info = file_info(&meta);
    Ok((path, file, info))
}

/// `WriteFile`: stream `Data` frames into a temporary file next to the target; on `End`
/// fsync and rename it into place and answer `Ok` + [`WriteReply`]. The temporary file is
/// removed on every other outcome (error, bad frame, dropped connection).
pub async fn write_file(
    conn: &mut Conn,
    path: &str,
    mode: Option<u32>,
    create_parents: bool,
    owner: Option<&str>,
) -> Result<(), ProtoError> {
    let created = match owner_ids(owner) {
        Ok(o) => o,
        Err(e) => return conn.send_error(&e).await,
    };
    let mut tmp = match TempFile::create(path, mode, create_parents, created).await {
        Ok(t) => t,
        Err(e) => return conn.send_error(&e).await,
    };
    let mut size = 0u64;
    loop {
        let frame = match conn.recv().await {
            Ok(f) => f,
            // Host gone: `tmp` is dropped, which deletes the temporary file.
            Err(e @ (ProtoError::Closed | ProtoError::Read(_))) => return Err(e),
            Err(e) => {
                let err = agent_error(AgentErrorCode::BadRequest, e.to_string());
                return conn.send_error(&err).await;
            }
        };
        match frame.kind {
            FrameKind::Data => {
                if let Err(e) = tmp.file.write_all(&frame.payload).await {
                    let err = map_io(&tmp.target, &e);
                    drop(tmp);
                    return conn.send_error(&err).await;
                }
                size += frame.payload.len() as u64;
            }
            FrameKind::End => break,
            FrameKind::Error => {
                // The host aborts (e.g. the upload went past its size limit): remove the
                // temporary file before answering, so the host knows nothing is left.
                drop(tmp);
                let err = agent_error(AgentErrorCode::BadRequest, "write aborted by the host");
                return conn.send_error(&err).await;
            }
            other => {
                drop(tmp);
                let err = agent_error(
                    AgentErrorCode::BadRequest,
                    format!("unexpected frame kind {} while writing a file", other as u8),
                );
                return conn.send_error(&err).await;
            }
        }
    }
    match tmp.commit().await {
        Ok(()) => conn.send_json(FrameKind::Ok, &WriteReply { size }).await,
        Err(e) => conn.send_error(&e).await,
    }
}

/// A temporary file that becomes `target` on [`TempFile::commit`] and is deleted if dropped.
struct TempFile {
    file: fs::File,
    target: String,
    dir: String,
    /// `Some` until committed.
    tmp_path: Option<PathBuf>,
    mode: u32,
    owner: Option<(u32, u32)>,
}

impl TempFile {
    async fn create(
        path: &str,
        mode: Option<u32>,
        create_parents: bool,
        created_owner: Option<(u32, u32)>,
    ) -> Result<TempFile, AgentError> {
        let target = normalize_path(path)?;
        if target == "/" {
            return Err(agent_error(
                AgentErrorCode::InvalidPath,
                "cannot write to /",
            ));
        }
        let (dir, name) = split_parent(&target);
        if create_parents {
            create_dirs(&dir, true, created_owner).await?;
        }
        // Keep the mode and owner of a file being replaced.
        let existing = match fs::metadata(&target).await {
            Ok(m) if m.is_dir() => return Err(is_directory(&target)),
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(map_io(&target, &e)),
        };
        let mode = mode
            .or(existing.as_ref().map(|m| m.mode()))
            .unwrap_or(DEFAULT_MODE)
            & 0o7777;
        let owner = existing
            .as_ref()
            .map(|m| (m.uid(), m.gid()))
            .or(created_owner);
        let mut attempt = 0;
        loop {
            let tmp_path = Path::new(&dir).join(temp_name(&name));
            let opened = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp_path)
                .await;
            match opened {
                Ok(file) => {
                    return Ok(TempFile {
                        file,
                        target,
                        dir,
                        tmp_path: Some(tmp_path),
                        mode,
                        owner,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
                Err(e) => return Err(map_io(&dir, &e)),
            }
        }
    }

    async fn commit(mut self) -> Result<(), AgentError> {
        let target = self.target.clone();
        let io = |e: io::Error| map_io(&target, &e);
        self.file.flush().await.map_err(io)?;
        if let Some((uid, gid)) = self.owner {
            // Best effort: keep the replaced file's owner or give a new one to the requested
            // owner, through the handle (before chmod, which chown resets).
            let _ = std::os::unix::fs::fchown(&self.file, Some(uid), Some(gid));
        }
        self.file
            .set_permissions(Permissions::from_mode(self.mode))
            .await
            .map_err(io)?;
        self.file.sync_all().await.map_err(io)?;
        let tmp_path = self.tmp_path.clone().expect("not yet committed");
        fs::rename(&tmp_path, &self.target).await.map_err(io)?;
        self.tmp_path = None;
        // Make the rename durable too (best effort).
        if let Ok(d) = fs::File::open(&self.dir).await {
            let _ = d.sync_all().await;
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.tmp_path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `/a/b` → (`/a`, `b`); `/b` → (`/`, `b`). `path` is normalized and not `/`.
fn split_parent(path: &str) -> (String, String) {
    let (dir, name) = path.rsplit_once('/').expect("absolute path");
    let dir = if dir.is_empty() { "/" } else { dir };
    (dir.to_string(), name.to_string())
}

/// `.<name>.sandpit-tmp-<random>`, with `name` shortened to keep under NAME_MAX.
fn temp_name(name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut end = name.len().min(200);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // RandomState is seeded from the OS's random source.
    let r = RandomState::new().hash_one((COUNTER.fetch_add(1, Ordering::Relaxed), nanos));
    format!(".{}.sandpit-tmp-{r:016x}", &name[..end])
}

/// `ListDir`: entries sorted by name; symlinks are reported as symlinks.
pub async fn list_dir(path: &str) -> Result<DirListing, AgentError> {
    let path = normalize_path(path)?;
    tokio::task::spawn_blocking(move || {
        let err = |e: io::Error| map_io(&path, &e);
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&path).map_err(err)? {
            let entry = entry.map_err(err)?;
            // An entry removed meanwhile is skipped.
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            entries.push(DirEntry {
                name: entry.file_name().to_string_lossy().into_owned(),
                info: file_info(&meta),
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(DirListing { entries })
    })
    .await
    .map_err(|e| agent_error(AgentErrorCode::Io, e.to_string()))?
}

/// `Stat`: follows symlinks, like stat(2).
pub async fn stat(path: &str) -> Result<FileInfo, AgentError> {
    let path = normalize_path(path)?;
    let meta = fs::metadata(&path).await.map_err(|e| map_io(&path, &e))?;
    Ok(file_info(&meta))
}

/// `MakeDir`; with `owner`, the directories it creates are given to that user spec.
pub async fn make_dir(path: &str, recursive: bool, owner: Option<&str>) -> Result<(), AgentError> {
    let path = normalize_path(path)?;
    let owner = owner_ids(owner)?;
    create_dirs(&path, recursive, owner).await
}

/// The uid and gid of an owner spec ([`users::resolve`]).
fn owner_ids(owner: Option<&str>) -> Result<Option<(u32, u32)>, AgentError> {
    Ok(users::resolve_opt(owner)?.map(|c| (c.uid, c.gid)))
}

/// Create the normalized `path` (and, when `recursive`, its missing parents, refusing only
/// if `path` itself exists and is not a directory), giving each directory this call created
/// to `owner`. The owner is set through a handle opened without following symlinks, so a
/// directory swapped for a symlink meanwhile gives away nothing else.
async fn create_dirs(
    path: &str,
    recursive: bool,
    owner: Option<(u32, u32)>,
) -> Result<(), AgentError> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        let mut todo = vec![path.as_str()];
        if recursive {
            todo = path
                .match_indices('/')
                .skip(1)
                .map(|(i, _)| &path[..i])
                .chain(std::iter::once(path.as_str()))
                .filter(|p| *p != "/")
                .collect();
        }
        for dir in todo {
            match std::fs::create_dir(dir) {
                Ok(()) => {
                    if let Some((uid, gid)) = owner {
                        chown_nofollow(dir, uid, gid).map_err(|e| map_io(dir, &e))?;
                    }
                }
                Err(e) if recursive && e.kind() == io::ErrorKind::AlreadyExists => {
                    if !std::fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
                        return Err(map_io(dir, &e));
                    }
                }
                Err(e) => return Err(map_io(dir, &e)),
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| agent_error(AgentErrorCode::Io, e.to_string()))?
}

/// Give the directory `dir` to `uid`:`gid` through a handle; refuses a symlink.
fn chown_nofollow(dir: &str, uid: u32, gid: u32) -> io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::fs::fchown(
        &fd,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    )?;
    Ok(())
}

/// `Remove`: a file, symlink (not its target) or directory; refuses `/`.
pub async fn remove(path: &str, recursive: bool) -> Result<(), AgentError> {
    let path = normalize_path(path)?;
    if path == "/" {
        return Err(agent_error(AgentErrorCode::InvalidPath, "cannot remove /"));
    }
    let err = |e: io::Error| map_io(&path, &e);
    let meta = fs::symlink_metadata(&path).await.map_err(err)?;
    let r = if !meta.is_dir() {
        fs::remove_file(&path).await
    } else if recursive {
        fs::remove_dir_all(&path).await
    } else {
        fs::remove_dir(&path).await
    };
    r.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_io_errors() {
        let code = |errno| map_io("/x", &io::Error::from_raw_os_error(errno)).code;
        assert_eq!(code(2), AgentErrorCode::NotFound);
        assert_eq!(code(13), AgentErrorCode::PermissionDenied);
        assert_eq!(code(1), AgentErrorCode::PermissionDenied);
        assert_eq!(code(17), AgentErrorCode::AlreadyExists);
        assert_eq!(code(20), AgentErrorCode::NotDirectory);
        assert_eq!(code(21), AgentErrorCode::IsDirectory);
        assert_eq!(code(39), AgentErrorCode::NotEmpty);
        assert_eq!(code(28), AgentErrorCode::NoSpace);
        assert_eq!(code(122), AgentErrorCode::NoSpace);
        assert_eq!(code(5), AgentErrorCode::Io);
        assert!(
            map_io("/x", &io::Error::from_raw_os_error(2))
                .message
                .starts_with("/x: ")
        );
    }

    #[test]
    fn splits_parents_and_names_temp_files() {
        assert_eq!(split_parent("/a/b"), ("/a".into(), "b".into()));
        assert_eq!(split_parent("/b"), ("/".into(), "b".into()));
        let t = temp_name("file.txt");
        assert!(t.starts_with(".file.txt.sandpit-tmp-"), "{t}");
        assert_ne!(t, temp_name("file.txt"));
        assert!(temp_name(&"é".repeat(200)).len() < 255);
    }

    #[tokio::test]
    async fn regular_reads_refuse_special_files_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap().to_string();
        let fifo = format!("{base}/fifo");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            fifo.as_str(),
            rustix::fs::Mode::from_raw_mode(0o644),
        )
        .unwrap();
        let e = tokio::time::timeout(std::time::Duration::from_secs(5), open_regular(&fifo, 0))
            .await
            .expect("a FIFO is refused at once")
            .err()
            .unwrap();
        assert_eq!(e.code, AgentErrorCode::NotRegularFile);
        let e = open_regular("/dev/zero", 0).await.err().unwrap();
        assert_eq!(e.code, AgentErrorCode::NotRegularFile);
        let e = open_regular(&base, 0).await.err().unwrap();
        assert_eq!(e.code, AgentErrorCode::IsDirectory);
        std::fs::write(format!("{base}/f"), b"0123456789").unwrap();
        std::os::unix::fs::symlink("f", format!("{base}/l")).unwrap();
        let (_, mut f, info) = open_regular(&format!("{base}/l"), 4).await.unwrap();
        assert_eq!((info.kind, info.size), (EntryKind::File, 10));
        let mut rest = String::new();
        f.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "456789");
    }

    #[tokio::test]
    async fn dir_ops() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap().to_string();
        make_dir(&format!("{base}/a/b"), true, None).await.unwrap();
        let e = make_dir(&format!("{base}/a/b"), false, None)
            .await
            .unwrap_err();
        assert_eq!(e.code, AgentErrorCode::AlreadyExists);
        std::fs::write(format!("{base}/a/f"), b"12345").unwrap();
        std::os::unix::fs::symlink("f", format!("{base}/a/l")).unwrap();
        let listing = list_dir(&format!("{base}/a")).await.unwrap();
        let names: Vec<_> = listing
            .entries
            .iter()
            .map(|e| (e.name.as_str(), e.info.kind))
            .collect();
        assert_eq!(
            names,
            [
                ("b", EntryKind::Dir),
                ("f", EntryKind::File),
                ("l", EntryKind::Symlink)
            ]
        );
        let info = stat(&format!("{base}/a/l")).await.unwrap();
        assert_eq!((info.kind, info.size), (EntryKind::File, 5));
        let e = remove(&format!("{base}/a"), false).await.unwrap_err();
        assert_eq!(e.code, AgentErrorCode::NotEmpty);
        let e = list_dir(&format!("{base}/a/f")).await.unwrap_err();
        assert_eq!(e.code, AgentErrorCode::NotDirectory);
        remove(&format!("{base}/a/l"), false).await.unwrap();
        assert!(std::fs::metadata(format!("{base}/a/f")).is_ok());
        remove(&format!("{base}/a"), true).await.unwrap();
        assert_eq!(
            stat(&format!("{base}/a")).await.unwrap_err().code,
            AgentErrorCode::NotFound
        );
        assert_eq!(
            remove("/", true).await.unwrap_err().code,
            AgentErrorCode::InvalidPath
        );
        assert_eq!(
            stat("rel").await.unwrap_err().code,
            AgentErrorCode::InvalidPath
        );
    }
}
