//! Counters a push or pull advances as it goes, for a caller to read (from another task,
//! while the transfer runs) and turn into MB/s.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Running totals of one or more transfers. Clones share the same counters: keep one, hand
/// `&progress` to a transfer, and read [`Progress::counts`] at any time (every counter only
/// grows). One `Progress` may serve several transfers, whose counts then add up.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    bytes_hashed: AtomicU64,
    bytes_uploaded: AtomicU64,
    bytes_downloaded: AtomicU64,
    blobs_uploaded: AtomicU64,
    blobs_present: AtomicU64,
    blobs_downloaded: AtomicU64,
    bytes_in_holes: AtomicU64,
    bytes_present: AtomicU64,
}

/// A copy of a [`Progress`]'s counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgressCounts {
    /// Bytes of local files a push read and hashed: the chunks that hold data on disk
    /// (a hole the file system reports is never read).
    pub bytes_hashed: u64,
    /// Bytes handed to the store in chunk uploads (the manifest is not counted).
    pub bytes_uploaded: u64,
    /// Chunk bytes received from the store by a pull (all verified before being written).
    pub bytes_downloaded: u64,
    /// Chunk blobs a push uploaded.
    pub blobs_uploaded: u64,
    /// Chunk blobs a push found already in the store (of the right size), or already
    /// handled earlier in the same push, and did not upload.
    pub blobs_present: u64,
    /// Chunk blobs a pull downloaded (holes and empty files need none).
    pub blobs_downloaded: u64,
    /// Bytes of files in all-zero chunks: a push stores them nowhere (whether the file
    /// system reported a hole or the chunk read back as zeros), a pull leaves them holes.
    pub bytes_in_holes: u64,
    /// Bytes of the chunks counted in `blobs_present`.
    pub bytes_present: u64,
}

impl Progress {
    /// New counters, all zero.
    pub fn new() -> Progress {
        Progress::default()
    }

    /// The counters now.
    pub fn counts(&self) -> ProgressCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &*self.counters;
        ProgressCounts {
            bytes_hashed: get(&c.bytes_hashed),
            bytes_uploaded: get(&c.bytes_uploaded),
            bytes_downloaded: get(&c.bytes_downloaded),
            blobs_uploaded: get(&c.blobs_uploaded),
            blobs_present: get(&c.blobs_present),
            blobs_downloaded: get(&c.blobs_downloaded),
            bytes_in_holes: get(&c.bytes_in_holes),
            bytes_present: get(&c.bytes_present),
        }
    }

    pub(crate) fn hashed(&self, n: u64) {
        self.counters.bytes_hashed.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn uploaded(&self, n: u64) {
        self.counters.bytes_uploaded.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn downloaded(&self, n: u64) {
        self.counters
            .bytes_downloaded
            .fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn blob_uploaded(&self) {
        self.counters.blobs_uploaded.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn blob_present(&self, bytes: u64) {
        self.counters.blobs_present.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_present
            .fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn in_holes(&self, n: u64) {
        self.counters.bytes_in_holes.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn blob_downloaded(&self) {
        self.counters
            .blobs_downloaded
            .fetch_add(1, Ordering::Relaxed);
    }
}
