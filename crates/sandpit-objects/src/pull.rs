//! Pull: an image from the store into a new directory, verified, published atomically.
//!
//! The manifest is fetched (bounded) and decoded strictly before anything touches the
//! disk. Then a temporary directory `.sandpit-pull-<pid>-<n>` is made beside the
//! destination (mode 0700), the tree is built in it through `sandpit-fs` handles (every
//! file created with `O_CREAT | O_EXCL | O_NOFOLLOW`), each blob streamed from the store to
//! a writer thread that hashes and counts while it writes (runs of zero 4 KiB blocks
//! become holes, so sparse files stay sparse), checked against the manifest's size and
//! digest, synced, and given its mode; then directories get their modes and are synced,
//! and the temporary directory is renamed onto the destination with `RENAME_NOREPLACE` and
//! the parent synced. Any failure, or dropping the future, removes the temporary directory:
//! the destination either appears complete or not at all.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use rustix::fs::{Mode, RenameFlags};
use sandpit_fs::{InTheWay, TreeDir};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::manifest::{FileEntry, Manifest, Sha256Digest};
use crate::push::blocking;
use crate::{ImageKind, ImageRef, Limits, ObjectsError, Progress, Store};

const DOWNLOAD_CONCURRENCY: usize = 4;
/// Chunks queued between a download and its writer thread.
const QUEUED_CHUNKS: usize = 16;
/// The granularity at which zeros become holes.
const HOLE_BLOCK: usize = 4096;

/// What a pull put on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The kind recorded at push time: a caller that expects, say, a checkpoint should
    /// check it.
    pub kind: ImageKind,
    /// Regular files written.
    pub files: usize,
    /// Subdirectories made (the root not counted).
    pub dirs: usize,
    /// Sum of the file sizes.
    pub bytes: u64,
}

/// Pull `image` from `store` into `dest_dir`, which must not exist yet (its parent must).
///
/// Contract:
/// - The manifest is at most `limits.max_manifest_bytes`, must hash to `image`, and must
///   pass every manifest rule (see [`crate::manifest`]'s docs: normalized relative paths,
///   no duplicates, permission bits only, sizes and counts within `limits`); otherwise
///   [`ObjectsError::BadManifest`] and nothing is written.
/// - Every file's bytes are checked against the manifest's size and sha256 while they
///   stream; a mismatch is [`ObjectsError::SizeMismatch`] / [`ObjectsError::DigestMismatch`].
/// - `dest_dir` appears only complete and durable (files and directories synced, then
///   renamed into place, then the parent synced). On any error, or if the future is
///   dropped, `dest_dir` does not exist afterwards and the temporary directory is removed.
///   An existing `dest_dir` (even one that appears during the pull) is
///   [`ObjectsError::DestExists`] and is left untouched.
/// - Files get the manifest's permission bits and belong to the calling user; times are
///   the time of the pull. A process that crashes mid-pull may leave a
///   `.sandpit-pull-*` directory in the parent, which a node can remove at startup.
pub async fn pull_dir(
    store: &Store,
    image: ImageRef,
    dest_dir: &Path,
    limits: &Limits,
    progress: &Progress,
) -> Result<PulledImage, ObjectsError> {
    let (parent_path, dest_name) = split_dest(dest_dir)?;
    let prepare = |path: &Path, source| ObjectsError::PrepareDest {
        path: path.display().to_string(),
        source,
    };
    let parent = Arc::new(TreeDir::open(&parent_path).map_err(|e| prepare(&parent_path, e))?);
    if parent
        .stat_name(&dest_name)
        .map_err(|e| prepare(dest_dir, e))?
        .is_some()
    {
        return Err(ObjectsError::DestExists {
            path: dest_dir.to_path_buf(),
        });
    }

    let manifest = fetch_manifest(store, image, limits).await?;

    let temp = TempDir::create(parent.clone(), &parent_path)?;
    let tree = Arc::new(temp.open()?);

    // Parents sort before their children, so one pass makes them all.
    let dirs: Vec<String> = manifest.dirs.iter().map(|d| d.path.clone()).collect();
    let tree2 = tree.clone();
    blocking(move || {
        for path in dirs {
            parent_of(&tree2, &path)
                .and_then(|(dir, name)| dir.make_dir(OsStr::new(name), 0o700, InTheWay::Refuse))
                .map_err(|source| ObjectsError::PrepareDest { path, source })?;
        }
        Ok(())
    })
    .await?;

    futures::stream::iter(manifest.files.iter().map(|f| {
        let tree = tree.clone();
        async move { pull_file(store, &tree, f, progress).await }
    }))
    .buffer_unordered(DOWNLOAD_CONCURRENCY)
    .try_collect::<Vec<()>>()
    .await?;

    // Directory modes last (a read-only directory would refuse its own files), deepest
    // first, each synced so the entries written into it are durable.
    let dirs: Vec<(String, u32)> = manifest
        .dirs
        .iter()
        .rev()
        .map(|d| (d.path.clone(), d.mode))
        .chain([(String::new(), manifest.mode)])
        .collect();
    let tree2 = tree.clone();
    blocking(move || {
        for (path, mode) in dirs {
            let dir =
                tree2
                    .open_dir(Path::new(&path))
                    .map_err(|source| ObjectsError::PrepareDest {
                        path: path.clone(),
                        source,
                    })?;
            let write_err = |source: io::Error| ObjectsError::WriteDest {
                path: if path.is_empty() {
                    ".".into()
                } else {
                    path.clone()
                },
                source,
            };
            sandpit_fs::set_attrs(&dir, None, mode, None).map_err(write_err)?;
            rustix::fs::fsync(&dir).map_err(|e| write_err(e.into()))?;
        }
        Ok(())
    })
    .await?;

    temp.publish(&dest_name, dest_dir)?;
    tracing::debug!(%image, dest = %dest_dir.display(), "pulled image");
    Ok(PulledImage {
        kind: manifest.kind,
        files: manifest.files.len(),
        dirs: manifest.dirs.len(),
        bytes: manifest.total_bytes(),
    })
}

/// Fetch and decode the manifest of `image`, reading at most `limits.max_manifest_bytes`.
pub(crate) async fn fetch_manifest(
    store: &Store,
    image: ImageRef,
    limits: &Limits,
) -> Result<Manifest, ObjectsError> {
    let key = store.key(&format!("manifests/sha256/{}", image.hex()));
    let download = |source| ObjectsError::Download {
        key: key.to_string(),
        source,
    };
    let too_large = || ObjectsError::BadManifest {
        image,
        reason: format!(
            "it is larger than the limit of {} bytes",
            limits.max_manifest_bytes
        ),
    };
    let got = match store.inner().get(&key).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Err(ObjectsError::NotFound { image }),
        Err(e) => return Err(download(e)),
    };
    if got.meta.size > limits.max_manifest_bytes {
        return Err(too_large());
    }
    let mut stream = got.into_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(download)?;
        if (bytes.len() + chunk.len()) as u64 > limits.max_manifest_bytes {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Manifest::decode(image, &bytes, limits)
}

/// Create one file of the image in `tree` and fill it from its blob.
async fn pull_file(
    store: &Store,
    tree: &Arc<TreeDir>,
    f: &FileEntry,
    progress: &Progress,
) -> Result<(), ObjectsError> {
    let (tree2, path) = (tree.clone(), f.path.clone());
    let file = blocking(move || {
        parent_of(&tree2, &path)
            .and_then(|(dir, name)| dir.create_file(OsStr::new(name)))
            .map_err(|source| ObjectsError::PrepareDest { path, source })
    })
    .await?;
    let write_err = |source| ObjectsError::WriteDest {
        path: f.path.clone(),
        source,
    };
    let mismatch = |actual: u64| ObjectsError::SizeMismatch {
        path: f.path.clone(),
        expected: f.size,
        actual,
    };

    if f.size == 0 {
        // The manifest rules tie size 0 to the empty digest: nothing to fetch.
        let (mode, path) = (f.mode, f.path.clone());
        return blocking(move || {
            finish_file(&file, 0, mode).map_err(|source| ObjectsError::WriteDest { path, source })
        })
        .await;
    }

    let key = store.key(&format!("blobs/sha256/{}", f.digest.hex()));
    let got = match store.inner().get(&key).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(ObjectsError::BlobMissing {
                digest: f.digest.to_string(),
                path: f.path.clone(),
            });
        }
        Err(source) => {
            return Err(ObjectsError::Download {
                key: key.to_string(),
                source,
            });
        }
    };
    if got.meta.size != f.size {
        return Err(mismatch(got.meta.size));
    }

    let (tx, rx) = mpsc::channel::<Bytes>(QUEUED_CHUNKS);
    let mode = f.mode;
    let writer = tokio::task::spawn_blocking(move || write_blob(file, rx, mode));
    let mut stream = got.into_stream();
    let mut received: u64 = 0;
    let mut failed = None;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(source) => {
                failed = Some(ObjectsError::Download {
                    key: key.to_string(),
                    source,
                });
                break;
            }
        };
        received += chunk.len() as u64;
        if received > f.size {
            failed = Some(mismatch(received));
            break;
        }
        progress.downloaded(chunk.len() as u64);
        if tx.send(chunk).await.is_err() {
            // The writer stopped: its own error says why.
            break;
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|source| ObjectsError::Task { source })?;
    if let Some(e) = failed {
        return Err(e);
    }
    let (digest, size) = written.map_err(write_err)?;
    if size != f.size {
        return Err(mismatch(size));
    }
    if digest != f.digest {
        return Err(ObjectsError::DigestMismatch {
            path: f.path.clone(),
            expected: f.digest.to_string(),
            actual: digest.to_string(),
        });
    }
    progress.blob_downloaded();
    Ok(())
}

/// The writer thread: write what arrives (zero blocks as holes), hash it, then size, sync
/// and chmod the file. Returns the digest and length of what arrived.
fn write_blob(
    file: File,
    mut rx: mpsc::Receiver<Bytes>,
    mode: u32,
) -> io::Result<(Sha256Digest, u64)> {
    let mut hasher = Sha256::new();
    let mut out = SparseWriter::new(file);
    while let Some(chunk) = rx.blocking_recv() {
        hasher.update(&chunk);
        out.write(&chunk)?;
    }
    let (file, len) = out.finish()?;
    finish_file(&file, len, mode)?;
    Ok((Sha256Digest(hasher.finalize().into()), len))
}

/// Set the final length (a trailing hole needs it), sync, then set the mode.
fn finish_file(file: &File, len: u64, mode: u32) -> io::Result<()> {
    file.set_len(len)?;
    file.sync_all()?;
    sandpit_fs::set_attrs(file.as_fd(), None, mode, None)
}

/// Writes a new file from the start, turning whole zero blocks into holes. Chunks arrive
/// at any size, so bytes wait in `pending` until whole blocks can be judged (a block cut
/// by a chunk boundary would otherwise be written in pieces, allocating it).
struct SparseWriter {
    file: File,
    pending: Vec<u8>,
    /// Bytes written or skipped so far; always a multiple of `HOLE_BLOCK` until `finish`.
    done: u64,
}

/// How much a [`SparseWriter`] gathers before writing (a multiple of `HOLE_BLOCK`).
const SPARSE_BATCH: usize = 256 * HOLE_BLOCK;

impl SparseWriter {
    fn new(file: File) -> SparseWriter {
        SparseWriter {
            file,
            pending: Vec::with_capacity(SPARSE_BATCH + (64 << 10)),
            done: 0,
        }
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.pending.extend_from_slice(data);
        if self.pending.len() >= SPARSE_BATCH {
            let whole = self.pending.len() - self.pending.len() % HOLE_BLOCK;
            let pending = std::mem::take(&mut self.pending);
            self.put(&pending[..whole])?;
            self.pending = pending;
            self.pending.drain(..whole);
        }
        Ok(())
    }

    /// Write what is left (a partial last block is written as data) and return the file
    /// and its length. The caller sets the length, which a trailing hole needs.
    fn finish(mut self) -> io::Result<(File, u64)> {
        let pending = std::mem::take(&mut self.pending);
        self.put(&pending)?;
        Ok((self.file, self.done))
    }

    /// Write `data` at the current (block-aligned) position: runs of whole zero blocks
    /// are skipped with a seek, everything else written.
    fn put(&mut self, mut data: &[u8]) -> io::Result<()> {
        let block_kind = |d: &[u8]| d.len() == HOLE_BLOCK && is_zero(d);
        while !data.is_empty() {
            let zero = block_kind(&data[..data.len().min(HOLE_BLOCK)]);
            let mut run = 0;
            while run < data.len() {
                let next = (data.len() - run).min(HOLE_BLOCK);
                if block_kind(&data[run..run + next]) != zero {
                    break;
                }
                run += next;
            }
            if zero {
                self.file.seek(SeekFrom::Current(run as i64))?;
            } else {
                self.file.write_all(&data[..run])?;
            }
            self.done += run as u64;
            data = &data[run..];
        }
        Ok(())
    }
}

fn is_zero(block: &[u8]) -> bool {
    // 16 bytes at a time, then the remainder.
    let mut words = block.chunks_exact(16);
    words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|b| *b == 0)
}

/// The directory holding `rel` inside `tree`, and `rel`'s last name.
fn parent_of<'a>(tree: &TreeDir, rel: &'a str) -> Result<(TreeDir, &'a str), sandpit_fs::FsError> {
    match rel.rsplit_once('/') {
        Some((parent, name)) => Ok((tree.open_dir(Path::new(parent))?, name)),
        None => Ok((tree.open_dir(Path::new(""))?, rel)),
    }
}

/// `dest`'s parent (`.` for a bare name) and its last component, which must be a plain
/// name.
fn split_dest(dest: &Path) -> Result<(PathBuf, std::ffi::OsString), ObjectsError> {
    // The last component as written: `Path` would read `a/b/` or `a/b/.` as `b`.
    let raw = dest.as_os_str().as_encoded_bytes();
    let name = dest.file_name().filter(|name| {
        let n = name.as_encoded_bytes();
        sandpit_fs::check_name(name).is_ok()
            && raw.ends_with(n)
            && (raw.len() == n.len() || raw[raw.len() - n.len() - 1] == b'/')
    });
    let Some(name) = name else {
        return Err(ObjectsError::PrepareDest {
            path: dest.display().to_string(),
            source: sandpit_fs::FsError::BadPath {
                path: dest.display().to_string(),
            },
        });
    };
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_os_string()))
}

/// The temporary directory a pull builds in; removed on drop unless published.
struct TempDir {
    parent: Arc<TreeDir>,
    parent_path: PathBuf,
    name: String,
    published: bool,
}

impl TempDir {
    fn create(parent: Arc<TreeDir>, parent_path: &Path) -> Result<TempDir, ObjectsError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!(".sandpit-pull-{}-{nanos:x}-{n}", std::process::id());
            match rustix::fs::mkdirat(&*parent, name.as_str(), Mode::from_raw_mode(0o700)) {
                Ok(()) => {
                    return Ok(TempDir {
                        parent,
                        parent_path: parent_path.to_path_buf(),
                        name,
                        published: false,
                    });
                }
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => {
                    return Err(ObjectsError::WriteDest {
                        path: parent_path.join(name).display().to_string(),
                        source: e.into(),
                    });
                }
            }
        }
    }

    fn open(&self) -> Result<TreeDir, ObjectsError> {
        self.parent
            .open_dir(Path::new(&self.name))
            .map_err(|source| ObjectsError::PrepareDest {
                path: self.parent_path.join(&self.name).display().to_string(),
                source,
            })
    }

    /// Rename onto `dest_name` (never replacing anything) and sync the parent.
    fn publish(mut self, dest_name: &OsStr, dest: &Path) -> Result<(), ObjectsError> {
        match rustix::fs::renameat_with(
            &*self.parent,
            self.name.as_str(),
            &*self.parent,
            dest_name,
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => self.published = true,
            Err(rustix::io::Errno::EXIST) => {
                return Err(ObjectsError::DestExists {
                    path: dest.to_path_buf(),
                });
            }
            Err(e) => {
                return Err(ObjectsError::WriteDest {
                    path: dest.display().to_string(),
                    source: e.into(),
                });
            }
        }
        rustix::fs::fsync(&*self.parent).map_err(|e| ObjectsError::WriteDest {
            path: self.parent_path.display().to_string(),
            source: e.into(),
        })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.published
            && let Err(e) = self.parent.remove(OsStr::new(&self.name))
        {
            tracing::warn!(
                dir = %self.parent_path.join(&self.name).display(),
                error = %e,
                "removing a failed pull's temporary directory"
            );
        }
    }
}

#[cfg(test)]
mod tests {
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
    }

    #[test]
    fn sparse_writes_keep_content_and_make_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut data = vec![0u8; 1 << 20];
        data[10] = 1; // the first block has data
        data[(1 << 20) - 1] = 2; // so does the last
        let f = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        // Odd-sized chunks, so blocks straddle chunk boundaries.
        let mut w = SparseWriter::new(f);
        for chunk in data.chunks(5000) {
            w.write(chunk).unwrap();
        }
        let (f, len) = w.finish().unwrap();
        assert_eq!(len, data.len() as u64);
        f.set_len(len).unwrap();
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap(), data);
        let st = rustix::fs::stat(&path).unwrap();
        // Most of the MiB is holes (on file systems that support them).
        assert!(
            (st.st_blocks as u64) * 512 < (1 << 20) / 2,
            "{} blocks",
            st.st_blocks
        );
    }

    #[test]
    fn dest_must_end_in_a_plain_name() {
        assert!(split_dest(Path::new("/a/b")).is_ok());
        assert_eq!(split_dest(Path::new("b")).unwrap().0, PathBuf::from("."));
        for bad in ["/", "/a/..", "/a/.", "/a/b/", ""] {
            assert!(split_dest(Path::new(bad)).is_err(), "{bad}");
        }
    }
}
