//! Named volumes: a workspace's own disk image on its home node, and which sandboxes and
//! snapshots refer to it (`sandbox_volumes`, `snapshot_volumes`).

use super::{Db, in_admission, q};
use crate::error::ControlError;
use crate::with_db;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct VolumeRow {
    pub id: String,
    pub workspace_id: String,
    pub name: String,
    pub size_bytes: i64,
    /// The node that holds its image, or [`STORED_VOLUME`] while it is only in object
    /// storage (moved away by a drain).
    pub node_id: String,
    pub created_at: i64,
    /// The stored image (JSON [`StoredVolume`]) while `node_id` is [`STORED_VOLUME`].
    #[sqlx(default)]
    pub remote_image: Option<String>,
}

/// The owner of a volume that lives only in object storage: not a node's name; the node of
/// the next create that mounts it fetches it and takes it.
pub const STORED_VOLUME: &str = "~stored";

/// Where a volume that left its node is in object storage.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredVolume {
    pub reference: String,
    pub bytes: u64,
}

/// One volume mounted into a sandbox (or recorded by a snapshot).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct VolumeMountRow {
    pub volume_id: String,
    /// Absolute, normalized path inside the sandbox.
    pub path: String,
    pub read_only: bool,
}

/// The volumes aggregate.
#[derive(Clone, Debug)]
pub struct Volumes {
    pub(super) db: Db,
}

impl Volumes {
    /// Insert a volume unless its workspace keeps `max` volumes already (0: no limit); false
    /// then. Checked and inserted under the workspace's admission lock. A name the workspace
    /// uses already is a `Conflict` (`volume_exists`).
    pub async fn insert(&self, v: &VolumeRow, max: u32) -> Result<bool, ControlError> {
        let done = in_admission!(self.db, &v.workspace_id, tx => {
            let taken: Option<(String,)> = sqlx::query_as(
                "SELECT id FROM volumes WHERE workspace_id = $1 AND name = $2",
            )
            .bind(&v.workspace_id)
            .bind(&v.name)
            .fetch_optional(&mut *tx)
            .await?;
            if taken.is_some() {
                None
            } else {
                Some(sqlx::query(
                    "INSERT INTO volumes (id, workspace_id, name, size_bytes, node_id, created_at)
                     SELECT $1, $2, $3, $4, $5, $6
                     WHERE $7 = 0 OR (SELECT COUNT(*) FROM volumes WHERE workspace_id = $2) < $7",
                )
                .bind(&v.id)
                .bind(&v.workspace_id)
                .bind(&v.name)
                .bind(v.size_bytes)
                .bind(&v.node_id)
                .bind(v.created_at)
                .bind(i64::from(max))
                .execute(&mut *tx)
                .await?
                .rows_affected())
            }
        })
        .map_err(q("inserting a volume"))?;
        match done {
            None => Err(ControlError::conflict(
                "volume_exists",
                format!("a volume named {:?} exists already", v.name),
            )),
            Some(n) => Ok(n == 1),
        }
    }

    /// A volume of the given workspace, by name.
    pub async fn get(
        &self,
        workspace_id: &str,
        name: &str,
    ) -> Result<Option<VolumeRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT * FROM volumes WHERE workspace_id = $1 AND name = $2"
        ).bind(workspace_id).bind(name).fetch_optional(p).await)
        .map_err(q("reading a volume"))
    }

    /// A volume by id.
    pub async fn by_id(&self, id: &str) -> Result<Option<VolumeRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT * FROM volumes WHERE id = $1"
        ).bind(id).fetch_optional(p).await)
        .map_err(q("reading a volume"))
    }

    /// The workspace's volumes by name.
    pub async fn list(&self, workspace_id: &str) -> Result<Vec<VolumeRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT * FROM volumes WHERE workspace_id = $1 ORDER BY name"
        ).bind(workspace_id).fetch_all(p).await)
        .map_err(q("listing volumes"))
    }

    /// Every volume homed on `node_id` (reconciliation).
    pub async fn on_node(&self, node_id: &str) -> Result<Vec<VolumeRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT * FROM volumes WHERE node_id = $1"
        ).bind(node_id).fetch_all(p).await)
        .map_err(q("listing a node's volumes"))
    }

    /// What keeps volume `id` from being deleted: a sandbox that holds it (not destroyed or
    /// failed) or a snapshot that refers to it, as a sentence; `None` if nothing does.
    pub async fn user(&self, id: &str) -> Result<Option<String>, ControlError> {
        let sandbox: Option<(String,)> = with_db!(self.db, p => sqlx::query_as(
            // The statuses of a sandbox that holds its volumes (may run, or wake, with them).
            "SELECT s.id FROM sandbox_volumes v JOIN sandboxes s ON s.id = v.sandbox_id
             WHERE v.volume_id = $1
               AND s.status IN ('creating', 'running', 'suspended', 'pooled') LIMIT 1"
        ).bind(id).fetch_optional(p).await)
        .map_err(q("looking for a volume's sandboxes"))?;
        if let Some((s,)) = sandbox {
            return Ok(Some(format!("sandbox {s} mounts it")));
        }
        let snapshot: Option<(String,)> = with_db!(self.db, p => sqlx::query_as(
            "SELECT s.id FROM snapshot_volumes v JOIN snapshots s ON s.id = v.snapshot_id
             WHERE v.volume_id = $1 LIMIT 1"
        ).bind(id).fetch_optional(p).await)
        .map_err(q("looking for a volume's snapshots"))?;
        Ok(snapshot.map(|(s,)| format!("snapshot {s} refers to it")))
    }

    /// A sandbox (not destroyed or failed) that mounts volume `id`, if any (snapshots that
    /// refer to it aside).
    pub async fn sandbox_user(&self, id: &str) -> Result<Option<String>, ControlError> {
        let row: Option<(String,)> = with_db!(self.db, p => sqlx::query_as(
            "SELECT s.id FROM sandbox_volumes v JOIN sandboxes s ON s.id = v.sandbox_id
             WHERE v.volume_id = $1
               AND s.status IN ('creating', 'running', 'suspended', 'pooled') LIMIT 1"
        ).bind(id).fetch_optional(p).await)
        .map_err(q("looking for a volume's sandboxes"))?;
        Ok(row.map(|(s,)| s))
    }

    /// Volume `id` left node `from` for object storage (`remote`: a [`StoredVolume`] JSON),
    /// if it is still `from`'s. One statement: false when something changed it meanwhile.
    pub async fn store_away(
        &self,
        id: &str,
        from: &str,
        remote: &str,
    ) -> Result<bool, ControlError> {
        let n = with_db!(self.db, p => sqlx::query(
            "UPDATE volumes SET node_id = $1, remote_image = $2 WHERE id = $3 AND node_id = $4"
        ).bind(STORED_VOLUME).bind(remote).bind(id).bind(from).execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("recording a volume in object storage"))?;
        Ok(n == 1)
    }

    /// Node `to` took volume `id` from object storage, if it is still there. One statement:
    /// of two nodes, one wins.
    pub async fn bring_here(&self, id: &str, to: &str) -> Result<bool, ControlError> {
        let n = with_db!(self.db, p => sqlx::query(
            "UPDATE volumes SET node_id = $1, remote_image = NULL WHERE id = $2 AND node_id = $3"
        ).bind(to).bind(id).bind(STORED_VOLUME).execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("taking a volume from object storage"))?;
        Ok(n == 1)
    }

    /// The sandbox (not destroyed or failed, other than `except`) that mounts volume `id`
    /// read-write, if any.
    pub async fn writer(&self, id: &str, except: &str) -> Result<Option<String>, ControlError> {
        let row: Option<(String,)> = with_db!(self.db, p => sqlx::query_as(
            "SELECT s.id FROM sandbox_volumes v JOIN sandboxes s ON s.id = v.sandbox_id
             WHERE v.volume_id = $1 AND v.read_only = $2 AND s.id <> $3
               AND s.status IN ('creating', 'running', 'suspended', 'pooled') LIMIT 1"
        ).bind(id).bind(false).bind(except).fetch_optional(p).await)
        .map_err(q("looking for a volume's writer"))?;
        Ok(row.map(|r| r.0))
    }

    /// Delete a volume's row (and the mount records of sandboxes that ended); false if it
    /// was gone.
    pub async fn delete(&self, id: &str) -> Result<bool, ControlError> {
        let n = with_db!(self.db, p => async {
            let mut tx = p.begin().await?;
            sqlx::query("DELETE FROM sandbox_volumes WHERE volume_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM snapshot_volumes WHERE volume_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let n = sqlx::query("DELETE FROM volumes WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            Ok::<_, sqlx::Error>(n)
        }.await)
        .map_err(q("deleting a volume"))?;
        Ok(n > 0)
    }

    /// Record the volumes sandbox `sandbox_id` mounts.
    pub async fn add_mounts(
        &self,
        sandbox_id: &str,
        mounts: &[VolumeMountRow],
    ) -> Result<(), ControlError> {
        self.add(
            "INSERT INTO sandbox_volumes (sandbox_id, volume_id, path, read_only)
             VALUES ($1, $2, $3, $4)",
            sandbox_id,
            mounts,
        )
        .await
    }

    /// Record the volumes a snapshot refers to.
    pub async fn add_snapshot_refs(
        &self,
        snapshot_id: &str,
        mounts: &[VolumeMountRow],
    ) -> Result<(), ControlError> {
        self.add(
            "INSERT INTO snapshot_volumes (snapshot_id, volume_id, path, read_only)
             VALUES ($1, $2, $3, $4)",
            snapshot_id,
            mounts,
        )
        .await
    }

    async fn add(
        &self,
        sql: &'static str,
        owner: &str,
        mounts: &[VolumeMountRow],
    ) -> Result<(), ControlError> {
        if mounts.is_empty() {
            return Ok(());
        }
        with_db!(self.db, p => async {
            let mut tx = p.begin().await?;
            for m in mounts {
                sqlx::query(sql)
                    .bind(owner)
                    .bind(&m.volume_id)
                    .bind(&m.path)
                    .bind(m.read_only)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(())
        }.await)
        .map_err(q("recording volume mounts"))
    }

    /// The volumes sandbox `sandbox_id` mounts, by path.
    pub async fn mounts_of(&self, sandbox_id: &str) -> Result<Vec<VolumeMountRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT volume_id, path, read_only FROM sandbox_volumes WHERE sandbox_id = $1
             ORDER BY path"
        ).bind(sandbox_id).fetch_all(p).await)
        .map_err(q("reading a sandbox's volumes"))
    }

    /// The volumes a snapshot refers to, by path.
    pub async fn snapshot_refs(
        &self,
        snapshot_id: &str,
    ) -> Result<Vec<VolumeMountRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT volume_id, path, read_only FROM snapshot_volumes WHERE snapshot_id = $1
             ORDER BY path"
        ).bind(snapshot_id).fetch_all(p).await)
        .map_err(q("reading a snapshot's volumes"))
    }

    /// Forget a deleted snapshot's references.
    pub async fn forget_snapshot(&self, snapshot_id: &str) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "DELETE FROM snapshot_volumes WHERE snapshot_id = $1"
        ).bind(snapshot_id).execute(p).await.map(drop))
        .map_err(q("forgetting a snapshot's volumes"))?;
        Ok(())
    }
}
