//! MCP end to end: the official Python SDK (`mcp`, the version pinned in
//! `tests/mcp/requirements.txt`, installed once into a venv cached under the target dir) drives
//! a live server through `tests/mcp/test_mcp.py` over both transports, stdio (`sandpit mcp`)
//! and streamable HTTP (`/mcp`); and the endpoint refuses hostile requests.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use sandpit_sdk::types::{SandboxStatus, TokenCreateRequest};
use sandpit_test_support::TestServer;
use serde_json::{Value, json};

use crate::{base, bin, create};

fn script_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mcp")
}

/// A venv with the pinned SDK (`tests/mcp/requirements.txt`).
fn venv() -> PathBuf {
    crate::scripts::python_venv("mcp-venv", &script_dir().join("requirements.txt"))
}

#[tokio::test]
async fn the_mcp_python_sdk_works_over_stdio_and_http() {
    let python = tokio::task::spawn_blocking(venv).await.expect("venv");
    let srv = TestServer::start(bin()).await.expect("server starts");
    // A sandbox of another workspace, which the caller's token must not reach.
    let admin = srv.client();
    let ws = admin.create_workspace("other").await.expect("workspace");
    let other_token = admin
        .create_token(&ws.id, &TokenCreateRequest::default())
        .await
        .expect("token");
    let other = srv.client_with(other_token.token.as_deref().expect("secret"));
    let theirs = create(&other, base()).await;

    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg("test_mcp.py")
        .current_dir(script_dir())
        .env("SANDPIT_URL", &srv.url)
        .env("SANDPIT_TOKEN", &srv.token)
        .env("SANDPIT_BIN", bin())
        .env("OTHER_SANDBOX", &theirs.id);
    let all = crate::scripts::run_json(cmd, "test_mcp.py", 300, &srv).await;
    let tools = json!([
        "create_sandbox",
        "destroy",
        "hibernate",
        "list_files",
        "list_sandboxes",
        "preview_url",
        "read_file",
        "run_command",
        "write_file"
    ]);
    for transport in ["stdio", "http"] {
        let seen = &all[transport];
        let id = seen["id"].as_str().expect("sandbox id").to_string();
        assert_eq!(seen["protocol"], "2025-11-25", "{transport}: {seen}");
        assert_eq!(seen["tools"], tools, "{transport}: {seen}");
        assert_eq!(seen["created"], "running", "{transport}: {seen}");
        assert_eq!(seen["exit"], 3, "{transport}: {seen}");
        assert_eq!(seen["stdout"], "hello\n", "{transport}: {seen}");
        assert_eq!(seen["stderr"], "oops\n", "{transport}: {seen}");
        assert_eq!(seen["envCwd"], "hi\n/tmp\n", "{transport}: {seen}");
        assert_eq!(seen["read"], "hello from mcp", "{transport}: {seen}");
        assert_eq!(seen["readEncoding"], "utf8", "{transport}: {seen}");
        assert_eq!(seen["binaryKept"], true, "{transport}: {seen}");
        assert_eq!(
            seen["list"],
            json!([["blob.bin", "file"], ["hello.txt", "file"]]),
            "{transport}: {seen}"
        );
        assert_eq!(seen["missingFile"], "file_not_found", "{transport}: {seen}");
        assert_eq!(
            seen["previewHost"],
            format!("{id}-8080.localhost"),
            "{transport}: {seen}"
        );
        assert_eq!(seen["previewPrivacy"], "private", "{transport}: {seen}");
        assert_eq!(seen["previewHasToken"], true, "{transport}: {seen}");
        assert_eq!(seen["previewStatus"], 200, "{transport}: {seen}");
        assert_eq!(seen["previewBody"], "preview-ok\n", "{transport}: {seen}");
        assert_eq!(seen["reservedPort"], "invalid_port", "{transport}: {seen}");
        assert_eq!(seen["hibernated"], "suspended", "{transport}: {seen}");
        assert_eq!(seen["listedSuspended"], json!([id]), "{transport}: {seen}");
        assert_eq!(seen["afterWake"], "hello from mcp", "{transport}: {seen}");
        assert_eq!(
            seen["statusAfterWake"],
            json!(["running"]),
            "{transport}: {seen}"
        );
        assert_eq!(
            seen["unknownSandbox"], "sandbox_not_found",
            "{transport}: {seen}"
        );
        for k in [
            "otherWorkspace",
            "otherWorkspaceFile",
            "otherWorkspaceDestroy",
        ] {
            assert_eq!(seen[k], "forbidden", "{transport} {k}: {seen}");
        }
        for k in ["badId", "unknownTool", "missingArg"] {
            assert_eq!(seen[k], -32602, "{transport} {k}: {seen}");
        }
        assert_eq!(seen["destroyed"], true, "{transport}: {seen}");
        assert_eq!(
            seen["afterDestroy"], "sandbox_not_running",
            "{transport}: {seen}"
        );
        assert_eq!(seen["badToken"]["code"], -32001, "{transport}: {seen}");
        assert_eq!(
            seen["badToken"]["message"], "unknown or revoked token",
            "{transport}: {seen}"
        );
        // What the client did is what the REST API sees.
        let s = admin.get_sandbox(&id).await.expect("sandbox row kept");
        assert_eq!(s.status, SandboxStatus::Destroyed, "{transport}");
    }
    // The other workspace's sandbox came through untouched.
    let s = other.get_sandbox(&theirs.id).await.expect("theirs");
    assert_eq!(s.status, SandboxStatus::Running);
}

/// POST a body to `/mcp` with the server's token; the status and the body as JSON (Null if
/// none).
async fn post(srv: &TestServer, token: Option<&str>, body: Vec<u8>) -> (StatusCode, Value) {
    let mut r = reqwest::Client::new()
        .post(format!("{}/mcp", srv.url))
        .header("Content-Type", "application/json")
        .body(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.expect("sent");
    let status = resp.status();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn rpc(srv: &TestServer, method: &str, params: Value) -> Value {
    let body = json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params});
    let (status, answer) = post(srv, Some(&srv.token), body.to_string().into_bytes()).await;
    assert_eq!(status, StatusCode::OK, "{method}: {answer}");
    assert_eq!(answer["id"], 7, "{answer}");
    answer
}

/// The endpoint refuses what it should, with the right JSON-RPC code, and tool calls are
/// scoped like the REST API.
#[tokio::test]
async fn the_mcp_endpoint_refuses_hostile_requests() {
    let srv = TestServer::start(bin()).await.expect("server starts");
    let http = reqwest::Client::new();
    let ping = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"})
        .to_string()
        .into_bytes();

    // No token, a wrong one: 401 before the body is looked at.
    for token in [None, Some("spt_not-a-token")] {
        let resp = http
            .post(format!("{}/mcp", srv.url))
            .header("Content-Type", "application/json")
            .header(
                "Authorization",
                token.map_or("Basic eDo=".to_string(), |t| format!("Bearer {t}")),
            )
            .body("not even json")
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["error"]["code"], -32001, "{body}");
        assert_eq!(body["error"]["data"]["code"], "unauthorized", "{body}");
        assert_eq!(body["id"], Value::Null, "{body}");
    }
    let (status, body) = post(&srv, None, ping.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    // Malformed JSON, not JSON-RPC, an empty or huge batch.
    let tok = Some(srv.token.as_str());
    let (status, body) = post(&srv, tok, b"{\"jsonrpc\":".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], -32700, "{body}");
    for bad in [
        json!("ping"),
        json!([]),
        json!({"id": 1, "method": "ping"}),
        json!({"jsonrpc": "2.0", "id": [1], "method": "ping"}),
        json!({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": "x"}),
        Value::Array(vec![json!({"jsonrpc": "2.0", "method": "x"}); 33]),
    ] {
        let (status, body) = post(&srv, tok, bad.to_string().into_bytes()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["error"]["code"], -32600, "{bad}: {body}");
    }
    // A body past 8 MiB: 413, not read whole.
    let huge = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"params\":{{\"x\":\"{}\"}}}}",
        "a".repeat(9 << 20)
    );
    let (status, body) = post(&srv, tok, huge.into_bytes()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"]["code"], -32600, "{body}");
    // Not JSON by its Content-Type; a protocol revision this server does not speak.
    let resp = http
        .post(format!("{}/mcp", srv.url))
        .bearer_auth(&srv.token)
        .header("Content-Type", "text/plain")
        .body(ping.clone())
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let resp = http
        .post(format!("{}/mcp", srv.url))
        .bearer_auth(&srv.token)
        .header("Content-Type", "application/json")
        .header("MCP-Protocol-Version", "1999-01-01")
        .body(ping.clone())
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // GET (no server-sent stream here) and DELETE (no sessions): 405.
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let resp = http
            .request(method.clone(), format!("{}/mcp", srv.url))
            .bearer_auth(&srv.token)
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
    }

    // Well-formed: ping, notifications (202, no body), a batch, unknown methods.
    let (status, body) = post(&srv, tok, ping.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"jsonrpc": "2.0", "id": 1, "result": {}}));
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (status, body) = post(&srv, tok, note.to_string().into_bytes()).await;
    assert_eq!((status, body), (StatusCode::ACCEPTED, Value::Null));
    let batch = json!([note, {"jsonrpc": "2.0", "id": "b", "method": "ping"}, 5]);
    let (status, body) = post(&srv, tok, batch.to_string().into_bytes()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body[0],
        json!({"jsonrpc": "2.0", "id": "b", "result": {}}),
        "{body}"
    );
    assert_eq!(body[1]["error"]["code"], -32600, "{body}");
    assert_eq!(body.as_array().map(Vec::len), Some(2), "{body}");
    let answer = rpc(&srv, "sampling/createMessage", json!({})).await;
    assert_eq!(answer["error"]["code"], -32601, "{answer}");
    let answer = rpc(&srv, "prompts/list", json!({})).await;
    assert_eq!(answer["result"], json!({"prompts": []}), "{answer}");
    let answer = rpc(&srv, "initialize", json!({"protocolVersion": "2025-06-18"})).await;
    assert_eq!(
        answer["result"]["protocolVersion"], "2025-06-18",
        "{answer}"
    );
    assert_eq!(
        answer["result"]["serverInfo"]["name"], "sandpit",
        "{answer}"
    );

    // Bad params: JSON-RPC -32602, nothing run.
    for params in [
        json!({}),
        json!({"name": 5}),
        json!({"name": "format_disk"}),
        json!({"name": "run_command", "arguments": "ls"}),
        json!({"name": "run_command", "arguments": {"sandbox_id": "sb0000000000000000"}}),
        json!({"name": "run_command", "arguments": {"sandbox_id": 5, "command": "true"}}),
        json!({"name": "run_command", "arguments": {"sandbox_id": "../templates", "command": "true"}}),
        json!({"name": "read_file", "arguments": {"sandbox_id": "sb0000000000000000", "path": "/x", "follow": true}}),
        json!({"name": "preview_url", "arguments": {"sandbox_id": "sb0000000000000000", "port": -1}}),
        json!({"name": "create_sandbox", "arguments": {"egress": {"mode": "deny_all", "open": true}}}),
    ] {
        let answer = rpc(&srv, "tools/call", params.clone()).await;
        assert_eq!(answer["error"]["code"], -32602, "{params}: {answer}");
    }
    let answer = rpc(&srv, "initialize", json!({})).await;
    assert_eq!(answer["error"]["code"], -32602, "{answer}");

    // REST failures are error results with the REST code: an unknown sandbox, a token
    // without the scope, a path the API refuses.
    let result = |answer: &Value| {
        let r = &answer["result"];
        assert_eq!(r["isError"], true, "{answer}");
        assert!(r["content"][0]["text"].is_string(), "{answer}");
        r["structuredContent"]["error"].clone()
    };
    let answer = rpc(
        &srv,
        "tools/call",
        json!({"name": "run_command", "arguments": {"sandbox_id": "sb0000000000000000", "command": "true"}}),
    )
    .await;
    let err = result(&answer);
    assert_eq!(err["code"], "sandbox_not_found", "{answer}");
    assert_eq!(err["status"], 404, "{answer}");
    let admin = srv.client();
    let ws = admin.create_workspace("readers").await.expect("workspace");
    let read_only = admin
        .create_token(
            &ws.id,
            &TokenCreateRequest {
                scopes: Some(vec!["sandbox_read".into()]),
                ..Default::default()
            },
        )
        .await
        .expect("token");
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "create_sandbox", "arguments": {"template": "base"}}});
    let (status, answer) = post(
        &srv,
        read_only.token.as_deref(),
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(result(&answer)["code"], "missing_scope", "{answer}");
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "list_sandboxes", "arguments": {}}});
    let (_, answer) = post(
        &srv,
        read_only.token.as_deref(),
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(answer["result"]["isError"], false, "{answer}");
    assert_eq!(
        answer["result"]["structuredContent"],
        json!({"sandboxes": []}),
        "{answer}"
    );
    let answer = rpc(
        &srv,
        "tools/call",
        json!({"name": "list_sandboxes", "arguments": {"status": "sleepy"}}),
    )
    .await;
    assert_eq!(result(&answer)["status"], 400, "{answer}");
    let answer = rpc(
        &srv,
        "tools/call",
        json!({"name": "create_sandbox", "arguments": {"template": "no-such-template"}}),
    )
    .await;
    assert_eq!(result(&answer)["status"], 404, "{answer}");
}

/// `sandpit mcp` refuses to start without a token, and answers over stdio even when the
/// server is out of reach (an error for each request, nothing else on stdout).
#[tokio::test]
async fn the_stdio_bridge_reports_what_it_cannot_do() {
    let out = tokio::process::Command::new(bin())
        .arg("mcp")
        .env_remove("SANDPIT_TOKEN")
        .env("SANDPIT_URL", "http://127.0.0.1:1")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("runs");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no token"));

    let mut child = tokio::process::Command::new(bin())
        .arg("mcp")
        .env("SANDPIT_TOKEN", "spt_x")
        .env("SANDPIT_URL", "http://127.0.0.1:1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    let mut stdin = child.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(
        &mut stdin,
        b"{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"ping\"}\n{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n",
    )
    .await
    .expect("write");
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("exits")
        .expect("output");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert_eq!(lines[0]["id"], 3, "{stdout}");
    assert_eq!(lines[0]["error"]["code"], -32603, "{stdout}");
}
