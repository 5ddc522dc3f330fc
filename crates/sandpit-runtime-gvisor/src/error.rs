//! Errors of the gVisor backend outside the [`sandpit_runtime::Runtime`] trait.

use std::path::PathBuf;

use sandpit_runtime::RuntimeError;

/// Host checks, configuration and maintenance helpers of [`crate::GvisorRuntime`].
#[derive(Debug, thiserror::Error)]
pub enum GvisorError {
    #[error("cannot run {program} (is it installed and on PATH?)")]
    ToolMissing {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    ToolFailed { command: String, stderr: String },
    #[error("host requirement not met: {reason}")]
    Host { reason: String },
    #[error("invalid gVisor configuration: {reason}")]
    Config { reason: String },
    #[error("creating the runsc state directory {path}")]
    RootDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}
