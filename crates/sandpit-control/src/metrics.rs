//! Prometheus metrics of a node and its HTTP edge (`prometheus-client`), rendered in the text
//! exposition format by [`Metrics::render`] for `GET /metrics` on the metrics listener.
//!
//! Counters and histograms are updated where things happen (the HTTP middleware, the
//! lifecycle operations, the pool, builds, the liveness watch); gauges that describe state
//! (sandboxes by status and workspace, pool size, disk and memory headroom) are set just
//! before each render ([`Metrics::set_census`], [`Metrics::set_host`]).
//!
//! Label values are bounded: routes are axum's matched path templates (never a raw path),
//! operations and outcomes fixed words, workspaces ids the store issued.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub method: String,
}

/// A lifecycle operation: `create` (with `path`: `pool`, `snapshot`, `boot_snapshot`,
/// `cold`), `wake`, `hibernate`, `fork`, `exec`; `outcome` `ok` or `error`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
    pub path: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SandboxLabels {
    pub status: String,
    pub workspace: String,
}

/// A secret injected by the proxy into a request of a sandbox (never the value).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabels {
    pub workspace: String,
    pub sandbox: String,
    pub secret: String,
}

type Timings = Family<RouteLabels, Histogram, fn() -> Histogram>;
type OpTimings = Family<OpLabels, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    // 1 ms to about 33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn build_seconds() -> Histogram {
    // 0.1 s to about 27 min.
    Histogram::new(exponential_buckets(0.1, 2.0, 15))
}

/// The node's metrics.
pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Timings,
    pub lifecycle: OpTimings,
    /// Creates that asked the warm pool: `hit` or `miss`.
    pub pool_takes: Family<ResultLabels, Counter>,
    /// Template builds by `result` (`ok`, `error`), their durations.
    pub builds: Family<ResultLabels, Histogram, fn() -> Histogram>,
    /// Build steps by `result`: `cached` or `run`.
    pub build_steps: Family<ResultLabels, Counter>,
    /// Sandboxes the liveness watch found dead and settled.
    pub liveness_settlements: Counter,
    /// Restored agents that did not answer and were restarted (memory kept; the agent's
    /// terminals and processes are lost).
    pub agent_restarts: Counter,
    /// Requests refused with 429, by error code.
    pub rate_limited: Family<CodeLabels, Counter>,
    /// Webhook delivery attempts by `result`: `delivered`, `retry` (another attempt
    /// scheduled), `failed` (given up), `refused` (the dialer would not connect; retried too).
    pub webhook_deliveries: Family<ResultLabels, Counter>,
    pub sandboxes: Family<SandboxLabels, Gauge>,
    /// Requests the secrets proxy put a secret's value into, by workspace, sandbox and
    /// secret name.
    pub secret_injections: Family<SecretLabels, Counter>,
    pub pool_size: Gauge,
    pub disk_free_bytes: Gauge,
    pub memory_available_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sandpit");
        let m = Metrics {
            registry: Registry::default(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(seconds),
            lifecycle: Family::new_with_constructor(seconds),
            pool_takes: Family::default(),
            builds: Family::new_with_constructor(build_seconds),
            build_steps: Family::default(),
            liveness_settlements: Counter::default(),
            agent_restarts: Counter::default(),
            rate_limited: Family::default(),
            webhook_deliveries: Family::default(),
            sandboxes: Family::default(),
            secret_injections: Family::default(),
            pool_size: Gauge::default(),
            disk_free_bytes: Gauge::default(),
            memory_available_bytes: Gauge::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            m.http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer HTTP requests (to the response head), by route template and method",
            m.http_duration.clone(),
        );
        registry.register(
            "lifecycle_duration_seconds",
            "Lifecycle operations: create (by path: pool, snapshot, boot_snapshot, cold), wake, hibernate, fork, exec",
            m.lifecycle.clone(),
        );
        registry.register(
            "pool_takes",
            "Creates that asked the warm pool, by result (hit, miss)",
            m.pool_takes.clone(),
        );
        registry.register(
            "build_duration_seconds",
            "Template builds, by result",
            m.builds.clone(),
        );
        registry.register(
            "build_steps",
            "Template build steps, by result (cached, run)",
            m.build_steps.clone(),
        );
        registry.register(
            "liveness_settlements",
            "Running sandboxes the liveness watch found dead and settled",
            m.liveness_settlements.clone(),
        );
        registry.register(
            "agent_restarts",
            "Restored agents that were restarted (deaf after a restore, or crashed after it)",
            m.agent_restarts.clone(),
        );
        registry.register(
            "rate_limit_refusals",
            "Requests refused with 429, by error code",
            m.rate_limited.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts, by result (delivered, retry, failed, refused)",
            m.webhook_deliveries.clone(),
        );
        registry.register(
            "sandboxes",
            "This node's sandboxes by status and workspace",
            m.sandboxes.clone(),
        );
        registry.register(
            "secret_injections",
            "Requests the secrets proxy injected a secret into, by workspace, sandbox and secret (never the value)",
            m.secret_injections.clone(),
        );
        registry.register(
            "pool_size",
            "Pooled sandboxes this node holds",
            m.pool_size.clone(),
        );
        registry.register(
            "disk_free_bytes",
            "Free bytes on the data directory's filesystem",
            m.disk_free_bytes.clone(),
        );
        registry.register(
            "memory_available_bytes",
            "MemAvailable of the host",
            m.memory_available_bytes.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Time a lifecycle operation: the outcome is recorded from `result`.
    pub fn observe<T, E>(
        &self,
        op: &'static str,
        path: &'static str,
        started: Instant,
        result: &Result<T, E>,
    ) {
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.lifecycle
            .get_or_create(&OpLabels { op, path, outcome })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Replace the sandbox gauges with a census (`(status, workspace, count)`).
    pub fn set_census(&self, census: &[(String, String, i64)]) {
        self.sandboxes.clear();
        let mut pooled = 0;
        for (status, workspace, n) in census {
            if status == "pooled" {
                pooled += n;
            }
            self.sandboxes
                .get_or_create(&SandboxLabels {
                    status: status.clone(),
                    workspace: workspace.clone(),
                })
                .set(*n);
        }
        self.pool_size.set(pooled);
    }

    /// Set the host headroom gauges.
    pub fn set_host(&self, disk_free: Option<u64>, memory_available: Option<u64>) {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        if let Some(d) = disk_free {
            self.disk_free_bytes.set(clamp(d));
        }
        if let Some(m) = memory_available {
            self.memory_available_bytes.set(clamp(m));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_recorded() {
        let m = Metrics::new();
        m.http_requests
            .get_or_create(&HttpLabels {
                route: "/v1/sandboxes".into(),
                method: "POST".into(),
                status: 201,
            })
            .inc();
        m.observe::<(), ()>("create", "cold", Instant::now(), &Ok(()));
        m.set_census(&[
            ("running".into(), "ws1".into(), 2),
            ("pooled".into(), "system".into(), 3),
        ]);
        m.set_host(Some(10), Some(20));
        let text = m.render();
        assert!(
            text.contains(
                r#"sandpit_http_requests_total{route="/v1/sandboxes",method="POST",status="201"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"sandpit_lifecycle_duration_seconds_count{op="create",path="cold",outcome="ok"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"sandpit_sandboxes{status="running",workspace="ws1"} 2"#),
            "{text}"
        );
        assert!(text.contains("sandpit_pool_size 3"), "{text}");
        assert!(text.contains("sandpit_disk_free_bytes 10"), "{text}");
        // The Grafana dashboard in deploy/ asks only for metrics that exist (every family
        // given a sample, so each is rendered).
        m.pool_takes
            .get_or_create(&ResultLabels { result: "hit" })
            .inc();
        m.builds
            .get_or_create(&ResultLabels { result: "ok" })
            .observe(1.0);
        m.build_steps
            .get_or_create(&ResultLabels { result: "cached" })
            .inc();
        m.liveness_settlements.inc();
        m.rate_limited
            .get_or_create(&CodeLabels {
                code: "rate_limited".into(),
            })
            .inc();
        m.http_duration
            .get_or_create(&RouteLabels {
                route: "/v1/sandboxes".into(),
                method: "POST".into(),
            })
            .observe(0.1);
        let text = m.render();
        let exported: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert_eq!(exported.len(), 13, "{exported:?}");
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/grafana/sandpit.json");
        #[expect(
            clippy::disallowed_methods,
            reason = "a checked-in file of the repository"
        )]
        let dashboard = std::fs::read_to_string(path).expect("deploy/grafana/sandpit.json");
        let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("JSON");
        let mut asked = 0;
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if !word.starts_with("sandpit_") {
                        continue;
                    }
                    asked += 1;
                    let family = ["_bucket", "_count", "_sum", "_total"]
                        .iter()
                        .find_map(|s| word.strip_suffix(s))
                        .unwrap_or(word);
                    assert!(
                        exported.contains(&family),
                        "the dashboard asks for {word}, which is not exported: {exported:?}"
                    );
                }
            }
        }
        assert!(asked >= 10, "{asked}");
        // A census replaces the last one: statuses that emptied disappear.
        m.set_census(&[]);
        assert!(!m.render().contains("workspace=\"ws1\""));
    }
}
