//! The crate's one error type: one variant per failed operation, carrying what it was doing.
//!
//! No message contains a credential: the store URL never carries one (it is refused at parse
//! time), credentials are never formatted, and URL errors name the part that is wrong
//! rather than echoing it.

use std::io;
use std::path::PathBuf;

use crate::ImageRef;

/// What went wrong while configuring a store, pushing, pulling or collecting garbage.
#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    /// The store URL does not parse or breaks a rule (scheme, bucket, prefix, parameters,
    /// plain HTTP to a non-loopback endpoint). The reason never repeats the URL.
    #[error("invalid object store URL: {reason}")]
    InvalidUrl { reason: String },

    /// A string that should be an image reference (`sha256:<64 lowercase hex>`) is not one.
    #[error("invalid image reference: {reason}")]
    InvalidRef { reason: &'static str },

    /// The `file://` store's root directory could not be created or opened.
    #[error("opening the local object store root {path}")]
    CreateRoot {
        path: PathBuf,
        #[source]
        source: sandpit_fs::FsError,
    },

    /// The backend client could not be built from the configuration.
    #[error("configuring the object store {store}")]
    OpenStore {
        store: String,
        #[source]
        source: object_store::Error,
    },

    /// Walking or opening an entry of the directory being pushed failed.
    #[error("reading {path} in the directory to push")]
    ReadSource {
        path: String,
        #[source]
        source: sandpit_fs::FsError,
    },

    /// Reading a file's bytes for hashing or upload failed.
    #[error("reading {path} in the directory to push")]
    ReadFile {
        path: String,
        #[source]
        source: io::Error,
    },

    /// The directory to push holds something an image cannot carry (a symlink, a special
    /// file, set-id or sticky bits, a name that is not UTF-8 or too long).
    #[error("{path} in the directory to push: {what} cannot be carried")]
    Unsupported { path: String, what: &'static str },

    /// A size or count bound was exceeded (on push, or by a manifest on pull).
    #[error("{what} is over the limit of {limit}")]
    TooLarge { what: String, limit: u64 },

    /// A file's size, change time or identity changed while it was being pushed (or it
    /// got shorter than it said); no manifest is written.
    #[error("{path} changed while it was being pushed")]
    Changed { path: String },

    /// Asking the store whether an object exists failed.
    #[error("checking for {key} in the object store")]
    Head {
        key: String,
        #[source]
        source: object_store::Error,
    },

    /// Writing an object to the store failed.
    #[error("uploading {key}")]
    Upload {
        key: String,
        #[source]
        source: object_store::Error,
    },

    /// Reading an object from the store failed (other than it being absent).
    #[error("downloading {key}")]
    Download {
        key: String,
        #[source]
        source: object_store::Error,
    },

    /// Deleting an object from the store failed.
    #[error("deleting {key}")]
    Delete {
        key: String,
        #[source]
        source: object_store::Error,
    },

    /// Listing objects under a prefix failed.
    #[error("listing {prefix}")]
    List {
        prefix: String,
        #[source]
        source: object_store::Error,
    },

    /// The store has no manifest for this image.
    #[error("image {image} is not in the object store")]
    NotFound { image: ImageRef },

    /// A manifest names a blob the store does not have.
    #[error("blob {digest} (for {path}) is not in the object store")]
    BlobMissing { digest: String, path: String },

    /// A manifest failed to decode or broke a rule; nothing was written.
    #[error("manifest of {image} refused: {reason}")]
    BadManifest { image: ImageRef, reason: String },

    /// A downloaded chunk's sha256 is not the one its manifest names.
    #[error("{path} at offset {offset}: content has digest {actual}, the manifest says {expected}")]
    DigestMismatch {
        path: String,
        offset: u64,
        expected: String,
        actual: String,
    },

    /// A downloaded chunk's length is not the one its manifest implies (`chunk_bytes`, or
    /// what is left of the file for its last chunk).
    #[error("{path} at offset {offset}: {actual} bytes arrived, the manifest says {expected}")]
    SizeMismatch {
        path: String,
        offset: u64,
        expected: u64,
        actual: u64,
    },

    /// The pull destination already exists (a pull only ever creates a new directory).
    #[error("destination {path} already exists")]
    DestExists { path: PathBuf },

    /// The destination's parent could not be opened, or an entry could not be made in the
    /// temporary directory.
    #[error("preparing {path} for the pulled image")]
    PrepareDest {
        path: String,
        #[source]
        source: sandpit_fs::FsError,
    },

    /// Writing, syncing or publishing the pulled image failed.
    #[error("writing {path} of the pulled image")]
    WriteDest {
        path: String,
        #[source]
        source: io::Error,
    },

    /// A blocking file task panicked or was cancelled.
    #[error("a blocking file task ended abnormally")]
    Task {
        #[source]
        source: tokio::task::JoinError,
    },
}
