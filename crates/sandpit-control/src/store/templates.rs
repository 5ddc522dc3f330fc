//! Templates (built-in, pulled, built from Dockerfiles) and their `namespace@alias` names.

use super::{Db, Sandbox, in_admission, q};
use crate::domain::parse_column;
use crate::error::ControlError;
use crate::store::sandboxes::SandboxRecord;
use crate::with_db;

/// Where a template is in its build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateStatus {
    /// A template the server knows how to build on request (the toolchain) but has not.
    NotBuilt,
    Building,
    Ready,
    Failed,
    /// Its row stays (sandboxes and snapshots refer to it) under a freed name.
    Deleted,
}

impl TemplateStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateStatus::NotBuilt => "not_built",
            TemplateStatus::Building => "building",
            TemplateStatus::Ready => "ready",
            TemplateStatus::Failed => "failed",
            TemplateStatus::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<TemplateStatus> {
        [
            TemplateStatus::NotBuilt,
            TemplateStatus::Building,
            TemplateStatus::Ready,
            TemplateStatus::Failed,
            TemplateStatus::Deleted,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for TemplateStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct TemplateRow {
    pub id: String,
    pub name: String,
    /// The version within its (workspace, name), from 1; numbers are never reused.
    pub version: u32,
    pub workspace_id: Option<String>,
    pub description: String,
    pub rootfs: String,
    pub default_egress: String,
    pub created_at: i64,
    /// JSON array of layer directories, lowest first; `[]`: `rootfs` is the only layer.
    pub layers: String,
    /// JSON `sandpit_image::ImageConfig`.
    pub config: String,
    pub status: TemplateStatus,
    pub error: Option<String>,
    /// `builtin`, `image:<reference>` or `dockerfile`.
    pub source: String,
    pub updated_at: i64,
}

#[derive(sqlx::FromRow)]
struct TemplateRecord {
    id: String,
    name: String,
    version: i64,
    workspace_id: Option<String>,
    description: String,
    rootfs: String,
    default_egress: String,
    created_at: i64,
    layers: String,
    config: String,
    status: String,
    error: Option<String>,
    source: String,
    updated_at: i64,
}

impl TryFrom<TemplateRecord> for TemplateRow {
    type Error = ControlError;
    fn try_from(r: TemplateRecord) -> Result<TemplateRow, ControlError> {
        Ok(TemplateRow {
            status: parse_column("template status", &r.status, TemplateStatus::parse)?,
            version: parse_column("template version", &r.version.to_string(), |v| {
                v.parse::<u32>().ok().filter(|v| *v >= 1)
            })?,
            id: r.id,
            name: r.name,
            workspace_id: r.workspace_id,
            description: r.description,
            rootfs: r.rootfs,
            default_egress: r.default_egress,
            created_at: r.created_at,
            layers: r.layers,
            config: r.config,
            error: r.error,
            source: r.source,
            updated_at: r.updated_at,
        })
    }
}

fn decode_all(rows: Vec<TemplateRecord>) -> Result<Vec<TemplateRow>, ControlError> {
    rows.into_iter().map(TemplateRow::try_from).collect()
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
            version: 1,
            workspace_id: None,
            description: description.into(),
            rootfs,
            default_egress: r#"{"mode":"allow_all"}"#.into(),
            created_at: now,
            layers: "[]".into(),
            config: "{}".into(),
            status: TemplateStatus::Ready,
            error: None,
            source: "builtin".into(),
            updated_at: now,
        }
    }
}

/// Largest version number `name:N` may name (a build past it is refused).
pub const MAX_VERSION: u32 = 1_000_000;

/// How a request names a template: `namespace@alias`, `name:N` (that version), or an id
/// or a name (the name's highest ready version; while none is ready, its highest one, so
/// a first build can be followed by name). Parsed before any query: a malformed version
/// is 400 `invalid_template_version`, never a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateRef<'a> {
    Alias { namespace: &'a str, alias: &'a str },
    Version { name: &'a str, version: u32 },
    IdOrName(&'a str),
}

impl<'a> TemplateRef<'a> {
    pub fn parse(s: &'a str) -> Result<TemplateRef<'a>, ControlError> {
        if let Some((namespace, alias)) = s.split_once('@') {
            return Ok(TemplateRef::Alias { namespace, alias });
        }
        let Some((name, v)) = s.split_once(':') else {
            return Ok(TemplateRef::IdOrName(s));
        };
        let version = (!name.is_empty()
            && (1..=7).contains(&v.len())
            && v.bytes().all(|b| b.is_ascii_digit())
            && !v.starts_with('0'))
        .then(|| v.parse::<u32>().ok())
        .flatten()
        .filter(|n| (1..=MAX_VERSION).contains(n));
        match version {
            Some(version) => Ok(TemplateRef::Version { name, version }),
            None => Err(ControlError::invalid(
                "invalid_template_version",
                format!("{s:?}: a version is name:N with N a whole number from 1 to {MAX_VERSION}"),
            )),
        }
    }
}

/// What [`Templates::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateInsert {
    /// The row is version `version` of its name.
    Inserted {
        version: u32,
    },
    /// A built-in template's name, or the version limit reached.
    NameTaken,
    TooManyTemplates,
    TooManyBuilds,
}

/// The templates aggregate.
#[derive(Clone, Debug)]
pub struct Templates {
    pub(super) db: Db,
}

impl Templates {
    /// Insert or refresh a server-defined template (built-in ones, the toolchain).
    pub async fn upsert(&self, t: &TemplateRow) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "INSERT INTO templates (id, name, workspace_id, description, rootfs, default_egress, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT(id) DO UPDATE SET rootfs = excluded.rootfs, description = excluded.description",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(&t.workspace_id)
        .bind(&t.description)
        .bind(&t.rootfs)
        .bind(&t.default_egress)
        .bind(t.created_at)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("saving a template"))?;
        Ok(())
    }

    /// A template by name (its highest ready version), `name:N`, id or `namespace@alias`
    /// that the workspace may use (its own or a built-in one), in any status but `deleted`.
    /// A malformed `name:N` is 400 `invalid_template_version`.
    pub async fn find(
        &self,
        workspace_id: &str,
        reference: &str,
    ) -> Result<Option<TemplateRow>, ControlError> {
        let row: Option<TemplateRecord> = match TemplateRef::parse(reference)? {
            TemplateRef::Version { name, version } => with_db!(self.db, p => sqlx::query_as(
                "SELECT * FROM templates
                 WHERE name = $1 AND version = $2 AND (workspace_id IS NULL OR workspace_id = $3)
                   AND status <> 'deleted'",
            )
            .bind(name)
            .bind(i64::from(version))
            .bind(workspace_id)
            .fetch_optional(p).await)
            .map_err(q("reading a template"))?,
            r => {
                let by_alias = match r {
                    TemplateRef::Alias { namespace, alias } => {
                        self.resolve_alias(workspace_id, namespace, alias).await?
                    }
                    _ => None,
                };
                let key = by_alias.as_deref().unwrap_or(reference);
                with_db!(self.db, p => sqlx::query_as(
                    "SELECT * FROM templates
                     WHERE (id = $1 OR name = $1) AND (workspace_id IS NULL OR workspace_id = $2)
                       AND status <> 'deleted'
                     ORDER BY CASE WHEN id = $1 THEN 0 WHEN status = 'ready' THEN 1 ELSE 2 END,
                              version DESC
                     LIMIT 1",
                )
                .bind(key)
                .bind(workspace_id)
                .fetch_optional(p).await)
                .map_err(q("reading a template"))?
            }
        };
        row.map(TemplateRow::try_from).transpose()
    }

    /// The versions (deleted ones aside) of a workspace's template name, oldest first.
    pub async fn versions(
        &self,
        workspace_id: &str,
        name: &str,
    ) -> Result<Vec<TemplateRow>, ControlError> {
        let rows = with_db!(self.db, p => sqlx::query_as(
            "SELECT * FROM templates
             WHERE name = $1 AND (workspace_id IS NULL OR workspace_id = $2) AND status <> 'deleted'
             ORDER BY version",
        )
        .bind(name)
        .bind(workspace_id)
        .fetch_all(p).await)
        .map_err(q("listing a template's versions"))?;
        decode_all(rows)
    }

    /// Server use: a template by id, whoever owns it.
    pub async fn by_id(&self, id: &str) -> Result<Option<TemplateRow>, ControlError> {
        let row: Option<TemplateRecord> = with_db!(self.db, p => sqlx::query_as(
            "SELECT * FROM templates WHERE id = $1"
        ).bind(id).fetch_optional(p).await)
        .map_err(q("reading a template"))?;
        row.map(TemplateRow::try_from).transpose()
    }

    /// Node use: every ready template with layers of its own (built or pulled), of every
    /// workspace: the layers an image store should hold.
    pub async fn ready_with_layers(&self) -> Result<Vec<TemplateRow>, ControlError> {
        let rows = with_db!(self.db, p => sqlx::query_as(
            "SELECT * FROM templates WHERE status = 'ready' AND layers <> '[]' ORDER BY id"
        ).fetch_all(p).await)
        .map_err(q("listing ready templates"))?;
        decode_all(rows)
    }

    pub async fn list(&self, workspace_id: &str) -> Result<Vec<TemplateRow>, ControlError> {
        let rows = with_db!(self.db, p => sqlx::query_as(
            "SELECT * FROM templates
             WHERE (workspace_id IS NULL OR workspace_id = $1) AND status <> 'deleted' ORDER BY name, version",
        )
        .bind(workspace_id)
        .fetch_all(p).await)
        .map_err(q("listing templates"))?;
        decode_all(rows)
    }

    /// Insert a new workspace template (status `building`) as the next version of its name
    /// (1 for a new name; deleted versions keep their numbers), unless the name is a built-in
    /// template's (built-in names are every workspace's), the name has [`MAX_VERSION`]
    /// versions, or the workspace has `max_templates` template versions (deleted ones aside)
    /// or `max_builds` builds under way (0: no limit). Numbered, checked and inserted in one
    /// transaction holding the workspace's admission lock, so concurrent creates, in this
    /// process or another, never pass the limits nor share a version (the unique index on
    /// workspace, name and version backs that).
    pub async fn insert(
        &self,
        t: &TemplateRow,
        max_templates: u32,
        max_builds: u32,
        build_node: &str,
    ) -> Result<TemplateInsert, ControlError> {
        const INSERT: &str = "INSERT INTO templates (id, name, workspace_id, description, rootfs,
                default_egress, created_at, layers, config, status, error, source, updated_at,
                version, build_node)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                    COALESCE((SELECT MAX(version) FROM templates
                              WHERE workspace_id = $3 AND name = $2), 0) + 1, $17
             WHERE NOT EXISTS (SELECT 1 FROM templates WHERE workspace_id IS NULL AND name = $2)
               AND COALESCE((SELECT MAX(version) FROM templates
                             WHERE workspace_id = $3 AND name = $2), 0) < $16
               AND ($14 = 0 OR (SELECT COUNT(*) FROM templates
                                WHERE workspace_id = $3 AND status <> 'deleted') < $14)
               AND ($15 = 0 OR (SELECT COUNT(*) FROM templates
                                WHERE workspace_id = $3 AND status = 'building') < $15)
             ON CONFLICT DO NOTHING
             RETURNING version";
        let ws = t.workspace_id.clone().unwrap_or_default();
        let version: Option<(i64,)> = in_admission!(self.db, &ws, tx => sqlx::query_as(INSERT)
            .bind(&t.id)
            .bind(&t.name)
            .bind(&t.workspace_id)
            .bind(&t.description)
            .bind(&t.rootfs)
            .bind(&t.default_egress)
            .bind(t.created_at)
            .bind(&t.layers)
            .bind(&t.config)
            .bind(t.status.as_str())
            .bind(&t.error)
            .bind(&t.source)
            .bind(t.updated_at)
            .bind(i64::from(max_templates))
            .bind(i64::from(max_builds))
            .bind(i64::from(MAX_VERSION))
            .bind(build_node)
            .fetch_optional(&mut *tx)
            .await?)
        .map_err(q("creating a template"))?;
        if let Some((v,)) = version {
            let version =
                u32::try_from(v).map_err(|e| ControlError::corrupt("template version", e))?;
            return Ok(TemplateInsert::Inserted { version });
        }
        // Why not (for the answer only; the decision above was atomic).
        let (templates, builds) = self.count(&ws).await?;
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
    pub async fn count(&self, workspace_id: &str) -> Result<(i64, i64), ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN status = 'building' THEN 1 ELSE 0 END), 0)
             FROM templates WHERE workspace_id = $1 AND status <> 'deleted'",
        )
        .bind(workspace_id)
        .fetch_one(p).await)
        .map_err(q("counting templates"))
    }

    /// Server use: record a build's result.
    pub async fn finish_build(
        &self,
        id: &str,
        status: TemplateStatus,
        layers: &str,
        config: &str,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "UPDATE templates SET status = $1, layers = $2, config = $3, error = $4, updated_at = $5
             WHERE id = $6 AND status <> 'deleted'",
        )
        .bind(status.as_str())
        .bind(layers)
        .bind(config)
        .bind(error)
        .bind(now)
        .bind(id)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("finishing a template build"))?;
        Ok(())
    }

    /// Server use: move a template into `building` on node `build_node` if it is in one of
    /// `from`; false when it is not (already building or built). One statement: two
    /// claimers never both win.
    pub async fn claim_build(
        &self,
        id: &str,
        from: &[TemplateStatus],
        build_node: &str,
        now: i64,
    ) -> Result<bool, ControlError> {
        let mut done = 0;
        for status in from {
            done += with_db!(self.db, p => sqlx::query(
                "UPDATE templates SET status = 'building', error = NULL, updated_at = $1,
                    build_node = $4
                 WHERE id = $2 AND status = $3",
            )
            .bind(now)
            .bind(id)
            .bind(status.as_str())
            .bind(build_node)
            .execute(p).await.map(|r| r.rows_affected()))
            .map_err(q("starting a template build"))?;
        }
        Ok(done == 1)
    }

    /// Builds that node `build_node` ran and a crash interrupted fail (and those recorded
    /// without a node): called by that node at its start, and by the fleet for a node
    /// declared lost. Other nodes' builds go on.
    pub async fn fail_interrupted_builds(
        &self,
        build_node: &str,
        error: &str,
        now: i64,
    ) -> Result<u64, ControlError> {
        with_db!(self.db, p => sqlx::query(
            "UPDATE templates SET status = 'failed', error = $3, updated_at = $1
             WHERE status = 'building' AND (build_node = $2 OR build_node IS NULL)",
        )
        .bind(now)
        .bind(build_node)
        .bind(error)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("failing interrupted builds"))
    }

    /// Builds whose node was declared lost fail with `error` (their node is gone or will
    /// not finish them: its restart fails them anyway). The templates failed.
    pub async fn fail_builds_on_lost_nodes(
        &self,
        error: &str,
        now: i64,
    ) -> Result<u64, ControlError> {
        with_db!(self.db, p => sqlx::query(
            "UPDATE templates SET status = 'failed', error = $1, updated_at = $2
             WHERE status = 'building'
               AND build_node IN (SELECT id FROM nodes WHERE status = 'lost')",
        )
        .bind(error)
        .bind(now)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("failing the builds of lost nodes"))
    }

    /// The node that runs or ran template `id`'s build (where its event log is), if one
    /// is recorded.
    pub async fn build_node(&self, id: &str) -> Result<Option<String>, ControlError> {
        let row: Option<(Option<String>,)> = with_db!(self.db, p => sqlx::query_as(
            "SELECT build_node FROM templates WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(p).await)
        .map_err(q("reading a template's build node"))?;
        Ok(row.and_then(|(n,)| n))
    }

    /// Delete a workspace's template version: its row stays (sandboxes and snapshots refer
    /// to it) with status `deleted`, keeping its name and number (never reused); its aliases
    /// go.
    pub async fn delete(
        &self,
        workspace_id: &str,
        id: &str,
        now: i64,
    ) -> Result<bool, ControlError> {
        let done = with_db!(self.db, p => async {
            let mut tx = p.begin().await?;
            sqlx::query("DELETE FROM template_aliases WHERE workspace_id = $1 AND template_id = $2")
                .bind(workspace_id)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let n = sqlx::query(
                "UPDATE templates SET status = 'deleted', updated_at = $1
                 WHERE id = $2 AND workspace_id = $3 AND status <> 'deleted'",
            )
            .bind(now)
            .bind(id)
            .bind(workspace_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok::<u64, sqlx::Error>(n)
        }.await)
        .map_err(q("deleting a template"))?;
        Ok(done == 1)
    }

    /// Sandboxes (not destroyed or failed) and snapshots that need the template.
    pub async fn dependents(&self, template_id: &str) -> Result<(Vec<Sandbox>, i64), ControlError> {
        let rows: Vec<SandboxRecord> = with_db!(self.db, p => sqlx::query_as(
            "SELECT * FROM sandboxes WHERE template_id = $1 AND status NOT IN ('destroyed', 'failed')",
        )
        .bind(template_id)
        .fetch_all(p).await)
        .map_err(q("listing a template's sandboxes"))?;
        let snapshots: (i64,) = with_db!(self.db, p => sqlx::query_as(
            "SELECT COUNT(*) FROM snapshots WHERE template_id = $1"
        ).bind(template_id).fetch_one(p).await)
        .map_err(q("counting a template's snapshots"))?;
        Ok((super::sandboxes::decode_all(rows)?, snapshots.0))
    }

    // ---- garbage collection ----

    /// The layer lists (JSON arrays of layer directories) of every template version whose
    /// layers may still be needed: not deleted, deleted at or after `deleted_since` (a
    /// create that found it just before the delete may still be starting), or needed by a
    /// sandbox that is not destroyed or failed, or by a snapshot. One statement: what it
    /// returns is one moment's truth.
    pub async fn layers_in_use(&self, deleted_since: i64) -> Result<Vec<String>, ControlError> {
        let rows: Vec<(String,)> = with_db!(self.db, p => sqlx::query_as(
            "SELECT t.layers FROM templates t
             WHERE t.status <> 'deleted' OR t.updated_at >= $1
                OR EXISTS (SELECT 1 FROM sandboxes s WHERE s.template_id = t.id
                           AND s.status NOT IN ('destroyed', 'failed'))
                OR EXISTS (SELECT 1 FROM snapshots n WHERE n.template_id = t.id)",
        )
        .bind(deleted_since)
        .fetch_all(p).await)
        .map_err(q("listing the layers templates use"))?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Ids of template versions deleted before `deleted_before` that no live sandbox and no
    /// snapshot needs (their per-template directories, boot snapshots included, may go).
    pub async fn deleted_unused(&self, deleted_before: i64) -> Result<Vec<String>, ControlError> {
        let rows: Vec<(String,)> = with_db!(self.db, p => sqlx::query_as(
            "SELECT t.id FROM templates t
             WHERE t.status = 'deleted' AND t.updated_at < $1
               AND NOT EXISTS (SELECT 1 FROM sandboxes s WHERE s.template_id = t.id
                               AND s.status NOT IN ('destroyed', 'failed'))
               AND NOT EXISTS (SELECT 1 FROM snapshots n WHERE n.template_id = t.id)",
        )
        .bind(deleted_before)
        .fetch_all(p).await)
        .map_err(q("listing deleted templates"))?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    // ---- aliases ----

    /// Point `namespace@alias` at a template (creating or moving it).
    pub async fn set_alias(
        &self,
        workspace_id: &str,
        namespace: &str,
        alias: &str,
        template_id: &str,
        now: i64,
    ) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "INSERT INTO template_aliases (workspace_id, namespace, alias, template_id, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT(workspace_id, namespace, alias) DO UPDATE
               SET template_id = excluded.template_id, updated_at = excluded.updated_at",
        )
        .bind(workspace_id)
        .bind(namespace)
        .bind(alias)
        .bind(template_id)
        .bind(now)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("setting an alias"))?;
        Ok(())
    }

    pub async fn delete_alias(
        &self,
        workspace_id: &str,
        namespace: &str,
        alias: &str,
    ) -> Result<bool, ControlError> {
        let done = with_db!(self.db, p => sqlx::query(
            "DELETE FROM template_aliases WHERE workspace_id = $1 AND namespace = $2 AND alias = $3",
        )
        .bind(workspace_id)
        .bind(namespace)
        .bind(alias)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("deleting an alias"))?;
        Ok(done == 1)
    }

    pub async fn resolve_alias(
        &self,
        workspace_id: &str,
        namespace: &str,
        alias: &str,
    ) -> Result<Option<String>, ControlError> {
        let row: Option<(String,)> = with_db!(self.db, p => sqlx::query_as(
            "SELECT template_id FROM template_aliases
             WHERE workspace_id = $1 AND namespace = $2 AND alias = $3",
        )
        .bind(workspace_id)
        .bind(namespace)
        .bind(alias)
        .fetch_optional(p).await)
        .map_err(q("reading an alias"))?;
        Ok(row.map(|r| r.0))
    }

    /// `namespace@alias` names of a template in a workspace.
    pub async fn aliases_of(
        &self,
        workspace_id: &str,
        template_id: &str,
    ) -> Result<Vec<String>, ControlError> {
        let rows: Vec<(String, String)> = with_db!(self.db, p => sqlx::query_as(
            "SELECT namespace, alias FROM template_aliases WHERE workspace_id = $1 AND template_id = $2
             ORDER BY namespace, alias",
        )
        .bind(workspace_id)
        .bind(template_id)
        .fetch_all(p).await)
        .map_err(q("listing aliases"))?;
        Ok(rows.into_iter().map(|(n, a)| format!("{n}@{a}")).collect())
    }
}
