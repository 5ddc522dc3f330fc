//! `Idempotency-Key` of create and fork, per workspace: a repeated request with the same key
//! and body replays the first one's response.

use super::{Db, q};
use crate::error::ControlError;
use crate::with_db;

/// What an earlier request with the same idempotency key left.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct IdempotencyRow {
    pub request_hash: String,
    /// `None` while that request still runs.
    pub status: Option<i64>,
    pub response: Option<String>,
}

/// The idempotency-key aggregate.
#[derive(Clone, Debug)]
pub struct Idempotency {
    pub(super) db: Db,
}

impl Idempotency {
    /// Claim `key` for a request with `hash`: `None` when this request owns it now (a
    /// pending row was inserted), otherwise the row another request left. Expired rows are
    /// deleted first. The insert is atomic in both databases (`ON CONFLICT DO NOTHING` on
    /// the primary key), so of two replicas racing, one owns the key.
    pub async fn begin(
        &self,
        node_id: &str,
        workspace_id: &str,
        key: &str,
        hash: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<Option<IdempotencyRow>, ControlError> {
        with_db!(self.db, p => sqlx::query("DELETE FROM idempotency_keys WHERE expires_at <= $1")
            .bind(now)
            .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("expiring idempotency keys"))?;
        let inserted = with_db!(self.db, p => sqlx::query(
            "INSERT INTO idempotency_keys
                (workspace_id, key, request_hash, status, response, created_at, expires_at,
                 node_id)
             VALUES ($1, $2, $3, NULL, NULL, $4, $5, $6)
             ON CONFLICT DO NOTHING",
        )
        .bind(workspace_id)
        .bind(key)
        .bind(hash)
        .bind(now)
        .bind(expires_at)
        .bind(node_id)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("claiming an idempotency key"))?;
        if inserted == 1 {
            return Ok(None);
        }
        with_db!(self.db, p => sqlx::query_as(
            "SELECT request_hash, status, response FROM idempotency_keys
             WHERE workspace_id = $1 AND key = $2",
        )
        .bind(workspace_id)
        .bind(key)
        .fetch_optional(p).await)
        .map_err(q("reading an idempotency key"))
    }

    /// Record the response of the request that owns `key`.
    pub async fn finish(
        &self,
        workspace_id: &str,
        key: &str,
        status: u16,
        response: &str,
    ) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "UPDATE idempotency_keys SET status = $1, response = $2
             WHERE workspace_id = $3 AND key = $4",
        )
        .bind(i64::from(status))
        .bind(response)
        .bind(workspace_id)
        .bind(key)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("recording an idempotent response"))?;
        Ok(())
    }

    /// Release a pending key (its request failed: a retry may run again).
    pub async fn abandon(&self, workspace_id: &str, key: &str) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "DELETE FROM idempotency_keys WHERE workspace_id = $1 AND key = $2 AND status IS NULL",
        )
        .bind(workspace_id)
        .bind(key)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("releasing an idempotency key"))?;
        Ok(())
    }

    /// Release the keys pending on node `node_id` (and those recorded without a node): at
    /// its start no request of it is running; the fleet calls it for a node declared lost.
    /// Other nodes' pending keys stay.
    pub async fn clear_pending(&self, node_id: &str) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "DELETE FROM idempotency_keys
             WHERE status IS NULL AND (node_id = $1 OR node_id IS NULL)",
        )
        .bind(node_id)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("releasing pending idempotency keys"))?;
        Ok(())
    }

    /// Release the keys pending on nodes declared lost: their requests died with the node
    /// (its creates were failed), so a retry runs again.
    pub async fn release_on_lost_nodes(&self) -> Result<u64, ControlError> {
        with_db!(self.db, p => sqlx::query(
            "DELETE FROM idempotency_keys
             WHERE status IS NULL AND node_id IN (SELECT id FROM nodes WHERE status = 'lost')",
        )
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("releasing the idempotency keys of lost nodes"))
    }
}
