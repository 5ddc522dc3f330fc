//! Images and templates' file systems: OCI pull and unpack into content-addressed layers,
//! a Dockerfile parser, and the layered, cached build that turns a Dockerfile into layers
//! plus an image config.
//!
//! Layers are plain directories in overlayfs format (whiteouts are 0/0 character devices,
//! opaque directories carry `trusted.overlay.opaque=y`), so a runtime stacks them as
//! overlay lower directories as they are. Nothing here boots a sandbox: a build's `RUN`
//! steps go through a [`build::StepRunner`] the server implements.
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        reason = "unit tests build host-side fixtures by path"
    )
)]

pub mod build;
/// The image config format (its own crate, so the control layer reads it without the
/// registry client).
pub use sandpit_image_config as config;
pub mod dockerfile;
pub mod gc;
pub mod ignore;
pub mod pack;
mod proxy;
pub mod registry;
pub mod store;
pub mod toolchain;
pub mod unpack;

pub use build::{BuildEvent, BuildOutcome, Builder, StepRunner};
pub use config::{ImageConfig, ReadyCheck};
pub use registry::{PullOptions, PulledImage, RegistryCredentials};
pub use store::{LayerId, LayerStore};

use std::path::PathBuf;

/// Errors of image pulls, unpacking and builds.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    #[error("pulling {reference}: {detail}")]
    Pull { reference: String, detail: String },
    #[error("unpacking layer {layer}: {detail}")]
    Unpack { layer: String, detail: String },
    #[error("packing layer {layer}: {detail}")]
    Pack { layer: String, detail: String },
    #[error("archive entry {path:?} would escape the layer")]
    UnsafePath { path: String },
    #[error("{what}: {source}")]
    Tree {
        what: String,
        source: sandpit_fs::FsError,
    },
    #[error("the archive is over the limit of {limit} (archive_too_large)")]
    ArchiveTooLarge { limit: String },
    #[error("{what} at {path}")]
    Files {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Dockerfile line {line}: {message}")]
    Dockerfile { line: usize, message: String },
    #[error("step {step} (line {line}) `{instruction}`: {message}")]
    Step {
        step: usize,
        line: usize,
        instruction: String,
        message: String,
    },
    #[error(
        "step {step} (line {line}) `{instruction}` failed with exit code {exit_code}; its output:\n{output}"
    )]
    RunFailed {
        step: usize,
        line: usize,
        instruction: String,
        exit_code: i32,
        output: String,
    },
    #[error("running a build step: {0}")]
    Runner(String),
    #[error("the build was cancelled")]
    Cancelled,
}

impl ImageError {
    pub(crate) fn files(
        what: impl Into<String>,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> ImageError {
        let (what, path) = (what.into(), path.into());
        move |source| ImageError::Files { what, path, source }
    }
}

/// The OCI client this crate uses (for tests and tools that push images).
pub use oci_client;
