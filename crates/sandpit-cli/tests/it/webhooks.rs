//! Webhooks end to end: a real server POSTs a workspace's lifecycle events, signed, to a
//! receiver in a network namespace this test creates; failed answers are retried (across a
//! restart); deleted webhooks stop; loopback, the metadata address and the sandbox pool are
//! never connected to, even when an operator lists them; hostile API input gets 4xx.
//!
//! The receiver's namespace is `twh<index>`, linked to the root namespace by the veth
//! `twh<index>h`/`twh<index>t`, addresses `10.216.<index>.0/29` (the index of the test
//! server's pool reservation, so parallel tests never collide): the host side is `.1`, the
//! receiver `.2`, port 8080. It is a private address, so the server reaches it only because
//! `--webhook-allow-hosts` names it. Everything is removed by [`Receiver`]'s drop.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use sandpit_test_support::{TestServer, wait_until};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::egress::{in_netns, run, run_quiet};
use crate::{base, bin, create};

const PORT: u16 = 8080;
const TLS_PORT: u16 = 8443;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    event_id: String,
    webhook_id: String,
    signature: String,
    body: Vec<u8>,
}

#[derive(Default)]
struct ReceiverState {
    got: Mutex<Vec<Received>>,
    /// `/flaky` answers 500 while this is set, 204 after.
    flaky_fails: AtomicBool,
    flaky_answers: AtomicUsize,
}

/// The receiver's namespace and its HTTP server.
struct Receiver {
    ns: String,
    host_if: String,
    addr: Ipv4Addr,
    state: Arc<ReceiverState>,
    task: Option<tokio::task::JoinHandle<()>>,
    tls_task: Option<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    fn addr_of(index: u32) -> Ipv4Addr {
        Ipv4Addr::new(10, 216, index as u8, 2)
    }

    async fn new(index: u32) -> Receiver {
        let gw = Ipv4Addr::new(10, 216, index as u8, 1);
        let mut r = Receiver {
            ns: format!("twh{index}"),
            host_if: format!("twh{index}h"),
            addr: Self::addr_of(index),
            state: Arc::default(),
            task: None,
            tls_task: None,
        };
        r.remove();
        let prefix = format!("10.216.{index}.");
        let routes = run(&["ip", "-4", "route", "show", "table", "all"]);
        let addrs = run(&["ip", "-4", "-o", "addr"]);
        assert!(
            !routes.contains(&prefix) && !addrs.contains(&prefix),
            "10.216.{index}.0/29 is in use on this host"
        );
        let peer = format!("twh{index}t");
        run(&["ip", "netns", "add", &r.ns]);
        run(&[
            "ip", "link", "add", &r.host_if, "type", "veth", "peer", "name", &peer, "netns", &r.ns,
        ]);
        run(&["ip", "addr", "add", &format!("{gw}/29"), "dev", &r.host_if]);
        run(&["ip", "link", "set", &r.host_if, "up"]);
        run(&["ip", "-n", &r.ns, "link", "set", "lo", "up"]);
        run(&[
            "ip",
            "-n",
            &r.ns,
            "addr",
            "add",
            &format!("{}/29", r.addr),
            "dev",
            &peer,
        ]);
        run(&["ip", "-n", &r.ns, "link", "set", &peer, "up"]);
        let addr = r.addr;
        let listener = in_netns(&r.ns, move || {
            let l = std::net::TcpListener::bind((addr, PORT)).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        });
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(r.state.clone());
        r.task = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
        r
    }

    /// Serve HTTPS on port [`TLS_PORT`] with `cert`/`key`, on the receiver's address and on
    /// a second one ([`Receiver::other_addr`]) the certificate does not name. A minimal
    /// HTTP/1.1 reader: records the request like [`receive`] and answers 204.
    fn serve_tls(&mut self, index: u32, cert: &std::path::Path, key: &std::path::Path) -> Ipv4Addr {
        use rustls::pki_types::pem::PemObject;
        let other = Ipv4Addr::new(10, 216, index as u8, 3);
        run(&[
            "ip",
            "-n",
            &self.ns,
            "addr",
            "add",
            &format!("{other}/29"),
            "dev",
            &format!("twh{index}t"),
        ]);
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = in_netns(&self.ns, || {
            let l = std::net::TcpListener::bind(("0.0.0.0", TLS_PORT)).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        });
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let state = self.state.clone();
        self.tls_task = Some(tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, state) = (acceptor.clone(), state.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = serve_one(tls, &state).await;
                    }
                });
            }
        }));
        other
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}:{PORT}{path}", self.addr)
    }

    fn got(&self) -> Vec<Received> {
        self.state.got.lock().unwrap().clone()
    }

    fn remove(&self) {
        run_quiet(&["ip", "link", "del", &self.host_if]);
        run_quiet(&["ip", "netns", "del", &self.ns]);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        for t in [&self.task, &self.tls_task].into_iter().flatten() {
            t.abort();
        }
        self.remove();
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    state.got.lock().unwrap().push(Received {
        path: uri.path().to_string(),
        event_id: h("sandpit-event-id"),
        webhook_id: h("sandpit-webhook-id"),
        signature: h("sandpit-signature"),
        body: body.to_vec(),
    });
    if uri.path() == "/flaky" {
        state.flaky_answers.fetch_add(1, Ordering::SeqCst);
        if state.flaky_fails.load(Ordering::SeqCst) {
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
    }
    StatusCode::NO_CONTENT
}

/// Read one HTTP/1.1 request (head, then `Content-Length` bytes), record it, answer 204.
async fn serve_one<S>(mut io: S, state: &ReceiverState) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 || buf.len() > 65536 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_default()
        .to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let h = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let len: usize = h("content-length").parse().unwrap_or(0);
    while buf.len() < head_end + len {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    state.got.lock().unwrap().push(Received {
        path,
        event_id: h("sandpit-event-id"),
        webhook_id: h("sandpit-webhook-id"),
        signature: h("sandpit-signature"),
        body: buf[head_end..head_end + len].to_vec(),
    });
    io.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        .await?;
    io.shutdown().await
}

/// HMAC-SHA256, written out here (RFC 2104) so the test does not trust the server's code.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Whether `Sandpit-Signature` verifies, checked the way docs/webhooks.md tells receivers
/// to: `t` recent, `v1` the HMAC of `<t>.<body>`.
fn signature_ok(secret: &str, r: &Received) -> bool {
    let Some((t, v1)) = r.signature.split_once(',') else {
        return false;
    };
    let (Some(t), Some(v1)) = (t.strip_prefix("t="), v1.strip_prefix("v1=")) else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let Ok(t_secs) = t.parse::<i64>() else {
        return false;
    };
    let mut msg = format!("{t}.").into_bytes();
    msg.extend_from_slice(&r.body);
    (now - t_secs).abs() < 300 && v1 == hex::encode(hmac_sha256(secret.as_bytes(), &msg))
}

#[track_caller]
fn verify(secret: &str, r: &Received) {
    assert!(signature_ok(secret, r), "bad signature on {r:?}");
}

struct Api {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Api {
    fn new(srv: &TestServer) -> Api {
        Api {
            http: reqwest::Client::new(),
            url: srv.url.clone(),
            token: srv.token.clone(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("sent");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn create(&self, body: Value) -> Value {
        let (status, v) = self
            .call(reqwest::Method::POST, "/v1/webhooks", Some(body))
            .await;
        assert_eq!(status, 201, "{v}");
        v
    }

    async fn deliveries(&self, id: &str) -> Vec<Value> {
        let (status, v) = self
            .call(
                reqwest::Method::GET,
                &format!("/v1/webhooks/{id}/deliveries"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{v}");
        v["deliveries"].as_array().unwrap().clone()
    }
}

async fn start(index_hosts: impl Fn(u32) -> String + Send + 'static) -> TestServer {
    TestServer::start_with_index_env(bin(), move |i| {
        vec![
            ("SANDPIT_WEBHOOK_ALLOW_HOSTS".into(), index_hosts(i)),
            ("SANDPIT_WEBHOOK_RETRY_BASE".into(), "1s".into()),
        ]
    })
    .await
    .expect("server starts")
}

#[tokio::test]
async fn webhooks_deliver_signed_events_retry_and_never_reach_denied_addresses() {
    // The receiver is listed, and so are the pool's host address and the metadata address:
    // a listing never opens those.
    let mut srv = start(|i| {
        format!(
            "{}:{PORT},10.213.{i}.1:49983,169.254.169.254",
            Receiver::addr_of(i)
        )
    })
    .await;
    let rx = Receiver::new(srv.index).await;
    let api = Api::new(&srv);

    // A listener on loopback that no delivery may reach.
    let local = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local_port = local.local_addr().unwrap().port();
    let local_accepts = Arc::new(AtomicUsize::new(0));
    let accepts = local_accepts.clone();
    let local_task = tokio::spawn(async move {
        while local.accept().await.is_ok() {
            accepts.fetch_add(1, Ordering::SeqCst);
        }
    });

    let all = api
        .create(json!({"url": rx.url("/all"), "description": "every event"}))
        .await;
    let all_id = all["id"].as_str().unwrap().to_string();
    let all_secret = all["secret"].as_str().unwrap().to_string();
    assert!(all_secret.starts_with("whsec_"), "{all}");
    assert_eq!(all["url"], rx.url("/all"));
    rx.state.flaky_fails.store(true, Ordering::SeqCst);
    let flaky = api
        .create(json!({"url": rx.url("/flaky"), "events": ["destroyed"]}))
        .await;
    let flaky_id = flaky["id"].as_str().unwrap().to_string();
    let flaky_secret = flaky["secret"].as_str().unwrap().to_string();
    assert_ne!(flaky_secret, all_secret);
    let doomed = api.create(json!({"url": rx.url("/deleted")})).await;
    let doomed_id = doomed["id"].as_str().unwrap().to_string();
    let denied: Vec<(String, &str)> = vec![
        (format!("http://127.0.0.1:{local_port}/"), "loopback"),
        (format!("http://localhost:{local_port}/"), "loopback"),
        (
            "http://169.254.169.254/latest/meta-data".into(),
            "link-local",
        ),
        (
            format!("http://10.213.{}.1:49983/", srv.index),
            "the sandbox pool",
        ),
    ];
    let mut denied_ids = Vec::new();
    for (url, _) in &denied {
        let w = api.create(json!({"url": url, "events": ["created"]})).await;
        denied_ids.push(w["id"].as_str().unwrap().to_string());
    }

    // Listing and reading never show a secret.
    let (status, list) = api.call(reqwest::Method::GET, "/v1/webhooks", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 3 + denied.len());
    assert!(!list.to_string().contains("whsec_"), "{list}");
    let (status, one) = api
        .call(
            reqwest::Method::GET,
            &format!("/v1/webhooks/{flaky_id}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(one["events"], json!(["destroyed"]));
    assert!(one.get("secret").is_none(), "{one}");

    let client = srv.client();
    let sb = create(&client, base()).await;
    // Deleted before the sandbox goes: its `destroyed` event is never sent to it.
    let (status, _) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/webhooks/{doomed_id}"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    client.destroy_sandbox(&sb.id).await.expect("destroyed");

    // Every event of the workspace reaches `/all`, signed, as the event stream's JSON. Each
    // delivery is an attempt of its own, so they may arrive in any order: wait for all three.
    let events = wait_until(
        Duration::from_secs(60),
        "created, started, destroyed on /all",
        || {
            let got = rx.got();
            async move {
                let kinds: Vec<(String, Value)> = got
                    .iter()
                    .filter(|r| r.path == "/all")
                    .map(|r| {
                        let v: Value = serde_json::from_slice(&r.body).expect("JSON body");
                        (v["type"].as_str().unwrap_or_default().to_string(), v)
                    })
                    .collect();
                ["created", "started", "destroyed"]
                    .iter()
                    .all(|want| kinds.iter().any(|(k, _)| k == want))
                    .then_some(kinds)
            }
        },
    )
    .await
    .unwrap();
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    for k in ["created", "started", "destroyed"] {
        assert!(kinds.contains(&k), "{kinds:?}");
    }
    for r in rx.got().iter().filter(|r| r.path == "/all") {
        verify(&all_secret, r);
        assert_eq!(r.webhook_id, all_id);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["seq"].to_string(), r.event_id, "{v}");
        assert_eq!(v["sandbox_id"], json!(sb.id));
        assert!(v["at"].is_string() && v["detail"].is_object(), "{v}");
    }
    // A signature made with another secret does not verify.
    let mut forged = rx.got().into_iter().find(|r| r.path == "/all").unwrap();
    assert!(
        !signature_ok(&flaky_secret, &forged),
        "a wrong secret verified"
    );
    forged.body.push(b' ');
    assert!(
        !signature_ok(&all_secret, &forged),
        "a changed body verified"
    );

    // `/flaky` answers 500: retried (the base delay is 1 s, doubling) and recorded.
    let failing = wait_until(Duration::from_secs(30), "two failed attempts", || {
        let api = &api;
        let id = flaky_id.clone();
        async move {
            let d = api.deliveries(&id).await;
            (d.len() == 1 && d[0]["attempts"].as_u64() >= Some(2)).then(|| d[0].clone())
        }
    })
    .await
    .unwrap();
    assert_eq!(failing["status"], "pending", "{failing}");
    assert_eq!(failing["status_code"], 500, "{failing}");
    assert_eq!(failing["event_type"], "destroyed", "{failing}");
    assert!(failing["next_attempt_at"].is_string(), "{failing}");

    // Deliveries survive a restart: killed while retrying, the new process carries on, and
    // the receiver's first 2xx ends it.
    srv.kill9();
    rx.state.flaky_fails.store(false, Ordering::SeqCst);
    srv.restart().await.expect("restarts");
    let api = Api::new(&srv);
    let done = wait_until(Duration::from_secs(60), "the flaky delivery", || {
        let api = &api;
        let id = flaky_id.clone();
        async move {
            let d = api.deliveries(&id).await;
            (d.len() == 1 && d[0]["status"] == "delivered").then(|| d[0].clone())
        }
    })
    .await
    .unwrap();
    assert_eq!(done["status_code"], 204, "{done}");
    assert!(done.get("next_attempt_at").is_none(), "{done}");
    let flaky_got: Vec<Received> = rx
        .got()
        .into_iter()
        .filter(|r| r.path == "/flaky")
        .collect();
    // One request per recorded attempt (one more if the kill fell between a request and
    // its record: that attempt is made again).
    let attempts = done["attempts"].as_u64().unwrap();
    assert!(
        (attempts..=attempts + 1).contains(&(flaky_got.len() as u64)),
        "{attempts} attempts, {} requests",
        flaky_got.len()
    );
    assert!(flaky_got.len() >= 3, "{flaky_got:?}");
    for r in &flaky_got {
        verify(&flaky_secret, r);
        assert_eq!(
            r.event_id, flaky_got[0].event_id,
            "the same event each time"
        );
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["type"], "destroyed");
    }

    // The deleted webhook got nothing after its deletion: never the `destroyed` event.
    for r in rx.got().iter().filter(|r| r.path == "/deleted") {
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_ne!(v["type"], "destroyed", "a deleted webhook was sent {v}");
    }
    let (status, v) = api
        .call(
            reqwest::Method::GET,
            &format!("/v1/webhooks/{doomed_id}/deliveries"),
            None,
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("webhook_not_found"))
    );

    // Denied addresses: each delivery records the refusal and nothing was connected to.
    for ((url, range), id) in denied.iter().zip(&denied_ids) {
        let d = wait_until(Duration::from_secs(30), "a refused attempt", || {
            let api = &api;
            let id = id.clone();
            async move {
                let d = api.deliveries(&id).await;
                (d.len() == 1 && d[0]["attempts"].as_u64() >= Some(1)).then(|| d[0].clone())
            }
        })
        .await
        .unwrap();
        let error = d["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("refused") && error.contains(range),
            "{url}: {d}"
        );
        assert!(d.get("status_code").is_none(), "{url}: {d}");
        assert_eq!(d["status"], "pending", "{url}: retried later: {d}");
    }
    assert_eq!(
        local_accepts.load(Ordering::SeqCst),
        0,
        "loopback was reached"
    );
    assert!(
        rx.got()
            .iter()
            .all(|r| ["/all", "/flaky", "/deleted"].contains(&r.path.as_str())),
        "{:?}",
        rx.got()
    );
    let metrics = reqwest::get(format!("{}/metrics", srv.metrics_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("sandpit_webhook_deliveries_total{result=\"delivered\"}"),
        "{metrics}"
    );
    local_task.abort();
}

#[tokio::test]
async fn webhook_api_refuses_hostile_input_and_changes_nothing() {
    let srv = start(|_| String::new()).await;
    let api = Api::new(&srv);
    let long = format!("https://example.com/{}", "a".repeat(2100));
    let bad: Vec<(Value, &str)> = vec![
        (json!({"url": "ftp://example.com/"}), "invalid_webhook_url"),
        (json!({"url": "file:///etc/passwd"}), "invalid_webhook_url"),
        (json!({"url": "javascript:alert(1)"}), "invalid_webhook_url"),
        (
            json!({"url": "https://user:pw@example.com/"}),
            "invalid_webhook_url",
        ),
        (
            json!({"url": "https://example.com/#x"}),
            "invalid_webhook_url",
        ),
        (json!({"url": "http://"}), "invalid_webhook_url"),
        (json!({"url": "not a url"}), "invalid_webhook_url"),
        (json!({"url": long}), "invalid_webhook_url"),
        (
            json!({"url": "https://example.com/", "events": []}),
            "invalid_webhook_events",
        ),
        (
            json!({"url": "https://example.com/", "events": ["created", "rm -rf"]}),
            "invalid_webhook_events",
        ),
        (
            json!({"url": "https://example.com/", "description": "x\u{0}y"}),
            "invalid_webhook_description",
        ),
        (
            json!({"url": "https://example.com/", "description": "d".repeat(300)}),
            "invalid_webhook_description",
        ),
        (
            json!({"url": "https://example.com/", "secret": "mine"}),
            "invalid_json",
        ),
        (json!({"url": 5}), "invalid_json"),
        (json!(["https://example.com/"]), "invalid_json"),
    ];
    for (body, code) in &bad {
        let (status, v) = api
            .call(reqwest::Method::POST, "/v1/webhooks", Some(body.clone()))
            .await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some(*code)),
            "{body}: {v}"
        );
    }
    let (_, list) = api.call(reqwest::Method::GET, "/v1/webhooks", None).await;
    assert_eq!(list["webhooks"], json!([]), "nothing was made");

    // At most 20 per workspace.
    for i in 0..20 {
        api.create(json!({"url": format!("https://example.com/{i}")}))
            .await;
    }
    let (status, v) = api
        .call(
            reqwest::Method::POST,
            "/v1/webhooks",
            Some(json!({"url": "https://example.com/21"})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("too_many_webhooks"))
    );
    let (_, list) = api.call(reqwest::Method::GET, "/v1/webhooks", None).await;
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 20);

    // Unknown or malformed ids are not found, for every route.
    for id in ["wh_0000000000000000", "nope", "wh_%2e%2e", "..%2f"] {
        for (method, path) in [
            (reqwest::Method::GET, format!("/v1/webhooks/{id}")),
            (reqwest::Method::DELETE, format!("/v1/webhooks/{id}")),
            (
                reqwest::Method::GET,
                format!("/v1/webhooks/{id}/deliveries"),
            ),
        ] {
            let (status, v) = api.call(method.clone(), &path, None).await;
            assert_eq!(status, 404, "{method} {path}: {v}");
        }
    }
    // Without a token: 401; nothing is listed.
    let resp = reqwest::get(format!("{}/v1/webhooks", srv.url))
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

/// Two nodes on one database both run a deliverer: each event reaches the receiver once
/// (every delivery is claimed by one of them), whichever node made it.
#[tokio::test]
async fn two_nodes_on_one_database_deliver_each_event_once() {
    let env = |i: u32, rx: u32| {
        vec![
            ("SANDPIT_NODE_NAME".to_string(), format!("node-{i}")),
            (
                "SANDPIT_WEBHOOK_ALLOW_HOSTS".to_string(),
                format!("{}:{PORT}", Receiver::addr_of(rx)),
            ),
            ("SANDPIT_WEBHOOK_RETRY_BASE".to_string(), "1s".to_string()),
        ]
    };
    let a = TestServer::start_with_index_env(bin(), |i| env(i, i))
        .await
        .unwrap();
    let shared = match &a.database {
        Some(db) => db.url.clone(),
        None => format!("sqlite://{}", a.data_dir.join("sandpit.db").display()),
    };
    let rx_index = a.index;
    let b = TestServer::start_with_index_env(bin(), move |i| {
        let mut env = env(i, rx_index);
        env.push(("SANDPIT_DATABASE".into(), shared));
        env
    })
    .await
    .unwrap();
    let rx = Receiver::new(a.index).await;
    let hook = Api::new(&a).create(json!({"url": rx.url("/all")})).await;
    let secret = hook["secret"].as_str().unwrap().to_string();

    let (ca, cb) = (a.client(), b.client_with(&a.token));
    let on_a = create(&ca, base()).await;
    let on_b = create(&cb, base()).await;
    ca.destroy_sandbox(&on_a.id).await.unwrap();
    cb.destroy_sandbox(&on_b.id).await.unwrap();

    let destroyed = |got: &[Received]| {
        got.iter()
            .filter(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["type"] == "destroyed")
            .count()
    };
    wait_until(Duration::from_secs(60), "both destroyed events", || {
        let got = rx.got();
        async move { (destroyed(&got) >= 2).then_some(()) }
    })
    .await
    .unwrap();
    // Both deliverers poll every second: give a second copy time to show up if one would.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = rx.got();
    let mut ids: Vec<&str> = got.iter().map(|r| r.event_id.as_str()).collect();
    ids.sort();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "an event was delivered twice: {got:?}");
    assert_eq!(n, 6, "created, started, destroyed of each sandbox: {got:?}");
    for r in &got {
        verify(&secret, r);
    }
    let sandboxes: Vec<Value> = got
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["sandbox_id"].clone())
        .collect();
    for id in [&on_a.id, &on_b.id] {
        assert_eq!(sandboxes.iter().filter(|s| *s == id).count(), 3, "{got:?}");
    }
}

/// https endpoints: the certificate is checked against the roots the server trusts (here
/// only the test CA, through `SSL_CERT_FILE`) and the URL's host; a mismatch is recorded as
/// a TLS error and nothing is sent.
#[tokio::test]
async fn https_deliveries_check_the_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().to_path_buf();
    // The certificate names this reservation's receiver address, known once the server
    // holds its index.
    let srv = TestServer::start_with_index_env(bin(), move |i| {
        let (ca, _, _) =
            crate::tls::test_certificates_for(&ca_dir, &format!("IP:{}", Receiver::addr_of(i)));
        let rx = Receiver::addr_of(i);
        vec![
            (
                "SANDPIT_WEBHOOK_ALLOW_HOSTS".into(),
                format!("{rx}:{TLS_PORT},10.216.{i}.3:{TLS_PORT}"),
            ),
            ("SANDPIT_WEBHOOK_RETRY_BASE".into(), "1s".into()),
            ("SSL_CERT_FILE".into(), ca.display().to_string()),
        ]
    })
    .await
    .unwrap();
    let mut rx = Receiver::new(srv.index).await;
    let other = rx.serve_tls(
        srv.index,
        &tmp.path().join("server.pem"),
        &tmp.path().join("server.key"),
    );
    let api = Api::new(&srv);
    let good = api
        .create(
            json!({"url": format!("https://{}:{TLS_PORT}/tls", rx.addr), "events": ["created"]}),
        )
        .await;
    let wrong_name = api
        .create(json!({"url": format!("https://{other}:{TLS_PORT}/wrong"), "events": ["created"]}))
        .await;
    let secret = good["secret"].as_str().unwrap().to_string();
    let client = srv.client();
    let sb = create(&client, base()).await;

    let r = wait_until(
        Duration::from_secs(60),
        "the created event over https",
        || {
            let got = rx.got();
            async move { got.into_iter().find(|r| r.path == "/tls") }
        },
    )
    .await
    .unwrap();
    verify(&secret, &r);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["sandbox_id"].as_str()),
        (Some("created"), Some(sb.id.as_str()))
    );
    let done = wait_until(
        Duration::from_secs(30),
        "the https delivery recorded",
        || {
            let api = &api;
            let id = good["id"].as_str().unwrap().to_string();
            async move {
                let d = api.deliveries(&id).await;
                (d.len() == 1 && d[0]["status"] == "delivered").then(|| d[0].clone())
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(done["status_code"], 204, "{done}");

    let refused = wait_until(Duration::from_secs(30), "a failed TLS attempt", || {
        let api = &api;
        let id = wrong_name["id"].as_str().unwrap().to_string();
        async move {
            let d = api.deliveries(&id).await;
            (d.len() == 1 && d[0]["attempts"].as_u64() >= Some(1)).then(|| d[0].clone())
        }
    })
    .await
    .unwrap();
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("TLS"),
        "{refused}"
    );
    assert!(
        rx.got().iter().all(|r| r.path != "/wrong"),
        "sent over an unverified connection"
    );
    client.destroy_sandbox(&sb.id).await.unwrap();
}
