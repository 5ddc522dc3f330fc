//! Push: a node's directory to the store as content-addressed chunks plus a manifest.
//!
//! Three passes. The walk lists the tree through `sandpit-fs` handles (no symlink is
//! followed; symlinks and special files are refused, as are set-id and sticky bits), bounded
//! by [`Limits`]. The map pass opens each file once, records its identity and change stamp
//! (device, inode, size, mtime, ctime) and asks the file system where its data is
//! (`SEEK_DATA`/`SEEK_HOLE`; a file system without them is read whole): only the
//! [`DEFAULT_CHUNK_BYTES`] chunks that overlap data are candidates, the rest are holes and
//! are never read. The chunk pass then handles the candidates of every file, a few at a time
//! (`CHUNKS_IN_FLIGHT`), each on its own: read the chunk (`pread`, on a blocking thread,
//! checking the file's stamp before and after), drop it as a hole if it is all zeros,
//! otherwise hash it, ask the store about its digest (HEAD) and upload it in one PUT if it
//! is missing. The bytes uploaded are the bytes hashed, so a blob key never receives bytes
//! that do not hash to it, whatever happens to the file. Memory is bounded by the chunks in
//! flight (about `CHUNKS_IN_FLIGHT` × 4 MiB), whatever the file sizes. Each file is read
//! once, and only where it holds data: a 10 GiB sparse disk with 20 MiB written reads about
//! 20 MiB.
//!
//! Last, every file's stamp is checked once more, and the manifest is written, so a
//! manifest in the store implies its chunks were there and that no file changed during the
//! push (as far as its size, times and identity tell).

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, PutPayload};
use rustix::fs::SeekFrom;
use sandpit_fs::{Kind, TreeDir};

use crate::manifest::{
    Chunk, DEFAULT_CHUNK_BYTES, DirEntry, FORMAT_VERSION, FileEntry, MAX_NAME_BYTES, Manifest,
    Sha256Digest, check_path,
};
use crate::{ImageKind, ImageRef, Limits, ObjectsError, Progress, Store};

/// Chunks read, hashed or uploaded at once (each holds one chunk in memory).
const CHUNKS_IN_FLIGHT: usize = 4;

/// Push the directory `local_dir` (the node's own: a checkpoint image written by runsc, a
/// snapshot or a layer directory) to `store` as an image of `kind`, and return its
/// reference.
///
/// Contract:
/// - Only directories and regular files are carried, with their permission bits
///   (`0o777`), relative paths and contents; owners and times are not. A symlink, FIFO,
///   socket, device, set-id or sticky bit, non-UTF-8 name, or a tree over `limits` is an
///   [`ObjectsError::Unsupported`] / [`ObjectsError::TooLarge`] before anything is uploaded.
/// - Files are stored as [`DEFAULT_CHUNK_BYTES`] chunks; all-zero chunks (holes, or data
///   that happens to be zeros) are stored nowhere, and holes the file system reports are
///   not even read.
/// - Content-addressed and idempotent: chunks already in the store (same key, same size)
///   are not uploaded again, so pushing the same directory twice uploads nothing the second
///   time and returns the same reference, and pushing it after a small change uploads only
///   the chunks that changed. Equal directories on different nodes share chunks.
/// - The manifest is written only after all its chunks are in the store; when this returns
///   `Ok`, the image is complete in the store and [`crate::pull_dir`] can fetch it.
/// - The directory must not change while it is pushed; a file whose size, mtime, ctime or
///   inode changes (or that turns out shorter than it said) is an [`ObjectsError::Changed`]
///   and no manifest is written. A chunk is always uploaded from the very bytes it was
///   hashed from, so the store never holds a blob that does not match its key.
/// - On error or cancellation nothing references what was uploaded so far; those chunks are
///   reused by the next push or removed by [`crate::gc`].
/// - Memory stays bounded whatever the file sizes: a few chunks (about 16 MiB) plus the
///   manifest.
/// - The manifest must fit `limits.max_manifest_bytes` too, so any image pushed under some
///   limits can be pulled under the same limits.
pub async fn push_dir(
    store: &Store,
    local_dir: &Path,
    kind: ImageKind,
    limits: &Limits,
    progress: &Progress,
) -> Result<ImageRef, ObjectsError> {
    let cb = DEFAULT_CHUNK_BYTES;
    let dir = local_dir.to_path_buf();
    let limits_copy = *limits;
    let progress2 = progress.clone();
    let (root, walked, mapped) = blocking(move || {
        let root = TreeDir::open(&dir).map_err(|source| ObjectsError::ReadSource {
            path: dir.display().to_string(),
            source,
        })?;
        let walked = walk(&root, &limits_copy)?;
        let mapped = walked
            .files
            .iter()
            .map(|f| map_file(&root, f, cb, &progress2))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((root, walked, mapped))
    })
    .await?;
    let root = Arc::new(root);
    let mapped = Arc::new(mapped);

    // Chunk pass: every candidate chunk of every file, a few at a time, in any order (one
    // slow upload does not hold up the next reads); sorted back below.
    let jobs: Vec<(usize, u64)> = mapped
        .iter()
        .enumerate()
        .flat_map(|(i, m)| m.candidates.iter().map(move |&offset| (i, offset)))
        .collect();
    let claimed: Mutex<HashSet<Sha256Digest>> = Mutex::new(HashSet::new());
    let mut stored: Vec<Option<(usize, Chunk)>> =
        futures::stream::iter(jobs.into_iter().map(|(i, offset)| {
            let (root, mapped) = (root.clone(), mapped.clone());
            let claimed = &claimed;
            async move {
                let chunk =
                    push_chunk(store, root, mapped, i, offset, cb, claimed, progress).await?;
                Ok::<_, ObjectsError>(chunk.map(|c| (i, c)))
            }
        }))
        .buffer_unordered(CHUNKS_IN_FLIGHT)
        .try_collect()
        .await?;
    stored.sort_unstable_by_key(|s| s.map(|(i, c)| (i, c.offset)));

    // Nothing changed under us: a file whose data was all read may still have been
    // written since, and a file with no data chunks was only looked at by the map pass.
    let (root2, mapped2) = (root.clone(), mapped.clone());
    blocking(move || {
        for m in mapped2.iter() {
            let file = open_source(&root2, &m.path)?;
            m.check_unchanged(&file)?;
        }
        Ok(())
    })
    .await?;

    let mut chunks: Vec<Vec<Chunk>> = vec![Vec::new(); mapped.len()];
    for (i, c) in stored.into_iter().flatten() {
        chunks[i].push(c);
    }
    let files: Vec<FileEntry> = walked
        .files
        .into_iter()
        .zip(chunks)
        .map(|(f, chunks)| FileEntry {
            path: f.path,
            mode: f.mode,
            size: f.size,
            chunks,
        })
        .collect();
    let manifest = Manifest {
        format: FORMAT_VERSION,
        kind,
        chunk_bytes: cb,
        mode: walked.mode,
        dirs: walked.dirs,
        files,
    };
    if let Err(reason) = manifest.check(limits) {
        // The walk enforces the same rules, so this is a bug rather than bad input; refuse
        // all the same rather than write a manifest no pull would accept.
        tracing::error!(dir = %local_dir.display(), %reason, "a pushed tree broke the manifest rules");
        return Err(ObjectsError::Unsupported {
            path: local_dir.display().to_string(),
            what: "a tree the manifest rules refuse (the reason is logged)",
        });
    }
    let (bytes, image) = manifest.encode();
    if bytes.len() as u64 > limits.max_manifest_bytes {
        // A pull under the same limits would refuse it.
        return Err(ObjectsError::TooLarge {
            what: format!("the manifest ({} bytes)", bytes.len()),
            limit: limits.max_manifest_bytes,
        });
    }

    let key = store.key(&format!("manifests/sha256/{}", image.hex()));
    if head_size(store, &key).await? != Some(bytes.len() as u64) {
        store
            .inner()
            .put(&key, PutPayload::from(bytes))
            .await
            .map_err(|source| ObjectsError::Upload {
                key: key.to_string(),
                source,
            })?;
    }
    tracing::debug!(%image, store = %store, "pushed image");
    Ok(image)
}

/// A file found by the walk, before hashing.
struct Found {
    path: String,
    mode: u32,
    size: u64,
}

/// What the walk found: the root's mode, subdirectories and files, each sorted by path.
struct Walked {
    mode: u32,
    dirs: Vec<DirEntry>,
    files: Vec<Found>,
}

/// List the tree under `root` through handles, refusing what an image cannot carry and
/// stopping as soon as a bound is crossed.
fn walk(root: &TreeDir, limits: &Limits) -> Result<Walked, ObjectsError> {
    let read_err = |path: &str, source| ObjectsError::ReadSource {
        path: if path.is_empty() {
            ".".into()
        } else {
            path.into()
        },
        source,
    };
    let meta = root.meta().map_err(|e| read_err("", e))?;
    check_source_mode(".", meta.mode)?;
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut total: u64 = 0;
    let mut pending = vec![String::new()];
    while let Some(rel) = pending.pop() {
        let dir = root
            .open_dir(Path::new(&rel))
            .map_err(|e| read_err(&rel, e))?;
        for (name, meta) in dir.entries().map_err(|e| read_err(&rel, e))? {
            let Some(name) = name.to_str() else {
                return Err(ObjectsError::Unsupported {
                    path: format!("{rel}/{}", name.to_string_lossy()),
                    what: "a name that is not UTF-8",
                });
            };
            let path = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            if name.len() > MAX_NAME_BYTES || check_path(&path).is_err() {
                return Err(ObjectsError::Unsupported {
                    path,
                    what: "a path this long or deep",
                });
            }
            if dirs.len() + files.len() >= limits.max_entries {
                return Err(ObjectsError::TooLarge {
                    what: "the number of files and directories".into(),
                    limit: limits.max_entries as u64,
                });
            }
            match meta.kind {
                Kind::Dir => {
                    check_source_mode(&path, meta.mode)?;
                    dirs.push(DirEntry {
                        path: path.clone(),
                        mode: meta.mode,
                    });
                    pending.push(path);
                }
                Kind::File => {
                    check_source_mode(&path, meta.mode)?;
                    if meta.size > limits.max_file_bytes {
                        return Err(ObjectsError::TooLarge {
                            what: format!("{path} ({} bytes)", meta.size),
                            limit: limits.max_file_bytes,
                        });
                    }
                    total = total
                        .checked_add(meta.size)
                        .filter(|t| *t <= limits.max_total_bytes)
                        .ok_or_else(|| ObjectsError::TooLarge {
                            what: "the total size of the files".into(),
                            limit: limits.max_total_bytes,
                        })?;
                    files.push(Found {
                        path,
                        mode: meta.mode,
                        size: meta.size,
                    });
                }
                Kind::Symlink => {
                    return Err(ObjectsError::Unsupported {
                        path,
                        what: "a symlink",
                    });
                }
                Kind::Other => {
                    return Err(ObjectsError::Unsupported {
                        path,
                        what: "a special file (FIFO, socket or device)",
                    });
                }
            }
        }
    }
    dirs.sort_by(|a, b| a.path.cmp(&b.path));
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Walked {
        mode: meta.mode,
        dirs,
        files,
    })
}

fn check_source_mode(path: &str, mode: u32) -> Result<(), ObjectsError> {
    if mode & !0o777 != 0 {
        return Err(ObjectsError::Unsupported {
            path: path.into(),
            what: "a set-id or sticky bit",
        });
    }
    Ok(())
}

/// What identifies a file's state: a change to its bytes changes its ctime (and mtime), a
/// replacement its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(file: &File) -> io::Result<Stamp> {
        let st = rustix::fs::fstat(file)?;
        Ok(Stamp {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec as i64),
            ctime: (st.st_ctime, st.st_ctime_nsec as i64),
        })
    }
}

/// A file after the map pass: its stamp, and the offsets of the chunks that overlap data.
struct Mapped {
    path: String,
    size: u64,
    stamp: Stamp,
    candidates: Vec<u64>,
}

impl Mapped {
    fn check_unchanged(&self, file: &File) -> Result<(), ObjectsError> {
        let now = Stamp::of(file).map_err(|source| ObjectsError::ReadFile {
            path: self.path.clone(),
            source,
        })?;
        if now != self.stamp {
            return Err(ObjectsError::Changed {
                path: self.path.clone(),
            });
        }
        Ok(())
    }
}

/// Open `f`, stamp it, and list the chunks that overlap its data.
fn map_file(
    root: &TreeDir,
    f: &Found,
    cb: u64,
    progress: &Progress,
) -> Result<Mapped, ObjectsError> {
    let file = open_source(root, &f.path)?;
    let read_err = |source| ObjectsError::ReadFile {
        path: f.path.clone(),
        source,
    };
    let stamp = Stamp::of(&file).map_err(read_err)?;
    if stamp.size != f.size {
        return Err(ObjectsError::Changed {
            path: f.path.clone(),
        });
    }
    let candidates = data_chunks(&file, f.size, cb).map_err(read_err)?;
    let candidate_bytes: u64 = candidates.iter().map(|&o| (f.size - o).min(cb)).sum();
    progress.in_holes(f.size - candidate_bytes);
    Ok(Mapped {
        path: f.path.clone(),
        size: f.size,
        stamp,
        candidates,
    })
}

/// The offsets of the `cb`-sized chunks of `file` (of `size` bytes) that overlap data as
/// `SEEK_DATA`/`SEEK_HOLE` report it; every chunk when the file system does not support
/// them.
fn data_chunks(file: &File, size: u64, cb: u64) -> io::Result<Vec<u64>> {
    let every = || (0..size.div_ceil(cb)).map(|i| i * cb).collect();
    let unsupported =
        |e: rustix::io::Errno| matches!(e, rustix::io::Errno::INVAL | rustix::io::Errno::NOTSUP);
    let mut out = Vec::new();
    // Always a chunk boundary: where the next chunk to consider starts.
    let mut pos: u64 = 0;
    while pos < size {
        let data = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
            Ok(data) => data,
            // No data at or after `pos`.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) if unsupported(e) => return Ok(every()),
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = match rustix::fs::seek(file, SeekFrom::Hole(data)) {
            Ok(hole) => hole.min(size),
            Err(e) if unsupported(e) => return Ok(every()),
            // Data at `data` and no hole after it: the file grew or shrank under us, which
            // the stamp checks report; read to the end meanwhile.
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        let mut offset = data / cb * cb;
        while offset < hole {
            out.push(offset);
            offset += cb;
        }
        pos = offset;
    }
    Ok(out)
}

/// Handle one candidate chunk: read it, and unless it is all zeros, make sure the store
/// holds it. Returns the chunk for the manifest, or `None` for a hole.
#[expect(
    clippy::too_many_arguments,
    reason = "one job of the chunk pass: what it reads, where it writes, what it reports"
)]
async fn push_chunk(
    store: &Store,
    root: Arc<TreeDir>,
    mapped: Arc<Vec<Mapped>>,
    i: usize,
    offset: u64,
    cb: u64,
    claimed: &Mutex<HashSet<Sha256Digest>>,
    progress: &Progress,
) -> Result<Option<Chunk>, ObjectsError> {
    let progress2 = progress.clone();
    let (path, len) = {
        let m = &mapped[i];
        (m.path.clone(), (m.size - offset).min(cb))
    };
    let read = blocking(move || {
        let m = &mapped[i];
        let file = open_source(&root, &m.path)?;
        m.check_unchanged(&file)?;
        let mut buf = vec![0u8; len as usize];
        match file.read_exact_at(&mut buf, offset) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(ObjectsError::Changed {
                    path: m.path.clone(),
                });
            }
            Err(source) => {
                return Err(ObjectsError::ReadFile {
                    path: m.path.clone(),
                    source,
                });
            }
        }
        m.check_unchanged(&file)?;
        progress2.hashed(len);
        if is_zero(&buf) {
            return Ok(None);
        }
        let digest = Sha256Digest::of(&buf);
        Ok(Some((Bytes::from(buf), digest)))
    })
    .await?;
    let Some((bytes, digest)) = read else {
        progress.in_holes(len);
        return Ok(None);
    };
    let chunk = Chunk { offset, digest };
    // The same bytes twice in one push (in two files, or twice in one) go up once; if that
    // upload fails, so does the push.
    let first = claimed
        .lock()
        .expect("the lock guards a set and never panics while held")
        .insert(digest);
    let key = store.key(&format!("blobs/sha256/{}", digest.hex()));
    if !first || head_size(store, &key).await? == Some(len) {
        progress.blob_present(len);
        return Ok(Some(chunk));
    }
    store
        .inner()
        .put(&key, PutPayload::from(bytes))
        .await
        .map_err(|source| ObjectsError::Upload {
            key: key.to_string(),
            source,
        })?;
    tracing::trace!(%path, offset, %digest, "uploaded chunk");
    progress.uploaded(len);
    progress.blob_uploaded();
    Ok(Some(chunk))
}

/// Whether `bytes` are all zeros.
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    // 16 bytes at a time, then the remainder.
    let mut words = bytes.chunks_exact(16);
    words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|b| *b == 0)
}

fn open_source(root: &TreeDir, rel: &str) -> Result<std::fs::File, ObjectsError> {
    root.open_file(Path::new(rel))
        .map_err(|source| ObjectsError::ReadSource {
            path: rel.into(),
            source,
        })
}

/// The size of the object at `key`, or `None` when there is none.
pub(crate) async fn head_size(
    store: &Store,
    key: &object_store::path::Path,
) -> Result<Option<u64>, ObjectsError> {
    match store.inner().head(key).await {
        Ok(meta) => Ok(Some(meta.size)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(source) => Err(ObjectsError::Head {
            key: key.to_string(),
            source,
        }),
    }
}

/// Run blocking file work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ObjectsError> + Send + 'static,
) -> Result<T, ObjectsError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| ObjectsError::Task { source })?
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, Write};

    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 4096]));
        let mut b = [0u8; 4096];
        b[4095] = 1;
        assert!(!is_zero(&b));
        b[4095] = 0;
        b[0] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[0; 7]));
        assert!(is_zero(&[]));
    }

    #[test]
    fn data_chunks_skip_holes() {
        const CB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let mut f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("f"))
            .unwrap();
        let size = 64 * CB + 100;
        f.set_len(size).unwrap();
        let all = data_chunks(&f, size, CB).unwrap();
        if all.len() == 65 {
            // A file system that does not report holes: every chunk is read, as it must.
            eprintln!("the temp dir's file system reports no holes; nothing more to check");
            return;
        }
        assert_eq!(all, Vec::<u64>::new());
        // Data in chunk 0, across chunks 9 and 10, and in the short last chunk.
        f.write_all(b"x").unwrap();
        f.seek(io::SeekFrom::Start(10 * CB - 2)).unwrap();
        f.write_all(b"abcd").unwrap();
        f.seek(io::SeekFrom::Start(size - 1)).unwrap();
        f.write_all(b"z").unwrap();
        f.sync_all().unwrap();
        let got = data_chunks(&f, size, CB).unwrap();
        assert_eq!(got, [0, 9 * CB, 10 * CB, 64 * CB], "{got:?}");
        // An empty file has no chunks.
        assert!(data_chunks(&f, 0, CB).unwrap().is_empty());
    }
}
