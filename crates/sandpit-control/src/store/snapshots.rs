//! Named snapshots: a sandbox's files and memory image, kept under `snapshots/<id>/`.

use super::{Db, in_admission, q};
use crate::error::ControlError;
use crate::with_db;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SnapshotRow {
    pub id: String,
    pub workspace_id: String,
    pub sandbox_id: String,
    pub template_id: String,
    pub template_name: String,
    pub size: String,
    pub env: String,
    pub egress: String,
    /// Whether a memory image was taken (false: files only, starts with a fresh boot).
    pub has_memory: bool,
    pub size_bytes: i64,
    pub created_at: i64,
    /// Where it is in object storage (JSON, [`crate::remote::RemoteImage`], decoded
    /// fail-closed); `None` without an object store.
    pub remote_image: Option<String>,
}

/// The snapshots aggregate.
#[derive(Clone, Debug)]
pub struct Snapshots {
    pub(super) db: Db,
}

impl Snapshots {
    /// Insert a snapshot unless its workspace keeps `max` snapshots already (0: no limit);
    /// false then. Checked and inserted under the workspace's admission lock.
    pub async fn insert(&self, s: &SnapshotRow, max: u32) -> Result<bool, ControlError> {
        let done = in_admission!(self.db, &s.workspace_id, tx => sqlx::query(
            "INSERT INTO snapshots (id, workspace_id, sandbox_id, template_id, template_name,
                size, env, egress, has_memory, size_bytes, created_at, remote_image)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $13
             WHERE $12 = 0 OR (SELECT COUNT(*) FROM snapshots WHERE workspace_id = $2) < $12",
        )
        .bind(&s.id)
        .bind(&s.workspace_id)
        .bind(&s.sandbox_id)
        .bind(&s.template_id)
        .bind(&s.template_name)
        .bind(&s.size)
        .bind(&s.env)
        .bind(&s.egress)
        .bind(s.has_memory)
        .bind(s.size_bytes)
        .bind(s.created_at)
        .bind(i64::from(max))
        .bind(&s.remote_image)
        .execute(&mut *tx)
        .await?
        .rows_affected())
        .map_err(q("inserting a snapshot"))?;
        Ok(done == 1)
    }

    /// How many snapshots a workspace keeps.
    pub async fn count(&self, workspace_id: &str) -> Result<i64, ControlError> {
        let n: (i64,) = with_db!(self.db, p => sqlx::query_as(
            "SELECT COUNT(*) FROM snapshots WHERE workspace_id = $1"
        ).bind(workspace_id).fetch_one(p).await)
        .map_err(q("counting snapshots"))?;
        Ok(n.0)
    }

    /// A snapshot of the given workspace.
    pub async fn get(
        &self,
        workspace_id: &str,
        id: &str,
    ) -> Result<Option<SnapshotRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT * FROM snapshots WHERE id = $1 AND workspace_id = $2"
        ).bind(id).bind(workspace_id).fetch_optional(p).await)
        .map_err(q("reading a snapshot"))
    }

    /// The workspace's snapshots of one sandbox, oldest first.
    pub async fn list(
        &self,
        workspace_id: &str,
        sandbox_id: &str,
    ) -> Result<Vec<SnapshotRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT * FROM snapshots WHERE workspace_id = $1 AND sandbox_id = $2
             ORDER BY created_at, id",
        )
        .bind(workspace_id)
        .bind(sandbox_id)
        .fetch_all(p).await)
        .map_err(q("listing snapshots"))
    }

    /// Delete a snapshot of the given workspace; false if there was none.
    pub async fn delete(&self, workspace_id: &str, id: &str) -> Result<bool, ControlError> {
        let n = with_db!(self.db, p => sqlx::query(
            "DELETE FROM snapshots WHERE id = $1 AND workspace_id = $2"
        ).bind(id).bind(workspace_id).execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("deleting a snapshot"))?;
        Ok(n > 0)
    }

    /// Node use: snapshot `id` of any workspace (an upload or fetch of its files, or a
    /// placement decision; the caller authorized the request that names it, or acts for
    /// the node itself).
    pub async fn by_id(&self, id: &str) -> Result<Option<SnapshotRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT * FROM snapshots WHERE id = $1"
        ).bind(id).fetch_optional(p).await)
        .map_err(q("reading a snapshot"))
    }

    /// Node use: replace snapshot `id`'s remote image record with `record` if it is still
    /// `expect` (compare-and-set, so an upload that was overtaken records nothing). False
    /// when the record changed or the snapshot is gone.
    pub async fn set_remote_image(
        &self,
        id: &str,
        expect: Option<&str>,
        record: Option<&str>,
    ) -> Result<bool, ControlError> {
        let n = match expect {
            Some(old) => with_db!(self.db, p => sqlx::query(
                "UPDATE snapshots SET remote_image = $1 WHERE id = $2 AND remote_image = $3",
            )
            .bind(record).bind(id).bind(old)
            .execute(p).await.map(|r| r.rows_affected())),
            None => with_db!(self.db, p => sqlx::query(
                "UPDATE snapshots SET remote_image = $1 WHERE id = $2 AND remote_image IS NULL",
            )
            .bind(record).bind(id)
            .execute(p).await.map(|r| r.rows_affected())),
        }
        .map_err(q("recording a snapshot's remote image"))?;
        Ok(n == 1)
    }

    /// Server use: every snapshot id, for removing unreferenced snapshot directories.
    pub async fn ids(&self) -> Result<Vec<String>, ControlError> {
        let rows: Vec<(String,)> = with_db!(self.db, p => sqlx::query_as(
            "SELECT id FROM snapshots"
        ).fetch_all(p).await)
        .map_err(q("listing snapshot ids"))?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }
}
