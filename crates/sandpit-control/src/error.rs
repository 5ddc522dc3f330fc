//! The control layer's one error type. The HTTP edge maps it to a status and a code once;
//! nothing here knows what a status code is.

/// What went wrong in the control layer.
///
/// `Invalid`, `Conflict` and `Quota` carry a stable machine-readable `code` (the one the
/// client sees); their `message` is safe to show. `Store`, `Migrate` and `Corrupt` are
/// internal: their details go to the log, the client learns only a code.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such object in the caller's scope.
    #[error("{what} not found")]
    NotFound { what: String },
    /// The object exists but belongs to someone else, or the token lacks a scope.
    #[error("forbidden: {message}")]
    Forbidden { message: String },
    /// The object's state does not allow the operation (e.g. `sandbox_not_running`).
    #[error("{code}: {message}")]
    Conflict { code: &'static str, message: String },
    /// The request breaks a rule, checked before anything changed.
    #[error("{code}: {message}")]
    Invalid { code: &'static str, message: String },
    /// A per-workspace limit is reached.
    #[error("{code}: {message}")]
    Quota { code: &'static str, message: String },
    /// The host keeps a free-space reserve and it is reached.
    #[error("host disk reserve reached")]
    DiskFull,
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
    pub fn corrupt(what: impl Into<String>, detail: impl std::fmt::Display) -> ControlError {
        ControlError::Corrupt {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;
