//! Hibernated sandboxes, named snapshots and template layers in object storage, so any
//! node can wake, or start sandboxes from, what another node made.
//!
//! After a suspend, a node uploads the sandbox's image in the background: its memory image
//! and its files (what [`sandpit_runtime::Runtime::pack_files`] carries), as one directory
//! pushed through an [`ImageStore`]. The row records the upload's progress as a
//! [`RemoteImage`]: `uploading`, then `stored` (with the image's reference and the runtime
//! build that wrote the memory image), or `failed`, or `unsupported` (files that cannot
//! move). The suspend answers before the upload starts, so its latency stays local.
//!
//! Who may use a stored image: the owner wakes from its local files, as always. Another node
//! takes the sandbox over ([`crate::node::moves`]) only while it is suspended and its owner
//! is lost (its lease lapsed) or draining: it fetches the image, then moves the row to
//! itself with one conditional UPDATE, so of several nodes only one ever takes it. A memory
//! image restores only under the runtime build that wrote it; under another, the sandbox
//! boots from its files and its note says so.
//!
//! Named snapshots and template layers go the same way ([`crate::node::stored`]): uploaded
//! in the background once made, recorded in their rows (a snapshot's `remote_image`, a
//! layer's `stored_layers` row), fetched by a node that lacks them before it starts a
//! sandbox from them.
//!
//! Integrity: the reference is a content digest recorded in the database, and the store
//! verifies every byte it fetches against it, so a bucket's content cannot make a node
//! restore anything but what a node pushed for this sandbox.

use std::path::Path;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Where images go: object storage (the CLI wires `sandpit-objects`), or a fake in tests.
#[async_trait]
pub trait ImageStore: Send + Sync + 'static {
    /// Upload the node-owned directory `dir` (regular files and directories only) as an
    /// image of kind `kind` and return its reference: an opaque string of at most
    /// [`MAX_REFERENCE`] bytes that [`ImageStore::pull`] accepts. Content-addressed: what
    /// the store holds already is not sent again.
    async fn push(&self, dir: &Path, kind: ImageKind) -> Result<Pushed, BoxError>;

    /// Fetch image `reference` into the missing directory `dest` (created complete or not
    /// at all: a failed pull leaves nothing). Every byte is verified against the reference,
    /// and an image pushed as another kind than `kind` is refused. Returns the bytes
    /// fetched.
    async fn pull(&self, reference: &str, dest: &Path, kind: ImageKind) -> Result<u64, BoxError>;

    /// Upload template layer `layer` (a tenant-made tree in overlayfs format: symlinks,
    /// odd modes, whiteouts) as one image of kind [`ImageKind::Layer`] and return its
    /// reference. The tree is read through handles only, never following a symlink, and
    /// packed into the missing, node-owned directory `staging` first (the caller removes
    /// it). A tree that could not come back the same is refused.
    async fn push_layer(&self, layer: &Path, staging: &Path) -> Result<Pushed, BoxError>;

    /// Fetch layer `reference` (verified as [`ImageStore::pull`] does, through the
    /// missing, node-owned directory `staging`, which the caller removes) and unpack it
    /// into the missing directory `dest` with the hardened unpacker and its limits:
    /// complete or, on failure, absent. Returns the bytes fetched.
    async fn pull_layer(
        &self,
        reference: &str,
        dest: &Path,
        staging: &Path,
    ) -> Result<u64, BoxError>;

    /// Drop image `reference` (its manifest; the bytes it shares with other images stay
    /// until the store's collection finds them unreferenced). Idempotent.
    async fn forget(&self, reference: &str) -> Result<(), BoxError>;
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What an image holds, recorded with it, so a reference recorded for one use is never
/// fetched for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// A hibernated sandbox: its memory image and files ([`crate::node::moves`]).
    Hibernation,
    /// A named snapshot: its memory image and files ([`crate::node::stored`]).
    Snapshot,
    /// A template layer, packed as one archive ([`crate::node::stored`]).
    Layer,
    /// A volume's disk image, moved off a draining node ([`crate::node::volumes`]).
    Volume,
}

/// Longest reference an [`ImageStore`] may return.
pub const MAX_REFERENCE: usize = 256;

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub reference: String,
    /// Bytes of the image (holes excluded where the store skips them).
    pub bytes: u64,
    /// Bytes actually sent (the rest was in the store already).
    pub uploaded: u64,
}

/// How far a suspended sandbox's image got into object storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteState {
    /// Being uploaded: the sandbox wakes only on its node meanwhile.
    Uploading,
    /// In object storage: any node may wake it once its own node is lost or draining.
    Stored,
    /// The upload failed (`error` says why): it wakes only on its node.
    Failed,
    /// Its files cannot move (not on a disk image): it wakes only on its node.
    Unsupported,
}

impl RemoteState {
    pub fn as_str(self) -> &'static str {
        match self {
            RemoteState::Uploading => "uploading",
            RemoteState::Stored => "stored",
            RemoteState::Failed => "failed",
            RemoteState::Unsupported => "unsupported",
        }
    }
}

/// The row's record of one suspension's image (stored as JSON, decoded fail-closed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteImage {
    pub state: RemoteState,
    /// This upload's id: a later record of the same sandbox never matches an earlier one.
    pub upload: String,
    /// With `stored`: what [`ImageStore::pull`] takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The runtime build that wrote the memory image ([`sandpit_runtime::Runtime::build`]).
    pub runtime: String,
    /// Whether the image holds memory (a suspend whose checkpoint failed holds files only).
    pub memory: bool,
    /// With `stored`: the image's bytes, and how many this upload sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded: Option<u64>,
    /// With `failed` or `unsupported`: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When this state was recorded (ms since the epoch).
    pub at: i64,
}

impl RemoteImage {
    /// The API's view of it.
    pub fn to_api(&self) -> sandpit_api_types::SandboxImage {
        sandpit_api_types::SandboxImage {
            remote: self.state.as_str().to_string(),
            runtime: self.runtime.clone(),
            memory: self.memory,
            bytes: self.bytes,
            error: self.error.clone(),
        }
    }
}

/// Whether `reference` is one a pull may be asked for: bounded, printable ASCII (what
/// [`ImageStore::push`] promises; checked again on what the store hands back).
pub fn valid_reference(reference: &str) -> bool {
    !reference.is_empty()
        && reference.len() <= MAX_REFERENCE
        && reference.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_refuses_unknown_fields() {
        let r = RemoteImage {
            state: RemoteState::Stored,
            upload: "u1".into(),
            reference: Some("sha256:ab".into()),
            runtime: "runsc version 1".into(),
            memory: true,
            bytes: Some(10),
            uploaded: Some(4),
            error: None,
            at: 5,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<RemoteImage>(&json).unwrap(), r);
        let extra = json.replace("\"at\":5", "\"at\":5,\"x\":1");
        assert!(serde_json::from_str::<RemoteImage>(&extra).is_err());
        let state = json.replace("stored", "teleported");
        assert!(serde_json::from_str::<RemoteImage>(&state).is_err());
    }

    #[test]
    fn references_are_bounded_printable_ascii() {
        assert!(valid_reference("sha256:0123abcd"));
        assert!(!valid_reference(""));
        assert!(!valid_reference("a b"));
        assert!(!valid_reference("a\nb"));
        assert!(!valid_reference("é"));
        assert!(!valid_reference(&"a".repeat(MAX_REFERENCE + 1)));
    }
}
