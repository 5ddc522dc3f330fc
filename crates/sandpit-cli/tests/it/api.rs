//! The `/v1/sandboxes` contract: status codes, tenants, exec, files, path escapes, the CLI.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use reqwest::Method;
use sandpit_sdk::types::{
    CreateSandboxRequest, EgressPolicy, ExecEvent, ExecRequest, SandboxMode, SandboxStatus,
    TokenCreateRequest, TokenUpdateRequest,
};
use sha2::{Digest, Sha256};

use crate::{assert_api_err, base, create, server, sh};

#[tokio::test]
async fn v1_sandboxes_contract_end_to_end() {
    let srv = server().await;
    let admin = srv.client();

    // ---- auth: missing, wrong and scope-less tokens ----
    let anon = reqwest::Client::new();
    let r = anon
        .get(format!("{}/v1/sandboxes", srv.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    assert_api_err(
        srv.client_with("sp_wrong").list_sandboxes(None).await,
        401,
        "unauthorized",
    );

    // ---- a second workspace with its own token ----
    let ws_b = admin.create_workspace("tenant-b").await.unwrap();
    let tok_b = admin
        .create_token(&ws_b.id, &TokenCreateRequest::default())
        .await
        .unwrap();
    let b = srv.client_with(tok_b.token.as_deref().unwrap());
    assert_api_err(b.create_workspace("nope").await, 403, "missing_scope");
    let read_only = admin
        .create_token(
            &ws_b.id,
            &TokenCreateRequest {
                scopes: Some(vec!["sandbox_read".into()]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let b_ro = srv.client_with(read_only.token.as_deref().unwrap());
    assert_api_err(b_ro.create_sandbox(&base()).await, 403, "missing_scope");
    assert_api_err(
        admin
            .create_token(
                &ws_b.id,
                &TokenCreateRequest {
                    scopes: Some(vec!["root".into()]),
                    ..Default::default()
                },
            )
            .await,
        400,
        "invalid_scope",
    );

    // ---- create: bad input gets 400/404 and creates nothing ----
    let bad = |f: fn(&mut CreateSandboxRequest)| {
        let mut r = base();
        f(&mut r);
        r
    };
    assert_api_err(
        admin
            .create_sandbox(&bad(|r| r.size = Some("huge".into())))
            .await,
        400,
        "invalid_size",
    );
    assert_api_err(
        admin
            .create_sandbox(&bad(|r| r.timeout = Some("25h".into())))
            .await,
        400,
        "invalid_timeout",
    );
    assert_api_err(
        admin
            .create_sandbox(&bad(|r| r.timeout = Some("soon".into())))
            .await,
        400,
        "invalid_timeout",
    );
    assert_api_err(
        admin
            .create_sandbox(&bad(|r| {
                r.mode = SandboxMode::Persistent;
            }))
            .await,
        400,
        "invalid_timeout",
    );
    assert_api_err(
        admin
            .create_sandbox(&bad(|r| {
                r.egress = Some(EgressPolicy {
                    mode: "deny_all".into(),
                    allow_ports: vec![443],
                    ..Default::default()
                })
            }))
            .await,
        400,
        "invalid_egress_policy",
    );
    assert_api_err(
        admin
            .create_sandbox(&bad(|r| {
                r.egress = Some(EgressPolicy {
                    mode: "sometimes".into(),
                    ..Default::default()
                })
            }))
            .await,
        400,
        "invalid_egress_mode",
    );
    assert_api_err(
        admin
            .create_sandbox(&bad(|r| r.template = "nope".into()))
            .await,
        404,
        "template_not_found",
    );
    let r = admin
        .request(Method::POST, "/v1/sandboxes")
        .body(r#"{"template":"base","mode":"forever"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        admin.list_sandboxes(None).await.unwrap().is_empty(),
        "bad input created nothing"
    );

    // ---- create the way the README shows it (curl -d sends a form content type) ----
    let r = admin
        .request(Method::POST, "/v1/sandboxes")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"template":"base","mode":"ephemeral","timeout":"10m","env":{"GREETING":"hello"},"metadata":{"owner":"it"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let sb: sandpit_sdk::types::Sandbox = r.json().await.unwrap();
    assert_eq!(sb.status, SandboxStatus::Running);
    assert_eq!(sb.env_keys, vec!["GREETING".to_string()]);
    assert_eq!(sb.metadata.get("owner").map(String::as_str), Some("it"));
    assert!(sb.expires_at.is_some());
    let id = sb.id.clone();

    // ---- get / list / tenants ----
    assert_eq!(admin.get_sandbox(&id).await.unwrap().id, id);
    assert_api_err(b.get_sandbox(&id).await, 403, "forbidden");
    assert_api_err(
        b.exec(
            &id,
            &ExecRequest {
                command: Some("true".into()),
                ..Default::default()
            },
        )
        .await,
        403,
        "forbidden",
    );
    assert_api_err(b.destroy_sandbox(&id).await, 403, "forbidden");
    assert_api_err(
        admin.get_sandbox("sb0000000000000000").await,
        404,
        "sandbox_not_found",
    );
    assert!(
        b.list_sandboxes(None).await.unwrap().is_empty(),
        "tenant B sees nothing of A"
    );
    assert_eq!(
        admin.list_sandboxes(Some("running")).await.unwrap().len(),
        1
    );
    assert!(
        admin
            .list_sandboxes(Some("suspended"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_api_err(
        admin.list_sandboxes(Some("sleeping")).await,
        400,
        "invalid_status",
    );
    let templates = admin.templates().await.unwrap();
    assert!(templates.iter().any(|t| t.name == "base"));

    // ---- exec ----
    let out = sh(&admin, &id, "echo hi; echo oops >&2; exit 3").await;
    assert_eq!(
        (out.exit_code, out.stdout.as_str(), out.stderr.as_str()),
        (3, "hi\n", "oops\n")
    );
    let out = sh(&admin, &id, "echo $GREETING $EXTRA; pwd").await;
    assert_eq!(out.stdout, "hello\n/\n");
    let out = admin
        .exec(
            &id,
            &ExecRequest {
                argv: Some(vec!["sh".into(), "-c".into(), "echo $EXTRA; pwd".into()]),
                cwd: Some("/tmp".into()),
                env: BTreeMap::from([("EXTRA".to_string(), "x1".to_string())]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(out.stdout, "x1\n/tmp\n");
    let started = std::time::Instant::now();
    let out = admin
        .exec(
            &id,
            &ExecRequest {
                command: Some("sleep 30 & echo $! > /tmp/bg.pid; sleep 30".into()),
                timeout: Some("500ms".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(out.timed_out, "{out:?}");
    assert_ne!(out.exit_code, 0);
    assert!(started.elapsed() < Duration::from_secs(20));
    let out = sh(
        &admin,
        &id,
        "kill -0 $(cat /tmp/bg.pid) 2>/dev/null && echo alive || echo gone",
    )
    .await;
    assert_eq!(
        out.stdout, "gone\n",
        "the timeout killed the whole process group"
    );
    assert_api_err(
        admin.exec(&id, &ExecRequest::default()).await,
        400,
        "missing_command",
    );
    assert_api_err(
        admin
            .exec(
                &id,
                &ExecRequest {
                    command: Some("true".into()),
                    timeout: Some("6m".into()),
                    ..Default::default()
                },
            )
            .await,
        400,
        "invalid_timeout",
    );
    assert_api_err(
        admin
            .exec(
                &id,
                &ExecRequest {
                    command: Some("true".into()),
                    cwd: Some("/nonexistent".into()),
                    ..Default::default()
                },
            )
            .await,
        400,
        "spawn_failed",
    );

    // ---- streaming exec: stdout and stderr arrive separately, in order, then exit ----
    let mut events = Box::pin(
        admin
            .exec_stream(
                &id,
                &ExecRequest {
                    command: Some("echo a; sleep 0.2; echo b >&2; exit 7".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap(),
    );
    let mut seen = Vec::new();
    while let Some(ev) = events.next().await {
        seen.push(ev.unwrap());
    }
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let kinds: Vec<String> = seen
        .iter()
        .map(|e| match e {
            ExecEvent::Started { .. } => "started".to_string(),
            ExecEvent::Stdout { data, .. } => format!(
                "out:{}",
                String::from_utf8(b64.decode(data).unwrap()).unwrap()
            ),
            ExecEvent::Stderr { data, .. } => format!(
                "err:{}",
                String::from_utf8(b64.decode(data).unwrap()).unwrap()
            ),
            ExecEvent::Exit { exit_code, .. } => format!("exit:{exit_code}"),
            ExecEvent::Error { code, .. } => format!("error:{code}"),
        })
        .collect();
    assert_eq!(kinds, vec!["started", "out:a\n", "err:b\n", "exit:7"]);

    // ---- files: 100 MB round trip with checksum, streamed ----
    let size = 100 * 1024 * 1024;
    let chunk: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut want = Sha256::new();
    for _ in 0..100 {
        want.update(&chunk);
    }
    let want = hex::encode(want.finalize());
    let body_chunks = std::iter::repeat_n(chunk.clone(), 100).map(Ok::<_, std::io::Error>);
    admin
        .upload(
            &id,
            "/data/big.bin",
            reqwest::Body::wrap_stream(futures::stream::iter(body_chunks)),
        )
        .await
        .unwrap();
    let out = sh(
        &admin,
        &id,
        "wc -c < /data/big.bin; sha256sum /data/big.bin | cut -d' ' -f1",
    )
    .await;
    assert_eq!(out.stdout, format!("{size}\n{want}\n"));
    let resp = admin.download(&id, "/data/big.bin").await.unwrap();
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    let mut got = Sha256::new();
    let mut n = 0usize;
    let mut body = resp.bytes_stream();
    while let Some(c) = body.next().await {
        let c = c.unwrap();
        n += c.len();
        got.update(&c);
    }
    assert_eq!((n, hex::encode(got.finalize())), (size, want));
    let listing = admin.list_files(&id, "/data").await.unwrap();
    assert_eq!(listing.entries.len(), 1);
    assert_eq!(
        (listing.entries[0].name.as_str(), listing.entries[0].size),
        ("big.bin", size as u64)
    );

    // ---- files: bad paths and sizes change nothing ----
    assert_api_err(admin.upload(&id, "/", "x").await, 400, "invalid_path");
    assert_api_err(
        admin.upload(&id, "/tmp/../etc/passwd", "x").await,
        400,
        "invalid_path",
    );
    assert_api_err(
        admin.upload(&id, "relative.txt", "x").await,
        400,
        "invalid_path",
    );
    assert_api_err(
        admin.download(&id, "/no/such/file").await,
        404,
        "file_not_found",
    );
    assert_api_err(admin.download(&id, "/tmp").await, 400, "is_directory");
    let over = admin
        .request(
            Method::PUT,
            &format!("/v1/sandboxes/{id}/files?path=/tmp/over.bin"),
        )
        .header("content-length", (100 * 1024 * 1024 + 1).to_string())
        .body(vec![0u8; 16])
        .send()
        .await;
    // The server refuses on the declared length without reading the body; the client may
    // see the 400 or a reset while sending.
    if let Ok(r) = over {
        assert_eq!(r.status(), 400);
    }
    // A streamed body without a declared length is cut off at the limit.
    let endless = futures::stream::iter(
        std::iter::repeat_n(vec![7u8; 1024 * 1024], 101).map(Ok::<_, std::io::Error>),
    );
    assert_api_err(
        admin
            .upload(&id, "/tmp/over.bin", reqwest::Body::wrap_stream(endless))
            .await,
        400,
        "file_too_large",
    );
    let out = sh(&admin, &id, "ls -a /tmp").await;
    assert!(
        !out.stdout.contains("over.bin"),
        "no partial file: {}",
        out.stdout
    );

    // ---- symlinks resolve inside the sandbox, never on the host ----
    let host_secret =
        std::env::temp_dir().join(format!("sandpit-host-secret-{}", std::process::id()));
    std::fs::write(&host_secret, "host only").unwrap();
    let target = format!("/../../../../..{}", host_secret.display());
    sh(
        &admin,
        &id,
        &format!("ln -s {target} /tmp/escape; ln -s /../../../etc/passwd /tmp/passwd-link"),
    )
    .await;
    assert_api_err(
        admin.download(&id, "/tmp/escape").await,
        404,
        "file_not_found",
    );
    let passwd = admin
        .download(&id, "/tmp/passwd-link")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        passwd.starts_with("root:x:0:0:root:/root:/bin/sh"),
        "the sandbox's own passwd: {passwd}"
    );
    admin
        .upload(&id, "/tmp/escape", "overwritten")
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&host_secret).unwrap(), "host only");
    let _ = std::fs::remove_file(&host_secret);

    // ---- keepalive ----
    let before = admin.get_sandbox(&id).await.unwrap().expires_at.unwrap();
    let after = admin
        .keepalive(&id, "2h")
        .await
        .unwrap()
        .expires_at
        .unwrap();
    assert!(after > before, "{after} > {before}");
    assert_api_err(admin.keepalive(&id, "48h").await, 400, "invalid_timeout");

    // ---- the CLI, against the same server ----
    let cli = |args: &[&str]| {
        std::process::Command::new(crate::bin())
            .args(args)
            .env("SANDPIT_URL", &srv.url)
            .env("SANDPIT_TOKEN", &srv.token)
            .output()
            .unwrap()
    };
    let out = cli(&["sandbox", "exec", &id, "echo", "from-cli;", "exit", "4"]);
    assert_eq!(out.status.code(), Some(4), "exit code propagates");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-cli\n");
    let local = std::env::temp_dir().join(format!("sandpit-cli-{}", std::process::id()));
    std::fs::write(&local, "cli upload").unwrap();
    assert!(
        cli(&[
            "sandbox",
            "upload",
            &id,
            local.to_str().unwrap(),
            "/tmp/cli.txt"
        ])
        .status
        .success()
    );
    let out = cli(&["sandbox", "download", &id, "/tmp/cli.txt", "-"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "cli upload");
    let _ = std::fs::remove_file(&local);

    // ---- token revocation and update ----
    admin
        .update_token(
            &ws_b.id,
            &tok_b.token_id,
            &TokenUpdateRequest {
                scopes: Some(vec!["sandbox_read".into()]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_api_err(b.create_sandbox(&base()).await, 403, "missing_scope");
    admin.revoke_token(&ws_b.id, &tok_b.token_id).await.unwrap();
    assert_api_err(b.list_sandboxes(None).await, 401, "unauthorized");

    // ---- destroy: 204, idempotent, then 409 for work ----
    admin.destroy_sandbox(&id).await.unwrap();
    admin.destroy_sandbox(&id).await.unwrap();
    assert_eq!(
        admin.get_sandbox(&id).await.unwrap().status,
        SandboxStatus::Destroyed
    );
    assert_api_err(
        admin
            .exec(
                &id,
                &ExecRequest {
                    command: Some("true".into()),
                    ..Default::default()
                },
            )
            .await,
        409,
        "sandbox_not_running",
    );
    assert_api_err(
        admin.upload(&id, "/tmp/x", "x").await,
        409,
        "sandbox_not_running",
    );
    assert_api_err(
        admin.download(&id, "/tmp/x").await,
        409,
        "sandbox_not_running",
    );
    assert_api_err(admin.keepalive(&id, "1m").await, 409, "invalid_state");
    assert_api_err(admin.wake(&id).await, 409, "invalid_state");
    assert!(admin.list_sandboxes(None).await.unwrap().is_empty());
    assert_eq!(
        admin.list_sandboxes(Some("destroyed")).await.unwrap().len(),
        1
    );
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "destroy removes every trace: {leaks:?}");
}

#[tokio::test]
async fn ephemeral_sandbox_is_destroyed_when_its_timeout_passes() {
    let srv = server().await;
    let client = srv.client();
    let created = client
        .create_sandbox_timed(&CreateSandboxRequest {
            timeout: Some("2s".into()),
            ..base()
        })
        .await
        .unwrap();
    // The answer says where the time went (Server-Timing): runsc itself and the wait for
    // the agent among the phases, the wall time last.
    let phases: Vec<&str> = created
        .server_timing
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    for phase in [
        "slot", "netns", "disk", "bundle", "runsc", "agent", "resolv", "store",
    ] {
        assert!(phases.contains(&phase), "{phase} in {phases:?}");
    }
    assert_eq!(phases.last(), Some(&"total"), "{phases:?}");
    let sb = created.value;
    sandpit_test_support::wait_until(
        Duration::from_secs(30),
        "the reaper destroys it",
        || async {
            (client.get_sandbox(&sb.id).await.ok()?.status == SandboxStatus::Destroyed)
                .then_some(())
        },
    )
    .await
    .unwrap();
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// The base template's `wget -T SEC`. bookworm's busybox-static is built without it and
/// segfaults on it, so scripts/install-deps fetches trixie's for the base template: a served
/// file comes back, and a server that accepts but never answers is given up on after SEC.
#[tokio::test]
async fn base_template_wget_takes_a_timeout() {
    let srv = server().await;
    let client = srv.client();
    let sb = create(&client, base()).await;
    let out = sh(
        &client,
        &sb.id,
        "mkdir -p /tmp/www && echo hello >/tmp/www/index.html && httpd -p 127.0.0.1:8080 -h /tmp/www \
         && (sleep 60 | nc -l -p 8081 >/dev/null 2>&1 &) && sleep 1; \
         wget -T 5 -qO- http://127.0.0.1:8080/index.html; echo served=$?; \
         s=$(date +%s); wget -T 2 -qO- http://127.0.0.1:8081/; echo silent=$? took=$(($(date +%s) - s))",
    )
    .await;
    assert!(out.stdout.contains("hello\nserved=0\n"), "{out:?}");
    let silent = out.stdout.split("silent=").nth(1).expect("second wget ran");
    let (code, took) = silent.trim().split_once(" took=").expect("status and time");
    assert_eq!(
        code, "1",
        "wget -T on a silent server fails, not crashes: {out:?}"
    );
    let took: u64 = took.parse().unwrap();
    assert!((2..=5).contains(&took), "gave up after {took} s: {out:?}");
    client.destroy_sandbox(&sb.id).await.unwrap();
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}
