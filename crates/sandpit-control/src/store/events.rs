//! The lifecycle event log: per workspace, in `seq` order (`GET /v1/events`). Appends are
//! best-effort for the operation that makes them (a failed append is logged by the caller,
//! never fails the operation) and insert the event's webhook deliveries in the same
//! transaction ([`super::Webhooks`]); reads page by `seq`; old events are pruned.

use super::{Db, q};
use crate::error::ControlError;
use crate::with_db;

/// Insert, in transaction `$tx`, a pending delivery of event `$seq` for each webhook of the
/// workspace whose filter takes `$kind` (kinds are the server's own words, so `LIKE` sees no
/// tenant text).
macro_rules! fan_out {
    ($tx:ident, $workspace:expr, $seq:expr, $kind:expr, $now:expr) => {
        sqlx::query(
            "INSERT INTO webhook_deliveries
                 (webhook_id, workspace_id, event_seq, event_at, status, attempts, next_attempt_at)
             SELECT id, workspace_id, $1, $2, 'pending', 0, $2 FROM webhooks
             WHERE workspace_id = $3 AND (events IS NULL OR events LIKE $4)",
        )
        .bind($seq)
        .bind($now)
        .bind($workspace)
        .bind(format!("%,{},%", $kind))
        .execute(&mut *$tx)
        .await?;
    };
}

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
    /// Append an event of a workspace, with a delivery for each of the workspace's webhooks
    /// that takes its kind (one transaction).
    pub async fn append(
        &self,
        workspace_id: &str,
        kind: &str,
        sandbox_id: Option<&str>,
        detail: &serde_json::Value,
        now: i64,
    ) -> Result<(), ControlError> {
        let detail = detail.to_string();
        with_db!(self.db, p => async {
            let mut tx = p.begin().await?;
            let (seq,): (i64,) = sqlx::query_as(
                "INSERT INTO events (workspace_id, kind, sandbox_id, detail, at)
                 VALUES ($1, $2, $3, $4, $5) RETURNING seq",
            )
            .bind(workspace_id)
            .bind(kind)
            .bind(sandbox_id)
            .bind(&detail)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            fan_out!(tx, workspace_id, seq, kind, now);
            tx.commit().await
        }.await)
        .map_err(q("appending an event"))
    }

    /// Append an event of a sandbox, in the workspace its row names (nothing if there is no
    /// such row), with its webhook deliveries as [`Events::append`].
    pub async fn append_for_sandbox(
        &self,
        sandbox_id: &str,
        kind: &str,
        detail: &serde_json::Value,
        now: i64,
    ) -> Result<(), ControlError> {
        let detail = detail.to_string();
        with_db!(self.db, p => async {
            let mut tx = p.begin().await?;
            let row: Option<(i64, String)> = sqlx::query_as(
                "INSERT INTO events (workspace_id, kind, sandbox_id, detail, at)
                 SELECT workspace_id, $1, id, $2, $3 FROM sandboxes WHERE id = $4
                 RETURNING seq, workspace_id",
            )
            .bind(kind)
            .bind(&detail)
            .bind(now)
            .bind(sandbox_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((seq, workspace_id)) = row {
                fan_out!(tx, &workspace_id, seq, kind, now);
            }
            tx.commit().await
        }.await)
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
