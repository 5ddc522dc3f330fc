//! Organizations, workspaces and API tokens (only SHA-256 hashes of tokens are stored).

use super::{Db, q};
use crate::error::ControlError;
use crate::with_db;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TokenRow {
    pub id: String,
    pub workspace_id: String,
    pub description: Option<String>,
    /// JSON array of scope names.
    pub scopes: String,
    pub expires_at: Option<i64>,
    pub created_at: i64,
}

/// A token looked up by its hash, with the workspace and organization it belongs to.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TokenAuth {
    pub id: String,
    pub workspace_id: String,
    pub org_id: String,
    pub scopes: String,
    pub expires_at: Option<i64>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkspaceRow {
    pub id: String,
    pub org_id: String,
    pub name: String,
}

/// Tenants: organizations, their workspaces and the workspaces' tokens.
#[derive(Clone, Debug)]
pub struct Tenants {
    pub(super) db: Db,
}

impl Tenants {
    /// Organizations other than the server's own.
    pub async fn count_orgs(&self) -> Result<i64, ControlError> {
        let n: (i64,) = with_db!(self.db, p => sqlx::query_as(
            "SELECT COUNT(*) FROM orgs WHERE id <> 'org_system'"
        ).fetch_one(p).await)
        .map_err(q("counting organizations"))?;
        Ok(n.0)
    }

    pub async fn insert_org(&self, id: &str, name: &str, now: i64) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "INSERT INTO orgs (id, name, created_at) VALUES ($1, $2, $3)"
        ).bind(id).bind(name).bind(now).execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("inserting an organization"))?;
        Ok(())
    }

    pub async fn insert_workspace(&self, ws: &WorkspaceRow, now: i64) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "INSERT INTO workspaces (id, org_id, name, created_at) VALUES ($1, $2, $3, $4)"
        ).bind(&ws.id).bind(&ws.org_id).bind(&ws.name).bind(now).execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("inserting a workspace"))?;
        Ok(())
    }

    /// A workspace of the given organization.
    pub async fn get_workspace(
        &self,
        org_id: &str,
        id: &str,
    ) -> Result<Option<WorkspaceRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT id, org_id, name FROM workspaces WHERE id = $1 AND org_id = $2"
        ).bind(id).bind(org_id).fetch_optional(p).await)
        .map_err(q("reading a workspace"))
    }

    pub async fn insert_token(&self, t: &TokenRow, hash: &str) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "INSERT INTO api_tokens (id, workspace_id, token_hash, description, scopes, expires_at, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&t.id)
        .bind(&t.workspace_id)
        .bind(hash)
        .bind(&t.description)
        .bind(&t.scopes)
        .bind(t.expires_at)
        .bind(t.created_at)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("inserting a token"))?;
        Ok(())
    }

    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenAuth>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT t.id, t.workspace_id, w.org_id, t.scopes, t.expires_at
             FROM api_tokens t JOIN workspaces w ON w.id = t.workspace_id
             WHERE t.token_hash = $1",
        )
        .bind(hash)
        .fetch_optional(p).await)
        .map_err(q("looking up a token"))
    }

    /// A token of the given workspace.
    pub async fn get_token(
        &self,
        workspace_id: &str,
        id: &str,
    ) -> Result<Option<TokenRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT id, workspace_id, description, scopes, expires_at, created_at
             FROM api_tokens WHERE id = $1 AND workspace_id = $2",
        )
        .bind(id)
        .bind(workspace_id)
        .fetch_optional(p).await)
        .map_err(q("reading a token"))
    }

    pub async fn update_token(&self, t: &TokenRow) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "UPDATE api_tokens SET description = $1, scopes = $2, expires_at = $3
             WHERE id = $4 AND workspace_id = $5",
        )
        .bind(&t.description)
        .bind(&t.scopes)
        .bind(t.expires_at)
        .bind(&t.id)
        .bind(&t.workspace_id)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("updating a token"))?;
        Ok(())
    }

    /// Delete a token of the given workspace; false if there was none.
    pub async fn delete_token(&self, workspace_id: &str, id: &str) -> Result<bool, ControlError> {
        let r = with_db!(self.db, p => sqlx::query(
            "DELETE FROM api_tokens WHERE id = $1 AND workspace_id = $2"
        ).bind(id).bind(workspace_id).execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("deleting a token"))?;
        Ok(r > 0)
    }
}
