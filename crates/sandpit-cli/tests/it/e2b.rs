//! E2B compatibility end to end: the unmodified `e2b` Python SDK (the version pinned in
//! `tests/e2b/requirements.txt`, installed once into a venv cached under the target dir)
//! drives a live server through `tests/e2b/test_e2b.py`, configured the plain-HTTP way
//! (`E2B_API_URL` and `E2B_SANDBOX_URL` both the server's URL); and envd refuses hostile
//! requests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use sandpit_sdk::types::SandboxStatus;
use sandpit_test_support::TestServer;
use serde_json::{Value, json};

use crate::bin;

fn script_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2b")
}

/// A venv with the pinned SDK (`tests/e2b/requirements.txt`).
fn venv() -> PathBuf {
    crate::scripts::python_venv("e2b-venv", &script_dir().join("requirements.txt"))
}

#[tokio::test]
async fn the_e2b_python_sdk_works_unmodified() {
    let python = tokio::task::spawn_blocking(venv).await.expect("venv");
    let srv = TestServer::start(bin()).await.expect("server starts");
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg("test_e2b.py")
        .current_dir(script_dir())
        .env("E2B_API_KEY", &srv.token)
        .env("E2B_API_URL", &srv.url)
        .env("E2B_SANDBOX_URL", &srv.url)
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG");
    let seen = crate::scripts::run_json(cmd, "test_e2b.py", 240, &srv).await;
    let id = seen["id"].as_str().expect("sandbox id").to_string();
    assert_eq!(seen["running"], true, "{seen}");
    assert_eq!(seen["exit"], 3, "{seen}");
    assert_eq!(seen["exitStdout"], "hi\n", "{seen}");
    assert_eq!(seen["run"], "hello", "{seen}");
    assert_eq!(seen["stderr"], "oops", "{seen}");
    assert_eq!(seen["env"], "e2b", "{seen}");
    assert_eq!(seen["cwd"], "/tmp", "{seen}");
    assert_eq!(seen["timeout"], "TimeoutException", "{seen}");
    assert_eq!(seen["timedOutListed"], false, "{seen}");
    assert_eq!(seen["ticks"], 3, "{seen}");
    assert_eq!(seen["listed"], true, "{seen}");
    assert_eq!(seen["killed"], true, "{seen}");
    assert_eq!(seen["killedExit"], 137, "{seen}");
    assert_eq!(seen["listedAfterKill"], false, "{seen}");
    assert_eq!(seen["writePath"], "/tmp/e2b/hello.txt", "{seen}");
    assert_eq!(seen["read"], "hello from e2b", "{seen}");
    assert_eq!(seen["madeDir"], true, "{seen}");
    assert_eq!(seen["madeDirAgain"], false, "{seen}");
    assert_eq!(
        seen["list"],
        json!([["hello.txt", "file"], ["sub", "dir"]]),
        "{seen}"
    );
    assert_eq!(seen["exists"], true, "{seen}");
    assert_eq!(seen["renamed"], "hello from e2b", "{seen}");
    assert_eq!(seen["afterRemove"], json!(["renamed.txt"]), "{seen}");
    assert_eq!(seen["missing"], "not_found", "{seen}");
    assert_eq!(seen["listedIds"], json!([id]), "{seen}");
    assert_eq!(seen["listedState"], json!(["running"]), "{seen}");
    assert_eq!(seen["metadata"], json!({"suite": "e2b-python"}), "{seen}");
    assert_eq!(seen["hostShape"], true, "{seen}");
    assert_eq!(seen["hostBody"], "200 served from the sandbox", "{seen}");
    assert_eq!(seen["paused"], true, "{seen}");
    assert_eq!(seen["pausedAgain"], false, "{seen}");
    assert_eq!(seen["pausedState"], json!(["paused"]), "{seen}");
    assert!(seen["pausedKeptDays"].as_i64().unwrap_or(0) >= 29, "{seen}");
    assert_eq!(seen["resumedTimeout"], true, "{seen}");
    assert_eq!(seen["resumedRead"], "kept", "{seen}");
    assert_eq!(seen["resumedRun"], "kept", "{seen}");
    crate::scripts::check_process_kept(&seen, "processKept", &srv.log());
    if seen["processKept"] == true {
        assert_eq!(seen["beatsAfterResume"], true, "{seen}");
        assert_eq!(seen["counterAdvanced"], true, "{seen}");
        assert_eq!(seen["keptListedAfterKill"], false, "{seen}");
    }
    assert_eq!(seen["pty"], true, "{seen}");
    assert_eq!(seen["ptyResized"], true, "{seen}");
    assert_eq!(seen["ptyKilled"], true, "{seen}");
    assert_eq!(seen["stdin"], "fed through stdin", "{seen}");
    assert!(seen["killSeconds"].as_u64().unwrap_or(99) < 10, "{seen}");
    assert_eq!(seen["afterKill"], "SandboxNotFoundException", "{seen}");
    // What the SDK did is what the native API sees.
    let s = srv
        .client()
        .get_sandbox(&id)
        .await
        .expect("sandbox row kept");
    assert_eq!(s.status, SandboxStatus::Destroyed);
}

/// envd refuses what it should, before touching the sandbox: no or a wrong access token,
/// bad sandbox ids, malformed Connect envelopes, bad paths.
#[tokio::test]
async fn envd_refuses_hostile_requests() {
    let srv = TestServer::start(bin()).await.expect("server starts");
    let http = reqwest::Client::new();
    // The control API takes the token as X-API-KEY, and answers in E2B's error shape.
    let resp = http
        .post(format!("{}/v2/sandboxes", srv.url))
        .header("X-API-KEY", "spt_not-a-token")
        .json(&json!({"templateID": "base"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], 401);
    let resp = http
        .get(format!("{}/sandboxes/sb0000000000000000", srv.url))
        .header("X-API-KEY", &srv.token)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], 404);
    let resp = http
        .post(format!("{}/v2/sandboxes", srv.url))
        .header("X-API-KEY", &srv.token)
        .json(&json!({"templateID": "base", "timeout": 60}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let made: Value = resp.json().await.unwrap();
    let id = made["sandboxID"].as_str().unwrap().to_string();
    let token = made["envdAccessToken"].as_str().unwrap().to_string();
    let envd = |path: &str, id: &str, token: Option<&str>| {
        let mut r = http
            .post(format!("{}{path}", srv.url))
            .header("E2b-Sandbox-Id", id)
            .header("E2b-Sandbox-Port", "49983");
        if let Some(t) = token {
            r = r.header("X-Access-Token", t);
        }
        r
    };
    let stat = br#"{"path":"/etc"}"#.to_vec();
    // No token, a wrong one, another id: refused.
    for (sid, tok) in [
        (id.as_str(), None),
        (id.as_str(), Some("spe_wrong")),
        ("sb0000000000000000", Some(token.as_str())),
        ("../../etc", Some(token.as_str())),
    ] {
        let resp = envd("/filesystem.Filesystem/Stat", sid, tok)
            .header("Content-Type", "application/json")
            .body(stat.clone())
            .send()
            .await
            .expect("sent");
        assert!(
            resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::NOT_FOUND,
            "{sid} {tok:?}: {}",
            resp.status()
        );
    }
    // The right token works.
    let resp = envd("/filesystem.Filesystem/Stat", &id, Some(&token))
        .header("Content-Type", "application/json")
        .body(stat.clone())
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["entry"]["type"], "FILE_TYPE_DIRECTORY", "{body}");
    // Paths that escape, bodies that are not objects.
    for body in [&br#"{"path":"/etc/../.."}"#[..], b"[1]", b"not json"] {
        let resp = envd("/filesystem.Filesystem/Stat", &id, Some(&token))
            .header("Content-Type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .expect("sent");
        assert_eq!(
            resp.status(),
            StatusCode::BAD_REQUEST,
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
    // A stream request whose envelope claims 4 GiB, or carries trailing bytes: an error
    // in the end frame, nothing run.
    for body in [vec![0u8, 0xff, 0xff, 0xff, 0xff, b'{'], {
        let mut b = vec![0u8, 0, 0, 0, 2];
        b.extend_from_slice(b"{}xx");
        b
    }] {
        let resp = envd("/process.Process/Start", &id, Some(&token))
            .header("Content-Type", "application/connect+json")
            .body(body)
            .send()
            .await
            .expect("sent");
        let bytes = resp.bytes().await.unwrap();
        assert_eq!(bytes[0], 0x02, "{bytes:?}");
        let end: Value = serde_json::from_slice(&bytes[5..]).unwrap();
        assert!(end["error"]["code"].is_string(), "{end}");
    }
    // Bad base64 stdin for an unknown process; a bad Basic user.
    let resp = envd("/process.Process/SendInput", &id, Some(&token))
        .header("Content-Type", "application/json")
        .body(r#"{"process":{"pid":1},"input":{"stdin":"!!!"}}"#)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = envd("/filesystem.Filesystem/Stat", &id, Some(&token))
        .header("Authorization", "Basic !!!")
        .body(stat.clone())
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // Processes belong to their sandbox: a process of this sandbox is out of reach with
    // another sandbox's token, and malformed process requests change nothing.
    let envelope = |v: Value| {
        let json = serde_json::to_vec(&v).unwrap();
        let mut b = vec![0u8];
        b.extend_from_slice(&(json.len() as u32).to_be_bytes());
        b.extend_from_slice(&json);
        b
    };
    let mut started = envd("/process.Process/Start", &id, Some(&token))
        .header("Content-Type", "application/connect+json")
        .body(envelope(
            json!({"process": {"cmd": "/bin/sh", "args": ["-c", "sleep 600"]}}),
        ))
        .send()
        .await
        .expect("sent");
    let mut first = Vec::new();
    while first.len() < 5
        || first.len() < 5 + u32::from_be_bytes(first[1..5].try_into().unwrap()) as usize
    {
        first.extend_from_slice(&started.chunk().await.unwrap().expect("a start event"));
    }
    let len = u32::from_be_bytes(first[1..5].try_into().unwrap()) as usize;
    let start: Value = serde_json::from_slice(&first[5..5 + len]).unwrap();
    let pid = start["event"]["start"]["pid"].as_u64().expect("a pid");
    let other: Value = http
        .post(format!("{}/v2/sandboxes", srv.url))
        .header("X-API-KEY", &srv.token)
        .json(&json!({"templateID": "base", "timeout": 60}))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .unwrap();
    let other_id = other["sandboxID"].as_str().unwrap().to_string();
    let other_token = other["envdAccessToken"].as_str().unwrap().to_string();
    let kill = json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}).to_string();
    let resp = envd("/process.Process/SendSignal", &other_id, Some(&other_token))
        .header("Content-Type", "application/json")
        .body(kill.clone())
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    for (method, body, want) in [
        // Both inputs at once.
        (
            "SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": "eA==", "pty": "eA=="}}),
            StatusCode::BAD_REQUEST,
        ),
        // A resize of a process without a pty, or to nothing.
        (
            "Update",
            json!({"process": {"pid": pid}, "pty": {"size": {"cols": 80, "rows": 24}}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "Update",
            json!({"process": {"pid": pid}, "pty": {"size": {"cols": 0, "rows": 70000}}}),
            StatusCode::BAD_REQUEST,
        ),
        // No such process; a selector that names none.
        (
            "SendSignal",
            json!({"process": {"pid": 999_999}, "signal": "SIGNAL_SIGKILL"}),
            StatusCode::NOT_FOUND,
        ),
        (
            "SendSignal",
            json!({"process": {}, "signal": "SIGNAL_SIGKILL"}),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let resp = envd(&format!("/process.Process/{method}"), &id, Some(&token))
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), want, "{method} {body}");
    }
    // Stream requests that name no process or a pty of no size: an error in the end frame.
    for (method, body) in [
        ("Connect", json!({"process": {"pid": 999_999}})),
        (
            "Start",
            json!({"process": {"cmd": "/bin/sh"}, "pty": {"size": {"cols": 0, "rows": 0}}}),
        ),
    ] {
        let resp = envd(&format!("/process.Process/{method}"), &id, Some(&token))
            .header("Content-Type", "application/connect+json")
            .body(envelope(body.clone()))
            .send()
            .await
            .expect("sent");
        let bytes = resp.bytes().await.unwrap();
        assert_eq!(bytes[0], 0x02, "{method} {body}: {bytes:?}");
        let end: Value = serde_json::from_slice(&bytes[5..]).unwrap();
        assert!(end["error"]["code"].is_string(), "{end}");
    }
    // The process still runs; its own sandbox's token kills it, and its stream ends.
    let listed: Value = envd("/process.Process/List", &id, Some(&token))
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .unwrap();
    assert_eq!(listed["processes"][0]["pid"], pid, "{listed}");
    let resp = envd("/process.Process/SendSignal", &id, Some(&token))
        .header("Content-Type", "application/json")
        .body(kill)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::OK);
    let rest = started.bytes().await.unwrap();
    assert!(
        String::from_utf8_lossy(&rest).contains("signal: killed"),
        "{rest:?}"
    );
    // Another port through E2b-Sandbox-Port is not served.
    let resp = http
        .get(format!("{}/health", srv.url))
        .header("E2b-Sandbox-Id", &id)
        .header("E2b-Sandbox-Port", "22")
        .header("X-Access-Token", &token)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    // Health, then the sandbox is gone: 204, then not found.
    let health = |t: &str| {
        http.get(format!("{}/health", srv.url))
            .header("E2b-Sandbox-Id", &id)
            .header("X-Access-Token", t.to_string())
            .send()
    };
    assert_eq!(
        health(&token).await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    let resp = http
        .delete(format!("{}/sandboxes/{id}", srv.url))
        .header("X-API-KEY", &srv.token)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        health(&token).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let resp = http
        .delete(format!("{}/sandboxes/{id}", srv.url))
        .header("X-API-KEY", &srv.token)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

/// Run one SDK script from `tests/e2b` against `srv` (at most `secs`) and parse the JSON
/// line it prints last.
async fn run_script(python: &Path, srv: &TestServer, script: &str, secs: u64) -> Value {
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(script)
        .current_dir(script_dir())
        .env("E2B_API_KEY", &srv.token)
        .env("E2B_API_URL", &srv.url)
        .env("E2B_SANDBOX_URL", &srv.url)
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG");
    crate::scripts::run_json(cmd, script, secs, srv).await
}

/// File watches through the Python SDK: the sync SDK's polling watcher (flat and
/// recursive, bad paths, cut by a pause) and the async SDK's `WatchDir` stream.
#[tokio::test]
async fn the_e2b_python_sdk_watches_files() {
    let python = tokio::task::spawn_blocking(venv).await.expect("venv");
    let srv = TestServer::start(bin()).await.expect("server starts");
    let seen = run_script(&python, &srv, "test_e2b_watch.py", 240).await;
    let pairs = |v: &Value| -> Vec<(String, String)> {
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"))
    };
    let has =
        |v: &Value, name: &str, kind: &str| pairs(v).iter().any(|(n, k)| n == name && k == kind);
    // Flat: the write through envd is a create and a write of the file itself (no
    // temporary file), the append a write, a rename a remove and a create.
    let flat = &seen["flat"];
    for (name, kind) in [
        ("a.txt", "create"),
        ("a.txt", "write"),
        ("d", "create"),
        ("a.txt", "remove"),
        ("b.txt", "create"),
        ("b.txt", "remove"),
    ] {
        assert!(has(flat, name, kind), "{name} {kind} missing: {seen}");
    }
    assert!(
        !pairs(flat).iter().any(|(n, _)| n.contains("sandpit-tmp")),
        "{seen}"
    );
    let first_a: Vec<String> = pairs(flat)
        .into_iter()
        .filter(|(n, _)| n == "a.txt")
        .map(|(_, k)| k)
        .take(2)
        .collect();
    assert_eq!(first_a, ["create", "write"], "{seen}");
    assert_eq!(
        seen["flatTypes"],
        json!(["create", "remove", "write"]),
        "{seen}"
    );
    assert_eq!(seen["flatNested"], false, "{seen}");
    assert_eq!(seen["flatEmptyAfter"], true, "{seen}");
    assert_eq!(seen["afterStop"], "SandboxException", "{seen}");
    // Recursive: names relative to the watched directory, new directories followed.
    for (name, kind) in [
        ("sub/deep.txt", "create"),
        ("sub/deep.txt", "write"),
        ("new/inner/f", "create"),
        ("new/inner/f", "write"),
    ] {
        assert!(has(&seen["deep"], name, kind), "{name} {kind}: {seen}");
    }
    // `mkdir -p` then a write at once: every new path is reported, even what was made
    // before the new directories' own watches were in place.
    assert_eq!(
        seen["deepNew"],
        json!(["new", "new/inner", "new/inner/f"]),
        "{seen}"
    );
    assert_eq!(seen["missingDir"], "not_found", "{seen}");
    assert_eq!(seen["fileNotDir"], "InvalidArgumentException", "{seen}");
    assert_eq!(seen["escape"], "InvalidArgumentException", "{seen}");
    // An open watcher does not hold a pause; the pause ends it.
    assert!(seen["pauseSeconds"].as_u64().unwrap_or(99) < 30, "{seen}");
    assert_eq!(seen["afterPause"], "error", "{seen}");
    assert!(has(&seen["afterResume"], "after.txt", "write"), "{seen}");
    // The stream: events as they happen, a clean exit on stop, an error on timeout.
    for (name, kind) in [
        ("sub/streamed.txt", "create"),
        ("sub/streamed.txt", "write"),
        ("sub/streamed.txt", "remove"),
    ] {
        assert!(has(&seen["stream"], name, kind), "{name} {kind}: {seen}");
    }
    assert_eq!(seen["streamStopExit"], json!([true]), "{seen}");
    let timeout = seen["streamTimeout"].as_array().expect("timeout exits");
    assert_eq!(timeout.len(), 1, "{seen}");
    assert!(timeout[0].is_string(), "the timeout is an error: {seen}");
}

/// One Connect frame of a stream request.
fn connect_frame(msg: &Value) -> Vec<u8> {
    let body = serde_json::to_vec(msg).unwrap();
    let mut out = vec![0u8];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Read the next Connect frame (flags, message) of a streaming answer.
async fn next_frame(resp: &mut reqwest::Response, buf: &mut Vec<u8>) -> Option<(u8, Value)> {
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() >= 5 + len {
                let flags = buf[0];
                let msg = serde_json::from_slice(&buf[5..5 + len]).expect("a JSON message");
                buf.drain(..5 + len);
                return Some((flags, msg));
            }
        }
        match tokio::time::timeout(Duration::from_secs(60), resp.chunk()).await {
            Ok(Ok(Some(chunk))) => buf.extend_from_slice(&chunk),
            Ok(_) => return None,
            Err(_) => panic!("no frame within 60 s"),
        }
    }
}

/// envd's watchers refuse bad input and stay within their sandbox: unknown ids, another
/// sandbox's watcher, paths outside or not directories, too many watchers; a pause cuts
/// both kinds without waiting for them.
#[tokio::test]
async fn envd_watchers_are_bounded_and_scoped() {
    let srv = TestServer::start(bin()).await.expect("server starts");
    let http = reqwest::Client::new();
    let mut made = Vec::new();
    for _ in 0..2 {
        let resp = http
            .post(format!("{}/v2/sandboxes", srv.url))
            .header("X-API-KEY", &srv.token)
            .json(&json!({"templateID": "base", "timeout": 300}))
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), StatusCode::CREATED);
        let v: Value = resp.json().await.unwrap();
        made.push((
            v["sandboxID"].as_str().unwrap().to_string(),
            v["envdAccessToken"].as_str().unwrap().to_string(),
        ));
    }
    let (a, b) = (made[0].clone(), made[1].clone());
    let call = |sb: &(String, String), method: &str, body: Value| {
        http.post(format!("{}/filesystem.Filesystem/{method}", srv.url))
            .header("E2b-Sandbox-Id", &sb.0)
            .header("X-Access-Token", &sb.1)
            .header("Content-Type", "application/json")
            .json(&body)
            .send()
    };
    let code = |v: &Value| v["code"].as_str().unwrap_or("").to_string();
    let resp = call(&a, "CreateWatcher", json!({"path": "/tmp"}))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let watcher = resp.json::<Value>().await.unwrap()["watcherId"]
        .as_str()
        .expect("a watcher id")
        .to_string();
    let resp = call(&a, "GetWatcherEvents", json!({"watcherId": watcher}))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap()["events"], json!([]));
    // Another sandbox cannot read or remove it; an unknown id is not found; a's token
    // through b's id is refused before anything.
    for method in ["GetWatcherEvents", "RemoveWatcher"] {
        let resp = call(&b, method, json!({"watcherId": watcher}))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method}");
        assert_eq!(code(&resp.json().await.unwrap()), "not_found");
        let resp = call(&a, method, json!({"watcherId": "nope"}))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method}");
    }
    let resp = call(
        &(b.0.clone(), a.1.clone()),
        "GetWatcherEvents",
        json!({"watcherId": watcher}),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Paths: outside, not a directory, missing; messages that are not objects.
    for (body, status) in [
        (json!({"path": "/tmp/../.."}), StatusCode::BAD_REQUEST),
        (json!({"path": "/etc/passwd"}), StatusCode::BAD_REQUEST),
        (json!({"path": "/no/such/dir"}), StatusCode::NOT_FOUND),
        (json!({"path": "x".repeat(5000)}), StatusCode::BAD_REQUEST),
        (json!([1]), StatusCode::BAD_REQUEST),
    ] {
        let resp = call(&a, "CreateWatcher", body.clone()).await.unwrap();
        assert_eq!(resp.status(), status, "{body}");
    }
    // The bound: 16 watches per sandbox (one is open), streams included.
    let mut ids = vec![watcher.clone()];
    for _ in 1..16 {
        let resp = call(
            &a,
            "CreateWatcher",
            json!({"path": "/tmp", "recursive": true}),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        ids.push(
            resp.json::<Value>().await.unwrap()["watcherId"]
                .as_str()
                .unwrap()
                .into(),
        );
    }
    let resp = call(&a, "CreateWatcher", json!({"path": "/tmp"}))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(code(&resp.json().await.unwrap()), "resource_exhausted");
    let stream = |sb: &(String, String), path: &str| {
        http.post(format!("{}/filesystem.Filesystem/WatchDir", srv.url))
            .header("E2b-Sandbox-Id", &sb.0)
            .header("X-Access-Token", &sb.1)
            .header("Content-Type", "application/connect+json")
            .body(connect_frame(&json!({"path": path})))
            .send()
    };
    let mut resp = stream(&a, "/tmp").await.unwrap();
    let mut buf = Vec::new();
    let (flags, end) = next_frame(&mut resp, &mut buf).await.expect("an end frame");
    assert_eq!(flags, 2, "{end}");
    assert_eq!(end["error"]["code"], "resource_exhausted", "{end}");
    // Removing one makes room; b has room of its own.
    let resp = call(
        &a,
        "RemoveWatcher",
        json!({"watcherId": ids.pop().unwrap()}),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut a_stream = stream(&a, "/tmp").await.unwrap();
    let mut a_buf = Vec::new();
    let (_, start) = next_frame(&mut a_stream, &mut a_buf).await.expect("start");
    assert_eq!(start, json!({"start": {}}));
    let mut b_stream = stream(&b, "/").await.unwrap();
    let mut b_buf = Vec::new();
    let (_, start) = next_frame(&mut b_stream, &mut b_buf).await.expect("start");
    assert_eq!(start, json!({"start": {}}));
    // The stream sees a change, named relative to the watched directory.
    let resp = http
        .post(format!("{}/files?path=/tmp/seen.txt", srv.url))
        .header("E2b-Sandbox-Id", &a.0)
        .header("X-Access-Token", &a.1)
        .header("Content-Type", "multipart/form-data; boundary=XB")
        .body(
            "--XB\r\nContent-Disposition: form-data; name=\"file\"; filename=\"seen.txt\"\r\n\r\nx\r\n--XB--\r\n",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (_, ev) = next_frame(&mut a_stream, &mut a_buf)
        .await
        .expect("an event");
    assert_eq!(
        ev,
        json!({"filesystem": {"name": "seen.txt", "type": "EVENT_TYPE_CREATE"}})
    );
    // A pause does not wait for open watches; it ends them.
    let started = std::time::Instant::now();
    for sb in [&a, &b] {
        let resp = http
            .post(format!("{}/sandboxes/{}/pause", srv.url, sb.0))
            .header("X-API-KEY", &srv.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    let end = loop {
        let (flags, msg) = next_frame(&mut b_stream, &mut b_buf)
            .await
            .expect("a frame");
        if flags == 2 {
            break msg;
        }
    };
    assert_eq!(end["error"]["code"], "unavailable", "{end}");
    let end = loop {
        let (flags, msg) = next_frame(&mut a_stream, &mut a_buf)
            .await
            .expect("a frame");
        if flags == 2 {
            break msg;
        }
    };
    assert_eq!(end["error"]["code"], "unavailable", "{end}");
    // A polling watcher answers what it queued, then why it ended, once, then is gone.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let resp = call(&a, "GetWatcherEvents", json!({"watcherId": watcher}))
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        if status != StatusCode::OK {
            statuses.push((status, code(&body)));
        }
        if status == StatusCode::NOT_FOUND {
            break;
        }
    }
    assert_eq!(
        statuses,
        [
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable".to_string()),
            (StatusCode::NOT_FOUND, "not_found".to_string())
        ]
    );
}

/// The `E2B_DOMAIN` + TLS setup: `sandpit serve --tls-cert --tls-key` with the preview
/// domain `sandpit.localhost`, and the unmodified Python SDK given only `E2B_API_KEY`,
/// `E2B_DOMAIN=sandpit.localhost:<port>` and the CA in `SSL_CERT_FILE`
/// (`tests/e2b/test_e2b_domain.py`): the API at `api.<domain>`, envd at `49983-<id>.<domain>`,
/// a sandbox port at `sbx.get_host(port)`, and the base template's `user` and bash.
#[tokio::test]
async fn the_e2b_python_sdk_works_with_e2b_domain_over_tls() {
    let python = tokio::task::spawn_blocking(venv).await.expect("venv");
    let certs = tempfile::tempdir().expect("temp dir");
    let (ca, cert, key) = crate::tls::test_certificates(certs.path());
    let srv = TestServer::start_tls(
        bin(),
        &cert,
        &key,
        &ca,
        &[("SANDPIT_PREVIEW_DOMAIN", "sandpit.localhost")],
    )
    .await
    .expect("server starts");
    assert!(srv.url.starts_with("https://"), "{}", srv.url);
    let port = srv.url.rsplit(':').next().expect("port").to_string();
    let domain = format!("sandpit.localhost:{port}");
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg("test_e2b_domain.py")
        .current_dir(script_dir())
        .env("E2B_API_KEY", &srv.token)
        .env("E2B_DOMAIN", &domain)
        .env("SSL_CERT_FILE", &ca)
        .env_remove("E2B_API_URL")
        .env_remove("E2B_SANDBOX_URL")
        .env_remove("E2B_DEBUG");
    let seen = crate::scripts::run_json(cmd, "test_e2b_domain.py", 180, &srv).await;
    let id = seen["id"].as_str().expect("sandbox id").to_string();
    assert_eq!(seen["domain"], domain.as_str(), "{seen}");
    assert_eq!(seen["whoami"], "user", "{seen}");
    assert!(
        seen["bash"].as_str().is_some_and(|v| v.starts_with('5')),
        "{seen}"
    );
    assert_eq!(seen["home"], "/home/user", "{seen}");
    assert_eq!(seen["rootWhoami"], "root", "{seen}");
    assert_eq!(seen["writePath"], "/home/user/notes.txt", "{seen}");
    assert_eq!(seen["read"], "over TLS", "{seen}");
    assert_eq!(seen["owner"], "user", "{seen}");
    assert_eq!(seen["host"], format!("8000-{id}.{domain}"), "{seen}");
    assert_eq!(seen["fetched"], "served over tls", "{seen}");
    assert_eq!(seen["afterKill"], "SandboxNotFoundException", "{seen}");
}

/// Without TLS (`E2B_API_URL`/`E2B_SANDBOX_URL`), `domain` is the preview domain with the
/// port the client used, so `getHost(port)` (`<port>-<id>.<domain>`, as both SDKs build it)
/// names this server over plain HTTP; E2B hosts that are malformed, or name a sandbox
/// without its envd token, are refused before anything is looked up or woken.
#[tokio::test]
async fn e2b_hosts_route_and_refuse() {
    let srv = TestServer::start(bin()).await.expect("server starts");
    let http = reqwest::Client::new();
    let port = srv.url.rsplit(':').next().expect("port").to_string();
    let create = |public: bool| {
        http.post(format!("{}/v2/sandboxes", srv.url))
            .header("X-API-KEY", &srv.token)
            .json(&json!({"templateID": "base", "timeout": 120,
                          "network": {"allow_public_traffic": public}}))
            .send()
    };
    let made: Value = create(true).await.expect("sent").json().await.unwrap();
    let id = made["sandboxID"].as_str().unwrap().to_string();
    let token = made["envdAccessToken"].as_str().unwrap().to_string();
    assert_eq!(made["domain"], format!("localhost:{port}"), "{made}");
    let other: Value = create(false).await.expect("sent").json().await.unwrap();
    let other_id = other["sandboxID"].as_str().unwrap().to_string();
    let other_token = other["envdAccessToken"].as_str().unwrap().to_string();
    let get: Value = http
        .get(format!("{}/sandboxes/{id}", srv.url))
        .header("X-API-KEY", &srv.token)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .unwrap();
    assert_eq!(get["domain"], format!("localhost:{port}"), "{get}");

    // A request to this listener under the host the SDK derives.
    let at = |host: String, path: &str| {
        http.get(format!("{}{path}", srv.url))
            .header(reqwest::header::HOST, host)
    };
    // envd by host: its token is checked; the host names the sandbox, whatever header
    // the client adds.
    let envd_host = |sid: &str| format!("49983-{sid}.localhost:{port}");
    let resp = at(envd_host(&id), "/health")
        .header("X-Access-Token", &token)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    for (host, tok, header) in [
        (envd_host(&id), None, None),
        (envd_host(&id), Some(other_token.as_str()), None),
        (
            envd_host(&id),
            Some(other_token.as_str()),
            Some(other_id.as_str()),
        ),
        (envd_host("sb0000000000000000"), Some(token.as_str()), None),
    ] {
        let mut r = at(host.clone(), "/health");
        if let Some(t) = tok {
            r = r.header("X-Access-Token", t);
        }
        if let Some(h) = header {
            r = r.header("E2b-Sandbox-Id", h);
        }
        let resp = r.send().await.expect("sent");
        assert_eq!(
            resp.status(),
            StatusCode::UNAUTHORIZED,
            "{host} {tok:?} {header:?}"
        );
    }
    // Malformed E2B hosts: a clear 4xx with a code.
    for (label, status, code) in [
        (format!("0-{id}"), StatusCode::BAD_REQUEST, "invalid_host"),
        (
            format!("65536-{id}"),
            StatusCode::BAD_REQUEST,
            "invalid_host",
        ),
        (
            format!("http-{id}"),
            StatusCode::BAD_REQUEST,
            "invalid_host",
        ),
        (
            "8000-sbnothex".to_string(),
            StatusCode::NOT_FOUND,
            "sandbox_not_found",
        ),
        (
            "8000-sb0000000000000000".to_string(),
            StatusCode::NOT_FOUND,
            "preview_not_found",
        ),
    ] {
        let resp = at(format!("{label}.localhost:{port}"), "/")
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), status, "{label}");
        let body: Value = resp.json().await.unwrap();
        match body["error"]["code"].as_str() {
            // A preview's error, in Sandpit's shape.
            Some(got) => assert_eq!(got, code, "{label}: {body}"),
            // E2B's shape: the status as the code.
            None => assert_eq!(body["code"], status.as_u16(), "{label}: {body}"),
        }
    }

    // `getHost(8000)` reaches a server in the sandbox: public by default, as in E2B.
    let client = srv.client();
    client
        .exec(
            &id,
            &sandpit_sdk::types::ExecRequest {
                command: Some(
                    "mkdir -p /tmp/www && echo plain > /tmp/www/index.html && \
                     httpd -p 8000 -h /tmp/www"
                        .into(),
                ),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    let host = format!("8000-{id}.{}", made["domain"].as_str().unwrap());
    let body = sandpit_test_support::wait_until(
        Duration::from_secs(20),
        "the sandbox's server answers at getHost(8000)",
        || async {
            let r = at(host.clone(), "/").send().await.ok()?;
            (r.status() == StatusCode::OK).then_some(())?;
            r.text().await.ok()
        },
    )
    .await
    .expect("served");
    assert_eq!(body.trim(), "plain");
    // The agent's port is envd, never a proxy: an envd route, not the agent's protocol.
    let resp = at(envd_host(&id), "/")
        .header("X-Access-Token", &token)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // A private one (`allow_public_traffic: false`) needs a preview token; a paused one is
    // not woken by a refused request.
    let resp = http
        .post(format!("{}/sandboxes/{other_id}/pause", srv.url))
        .header("X-API-KEY", &srv.token)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = at(format!("8000-{other_id}.localhost:{port}"), "/")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = at(envd_host(&other_id), "/health")
        .header("X-Access-Token", &token)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let s = client.get_sandbox(&other_id).await.expect("sandbox");
    assert_eq!(
        s.status,
        SandboxStatus::Suspended,
        "a refused request woke it"
    );
    for sid in [&id, &other_id] {
        let resp = http
            .delete(format!("{}/sandboxes/{sid}", srv.url))
            .header("X-API-KEY", &srv.token)
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    }
}

/// `--tls-cert` without `--tls-key`, and a key that is not the certificate's: the server
/// does not start, and says why.
#[tokio::test]
async fn tls_setup_errors_are_clear() {
    let certs = tempfile::tempdir().expect("temp dir");
    let (ca, cert, _key) = crate::tls::test_certificates(certs.path());
    let out = std::process::Command::new(bin())
        .args(["serve", "--tls-cert"])
        .arg(&cert)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-key"), "{err}");
    // The CA's key is not the server certificate's.
    let err =
        match TestServer::start_tls(bin(), &cert, &certs.path().join("ca.key"), &ca, &[]).await {
            Ok(_) => panic!("started with a mismatched key"),
            Err(e) => format!("{e:#}"),
        };
    assert!(
        err.contains("is not the private key of the certificate"),
        "{err}"
    );
}
