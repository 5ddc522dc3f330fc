//! Workspace secrets (sealed values, never in clear) and the secrets each sandbox holds
//! (its lineage and placeholders).

use std::collections::BTreeMap;

use super::{Db, q};
use crate::error::ControlError;
use crate::with_db;

/// A secret as stored: its value sealed (see [`crate::secrets::Sealer`]).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SecretRow {
    pub workspace_id: String,
    pub name: String,
    pub sealed: String,
    /// JSON array of normalized host patterns.
    pub hosts: String,
    /// JSON `SecretInject`.
    pub inject: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// What a sandbox holds: the lineage whose CA it trusts, the placeholder of each secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSecrets {
    pub workspace_id: String,
    pub lineage: String,
    pub placeholders: BTreeMap<String, String>,
}

/// The secrets aggregate.
#[derive(Clone, Debug)]
pub struct Secrets {
    pub(super) db: Db,
}

impl Secrets {
    /// Insert a new secret; `Conflict{secret_exists}` if the workspace has one of that name.
    pub async fn insert(&self, row: &SecretRow) -> Result<(), ControlError> {
        let done = with_db!(self.db, p => sqlx::query(
            "INSERT INTO secrets (workspace_id, name, sealed, hosts, inject, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (workspace_id, name) DO NOTHING",
        )
        .bind(&row.workspace_id)
        .bind(&row.name)
        .bind(&row.sealed)
        .bind(&row.hosts)
        .bind(&row.inject)
        .bind(row.created_at)
        .bind(row.updated_at)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("inserting a secret"))?;
        if done == 0 {
            return Err(ControlError::conflict(
                "secret_exists",
                format!("the workspace has a secret {:?} already", row.name),
            ));
        }
        Ok(())
    }

    pub async fn get(
        &self,
        workspace_id: &str,
        name: &str,
    ) -> Result<Option<SecretRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as::<_, SecretRow>(
            "SELECT workspace_id, name, sealed, hosts, inject, created_at, updated_at FROM secrets WHERE workspace_id = $1 AND name = $2",
        )
        .bind(workspace_id)
        .bind(name)
        .fetch_optional(p).await)
        .map_err(q("reading a secret"))
    }

    /// A workspace's secrets, by name.
    pub async fn list(&self, workspace_id: &str) -> Result<Vec<SecretRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as::<_, SecretRow>(
            "SELECT workspace_id, name, sealed, hosts, inject, created_at, updated_at FROM secrets WHERE workspace_id = $1 ORDER BY name",
        )
        .bind(workspace_id)
        .fetch_all(p).await)
        .map_err(q("listing secrets"))
    }

    /// Every secret of every workspace (the server's own use: rotating the master key).
    pub async fn all(&self) -> Result<Vec<SecretRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as::<_, SecretRow>(
            "SELECT workspace_id, name, sealed, hosts, inject, created_at, updated_at FROM secrets ORDER BY workspace_id, name",
        )
        .fetch_all(p).await)
        .map_err(q("listing all secrets"))
    }

    /// Replace a secret's sealed value; false if there is no such secret.
    pub async fn set_sealed(
        &self,
        workspace_id: &str,
        name: &str,
        sealed: &str,
        now: i64,
    ) -> Result<bool, ControlError> {
        with_db!(self.db, p => sqlx::query(
            "UPDATE secrets SET sealed = $1, updated_at = $2 WHERE workspace_id = $3 AND name = $4",
        )
        .bind(sealed)
        .bind(now)
        .bind(workspace_id)
        .bind(name)
        .execute(p).await.map(|r| r.rows_affected() > 0))
        .map_err(q("replacing a secret's value"))
    }

    /// Delete a secret; false if there was none.
    pub async fn delete(&self, workspace_id: &str, name: &str) -> Result<bool, ControlError> {
        with_db!(self.db, p => sqlx::query(
            "DELETE FROM secrets WHERE workspace_id = $1 AND name = $2",
        )
        .bind(workspace_id)
        .bind(name)
        .execute(p).await.map(|r| r.rows_affected() > 0))
        .map_err(q("deleting a secret"))
    }

    /// Record what sandbox `sandbox_id` holds (replacing what it held).
    pub async fn bind(&self, sandbox_id: &str, held: &SandboxSecrets) -> Result<(), ControlError> {
        let placeholders = serde_json::to_string(&held.placeholders)
            .map_err(|e| ControlError::Internal(format!("encoding placeholders: {e}")))?;
        with_db!(self.db, p => sqlx::query(
            "INSERT INTO sandbox_secrets (sandbox_id, workspace_id, lineage, placeholders)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (sandbox_id) DO UPDATE SET workspace_id = $2, lineage = $3,
                placeholders = $4",
        )
        .bind(sandbox_id)
        .bind(&held.workspace_id)
        .bind(&held.lineage)
        .bind(&placeholders)
        .execute(p).await.map(drop))
        .map_err(q("recording a sandbox's secrets"))
    }

    /// What sandbox `sandbox_id` holds, if anything. A record that does not decode is
    /// `Corrupt` (the sandbox does not start without its secrets' proxy).
    pub async fn held(&self, sandbox_id: &str) -> Result<Option<SandboxSecrets>, ControlError> {
        let row: Option<(String, String, String)> = with_db!(self.db, p => sqlx::query_as(
            "SELECT workspace_id, lineage, placeholders FROM sandbox_secrets WHERE sandbox_id = $1",
        )
        .bind(sandbox_id)
        .fetch_optional(p).await)
        .map_err(q("reading a sandbox's secrets"))?;
        row.map(|(workspace_id, lineage, placeholders)| {
            Ok(SandboxSecrets {
                workspace_id,
                lineage,
                placeholders: crate::error::decode(
                    || format!("secrets of sandbox {sandbox_id}"),
                    &placeholders,
                )?,
            })
        })
        .transpose()
    }
}
