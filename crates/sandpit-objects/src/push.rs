//! Push: a node's directory to the store as content-addressed blobs plus a manifest.
//!
//! Three passes. The walk lists the tree through `sandpit-fs` handles (no symlink is
//! followed; symlinks and special files are refused, as are set-id and sticky bits), bounded
//! by [`Limits`]. The hash pass reads every file once (2 at a time, on blocking threads) for
//! its sha256. The upload pass asks the store about each distinct digest (HEAD) and uploads
//! only the missing ones (4 at a time), reading the file again: files up to one part
//! (8 MiB) in one PUT after checking their digest in memory, larger ones as a multipart
//! upload fed by a reader thread through a bounded channel, whose digest is checked before
//! the upload is completed and which is aborted on a mismatch. A large file holds about
//! three parts plus 16 MiB in memory (parts are 8 MiB for files up to ~70 GiB, larger
//! beyond, as S3 allows 10 000 parts), and at most 2 large files upload at once. So a blob key never receives bytes that do
//! not hash to it, even when a file changes during the push (that is an error). The
//! manifest is written last, so a manifest in the store implies its blobs were there.

use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use sandpit_fs::{Kind, TreeDir};
use sha2::{Digest as _, Sha256};
use tokio::sync::{Semaphore, mpsc};

use crate::manifest::{
    DirEntry, FORMAT_VERSION, FileEntry, MAX_NAME_BYTES, Manifest, Sha256Digest, check_path,
};
use crate::{ImageKind, ImageRef, Limits, ObjectsError, Progress, Store};

/// Size of a multipart part (S3's minimum is 5 MiB) and of the reads feeding it; files up
/// to this size go up in a single PUT.
pub(crate) const PART_BYTES: usize = 8 << 20;
/// S3 allows 10 000 parts; stay below so the part size grows for huge files.
const MAX_PARTS: u64 = 9_000;
const HASH_CONCURRENCY: usize = 2;
const UPLOAD_CONCURRENCY: usize = 4;
const LARGE_UPLOADS_AT_ONCE: usize = 2;
const PARTS_IN_FLIGHT: usize = 2;

/// Push the directory `local_dir` (the node's own: a checkpoint image written by runsc, a
/// snapshot or a layer directory) to `store` as an image of `kind`, and return its
/// reference.
///
/// Contract:
/// - Only directories and regular files are carried, with their permission bits
///   (`0o777`), relative paths and contents; owners and times are not. A symlink, FIFO,
///   socket, device, set-id or sticky bit, non-UTF-8 name, or a tree over `limits` is an
///   [`ObjectsError::Unsupported`] / [`ObjectsError::TooLarge`] before anything is uploaded.
/// - Content-addressed and idempotent: blobs already in the store (same key, same size)
///   are not uploaded again, so pushing the same directory twice uploads nothing the second
///   time and returns the same reference. Equal directories on different nodes share blobs.
/// - The manifest is written only after all its blobs are in the store; when this returns
///   `Ok`, the image is complete in the store and [`crate::pull_dir`] can fetch it.
/// - The directory must not change while it is pushed; a file that does is an
///   [`ObjectsError::Changed`] and its blob is not written.
/// - On error or cancellation nothing references what was uploaded so far; those blobs are
///   reused by the next push or removed by [`crate::gc`]. A cancelled multipart upload is
///   left for the bucket's lifecycle rule (abort incomplete uploads) to clear.
/// - Memory stays bounded whatever the file sizes: about 100 MiB while files stay under
///   ~70 GiB (see the module docs).
/// - The manifest must fit `limits.max_manifest_bytes` too, so any image pushed under some
///   limits can be pulled under the same limits.
pub async fn push_dir(
    store: &Store,
    local_dir: &Path,
    kind: ImageKind,
    limits: &Limits,
    progress: &Progress,
) -> Result<ImageRef, ObjectsError> {
    let dir = local_dir.to_path_buf();
    let limits_copy = *limits;
    let (root, walked) = blocking(move || {
        let root = TreeDir::open(&dir).map_err(|source| ObjectsError::ReadSource {
            path: dir.display().to_string(),
            source,
        })?;
        let walked = walk(&root, &limits_copy)?;
        Ok((root, walked))
    })
    .await?;
    let root = Arc::new(root);

    // Hash pass.
    let hashed: Vec<FileEntry> = futures::stream::iter(walked.files.into_iter().map(|f| {
        let root = root.clone();
        let progress = progress.clone();
        async move {
            let path = f.path.clone();
            let digest = blocking(move || hash_file(&root, &path, f.size, &progress)).await?;
            Ok::<_, ObjectsError>(FileEntry {
                path: f.path,
                mode: f.mode,
                size: f.size,
                digest,
            })
        }
    }))
    .buffered(HASH_CONCURRENCY)
    .try_collect()
    .await?;

    let manifest = Manifest {
        format: FORMAT_VERSION,
        kind,
        mode: walked.mode,
        dirs: walked.dirs,
        files: hashed,
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

    // Upload pass: each distinct blob once.
    let mut distinct: Vec<&FileEntry> = manifest.files.iter().filter(|f| f.size > 0).collect();
    distinct.sort_by_key(|f| f.digest);
    distinct.dedup_by_key(|f| f.digest);
    let large = Arc::new(Semaphore::new(LARGE_UPLOADS_AT_ONCE));
    futures::stream::iter(distinct.into_iter().map(|f| {
        let root = root.clone();
        let large = large.clone();
        async move { ensure_blob(store, &root, f, &large, progress).await }
    }))
    .buffer_unordered(UPLOAD_CONCURRENCY)
    .try_collect::<Vec<()>>()
    .await?;

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

/// First pass over one file: its sha256, checking it still has the size the walk saw.
fn hash_file(
    root: &TreeDir,
    rel: &str,
    size: u64,
    progress: &Progress,
) -> Result<Sha256Digest, ObjectsError> {
    let mut file = open_source(root, rel)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut seen: u64 = 0;
    loop {
        let n = read_some(&mut file, &mut buf, rel)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        seen += n as u64;
        progress.hashed(n as u64);
        if seen > size {
            break;
        }
    }
    if seen != size {
        return Err(ObjectsError::Changed { path: rel.into() });
    }
    Ok(Sha256Digest(hasher.finalize().into()))
}

/// Make sure the blob of `f` is in the store: HEAD, then upload it if it is missing or
/// has the wrong size.
async fn ensure_blob(
    store: &Store,
    root: &Arc<TreeDir>,
    f: &FileEntry,
    large: &Semaphore,
    progress: &Progress,
) -> Result<(), ObjectsError> {
    let key = store.key(&format!("blobs/sha256/{}", f.digest.hex()));
    if head_size(store, &key).await? == Some(f.size) {
        progress.blob_present();
        return Ok(());
    }
    if f.size <= PART_BYTES as u64 {
        let (root, path, size) = (root.clone(), f.path.clone(), f.size);
        let data = blocking(move || {
            let mut file = open_source(&root, &path)?;
            let mut data = Vec::with_capacity(size as usize);
            (&mut file)
                .take(size + 1)
                .read_to_end(&mut data)
                .map_err(|source| ObjectsError::ReadFile { path, source })?;
            Ok(data)
        })
        .await?;
        if data.len() as u64 != f.size || Sha256Digest::of(&data) != f.digest {
            return Err(ObjectsError::Changed {
                path: f.path.clone(),
            });
        }
        let len = data.len() as u64;
        store
            .inner()
            .put(&key, PutPayload::from(data))
            .await
            .map_err(|source| ObjectsError::Upload {
                key: key.to_string(),
                source,
            })?;
        progress.uploaded(len);
    } else {
        let _permit = large
            .acquire()
            .await
            .expect("the semaphore is never closed");
        upload_large(store, root, f, &key, progress).await?;
    }
    progress.blob_uploaded();
    Ok(())
}

/// A multipart upload fed by a reader thread; completed only when what was read hashes to
/// the expected digest, aborted otherwise.
async fn upload_large(
    store: &Store,
    root: &Arc<TreeDir>,
    f: &FileEntry,
    key: &object_store::path::Path,
    progress: &Progress,
) -> Result<(), ObjectsError> {
    let upload_err = |source| ObjectsError::Upload {
        key: key.to_string(),
        source,
    };
    let part = (f.size.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20).max(PART_BYTES as u64);
    let (tx, mut rx) = mpsc::channel::<Bytes>(1);
    let (root, path, size) = (root.clone(), f.path.clone(), f.size);
    let reader = tokio::task::spawn_blocking(move || read_chunks(&root, &path, size, tx));

    let upload = store.inner().put_multipart(key).await.map_err(upload_err)?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, part as usize);
    let mut failed = None;
    while let Some(chunk) = rx.recv().await {
        if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
            failed = Some(upload_err(e));
            break;
        }
        progress.uploaded(chunk.len() as u64);
        writer.put(chunk);
    }
    drop(rx);
    let read = reader
        .await
        .map_err(|source| ObjectsError::Task { source })
        .and_then(|r| r);
    let outcome = match (failed, read) {
        (Some(e), _) | (None, Err(e)) => Err(e),
        (None, Ok((digest, size))) if digest != f.digest || size != f.size => {
            Err(ObjectsError::Changed {
                path: f.path.clone(),
            })
        }
        (None, Ok(_)) => Ok(()),
    };
    match outcome {
        Ok(()) => {
            writer.finish().await.map_err(upload_err)?;
            Ok(())
        }
        Err(e) => {
            if let Err(abort) = writer.abort().await {
                tracing::warn!(key = %key, error = %abort, "aborting a multipart upload failed");
            }
            Err(e)
        }
    }
}

/// Read `rel` in part-sized chunks into `tx`, hashing as it goes; stops early (returning
/// what it saw so far) when the receiver goes away or the file has grown past `size`.
fn read_chunks(
    root: &TreeDir,
    rel: &str,
    size: u64,
    tx: mpsc::Sender<Bytes>,
) -> Result<(Sha256Digest, u64), ObjectsError> {
    let mut file = open_source(root, rel)?;
    let mut hasher = Sha256::new();
    let mut seen: u64 = 0;
    loop {
        let mut buf = BytesMut::zeroed(PART_BYTES);
        let mut filled = 0;
        while filled < buf.len() {
            let n = read_some(&mut file, &mut buf[filled..], rel)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        hasher.update(&buf);
        seen += filled as u64;
        if tx.blocking_send(buf.freeze()).is_err() {
            break;
        }
        if filled < PART_BYTES || seen > size {
            break;
        }
    }
    Ok((Sha256Digest(hasher.finalize().into()), seen))
}

fn open_source(root: &TreeDir, rel: &str) -> Result<std::fs::File, ObjectsError> {
    root.open_file(Path::new(rel))
        .map_err(|source| ObjectsError::ReadSource {
            path: rel.into(),
            source,
        })
}

fn read_some(file: &mut std::fs::File, buf: &mut [u8], rel: &str) -> Result<usize, ObjectsError> {
    loop {
        match file.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(ObjectsError::ReadFile {
                    path: rel.into(),
                    source,
                });
            }
        }
    }
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
