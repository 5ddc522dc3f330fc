//! A node's image directories (gVisor checkpoint images of hibernated sandboxes, named
//! snapshots, template layers) to and from object storage, content-addressed (DESIGN §7).
//!
//! Layout under the store's prefix:
//! - `blobs/sha256/<hex>`: one file's bytes, named by their sha256; shared by every image
//!   (and every node) that holds the same bytes.
//! - `manifests/sha256/<hex>`: an image's manifest (JSON, format 1: its kind, the root's
//!   mode, its directories and files with mode, size and digest), named by its own sha256.
//!   That digest is the [`ImageRef`].
//!
//! [`push_dir`] walks a node-owned directory through `sandpit-fs` handles and uploads the
//! blobs the store lacks, then the manifest. [`pull_dir`] verifies every byte against the
//! manifest while streaming it into a temporary directory beside the destination, and
//! renames that into place only when it is complete. Manifests are decoded fail-closed
//! (DESIGN §7a): whatever is in the bucket, a pull never writes outside its destination,
//! never follows a symlink, and never publishes data that does not match the reference.
//!
//! Neither direction reads a whole file into memory: files stream through bounded buffers,
//! large ones as multipart uploads.

#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        reason = "unit tests build host-side fixtures by path"
    )
)]

mod error;
mod images;
pub mod manifest;
mod progress;
mod pull;
mod push;
mod store;

pub use error::ObjectsError;
pub use images::{GcReport, delete_manifest, gc, has};
pub use manifest::{ImageKind, ImageRef, Limits};
pub use progress::{Progress, ProgressCounts};
pub use pull::{PulledImage, pull_dir};
pub use push::push_dir;
pub use store::{S3Credentials, Store, StoreOptions, StoreUrl};
