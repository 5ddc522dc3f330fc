//! Webhooks and their deliveries (`/v1/webhooks`).
//!
//! A webhook is a workspace's endpoint for its lifecycle events. When an event is appended
//! ([`super::Events`]), one delivery row per matching webhook is inserted in the same
//! transaction, so a delivery exists exactly when its event does. Servers claim due
//! deliveries with [`Webhooks::claim`], one conditional UPDATE that sets a lease (on
//! PostgreSQL the candidates are locked `FOR UPDATE SKIP LOCKED`, on SQLite the single writer
//! serializes claims), so each attempt is made by one server; [`Webhooks::settle`] records
//! the outcome only while the lease is still the claimer's. A server that dies mid-attempt
//! leaves the lease to lapse and another server tries again (deliveries are at least once;
//! receivers dedupe by event id).

use super::{Backend, Db, in_admission, q};
use crate::error::ControlError;
use crate::with_db;

/// A webhook as stored.
#[derive(Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct WebhookRow {
    pub id: String,
    pub workspace_id: String,
    pub url: String,
    /// `,kind,kind,`; `None`: every kind.
    pub events: Option<String>,
    pub description: Option<String>,
    /// The signing key: never logged (this type's `Debug` leaves it out).
    pub secret: String,
    pub created_at: i64,
}

impl std::fmt::Debug for WebhookRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookRow")
            .field("id", &self.id)
            .field("workspace_id", &self.workspace_id)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("description", &self.description)
            .field("secret", &"<redacted>")
            .field("created_at", &self.created_at)
            .finish()
    }
}

impl WebhookRow {
    /// The kinds of `events`, in order (`None`: every kind).
    pub fn kinds(&self) -> Option<Vec<String>> {
        self.events.as_ref().map(|e| {
            e.split(',')
                .filter(|k| !k.is_empty())
                .map(str::to_string)
                .collect()
        })
    }
}

/// The stored form of an event filter: `,a,b,` (matched with `LIKE '%,kind,%'`).
pub fn encode_kinds(kinds: &[&str]) -> String {
    format!(",{},", kinds.join(","))
}

/// Where a delivery stands.
pub const PENDING: &str = "pending";
pub const DELIVERED: &str = "delivered";
pub const FAILED: &str = "failed";

/// One delivery (the deliveries view).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DeliveryRow {
    pub id: i64,
    pub webhook_id: String,
    pub event_seq: i64,
    /// The event's kind, if the event is still kept.
    pub kind: Option<String>,
    pub event_at: i64,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
    pub last_response: Option<String>,
    pub last_attempt_at: Option<i64>,
}

/// A delivery claimed for one attempt: what it takes to send it.
#[derive(Clone, sqlx::FromRow)]
pub struct ClaimedDelivery {
    pub id: i64,
    pub webhook_id: String,
    pub url: String,
    /// Never logged (this type's `Debug` leaves it out).
    pub secret: String,
    pub event_seq: i64,
    pub event_at: i64,
    /// Attempts made before this one.
    pub attempts: i64,
    /// The event (`None` when it is no longer kept).
    pub kind: Option<String>,
    pub sandbox_id: Option<String>,
    pub detail: Option<String>,
    pub at: Option<i64>,
    /// The lease this attempt holds: settling needs it.
    pub lease_until: i64,
}

impl std::fmt::Debug for ClaimedDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimedDelivery")
            .field("id", &self.id)
            .field("webhook_id", &self.webhook_id)
            .field("url", &self.url)
            .field("event_seq", &self.event_seq)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// What an attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptOutcome {
    /// [`PENDING`] (another attempt at `next_attempt_at`), [`DELIVERED`] or [`FAILED`].
    pub status: &'static str,
    pub next_attempt_at: i64,
    pub status_code: Option<i64>,
    pub error: Option<String>,
    pub response: Option<String>,
    pub attempted_at: i64,
}

/// The webhooks aggregate.
#[derive(Clone, Debug)]
pub struct Webhooks {
    pub(super) db: Db,
}

impl Webhooks {
    /// Insert a webhook unless its workspace has `max` already (`false` then; nothing
    /// changed). Counted and inserted under the workspace's admission lock.
    pub async fn insert(&self, w: &WebhookRow, max: u32) -> Result<bool, ControlError> {
        let n = in_admission!(self.db, &w.workspace_id, tx => {
            sqlx::query(
                "INSERT INTO webhooks (id, workspace_id, url, events, description, secret, created_at)
                 SELECT $1, $2, $3, $4, $5, $6, $7
                 WHERE (SELECT COUNT(*) FROM webhooks WHERE workspace_id = $2) < $8",
            )
            .bind(&w.id)
            .bind(&w.workspace_id)
            .bind(&w.url)
            .bind(&w.events)
            .bind(&w.description)
            .bind(&w.secret)
            .bind(w.created_at)
            .bind(i64::from(max))
            .execute(&mut *tx)
            .await?
            .rows_affected()
        })
        .map_err(q("inserting a webhook"))?;
        Ok(n == 1)
    }

    /// A workspace's webhooks, oldest first.
    pub async fn list(&self, workspace_id: &str) -> Result<Vec<WebhookRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT id, workspace_id, url, events, description, secret, created_at FROM webhooks
             WHERE workspace_id = $1 ORDER BY created_at, id",
        )
        .bind(workspace_id)
        .fetch_all(p).await)
        .map_err(q("listing webhooks"))
    }

    /// One webhook of a workspace.
    pub async fn get(
        &self,
        workspace_id: &str,
        id: &str,
    ) -> Result<Option<WebhookRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT id, workspace_id, url, events, description, secret, created_at FROM webhooks
             WHERE workspace_id = $1 AND id = $2",
        )
        .bind(workspace_id)
        .bind(id)
        .fetch_optional(p).await)
        .map_err(q("reading a webhook"))
    }

    /// Delete a webhook of a workspace and its deliveries (an attempt under way may still
    /// finish; nothing is attempted after). Whether it existed.
    pub async fn delete(&self, workspace_id: &str, id: &str) -> Result<bool, ControlError> {
        with_db!(self.db, p => async {
            let mut tx = p.begin().await?;
            let n = sqlx::query("DELETE FROM webhooks WHERE workspace_id = $1 AND id = $2")
                .bind(workspace_id)
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query("DELETE FROM webhook_deliveries WHERE workspace_id = $1 AND webhook_id = $2")
                .bind(workspace_id)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(n == 1)
        }.await)
        .map_err(q("deleting a webhook"))
    }

    /// A webhook's newest deliveries, newest first, at most `limit`.
    pub async fn deliveries(
        &self,
        workspace_id: &str,
        webhook_id: &str,
        limit: i64,
    ) -> Result<Vec<DeliveryRow>, ControlError> {
        with_db!(self.db, p => sqlx::query_as(
            "SELECT d.id, d.webhook_id, d.event_seq, e.kind, d.event_at, d.status, d.attempts,
                    d.next_attempt_at, d.last_status_code, d.last_error, d.last_response,
                    d.last_attempt_at
             FROM webhook_deliveries d LEFT JOIN events e ON e.seq = d.event_seq
             WHERE d.workspace_id = $1 AND d.webhook_id = $2 ORDER BY d.id DESC LIMIT $3",
        )
        .bind(workspace_id)
        .bind(webhook_id)
        .bind(limit)
        .fetch_all(p).await)
        .map_err(q("listing webhook deliveries"))
    }

    /// Server use (any workspace): lease up to `limit` pending deliveries due at `now` whose
    /// lease is free or lapsed to `node` until `lease_until`, and return them with what
    /// sending them takes. A delivery is leased to one claimer at a time: the claim is one
    /// conditional UPDATE (candidates locked `SKIP LOCKED` on PostgreSQL).
    pub async fn claim(
        &self,
        node: &str,
        now: i64,
        lease_until: i64,
        limit: i64,
    ) -> Result<Vec<ClaimedDelivery>, ControlError> {
        let lock = match self.db.backend() {
            Backend::Sqlite => "",
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
        };
        let sql = format!(
            "UPDATE webhook_deliveries SET lease_until = $1, lease_node = $2
             WHERE status = 'pending' AND next_attempt_at <= $3
               AND (lease_until IS NULL OR lease_until < $3)
               AND id IN (SELECT id FROM webhook_deliveries
                          WHERE status = 'pending' AND next_attempt_at <= $3
                            AND (lease_until IS NULL OR lease_until < $3)
                          ORDER BY next_attempt_at, id LIMIT $4 {lock})
             RETURNING id"
        );
        // The only interpolation is one of the two constant lock clauses above.
        let ids: Vec<(i64,)> =
            with_db!(self.db, p => sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
            .bind(lease_until)
            .bind(node)
            .bind(now)
            .bind(limit)
            .fetch_all(p).await)
            .map_err(q("claiming webhook deliveries"))?;
        let mut out = Vec::with_capacity(ids.len());
        for (id,) in ids {
            let row: Option<ClaimedDelivery> = with_db!(self.db, p => sqlx::query_as(
                "SELECT d.id, d.webhook_id, w.url, w.secret, d.event_seq, d.event_at, d.attempts,
                        e.kind, e.sandbox_id, e.detail, e.at, d.lease_until
                 FROM webhook_deliveries d
                 JOIN webhooks w ON w.id = d.webhook_id
                 LEFT JOIN events e ON e.seq = d.event_seq
                 WHERE d.id = $1 AND d.lease_node = $2 AND d.lease_until = $3",
            )
            .bind(id)
            .bind(node)
            .bind(lease_until)
            .fetch_optional(p).await)
            .map_err(q("reading a claimed webhook delivery"))?;
            // None: its webhook was deleted meanwhile (the delete takes its deliveries).
            out.extend(row);
        }
        Ok(out)
    }

    /// Record an attempt's outcome, if `node` still holds the lease it claimed (`false`
    /// otherwise: the lease lapsed and another server took the delivery, or the webhook was
    /// deleted).
    pub async fn settle(
        &self,
        id: i64,
        node: &str,
        lease_until: i64,
        o: &AttemptOutcome,
    ) -> Result<bool, ControlError> {
        with_db!(self.db, p => sqlx::query(
            "UPDATE webhook_deliveries SET status = $1, attempts = attempts + 1,
                 next_attempt_at = $2, last_status_code = $3, last_error = $4,
                 last_response = $5, last_attempt_at = $6, lease_until = NULL, lease_node = NULL
             WHERE id = $7 AND lease_node = $8 AND lease_until = $9 AND status = 'pending'",
        )
        .bind(o.status)
        .bind(o.next_attempt_at)
        .bind(o.status_code)
        .bind(&o.error)
        .bind(&o.response)
        .bind(o.attempted_at)
        .bind(id)
        .bind(node)
        .bind(lease_until)
        .execute(p).await.map(|r| r.rows_affected() == 1))
        .map_err(q("recording a webhook delivery"))
    }

    /// Server use, at start: give up the leases `node` held (its attempts died with its last
    /// process), so its deliveries are due again at once instead of when the leases lapse.
    pub async fn release_leases(&self, node: &str) -> Result<u64, ControlError> {
        with_db!(self.db, p => sqlx::query(
            "UPDATE webhook_deliveries SET lease_until = NULL, lease_node = NULL
             WHERE lease_node = $1",
        )
        .bind(node)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("releasing webhook delivery leases"))
    }

    /// Forget deliveries of events older than `before` (as the events are pruned). How many
    /// went.
    pub async fn prune(&self, before: i64) -> Result<u64, ControlError> {
        with_db!(self.db, p => sqlx::query("DELETE FROM webhook_deliveries WHERE event_at < $1")
            .bind(before)
            .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("pruning webhook deliveries"))
    }
}
