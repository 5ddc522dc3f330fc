//! The error type of `sandpit-net`.

use std::path::PathBuf;

/// Everything that can go wrong setting up or tearing down sandbox networking.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid network prefix {prefix:?}: {reason}")]
    InvalidPrefix { prefix: String, reason: String },
    #[error("invalid address pool {pool}: {reason}")]
    InvalidPool { pool: String, reason: String },
    #[error("invalid CIDR {input:?}: {reason}")]
    InvalidCidr { input: String, reason: String },
    #[error("invalid egress rules: {reason}")]
    InvalidRules { reason: String },
    #[error("slot {slot} is outside the address pool (capacity {capacity})")]
    SlotOutOfRange { slot: u32, capacity: u32 },
    #[error("slot {slot} is in use: {what} already exists")]
    SlotBusy { slot: u32, what: String },
    #[error("nftables table inet {table} does not exist: call Network::init first")]
    NotInitialized { table: String },
    #[error("slot {slot} is not attached (no nft chain {chain})")]
    NotAttached { slot: u32, chain: String },
    #[error("spawning {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("parsing the output of {command}")]
    Output {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("setting sysctl {key}")]
    Sysctl {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The dialer would not connect there (see [`crate::dial`]).
    #[error("{0}")]
    Refused(crate::dial::Refusal),
    #[error("resolving {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("connecting to {target}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {reason}")]
    Certificate { what: String, reason: String },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
