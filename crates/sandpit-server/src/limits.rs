//! Rate limits and quotas per workspace: API requests per hour, sandbox creations per hour
//! and concurrently running sandboxes.
//!
//! The two rates are GCRA buckets (`governor`): a workspace may spend its hourly allowance
//! in one burst, and it refills evenly over the hour. The running quota is decided by the
//! store, in the transaction that inserts a row or claims a waking sandbox's slot, under the
//! workspace's admission lock (`sandpit_control::store::Sandboxes::insert_admitted`), so
//! creates on several servers sharing a database never pass it. In front of it this edge
//! answers early, with the SDK's headers and before the creation rate is spent: it counts the
//! workspace's running units plus the room admitted here but not yet counted by the store
//! ([`Reservation`], handed back as the store counts each new row), under one mutex.
//!
//! Every authenticated response carries `x-csb-rate-hourly-{remaining,reset,used}` (the
//! headers the CodeSandbox SDK reads); creates and forks add
//! `x-csb-sandbox-hourly-{remaining,reset,used}` and `x-csb-vms-{remaining,used}`. A refusal
//! is a 429 with `Retry-After` and a code: `rate_limited`, `sandbox_rate_limited` or
//! `running_quota_exceeded`.
//!
//! What a workspace keeps is bounded too ([`LimitsConfig::max_templates`], `max_snapshots`,
//! `max_builds`, `max_suspended`): past one, the call is refused with `quota_exceeded`
//! naming the limit, 429 for concurrent builds (they end on their own), 507 for what stays
//! until the tenant deletes it. Templates and snapshots are counted in the statement that
//! inserts them, so concurrent requests never pass the limit; suspended sandboxes at
//! admission (under the admission lock, like the running quota).

use std::cell::RefCell;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::middleware::StateInformationMiddleware;
use governor::{Quota, RateLimiter};

use crate::error::{ApiError, ControlError};
use crate::server::Server;
use crate::util::{now_ms, rfc3339};
use sandpit_control::Node;

/// How long a client refused by the running quota is told to wait: nothing refills that
/// quota on a clock, a destroy or hibernate does.
const RUNNING_RETRY_SECS: u64 = 10;

/// The limits a server enforces per workspace (0 = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Authenticated API requests per hour.
    pub requests_per_hour: u32,
    /// Sandboxes created (create, or one per fork child) per hour.
    pub sandboxes_per_hour: u32,
    /// Sandboxes creating or running at once (suspended ones do not count).
    pub max_running: u32,
    /// Requests with an invalid, expired or revoked token per client address per hour; past
    /// it they get 429 `auth_rate_limited` instead of 401. Valid tokens are never held back.
    pub auth_failures_per_hour: u32,
    /// Templates a workspace keeps (built, building or failed; deleted ones do not count).
    pub max_templates: u32,
    /// Snapshots a workspace keeps.
    pub max_snapshots: u32,
    /// Volumes a workspace keeps.
    pub max_volumes: u32,
    /// Template builds of one workspace running or waiting at once.
    pub max_builds: u32,
    /// Sandboxes a workspace keeps suspended, counting its persistent sandboxes that run
    /// (an idle one is suspended by the reaper, which cannot refuse). A suspended sandbox
    /// holds no network slot, but it holds its disk and memory image.
    pub max_suspended: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            requests_per_hour: 36_000,
            sandboxes_per_hour: 1_000,
            max_running: 200,
            auth_failures_per_hour: 1_000,
            max_templates: 100,
            max_snapshots: 500,
            max_volumes: 50,
            max_builds: 2,
            max_suspended: 500,
        }
    }
}

/// One limit's state for a workspace, as the SDK headers and `/meta/info` show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Allowance {
    /// 0 when unlimited.
    pub limit: u32,
    pub used: u32,
    pub remaining: u32,
    /// When the allowance is whole again (RFC 3339); `None` for the running quota.
    pub reset: Option<String>,
}

/// A workspace's limits and what it uses of them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WorkspaceUsage {
    pub requests_hourly: Allowance,
    pub sandboxes_hourly: Allowance,
    pub running: Allowance,
}

type Bucket = RateLimiter<
    String,
    governor::state::keyed::DefaultKeyedStateStore<String>,
    governor::clock::DefaultClock,
    StateInformationMiddleware,
>;

/// What a bucket showed at its last check, to report usage without spending any of it.
#[derive(Debug, Clone, Copy)]
struct Seen {
    remaining: u32,
    at: Instant,
}

/// The server's limiters. Lives in [`Server::limits`].
pub struct Limits {
    pub cfg: LimitsConfig,
    requests: Option<Bucket>,
    sandboxes: Option<Bucket>,
    /// Keyed by client address, not workspace.
    auth_failures: Option<Bucket>,
    /// Last observed remaining allowance per (bucket, workspace); guards only the map.
    seen: Mutex<HashMap<(Kind, String), Seen>>,
    /// Creations admitted but whose rows are not yet inserted, per workspace. Guards only
    /// the map; changed under `admission`.
    reserved: Arc<Mutex<HashMap<String, u32>>>,
    /// Held while counting a workspace's running sandboxes and reserving room for new ones,
    /// and (lent to the control layer as `Admitted::lock`) while a store write makes
    /// reserved sandboxes count and their room is handed back.
    pub admission: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Requests,
    Sandboxes,
    AuthFailures,
}

fn bucket(per_hour: u32) -> Option<Bucket> {
    let n = NonZeroU32::new(per_hour)?;
    let quota = Quota::with_period(Duration::from_secs(3600) / n.get())
        .expect("a nonzero period")
        .allow_burst(n);
    Some(RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>())
}

/// Room for creations, held from admission until their rows are inserted (the store then
/// counts them). Dropping it releases the room.
#[must_use = "the room is released when the reservation drops"]
pub struct Reservation {
    reserved: Arc<Mutex<HashMap<String, u32>>>,
    workspace: String,
    n: u32,
}

impl Reservation {
    /// Give back `n` units of the room (the rows that took it are counted by the store now).
    pub fn release(&mut self, n: u32) {
        let n = n.min(self.n);
        if n == 0 {
            return;
        }
        let mut map = self.reserved.lock().expect("reservations poisoned");
        if let Some(v) = map.get_mut(&self.workspace) {
            *v = v.saturating_sub(n);
            if *v == 0 {
                map.remove(&self.workspace);
            }
        }
        self.n -= n;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.n == 0 {
            return;
        }
        let mut map = self.reserved.lock().expect("reservations poisoned");
        if let Some(v) = map.get_mut(&self.workspace) {
            *v = v.saturating_sub(self.n);
            if *v == 0 {
                map.remove(&self.workspace);
            }
        }
    }
}

impl Limits {
    pub fn new(cfg: LimitsConfig) -> Self {
        Limits {
            cfg,
            requests: bucket(cfg.requests_per_hour),
            sandboxes: bucket(cfg.sandboxes_per_hour),
            auth_failures: bucket(cfg.auth_failures_per_hour),
            seen: Mutex::new(HashMap::new()),
            reserved: Arc::new(Mutex::new(HashMap::new())),
            admission: tokio::sync::Mutex::new(()),
        }
    }

    /// Spend `n` of a bucket. `Ok` with the allowance left, or `Err` with the allowance
    /// (remaining 0) and how long to wait.
    fn spend(&self, kind: Kind, workspace: &str, n: u32) -> Result<Allowance, (Allowance, u64)> {
        let (bucket, limit) = match kind {
            Kind::Requests => (&self.requests, self.cfg.requests_per_hour),
            Kind::Sandboxes => (&self.sandboxes, self.cfg.sandboxes_per_hour),
            Kind::AuthFailures => (&self.auth_failures, self.cfg.auth_failures_per_hour),
        };
        let Some(bucket) = bucket else {
            return Ok(unlimited());
        };
        let per_cell = Duration::from_secs(3600) / limit;
        let key = workspace.to_string();
        let outcome = match NonZeroU32::new(n) {
            Some(n) => bucket.check_key_n(&key, n),
            None => return Ok(self.peek(kind, workspace)),
        };
        let remaining = match outcome {
            Ok(Ok(snapshot)) => snapshot.remaining_burst_capacity(),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(bucket.clock()));
                // Less than `n` is left (0 for a single request).
                let left = self
                    .peek(kind, workspace)
                    .remaining
                    .min(n.saturating_sub(1));
                self.seen.lock().expect("seen poisoned").insert(
                    (kind, key),
                    Seen {
                        remaining: left,
                        at: Instant::now(),
                    },
                );
                return Err((allowance(limit, left, per_cell), wait.as_secs() + 1));
            }
            // More than the whole hourly allowance at once: never possible.
            Err(_) => {
                let a = self.peek(kind, workspace);
                return Err((a, 3600));
            }
        };
        self.seen.lock().expect("seen poisoned").insert(
            (kind, key),
            Seen {
                remaining,
                at: Instant::now(),
            },
        );
        Ok(allowance(limit, remaining, per_cell))
    }

    /// A bucket's allowance from its last check plus what has refilled since.
    fn peek(&self, kind: Kind, workspace: &str) -> Allowance {
        let limit = match kind {
            Kind::Requests => self.cfg.requests_per_hour,
            Kind::Sandboxes => self.cfg.sandboxes_per_hour,
            Kind::AuthFailures => self.cfg.auth_failures_per_hour,
        };
        if limit == 0 {
            return unlimited();
        }
        let per_cell = Duration::from_secs(3600) / limit;
        let seen = self
            .seen
            .lock()
            .expect("seen poisoned")
            .get(&(kind, workspace.to_string()))
            .copied();
        let remaining = match seen {
            None => limit,
            Some(s) => {
                let refilled = (s.at.elapsed().as_nanos() / per_cell.as_nanos().max(1)) as u64;
                (s.remaining as u64 + refilled).min(limit as u64) as u32
            }
        };
        allowance(limit, remaining, per_cell)
    }

    /// Admit `n` new sandboxes for `workspace`: the suspended quota (for `persistent`
    /// ones, which suspend when idle), the running quota, then the creation rate. Adds the
    /// SDK's `x-csb-sandbox-hourly-*` and `x-csb-vms-*` headers to the response. The
    /// reservation must be held until the sandboxes' rows are inserted.
    pub async fn admit(
        &self,
        node: &Node,
        workspace: &str,
        n: u32,
        persistent: bool,
    ) -> Result<Reservation, ApiError> {
        self.admit_as(node, workspace, n, true, persistent).await
    }

    /// Forget limiter state that has refilled completely (whole buckets and their last
    /// readings). The bad-token bucket is keyed by client address, which a client chooses:
    /// without this its memory would grow with every address seen. For the reaper.
    pub fn prune(&self) {
        for bucket in [&self.requests, &self.sandboxes, &self.auth_failures]
            .into_iter()
            .flatten()
        {
            bucket.retain_recent();
            bucket.shrink_to_fit();
        }
        let hour = Duration::from_secs(3600);
        self.seen
            .lock()
            .expect("seen poisoned")
            .retain(|_, s| s.at.elapsed() < hour);
    }

    /// Admit one suspended sandbox back to running: the running quota only (waking creates
    /// nothing). The reservation must be held until its row says `running`.
    pub async fn admit_wake(&self, node: &Node, workspace: &str) -> Result<Reservation, ApiError> {
        self.admit_as(node, workspace, 1, false, false).await
    }

    async fn admit_as(
        &self,
        node: &Node,
        workspace: &str,
        n: u32,
        creates: bool,
        persistent: bool,
    ) -> Result<Reservation, ApiError> {
        let _admission = self.admission.lock().await;
        if persistent {
            sandpit_control::node::lifecycle::check_suspendable(node, workspace, n).await?;
        }
        let running = node.store.sandboxes.count_running(workspace).await? as u32;
        let reserved = self
            .reserved
            .lock()
            .expect("reservations poisoned")
            .get(workspace)
            .copied()
            .unwrap_or(0);
        let in_use = running + reserved;
        let max = self.cfg.max_running;
        if max > 0 && in_use + n > max {
            add_headers(vms_headers(max, in_use));
            add_headers(allowance_headers(
                "sandbox",
                &self.peek(Kind::Sandboxes, workspace),
            ));
            add_headers([retry_after(RUNNING_RETRY_SECS)]);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "running_quota_exceeded",
                format!(
                    "this workspace may run {max} sandboxes at once and has {in_use}; destroy or hibernate some{}",
                    if creates {
                        ""
                    } else {
                        " before waking this one"
                    }
                ),
            ));
        }
        match if creates {
            self.spend(Kind::Sandboxes, workspace, n)
        } else {
            Ok(self.peek(Kind::Sandboxes, workspace))
        } {
            Ok(a) => add_headers(allowance_headers("sandbox", &a)),
            Err((a, wait)) => {
                add_headers(allowance_headers("sandbox", &a));
                add_headers(vms_headers(max, in_use));
                add_headers([retry_after(wait)]);
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "sandbox_rate_limited",
                    format!(
                        "this workspace may create {} sandboxes per hour; retry in {wait} s",
                        self.cfg.sandboxes_per_hour
                    ),
                ));
            }
        }
        add_headers(vms_headers(max, in_use + n));
        *self
            .reserved
            .lock()
            .expect("reservations poisoned")
            .entry(workspace.to_string())
            .or_default() += n;
        Ok(Reservation {
            reserved: self.reserved.clone(),
            workspace: workspace.to_string(),
            n,
        })
    }
}

/// A workspace's limits and usage, spending nothing (for `/meta/info`).
pub async fn usage(server: &Server, workspace: &str) -> Result<WorkspaceUsage, ControlError> {
    let limits = &server.limits;
    let running = server.store.sandboxes.count_running(workspace).await? as u32;
    let max = limits.cfg.max_running;
    Ok(WorkspaceUsage {
        requests_hourly: limits.peek(Kind::Requests, workspace),
        sandboxes_hourly: limits.peek(Kind::Sandboxes, workspace),
        running: Allowance {
            limit: max,
            used: running,
            remaining: if max == 0 {
                u32::MAX
            } else {
                max.saturating_sub(running)
            },
            reset: None,
        },
    })
}

fn unlimited() -> Allowance {
    Allowance {
        limit: 0,
        used: 0,
        remaining: u32::MAX,
        reset: None,
    }
}

fn allowance(limit: u32, remaining: u32, per_cell: Duration) -> Allowance {
    let used = limit.saturating_sub(remaining);
    let full_in = per_cell * used;
    Allowance {
        limit,
        used,
        remaining,
        reset: Some(rfc3339(now_ms() + full_in.as_millis() as i64)),
    }
}

fn header(name: &'static str, value: String) -> (HeaderName, HeaderValue) {
    (
        HeaderName::from_static(name),
        HeaderValue::from_str(&value).expect("ASCII header value"),
    )
}

fn retry_after(secs: u64) -> (HeaderName, HeaderValue) {
    (
        axum::http::header::RETRY_AFTER,
        HeaderValue::from(secs.max(1)),
    )
}

fn allowance_headers(which: &str, a: &Allowance) -> Vec<(HeaderName, HeaderValue)> {
    if a.limit == 0 {
        return Vec::new();
    }
    let (remaining, reset, used) = match which {
        "rate" => (
            "x-csb-rate-hourly-remaining",
            "x-csb-rate-hourly-reset",
            "x-csb-rate-hourly-used",
        ),
        _ => (
            "x-csb-sandbox-hourly-remaining",
            "x-csb-sandbox-hourly-reset",
            "x-csb-sandbox-hourly-used",
        ),
    };
    let mut v = vec![
        header(remaining, a.remaining.to_string()),
        header(used, a.used.to_string()),
    ];
    if let Some(r) = &a.reset {
        v.push(header(reset, r.clone()));
    }
    v
}

fn vms_headers(max: u32, in_use: u32) -> Vec<(HeaderName, HeaderValue)> {
    if max == 0 {
        return Vec::new();
    }
    vec![
        header(
            "x-csb-vms-remaining",
            max.saturating_sub(in_use).to_string(),
        ),
        header("x-csb-vms-used", in_use.to_string()),
    ]
}

tokio::task_local! {
    /// Headers a handler adds to its response, whatever it returns (see [`add_headers`]).
    static EXTRA_HEADERS: RefCell<Vec<(HeaderName, HeaderValue)>>;
}

/// Add headers to the response of the request being handled (no-op outside [`enforce`]).
pub fn add_headers(headers: impl IntoIterator<Item = (HeaderName, HeaderValue)>) {
    let _ = EXTRA_HEADERS.try_with(|h| h.borrow_mut().extend(headers));
}

/// Run `fut` collecting the headers it adds, for work spawned off the request's task; the
/// caller passes them on with [`add_headers`].
pub async fn collecting_headers<F: std::future::Future>(
    fut: F,
) -> (F::Output, Vec<(HeaderName, HeaderValue)>) {
    EXTRA_HEADERS
        .scope(RefCell::new(Vec::new()), async {
            let out = fut.await;
            (out, EXTRA_HEADERS.with(|h| h.take()))
        })
        .await
}

/// Middleware: resolve the bearer token (the [`crate::auth::Auth`] extractor reuses it),
/// spend one request of the workspace's hourly allowance, 429 when it is spent, and add the
/// rate headers. Requests without a token pass untouched (public routes; the extractor
/// answers 401 elsewhere). Requests with a bad token spend one of their client address's
/// failures; past that allowance they get 429 `auth_rate_limited` instead of 401.
pub async fn enforce(State(server): State<Arc<Server>>, mut req: Request, next: Next) -> Response {
    let auth = match crate::auth::resolve(&server, req.headers()).await {
        Ok(auth) => auth,
        Err(_) if !crate::auth::presents_token(req.headers()) => {
            return next.run(req).await;
        }
        // Not a bad token (the database is out of reach, say): nothing to count against the
        // address; the answer says what happened.
        Err(e) if e.status != StatusCode::UNAUTHORIZED => {
            let unavailable = e.status == StatusCode::SERVICE_UNAVAILABLE;
            let mut resp = e.into_response();
            if unavailable {
                let (k, v) = retry_after(5);
                resp.headers_mut().insert(k, v);
            }
            return resp;
        }
        Err(_) => {
            let client = req
                .extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip().to_string())
                .unwrap_or_default();
            return match server.limits.spend(Kind::AuthFailures, &client, 1) {
                // The route decides: the `Auth` extractor answers 401, public routes serve.
                Ok(_) => next.run(req).await,
                Err((_, wait)) => {
                    tracing::warn!(%client, "too many requests with bad tokens");
                    let mut resp = ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "auth_rate_limited",
                        format!("too many requests with an invalid token from this address; retry in {wait} s"),
                    )
                    .into_response();
                    let (k, v) = retry_after(wait);
                    resp.headers_mut().insert(k, v);
                    resp
                }
            };
        }
    };
    let workspace = auth.workspace_id.clone();
    req.extensions_mut().insert(auth);
    let rate = match server.limits.spend(Kind::Requests, &workspace, 1) {
        Ok(a) => allowance_headers("rate", &a),
        Err((a, wait)) => {
            let mut resp = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "this workspace may make {} API requests per hour; retry in {wait} s",
                    server.limits.cfg.requests_per_hour
                ),
            )
            .into_response();
            let h = resp.headers_mut();
            for (k, v) in allowance_headers("rate", &a)
                .into_iter()
                .chain([retry_after(wait)])
            {
                h.insert(k, v);
            }
            return resp;
        }
    };
    let (mut resp, extra) = collecting_headers(next.run(req)).await;
    let h = resp.headers_mut();
    for (k, v) in rate.into_iter().chain(extra) {
        h.insert(k, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_admits_its_hourly_allowance_then_refuses_with_a_wait() {
        let limits = Limits::new(LimitsConfig {
            requests_per_hour: 5,
            sandboxes_per_hour: 3,
            max_running: 0,
            auth_failures_per_hour: 0,
            ..LimitsConfig::default()
        });
        for i in 0..5u32 {
            let a = limits
                .spend(Kind::Requests, "ws_a", 1)
                .expect("within the allowance");
            assert_eq!((a.used, a.remaining), (i + 1, 4 - i));
        }
        let (a, wait) = limits.spend(Kind::Requests, "ws_a", 1).unwrap_err();
        assert_eq!(a.remaining, 0);
        // One cell refills every 12 minutes.
        assert!((600..=721).contains(&wait), "wait {wait}");
        // Another workspace has its own bucket.
        assert!(limits.spend(Kind::Requests, "ws_b", 1).is_ok());
        // A batch larger than what is left is refused whole; larger than the limit, always.
        assert!(limits.spend(Kind::Sandboxes, "ws_a", 2).is_ok());
        assert!(limits.spend(Kind::Sandboxes, "ws_a", 2).is_err());
        assert!(limits.spend(Kind::Sandboxes, "ws_a", 1).is_ok());
        assert_eq!(
            limits.spend(Kind::Sandboxes, "ws_b", 4).unwrap_err().1,
            3600
        );
        assert_eq!(limits.peek(Kind::Sandboxes, "ws_b").remaining, 3);
    }

    #[test]
    fn a_reservation_gives_back_only_its_own_room() {
        // Five units reserved in the workspace: three by `r`, two by another admission.
        let reserved = Arc::new(Mutex::new(HashMap::from([("ws".to_string(), 5)])));
        let mut r = Reservation {
            reserved: reserved.clone(),
            workspace: "ws".into(),
            n: 3,
        };
        let left = |m: &Arc<Mutex<HashMap<String, u32>>>| m.lock().unwrap().get("ws").copied();
        r.release(1);
        assert_eq!(left(&reserved), Some(4));
        r.release(10);
        assert_eq!(left(&reserved), Some(2));
        drop(r);
        assert_eq!(left(&reserved), Some(2));
    }

    #[test]
    fn pruning_forgets_only_refilled_state() {
        let limits = Limits::new(LimitsConfig {
            requests_per_hour: 0,
            sandboxes_per_hour: 0,
            max_running: 0,
            auth_failures_per_hour: 36_000,
            ..LimitsConfig::default()
        });
        // One cell refills every 100 ms: 99 addresses spend one (whole again within 200 ms),
        // one spends 60 (whole again only after 6 s).
        for i in 0..99 {
            assert!(
                limits
                    .spend(Kind::AuthFailures, &format!("10.0.0.{i}"), 1)
                    .is_ok()
            );
        }
        assert!(limits.spend(Kind::AuthFailures, "10.0.1.1", 60).is_ok());
        let bucket = limits.auth_failures.as_ref().unwrap();
        assert_eq!(bucket.len(), 100);
        std::thread::sleep(Duration::from_millis(500));
        limits.prune();
        assert_eq!(bucket.len(), 1);
    }

    #[test]
    fn zero_means_unlimited() {
        let limits = Limits::new(LimitsConfig {
            requests_per_hour: 0,
            sandboxes_per_hour: 0,
            max_running: 0,
            auth_failures_per_hour: 0,
            ..LimitsConfig::default()
        });
        for _ in 0..10_000 {
            assert!(limits.spend(Kind::Requests, "ws", 1).is_ok());
        }
        assert!(allowance_headers("rate", &limits.peek(Kind::Requests, "ws")).is_empty());
    }

    #[test]
    fn reservations_release_on_drop() {
        let limits = Limits::new(LimitsConfig::default());
        let r = Reservation {
            reserved: limits.reserved.clone(),
            workspace: "ws".into(),
            n: 3,
        };
        limits.reserved.lock().unwrap().insert("ws".into(), 3);
        drop(r);
        assert!(limits.reserved.lock().unwrap().is_empty());
    }
}
