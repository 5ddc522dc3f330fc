//! CodeSandbox compatibility end to end: the unmodified `@codesandbox/sdk` (npm, installed by
//! `scripts/install-deps` into `tests/csb/node_modules`) drives a live server through
//! `tests/csb/sdk-e2e.mjs`; and the seed-000 REST routes answer with their envelope and
//! status codes.
//!
//! Traffic stays on loopback (the server) and the test's own sandboxes.

use std::path::PathBuf;

use reqwest::StatusCode;
use sandpit_sdk::types::SandboxStatus;
use sandpit_test_support::TestServer;
use serde_json::{Value, json};

use crate::bin;

fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/csb")
}

/// The SDK builds preview URLs as `<id>-<port>.csb.app`; this server serves previews there.
async fn csb_server() -> TestServer {
    TestServer::start_with(bin(), &[("SANDPIT_PREVIEW_DOMAIN", "csb.app")])
        .await
        .expect("server starts")
}

#[tokio::test]
async fn the_codesandbox_sdk_works_unmodified() {
    let dir = sdk_dir();
    assert!(
        dir.join("node_modules/@codesandbox/sdk/package.json")
            .exists(),
        "@codesandbox/sdk is not installed in {}: run scripts/install-deps",
        dir.display()
    );
    let srv = csb_server().await;
    let addr = srv
        .url
        .strip_prefix("http://")
        .expect("http url")
        .to_string();
    let http = reqwest::Client::new();
    let read_only = token_with(&http, &srv, &["sandbox_read", "vm_manage"]).await;
    // The script's output goes to files, so a hang still shows how far it got (nextest
    // ends the test at 300 s; the script gets 240).
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("sdk-e2e.mjs")
        .current_dir(&dir)
        .env("CSB_BASE_URL", &srv.url)
        .env("CSB_API_KEY", &srv.token)
        .env("SANDPIT_ADDR", &addr)
        .env("CSB_READONLY_KEY", &read_only);
    let seen = crate::scripts::run_json(cmd, "sdk-e2e.mjs", 240, &srv).await;
    assert_eq!(seen["run"], "hello-42");
    assert_eq!(seen["failedExit"], 3);
    assert_eq!(seen["ticks"], 3);
    assert_eq!(seen["preview"], 200);
    assert_eq!(seen["readOnly"], true);
    assert_eq!(seen["trustedHost"], 200);
    assert_eq!(seen["sessions"], "csb-alice");
    assert!(seen["download"].as_u64().unwrap_or(0) > 40, "{seen}");
    assert_eq!(seen["setup"], json!(["SUCCEEDED", "FAILED"]));
    assert_eq!(seen["resumed"]["bootupType"], "RESUME");
    // What the SDK did is what the native API sees: both sandboxes are gone.
    let client = srv.client();
    for id in [&seen["id"], &seen["fork"]] {
        let id = id.as_str().expect("sandbox id");
        let s = client.get_sandbox(id).await.expect("sandbox row kept");
        assert_eq!(s.status, SandboxStatus::Destroyed, "{id}");
    }
}

/// `(status, body)` of a seed-000 call.
async fn call(
    http: &reqwest::Client,
    srv: &TestServer,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = http
        .request(method, format!("{}{path}", srv.url))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request is sent");
    let status = resp.status();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

/// A token of the bootstrap workspace with the given scopes.
async fn token_with(http: &reqwest::Client, srv: &TestServer, scopes: &[&str]) -> String {
    let (_, meta) = call(
        http,
        srv,
        &srv.token,
        reqwest::Method::GET,
        "/meta/info",
        None,
    )
    .await;
    let team = meta["auth"]["team"].as_str().expect("team id").to_string();
    let (status, body) = call(
        http,
        srv,
        &srv.token,
        reqwest::Method::POST,
        &format!("/org/workspace/{team}/tokens"),
        Some(json!({"scopes": scopes})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["data"]["token"].as_str().expect("token").to_string()
}

#[tokio::test]
async fn seed_000_rest_surface() {
    use reqwest::Method as M;
    let srv = csb_server().await;
    let http = reqwest::Client::new();
    let t = srv.token.clone();

    // Meta: scopes and team of the caller; 401 without a token.
    let (s, meta) = call(&http, &srv, &t, M::GET, "/meta/info", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        meta["auth"]["scopes"]
            .as_array()
            .unwrap()
            .contains(&json!("vm_manage"))
    );
    // The server's limits (defaults: 200 running at once, hourly allowances).
    let limits = &meta["rate_limits"];
    assert_eq!(limits["concurrent_vms"]["limit"], 200, "{meta}");
    assert!(
        limits["requests_hourly"]["limit"].as_u64().unwrap() > 0,
        "{meta}"
    );
    assert!(
        limits["requests_hourly"]["remaining"].as_u64().unwrap()
            < limits["requests_hourly"]["limit"].as_u64().unwrap(),
        "this call was counted: {meta}"
    );
    let (s, _) = call(&http, &srv, "nope", M::GET, "/meta/info", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Create with files, tags, title; bad input is 400 and creates nothing.
    let (s, bad) = call(
        &http,
        &srv,
        &t,
        M::POST,
        "/sandbox",
        Some(json!({"files": {}, "tags": (0..11).map(|i| format!("t{i}")).collect::<Vec<_>>()})),
    )
    .await;
    assert_eq!(
        (s, bad["success"].clone()),
        (StatusCode::BAD_REQUEST, json!(false)),
        "{bad}"
    );
    assert!(bad["errors"][0].as_str().unwrap().contains("tags"));
    let (s, bad) = call(
        &http,
        &srv,
        &t,
        M::POST,
        "/sandbox",
        Some(json!({"files": {}, "privacy": 7})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
    let (s, none) = call(&http, &srv, &t, M::GET, "/sandbox", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(none["data"]["pagination"]["total_records"], 0, "{none}");

    let (s, created) = call(
        &http,
        &srv,
        &t,
        M::POST,
        "/sandbox",
        Some(json!({
            "title": "rest", "tags": ["alpha", "beta"], "privacy": 1,
            "files": {"hello.txt": {"code": "hi there"}, "bin/x": {"is_binary": true, "binary_content": "AAEC"}},
        })),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(created["success"], true);
    let id = created["data"]["id"].as_str().unwrap().to_string();
    // The files are in the workspace directory (checked through the native API).
    let out = crate::sh(
        &srv.client(),
        &id,
        "cat /project/sandbox/hello.txt; od -An -tx1 /project/sandbox/bin/x",
    )
    .await;
    assert!(
        out.stdout.contains("hi there") && out.stdout.contains("00 01 02"),
        "{out:?}"
    );

    // Get and list: tags filter, status filter, pagination bounds.
    let (s, got) = call(&http, &srv, &t, M::GET, &format!("/sandbox/{id}"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (got["data"]["title"].clone(), got["data"]["privacy"].clone()),
        (json!("rest"), json!(1))
    );
    let (_, l) = call(
        &http,
        &srv,
        &t,
        M::GET,
        "/sandbox?tags=alpha&status=running",
        None,
    )
    .await;
    assert_eq!(l["data"]["sandboxes"][0]["id"], json!(id), "{l}");
    let (_, l) = call(&http, &srv, &t, M::GET, "/sandbox?tags=gamma", None).await;
    assert_eq!(l["data"]["sandboxes"], json!([]));
    for q in [
        "page_size=51",
        "page=0",
        "status=stopped",
        "order_by=name",
        "direction=up",
    ] {
        let (s, b) = call(&http, &srv, &t, M::GET, &format!("/sandbox?{q}"), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {b}");
    }
    let (s, _) = call(&http, &srv, &t, M::GET, "/sandbox/sbx_nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Scopes: a read-only token lists but cannot create or manage VMs.
    let reader = token_with(&http, &srv, &["sandbox_read"]).await;
    let (s, _) = call(
        &http,
        &srv,
        &reader,
        M::GET,
        &format!("/sandbox/{id}"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(
        &http,
        &srv,
        &reader,
        M::POST,
        "/sandbox",
        Some(json!({"files": {}})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = call(
        &http,
        &srv,
        &reader,
        M::POST,
        &format!("/vm/{id}/hibernate"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Another workspace sees none of it: 404, not 403, and nothing changes.
    let (_, ws) = call(
        &http,
        &srv,
        &t,
        M::POST,
        "/org/workspace",
        Some(json!({"name": "other"})),
    )
    .await;
    let other_ws = ws["data"]["id"].as_str().expect("workspace id").to_string();
    let (s, tok) = call(
        &http,
        &srv,
        &t,
        M::POST,
        &format!("/org/workspace/{other_ws}/tokens"),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{tok}");
    let other = tok["data"]["token"].as_str().unwrap().to_string();
    for (m, p) in [
        (M::GET, format!("/sandbox/{id}")),
        (M::POST, format!("/vm/{id}/start")),
        (M::POST, format!("/vm/{id}/hibernate")),
        (M::DELETE, format!("/vm/{id}")),
        (M::POST, format!("/sandbox/{id}/fork")),
        (M::GET, format!("/sandbox/{id}/tokens")),
        (M::POST, format!("/vm/{id}/sessions")),
    ] {
        let (s, b) = call(
            &http,
            &srv,
            &other,
            m,
            &p,
            Some(json!({"session_id": "x", "permission": "write"})),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{p}: {b}");
    }
    let (_, l) = call(&http, &srv, &other, M::GET, "/sandbox", None).await;
    assert_eq!(l["data"]["sandboxes"], json!([]), "{l}");
    assert_eq!(
        srv.client().get_sandbox(&id).await.unwrap().status,
        SandboxStatus::Running
    );

    // Start: the VMStartResponse of seed 004; invalid options are 400.
    let (s, start) = call(
        &http,
        &srv,
        &t,
        M::POST,
        &format!("/vm/{id}/start"),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{start}");
    let d = &start["data"];
    assert_eq!(d["bootup_type"], "RUNNING");
    assert!(d["pitcher_url"].as_str().unwrap().starts_with("ws://"));
    assert!(d["pitcher_token"].as_str().unwrap().starts_with("spa_"));
    assert!(d["reconnect_token"].is_string() && d["workspace_path"] == "/project/sandbox");
    for body in [
        json!({"hibernation_timeout_seconds": 0}),
        json!({"tier": "Huge"}),
    ] {
        let (s, _) = call(
            &http,
            &srv,
            &t,
            M::POST,
            &format!("/vm/{id}/start"),
            Some(body),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
    }
    // The agent gateway refuses a wrong token before upgrading.
    let ws_http = d["pitcher_url"]
        .as_str()
        .unwrap()
        .replace("ws://", "http://");
    let r = http
        .get(format!("{ws_http}?token=spa_wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Sessions: validated; the token opens one connection only.
    let (s, _) = call(
        &http,
        &srv,
        &t,
        M::POST,
        &format!("/vm/{id}/sessions"),
        Some(json!({"session_id": "way-too-long-for-a-session", "permission": "write"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = call(
        &http,
        &srv,
        &t,
        M::POST,
        &format!("/vm/{id}/sessions"),
        Some(json!({"session_id": "eve", "permission": "admin"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, sess) = call(
        &http,
        &srv,
        &t,
        M::POST,
        &format!("/vm/{id}/sessions"),
        Some(json!({"session_id": "Eve", "permission": "read"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{sess}");
    assert_eq!(sess["data"]["username"], "csb-eve");
    assert_eq!(
        sess["data"]["user_workspace_path"],
        "/home/csb-eve/workspace"
    );
    let upgrade = |token: String| {
        let url = format!("{ws_http}?token={token}");
        let http = http.clone();
        async move {
            http.get(url)
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let session_token = sess["data"]["pitcher_token"].as_str().unwrap().to_string();
    assert_eq!(
        upgrade(session_token.clone()).await,
        StatusCode::SWITCHING_PROTOCOLS
    );
    assert_eq!(upgrade(session_token).await, StatusCode::UNAUTHORIZED);
    let reusable = d["pitcher_token"].as_str().unwrap().to_string();
    assert_eq!(
        upgrade(reusable.clone()).await,
        StatusCode::SWITCHING_PROTOCOLS
    );
    assert_eq!(upgrade(reusable).await, StatusCode::SWITCHING_PROTOCOLS);

    // A download link that was never handed out.
    let r = http
        .get(format!("{}/csb/download/spd_nope", srv.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // Hibernation timeout and specs.
    let (s, b) = call(
        &http,
        &srv,
        &t,
        M::PUT,
        &format!("/vm/{id}/hibernation_timeout"),
        Some(json!({"hibernation_timeout_seconds": 600})),
    )
    .await;
    assert_eq!(
        (s, b["data"]["hibernation_timeout_seconds"].clone()),
        (StatusCode::OK, json!(600))
    );
    let (s, _) = call(
        &http,
        &srv,
        &t,
        M::PUT,
        &format!("/vm/{id}/hibernation_timeout"),
        Some(json!({"hibernation_timeout_seconds": 86401})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        srv.client()
            .get_sandbox(&id)
            .await
            .unwrap()
            .idle_timeout
            .as_deref(),
        Some("10m")
    );
    let (s, b) = call(
        &http,
        &srv,
        &t,
        M::PUT,
        &format!("/vm/{id}/specs"),
        Some(json!({"tier": "Small"})),
    )
    .await;
    assert_eq!(
        (s, b["data"]["tier"].clone()),
        (StatusCode::OK, json!("Small"))
    );
    // The tier's size applies to the running VM at once (CodeSandbox's Small is medium).
    assert_eq!(srv.client().get_sandbox(&id).await.unwrap().size, "medium");
    let (s, _) = call(
        &http,
        &srv,
        &t,
        M::PUT,
        &format!("/vm/{id}/specs"),
        Some(json!({"tier": "Giant"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Running VMs, clusters, tags and aliases.
    let (s, r) = call(&http, &srv, &t, M::GET, "/vm/running", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["data"]["concurrent_vm_count"], 1, "{r}");
    assert!(r["data"]["concurrent_vm_limit"].as_u64().unwrap() >= 1);
    let (s, c) = call(&http, &srv, &t, M::GET, "/vm/clusters", None).await;
    assert_eq!(
        (s, c["data"]["clusters"][0]["slug"].clone()),
        (StatusCode::OK, json!("sandpit"))
    );
    let (s, tag) = call(
        &http,
        &srv,
        &t,
        M::POST,
        "/vm/tag",
        Some(json!({"vm_ids": [id]})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{tag}");
    let tag_id = tag["data"]["tag_id"].as_str().unwrap().to_string();
    let (s, _) = call(
        &http,
        &srv,
        &t,
        M::POST,
        "/vm/tag",
        Some(json!({"vm_ids": ["sbx_nope"]})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, a) = call(
        &http,
        &srv,
        &t,
        M::PUT,
        "/vm/alias/ns/latest",
        Some(json!({"tag_id": tag_id})),
    )
    .await;
    assert_eq!(
        (s, a["data"]["tag_id"].clone()),
        (StatusCode::OK, json!(tag_id))
    );
    let (s, _) = call(
        &http,
        &srv,
        &t,
        M::PUT,
        "/vm/alias/ns/latest",
        Some(json!({"tag_id": "tag_nope"})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(
        &http,
        &srv,
        &t,
        M::PUT,
        "/vm/alias/n%20s/x",
        Some(json!({"tag_id": tag_id})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Preview tokens at the seed-000 paths share the `/v1` store.
    let (s, pt) = call(
        &http,
        &srv,
        &t,
        M::POST,
        &format!("/sandbox/{id}/tokens"),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{pt}");
    let token_id = pt["data"]["token"]["token_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        pt["data"]["token"]["token"]
            .as_str()
            .unwrap()
            .starts_with("spp_")
    );
    let (s, _) = call(
        &http,
        &srv,
        &t,
        M::POST,
        &format!("/sandbox/{id}/tokens"),
        Some(json!({"expires_at": "2001-01-01T00:00:00Z"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let v1: Value = http
        .get(format!("{}/v1/sandboxes/{id}/preview-tokens", srv.url))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v1.to_string().contains(&token_id), "{v1}");
    let (s, _) = call(
        &http,
        &srv,
        &t,
        M::PATCH,
        &format!("/sandbox/{id}/tokens/{token_id}"),
        Some(json!({"expires_at": "2099-01-01T00:00:00Z"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(
        &http,
        &srv,
        &t,
        M::DELETE,
        &format!("/sandbox/{id}/tokens"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, l) = call(
        &http,
        &srv,
        &t,
        M::GET,
        &format!("/sandbox/{id}/tokens"),
        None,
    )
    .await;
    assert_eq!(l["data"]["tokens"], json!([]), "{l}");
    let (s, _) = call(
        &http,
        &srv,
        &t,
        M::PATCH,
        &format!("/sandbox/{id}/tokens/{token_id}"),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Trusted preview hosts: validated, added, replaced; 201 as seed 000 says.
    let (s, b) = call(
        &http,
        &srv,
        &t,
        M::POST,
        "/workspace/preview_hosts",
        Some(json!({"hosts": ["https://x.com"]})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, b) = call(
        &http,
        &srv,
        &t,
        M::POST,
        "/workspace/preview_hosts",
        Some(json!({"hosts": ["A.example.com", "*.example.org"]})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(
        b["data"]["preview_hosts"].as_array().unwrap().len(),
        2,
        "{b}"
    );
    let (s, b) = call(
        &http,
        &srv,
        &t,
        M::PUT,
        "/workspace/preview_hosts",
        Some(json!({"hosts": ["localhost:3000"]})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(
        b["data"]["preview_hosts"][0]["host"], "localhost:3000",
        "{b}"
    );
    let (s, b) = call(&http, &srv, &t, M::GET, "/workspace/preview_hosts", None).await;
    assert_eq!(
        (s, b["data"]["preview_hosts"].as_array().unwrap().len()),
        (StatusCode::CREATED, 1)
    );
    let (s, _) = call(
        &http,
        &srv,
        &reader,
        M::GET,
        "/workspace/preview_hosts",
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Templates are snapshots: made from a template or a sandbox, then forked from.
    let (s, b) = call(
        &http,
        &srv,
        &t,
        M::POST,
        "/templates",
        Some(json!({"forkOf": "no-such-template"})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    let (s, tpl) = call(
        &http,
        &srv,
        &t,
        M::POST,
        "/templates",
        Some(json!({"forkOf": id, "title": "tpl"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{tpl}");
    let tag = tpl["data"]["tag"].as_str().unwrap().to_string();
    let (s, child) = call(
        &http,
        &srv,
        &t,
        M::POST,
        &format!("/sandbox/{tag}/fork"),
        Some(json!({"title": "from-tpl"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{child}");
    let child_id = child["data"]["id"].as_str().unwrap().to_string();
    let out = crate::sh(&srv.client(), &child_id, "cat /project/sandbox/hello.txt").await;
    assert_eq!(out.stdout, "hi there", "{out:?}");
    let (s, _) = call(&http, &srv, &t, M::DELETE, &format!("/vm/{child_id}"), None).await;
    assert_eq!(s, StatusCode::OK);

    // Hibernate, start (resume), shutdown, start (clean), delete; then 404s.
    let (s, _) = call(
        &http,
        &srv,
        &t,
        M::POST,
        &format!("/vm/{id}/hibernate"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, start) = call(&http, &srv, &t, M::POST, &format!("/vm/{id}/start"), None).await;
    assert_eq!(start["data"]["bootup_type"], "RESUME", "{start}");
    let (s, _) = call(
        &http,
        &srv,
        &t,
        M::POST,
        &format!("/vm/{id}/shutdown"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, start) = call(&http, &srv, &t, M::POST, &format!("/vm/{id}/start"), None).await;
    assert_eq!(start["data"]["bootup_type"], "CLEAN", "{start}");
    let (s, _) = call(&http, &srv, &t, M::DELETE, &format!("/vm/{id}"), None).await;
    assert_eq!(s, StatusCode::OK);
    for (m, p) in [
        (M::GET, format!("/sandbox/{id}")),
        (M::POST, format!("/vm/{id}/start")),
        (M::DELETE, format!("/vm/{id}")),
        (M::POST, format!("/sandbox/{id}/fork")),
    ] {
        let (s, b) = call(&http, &srv, &t, m, &p, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{p}: {b}");
        assert_eq!(b["success"], false);
    }
}
