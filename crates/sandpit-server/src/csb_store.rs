//! The CodeSandbox tables (seed 000), beside the compat surface (`crate::compat`) that uses
//! them, outside it so the shared extractors and the preview proxy need not import it: what the
//! CSB API shows of a sandbox beyond Sandpit's own row, agent gateway tokens, VM tags and
//! aliases, trusted preview hosts and download links. On the control layer's [`Db`], so
//! they live in the same database (SQLite or PostgreSQL) as everything else.

use sandpit_control::ControlError;
use sandpit_control::store::{Db, Store, q, with_db};

/// What the CodeSandbox-compatible API shows of a sandbox beyond Sandpit's own row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CsbSandboxRow {
    pub sandbox_id: String,
    pub workspace_id: String,
    pub title: Option<String>,
    pub description: Option<String>,
    /// JSON array of strings.
    pub tags: String,
    /// 0 public, 1 unlisted, 2 private.
    pub privacy: i64,
    pub tier: String,
}

/// An agent gateway token (without its hash).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CsbAgentTokenRow {
    pub sandbox_id: String,
    pub workspace_id: String,
    /// `read` or `write`.
    pub permission: String,
    pub expires_at: i64,
    /// A session's Linux user; `None`: root.
    pub username: Option<String>,
    pub single_use: bool,
}

/// The CodeSandbox tables.
#[derive(Clone, Debug)]
pub struct CsbStore {
    db: Db,
}

/// `store.csb()`: the CodeSandbox tables of a [`Store`]'s database.
pub trait CsbTables {
    fn csb(&self) -> CsbStore;
}

impl CsbTables for Store {
    fn csb(&self) -> CsbStore {
        CsbStore {
            db: self.db().clone(),
        }
    }
}

impl CsbStore {
    pub async fn upsert_sandbox(&self, c: &CsbSandboxRow) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "INSERT INTO csb_sandboxes (sandbox_id, workspace_id, title, description, tags, privacy, tier)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (sandbox_id) DO UPDATE SET title = excluded.title,
                description = excluded.description, tags = excluded.tags,
                privacy = excluded.privacy, tier = excluded.tier
             WHERE csb_sandboxes.workspace_id = excluded.workspace_id",
        )
        .bind(&c.sandbox_id)
        .bind(&c.workspace_id)
        .bind(&c.title)
        .bind(&c.description)
        .bind(&c.tags)
        .bind(c.privacy)
        .bind(&c.tier)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("storing a sandbox's CodeSandbox fields"))?;
        Ok(())
    }

    pub async fn get_sandbox(
        &self,
        workspace_id: &str,
        sandbox_id: &str,
    ) -> Result<Option<CsbSandboxRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT * FROM csb_sandboxes WHERE workspace_id = $1 AND sandbox_id = $2"
        )
        .bind(workspace_id)
        .bind(sandbox_id)
        .fetch_optional(p).await)
        .map_err(q("reading a sandbox's CodeSandbox fields"))
    }

    /// The workspace's CodeSandbox fields of every sandbox that has them.
    pub async fn list_sandboxes(
        &self,
        workspace_id: &str,
    ) -> Result<Vec<CsbSandboxRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as("SELECT * FROM csb_sandboxes WHERE workspace_id = $1")
            .bind(workspace_id)
            .fetch_all(p).await)
        .map_err(q("listing CodeSandbox fields"))
    }

    pub async fn insert_agent_token(
        &self,
        hash: &str,
        t: &CsbAgentTokenRow,
    ) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "INSERT INTO csb_agent_tokens (token_hash, sandbox_id, workspace_id, permission, expires_at,
                username, single_use)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(hash)
        .bind(&t.sandbox_id)
        .bind(&t.workspace_id)
        .bind(&t.permission)
        .bind(t.expires_at)
        .bind(&t.username)
        .bind(t.single_use)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("inserting an agent gateway token"))?;
        Ok(())
    }

    /// An agent gateway token of the given sandbox by its hash (expired ones included; the
    /// caller compares `expires_at`).
    pub async fn agent_token(
        &self,
        sandbox_id: &str,
        hash: &str,
    ) -> Result<Option<CsbAgentTokenRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT sandbox_id, workspace_id, permission, expires_at, username, single_use
             FROM csb_agent_tokens WHERE sandbox_id = $1 AND token_hash = $2",
        )
        .bind(sandbox_id)
        .bind(hash)
        .fetch_optional(p).await)
        .map_err(q("looking up an agent gateway token"))
    }

    /// Use up a single-use gateway token: true for the one caller that deleted it.
    pub async fn consume_agent_token(&self, hash: &str) -> Result<bool, ControlError> {
        let n = with_db!(self.db, p => sqlx::query(
            "DELETE FROM csb_agent_tokens WHERE token_hash = $1 AND single_use = TRUE"
        )
        .bind(hash)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("using up a session token"))?;
        Ok(n == 1)
    }

    /// Drop a sandbox's expired gateway tokens.
    pub async fn prune_agent_tokens(&self, sandbox_id: &str, now: i64) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "DELETE FROM csb_agent_tokens WHERE sandbox_id = $1 AND expires_at <= $2"
        )
        .bind(sandbox_id)
        .bind(now)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("pruning agent gateway tokens"))?;
        Ok(())
    }

    pub async fn insert_tag(
        &self,
        id: &str,
        workspace_id: &str,
        vm_ids: &str,
        now: i64,
    ) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "INSERT INTO csb_tags (id, workspace_id, vm_ids, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(workspace_id)
        .bind(vm_ids)
        .bind(now)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("inserting a VM tag"))?;
        Ok(())
    }

    /// Whether the workspace has this tag.
    pub async fn tag_exists(&self, workspace_id: &str, id: &str) -> Result<bool, ControlError> {
        let n: (i64,) = with_db!(self.db, p => sqlx::query_as(
            "SELECT COUNT(*) FROM csb_tags WHERE workspace_id = $1 AND id = $2"
        )
        .bind(workspace_id)
        .bind(id)
        .fetch_one(p).await)
        .map_err(q("reading a VM tag"))?;
        Ok(n.0 > 0)
    }

    pub async fn set_alias(
        &self,
        workspace_id: &str,
        namespace: &str,
        alias: &str,
        tag_id: &str,
    ) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "INSERT INTO csb_aliases (workspace_id, namespace, alias, tag_id) VALUES ($1, $2, $3, $4)
             ON CONFLICT (workspace_id, namespace, alias) DO UPDATE SET tag_id = excluded.tag_id",
        )
        .bind(workspace_id)
        .bind(namespace)
        .bind(alias)
        .bind(tag_id)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("assigning a VM tag alias"))?;
        Ok(())
    }

    /// The workspace's trusted preview hosts with when each was added, oldest first.
    pub async fn list_preview_hosts(
        &self,
        workspace_id: &str,
    ) -> Result<Vec<(String, i64)>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT host, inserted_at FROM csb_preview_hosts WHERE workspace_id = $1
             ORDER BY inserted_at, host",
        )
        .bind(workspace_id)
        .fetch_all(p).await)
        .map_err(q("listing preview hosts"))
    }

    /// Add hosts (`replace`: make them the whole list), in one transaction.
    pub async fn put_preview_hosts(
        &self,
        workspace_id: &str,
        hosts: &[String],
        replace: bool,
        now: i64,
    ) -> Result<(), ControlError> {
        with_db!(self.db, p => async {
            let mut tx = p.begin().await?;
            if replace {
                sqlx::query("DELETE FROM csb_preview_hosts WHERE workspace_id = $1")
                    .bind(workspace_id)
                    .execute(&mut *tx)
                    .await?;
            }
            for h in hosts {
                sqlx::query(
                    "INSERT INTO csb_preview_hosts (workspace_id, host, inserted_at) VALUES ($1, $2, $3)
                     ON CONFLICT (workspace_id, host) DO NOTHING",
                )
                .bind(workspace_id)
                .bind(h)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await
        }.await)
        .map_err(q("storing preview hosts"))
    }

    pub async fn insert_download_token(
        &self,
        hash: &str,
        sandbox_id: &str,
        path: &str,
        expires_at: i64,
    ) -> Result<(), ControlError> {
        let now = crate::util::now_ms();
        with_db!(self.db, p => async {
            sqlx::query("DELETE FROM csb_download_tokens WHERE expires_at <= $1")
                .bind(now)
                .execute(p)
                .await?;
            sqlx::query(
                "INSERT INTO csb_download_tokens (token_hash, sandbox_id, path, expires_at)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(hash)
            .bind(sandbox_id)
            .bind(path)
            .bind(expires_at)
            .execute(p)
            .await
            .map(|r| r.rows_affected())
        }.await)
        .map_err(q("inserting a download link"))?;
        Ok(())
    }

    /// The sandbox and path of a download link that has not expired.
    pub async fn download_token(
        &self,
        hash: &str,
        now: i64,
    ) -> Result<Option<(String, String)>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT sandbox_id, path FROM csb_download_tokens WHERE token_hash = $1 AND expires_at > $2",
        )
        .bind(hash)
        .bind(now)
        .fetch_optional(p).await)
        .map_err(q("looking up a download link"))
    }
}
