//! The control layer's one error type. The HTTP edge maps it to a status and a code once;
//! nothing here knows what a status code is.

/// What went wrong in the control layer.
///
/// `Invalid`, `Conflict` and `Quota` carry a stable machine-readable `code` (the one the
/// client sees); their `message` is safe to show. `Store`, `Migrate` and `Corrupt` are
/// internal: their details go to the log, the client learns only a code.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such object in the caller's scope (`code`: e.g. `sandbox_not_found`).
    #[error("{code}: {message}")]
    NotFound { code: &'static str, message: String },
    /// The caller may not do this to an object it sees (`code`: e.g. `template_builtin`).
    #[error("{code}: {message}")]
    Forbidden { code: &'static str, message: String },
    /// The object's state does not allow the operation (e.g. `sandbox_not_running`).
    #[error("{code}: {message}")]
    Conflict { code: &'static str, message: String },
    /// The request breaks a rule, checked before anything changed.
    #[error("{code}: {message}")]
    Invalid { code: &'static str, message: String },
    /// A per-workspace limit is reached.
    #[error("{code}: {message}")]
    Quota { code: &'static str, message: String },
    /// A per-workspace limit on what a workspace keeps (templates, snapshots, suspended
    /// sandboxes) is reached: nothing frees it but the tenant deleting something.
    #[error("workspace limit {limit} = {value} reached: {what}")]
    Kept {
        limit: &'static str,
        value: u32,
        what: String,
    },
    /// A per-workspace limit on work under way (concurrent template builds) is reached: it
    /// frees itself when the work ends, so the caller may retry.
    #[error("workspace limit {limit} = {value} reached: {what}")]
    Underway {
        limit: &'static str,
        value: u32,
        what: String,
    },
    /// The host keeps a free-space reserve and it is reached (`message` says how much is
    /// free and what to do).
    #[error("host disk reserve reached: {message}")]
    DiskFull { message: String },
    /// The node cannot take this now (draining); the caller may retry later or elsewhere.
    #[error("{code}: {message}")]
    Unavailable { code: &'static str, message: String },
    /// Every network slot of this node is taken.
    #[error("no free network slot (pool exhausted)")]
    NoSlot,
    /// The runtime backend failed.
    #[error("runtime")]
    Runtime(#[from] sandpit_runtime::RuntimeError),
    /// The network backend failed.
    #[error("network")]
    Net(#[from] sandpit_net::NetError),
    /// The connection to a sandbox's agent broke, or it answered out of protocol.
    #[error("talking to the agent of {sandbox}: {what}")]
    Agent { sandbox: String, what: String },
    /// A sandbox's agent did not answer in time.
    #[error("agent of {sandbox} did not answer within {secs} s (last attempt: {last})")]
    AgentTimeout {
        sandbox: String,
        secs: u64,
        /// How the last attempt failed (refused, no answer, ...), for diagnosis.
        last: String,
    },
    /// A host file or directory the node owns could not be made, read or removed.
    #[error("preparing {what}")]
    Files {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// An invariant the node keeps does not hold (a running sandbox without a slot).
    #[error("internal: {0}")]
    Internal(String),
    /// A stored value does not decode (a status no version wrote, JSON that does not
    /// parse): the operation that needs it fails closed, never with a default.
    #[error("the stored {what} does not decode: {detail}")]
    Corrupt { what: String, detail: String },
    /// A database operation failed.
    #[error("store: {op}")]
    Store {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// The schema could not be brought up to date.
    #[error("applying database migrations")]
    Migrate {
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// The database URL names no backend this build supports.
    #[error("unsupported database URL {url:?}: use sqlite://<path> or postgres://…")]
    UnsupportedDatabase { url: String },
}

impl ControlError {
    /// Whether this is the database being out of reach (refused or dropped connections, a
    /// pool that timed out waiting for one), not a fault of the request or the data: the
    /// caller may retry once it is back.
    pub fn is_database_unreachable(&self) -> bool {
        matches!(
            self,
            ControlError::Store {
                source: sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed,
                ..
            }
        )
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ControlError {
        ControlError::NotFound {
            code,
            message: message.into(),
        }
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> ControlError {
        ControlError::Conflict {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(code: &'static str, message: impl Into<String>) -> ControlError {
        ControlError::Invalid {
            code,
            message: message.into(),
        }
    }
    pub fn files(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlError {
        let what = what.into();
        move |source| ControlError::Files { what, source }
    }
    pub fn corrupt(what: impl Into<String>, detail: impl std::fmt::Display) -> ControlError {
        ControlError::Corrupt {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;

/// Decode a stored JSON record, failing closed: a record that does not decode is
/// [`ControlError::Corrupt`] naming `what`, never a default.
pub fn decode<T: serde::de::DeserializeOwned>(
    what: impl FnOnce() -> String,
    json: &str,
) -> Result<T> {
    serde_json::from_str(json).map_err(|e| ControlError::corrupt(what(), e))
}

/// Formats an error with its whole `source()` chain: `a: b: c`.
pub struct DisplayChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}
