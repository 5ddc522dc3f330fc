//! Template layers in object storage, by layer id: which layers a node lacking them can
//! fetch, and from where. Layer ids are content-addressed (equal on every node), so one
//! record serves every template that shares the layer.

use super::{Db, q};
use crate::error::ControlError;
use crate::with_db;

/// One layer's archive in object storage.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredLayer {
    pub layer_id: String,
    /// What [`crate::remote::ImageStore::pull`] takes (checked with
    /// [`crate::remote::valid_reference`] before use).
    pub reference: String,
    /// The archive's bytes.
    pub bytes: i64,
    pub stored_at: i64,
}

/// The stored-layers aggregate (node use only: layers are no tenant's object; a template
/// row names the ones it uses).
#[derive(Clone, Debug)]
pub struct Layers {
    pub(super) db: Db,
}

impl Layers {
    /// Record that layer `id` is stored under `reference`. A layer stored already keeps
    /// its first record (both hold the same content); false then.
    pub async fn record(
        &self,
        id: &str,
        reference: &str,
        bytes: u64,
        now: i64,
    ) -> Result<bool, ControlError> {
        let n = with_db!(self.db, p => sqlx::query(
            "INSERT INTO stored_layers (layer_id, reference, bytes, stored_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT (layer_id) DO NOTHING",
        )
        .bind(id)
        .bind(reference)
        .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
        .bind(now)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("recording a stored layer"))?;
        Ok(n == 1)
    }

    /// Layer `id`'s record, if it is stored.
    pub async fn get(&self, id: &str) -> Result<Option<StoredLayer>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT * FROM stored_layers WHERE layer_id = $1"
        ).bind(id).fetch_optional(p).await)
        .map_err(q("reading a stored layer"))
    }

    /// Of `ids`, those stored, in the order given.
    pub async fn stored(&self, ids: &[String]) -> Result<Vec<String>, ControlError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if self.get(id).await?.is_some() {
                out.push(id.clone());
            }
        }
        Ok(out)
    }

    /// Drop layer `id`'s record (its archive turned out unusable). Idempotent.
    pub async fn forget(&self, id: &str) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "DELETE FROM stored_layers WHERE layer_id = $1"
        ).bind(id).execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("forgetting a stored layer"))?;
        Ok(())
    }
}
