//! The fleet: the nodes that run sandboxes, each holding a lease it renews by heartbeat.
//!
//! A node registers under its name and gets a new **epoch**; every heartbeat names the
//! epoch, so a node that was declared lost, or replaced by a newer registration of the same
//! name (a restart), finds its heartbeat refused ([`Heartbeat::Fenced`]) and must stop
//! acting as that node. A lease is trusted while the database's clock is before its
//! `lease_until`: every time here is the database's ([`Nodes::now`]), so hosts whose clocks
//! disagree cannot extend or shorten one another's leases. Declaring nodes lost
//! ([`Nodes::expire`]) is one statement: each lost node is reported to exactly one caller.

use super::{Db, q};
use crate::domain::parse_column;
use crate::error::ControlError;
use crate::with_db;

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStatus {
    /// Takes new sandboxes while its lease holds.
    Live,
    /// Keeps its sandboxes while they move away; takes no new ones.
    Draining,
    /// Its lease lapsed: nothing it reports is trusted until it registers again.
    Lost,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Live => "live",
            NodeStatus::Draining => "draining",
            NodeStatus::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<NodeStatus> {
        [NodeStatus::Live, NodeStatus::Draining, NodeStatus::Lost]
            .into_iter()
            .find(|n| n.as_str() == s)
    }
}

/// What a node says about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The operator's name for the node (`[a-z0-9-]`, 1–63), stable across restarts.
    pub id: String,
    /// Where API replicas reach it (its internal listener).
    pub address: String,
    /// The runsc build it runs: a memory image restores only on the same build.
    pub runsc_build: String,
    /// Memory it gives sandboxes, MiB.
    pub memory_mib: i64,
    /// Network slots in its pool.
    pub slots: i64,
}

/// What a node reports with each heartbeat: its free room and what it holds locally (the
/// template and image ids placement prefers it for).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeLoad {
    pub free_memory_mib: i64,
    pub free_slots: i64,
    pub templates: Vec<String>,
    pub images: Vec<String>,
}

/// A node as the fleet knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub info: NodeInfo,
    pub status: NodeStatus,
    pub epoch: i64,
    /// Database time (ms) until which its lease holds.
    pub lease_until: i64,
    pub heartbeat_at: i64,
    pub load: NodeLoad,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    /// The lease is renewed; the node's status (an operator may have set it draining).
    Renewed(NodeStatus),
    /// This registration is no longer the node: it was declared lost, or registered again
    /// (a newer epoch). The process must stop acting as the node and register anew.
    Fenced,
}

#[derive(sqlx::FromRow)]
struct NodeRecord {
    id: String,
    address: String,
    runsc_build: String,
    memory_mib: i64,
    slots: i64,
    status: String,
    epoch: i64,
    lease_until: i64,
    heartbeat_at: i64,
    free_memory_mib: i64,
    free_slots: i64,
    templates: String,
    images: String,
}

impl TryFrom<NodeRecord> for NodeRow {
    type Error = ControlError;
    fn try_from(r: NodeRecord) -> Result<NodeRow, ControlError> {
        let ids = |what: &'static str, raw: &str| {
            serde_json::from_str::<Vec<String>>(raw)
                .map_err(|e| ControlError::corrupt(what, e.to_string()))
        };
        Ok(NodeRow {
            status: parse_column("node status", &r.status, NodeStatus::parse)?,
            load: NodeLoad {
                free_memory_mib: r.free_memory_mib,
                free_slots: r.free_slots,
                templates: ids("node templates", &r.templates)?,
                images: ids("node images", &r.images)?,
            },
            info: NodeInfo {
                id: r.id,
                address: r.address,
                runsc_build: r.runsc_build,
                memory_mib: r.memory_mib,
                slots: r.slots,
            },
            epoch: r.epoch,
            lease_until: r.lease_until,
            heartbeat_at: r.heartbeat_at,
        })
    }
}

/// A node name: `[a-z0-9-]`, 1–63 characters, not starting or ending with `-` (a DNS label,
/// so it can name a Kubernetes pod or a host).
pub fn valid_node_id(id: &str) -> bool {
    (1..=63).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-')
}

/// The fleet aggregate.
#[derive(Clone, Debug)]
pub struct Nodes {
    pub(super) db: Db,
}

fn json(ids: &[String]) -> String {
    serde_json::to_string(ids).expect("a list of strings serializes")
}

impl Nodes {
    /// The database's clock, ms since the epoch: the only clock leases are measured by.
    pub async fn now(&self) -> Result<i64, ControlError> {
        let (now,): (i64,) = match self.db.pools() {
            super::Pools::Sqlite(p) => {
                sqlx::query_as(
                    "SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
                )
                .fetch_one(p)
                .await
            }
            super::Pools::Postgres(p) => {
                sqlx::query_as("SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT")
                    .fetch_one(p)
                    .await
            }
        }
        .map_err(q("reading the database clock"))?;
        Ok(now)
    }

    /// Register (or register again) a node: a new epoch, a lease until `now + lease_ms`,
    /// status live (draining stays draining: a restart does not undo a drain). Any earlier
    /// registration of the same name is fenced from here on. Returns the new epoch.
    pub async fn register(
        &self,
        info: &NodeInfo,
        now: i64,
        lease_ms: i64,
    ) -> Result<i64, ControlError> {
        if !valid_node_id(&info.id) {
            return Err(ControlError::invalid(
                "invalid_node_id",
                "a node name is 1–63 characters [a-z0-9-], not starting or ending with '-'",
            ));
        }
        let (epoch,): (i64,) = with_db!(self.db, p => sqlx::query_as(
            "INSERT INTO nodes (id, address, runsc_build, memory_mib, slots, status, epoch,
                lease_until, registered_at, heartbeat_at, free_memory_mib, free_slots,
                templates, images)
             VALUES ($1, $2, $3, $4, $5, 'live', 1, $6, $7, $7, $4, $5, '[]', '[]')
             ON CONFLICT (id) DO UPDATE SET
                address = excluded.address, runsc_build = excluded.runsc_build,
                memory_mib = excluded.memory_mib, slots = excluded.slots,
                status = CASE WHEN nodes.status = 'draining' THEN 'draining' ELSE 'live' END,
                epoch = nodes.epoch + 1, lease_until = excluded.lease_until,
                registered_at = excluded.registered_at, heartbeat_at = excluded.heartbeat_at,
                free_memory_mib = excluded.free_memory_mib, free_slots = excluded.free_slots,
                templates = '[]', images = '[]'
             RETURNING epoch",
        )
        .bind(&info.id)
        .bind(&info.address)
        .bind(&info.runsc_build)
        .bind(info.memory_mib)
        .bind(info.slots)
        .bind(now.saturating_add(lease_ms))
        .bind(now)
        .fetch_one(p).await)
        .map_err(q("registering a node"))?;
        Ok(epoch)
    }

    /// Renew `id`'s lease until `now + lease_ms` and record its load, if `epoch` is still
    /// its registration and it is not lost. A lease that lapsed but was not yet declared
    /// lost is renewed: nobody acted on it.
    pub async fn heartbeat(
        &self,
        id: &str,
        epoch: i64,
        load: &NodeLoad,
        now: i64,
        lease_ms: i64,
    ) -> Result<Heartbeat, ControlError> {
        let row: Option<(String,)> = with_db!(self.db, p => sqlx::query_as(
            "UPDATE nodes SET lease_until = $3, heartbeat_at = $4, free_memory_mib = $5,
                free_slots = $6, templates = $7, images = $8
             WHERE id = $1 AND epoch = $2 AND status <> 'lost'
             RETURNING status",
        )
        .bind(id)
        .bind(epoch)
        .bind(now.saturating_add(lease_ms))
        .bind(now)
        .bind(load.free_memory_mib)
        .bind(load.free_slots)
        .bind(json(&load.templates))
        .bind(json(&load.images))
        .fetch_optional(p).await)
        .map_err(q("renewing a node's lease"))?;
        match row {
            None => Ok(Heartbeat::Fenced),
            Some((s,)) => Ok(Heartbeat::Renewed(parse_column(
                "node status",
                &s,
                NodeStatus::parse,
            )?)),
        }
    }

    /// Declare lost every node whose lease ended at or before `now`; the ids this call
    /// declared (each node is declared by exactly one caller, however many run this at
    /// once).
    pub async fn expire(&self, now: i64) -> Result<Vec<String>, ControlError> {
        let rows: Vec<(String,)> = with_db!(self.db, p => sqlx::query_as(
            "UPDATE nodes SET status = 'lost'
             WHERE status <> 'lost' AND lease_until <= $1
             RETURNING id",
        )
        .bind(now)
        .fetch_all(p).await)
        .map_err(q("declaring nodes lost"))?;
        let mut ids: Vec<String> = rows.into_iter().map(|(id,)| id).collect();
        ids.sort();
        Ok(ids)
    }

    /// Set a node draining (true) or live again (false); false when it is lost or unknown.
    pub async fn set_draining(&self, id: &str, draining: bool) -> Result<bool, ControlError> {
        let (from, to) = if draining {
            ("live", "draining")
        } else {
            ("draining", "live")
        };
        let done = with_db!(self.db, p => sqlx::query(
            "UPDATE nodes SET status = $2 WHERE id = $1 AND status IN ($3, $2)",
        )
        .bind(id)
        .bind(to)
        .bind(from)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("setting a node's drain"))?;
        Ok(done == 1)
    }

    /// Nodes whose lease holds at `now` (live and draining), by id.
    pub async fn alive(&self, now: i64) -> Result<Vec<NodeRow>, ControlError> {
        let rows: Vec<NodeRecord> = with_db!(self.db, p => sqlx::query_as(
            "SELECT * FROM nodes WHERE status <> 'lost' AND lease_until > $1 ORDER BY id",
        )
        .bind(now)
        .fetch_all(p).await)
        .map_err(q("listing live nodes"))?;
        rows.into_iter().map(NodeRow::try_from).collect()
    }

    /// Every node the fleet knows, lost ones too, by id.
    pub async fn list(&self) -> Result<Vec<NodeRow>, ControlError> {
        let rows: Vec<NodeRecord> =
            with_db!(self.db, p => sqlx::query_as("SELECT * FROM nodes ORDER BY id")
                .fetch_all(p).await)
            .map_err(q("listing nodes"))?;
        rows.into_iter().map(NodeRow::try_from).collect()
    }

    pub async fn get(&self, id: &str) -> Result<Option<NodeRow>, ControlError> {
        let row: Option<NodeRecord> =
            with_db!(self.db, p => sqlx::query_as("SELECT * FROM nodes WHERE id = $1")
                .bind(id)
                .fetch_optional(p).await)
            .map_err(q("reading a node"))?;
        row.map(NodeRow::try_from).transpose()
    }

    /// Forget a lost node (an operator retiring it); false unless it is lost.
    pub async fn forget(&self, id: &str) -> Result<bool, ControlError> {
        let done = with_db!(self.db, p => sqlx::query(
            "DELETE FROM nodes WHERE id = $1 AND status = 'lost'",
        )
        .bind(id)
        .execute(p).await.map(|r| r.rows_affected()))
        .map_err(q("forgetting a node"))?;
        Ok(done == 1)
    }
}
