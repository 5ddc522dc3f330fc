//! Workspace secrets (sealed values, never in clear), the secrets each sandbox holds (its
//! lineage and placeholders) and the CA of each lineage (its key sealed), shared by the
//! fleet.

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

/// The CA of a lineage as stored: its certificate, its key sealed (see
/// [`crate::secrets::MasterKey::seal_ca_key`]).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LineageRow {
    pub lineage: String,
    /// The workspace whose sandboxes hold the lineage: no other may use its CA.
    pub workspace_id: String,
    pub cert_pem: String,
    pub key_sealed: String,
    pub created_at: i64,
}

/// A lineage CA row and its key sealed anew, for [`Secrets::reseal`].
pub type ResealedLineage<'a> = (&'a LineageRow, String);
/// A secret row and its value sealed anew, for [`Secrets::reseal`].
pub type ResealedSecret<'a> = (&'a SecretRow, String);

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

    /// Record the CA of a lineage unless one is recorded already (another node may have
    /// made one at the same moment): true if this row went in. Read the lineage back with
    /// [`Secrets::lineage`] to use whichever won.
    pub async fn insert_lineage(&self, row: &LineageRow) -> Result<bool, ControlError> {
        with_db!(self.db, p => sqlx::query(
            "INSERT INTO secret_lineages (lineage, workspace_id, cert_pem, key_sealed, created_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (lineage) DO NOTHING",
        )
        .bind(&row.lineage)
        .bind(&row.workspace_id)
        .bind(&row.cert_pem)
        .bind(&row.key_sealed)
        .bind(row.created_at)
        .execute(p).await.map(|r| r.rows_affected() > 0))
        .map_err(q("recording a lineage's CA"))
    }

    /// The CA of `lineage`, if one is recorded. The caller checks its workspace.
    pub async fn lineage(&self, lineage: &str) -> Result<Option<LineageRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as::<_, LineageRow>(
            "SELECT lineage, workspace_id, cert_pem, key_sealed, created_at FROM secret_lineages
             WHERE lineage = $1",
        )
        .bind(lineage)
        .fetch_optional(p).await)
        .map_err(q("reading a lineage's CA"))
    }

    /// Every lineage CA (the server's own use: rotating the master key).
    pub async fn all_lineages(&self) -> Result<Vec<LineageRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as::<_, LineageRow>(
            "SELECT lineage, workspace_id, cert_pem, key_sealed, created_at FROM secret_lineages
             ORDER BY lineage",
        )
        .fetch_all(p).await)
        .map_err(q("listing all lineage CAs"))
    }

    /// The workspace of a sandbox that still needs `lineage`'s CA: one not destroyed, or
    /// one a snapshot was taken of (its files trust the CA). `None`: nothing needs it. The
    /// server's own use (garbage collection, importing a CA from a node's disk).
    pub async fn lineage_holder(&self, lineage: &str) -> Result<Option<String>, ControlError> {
        let row: Option<(String,)> = with_db!(self.db, p => sqlx::query_as(
            "SELECT s.workspace_id FROM sandbox_secrets s
             WHERE s.lineage = $1 AND (
                EXISTS (SELECT 1 FROM sandboxes b
                        WHERE b.id = s.sandbox_id AND b.status <> 'destroyed')
                OR EXISTS (SELECT 1 FROM snapshots n
                           WHERE n.workspace_id = s.workspace_id AND n.sandbox_id = s.sandbox_id))
             LIMIT 1",
        )
        .bind(lineage)
        .fetch_optional(p).await)
        .map_err(q("looking for a lineage's holder"))?;
        Ok(row.map(|r| r.0))
    }

    /// Delete at most `limit` lineage CAs recorded before `before` that nothing needs any
    /// more (see [`Secrets::lineage_holder`]); returns their lineages. One statement, so a
    /// CA goes only if, when the statement runs, no live sandbox or snapshot holds it. The server's
    /// own use (the reaper).
    pub async fn collect_lineages(
        &self,
        before: i64,
        limit: i64,
    ) -> Result<Vec<String>, ControlError> {
        let rows: Vec<(String,)> = with_db!(self.db, p => sqlx::query_as(
            "DELETE FROM secret_lineages WHERE lineage IN (
                SELECT l.lineage FROM secret_lineages l
                WHERE l.created_at < $1 AND NOT EXISTS (
                    SELECT 1 FROM sandbox_secrets s
                    WHERE s.lineage = l.lineage AND (
                        EXISTS (SELECT 1 FROM sandboxes b
                                WHERE b.id = s.sandbox_id AND b.status <> 'destroyed')
                        OR EXISTS (SELECT 1 FROM snapshots n
                                   WHERE n.workspace_id = s.workspace_id
                                     AND n.sandbox_id = s.sandbox_id)))
                ORDER BY l.lineage LIMIT $2)
             RETURNING lineage",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(p).await)
        .map_err(q("collecting unused lineage CAs"))?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Write every secret value and lineage key sealed anew (rotating the master key) in one
    /// transaction, each only if its row still holds what was read. If one changed or went
    /// in between, nothing is written and the error names it.
    pub async fn reseal(
        &self,
        secrets: &[ResealedSecret<'_>],
        lineages: &[ResealedLineage<'_>],
    ) -> Result<(), ControlError> {
        let changed: Option<String> = with_db!(self.db, p => async {
            let mut tx = p.begin().await?;
            for (row, sealed) in secrets {
                let n = sqlx::query(
                    "UPDATE secrets SET sealed = $1
                     WHERE workspace_id = $2 AND name = $3 AND sealed = $4",
                )
                .bind(sealed)
                .bind(&row.workspace_id)
                .bind(&row.name)
                .bind(&row.sealed)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n == 0 {
                    // Dropped unfinished: rolled back.
                    return Ok(Some(format!(
                        "secret {:?} of workspace {}",
                        row.name, row.workspace_id
                    )));
                }
            }
            for (row, sealed) in lineages {
                let n = sqlx::query(
                    "UPDATE secret_lineages SET key_sealed = $1
                     WHERE lineage = $2 AND key_sealed = $3",
                )
                .bind(sealed)
                .bind(&row.lineage)
                .bind(&row.key_sealed)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n == 0 {
                    return Ok(Some(format!("the CA of lineage {}", row.lineage)));
                }
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(None)
        }.await)
        .map_err(q("re-sealing secrets"))?;
        match changed {
            None => Ok(()),
            Some(what) => Err(ControlError::conflict(
                "secrets_changed",
                format!(
                    "{what} changed or went during the rotation; nothing was written, run it again"
                ),
            )),
        }
    }
}
