//! Ports and previews end to end: listening-port detection through the agent, waiting for a
//! port, and the preview reverse proxy on the server's own listener (Host-header routing,
//! private previews with preview tokens, WebSocket upgrades, waking a hibernated sandbox).
//!
//! All traffic stays on loopback (the server) and the test's own sandbox.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use sandpit_sdk::Client;
use sandpit_sdk::types::{
    CreateSandboxRequest, Port, PreviewPrivacy, PreviewSettings, PreviewTokenCreateRequest,
    PreviewTokenUpdateRequest, SandboxMode, SandboxStatus, UpdateSandboxRequest,
};
use sandpit_test_support::{TestServer, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{assert_api_err, bin, create, server, sh};

/// The server's address (every preview host resolves to it).
pub(crate) fn server_addr(srv: &TestServer) -> SocketAddr {
    srv.url
        .strip_prefix("http://")
        .unwrap()
        .parse()
        .expect("server address")
}

pub(crate) fn preview_host(id: &str, port: u16) -> String {
    format!("{id}-{port}.localhost")
}

/// `http://<id>-<port>.localhost:<server port><path>`.
pub(crate) fn preview_url(srv: &TestServer, id: &str, port: u16, path: &str) -> String {
    format!(
        "http://{}:{}{path}",
        preview_host(id, port),
        server_addr(srv).port()
    )
}

/// A client that resolves the preview hosts of `id` to the server and does not follow
/// redirects.
pub(crate) fn preview_client(srv: &TestServer, id: &str, ports: &[u16]) -> reqwest::Client {
    let mut b = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
    for p in ports {
        b = b.resolve(&preview_host(id, *p), server_addr(srv));
    }
    b.build().unwrap()
}

/// Status and the `error.code` of a JSON error body (or the body itself).
pub(crate) async fn status_code(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let code = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or(text);
    (status, code)
}

fn port(port: u16, address: &str) -> Port {
    Port {
        port,
        address: address.into(),
    }
}

/// Start `busybox httpd` in the background serving `dir` on `listen` (`[ip:]port`).
pub(crate) async fn httpd(client: &Client, id: &str, listen: &str, dir: &str) {
    let out = sh(client, id, &format!("httpd -p {listen} -h {dir}")).await;
    assert_eq!(out.exit_code, 0, "{out:?}");
}

/// Ports: listing, waiting, errors, the CLI.
async fn check_ports(srv: &sandpit_test_support::TestServer, client: &Client, id: &str) {
    assert_eq!(
        client.list_ports(id).await.unwrap(),
        vec![],
        "the agent's port is hidden"
    );
    let started = Instant::now();
    assert_api_err(
        client.wait_port(id, 8080, Some("1s")).await,
        504,
        "port_wait_timeout",
    );
    assert!(started.elapsed() >= Duration::from_secs(1));

    // A wait started before the server answers as soon as the port opens.
    let waiting = {
        let client = client.clone();
        let id = id.to_string();
        tokio::spawn(async move { client.wait_port(&id, 8080, Some("30s")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    httpd(client, id, "8080", "/www").await;
    let opened = Instant::now();
    let ports = waiting.await.unwrap().unwrap();
    assert!(opened.elapsed() < Duration::from_secs(2));
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0].port, 8080);
    assert!(
        ports[0].address == "::" || ports[0].address == "0.0.0.0",
        "{ports:?}"
    );

    httpd(client, id, "127.0.0.1:8081", "/www").await;
    let listed = client.wait_port(id, 8081, Some("10s")).await.unwrap();
    assert_eq!(listed, vec![port(8081, "127.0.0.1")]);
    let all = client.list_ports(id).await.unwrap();
    assert_eq!(
        all.iter().map(|p| p.port).collect::<Vec<_>>(),
        vec![8080, 8081]
    );

    for bad in ["0", "65536", "49983", "http"] {
        let r = client
            .request(
                reqwest::Method::GET,
                &format!("/v1/sandboxes/{id}/ports/{bad}/wait"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "port {bad}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_port");
    }
    assert_api_err(
        client.wait_port(id, 8080, Some("10m")).await,
        400,
        "invalid_timeout",
    );
    assert_api_err(
        client.list_ports("sb0000000000000000").await,
        404,
        "sandbox_not_found",
    );

    let out = std::process::Command::new(bin())
        .args(["sandbox", "ports", id])
        .env("SANDPIT_URL", &srv.url)
        .env("SANDPIT_TOKEN", &srv.token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let shown: Vec<Port> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown, all);
    let out = std::process::Command::new(bin())
        .args(["sandbox", "ports", id, "--wait", "9999", "--timeout", "1s"])
        .env("SANDPIT_URL", &srv.url)
        .env("SANDPIT_TOKEN", &srv.token)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// A CGI script printing its environment (request headers arrive as `HTTP_*`).
const CGI_ENV: &str = "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\nenv\n";
/// A CGI script echoing the request body.
const CGI_ECHO: &str =
    "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\nhead -c \"$CONTENT_LENGTH\"\n";
/// A minimal upgrade server for `nc -ll -e`: reads the request head, answers 101, then
/// echoes every byte.
pub(crate) const WS_ECHO: &str = "#!/bin/sh\nwhile read -r line; do\n  case \"$line\" in \"\"|\"$(printf '\\r')\") break ;; esac\ndone\nprintf 'HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n\\r\\n'\nexec cat\n";

/// Read from `s` until `needle` has arrived (or fail after 10 s). Returns what was read.
pub(crate) async fn read_until(s: &mut tokio::net::TcpStream, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&got).contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!(
                "waiting for {needle:?}: {other:?}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Previews: privacy, tokens (query, header, cookie; revoked, expired), errors, the request
/// reaching the sandbox without the token, WebSocket upgrades, suspend cutting them, and a
/// preview request waking a hibernated sandbox.
async fn check_previews(srv: &TestServer, client: &Client, id: &str) {
    for (path, text) in [
        ("/www/cgi-bin/env", CGI_ENV),
        ("/www/cgi-bin/echo", CGI_ECHO),
        ("/ws.sh", WS_ECHO),
    ] {
        client.upload(id, path, text).await.unwrap();
    }
    sh(
        client,
        id,
        "chmod +x /www/cgi-bin/* /ws.sh && (nc -ll -p 9000 -e /ws.sh >/dev/null 2>&1 &)",
    )
    .await;
    client.wait_port(id, 9000, Some("10s")).await.unwrap();
    let http = preview_client(srv, id, &[8080, 8081, 9000, 9999, 49983]);
    let url = |port: u16, path: &str| preview_url(srv, id, port, path);
    let hello = "hello from the sandbox\n";

    // ---- private by default: no token, no preview ----
    assert_eq!(
        client.get_sandbox(id).await.unwrap().preview.privacy,
        PreviewPrivacy::Private
    );
    let r = http.get(url(8080, "/")).send().await.unwrap();
    assert_eq!(status_code(r).await, (401, "preview_token_required".into()));
    let r = http
        .get(url(8080, "/"))
        .header("accept", "text/html,*/*")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("this preview is private"));

    // ---- a token: header, query (redirect + cookie), cookie ----
    let created = client
        .create_preview_token(id, &Default::default())
        .await
        .unwrap();
    let token = created.token.clone().expect("the token is shown once");
    assert!(token.starts_with("spp_") && token.starts_with(&created.token_prefix));
    assert_eq!(created.expires_at, None);
    let listed = client.list_preview_tokens(id).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].token, None, "no secret in listings");
    let r = http
        .get(url(8080, "/"))
        .header("csb-preview-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), hello);
    let r = http
        .get(url(
            8080,
            &format!("/index.html?a=1&preview_token={token}&b=2"),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(r.headers()[LOCATION], "/index.html?a=1&b=2");
    let cookie = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    assert!(
        cookie.starts_with(&format!("csb_preview_token={token};")) && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let r = http
        .get(url(8080, "/index.html?a=1&b=2"))
        .header(COOKIE, format!("theme=dark; csb_preview_token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), hello);

    // What the sandbox's server sees: no token anywhere, its other cookies, forwarding headers.
    let r = http
        .get(url(8080, "/cgi-bin/env?q=1"))
        .header("csb-preview-token", &token)
        .header(COOKIE, format!("theme=dark; csb_preview_token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let env = r.text().await.unwrap();
    assert!(
        !env.contains("spp_"),
        "the token reached the sandbox: {env}"
    );
    for want in [
        "QUERY_STRING=q=1".to_string(),
        "HTTP_COOKIE=theme=dark".to_string(),
        "HTTP_X_FORWARDED_FOR=127.0.0.1".to_string(),
        format!("HTTP_HOST={}", url(8080, "").trim_start_matches("http://")),
    ] {
        assert!(env.lines().any(|l| l == want), "{want} not in {env}");
    }
    let body = "x".repeat(100_000);
    let r = http
        .post(url(8080, "/cgi-bin/echo"))
        .header("csb-preview-token", &token)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), body, "request bodies pass through");

    // ---- errors ----
    let with = |port: u16, t: &str| {
        http.get(url(port, "/"))
            .header("csb-preview-token", t.to_string())
            .send()
    };
    assert_eq!(
        status_code(with(8080, "spp_bogus").await.unwrap()).await,
        (401, "preview_token_invalid".into())
    );
    assert_eq!(
        status_code(with(9999, &token).await.unwrap()).await,
        (502, "port_not_open".into())
    );
    assert_eq!(
        status_code(with(8081, &token).await.unwrap()).await,
        (502, "port_not_open".into()),
        "a loopback-only server is not reachable"
    );
    assert_eq!(
        status_code(with(49983, &token).await.unwrap()).await,
        (404, "preview_not_found".into()),
        "the agent is never exposed"
    );
    let other = preview_client(srv, "sb0000000000000000", &[8080]);
    let r = other
        .get(preview_url(srv, "sb0000000000000000", 8080, "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(status_code(r).await, (404, "preview_not_found".into()));
    // The API itself is untouched on its own host name.
    let r = reqwest::get(format!("{}/healthz", srv.url)).await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");

    // ---- revoked and expired tokens ----
    client
        .revoke_preview_token(id, &created.token_id)
        .await
        .unwrap();
    assert_eq!(
        status_code(with(8080, &token).await.unwrap()).await,
        (401, "preview_token_revoked".into())
    );
    assert!(client.list_preview_tokens(id).await.unwrap().is_empty());
    assert_api_err(
        client.revoke_preview_token(id, &created.token_id).await,
        404,
        "preview_token_not_found",
    );
    let soon = time_in(Duration::from_secs(2));
    let short = client
        .create_preview_token(
            id,
            &PreviewTokenCreateRequest {
                expires_at: Some(soon),
            },
        )
        .await
        .unwrap();
    let short_token = short.token.clone().unwrap();
    assert_eq!(with(8080, &short_token).await.unwrap().status(), 200);
    wait_until(Duration::from_secs(10), "the token expires", || async {
        let r = with(8080, &short_token).await.unwrap();
        (status_code(r).await == (401, "preview_token_expired".into())).then_some(())
    })
    .await
    .unwrap();
    // Extending the expiry (or removing it) makes a token valid again.
    let patched = client
        .update_preview_token(
            id,
            &short.token_id,
            &PreviewTokenUpdateRequest {
                expires_at: Some(None),
            },
        )
        .await
        .unwrap();
    assert_eq!(patched.expires_at, None);
    assert_eq!(with(8080, &short_token).await.unwrap().status(), 200);
    assert_api_err(
        client
            .create_preview_token(
                id,
                &PreviewTokenCreateRequest {
                    expires_at: Some("yesterday".into()),
                },
            )
            .await,
        400,
        "invalid_expires_at",
    );

    // ---- public previews need no token ----
    let public = UpdateSandboxRequest {
        preview: Some(PreviewSettings {
            privacy: PreviewPrivacy::Public,
        }),
        ..Default::default()
    };
    assert_eq!(
        client
            .update_sandbox(id, &public)
            .await
            .unwrap()
            .preview
            .privacy,
        PreviewPrivacy::Public
    );
    let r = http.get(url(8080, "/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), hello);
    client
        .update_sandbox(id, &UpdateSandboxRequest::default())
        .await
        .unwrap();
    assert_eq!(
        client.get_sandbox(id).await.unwrap().preview.privacy,
        PreviewPrivacy::Public,
        "an empty PATCH changes nothing"
    );
    let private = UpdateSandboxRequest {
        preview: Some(PreviewSettings::default()),
        ..Default::default()
    };
    client.update_sandbox(id, &private).await.unwrap();
    assert_eq!(http.get(url(8080, "/")).send().await.unwrap().status(), 401);

    // ---- the CLI ----
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .arg("sandbox")
            .args(args)
            .env("SANDPIT_URL", &srv.url)
            .env("SANDPIT_TOKEN", &srv.token)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    assert_eq!(cli(&["preview", id])["privacy"], "private");
    let made = cli(&["preview-token", "create", id]);
    let cli_token = made["token"].as_str().unwrap().to_string();
    assert_eq!(with(8080, &cli_token).await.unwrap().status(), 200);
    assert_eq!(
        cli(&["preview-token", "list", id])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    cli(&[
        "preview-token",
        "revoke",
        id,
        made["token_id"].as_str().unwrap(),
    ]);
    assert_eq!(with(8080, &cli_token).await.unwrap().status(), 401);
    assert_eq!(
        cli(&["preview", id, "--privacy", "public"])["privacy"],
        "public"
    );
    assert_eq!(http.get(url(8080, "/")).send().await.unwrap().status(), 200);
    cli(&["preview", id, "--privacy", "private"]);

    // ---- WebSocket: the upgrade passes through, bytes flow both ways ----
    let mut ws = tokio::net::TcpStream::connect(server_addr(srv))
        .await
        .unwrap();
    ws.write_all(
        format!(
            "GET /chat HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             csb-preview-token: {short_token}\r\n\r\n",
            url(9000, "").trim_start_matches("http://")
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_until(&mut ws, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    for i in 0..3 {
        let line = format!("ping-{i}\n");
        ws.write_all(line.as_bytes()).await.unwrap();
        read_until(&mut ws, &line).await;
    }

    // ---- hibernate cuts the open connection (else the checkpoint would fail) ----
    let suspended = client.hibernate(id).await.unwrap();
    assert_eq!(suspended.status, SandboxStatus::Suspended);
    assert_eq!(suspended.error, None, "the memory snapshot was taken");
    assert!(
        srv.data_dir
            .join("checkpoints")
            .join(id)
            .join("checkpoint.img")
            .exists()
    );
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), ws.read(&mut buf))
        .await
        .expect("the WebSocket was closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");

    // ---- a preview request wakes the sandbox; its server kept running in memory ----
    let woke = Instant::now();
    let r = with(8080, &short_token).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), hello);
    eprintln!("preview request waking the sandbox: {:?}", woke.elapsed());
    assert_eq!(
        client.get_sandbox(id).await.unwrap().status,
        SandboxStatus::Running
    );
}

/// RFC 3339 of now + `d`.
fn time_in(d: Duration) -> String {
    use sandpit_server::util::{now_ms, rfc3339};
    rfc3339(now_ms() + d.as_millis() as i64)
}

#[tokio::test]
async fn ports_and_previews_end_to_end() {
    let srv = server().await;
    let client = srv.client();
    let sb = create(
        &client,
        CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            idle_timeout: Some("10m".into()),
            ..Default::default()
        },
    )
    .await;
    let id = sb.id;
    sh(
        &client,
        &id,
        "mkdir -p /www && echo 'hello from the sandbox' > /www/index.html",
    )
    .await;

    check_ports(&srv, &client, &id).await;
    check_previews(&srv, &client, &id).await;

    // Privacy chosen at create; preview traffic is activity: it keeps a persistent sandbox
    // from being suspended for idleness.
    let public = create(
        &client,
        CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            idle_timeout: Some("2s".into()),
            preview: Some(PreviewSettings {
                privacy: PreviewPrivacy::Public,
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(public.preview.privacy, PreviewPrivacy::Public);
    sh(
        &client,
        &public.id,
        "mkdir -p /www && echo hi > /www/index.html",
    )
    .await;
    httpd(&client, &public.id, "8080", "/www").await;
    client
        .wait_port(&public.id, 8080, Some("10s"))
        .await
        .unwrap();
    let http = preview_client(&srv, &public.id, &[8080]);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let r = http
            .get(preview_url(&srv, &public.id, 8080, "/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            client.get_sandbox(&public.id).await.unwrap().status,
            SandboxStatus::Running,
            "suspended during preview traffic"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_until(Duration::from_secs(10), "idle suspend", || async {
        (client.get_sandbox(&public.id).await.ok()?.status == SandboxStatus::Suspended)
            .then_some(())
    })
    .await
    .unwrap();
    client.destroy_sandbox(&public.id).await.unwrap();

    client.destroy_sandbox(&id).await.unwrap();
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// With `--preview-wake false`, a preview request leaves a hibernated sandbox asleep (503
/// `sandbox_suspended`) until the API wakes it.
#[tokio::test]
async fn previews_need_not_wake_sandboxes() {
    let srv = TestServer::start_with(bin(), &[("SANDPIT_PREVIEW_WAKE", "false")])
        .await
        .unwrap();
    let client = srv.client();
    let sb = create(
        &client,
        CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            preview: Some(PreviewSettings {
                privacy: PreviewPrivacy::Public,
            }),
            ..Default::default()
        },
    )
    .await;
    let id = sb.id;
    sh(
        &client,
        &id,
        "mkdir -p /www && echo awake > /www/index.html",
    )
    .await;
    httpd(&client, &id, "8080", "/www").await;
    client.wait_port(&id, 8080, Some("10s")).await.unwrap();
    let http = preview_client(&srv, &id, &[8080]);
    let get = || http.get(preview_url(&srv, &id, 8080, "/")).send();
    assert_eq!(get().await.unwrap().status(), 200);

    client.hibernate(&id).await.unwrap();
    assert_eq!(
        status_code(get().await.unwrap()).await,
        (503, "sandbox_suspended".to_string())
    );
    assert_eq!(
        client.get_sandbox(&id).await.unwrap().status,
        SandboxStatus::Suspended,
        "the preview request did not wake it"
    );
    client.wake(&id).await.unwrap();
    let r = get().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "awake\n");

    client.destroy_sandbox(&id).await.unwrap();
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}
