//! Webhook deliveries: every lifecycle event of a workspace, POSTed as JSON (the event's JSON
//! on `GET /v1/events`) to each of its webhooks that takes the event's kind, signed.
//!
//! The store makes one delivery row per (webhook, event) when the event is appended
//! (`sandpit_control::store::Webhooks`). [`spawn`] runs this server's deliverer: each
//! [`TICK`] it claims due deliveries (a lease of [`LEASE`], so one server of a fleet sending
//! them, and a server that dies mid-attempt leaves them to another), sends each in a task of
//! its own (at most [`IN_FLIGHT`] at once) and records the outcome: a 2xx answer is
//! `delivered`; anything else, a refused address or a connect, TLS or timeout error schedules
//! another attempt after [`retry_delay`] (the base, `--webhook-retry-base`, doubling per
//! attempt, at most [`MAX_RETRY_DELAY`]) until [`GIVE_UP_AFTER`] the event, when it is
//! `failed`.
//!
//! Connections go through the `Dialer` only, with `Purpose::Webhook`: the URL's host is
//! resolved again at each attempt and every address judged before it is connected to, so
//! the sandbox pool, the host, loopback and link-local (metadata) are never reached (the
//! operator's `--webhook-allow-hosts` lift only loopback, private and host addresses). https
//! uses rustls with the platform's roots. Every step has a timeout, and at most
//! [`KEPT_RESPONSE`] bytes of an answer's body are read. The secret and the URL (which may
//! carry a token of the receiver) are never logged.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, header};
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use sandpit_api_types::{
    CreateWebhookRequest, EVENT_KINDS, MAX_WEBHOOK_DESCRIPTION, MAX_WEBHOOK_URL,
};
use sandpit_control::DisplayChain;
use sandpit_control::store::{
    AttemptOutcome, ClaimedDelivery, DELIVERED, EventRow, FAILED, PENDING,
};
use sandpit_net::dial::Purpose;
use sandpit_net::{Dialer, NetError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;

use crate::error::ApiError;
use crate::server::Server;

/// The first retry's delay when the operator names none.
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(10);
/// The longest delay between two attempts.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60 * 60);
/// No attempt is made later than this after the event: the delivery is `failed` instead.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 60 * 60);
/// How often the deliverer looks for due deliveries.
pub const TICK: Duration = Duration::from_secs(1);
/// How long a claim holds a delivery: longer than any attempt ([`ATTEMPT_TIMEOUT`]).
pub const LEASE: Duration = Duration::from_secs(120);
/// The longest an attempt takes, connect to the end of the kept body.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a TLS handshake takes.
const TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest the answer's head takes once the request is sent.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// Bytes of an answer's body kept for the deliveries view (the rest is not read).
pub const KEPT_RESPONSE: usize = 4096;
/// Attempts one server makes at once.
pub const IN_FLIGHT: usize = 32;
/// Deliveries claimed at once.
const BATCH: usize = 16;
/// Deliveries `GET /v1/webhooks/{id}/deliveries` shows.
pub const DELIVERIES_SHOWN: i64 = 100;
/// A webhook secret's prefix.
pub const SECRET_PREFIX: &str = "whsec_";

/// A create request that passed [`validate`]: what the store keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidWebhook {
    /// The URL as parsed (normalized).
    pub url: String,
    /// The stored filter (`,kind,…,`, in [`EVENT_KINDS`] order), `None` for every kind.
    pub events: Option<String>,
    pub description: Option<String>,
}

/// Check a create request: 400 `invalid_webhook_url`, `invalid_webhook_events` or
/// `invalid_webhook_description`.
pub fn validate(req: &CreateWebhookRequest) -> Result<ValidWebhook, ApiError> {
    let bad_url = |why: &str| ApiError::bad_request("invalid_webhook_url", why.to_string());
    if req.url.len() > MAX_WEBHOOK_URL {
        return Err(bad_url("the url is longer than 2048 characters"));
    }
    let url = url::Url::parse(&req.url).map_err(|_| bad_url("the url does not parse"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad_url("the url's scheme must be http or https"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad_url("the url may not carry user info"));
    }
    if url.host().is_none() {
        return Err(bad_url("the url names no host"));
    }
    if url.fragment().is_some() {
        return Err(bad_url("the url may not carry a fragment"));
    }
    if url.as_str().len() > MAX_WEBHOOK_URL {
        return Err(bad_url("the url is longer than 2048 characters"));
    }
    let events = match &req.events {
        None => None,
        Some(kinds) => {
            let bad = |why: String| ApiError::bad_request("invalid_webhook_events", why);
            if kinds.is_empty() {
                return Err(bad(
                    "events names no kind (leave it out for every kind)".into()
                ));
            }
            if kinds.len() > EVENT_KINDS.len() {
                return Err(bad(format!(
                    "events names more than the {} kinds",
                    EVENT_KINDS.len()
                )));
            }
            if let Some(k) = kinds.iter().find(|k| !EVENT_KINDS.contains(&k.as_str())) {
                let shown: String = k.chars().take(40).collect();
                return Err(bad(format!(
                    "{shown:?} is not an event kind ({})",
                    EVENT_KINDS.join(", ")
                )));
            }
            let chosen: Vec<&str> = EVENT_KINDS
                .iter()
                .copied()
                .filter(|k| kinds.iter().any(|c| c == k))
                .collect();
            Some(sandpit_control::store::encode_kinds(&chosen))
        }
    };
    if let Some(d) = &req.description
        && (d.chars().count() > MAX_WEBHOOK_DESCRIPTION || d.chars().any(char::is_control))
    {
        return Err(ApiError::bad_request(
            "invalid_webhook_description",
            "a description is at most 256 characters, none of them control characters",
        ));
    }
    Ok(ValidWebhook {
        url: url.as_str().to_string(),
        events,
        description: req.description.clone(),
    })
}

/// `Sandpit-Signature`: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut message = format!("{t}.").into_bytes();
    message.extend_from_slice(body);
    let mac = crate::util::hmac_sha256(secret.as_bytes(), &message);
    format!("t={t},v1={}", hex::encode(mac))
}

/// The delay after the `attempts`-th failed attempt (1 for the first): `base` doubling each
/// time, at most [`MAX_RETRY_DELAY`].
pub fn retry_delay(base: Duration, attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(31);
    base.saturating_mul(1u32 << doublings).min(MAX_RETRY_DELAY)
}

/// When to try again after the `attempts`-th failed attempt made at `now` (Unix ms), for an
/// event of `event_at`; `None`: that would be past [`GIVE_UP_AFTER`] the event, give up.
pub fn next_attempt(base: Duration, attempts: u32, event_at: i64, now: i64) -> Option<i64> {
    let at = now.saturating_add(ms(retry_delay(base, attempts)));
    (at <= event_at.saturating_add(ms(GIVE_UP_AFTER))).then_some(at)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Start this server's deliverer; it stops with the node's `shutdown` (attempts under way
/// are dropped: their leases lapse and they are tried again).
pub fn spawn(server: &Arc<Server>) -> tokio::task::JoinHandle<()> {
    let server = server.clone();
    tokio::spawn(async move {
        let dialer = server
            .net
            .dialer()
            .with_exceptions(server.cfg.webhook_allow_hosts.clone());
        let tls = match tls_config() {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::warn!(error = %e, "webhooks: no TLS roots; https deliveries will fail");
                None
            }
        };
        let ctx = Arc::new(Ctx {
            server: server.clone(),
            dialer,
            tls,
        });
        let mut attempts: JoinSet<()> = JoinSet::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = server.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            while attempts.try_join_next().is_some() {}
            let room = IN_FLIGHT.saturating_sub(attempts.len()).min(BATCH);
            if room == 0 {
                continue;
            }
            for d in claim(&ctx, room).await {
                let ctx = ctx.clone();
                attempts.spawn(async move { deliver(&ctx, d).await });
            }
        }
        attempts.shutdown().await;
    })
}

/// What every attempt of this server shares.
struct Ctx {
    server: Arc<Server>,
    dialer: Dialer,
    tls: Option<Arc<rustls::ClientConfig>>,
}

fn tls_config() -> Result<rustls::ClientConfig, rustls::Error> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_platform_verifier()?
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

/// Claim up to `n` due deliveries (the database's clock decides what is due).
async fn claim(ctx: &Ctx, n: usize) -> Vec<ClaimedDelivery> {
    let store = &ctx.server.store;
    let now = match store.nodes.now().await {
        Ok(now) => now,
        Err(e) => {
            tracing::warn!(error = %DisplayChain(&e), "webhooks: reading the clock");
            return Vec::new();
        }
    };
    match store
        .webhooks
        .claim(
            &ctx.server.cfg.node_id,
            now,
            now.saturating_add(ms(LEASE)),
            n as i64,
        )
        .await
    {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %DisplayChain(&e), "webhooks: claiming deliveries");
            Vec::new()
        }
    }
}

/// Make one attempt of a claimed delivery and record it.
async fn deliver(ctx: &Ctx, d: ClaimedDelivery) {
    let server = &ctx.server;
    // The lease began at `lease_until - LEASE`: the attempt's time on the database's clock.
    let started = d.lease_until.saturating_sub(ms(LEASE));
    let attempts = u32::try_from(d.attempts.saturating_add(1)).unwrap_or(u32::MAX);
    let (result, outcome) = match event_body(&d) {
        None => (
            FAILED,
            AttemptOutcome {
                status: FAILED,
                next_attempt_at: started,
                status_code: None,
                error: Some("the event is no longer kept".into()),
                response: None,
                attempted_at: started,
            },
        ),
        Some(body) => {
            let t = started.div_euclid(1000);
            let sig = signature(&d.secret, t, &body);
            let sent = tokio::time::timeout(ATTEMPT_TIMEOUT, send(ctx, &d, body, &sig)).await;
            let sent = sent.unwrap_or_else(|_| {
                Err(Failure::Other(format!(
                    "no answer within {}s",
                    ATTEMPT_TIMEOUT.as_secs()
                )))
            });
            let (code, response, error, refused) = match sent {
                Ok((code, body)) => (Some(i64::from(code)), Some(body), None, false),
                Err(Failure::Refused(why)) => (None, None, Some(why), true),
                Err(Failure::Other(why)) => (None, None, Some(why), false),
            };
            let ok = code.is_some_and(|c| (200..300).contains(&c));
            let next = next_attempt(server.cfg.webhook_retry_base, attempts, d.event_at, started);
            let status = match (ok, next) {
                (true, _) => DELIVERED,
                (false, Some(_)) => PENDING,
                (false, None) => FAILED,
            };
            let result = match status {
                DELIVERED => "delivered",
                _ if refused => "refused",
                PENDING => "retry",
                _ => "failed",
            };
            (
                result,
                AttemptOutcome {
                    status,
                    next_attempt_at: next.unwrap_or(started),
                    status_code: code,
                    error,
                    response,
                    attempted_at: started,
                },
            )
        }
    };
    server
        .metrics
        .webhook_deliveries
        .get_or_create(&sandpit_control::metrics::ResultLabels { result })
        .inc();
    tracing::debug!(
        webhook = %d.webhook_id,
        event = d.event_seq,
        attempts,
        result,
        status = ?outcome.status_code,
        "webhook delivery attempt"
    );
    match server
        .store
        .webhooks
        .settle(d.id, &server.cfg.node_id, d.lease_until, &outcome)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!(webhook = %d.webhook_id, event = d.event_seq, "webhook delivery: lease lost before the outcome was recorded")
        }
        Err(e) => {
            tracing::warn!(webhook = %d.webhook_id, event = d.event_seq, error = %DisplayChain(&e), "webhook delivery: recording the outcome")
        }
    }
}

/// The event's JSON, as `GET /v1/events` sends it (`None` if the event is gone).
fn event_body(d: &ClaimedDelivery) -> Option<Vec<u8>> {
    let row = EventRow {
        seq: d.event_seq,
        workspace_id: String::new(),
        kind: d.kind.clone()?,
        sandbox_id: d.sandbox_id.clone(),
        detail: d.detail.clone()?,
        at: d.at?,
    };
    Some(serde_json::to_vec(&crate::routes::events::to_api(&row)).expect("serializes"))
}

/// Why an attempt got no answer.
enum Failure {
    /// The dialer would not connect (the address is in a range webhooks may not reach).
    Refused(String),
    Other(String),
}

/// POST the body; the answer's status and the start of its body.
async fn send(
    ctx: &Ctx,
    d: &ClaimedDelivery,
    body: Vec<u8>,
    signature: &str,
) -> Result<(u16, String), Failure> {
    let url =
        url::Url::parse(&d.url).map_err(|_| Failure::Other("the url does not parse".into()))?;
    let host = match url.host() {
        Some(url::Host::Domain(h)) => h.to_string(),
        Some(url::Host::Ipv4(a)) => a.to_string(),
        Some(url::Host::Ipv6(a)) => a.to_string(),
        None => return Err(Failure::Other("the url names no host".into())),
    };
    let https = url.scheme() == "https";
    let port = url
        .port_or_known_default()
        .ok_or_else(|| Failure::Other("the url names no port".into()))?;
    let stream = ctx
        .dialer
        .dial(&host, port, Purpose::Webhook)
        .await
        .map_err(|e| match e {
            NetError::Refused(r) => Failure::Refused(format!("refused: {r}")),
            other => Failure::Other(DisplayChain(&other).to_string()),
        })?;
    let host_header = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or(&host)),
        None => url.host_str().unwrap_or(&host).to_string(),
    };
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let len = body.len();
    let req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::HOST, host_header)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, len)
        .header(header::USER_AGENT, "Sandpit-Webhooks/1")
        .header("sandpit-event-id", d.event_seq)
        .header("sandpit-webhook-id", &d.webhook_id)
        .header(
            "sandpit-signature",
            HeaderValue::from_str(signature).expect("ascii"),
        )
        .body(Body::from(body))
        .map_err(|e| Failure::Other(format!("building the request: {e}")))?;
    if https {
        let tls = ctx
            .tls
            .clone()
            .ok_or_else(|| Failure::Other("this server has no TLS roots".into()))?;
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| Failure::Other("the host is not a TLS server name".into()))?;
        let conn = tokio::time::timeout(
            TLS_TIMEOUT,
            tokio_rustls::TlsConnector::from(tls).connect(name, stream),
        )
        .await
        .map_err(|_| Failure::Other("the TLS handshake timed out".into()))?
        .map_err(|e| Failure::Other(format!("TLS: {e}")))?;
        exchange(conn, req).await
    } else {
        exchange(stream, req).await
    }
}

/// One HTTP/1.1 request on `io`; the answer's status and the start of its body.
async fn exchange<S>(io: S, req: Request<Body>) -> Result<(u16, String), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| Failure::Other(format!("HTTP: {e}")))?;
    let conn = tokio::spawn(conn);
    let answer = async {
        let resp = tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(req))
            .await
            .map_err(|_| {
                Failure::Other(format!("no answer within {}s", RESPONSE_TIMEOUT.as_secs()))
            })?
            .map_err(|e| Failure::Other(format!("HTTP: {e}")))?;
        let status = resp.status().as_u16();
        let mut kept = Vec::new();
        let mut body = Body::new(resp.into_body()).into_data_stream();
        // Read until KEPT_RESPONSE bytes are in, the body ends or it stalls; never more.
        let read = tokio::time::timeout(RESPONSE_TIMEOUT, async {
            while kept.len() < KEPT_RESPONSE {
                match body.next().await {
                    Some(Ok(chunk)) => {
                        let room = KEPT_RESPONSE - kept.len();
                        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                    _ => break,
                }
            }
        });
        let _ = read.await;
        Ok((status, kept_text(&kept)))
    }
    .await;
    // The connection is not reused: whatever is left of the answer is not read.
    conn.abort();
    answer
}

/// The kept start of a body as text (lossy UTF-8; NUL, which PostgreSQL text refuses,
/// replaced).
fn kept_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\0', "\u{fffd}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(url: &str) -> CreateWebhookRequest {
        CreateWebhookRequest {
            url: url.into(),
            ..Default::default()
        }
    }

    #[test]
    fn signatures_are_hmac_sha256_of_time_dot_body() {
        // The HMAC itself is checked against RFC 4231 in `util`.
        // `signature` signs exactly the time, a dot, then the body.
        let s = signature("Jefe", 1_700_000_000, br#"{"seq":1}"#);
        let (t, v1) = s.split_once(',').unwrap();
        assert_eq!(t, "t=1700000000");
        assert_eq!(
            v1,
            format!(
                "v1={}",
                hex::encode(crate::util::hmac_sha256(
                    b"Jefe",
                    br#"1700000000.{"seq":1}"#
                ))
            )
        );
        // The same answer as Python's `hmac` (docs/webhooks.md's verification).
        assert_eq!(
            v1,
            "v1=82196225751a11cfcdf0e3d38986295effcbdc9696777255df8e56582a4b12ad"
        );
        // Any change to the secret, time or body changes it.
        assert_ne!(s, signature("Jefe2", 1_700_000_000, br#"{"seq":1}"#));
        assert_ne!(s, signature("Jefe", 1_700_000_001, br#"{"seq":1}"#));
        assert_ne!(s, signature("Jefe", 1_700_000_000, br#"{"seq":2}"#));
    }

    #[test]
    fn retries_double_from_the_base_up_to_an_hour() {
        let base = Duration::from_secs(10);
        let delays: Vec<u64> = (1..=11).map(|n| retry_delay(base, n).as_secs()).collect();
        assert_eq!(
            delays,
            [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]
        );
        assert_eq!(retry_delay(base, u32::MAX), MAX_RETRY_DELAY);
        assert_eq!(retry_delay(Duration::from_millis(200), 1).as_millis(), 200);
    }

    #[test]
    fn attempts_stop_a_day_after_the_event() {
        let base = Duration::from_secs(10);
        let day = ms(GIVE_UP_AFTER);
        assert_eq!(next_attempt(base, 1, 0, 0), Some(10_000));
        assert_eq!(next_attempt(base, 3, 0, 5_000), Some(45_000));
        // An hour apart at most, and never past the day.
        assert_eq!(next_attempt(base, 20, 0, day - 3_600_000), Some(day));
        assert_eq!(next_attempt(base, 20, 0, day - 3_599_999), None);
        // The whole schedule of an endpoint that never answers: ends within the day, about
        // 30 attempts (9 doublings to the cap, then hourly).
        let (mut now, mut n) = (0i64, 0u32);
        while let Some(at) = next_attempt(base, n + 1, 0, now) {
            assert!(at > now && at <= day);
            now = at;
            n += 1;
        }
        assert!((28..=32).contains(&n), "{n} retries");
    }

    #[test]
    fn urls_are_checked() {
        let ok = validate(&req("https://hooks.example.com/a?b=c")).unwrap();
        assert_eq!(ok.url, "https://hooks.example.com/a?b=c");
        assert_eq!(ok.events, None);
        assert_eq!(
            validate(&req("http://10.216.3.2:8080")).unwrap().url,
            "http://10.216.3.2:8080/"
        );
        for bad in [
            "ftp://example.com/",
            "file:///etc/passwd",
            "https://user:pw@example.com/",
            "https://user@example.com/",
            "http://",
            "https://:443/",
            "not a url",
            "",
            "https://example.com/#frag",
            "javascript:alert(1)",
            "unix:/var/run/docker.sock",
        ] {
            assert_eq!(
                validate(&req(bad)).unwrap_err().code,
                "invalid_webhook_url",
                "{bad:?}"
            );
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_WEBHOOK_URL));
        assert_eq!(
            validate(&req(&long)).unwrap_err().code,
            "invalid_webhook_url"
        );
    }

    #[test]
    fn event_filters_and_descriptions_are_checked() {
        let with = |events: Option<Vec<&str>>, description: Option<&str>| CreateWebhookRequest {
            url: "https://example.com/".into(),
            events: events.map(|e| e.into_iter().map(String::from).collect()),
            description: description.map(String::from),
        };
        let v = validate(&with(Some(vec!["destroyed", "created", "created"]), None)).unwrap();
        assert_eq!(v.events.as_deref(), Some(",created,destroyed,"));
        for bad in [vec![], vec!["nope"], vec!["created", "%"], vec!["Created"]] {
            assert_eq!(
                validate(&with(Some(bad.clone()), None)).unwrap_err().code,
                "invalid_webhook_events",
                "{bad:?}"
            );
        }
        let many = vec!["created"; EVENT_KINDS.len() + 1];
        assert_eq!(
            validate(&with(Some(many), None)).unwrap_err().code,
            "invalid_webhook_events"
        );
        assert!(validate(&with(None, Some("ci hooks"))).is_ok());
        for bad in ["a\nb".to_string(), "x".repeat(MAX_WEBHOOK_DESCRIPTION + 1)] {
            assert_eq!(
                validate(&with(None, Some(&bad))).unwrap_err().code,
                "invalid_webhook_description"
            );
        }
    }

    #[test]
    fn kept_text_is_lossy_and_nul_free() {
        assert_eq!(kept_text(b"ok"), "ok");
        assert_eq!(kept_text(b"a\0b\xff"), "a\u{fffd}b\u{fffd}");
    }
}
