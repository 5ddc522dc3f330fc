//! The E2B tables: the template id a sandbox was asked for and its envd access tokens
//! (hashes only). On the control layer's database, beside everything else.

use sandpit_control::ControlError;
use sandpit_control::store::{Db, Store, q, with_db};

/// Most envd tokens kept per sandbox (one per create or connect); older ones stop working.
pub const MAX_TOKENS_PER_SANDBOX: i64 = 16;

#[derive(Clone, Debug)]
pub struct E2bStore {
    db: Db,
}

/// `store.e2b()`: the E2B tables of a [`Store`]'s database.
pub trait E2bTables {
    fn e2b(&self) -> E2bStore;
}

impl E2bTables for Store {
    fn e2b(&self) -> E2bStore {
        E2bStore {
            db: self.db().clone(),
        }
    }
}

impl E2bStore {
    pub async fn insert_sandbox(
        &self,
        sandbox_id: &str,
        workspace_id: &str,
        template_id: &str,
    ) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "INSERT INTO e2b_sandboxes (sandbox_id, workspace_id, template_id) VALUES ($1, $2, $3)
             ON CONFLICT (sandbox_id) DO NOTHING",
        )
        .bind(sandbox_id)
        .bind(workspace_id)
        .bind(template_id)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("storing a sandbox's E2B fields"))?;
        Ok(())
    }

    /// The templateID a sandbox of the workspace was created with through the E2B API.
    pub async fn template_of(
        &self,
        workspace_id: &str,
        sandbox_id: &str,
    ) -> Result<Option<String>, ControlError> {
        let row: Option<(String,)> = with_db!(self.db, p => sqlx::query_as(
            "SELECT template_id FROM e2b_sandboxes WHERE workspace_id = $1 AND sandbox_id = $2",
        )
        .bind(workspace_id)
        .bind(sandbox_id)
        .fetch_optional(p).await)
        .map_err(q("reading a sandbox's E2B fields"))?;
        Ok(row.map(|r| r.0))
    }

    /// Store a new envd token's hash; drop the oldest past [`MAX_TOKENS_PER_SANDBOX`].
    pub async fn insert_token(
        &self,
        sandbox_id: &str,
        hash: &str,
        now: i64,
    ) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "INSERT INTO e2b_envd_tokens (token_hash, sandbox_id, created_at) VALUES ($1, $2, $3)",
        )
        .bind(hash)
        .bind(sandbox_id)
        .bind(now)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("storing an envd token"))?;
        with_db!(self.db, p => sqlx::query(
            "DELETE FROM e2b_envd_tokens WHERE sandbox_id = $1 AND token_hash NOT IN
               (SELECT token_hash FROM e2b_envd_tokens WHERE sandbox_id = $1
                ORDER BY created_at DESC, token_hash LIMIT $2)",
        )
        .bind(sandbox_id)
        .bind(MAX_TOKENS_PER_SANDBOX)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("pruning envd tokens"))?;
        Ok(())
    }

    /// Whether `hash` is an envd token of the sandbox.
    pub async fn token_valid(&self, sandbox_id: &str, hash: &str) -> Result<bool, ControlError> {
        let row: Option<(String,)> = with_db!(self.db, p => sqlx::query_as(
            "SELECT sandbox_id FROM e2b_envd_tokens WHERE sandbox_id = $1 AND token_hash = $2",
        )
        .bind(sandbox_id)
        .bind(hash)
        .fetch_optional(p).await)
        .map_err(q("reading an envd token"))?;
        Ok(row.is_some())
    }
}
