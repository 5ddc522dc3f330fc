//! The lifecycle event log: per workspace, in `seq` order (`GET /v1/events`). Appends are
//! best-effort for the operation that makes them (a failed append is logged by the caller,
//! never fails the operation); reads page by `seq`; old events are pruned.

use super::{Db, q};
use crate::error::ControlError;
use crate::with_db;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct EventRow {
    pub seq: i64,
    pub workspace_id: String,
    pub kind: String,
    pub sandbox_id: Option<String>,
    /// A JSON object.
    pub detail: String,
    pub at: i64,
}

/// The events aggregate.
#[derive(Clone, Debug)]
pub struct Events {
    pub(super) db: Db,
}

impl Events {
    /// Append an event of a workspace.
    pub async fn append(
        &self,
        workspace_id: &str,
        kind: &str,
        sandbox_id: Option<&str>,
        detail: &serde_json::Value,
        now: i64,
    ) -> Result<(), ControlError> {
        let detail = detail.to_string();
        with_db!(self.db, p => sqlx::query(
            "INSERT INTO events (workspace_id, kind, sandbox_id, detail, at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(workspace_id)
        .bind(kind)
        .bind(sandbox_id)
        .bind(&detail)
        .bind(now)
        .execute(p).await.map(drop))
        .map_err(q("appending an event"))
    }

    /// Append an event of a sandbox, in the workspace its row names (nothing if there is no
    /// such row).
    pub async fn append_for_sandbox(
        &self,
        sandbox_id: &str,
        kind: &str,
        detail: &serde_json::Value,
        now: i64,
    ) -> Result<(), ControlError> {
        let detail = detail.to_string();
        with_db!(self.db, p => sqlx::query(
            "INSERT INTO events (workspace_id, kind, sandbox_id, detail, at)
             SELECT workspace_id, $1, id, $2, $3 FROM sandboxes WHERE id = $4",
        )
        .bind(kind)
        .bind(&detail)
        .bind(now)
        .bind(sandbox_id)
        .execute(p).await.map(drop))
        .map_err(q("appending a sandbox's event"))
    }

    /// A workspace's events after `seq` (oldest first), at most `limit`, appended at or
    /// before `until` (readers stay a moment behind the newest appends, so an append whose
    /// `seq` was taken but not yet committed is not skipped).
    pub async fn after(
        &self,
        workspace_id: &str,
        seq: i64,
        until: i64,
        limit: i64,
    ) -> Result<Vec<EventRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT seq, workspace_id, kind, sandbox_id, detail, at FROM events
             WHERE workspace_id = $1 AND seq > $2 AND at <= $3 ORDER BY seq LIMIT $4",
        )
        .bind(workspace_id)
        .bind(seq)
        .bind(until)
        .bind(limit)
        .fetch_all(p).await)
        .map_err(q("reading events"))
    }

    /// The newest `seq` of a workspace (0 when it has none): where a stream that asks for no
    /// history starts.
    pub async fn last_seq(&self, workspace_id: &str) -> Result<i64, ControlError> {
        let row: (Option<i64>,) = with_db!(self.db, p => sqlx::query_as(
            "SELECT MAX(seq) FROM events WHERE workspace_id = $1",
        )
        .bind(workspace_id)
        .fetch_one(p).await)
        .map_err(q("reading the newest event"))?;
        Ok(row.0.unwrap_or(0))
    }

    /// Forget events appended before `before`. How many went.
    pub async fn prune(&self, before: i64) -> Result<u64, ControlError> {
        with_db!(self.db, p => sqlx::query("DELETE FROM events WHERE at < $1")
            .bind(before)
            .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("pruning events"))
    }
}
