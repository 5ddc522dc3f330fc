//! Ports and previews end to end: listening-port detection through the agent, waiting for a
//! port, and the preview reverse proxy on the server's own listener (Host-header routing,
//! private previews with preview tokens, WebSocket upgrades, waking a hibernated sandbox).
//!
//! All traffic stays on loopback (the server) and the test's own sandbox.

use std::time::{Duration, Instant};

use sandpit_sdk::Client;
use sandpit_sdk::types::{CreateSandboxRequest, Port, SandboxMode};

use crate::{assert_api_err, bin, create, server, sh};

fn port(port: u16, address: &str) -> Port {
    Port {
        port,
        address: address.into(),
    }
}

/// Start `busybox httpd` in the background serving `dir` on `listen` (`[ip:]port`).
async fn httpd(client: &Client, id: &str, listen: &str, dir: &str) {
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

    client.destroy_sandbox(&id).await.unwrap();
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}
