//! The persistent store: organizations, workspaces, tokens, templates and sandboxes in SQLite
//! (through sqlx, so a PostgreSQL implementation can follow with its own migrations).
//!
//! Every query that reads or changes a tenant's object takes the workspace it is scoped to,
//! except the few used by the server itself (reaper, reconciliation), which say so.

use std::path::Path;
use std::str::FromStr;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::error::ServerError;

/// A sandbox row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SandboxRow {
    pub id: String,
    pub workspace_id: String,
    pub template_id: String,
    pub template_name: String,
    pub mode: String,
    pub status: String,
    pub size: String,
    /// JSON object.
    pub env: String,
    /// JSON object.
    pub metadata: String,
    /// JSON [`sandpit_api_types::EgressPolicy`].
    pub egress: String,
    pub timeout_ms: Option<i64>,
    pub idle_timeout_ms: Option<i64>,
    pub expires_at: Option<i64>,
    pub last_active_at: i64,
    pub slot: Option<i64>,
    pub runtime_id: String,
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// `private` or `public` ([`sandpit_api_types::PreviewPrivacy`]).
    pub preview_privacy: String,
}

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
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TemplateRow {
    pub id: String,
    pub name: String,
    pub workspace_id: Option<String>,
    pub description: String,
    pub rootfs: String,
    pub default_egress: String,
    pub created_at: i64,
    /// JSON array of layer directories, lowest first; `[]`: `rootfs` is the only layer.
    pub layers: String,
    /// JSON `sandpit_image::ImageConfig`.
    pub config: String,
    /// `building`, `ready`, `failed` or `deleted`.
    pub status: String,
    pub error: Option<String>,
    /// `builtin`, `image:<reference>` or `dockerfile`.
    pub source: String,
    pub updated_at: i64,
}

impl TemplateRow {
    /// A built-in template (ready, no build).
    pub fn builtin(
        id: &str,
        name: &str,
        description: &str,
        rootfs: String,
        now: i64,
    ) -> TemplateRow {
        TemplateRow {
            id: id.into(),
            name: name.into(),
            workspace_id: None,
            description: description.into(),
            rootfs,
            default_egress: r#"{"mode":"allow_all"}"#.into(),
            created_at: now,
            layers: "[]".into(),
            config: "{}".into(),
            status: "ready".into(),
            error: None,
            source: "builtin".into(),
            updated_at: now,
        }
    }
}

/// What [`Store::insert_template`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateInsert {
    Inserted,
    NameTaken,
    TooManyTemplates,
    TooManyBuilds,
}

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

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkspaceRow {
    pub id: String,
    pub org_id: String,
    pub name: String,
}

/// What an earlier request with the same idempotency key left.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct IdempotencyRow {
    pub request_hash: String,
    /// `None` while that request still runs.
    pub status: Option<i64>,
    pub response: Option<String>,
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

fn q(op: &'static str) -> impl FnOnce(sqlx::Error) -> ServerError {
    move |source| ServerError::Store { op, source }
}

impl Store {
    /// Open (creating if needed) the SQLite file and apply migrations.
    pub async fn open(path: &Path) -> Result<Store, ServerError> {
        let url = format!("sqlite://{}", path.display());
        let opts = SqliteConnectOptions::from_str(&url)
            .map_err(q("parsing the database path"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: an acknowledged write survives a power loss, not just a crash.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await
            .map_err(q("opening the database"))?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|source| ServerError::Migrate { source })?;
        Ok(Store { pool })
    }

    // ---- organizations, workspaces, tokens ----

    pub async fn count_orgs(&self) -> Result<i64, ServerError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM orgs WHERE id != 'org_system'")
            .fetch_one(&self.pool)
            .await
            .map_err(q("counting organizations"))?;
        Ok(row.get::<i64, _>("n"))
    }

    pub async fn insert_org(&self, id: &str, name: &str, now: i64) -> Result<(), ServerError> {
        sqlx::query("INSERT INTO orgs (id, name, created_at) VALUES (?, ?, ?)")
            .bind(id)
            .bind(name)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(q("inserting an organization"))?;
        Ok(())
    }

    pub async fn insert_workspace(&self, ws: &WorkspaceRow, now: i64) -> Result<(), ServerError> {
        sqlx::query("INSERT INTO workspaces (id, org_id, name, created_at) VALUES (?, ?, ?, ?)")
            .bind(&ws.id)
            .bind(&ws.org_id)
            .bind(&ws.name)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(q("inserting a workspace"))?;
        Ok(())
    }

    /// A workspace of the given organization.
    pub async fn get_workspace(
        &self,
        org_id: &str,
        id: &str,
    ) -> Result<Option<WorkspaceRow>, ServerError> {
        sqlx::query_as("SELECT id, org_id, name FROM workspaces WHERE id = ? AND org_id = ?")
            .bind(id)
            .bind(org_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading a workspace"))
    }

    pub async fn insert_token(&self, t: &TokenRow, hash: &str) -> Result<(), ServerError> {
        sqlx::query(
            "INSERT INTO api_tokens (id, workspace_id, token_hash, description, scopes, expires_at, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&t.id)
        .bind(&t.workspace_id)
        .bind(hash)
        .bind(&t.description)
        .bind(&t.scopes)
        .bind(t.expires_at)
        .bind(t.created_at)
        .execute(&self.pool)
        .await
        .map_err(q("inserting a token"))?;
        Ok(())
    }

    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenAuth>, ServerError> {
        sqlx::query_as(
            "SELECT t.id, t.workspace_id, w.org_id, t.scopes, t.expires_at
             FROM api_tokens t JOIN workspaces w ON w.id = t.workspace_id
             WHERE t.token_hash = ?",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("looking up a token"))
    }

    /// A token of the given workspace.
    pub async fn get_token(
        &self,
        workspace_id: &str,
        id: &str,
    ) -> Result<Option<TokenRow>, ServerError> {
        sqlx::query_as(
            "SELECT id, workspace_id, description, scopes, expires_at, created_at
             FROM api_tokens WHERE id = ? AND workspace_id = ?",
        )
        .bind(id)
        .bind(workspace_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("reading a token"))
    }

    pub async fn update_token(&self, t: &TokenRow) -> Result<(), ServerError> {
        sqlx::query(
            "UPDATE api_tokens SET description = ?, scopes = ?, expires_at = ?
             WHERE id = ? AND workspace_id = ?",
        )
        .bind(&t.description)
        .bind(&t.scopes)
        .bind(t.expires_at)
        .bind(&t.id)
        .bind(&t.workspace_id)
        .execute(&self.pool)
        .await
        .map_err(q("updating a token"))?;
        Ok(())
    }

    /// Delete a token of the given workspace; false if there was none.
    pub async fn delete_token(&self, workspace_id: &str, id: &str) -> Result<bool, ServerError> {
        let r = sqlx::query("DELETE FROM api_tokens WHERE id = ? AND workspace_id = ?")
            .bind(id)
            .bind(workspace_id)
            .execute(&self.pool)
            .await
            .map_err(q("deleting a token"))?;
        Ok(r.rows_affected() > 0)
    }

    // ---- templates ----

    pub async fn upsert_template(&self, t: &TemplateRow) -> Result<(), ServerError> {
        sqlx::query(
            "INSERT INTO templates (id, name, workspace_id, description, rootfs, default_egress, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT(id) DO UPDATE SET rootfs = excluded.rootfs, description = excluded.description",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(&t.workspace_id)
        .bind(&t.description)
        .bind(&t.rootfs)
        .bind(&t.default_egress)
        .bind(t.created_at)
        .execute(&self.pool)
        .await
        .map_err(q("saving a template"))?;
        Ok(())
    }

    /// A template by name, id or `namespace@alias` that the workspace may use (its own or a
    /// built-in one), in any status but `deleted`.
    pub async fn find_template(
        &self,
        workspace_id: &str,
        name_or_id: &str,
    ) -> Result<Option<TemplateRow>, ServerError> {
        let by_alias = match name_or_id.split_once('@') {
            Some((ns, alias)) => self.resolve_alias(workspace_id, ns, alias).await?,
            None => None,
        };
        let key = by_alias.as_deref().unwrap_or(name_or_id);
        sqlx::query_as(
            "SELECT * FROM templates
             WHERE (id = ? OR name = ?) AND (workspace_id IS NULL OR workspace_id = ?)
               AND status <> 'deleted'",
        )
        .bind(key)
        .bind(key)
        .bind(workspace_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("reading a template"))
    }

    /// Server use: a template by id, whoever owns it.
    pub async fn template_by_id(&self, id: &str) -> Result<Option<TemplateRow>, ServerError> {
        sqlx::query_as("SELECT * FROM templates WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading a template"))
    }

    pub async fn list_templates(
        &self,
        workspace_id: &str,
    ) -> Result<Vec<TemplateRow>, ServerError> {
        sqlx::query_as(
            "SELECT * FROM templates
             WHERE (workspace_id IS NULL OR workspace_id = ?) AND status <> 'deleted' ORDER BY name",
        )
        .bind(workspace_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing templates"))
    }

    /// Insert a new workspace template (status `building`) unless its name is taken in its
    /// workspace or by a built-in template (names are unique per workspace; built-in ones
    /// are every workspace's), or the workspace has `max_templates` templates (deleted ones
    /// aside) or `max_builds` builds under way (0: no limit). The limits are checked in the
    /// inserting statement, so concurrent creates never pass them.
    pub async fn insert_template(
        &self,
        t: &TemplateRow,
        max_templates: u32,
        max_builds: u32,
    ) -> Result<TemplateInsert, ServerError> {
        let done = sqlx::query(
            "INSERT INTO templates (id, name, workspace_id, description, rootfs, default_egress,
                created_at, layers, config, status, error, source, updated_at)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13
             WHERE NOT EXISTS (SELECT 1 FROM templates WHERE workspace_id IS NULL AND name = ?2)
               AND (?14 = 0 OR (SELECT COUNT(*) FROM templates
                                WHERE workspace_id = ?3 AND status <> 'deleted') < ?14)
               AND (?15 = 0 OR (SELECT COUNT(*) FROM templates
                                WHERE workspace_id = ?3 AND status = 'building') < ?15)
             ON CONFLICT DO NOTHING",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(&t.workspace_id)
        .bind(&t.description)
        .bind(&t.rootfs)
        .bind(&t.default_egress)
        .bind(t.created_at)
        .bind(&t.layers)
        .bind(&t.config)
        .bind(&t.status)
        .bind(&t.error)
        .bind(&t.source)
        .bind(t.updated_at)
        .bind(max_templates)
        .bind(max_builds)
        .execute(&self.pool)
        .await
        .map_err(q("creating a template"))?;
        if done.rows_affected() == 1 {
            return Ok(TemplateInsert::Inserted);
        }
        // Why not (for the answer only; the decision above was atomic).
        let ws = t.workspace_id.as_deref().unwrap_or_default();
        let (templates, builds) = self.count_templates(ws).await?;
        Ok(
            if max_templates > 0 && templates >= i64::from(max_templates) {
                TemplateInsert::TooManyTemplates
            } else if max_builds > 0 && builds >= i64::from(max_builds) {
                TemplateInsert::TooManyBuilds
            } else {
                TemplateInsert::NameTaken
            },
        )
    }

    /// A workspace's templates (deleted ones aside) and how many of them are building.
    pub async fn count_templates(&self, workspace_id: &str) -> Result<(i64, i64), ServerError> {
        let row: (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(status = 'building'), 0) FROM templates
             WHERE workspace_id = ? AND status <> 'deleted'",
        )
        .bind(workspace_id)
        .fetch_one(&self.pool)
        .await
        .map_err(q("counting templates"))?;
        Ok(row)
    }

    /// Server use: record a build's result.
    pub async fn finish_template_build(
        &self,
        id: &str,
        status: &str,
        layers: &str,
        config: &str,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), ServerError> {
        sqlx::query(
            "UPDATE templates SET status = ?, layers = ?, config = ?, error = ?, updated_at = ?
             WHERE id = ? AND status <> 'deleted'",
        )
        .bind(status)
        .bind(layers)
        .bind(config)
        .bind(error)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(q("finishing a template build"))?;
        Ok(())
    }

    /// Server use: move a template into `building` if it is in one of `from`; false when
    /// it is not (already building or built).
    pub async fn claim_build(
        &self,
        id: &str,
        from: &[&str],
        now: i64,
    ) -> Result<bool, ServerError> {
        let mut done = 0;
        for status in from {
            done += sqlx::query(
                "UPDATE templates SET status = 'building', error = NULL, updated_at = ? WHERE id = ? AND status = ?",
            )
            .bind(now)
            .bind(id)
            .bind(status)
            .execute(&self.pool)
            .await
            .map_err(q("starting a template build"))?
            .rows_affected();
        }
        Ok(done == 1)
    }

    /// Server use: builds that a crash interrupted fail.
    pub async fn fail_interrupted_builds(&self, now: i64) -> Result<u64, ServerError> {
        let done = sqlx::query(
            "UPDATE templates SET status = 'failed', error = 'the server stopped during the build', updated_at = ?
             WHERE status = 'building'",
        )
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(q("failing interrupted builds"))?;
        Ok(done.rows_affected())
    }

    /// Delete a workspace's template: its row stays (sandboxes and snapshots refer to it)
    /// with status `deleted` under a freed name; its aliases go.
    pub async fn delete_template(
        &self,
        workspace_id: &str,
        id: &str,
        now: i64,
    ) -> Result<bool, ServerError> {
        let mut tx = self.pool.begin().await.map_err(q("deleting a template"))?;
        sqlx::query("DELETE FROM template_aliases WHERE workspace_id = ? AND template_id = ?")
            .bind(workspace_id)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(q("deleting a template's aliases"))?;
        let done = sqlx::query(
            "UPDATE templates SET status = 'deleted', name = name || '#deleted-' || id, updated_at = ?
             WHERE id = ? AND workspace_id = ? AND status <> 'deleted'",
        )
        .bind(now)
        .bind(id)
        .bind(workspace_id)
        .execute(&mut *tx)
        .await
        .map_err(q("deleting a template"))?;
        tx.commit().await.map_err(q("deleting a template"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Sandboxes (not destroyed or failed) and snapshots that need the template.
    pub async fn template_dependents(
        &self,
        template_id: &str,
    ) -> Result<(Vec<SandboxRow>, i64), ServerError> {
        let sandboxes: Vec<SandboxRow> = sqlx::query_as(
            "SELECT * FROM sandboxes WHERE template_id = ? AND status NOT IN ('destroyed', 'failed')",
        )
        .bind(template_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing a template's sandboxes"))?;
        let snapshots: (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM snapshots WHERE template_id = ?")
                .bind(template_id)
                .fetch_one(&self.pool)
                .await
                .map_err(q("counting a template's snapshots"))?;
        Ok((sandboxes, snapshots.0))
    }

    // ---- template aliases ----

    /// Point `namespace@alias` at a template (creating or moving it).
    pub async fn set_alias(
        &self,
        workspace_id: &str,
        namespace: &str,
        alias: &str,
        template_id: &str,
        now: i64,
    ) -> Result<(), ServerError> {
        sqlx::query(
            "INSERT INTO template_aliases (workspace_id, namespace, alias, template_id, updated_at)
             VALUES (?, ?, ?, ?, ?)
             ON CONFLICT(workspace_id, namespace, alias) DO UPDATE
               SET template_id = excluded.template_id, updated_at = excluded.updated_at",
        )
        .bind(workspace_id)
        .bind(namespace)
        .bind(alias)
        .bind(template_id)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(q("setting an alias"))?;
        Ok(())
    }

    pub async fn delete_alias(
        &self,
        workspace_id: &str,
        namespace: &str,
        alias: &str,
    ) -> Result<bool, ServerError> {
        let done = sqlx::query(
            "DELETE FROM template_aliases WHERE workspace_id = ? AND namespace = ? AND alias = ?",
        )
        .bind(workspace_id)
        .bind(namespace)
        .bind(alias)
        .execute(&self.pool)
        .await
        .map_err(q("deleting an alias"))?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn resolve_alias(
        &self,
        workspace_id: &str,
        namespace: &str,
        alias: &str,
    ) -> Result<Option<String>, ServerError> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT template_id FROM template_aliases WHERE workspace_id = ? AND namespace = ? AND alias = ?",
        )
        .bind(workspace_id)
        .bind(namespace)
        .bind(alias)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("reading an alias"))?;
        Ok(row.map(|r| r.0))
    }

    /// `namespace@alias` names of a template in a workspace.
    pub async fn aliases_of(
        &self,
        workspace_id: &str,
        template_id: &str,
    ) -> Result<Vec<String>, ServerError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT namespace, alias FROM template_aliases WHERE workspace_id = ? AND template_id = ?
             ORDER BY namespace, alias",
        )
        .bind(workspace_id)
        .bind(template_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing aliases"))?;
        Ok(rows.into_iter().map(|(n, a)| format!("{n}@{a}")).collect())
    }

    // ---- sandboxes ----

    pub async fn insert_sandbox(&self, s: &SandboxRow) -> Result<(), ServerError> {
        sqlx::query(
            "INSERT INTO sandboxes (id, workspace_id, template_id, template_name, mode, status, size,
                env, metadata, egress, timeout_ms, idle_timeout_ms, expires_at, last_active_at, slot,
                runtime_id, error, created_at, updated_at, preview_privacy)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&s.id)
        .bind(&s.workspace_id)
        .bind(&s.template_id)
        .bind(&s.template_name)
        .bind(&s.mode)
        .bind(&s.status)
        .bind(&s.size)
        .bind(&s.env)
        .bind(&s.metadata)
        .bind(&s.egress)
        .bind(s.timeout_ms)
        .bind(s.idle_timeout_ms)
        .bind(s.expires_at)
        .bind(s.last_active_at)
        .bind(s.slot)
        .bind(&s.runtime_id)
        .bind(&s.error)
        .bind(s.created_at)
        .bind(s.updated_at)
        .bind(&s.preview_privacy)
        .execute(&self.pool)
        .await
        .map_err(q("inserting a sandbox"))?;
        Ok(())
    }

    /// Server use: a sandbox by id, whatever its workspace. Routes compare the workspace
    /// themselves so they can answer 403 as seed 003 asks.
    pub async fn get_sandbox(&self, id: &str) -> Result<Option<SandboxRow>, ServerError> {
        sqlx::query_as("SELECT * FROM sandboxes WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading a sandbox"))
    }

    /// The workspace's sandboxes with the given status, or every one not destroyed.
    pub async fn list_sandboxes(
        &self,
        workspace_id: &str,
        status: Option<&str>,
    ) -> Result<Vec<SandboxRow>, ServerError> {
        let query = match status {
            Some(_) => {
                "SELECT * FROM sandboxes WHERE workspace_id = ? AND status = ? ORDER BY created_at, id"
            }
            None => {
                "SELECT * FROM sandboxes WHERE workspace_id = ? AND status != 'destroyed' ORDER BY created_at, id"
            }
        };
        let mut qy = sqlx::query_as(query).bind(workspace_id);
        if let Some(s) = status {
            qy = qy.bind(s);
        }
        qy.fetch_all(&self.pool)
            .await
            .map_err(q("listing sandboxes"))
    }

    /// Server use: every sandbox in one of the given states.
    pub async fn sandboxes_with_status(
        &self,
        statuses: &[&str],
    ) -> Result<Vec<SandboxRow>, ServerError> {
        let marks = vec!["?"; statuses.len()].join(", ");
        let sql = format!("SELECT * FROM sandboxes WHERE status IN ({marks}) ORDER BY created_at");
        // Only "?" placeholders are interpolated; the values are bound.
        let mut qy = sqlx::query_as(sqlx::AssertSqlSafe(sql));
        for s in statuses {
            qy = qy.bind(*s);
        }
        qy.fetch_all(&self.pool)
            .await
            .map_err(q("listing sandboxes by status"))
    }

    /// Server use: slots held by any sandbox.
    pub async fn used_slots(&self) -> Result<Vec<i64>, ServerError> {
        let rows = sqlx::query("SELECT slot FROM sandboxes WHERE slot IS NOT NULL")
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing slots"))?;
        Ok(rows.iter().map(|r| r.get::<i64, _>("slot")).collect())
    }

    pub async fn set_status(
        &self,
        id: &str,
        status: &str,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), ServerError> {
        sqlx::query("UPDATE sandboxes SET status = ?, error = ?, updated_at = ? WHERE id = ?")
            .bind(status)
            .bind(error)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("updating a sandbox's status"))?;
        Ok(())
    }

    /// Mark suspended (with a note in `error`, or none) and give the network slot back: a
    /// suspended sandbox holds no slot.
    pub async fn mark_suspended(
        &self,
        id: &str,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), ServerError> {
        sqlx::query(
            "UPDATE sandboxes SET status = 'suspended', error = ?, slot = NULL, updated_at = ?
             WHERE id = ?",
        )
        .bind(error)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(q("marking a sandbox suspended"))?;
        Ok(())
    }

    /// Server use: give a sandbox's network slot back (a suspended sandbox holds none).
    pub async fn release_slot(&self, id: &str, now: i64) -> Result<(), ServerError> {
        sqlx::query("UPDATE sandboxes SET slot = NULL, updated_at = ? WHERE id = ?")
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("releasing a sandbox's network slot"))?;
        Ok(())
    }

    /// Server use: record the slot a sandbox claimed (the caller holds the server's slot
    /// lock and chose a free one).
    pub async fn set_slot(&self, id: &str, slot: i64, now: i64) -> Result<(), ServerError> {
        sqlx::query("UPDATE sandboxes SET slot = ?, updated_at = ? WHERE id = ?")
            .bind(slot)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("claiming a network slot"))?;
        Ok(())
    }

    /// Server use: replace a sandbox's egress policy and say why in its `error` (a stored
    /// policy that no longer decodes is replaced by `deny_all`).
    pub async fn replace_egress(
        &self,
        id: &str,
        egress: &str,
        error: &str,
        now: i64,
    ) -> Result<(), ServerError> {
        sqlx::query("UPDATE sandboxes SET egress = ?, error = ?, updated_at = ? WHERE id = ?")
            .bind(egress)
            .bind(error)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("replacing a sandbox's egress policy"))?;
        Ok(())
    }

    /// Mark destroyed and give the network slot back.
    pub async fn mark_destroyed(&self, id: &str, now: i64) -> Result<(), ServerError> {
        sqlx::query(
            "UPDATE sandboxes SET status = 'destroyed', slot = NULL, updated_at = ? WHERE id = ?",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(q("marking a sandbox destroyed"))?;
        Ok(())
    }

    /// Mark failed with a reason and give the network slot back.
    pub async fn mark_failed(&self, id: &str, reason: &str, now: i64) -> Result<(), ServerError> {
        sqlx::query("UPDATE sandboxes SET status = 'failed', error = ?, slot = NULL, updated_at = ? WHERE id = ?")
            .bind(reason)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("marking a sandbox failed"))?;
        Ok(())
    }

    pub async fn set_expiry(&self, id: &str, expires_at: i64, now: i64) -> Result<(), ServerError> {
        sqlx::query("UPDATE sandboxes SET expires_at = ?, updated_at = ? WHERE id = ?")
            .bind(expires_at)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("updating a sandbox's expiry"))?;
        Ok(())
    }

    /// Replace a sandbox's egress policy (JSON [`sandpit_api_types::EgressPolicy`]).
    pub async fn set_egress(&self, id: &str, egress: &str, now: i64) -> Result<(), ServerError> {
        sqlx::query("UPDATE sandboxes SET egress = ?, updated_at = ? WHERE id = ?")
            .bind(egress)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("updating a sandbox's egress policy"))?;
        Ok(())
    }

    pub async fn set_preview_privacy(
        &self,
        id: &str,
        privacy: &str,
        now: i64,
    ) -> Result<(), ServerError> {
        sqlx::query("UPDATE sandboxes SET preview_privacy = ?, updated_at = ? WHERE id = ?")
            .bind(privacy)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("updating a sandbox's preview privacy"))?;
        Ok(())
    }

    // ---- preview tokens ----

    pub async fn insert_preview_token(
        &self,
        t: &PreviewTokenRow,
        hash: &str,
    ) -> Result<(), ServerError> {
        sqlx::query(
            "INSERT INTO preview_tokens (id, sandbox_id, workspace_id, token_hash, token_prefix,
                expires_at, revoked_at, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&t.id)
        .bind(&t.sandbox_id)
        .bind(&t.workspace_id)
        .bind(hash)
        .bind(&t.token_prefix)
        .bind(t.expires_at)
        .bind(t.revoked_at)
        .bind(t.created_at)
        .execute(&self.pool)
        .await
        .map_err(q("inserting a preview token"))?;
        Ok(())
    }

    /// The sandbox's preview tokens that are not revoked, oldest first.
    pub async fn list_preview_tokens(
        &self,
        workspace_id: &str,
        sandbox_id: &str,
    ) -> Result<Vec<PreviewTokenRow>, ServerError> {
        sqlx::query_as(
            "SELECT id, sandbox_id, workspace_id, token_prefix, expires_at, revoked_at, created_at
             FROM preview_tokens
             WHERE workspace_id = ? AND sandbox_id = ? AND revoked_at IS NULL
             ORDER BY created_at, id",
        )
        .bind(workspace_id)
        .bind(sandbox_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing preview tokens"))
    }

    /// A preview token of the given workspace and sandbox, revoked ones included.
    pub async fn get_preview_token(
        &self,
        workspace_id: &str,
        sandbox_id: &str,
        id: &str,
    ) -> Result<Option<PreviewTokenRow>, ServerError> {
        sqlx::query_as(
            "SELECT id, sandbox_id, workspace_id, token_prefix, expires_at, revoked_at, created_at
             FROM preview_tokens WHERE workspace_id = ? AND sandbox_id = ? AND id = ?",
        )
        .bind(workspace_id)
        .bind(sandbox_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("reading a preview token"))
    }

    /// A preview token of the given sandbox by its hash. The sandbox (whose workspace the
    /// caller compared) scopes the lookup: another sandbox's token is not found.
    pub async fn preview_token_by_hash(
        &self,
        sandbox_id: &str,
        hash: &str,
    ) -> Result<Option<PreviewTokenRow>, ServerError> {
        sqlx::query_as(
            "SELECT id, sandbox_id, workspace_id, token_prefix, expires_at, revoked_at, created_at
             FROM preview_tokens WHERE sandbox_id = ? AND token_hash = ?",
        )
        .bind(sandbox_id)
        .bind(hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("looking up a preview token"))
    }

    pub async fn set_preview_token_expiry(
        &self,
        workspace_id: &str,
        id: &str,
        expires_at: Option<i64>,
    ) -> Result<(), ServerError> {
        sqlx::query("UPDATE preview_tokens SET expires_at = ? WHERE workspace_id = ? AND id = ?")
            .bind(expires_at)
            .bind(workspace_id)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("updating a preview token"))?;
        Ok(())
    }

    pub async fn revoke_preview_token(
        &self,
        workspace_id: &str,
        id: &str,
        now: i64,
    ) -> Result<(), ServerError> {
        sqlx::query(
            "UPDATE preview_tokens SET revoked_at = ? WHERE workspace_id = ? AND id = ? AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(workspace_id)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(q("revoking a preview token"))?;
        Ok(())
    }

    /// Record activity (resets the idle clock of persistent sandboxes).
    pub async fn touch(&self, id: &str, now: i64) -> Result<(), ServerError> {
        sqlx::query("UPDATE sandboxes SET last_active_at = ? WHERE id = ?")
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("recording activity"))?;
        Ok(())
    }

    /// Server use: running ephemeral sandboxes whose timeout has passed.
    pub async fn expired(&self, now: i64) -> Result<Vec<String>, ServerError> {
        let rows = sqlx::query(
            "SELECT id FROM sandboxes WHERE mode = 'ephemeral' AND status IN ('running', 'suspended')
             AND expires_at IS NOT NULL AND expires_at <= ?",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(q("finding expired sandboxes"))?;
        Ok(rows.iter().map(|r| r.get::<String, _>("id")).collect())
    }

    /// Server use: every running sandbox, as (id, runtime id), for the liveness watch.
    pub async fn running(&self) -> Result<Vec<(String, String)>, ServerError> {
        let rows = sqlx::query("SELECT id, runtime_id FROM sandboxes WHERE status = 'running'")
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing running sandboxes"))?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<String, _>("id"), r.get::<String, _>("runtime_id")))
            .collect())
    }

    /// Server use: running persistent sandboxes idle for longer than their idle timeout.
    pub async fn idle(&self, now: i64) -> Result<Vec<String>, ServerError> {
        let rows = sqlx::query(
            "SELECT id FROM sandboxes WHERE mode = 'persistent' AND status = 'running'
             AND idle_timeout_ms IS NOT NULL AND last_active_at + idle_timeout_ms <= ?",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(q("finding idle sandboxes"))?;
        Ok(rows.iter().map(|r| r.get::<String, _>("id")).collect())
    }

    // ---- snapshots ----

    /// Insert a snapshot unless its workspace keeps `max` snapshots already (0: no limit);
    /// false then. The limit is checked in the inserting statement.
    pub async fn insert_snapshot(&self, s: &SnapshotRow, max: u32) -> Result<bool, ServerError> {
        let done = sqlx::query(
            "INSERT INTO snapshots (id, workspace_id, sandbox_id, template_id, template_name, size, env,
                egress, has_memory, size_bytes, created_at)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11
             WHERE ?12 = 0 OR (SELECT COUNT(*) FROM snapshots WHERE workspace_id = ?2) < ?12",
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
        .bind(max)
        .execute(&self.pool)
        .await
        .map_err(q("inserting a snapshot"))?;
        Ok(done.rows_affected() == 1)
    }

    /// How many snapshots a workspace keeps.
    pub async fn count_snapshots(&self, workspace_id: &str) -> Result<i64, ServerError> {
        let row: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM snapshots WHERE workspace_id = ?")
            .bind(workspace_id)
            .fetch_one(&self.pool)
            .await
            .map_err(q("counting snapshots"))?;
        Ok(row.0)
    }

    /// A snapshot of the given workspace.
    pub async fn get_snapshot(
        &self,
        workspace_id: &str,
        id: &str,
    ) -> Result<Option<SnapshotRow>, ServerError> {
        sqlx::query_as("SELECT * FROM snapshots WHERE id = ? AND workspace_id = ?")
            .bind(id)
            .bind(workspace_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading a snapshot"))
    }

    /// The workspace's snapshots of one sandbox, oldest first.
    pub async fn list_snapshots(
        &self,
        workspace_id: &str,
        sandbox_id: &str,
    ) -> Result<Vec<SnapshotRow>, ServerError> {
        sqlx::query_as("SELECT * FROM snapshots WHERE workspace_id = ? AND sandbox_id = ? ORDER BY created_at, id")
            .bind(workspace_id)
            .bind(sandbox_id)
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing snapshots"))
    }

    /// Delete a snapshot of the given workspace; false if there was none.
    pub async fn delete_snapshot(&self, workspace_id: &str, id: &str) -> Result<bool, ServerError> {
        let r = sqlx::query("DELETE FROM snapshots WHERE id = ? AND workspace_id = ?")
            .bind(id)
            .bind(workspace_id)
            .execute(&self.pool)
            .await
            .map_err(q("deleting a snapshot"))?;
        Ok(r.rows_affected() > 0)
    }

    /// Server use: every snapshot id, for removing unreferenced snapshot directories.
    pub async fn snapshot_ids(&self) -> Result<Vec<String>, ServerError> {
        let rows = sqlx::query("SELECT id FROM snapshots")
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing snapshot ids"))?;
        Ok(rows.iter().map(|r| r.get::<String, _>("id")).collect())
    }

    // ---- idempotency keys ----

    /// Claim `key` for a request with `hash`: `None` when this request owns it now (a
    /// pending row was inserted), otherwise the row another request left. Expired rows are
    /// deleted first.
    pub async fn idempotency_begin(
        &self,
        workspace_id: &str,
        key: &str,
        hash: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<Option<IdempotencyRow>, ServerError> {
        sqlx::query("DELETE FROM idempotency_keys WHERE expires_at <= ?")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(q("expiring idempotency keys"))?;
        let inserted = sqlx::query(
            "INSERT OR IGNORE INTO idempotency_keys
                (workspace_id, key, request_hash, status, response, created_at, expires_at)
             VALUES (?, ?, ?, NULL, NULL, ?, ?)",
        )
        .bind(workspace_id)
        .bind(key)
        .bind(hash)
        .bind(now)
        .bind(expires_at)
        .execute(&self.pool)
        .await
        .map_err(q("claiming an idempotency key"))?;
        if inserted.rows_affected() == 1 {
            return Ok(None);
        }
        sqlx::query_as::<_, IdempotencyRow>(
            "SELECT request_hash, status, response FROM idempotency_keys
             WHERE workspace_id = ? AND key = ?",
        )
        .bind(workspace_id)
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("reading an idempotency key"))
    }

    /// Record the response of the request that owns `key`.
    pub async fn idempotency_finish(
        &self,
        workspace_id: &str,
        key: &str,
        status: u16,
        response: &str,
    ) -> Result<(), ServerError> {
        sqlx::query(
            "UPDATE idempotency_keys SET status = ?, response = ? WHERE workspace_id = ? AND key = ?",
        )
        .bind(status as i64)
        .bind(response)
        .bind(workspace_id)
        .bind(key)
        .execute(&self.pool)
        .await
        .map_err(q("recording an idempotent response"))?;
        Ok(())
    }

    /// Release a pending key (its request failed: a retry may run again).
    pub async fn idempotency_abandon(
        &self,
        workspace_id: &str,
        key: &str,
    ) -> Result<(), ServerError> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE workspace_id = ? AND key = ? AND status IS NULL",
        )
        .bind(workspace_id)
        .bind(key)
        .execute(&self.pool)
        .await
        .map_err(q("releasing an idempotency key"))?;
        Ok(())
    }

    /// Server use, at start: no request is running, so no key is pending.
    pub async fn idempotency_clear_pending(&self) -> Result<(), ServerError> {
        sqlx::query("DELETE FROM idempotency_keys WHERE status IS NULL")
            .execute(&self.pool)
            .await
            .map_err(q("releasing pending idempotency keys"))?;
        Ok(())
    }

    // ---- warm pool ----

    /// How many of a workspace's sandboxes are creating or running (the running quota).
    pub async fn count_running(&self, workspace_id: &str) -> Result<i64, ServerError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM sandboxes
             WHERE workspace_id = ? AND status IN ('creating', 'running')",
        )
        .bind(workspace_id)
        .fetch_one(&self.pool)
        .await
        .map_err(q("counting running sandboxes"))?;
        Ok(row.get::<i64, _>("n"))
    }

    /// How many of a workspace's sandboxes are suspended or will be when idle (persistent
    /// ones creating or running): the `max_suspended` quota.
    pub async fn count_suspendable(&self, workspace_id: &str) -> Result<i64, ServerError> {
        let row: (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM sandboxes WHERE workspace_id = ?
               AND (status = 'suspended'
                    OR (mode = 'persistent' AND status IN ('creating', 'running')))",
        )
        .bind(workspace_id)
        .fetch_one(&self.pool)
        .await
        .map_err(q("counting suspended sandboxes"))?;
        Ok(row.0)
    }

    /// Server use: how many pooled sandboxes each template has.
    pub async fn pooled_count(&self, template_id: &str) -> Result<i64, ServerError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM sandboxes WHERE status = 'pooled' AND template_id = ?",
        )
        .bind(template_id)
        .fetch_one(&self.pool)
        .await
        .map_err(q("counting pooled sandboxes"))?;
        Ok(row.get::<i64, _>("n"))
    }

    /// Server use: hand the oldest pooled sandbox of a template to `owner` (its workspace and
    /// settings; id, slot and runtime stay). Returns the sandbox's id, or `None` when the
    /// pool is empty. One statement, so two creates never get the same sandbox.
    pub async fn take_pooled(
        &self,
        template_id: &str,
        owner: &SandboxRow,
    ) -> Result<Option<String>, ServerError> {
        let row = sqlx::query(
            "UPDATE sandboxes SET workspace_id = ?, mode = ?, status = 'running', env = ?, metadata = ?,
                egress = ?, timeout_ms = ?, idle_timeout_ms = ?, expires_at = ?, last_active_at = ?,
                created_at = ?, updated_at = ?, preview_privacy = ?
             WHERE id = (SELECT id FROM sandboxes WHERE status = 'pooled' AND template_id = ? AND size = ?
                         ORDER BY created_at LIMIT 1)
             RETURNING id",
        )
        .bind(&owner.workspace_id)
        .bind(&owner.mode)
        .bind(&owner.env)
        .bind(&owner.metadata)
        .bind(&owner.egress)
        .bind(owner.timeout_ms)
        .bind(owner.idle_timeout_ms)
        .bind(owner.expires_at)
        .bind(owner.last_active_at)
        .bind(owner.created_at)
        .bind(owner.updated_at)
        .bind(&owner.preview_privacy)
        .bind(template_id)
        .bind(&owner.size)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("taking a pooled sandbox"))?;
        Ok(row.map(|r| r.get::<String, _>("id")))
    }
}

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

// ---- CodeSandbox compatibility (`crate::compat`) ----
impl Store {
    /// Change a persistent sandbox's inactivity timeout (`PUT /vm/{id}/hibernation_timeout`).
    pub async fn set_idle_timeout(
        &self,
        workspace_id: &str,
        id: &str,
        idle_timeout_ms: i64,
        now: i64,
    ) -> Result<(), ServerError> {
        sqlx::query(
            "UPDATE sandboxes SET idle_timeout_ms = ?, updated_at = ? WHERE workspace_id = ? AND id = ?",
        )
        .bind(idle_timeout_ms)
        .bind(now)
        .bind(workspace_id)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(q("updating a sandbox's idle timeout"))?;
        Ok(())
    }

    pub async fn upsert_csb_sandbox(&self, c: &CsbSandboxRow) -> Result<(), ServerError> {
        sqlx::query(
            "INSERT INTO csb_sandboxes (sandbox_id, workspace_id, title, description, tags, privacy, tier)
             VALUES (?, ?, ?, ?, ?, ?, ?)
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
        .execute(&self.pool)
        .await
        .map_err(q("storing a sandbox's CodeSandbox fields"))?;
        Ok(())
    }

    pub async fn get_csb_sandbox(
        &self,
        workspace_id: &str,
        sandbox_id: &str,
    ) -> Result<Option<CsbSandboxRow>, ServerError> {
        sqlx::query_as("SELECT * FROM csb_sandboxes WHERE workspace_id = ? AND sandbox_id = ?")
            .bind(workspace_id)
            .bind(sandbox_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading a sandbox's CodeSandbox fields"))
    }

    /// The workspace's CodeSandbox fields of every sandbox that has them.
    pub async fn list_csb_sandboxes(
        &self,
        workspace_id: &str,
    ) -> Result<Vec<CsbSandboxRow>, ServerError> {
        sqlx::query_as("SELECT * FROM csb_sandboxes WHERE workspace_id = ?")
            .bind(workspace_id)
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing CodeSandbox fields"))
    }

    pub async fn insert_csb_agent_token(
        &self,
        hash: &str,
        t: &CsbAgentTokenRow,
    ) -> Result<(), ServerError> {
        sqlx::query(
            "INSERT INTO csb_agent_tokens (token_hash, sandbox_id, workspace_id, permission, expires_at,
                username, single_use)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(hash)
        .bind(&t.sandbox_id)
        .bind(&t.workspace_id)
        .bind(&t.permission)
        .bind(t.expires_at)
        .bind(&t.username)
        .bind(t.single_use)
        .execute(&self.pool)
        .await
        .map_err(q("inserting an agent gateway token"))?;
        Ok(())
    }

    /// An agent gateway token of the given sandbox by its hash (expired ones included; the
    /// caller compares `expires_at`).
    pub async fn csb_agent_token(
        &self,
        sandbox_id: &str,
        hash: &str,
    ) -> Result<Option<CsbAgentTokenRow>, ServerError> {
        sqlx::query_as(
            "SELECT sandbox_id, workspace_id, permission, expires_at, username, single_use
             FROM csb_agent_tokens WHERE sandbox_id = ? AND token_hash = ?",
        )
        .bind(sandbox_id)
        .bind(hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("looking up an agent gateway token"))
    }

    /// Use up a single-use gateway token: true for the one caller that deleted it.
    pub async fn consume_csb_agent_token(&self, hash: &str) -> Result<bool, ServerError> {
        let done =
            sqlx::query("DELETE FROM csb_agent_tokens WHERE token_hash = ? AND single_use = 1")
                .bind(hash)
                .execute(&self.pool)
                .await
                .map_err(q("using up a session token"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Drop a sandbox's expired gateway tokens.
    pub async fn prune_csb_agent_tokens(
        &self,
        sandbox_id: &str,
        now: i64,
    ) -> Result<(), ServerError> {
        sqlx::query("DELETE FROM csb_agent_tokens WHERE sandbox_id = ? AND expires_at <= ?")
            .bind(sandbox_id)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(q("pruning agent gateway tokens"))?;
        Ok(())
    }

    pub async fn insert_csb_tag(
        &self,
        id: &str,
        workspace_id: &str,
        vm_ids: &str,
        now: i64,
    ) -> Result<(), ServerError> {
        sqlx::query(
            "INSERT INTO csb_tags (id, workspace_id, vm_ids, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(id)
        .bind(workspace_id)
        .bind(vm_ids)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(q("inserting a VM tag"))?;
        Ok(())
    }

    /// Whether the workspace has this tag.
    pub async fn csb_tag_exists(&self, workspace_id: &str, id: &str) -> Result<bool, ServerError> {
        let row =
            sqlx::query("SELECT COUNT(*) AS n FROM csb_tags WHERE workspace_id = ? AND id = ?")
                .bind(workspace_id)
                .bind(id)
                .fetch_one(&self.pool)
                .await
                .map_err(q("reading a VM tag"))?;
        Ok(row.get::<i64, _>("n") > 0)
    }

    pub async fn set_csb_alias(
        &self,
        workspace_id: &str,
        namespace: &str,
        alias: &str,
        tag_id: &str,
    ) -> Result<(), ServerError> {
        sqlx::query(
            "INSERT INTO csb_aliases (workspace_id, namespace, alias, tag_id) VALUES (?, ?, ?, ?)
             ON CONFLICT (workspace_id, namespace, alias) DO UPDATE SET tag_id = excluded.tag_id",
        )
        .bind(workspace_id)
        .bind(namespace)
        .bind(alias)
        .bind(tag_id)
        .execute(&self.pool)
        .await
        .map_err(q("assigning a VM tag alias"))?;
        Ok(())
    }

    /// The workspace's trusted preview hosts with when each was added, oldest first.
    pub async fn list_csb_preview_hosts(
        &self,
        workspace_id: &str,
    ) -> Result<Vec<(String, i64)>, ServerError> {
        let rows = sqlx::query(
            "SELECT host, inserted_at FROM csb_preview_hosts WHERE workspace_id = ?
             ORDER BY inserted_at, host",
        )
        .bind(workspace_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing preview hosts"))?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<String, _>("host"), r.get::<i64, _>("inserted_at")))
            .collect())
    }

    /// Add hosts (`replace`: make them the whole list), in one transaction.
    pub async fn put_csb_preview_hosts(
        &self,
        workspace_id: &str,
        hosts: &[String],
        replace: bool,
        now: i64,
    ) -> Result<(), ServerError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(q("starting a transaction"))?;
        if replace {
            sqlx::query("DELETE FROM csb_preview_hosts WHERE workspace_id = ?")
                .bind(workspace_id)
                .execute(&mut *tx)
                .await
                .map_err(q("clearing preview hosts"))?;
        }
        for h in hosts {
            sqlx::query(
                "INSERT INTO csb_preview_hosts (workspace_id, host, inserted_at) VALUES (?, ?, ?)
                 ON CONFLICT (workspace_id, host) DO NOTHING",
            )
            .bind(workspace_id)
            .bind(h)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(q("adding a preview host"))?;
        }
        tx.commit().await.map_err(q("committing preview hosts"))?;
        Ok(())
    }

    pub async fn insert_csb_download_token(
        &self,
        hash: &str,
        sandbox_id: &str,
        path: &str,
        expires_at: i64,
    ) -> Result<(), ServerError> {
        sqlx::query("DELETE FROM csb_download_tokens WHERE expires_at <= ?")
            .bind(crate::util::now_ms())
            .execute(&self.pool)
            .await
            .map_err(q("pruning download links"))?;
        sqlx::query(
            "INSERT INTO csb_download_tokens (token_hash, sandbox_id, path, expires_at) VALUES (?, ?, ?, ?)",
        )
        .bind(hash)
        .bind(sandbox_id)
        .bind(path)
        .bind(expires_at)
        .execute(&self.pool)
        .await
        .map_err(q("inserting a download link"))?;
        Ok(())
    }

    /// The sandbox and path of a download link that has not expired.
    pub async fn csb_download_token(
        &self,
        hash: &str,
        now: i64,
    ) -> Result<Option<(String, String)>, ServerError> {
        let row = sqlx::query(
            "SELECT sandbox_id, path FROM csb_download_tokens WHERE token_hash = ? AND expires_at > ?",
        )
        .bind(hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("looking up a download link"))?;
        Ok(row.map(|r| (r.get::<String, _>("sandbox_id"), r.get::<String, _>("path"))))
    }
}
