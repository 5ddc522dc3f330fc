//! A node's image directories (gVisor checkpoint images of hibernated sandboxes, named
//! snapshots, template layers) to and from object storage, content-addressed (DESIGN §7).
//!
//! Layout under the store's prefix:
//! - `blobs/sha256/<hex>`: one chunk's bytes, named by their sha256; shared by every image
//!   (and every node) that holds the same bytes.
//! - `manifests/sha256/<hex>`: an image's manifest (JSON, format 2: its kind, its chunk
//!   size, the root's mode, its directories and files with mode, size and the digests of
//!   their non-zero chunks), named by its own sha256. That digest is the [`ImageRef`].
//!
//! Files are stored in fixed-size chunks ([`manifest::DEFAULT_CHUNK_BYTES`], 4 MiB), each
//! a blob. A chunk that is all zeros is stored nowhere: the manifest omits it, and it is a
//! hole. That is what makes a sparse disk image cheap: a `disk.img` of 10 GiB apparent
//! size holding 20 MiB of data is read, hashed and uploaded as about 20 MiB (the push asks
//! the file system where the data is with `SEEK_DATA`/`SEEK_HOLE`), and pulled back as a
//! sparse file of 10 GiB with about 20 MiB allocated. It also makes repeated pushes cheap:
//! hibernating the same sandbox again uploads only the chunks that changed.
//!
//! [`push_dir`] walks a node-owned directory through `sandpit-fs` handles and uploads the
//! chunks the store lacks, then the manifest. [`pull_dir`] verifies every chunk against the
//! manifest before writing it at its offset in a temporary directory beside the
//! destination, and renames that into place only when it is complete. Manifests are decoded
//! fail-closed (DESIGN §7a): whatever is in the bucket, a pull never writes outside its
//! destination, never follows a symlink, and never publishes data that does not match the
//! reference. [`gc`] keeps every chunk some manifest names.
//!
//! Neither direction reads a whole file into memory: a few chunks are in flight at once,
//! each uploaded in a single PUT (chunks are far below S3's 5 GiB single-PUT limit).

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
