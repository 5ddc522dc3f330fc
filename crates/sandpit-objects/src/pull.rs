//! Pull: an image from the store into a new directory, verified, published atomically.
//!
//! The manifest is fetched (bounded) and decoded strictly before anything touches the
//! disk. Then a temporary directory `.sandpit-pull-<pid>-<n>` is made beside the
//! destination (mode 0700), the tree is built in it through `sandpit-fs` handles (every
//! file created with `O_CREAT | O_EXCL | O_NOFOLLOW`). Each file is created at its full
//! size (`set_len`: all holes), then each of its stored chunks is downloaded into memory,
//! checked against the length the manifest implies and its digest, and only then written
//! at its offset (`pwrite`), skipping the 4 KiB blocks that are zeros; chunks the manifest
//! omits stay holes, so a sparse file comes back sparse. Files are then synced and given
//! their modes, directories get theirs and are synced, and the temporary directory is
//! renamed onto the destination with `RENAME_NOREPLACE` and the parent synced. Any
//! failure, or dropping the future, removes the temporary directory: the destination
//! either appears complete or not at all.
//!
//! A few files and a few chunks per file download at once, under one budget of chunks in
//! memory (`PULL_MEMORY` / `chunk_bytes`, at least one), so memory stays bounded whatever
//! the manifest says.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use rustix::fs::{Mode, RenameFlags};
use sandpit_fs::{InTheWay, TreeDir};
use tokio::sync::Semaphore;

use crate::manifest::{Chunk, FileEntry, Manifest, Sha256Digest};
use crate::push::{blocking, is_zero};
use crate::{ImageKind, ImageRef, Limits, ObjectsError, Progress, Store};

/// Files being filled at once.
const FILES_AT_ONCE: usize = 4;
/// Chunks of one file downloading at once.
const CHUNKS_PER_FILE: usize = 4;
/// Most chunks downloading at once over all files.
const MAX_CHUNKS_IN_FLIGHT: u64 = 8;
/// Chunk bytes a pull holds in memory at once (at least one chunk, however large).
const PULL_MEMORY: u64 = 32 << 20;
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
/// - Every chunk's bytes are checked against the length the manifest implies and its
///   sha256 before they are written; a mismatch is [`ObjectsError::SizeMismatch`] /
///   [`ObjectsError::DigestMismatch`]. Chunks the manifest omits are holes: the file is
///   created at its size and they are never written, so the pulled file is sparse.
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

    let chunk_bytes = manifest.chunk_bytes;
    let in_flight =
        Semaphore::new((PULL_MEMORY / chunk_bytes).clamp(1, MAX_CHUNKS_IN_FLIGHT) as usize);
    // Collected first: a stream over a closure borrowing the manifest makes the future
    // unprovably `Send` (rustc's higher-ranked lifetime limitation), which callers need.
    let files: Vec<_> = manifest
        .files
        .iter()
        .map(|f| {
            let tree = tree.clone();
            let in_flight = &in_flight;
            async move { pull_file(store, &tree, f, chunk_bytes, in_flight, progress).await }
        })
        .collect();
    futures::stream::iter(files)
        .buffer_unordered(FILES_AT_ONCE)
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

/// Create one file of the image in `tree` at its size and fill in its stored chunks.
async fn pull_file(
    store: &Store,
    tree: &Arc<TreeDir>,
    f: &FileEntry,
    chunk_bytes: u64,
    in_flight: &Semaphore,
    progress: &Progress,
) -> Result<(), ObjectsError> {
    let (tree2, path, size) = (tree.clone(), f.path.clone(), f.size);
    let file = blocking(move || {
        let file = parent_of(&tree2, &path)
            .and_then(|(dir, name)| dir.create_file(OsStr::new(name)))
            .map_err(|source| ObjectsError::PrepareDest {
                path: path.clone(),
                source,
            })?;
        file.set_len(size)
            .map_err(|source| ObjectsError::WriteDest { path, source })?;
        Ok(file)
    })
    .await?;
    let file = Arc::new(file);

    let chunks: Vec<_> = f
        .chunks
        .iter()
        .map(|c| {
            let file = file.clone();
            async move { pull_chunk(store, file, f, *c, chunk_bytes, in_flight, progress).await }
        })
        .collect();
    futures::stream::iter(chunks)
        .buffer_unordered(CHUNKS_PER_FILE)
        .try_collect::<Vec<()>>()
        .await?;
    let stored: u64 = f
        .chunks
        .iter()
        .map(|c| f.chunk_len(c.offset, chunk_bytes))
        .sum();
    progress.in_holes(f.size - stored);

    let (mode, path) = (f.mode, f.path.clone());
    blocking(move || {
        finish_file(&file, mode).map_err(|source| ObjectsError::WriteDest { path, source })
    })
    .await
}

/// Download one chunk, check its length and digest, then write it in place.
async fn pull_chunk(
    store: &Store,
    file: Arc<File>,
    f: &FileEntry,
    c: Chunk,
    chunk_bytes: u64,
    in_flight: &Semaphore,
    progress: &Progress,
) -> Result<(), ObjectsError> {
    let _permit = in_flight
        .acquire()
        .await
        .expect("the semaphore is never closed");
    let len = f.chunk_len(c.offset, chunk_bytes);
    let mismatch = |actual: u64| ObjectsError::SizeMismatch {
        path: f.path.clone(),
        offset: c.offset,
        expected: len,
        actual,
    };
    let key = store.key(&format!("blobs/sha256/{}", c.digest.hex()));
    let download = |source| ObjectsError::Download {
        key: key.to_string(),
        source,
    };
    let got = match store.inner().get(&key).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(ObjectsError::BlobMissing {
                digest: c.digest.to_string(),
                path: f.path.clone(),
            });
        }
        Err(source) => return Err(download(source)),
    };
    if got.meta.size != len {
        return Err(mismatch(got.meta.size));
    }
    // `len` is at most `chunk_bytes`, which the manifest rules bound (64 MiB).
    let mut buf = Vec::with_capacity(len as usize);
    let mut stream = got.into_stream();
    while let Some(part) = stream.next().await {
        let part = part.map_err(download)?;
        if (buf.len() + part.len()) as u64 > len {
            return Err(mismatch((buf.len() + part.len()) as u64));
        }
        buf.extend_from_slice(&part);
    }
    if buf.len() as u64 != len {
        return Err(mismatch(buf.len() as u64));
    }
    let actual = Sha256Digest::of(&buf);
    if actual != c.digest {
        return Err(ObjectsError::DigestMismatch {
            path: f.path.clone(),
            offset: c.offset,
            expected: c.digest.to_string(),
            actual: actual.to_string(),
        });
    }
    progress.downloaded(len);
    let path = f.path.clone();
    let offset = c.offset;
    blocking(move || {
        write_sparse_at(&file, &buf, offset)
            .map_err(|source| ObjectsError::WriteDest { path, source })
    })
    .await?;
    progress.blob_downloaded();
    Ok(())
}

/// Write `data` at `offset` of a file that is all holes there, leaving the 4 KiB blocks
/// that are zeros unwritten (holes). `offset` is a multiple of `HOLE_BLOCK` (chunk sizes
/// are), so blocks line up with the file system's.
fn write_sparse_at(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    let mut at = 0;
    while at < data.len() {
        let block = |i: usize| &data[i..(i + HOLE_BLOCK).min(data.len())];
        let zero = is_zero(block(at));
        let mut end = at;
        while end < data.len() && is_zero(block(end)) == zero {
            end = (end + HOLE_BLOCK).min(data.len());
        }
        if !zero {
            file.write_all_at(&data[at..end], offset + at as u64)?;
        }
        at = end;
    }
    Ok(())
}

/// Sync the file, then set its mode.
fn finish_file(file: &File, mode: u32) -> io::Result<()> {
    file.sync_all()?;
    sandpit_fs::set_attrs(file.as_fd(), None, mode, None)
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
    fn sparse_writes_keep_content_and_make_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut data = vec![0u8; 1 << 20];
        data[10] = 1; // the first block has data
        data[(1 << 20) - 1] = 2; // so does the last
        data[300_000..300_100].fill(3); // and one in the middle
        let f = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let size = 3u64 << 20;
        f.set_len(size).unwrap();
        write_sparse_at(&f, &data, 1 << 20).unwrap();
        // A short last chunk whose tail block is partial.
        write_sparse_at(&f, &[9; 5000], size - 5000).unwrap();
        drop(f);
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len() as u64, size);
        assert!(is_zero(&back[..1 << 20]));
        assert_eq!(&back[1 << 20..2 << 20], &data[..]);
        assert!(is_zero(&back[2 << 20..size as usize - 5000]));
        assert!(back[size as usize - 5000..].iter().all(|b| *b == 9));
        let st = rustix::fs::stat(&path).unwrap();
        // Only the blocks with data are allocated (on file systems with holes).
        assert!(
            (st.st_blocks as u64) * 512 <= 8 * 4096,
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
