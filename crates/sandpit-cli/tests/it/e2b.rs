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

/// A venv with the pinned SDK, made once per requirements file (a stamp holds the
/// requirements it was made from). Fails, with pip's output, if PyPI is out of reach.
fn venv() -> PathBuf {
    let reqs = std::fs::read_to_string(script_dir().join("requirements.txt"))
        .expect("tests/e2b/requirements.txt");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2b-venv");
    let stamp = dir.join("sandpit-requirements.txt");
    let python = dir.join("bin/python");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(reqs.as_str()) && python.exists() {
        return python;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let made = std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .output()
        .expect("python3 runs");
    assert!(
        made.status.success(),
        "python3 -m venv failed: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let pip = std::process::Command::new(dir.join("bin/pip"))
        .args(["install", "--disable-pip-version-check", "-q", "-r"])
        .arg(script_dir().join("requirements.txt"))
        .output()
        .expect("pip runs");
    assert!(
        pip.status.success(),
        "pip could not install the pinned e2b SDK (is PyPI reachable?)\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&pip.stdout),
        String::from_utf8_lossy(&pip.stderr)
    );
    std::fs::write(&stamp, &reqs).expect("write the venv stamp");
    python
}

#[tokio::test]
async fn the_e2b_python_sdk_works_unmodified() {
    let python = tokio::task::spawn_blocking(venv).await.expect("venv");
    let srv = TestServer::start(bin()).await.expect("server starts");
    let logs = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut child = tokio::process::Command::new(&python)
        .arg("test_e2b.py")
        .current_dir(script_dir())
        .env("E2B_API_KEY", &srv.token)
        .env("E2B_API_URL", &srv.url)
        .env("E2B_SANDBOX_URL", &srv.url)
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG")
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .kill_on_drop(true)
        .spawn()
        .expect("python runs");
    let status = tokio::time::timeout(Duration::from_secs(240), child.wait()).await;
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let status = match status {
        Ok(status) => status.expect("python runs"),
        Err(_) => panic!(
            "the SDK script did not finish within 240 s\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}",
            srv.log()
        ),
    };
    assert!(
        status.success(),
        "SDK script failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}",
        srv.log()
    );
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("SDK script printed no JSON ({e}): {stdout}"));
    let id = seen["id"].as_str().expect("sandbox id").to_string();
    assert_eq!(seen["running"], true, "{seen}");
    assert_eq!(seen["exit"], 3, "{seen}");
    assert_eq!(seen["exitStdout"], "hi\n", "{seen}");
    assert_eq!(seen["run"], "hello", "{seen}");
    assert_eq!(seen["stderr"], "oops", "{seen}");
    assert_eq!(seen["env"], "e2b", "{seen}");
    assert_eq!(seen["cwd"], "/tmp", "{seen}");
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
    assert_eq!(seen["paused"], true, "{seen}");
    assert_eq!(seen["pausedAgain"], false, "{seen}");
    assert_eq!(seen["pausedState"], json!(["paused"]), "{seen}");
    assert_eq!(seen["resumedRead"], "kept", "{seen}");
    assert_eq!(seen["resumedRun"], "kept", "{seen}");
    assert_eq!(seen["processKept"], true, "{seen}");
    assert_eq!(seen["beatsAfterResume"], true, "{seen}");
    assert_eq!(seen["counterAdvanced"], true, "{seen}");
    assert_eq!(seen["keptListedAfterKill"], false, "{seen}");
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
