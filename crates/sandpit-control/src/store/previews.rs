//! Preview tokens of private sandboxes (only SHA-256 hashes are stored; revoked tokens keep
//! their row so a request with one is told it was revoked).

use super::{Db, q};
use crate::error::ControlError;
use crate::with_db;

/// A preview token (without its hash).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PreviewTokenRow {
    pub id: String,
    pub sandbox_id: String,
    pub workspace_id: String,
    pub token_prefix: String,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
}

/// The previews aggregate.
#[derive(Clone, Debug)]
pub struct Previews {
    pub(super) db: Db,
}

impl Previews {
    pub async fn insert_token(&self, t: &PreviewTokenRow, hash: &str) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "INSERT INTO preview_tokens (id, sandbox_id, workspace_id, token_hash, token_prefix,
                expires_at, revoked_at, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&t.id)
        .bind(&t.sandbox_id)
        .bind(&t.workspace_id)
        .bind(hash)
        .bind(&t.token_prefix)
        .bind(t.expires_at)
        .bind(t.revoked_at)
        .bind(t.created_at)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("inserting a preview token"))?;
        Ok(())
    }

    /// The sandbox's preview tokens that are not revoked, oldest first.
    pub async fn list_tokens(
        &self,
        workspace_id: &str,
        sandbox_id: &str,
    ) -> Result<Vec<PreviewTokenRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT id, sandbox_id, workspace_id, token_prefix, expires_at, revoked_at, created_at
             FROM preview_tokens
             WHERE workspace_id = $1 AND sandbox_id = $2 AND revoked_at IS NULL
             ORDER BY created_at, id",
        )
        .bind(workspace_id)
        .bind(sandbox_id)
        .fetch_all(p).await)
        .map_err(q("listing preview tokens"))
    }

    /// A preview token of the given workspace and sandbox, revoked ones included.
    pub async fn get_token(
        &self,
        workspace_id: &str,
        sandbox_id: &str,
        id: &str,
    ) -> Result<Option<PreviewTokenRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT id, sandbox_id, workspace_id, token_prefix, expires_at, revoked_at, created_at
             FROM preview_tokens WHERE workspace_id = $1 AND sandbox_id = $2 AND id = $3",
        )
        .bind(workspace_id)
        .bind(sandbox_id)
        .bind(id)
        .fetch_optional(p).await)
        .map_err(q("reading a preview token"))
    }

    /// A preview token of the given sandbox by its hash. The sandbox (whose workspace the
    /// caller compared) scopes the lookup: another sandbox's token is not found.
    pub async fn token_by_hash(
        &self,
        sandbox_id: &str,
        hash: &str,
    ) -> Result<Option<PreviewTokenRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT id, sandbox_id, workspace_id, token_prefix, expires_at, revoked_at, created_at
             FROM preview_tokens WHERE sandbox_id = $1 AND token_hash = $2",
        )
        .bind(sandbox_id)
        .bind(hash)
        .fetch_optional(p).await)
        .map_err(q("looking up a preview token"))
    }

    pub async fn set_token_expiry(
        &self,
        workspace_id: &str,
        id: &str,
        expires_at: Option<i64>,
    ) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "UPDATE preview_tokens SET expires_at = $1 WHERE workspace_id = $2 AND id = $3"
        )
        .bind(expires_at)
        .bind(workspace_id)
        .bind(id)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("updating a preview token"))?;
        Ok(())
    }

    pub async fn revoke_token(
        &self,
        workspace_id: &str,
        id: &str,
        now: i64,
    ) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "UPDATE preview_tokens SET revoked_at = $1
             WHERE workspace_id = $2 AND id = $3 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(workspace_id)
        .bind(id)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("revoking a preview token"))?;
        Ok(())
    }
}
