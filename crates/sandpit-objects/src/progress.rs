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
}

/// A copy of a [`Progress`]'s counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgressCounts {
    /// Bytes of local files read and hashed by a push before any upload (the first pass).
    pub bytes_hashed: u64,
    /// Bytes handed to the store in blob uploads (the manifest is not counted).
    pub bytes_uploaded: u64,
    /// Blob bytes received from the store and written by a pull.
    pub bytes_downloaded: u64,
    /// Blobs a push uploaded.
    pub blobs_uploaded: u64,
    /// Blobs a push found already in the store (of the right size) and skipped.
    pub blobs_present: u64,
    /// Blobs a pull downloaded (empty files need none).
    pub blobs_downloaded: u64,
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

    pub(crate) fn blob_present(&self) {
        self.counters.blobs_present.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn blob_downloaded(&self) {
        self.counters
            .blobs_downloaded
            .fetch_add(1, Ordering::Relaxed);
    }
}
