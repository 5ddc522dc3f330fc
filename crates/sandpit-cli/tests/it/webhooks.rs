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
        if let Some(t) = &self.task {
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

    // Every event of the workspace reaches `/all`, signed, as the event stream's JSON.
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
                kinds.iter().any(|(k, _)| k == "destroyed").then_some(kinds)
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
