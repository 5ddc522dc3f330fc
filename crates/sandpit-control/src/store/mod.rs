//! The persistent store, split by aggregate ([`Tenants`], [`Templates`], [`Sandboxes`],
//! [`Previews`], [`Snapshots`], [`Idempotency`], [`Nodes`], [`Layers`], [`Volumes`],
//! [`Events`], [`Webhooks`], [`Secrets`]), on SQLite (the
//! default, one file) or PostgreSQL (`--database postgres://…`, for several API replicas),
//! behind one interface.
//!
//! Each query is written once in SQL both databases accept (`$N` parameters, `ON CONFLICT`,
//! `RETURNING`) and run by [`with_db!`] on whichever pool is open; the few statements that
//! must differ (row locks, schema) say so. Rows decode at this edge into the domain's types:
//! a value no version wrote is [`ControlError::Corrupt`], never a default.
//!
//! Admission checks (quotas) are single statements or transactions that hold across
//! processes: on PostgreSQL they take a transaction-scoped advisory lock on the workspace,
//! on SQLite the database's one writer serializes them.
//!
//! Every query that reads or changes a tenant's object takes the workspace it is scoped to,
//! except the few used by the server itself (reaper, reconciliation), which say so.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::error::ControlError;

mod events;
mod idempotency;
mod layers;
mod nodes;
mod previews;
mod sandboxes;
mod secrets;
mod snapshots;
mod templates;
mod tenants;
mod volumes;
mod webhooks;

pub use events::{EventRow, Events};
pub use idempotency::{Idempotency, IdempotencyRow};
pub use layers::{Layers, StoredLayer};
pub use nodes::{Heartbeat, NodeInfo, NodeLoad, NodeRow, NodeStatus, Nodes, valid_node_id};
pub use previews::{PreviewTokenRow, Previews};
pub use sandboxes::{LOST_OWNER, Sandbox, Sandboxes};
pub use secrets::{
    LineageRow, ResealedLineage, ResealedSecret, SandboxSecrets, SecretRow, Secrets,
};
pub use snapshots::{SnapshotRow, Snapshots};
pub use templates::{
    MAX_VERSION, TemplateInsert, TemplateRef, TemplateRow, TemplateStatus, Templates,
};
pub use tenants::{Tenants, TokenAuth, TokenRow, WorkspaceRow};
pub use volumes::{STORED_VOLUME, StoredVolume, VolumeMountRow, VolumeRow, Volumes};
pub use webhooks::{
    AttemptOutcome, ClaimedDelivery, DELIVERED, DeliveryRow, FAILED, PENDING, WebhookRow, Webhooks,
    encode_kinds,
};

/// Which database a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone, Debug)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// An open database: a connection pool of one backend, migrated. Cheap to clone.
///
/// Stores of other surfaces (the CodeSandbox tables beside `sandpit-server`'s compat code)
/// run their queries on it with [`with_db!`].
#[derive(Clone, Debug)]
pub struct Db {
    pool: Pool,
}

/// Run `$body` with `$p` bound to the open pool (`&SqlitePool` or `&PgPool`). The body is
/// compiled once per backend, so a query both accept is written once.
#[macro_export]
macro_rules! with_db {
    ($db:expr, $p:ident => $body:expr) => {
        match $db.pools() {
            $crate::store::Pools::Sqlite($p) => $body,
            $crate::store::Pools::Postgres($p) => $body,
        }
    };
}
pub use with_db;

/// The open pool, for [`with_db!`].
pub enum Pools<'a> {
    Sqlite(&'a SqlitePool),
    Postgres(&'a PgPool),
}

/// Map a sqlx error to [`ControlError::Store`] naming the operation.
pub fn q(op: &'static str) -> impl FnOnce(sqlx::Error) -> ControlError {
    move |source| ControlError::Store { op, source }
}

impl Db {
    /// Open a database by URL: `sqlite://<path>` (created if missing) or
    /// `postgres://…` / `postgresql://…` (the database must exist). Migrations are applied.
    pub async fn connect(url: &str) -> Result<Db, ControlError> {
        let db = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(q("parsing the database URL"))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // FULL: an acknowledged write survives a power loss, not just a crash.
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(8)
                .connect_with(opts)
                .await
                .map_err(q("opening the database"))?;
            sqlx::migrate!("./migrations/sqlite")
                .run(&pool)
                .await
                .map_err(|source| ControlError::Migrate { source })?;
            Db {
                pool: Pool::Sqlite(pool),
            }
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url).map_err(q("parsing the database URL"))?;
            let pool = PgPoolOptions::new()
                .max_connections(16)
                // While the server is out of reach a request waits this long, then answers 503
                // `database_unavailable`.
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await
                .map_err(q("connecting to PostgreSQL"))?;
            sqlx::migrate!("./migrations/postgres")
                .run(&pool)
                .await
                .map_err(|source| ControlError::Migrate { source })?;
            Db {
                pool: Pool::Postgres(pool),
            }
        } else {
            // The URL may hold a password: name only its scheme.
            let scheme = url.split_once(':').map_or("", |(s, _)| s);
            return Err(ControlError::UnsupportedDatabase {
                url: format!("{scheme}:…"),
            });
        };
        Ok(db)
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// The open pool, for [`with_db!`].
    pub fn pools(&self) -> Pools<'_> {
        match &self.pool {
            Pool::Sqlite(p) => Pools::Sqlite(p),
            Pool::Postgres(p) => Pools::Postgres(p),
        }
    }

    /// Close every connection (tests and shutdown).
    pub async fn close(&self) {
        with_db!(self, p => p.close().await)
    }
}

/// The SQL that takes a transaction-scoped lock on one workspace's admission decisions
/// (PostgreSQL; on SQLite the single writer already serializes them).
pub(crate) const PG_WORKSPACE_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";

/// Run `$body` in a transaction that holds the workspace's admission lock (PostgreSQL: a
/// transaction-scoped advisory lock, so replicas sharing the database decide one at a time;
/// SQLite: the database's write lock, taken at `BEGIN IMMEDIATE`). `$tx` names the transaction in the body;
/// the result is the body's value, committed, or the first error.
macro_rules! in_admission {
    ($db:expr, $workspace:expr, $tx:ident => $body:expr) => {
        $crate::with_db!($db, p => async {
            // SQLite: take the write lock first (`BEGIN IMMEDIATE`); a read that later
            // writes would fail with SQLITE_BUSY_SNAPSHOT when another writer came between.
            let mut $tx = if $db.backend() == $crate::store::Backend::Sqlite {
                p.begin_with("BEGIN IMMEDIATE").await?
            } else {
                p.begin().await?
            };
            if $db.backend() == $crate::store::Backend::Postgres {
                sqlx::query($crate::store::PG_WORKSPACE_LOCK)
                    .bind($workspace)
                    .execute(&mut *$tx)
                    .await?;
            }
            let out = $body;
            $tx.commit().await?;
            Ok::<_, sqlx::Error>(out)
        }
        .await)
    };
}
pub(crate) use in_admission;

/// The store: one handle per aggregate, all on the same [`Db`].
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
    pub tenants: Tenants,
    pub templates: Templates,
    pub sandboxes: Sandboxes,
    pub previews: Previews,
    pub snapshots: Snapshots,
    pub idempotency: Idempotency,
    pub nodes: Nodes,
    pub layers: Layers,
    pub volumes: Volumes,
    pub events: Events,
    pub webhooks: Webhooks,
    pub secrets: Secrets,
}

impl Store {
    /// Open the database at `url` (see [`Db::connect`]).
    pub async fn connect(url: &str) -> Result<Store, ControlError> {
        Ok(Store::new(Db::connect(url).await?))
    }

    /// Open (creating if needed) an SQLite file.
    pub async fn open_sqlite(path: &std::path::Path) -> Result<Store, ControlError> {
        Store::connect(&format!("sqlite://{}", path.display())).await
    }

    pub fn new(db: Db) -> Store {
        Store {
            tenants: Tenants { db: db.clone() },
            templates: Templates { db: db.clone() },
            sandboxes: Sandboxes { db: db.clone() },
            previews: Previews { db: db.clone() },
            snapshots: Snapshots { db: db.clone() },
            idempotency: Idempotency { db: db.clone() },
            nodes: Nodes { db: db.clone() },
            layers: Layers { db: db.clone() },
            volumes: Volumes { db: db.clone() },
            events: Events { db: db.clone() },
            webhooks: Webhooks { db: db.clone() },
            secrets: Secrets { db: db.clone() },
            db,
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }
}

#[cfg(test)]
mod tests;
