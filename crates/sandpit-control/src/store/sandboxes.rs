//! Sandboxes: one row per sandbox ever made (destroyed ones stay, so ids are never reused).

use std::collections::BTreeMap;

use sandpit_api_types::{EgressPolicy, PreviewPrivacy, SandboxMode};

use super::{Backend, Db, in_admission, q};
use crate::domain::{SandboxId, Status, Stored, Transition, WorkspaceId};
use crate::error::ControlError;
use crate::with_db;

/// A sandbox as stored, decoded: status, mode and privacy are checked at the store edge;
/// the environment, metadata and egress policy stay [`Stored`] until needed.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub id: SandboxId,
    pub workspace_id: WorkspaceId,
    pub template_id: String,
    pub template_name: String,
    pub mode: SandboxMode,
    pub status: Status,
    pub size: String,
    pub env: Stored<BTreeMap<String, String>>,
    pub metadata: Stored<BTreeMap<String, String>>,
    pub egress: Stored<EgressPolicy>,
    pub timeout_ms: Option<i64>,
    pub idle_timeout_ms: Option<i64>,
    pub expires_at: Option<i64>,
    pub last_active_at: i64,
    pub slot: Option<i64>,
    pub runtime_id: String,
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub preview_privacy: PreviewPrivacy,
    /// The node that runs it (its name in the fleet, `store::Nodes`): only that node boots,
    /// suspends, wakes, reaps or reconciles it, and its `slot` is that node's.
    pub node_id: String,
    /// While suspended: its image in object storage (see [`crate::remote`]).
    pub remote_image: Option<Stored<crate::remote::RemoteImage>>,
}

const INSERT_SANDBOX: &str = "INSERT INTO sandboxes (id, workspace_id, template_id, template_name,
        mode, status, size, env, metadata, egress, timeout_ms, idle_timeout_ms, expires_at,
        last_active_at, slot, runtime_id, error, created_at, updated_at, preview_privacy,
        node_id)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
        $19, $20, $21)";

/// What counts against a workspace's running quota, besides the row `$2` itself: creating
/// and running sandboxes, and suspended ones holding a network slot (being woken).
const RUNNING_UNITS: &str = "SELECT COUNT(*) FROM sandboxes
     WHERE workspace_id = $1 AND id <> $2
       AND (status IN ('creating', 'running') OR (status = 'suspended' AND slot IS NOT NULL))";

/// Inside an admission transaction `$tx`: how many running units `$s`'s workspace holds
/// besides `$s` ([`RUNNING_UNITS`]).
macro_rules! running_units {
    ($tx:ident, $s:expr) => {{
        let held: (i64,) = sqlx::query_as(RUNNING_UNITS)
            .bind($s.workspace_id.as_str())
            .bind($s.id.as_str())
            .fetch_one(&mut *$tx)
            .await?;
        held.0
    }};
}

/// Bind a [`Sandbox`]'s columns in [`INSERT_SANDBOX`]'s order.
macro_rules! bind_sandbox {
    ($q:expr, $s:expr) => {
        $q.bind($s.id.as_str())
            .bind($s.workspace_id.as_str())
            .bind(&$s.template_id)
            .bind(&$s.template_name)
            .bind($s.mode.as_str())
            .bind($s.status.as_str())
            .bind(&$s.size)
            .bind($s.env.raw())
            .bind($s.metadata.raw())
            .bind($s.egress.raw())
            .bind($s.timeout_ms)
            .bind($s.idle_timeout_ms)
            .bind($s.expires_at)
            .bind($s.last_active_at)
            .bind($s.slot)
            .bind(&$s.runtime_id)
            .bind(&$s.error)
            .bind($s.created_at)
            .bind($s.updated_at)
            .bind($s.preview_privacy.as_str())
            .bind(&$s.node_id)
    };
}

fn over(held: i64, max_running: u32) -> bool {
    max_running > 0 && held >= i64::from(max_running)
}

fn quota_check(held: i64, max_running: u32, what: &str) -> Result<(), ControlError> {
    if over(held, max_running) {
        return Err(ControlError::Quota {
            code: "running_quota_exceeded",
            message: format!(
                "this workspace may run {max_running} sandboxes at once and has {held}; destroy or hibernate some{what}"
            ),
        });
    }
    Ok(())
}

/// The row as the database holds it.
#[derive(sqlx::FromRow)]
pub(super) struct SandboxRecord {
    id: String,
    workspace_id: String,
    template_id: String,
    template_name: String,
    mode: String,
    status: String,
    size: String,
    env: String,
    metadata: String,
    egress: String,
    timeout_ms: Option<i64>,
    idle_timeout_ms: Option<i64>,
    expires_at: Option<i64>,
    last_active_at: i64,
    slot: Option<i64>,
    runtime_id: String,
    error: Option<String>,
    created_at: i64,
    updated_at: i64,
    preview_privacy: String,
    node_id: String,
    remote_image: Option<String>,
}

fn parse_mode(s: &str) -> Option<SandboxMode> {
    match s {
        "ephemeral" => Some(SandboxMode::Ephemeral),
        "persistent" => Some(SandboxMode::Persistent),
        _ => None,
    }
}

impl TryFrom<SandboxRecord> for Sandbox {
    type Error = ControlError;
    fn try_from(r: SandboxRecord) -> Result<Sandbox, ControlError> {
        let what = |field: &str| format!("{field} of sandbox {}", r.id);
        let bad = |field: &str, v: &str| ControlError::corrupt(what(field), format!("{v:?}"));
        Ok(Sandbox {
            status: Status::parse(&r.status).ok_or_else(|| bad("status", &r.status))?,
            mode: parse_mode(&r.mode).ok_or_else(|| bad("mode", &r.mode))?,
            preview_privacy: PreviewPrivacy::parse(&r.preview_privacy)
                .ok_or_else(|| bad("preview privacy", &r.preview_privacy))?,
            id: SandboxId::from(r.id),
            workspace_id: WorkspaceId::from(r.workspace_id),
            template_id: r.template_id,
            template_name: r.template_name,
            size: r.size,
            env: Stored::from_raw(r.env),
            metadata: Stored::from_raw(r.metadata),
            egress: Stored::from_raw(r.egress),
            timeout_ms: r.timeout_ms,
            idle_timeout_ms: r.idle_timeout_ms,
            expires_at: r.expires_at,
            last_active_at: r.last_active_at,
            slot: r.slot,
            runtime_id: r.runtime_id,
            error: r.error,
            created_at: r.created_at,
            updated_at: r.updated_at,
            node_id: r.node_id,
            remote_image: r.remote_image.map(Stored::from_raw),
        })
    }
}

pub(super) fn decode_all(rows: Vec<SandboxRecord>) -> Result<Vec<Sandbox>, ControlError> {
    rows.into_iter().map(Sandbox::try_from).collect()
}

fn decode_one(row: Option<SandboxRecord>) -> Result<Option<Sandbox>, ControlError> {
    row.map(Sandbox::try_from).transpose()
}

fn ids(rows: Vec<(String,)>) -> Vec<String> {
    rows.into_iter().map(|r| r.0).collect()
}

/// The sandboxes aggregate.
#[derive(Clone, Debug)]
pub struct Sandboxes {
    pub(super) db: Db,
}

/// The owner of a sandbox its lost node left for the fleet to restore from its image: not a
/// valid node name, so no node ever holds it, and every node sees it gone.
pub const LOST_OWNER: &str = "~lost";

impl Sandboxes {
    /// Insert a row without a quota check (the server's own sandboxes: warm pool, builds).
    pub async fn insert(&self, s: &Sandbox) -> Result<(), ControlError> {
        with_db!(self.db, p => bind_sandbox!(sqlx::query(INSERT_SANDBOX), s)
            .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("inserting a sandbox"))?;
        Ok(())
    }

    /// Insert a tenant's new row (status creating, which counts as running) if its
    /// workspace holds fewer than `max_running` running units (0: no limit); otherwise
    /// `Quota{running_quota_exceeded}` and nothing changes. Counted and inserted under the
    /// workspace's admission lock, so creates on several servers sharing a PostgreSQL
    /// database never pass the limit together.
    pub async fn insert_admitted(&self, s: &Sandbox, max_running: u32) -> Result<(), ControlError> {
        let held = in_admission!(self.db, s.workspace_id.as_str(), tx => {
            let held = running_units!(tx, s);
            if !over(held, max_running) {
                bind_sandbox!(sqlx::query(INSERT_SANDBOX), s).execute(&mut *tx).await?;
            }
            held
        })
        .map_err(q("inserting a sandbox"))?;
        quota_check(held, max_running, "")
    }

    /// Record the slot a waking sandbox claimed, if its workspace has room for one more
    /// running unit (a suspended sandbox holding a slot is one being woken, and counts);
    /// otherwise `Quota{running_quota_exceeded}` and nothing changes. Under the workspace's
    /// admission lock, like [`Sandboxes::insert_admitted`]. The caller holds the node's
    /// slot lock and chose a free slot.
    pub async fn claim_slot_admitted(
        &self,
        s: &Sandbox,
        slot: i64,
        max_running: u32,
        now: i64,
    ) -> Result<(), ControlError> {
        let held = in_admission!(self.db, s.workspace_id.as_str(), tx => {
            let held = running_units!(tx, s);
            if !over(held, max_running) {
                sqlx::query("UPDATE sandboxes SET slot = $1, updated_at = $2 WHERE id = $3")
                    .bind(slot)
                    .bind(now)
                    .bind(s.id.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            held
        })
        .map_err(q("claiming a network slot"))?;
        quota_check(held, max_running, " before waking this one")
    }

    /// Node use: record `record` as the remote image of node `node`'s suspended sandbox
    /// `id`, if the one recorded now is `expect` (compared as stored), so an upload that a
    /// wake, a destroy or a newer suspension overtook never records its result. Whether it
    /// was recorded.
    pub async fn set_remote_image(
        &self,
        id: &str,
        node: &str,
        expect: Option<&str>,
        record: Option<&str>,
        now: i64,
    ) -> Result<bool, ControlError> {
        let n = match expect {
            Some(old) => with_db!(self.db, p => sqlx::query(
                "UPDATE sandboxes SET remote_image = $1, updated_at = $2
                 WHERE id = $3 AND node_id = $4 AND status = 'suspended' AND remote_image = $5",
            )
            .bind(record).bind(now).bind(id).bind(node).bind(old)
            .execute(p).await.map(|r| r.rows_affected())),
            None => with_db!(self.db, p => sqlx::query(
                "UPDATE sandboxes SET remote_image = $1, updated_at = $2
                 WHERE id = $3 AND node_id = $4 AND status = 'suspended' AND remote_image IS NULL",
            )
            .bind(record).bind(now).bind(id).bind(node)
            .execute(p).await.map(|r| r.rows_affected())),
        }
        .map_err(q("recording a remote image"))?;
        Ok(n == 1)
    }

    /// Node use: forget sandbox `id`'s remote image, whatever it was (it ran again, or is
    /// gone).
    pub async fn clear_remote_image(&self, id: &str, now: i64) -> Result<(), ControlError> {
        with_db!(self.db, p => sqlx::query(
            "UPDATE sandboxes SET remote_image = NULL, updated_at = $1
             WHERE id = $2 AND remote_image IS NOT NULL",
        )
        .bind(now).bind(id)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("forgetting a remote image"))?;
        Ok(())
    }

    /// Node use: node `to` takes suspended sandbox `id` over from node `from` (lost, or
    /// draining), under the runtime id `runtime_id`, with no network slot. One UPDATE
    /// conditional on the owner and the status, so of several nodes trying only one takes
    /// it. Whether this call took it.
    pub async fn move_to(
        &self,
        id: &str,
        from: &str,
        to: &str,
        runtime_id: &str,
        now: i64,
    ) -> Result<bool, ControlError> {
        let n = with_db!(self.db, p => sqlx::query(
            "UPDATE sandboxes SET node_id = $1, runtime_id = $2, slot = NULL, updated_at = $3
             WHERE id = $4 AND node_id = $5 AND status = 'suspended'",
        )
        .bind(to).bind(runtime_id).bind(now).bind(id).bind(from)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("moving a sandbox to another node"))?;
        Ok(n == 1)
    }

    /// Server use: a sandbox by id, whatever its workspace. Callers authorize by comparing
    /// the workspace (the HTTP edge's extractor does, before anything else).
    pub async fn get(&self, id: &str) -> Result<Option<Sandbox>, ControlError> {
        let row = with_db!(self.db, p => sqlx::query_as("SELECT * FROM sandboxes WHERE id = $1")
            .bind(id)
            .fetch_optional(p).await)
        .map_err(q("reading a sandbox"))?;
        decode_one(row)
    }

    /// The workspace's sandboxes with the given status, or every one not destroyed.
    pub async fn list(
        &self,
        workspace_id: &str,
        status: Option<Status>,
    ) -> Result<Vec<Sandbox>, ControlError> {
        let rows = match status {
            Some(s) => with_db!(self.db, p => sqlx::query_as(
                "SELECT * FROM sandboxes WHERE workspace_id = $1 AND status = $2
                 ORDER BY created_at, id",
            )
            .bind(workspace_id)
            .bind(s.as_str())
            .fetch_all(p).await),
            None => with_db!(self.db, p => sqlx::query_as(
                "SELECT * FROM sandboxes WHERE workspace_id = $1 AND status <> 'destroyed'
                 ORDER BY created_at, id",
            )
            .bind(workspace_id)
            .fetch_all(p).await),
        }
        .map_err(q("listing sandboxes"))?;
        decode_all(rows)
    }

    /// Node use: every sandbox of node `node` in one of the given states, oldest first.
    pub async fn with_status(
        &self,
        node: &str,
        statuses: &[Status],
    ) -> Result<Vec<Sandbox>, ControlError> {
        // Always six parameters (there are six statuses), padded with the first, so the
        // SQL text is constant; none at all matches nothing.
        let mut names: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
        let pad = names.first().copied().unwrap_or("");
        names.resize(Status::ALL.len(), pad);
        let rows = with_db!(self.db, p => {
            let mut qy = sqlx::query_as(
                "SELECT * FROM sandboxes WHERE status IN ($1, $2, $3, $4, $5, $6)
                   AND node_id = $7
                 ORDER BY created_at, id",
            );
            for n in &names {
                qy = qy.bind(*n);
            }
            qy = qy.bind(node);
            qy.fetch_all(p).await
        })
        .map_err(q("listing sandboxes by status"))?;
        decode_all(rows)
    }

    /// Node use: the slots of node `node` that its sandboxes hold.
    pub async fn used_slots(&self, node: &str) -> Result<Vec<i64>, ControlError> {
        let rows: Vec<(i64,)> = with_db!(self.db, p => sqlx::query_as(
            "SELECT slot FROM sandboxes WHERE slot IS NOT NULL AND node_id = $1"
        ).bind(node).fetch_all(p).await)
        .map_err(q("listing slots"))?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Fleet use: settle the sandboxes of every lost node (idempotent; run after each
    /// sweep): running and creating ones fail with `reason` (their memory and processes
    /// are gone with the node, as far as anyone can tell), pooled ones are destroyed,
    /// suspended ones stay suspended (their files are on the lost node). Slots stay
    /// recorded: they are that node's, released when it comes back and tears the sandboxes
    /// down. The ids settled by this call.
    /// Fleet use, before [`Sandboxes::settle_on_lost_nodes`]: the running persistent
    /// sandboxes of lost nodes whose last hibernation image is stored remotely become
    /// suspended with `reason`, owned by [`LOST_OWNER`] (no node: any node may take them
    /// over from that image, and the lost node no longer counts them as its own) and
    /// holding no slot. Their ids.
    pub async fn restore_from_images_on_lost_nodes(
        &self,
        reason: &str,
        now: i64,
    ) -> Result<Vec<String>, ControlError> {
        let rows: Vec<(String,)> = with_db!(self.db, p => sqlx::query_as(
            "UPDATE sandboxes
             SET status = 'suspended', error = $1, updated_at = $2, node_id = $3, slot = NULL
             WHERE status = 'running' AND mode = 'persistent'
               AND remote_image LIKE '%\"state\":\"stored\"%'
               AND node_id IN (SELECT id FROM nodes WHERE status = 'lost')
             RETURNING id",
        )
        .bind(reason)
        .bind(now)
        .bind(LOST_OWNER)
        .fetch_all(p).await)
        .map_err(q("restoring the sandboxes of lost nodes from their images"))?;
        let mut ids = ids(rows);
        ids.sort();
        Ok(ids)
    }

    pub async fn settle_on_lost_nodes(
        &self,
        reason: &str,
        now: i64,
    ) -> Result<Vec<String>, ControlError> {
        let rows: Vec<(String,)> = with_db!(self.db, p => sqlx::query_as(
            "UPDATE sandboxes
             SET status = CASE WHEN status = 'pooled' THEN 'destroyed' ELSE 'failed' END,
                 error = CASE WHEN status = 'pooled' THEN error ELSE $1 END,
                 updated_at = $2
             WHERE status IN ('creating', 'running', 'pooled')
               AND node_id IN (SELECT id FROM nodes WHERE status = 'lost')
             RETURNING id",
        )
        .bind(reason)
        .bind(now)
        .fetch_all(p).await)
        .map_err(q("settling the sandboxes of lost nodes"))?;
        let mut ids = ids(rows);
        ids.sort();
        Ok(ids)
    }

    /// Node use: node `node`'s sandboxes that ended elsewhere (failed or destroyed) but
    /// still hold a slot: settled while the node was lost, to be torn down here.
    pub async fn settled_holding_slots(&self, node: &str) -> Result<Vec<Sandbox>, ControlError> {
        let rows = with_db!(self.db, p => sqlx::query_as(
            "SELECT * FROM sandboxes WHERE node_id = $1 AND slot IS NOT NULL
               AND status IN ('failed', 'destroyed')",
        )
        .bind(node)
        .fetch_all(p).await)
        .map_err(q("listing settled sandboxes holding slots"))?;
        decode_all(rows)
    }

    /// Fleet use: how many slots each node's sandboxes hold, by node (fresher than the
    /// nodes' heartbeats, for placement).
    pub async fn slots_by_node(&self) -> Result<Vec<(String, i64)>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT node_id, COUNT(*) FROM sandboxes WHERE slot IS NOT NULL GROUP BY node_id"
        ).fetch_all(p).await)
        .map_err(q("counting slots by node"))
    }

    /// Move a sandbox along the lifecycle: `t` from one of the statuses it is allowed from
    /// ([`Status::apply`]) to its target, with `note` as the sandbox's `error`. One
    /// conditional statement: if the sandbox is in another status (a destroy came first, say)
    /// nothing changes and the answer is `Conflict{invalid_state}` naming the status it is in.
    pub async fn transition(
        &self,
        id: &str,
        t: Transition,
        note: Option<&str>,
        now: i64,
    ) -> Result<(), ControlError> {
        let mut from: Vec<&str> = Status::sources_of(t).iter().map(|s| s.as_str()).collect();
        let pad = from[0];
        from.resize(Status::ALL.len(), pad);
        let changed = with_db!(self.db, p => {
            let mut qy = sqlx::query(
                "UPDATE sandboxes SET status = $1, error = $2, updated_at = $3
                 WHERE id = $4 AND status IN ($5, $6, $7, $8, $9, $10)",
            )
            .bind(Status::target_of(t).as_str())
            .bind(note)
            .bind(now)
            .bind(id);
            for f in &from {
                qy = qy.bind(*f);
            }
            qy.execute(p).await.map(|r| r.rows_affected())
        })
        .map_err(q("changing a sandbox's status"))?;
        if changed == 1 {
            return Ok(());
        }
        let now_in = self.get(id).await?.map(|s| s.status.to_string());
        Err(ControlError::Conflict {
            code: "invalid_state",
            message: match now_in {
                Some(st) => format!("sandbox {id} is {st}: {t:?} is not allowed from there"),
                None => format!("sandbox {id} does not exist"),
            },
        })
    }

    /// Change the note (`error`) of a running sandbox, e.g. what a restart lost.
    pub async fn note_running(
        &self,
        id: &str,
        note: Option<&str>,
        now: i64,
    ) -> Result<(), ControlError> {
        self.update(
            "noting on a sandbox",
            "UPDATE sandboxes SET error = $1, updated_at = $2 WHERE id = $3 AND status = 'running'",
            |qy| qy.opt_text(note).int(now).text(id),
        )
        .await
    }

    /// Set a status outside the lifecycle's edges. For tests that build the state a crash
    /// would leave; the server itself moves sandboxes with [`Sandboxes::transition`] and the
    /// `mark_*` settlements.
    pub async fn force_status(
        &self,
        id: &str,
        status: Status,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), ControlError> {
        self.update(
            "updating a sandbox's status",
            "UPDATE sandboxes SET status = $1, error = $2, updated_at = $3 WHERE id = $4",
            |qy| qy.text(status.as_str()).opt_text(error).int(now).text(id),
        )
        .await
    }

    /// Mark suspended (with a note in `error`, or none) and give the network slot back: a
    /// suspended sandbox holds no slot.
    pub async fn mark_suspended(
        &self,
        id: &str,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), ControlError> {
        self.update(
            "marking a sandbox suspended",
            "UPDATE sandboxes SET status = 'suspended', error = $1, slot = NULL, updated_at = $2
             WHERE id = $3",
            |qy| qy.opt_text(error).int(now).text(id),
        )
        .await
    }

    /// Server use: give a sandbox's network slot back (a suspended sandbox holds none).
    pub async fn release_slot(&self, id: &str, now: i64) -> Result<(), ControlError> {
        self.update(
            "releasing a sandbox's network slot",
            "UPDATE sandboxes SET slot = NULL, updated_at = $1 WHERE id = $2",
            |qy| qy.int(now).text(id),
        )
        .await
    }

    /// Server use: replace a sandbox's egress policy and say why in its `error` (a stored
    /// policy that no longer decodes is replaced by `deny_all`).
    pub async fn replace_egress(
        &self,
        id: &str,
        egress: &Stored<EgressPolicy>,
        error: &str,
        now: i64,
    ) -> Result<(), ControlError> {
        self.update(
            "replacing a sandbox's egress policy",
            "UPDATE sandboxes SET egress = $1, error = $2, updated_at = $3 WHERE id = $4",
            |qy| qy.text(egress.raw()).text(error).int(now).text(id),
        )
        .await
    }

    /// Mark destroyed and give the network slot back.
    pub async fn mark_destroyed(&self, id: &str, now: i64) -> Result<(), ControlError> {
        self.update(
            "marking a sandbox destroyed",
            "UPDATE sandboxes SET status = 'destroyed', slot = NULL, updated_at = $1 WHERE id = $2",
            |qy| qy.int(now).text(id),
        )
        .await
    }

    /// Mark failed with a reason and give the network slot back.
    /// Mark a sandbox failed, and say so in its workspace's event log (best-effort: the
    /// failure is recorded even if the event is not).
    pub async fn mark_failed(&self, id: &str, reason: &str, now: i64) -> Result<(), ControlError> {
        self.update(
            "marking a sandbox failed",
            "UPDATE sandboxes SET status = 'failed', error = $1, slot = NULL, updated_at = $2
             WHERE id = $3",
            |qy| qy.text(reason).int(now).text(id),
        )
        .await?;
        let events = super::Events {
            db: self.db.clone(),
        };
        let detail = serde_json::json!({"reason": reason});
        if let Err(e) = events.append_for_sandbox(id, "failed", &detail, now).await {
            tracing::warn!(sandbox = %id, error = %crate::DisplayChain(&e), "appending an event");
        }
        Ok(())
    }

    pub async fn set_expiry(
        &self,
        id: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<(), ControlError> {
        self.update(
            "updating a sandbox's expiry",
            "UPDATE sandboxes SET expires_at = $1, updated_at = $2 WHERE id = $3",
            |qy| qy.int(expires_at).int(now).text(id),
        )
        .await
    }

    /// Replace a sandbox's egress policy.
    pub async fn set_egress(
        &self,
        id: &str,
        egress: &Stored<EgressPolicy>,
        now: i64,
    ) -> Result<(), ControlError> {
        self.update(
            "updating a sandbox's egress policy",
            "UPDATE sandboxes SET egress = $1, updated_at = $2 WHERE id = $3",
            |qy| qy.text(egress.raw()).int(now).text(id),
        )
        .await
    }

    pub async fn set_preview_privacy(
        &self,
        id: &str,
        privacy: PreviewPrivacy,
        now: i64,
    ) -> Result<(), ControlError> {
        self.update(
            "updating a sandbox's preview privacy",
            "UPDATE sandboxes SET preview_privacy = $1, updated_at = $2 WHERE id = $3",
            |qy| qy.text(privacy.as_str()).int(now).text(id),
        )
        .await
    }

    /// Record a sandbox's new size preset (a resize).
    pub async fn set_size(&self, id: &str, size: &str, now: i64) -> Result<(), ControlError> {
        self.update(
            "updating a sandbox's size",
            "UPDATE sandboxes SET size = $1, updated_at = $2 WHERE id = $3",
            |qy| qy.text(size).int(now).text(id),
        )
        .await
    }

    /// Change a persistent sandbox's inactivity timeout.
    pub async fn set_idle_timeout(
        &self,
        workspace_id: &str,
        id: &str,
        idle_timeout_ms: i64,
        now: i64,
    ) -> Result<(), ControlError> {
        self.update(
            "updating a sandbox's idle timeout",
            "UPDATE sandboxes SET idle_timeout_ms = $1, updated_at = $2
             WHERE workspace_id = $3 AND id = $4",
            |qy| qy.int(idle_timeout_ms).int(now).text(workspace_id).text(id),
        )
        .await
    }

    /// Record activity (resets the idle clock of persistent sandboxes).
    pub async fn touch(&self, id: &str, now: i64) -> Result<(), ControlError> {
        self.update(
            "recording activity",
            "UPDATE sandboxes SET last_active_at = $1 WHERE id = $2",
            |qy| qy.int(now).text(id),
        )
        .await
    }

    /// Node use: node `node`'s ephemeral sandboxes (running or suspended) whose timeout
    /// has passed.
    pub async fn expired(&self, node: &str, now: i64) -> Result<Vec<String>, ControlError> {
        let rows = with_db!(self.db, p => sqlx::query_as(
            "SELECT id FROM sandboxes WHERE mode = 'ephemeral' AND status IN ('running', 'suspended')
             AND expires_at IS NOT NULL AND expires_at <= $1 AND node_id = $2",
        )
        .bind(now)
        .bind(node)
        .fetch_all(p).await)
        .map_err(q("finding expired sandboxes"))?;
        Ok(ids(rows))
    }

    /// Node use: node `node`'s running sandboxes, as (id, runtime id), for the liveness
    /// watch.
    pub async fn running(&self, node: &str) -> Result<Vec<(String, String)>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT id, runtime_id FROM sandboxes WHERE status = 'running' AND node_id = $1"
        ).bind(node).fetch_all(p).await)
        .map_err(q("listing running sandboxes"))
    }

    /// Node use: node `node`'s running persistent sandboxes idle for longer than their
    /// idle timeout.
    pub async fn idle(&self, node: &str, now: i64) -> Result<Vec<String>, ControlError> {
        let rows = with_db!(self.db, p => sqlx::query_as(
            "SELECT id FROM sandboxes WHERE mode = 'persistent' AND status = 'running'
             AND idle_timeout_ms IS NOT NULL AND last_active_at + idle_timeout_ms <= $1
             AND node_id = $2",
        )
        .bind(now)
        .bind(node)
        .fetch_all(p).await)
        .map_err(q("finding idle sandboxes"))?;
        Ok(ids(rows))
    }

    /// How many of a workspace's sandboxes are creating or running (the running quota).
    pub async fn count_running(&self, workspace_id: &str) -> Result<i64, ControlError> {
        self.count(
            "counting running sandboxes",
            "SELECT COUNT(*) FROM sandboxes
             WHERE workspace_id = $1 AND status IN ('creating', 'running')",
            workspace_id,
        )
        .await
    }

    /// How many of a workspace's sandboxes are suspended or will be when idle (persistent
    /// ones creating or running): the `max_suspended` quota.
    pub async fn count_suspendable(&self, workspace_id: &str) -> Result<i64, ControlError> {
        self.count(
            "counting suspended sandboxes",
            "SELECT COUNT(*) FROM sandboxes WHERE workspace_id = $1
               AND (status = 'suspended'
                    OR (mode = 'persistent' AND status IN ('creating', 'running')))",
            workspace_id,
        )
        .await
    }

    /// Node use (metrics): node `node`'s sandboxes that are not destroyed, counted by status
    /// and workspace (pooled ones under the workspace they wait in).
    pub async fn census(&self, node: &str) -> Result<Vec<(String, String, i64)>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT status, workspace_id, COUNT(*) FROM sandboxes
             WHERE node_id = $1 AND status NOT IN ('destroyed', 'failed')
             GROUP BY status, workspace_id",
        )
        .bind(node)
        .fetch_all(p).await)
        .map_err(q("counting sandboxes by status"))
    }

    /// Node use: how many pooled sandboxes of a template node `node` holds.
    pub async fn pooled_count(&self, node: &str, template_id: &str) -> Result<i64, ControlError> {
        let n: (i64,) = with_db!(self.db, p => sqlx::query_as(
            "SELECT COUNT(*) FROM sandboxes WHERE status = 'pooled' AND template_id = $1
               AND node_id = $2",
        )
        .bind(template_id)
        .bind(node)
        .fetch_one(p).await)
        .map_err(q("counting pooled sandboxes"))?;
        Ok(n.0)
    }

    /// Node use: give node `node` every sandbox no node owns (rows written before sandboxes
    /// had owners: a single server's, now this node's). How many it took.
    pub async fn adopt_unowned(&self, node: &str) -> Result<u64, ControlError> {
        with_db!(self.db, p => sqlx::query("UPDATE sandboxes SET node_id = $1 WHERE node_id = ''")
            .bind(node)
            .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("adopting unowned sandboxes"))
    }

    /// Node use: hand the oldest pooled sandbox of a template on `owner.node_id` to `owner`
    /// (its workspace and settings; id, slot, node and runtime stay). Returns the sandbox's id, or `None` when the
    /// pool is empty. One statement; on PostgreSQL the candidate row is locked (`SKIP
    /// LOCKED`), so two creates, in one process or several, never get the same sandbox.
    pub async fn take_pooled(
        &self,
        template_id: &str,
        owner: &Sandbox,
        max_running: u32,
    ) -> Result<Option<String>, ControlError> {
        let lock = match self.db.backend() {
            Backend::Sqlite => "",
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
        };
        let sql = format!(
            "UPDATE sandboxes SET workspace_id = $1, mode = $2, status = 'running', env = $3,
                metadata = $4, egress = $5, timeout_ms = $6, idle_timeout_ms = $7, expires_at = $8,
                last_active_at = $9, created_at = $10, updated_at = $11, preview_privacy = $12
             WHERE status = 'pooled'
               AND id = (SELECT id FROM sandboxes WHERE status = 'pooled' AND template_id = $13
                         AND size = $14 AND node_id = $15 ORDER BY created_at LIMIT 1 {lock})
             RETURNING id"
        );
        let (held, row) = in_admission!(self.db, owner.workspace_id.as_str(), tx => {
            let held = running_units!(tx, owner);
            let row: Option<(String,)> = if over(held, max_running) {
                None
            } else {
                // The only interpolation is one of the two constant lock clauses above.
                sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
                    .bind(owner.workspace_id.as_str())
                    .bind(owner.mode.as_str())
                    .bind(owner.env.raw())
                    .bind(owner.metadata.raw())
                    .bind(owner.egress.raw())
                    .bind(owner.timeout_ms)
                    .bind(owner.idle_timeout_ms)
                    .bind(owner.expires_at)
                    .bind(owner.last_active_at)
                    .bind(owner.created_at)
                    .bind(owner.updated_at)
                    .bind(owner.preview_privacy.as_str())
                    .bind(template_id)
                    .bind(&owner.size)
                    .bind(&owner.node_id)
                    .fetch_optional(&mut *tx)
                    .await?
            };
            (held, row)
        })
        .map_err(q("taking a pooled sandbox"))?;
        quota_check(held, max_running, "")?;
        Ok(row.map(|r| r.0))
    }

    // ---- helpers ----

    async fn count(
        &self,
        op: &'static str,
        sql: &'static str,
        key: &str,
    ) -> Result<i64, ControlError> {
        let n: (i64,) = with_db!(self.db, p => sqlx::query_as(sql).bind(key).fetch_one(p).await)
            .map_err(q(op))?;
        Ok(n.0)
    }

    /// Run one UPDATE whose parameters `bind` lists in order.
    async fn update(
        &self,
        op: &'static str,
        sql: &'static str,
        bind: impl FnOnce(Params) -> Params,
    ) -> Result<(), ControlError> {
        let params = bind(Params::default()).0;
        with_db!(self.db, p => {
            let mut qy = sqlx::query(sql);
            for v in &params {
                qy = match v {
                    Param::Text(s) => qy.bind(s.clone()),
                    Param::OptText(s) => qy.bind(s.clone()),
                    Param::Int(i) => qy.bind(*i),
                };
            }
            qy.execute(p).await.map(|r| r.rows_affected())
        })
        .map_err(q(op))?;
        Ok(())
    }
}

/// Parameters of a one-statement update, in order.
#[derive(Default)]
struct Params(Vec<Param>);

enum Param {
    Text(String),
    OptText(Option<String>),
    Int(i64),
}

impl Params {
    fn text(mut self, s: &str) -> Params {
        self.0.push(Param::Text(s.to_string()));
        self
    }
    fn opt_text(mut self, s: Option<&str>) -> Params {
        self.0.push(Param::OptText(s.map(str::to_string)));
        self
    }
    fn int(mut self, i: i64) -> Params {
        self.0.push(Param::Int(i));
        self
    }
}
