//! Metrics: `GET /metrics` on the metrics listener, after real lifecycle operations, shows
//! what happened (requests by route, each operation timed by outcome, sandboxes by status
//! and workspace, host headroom); the API listener does not serve it.

use sandpit_sdk::types::{CreateSandboxRequest, SandboxMode};

use crate::{create, server, sh};

/// The value of the first sample line that starts with `prefix` (a name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_show_requests_operations_and_sandboxes() {
    let srv = server().await;
    let client = srv.client();
    let sb = create(
        &client,
        CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            idle_timeout: Some("1h".into()),
            ..Default::default()
        },
    )
    .await;
    sh(&client, &sb.id, "echo hi").await;
    client.hibernate(&sb.id).await.expect("hibernates");
    client.wake(&sb.id).await.expect("wakes");
    let forked = client.fork(&sb.id, 1).await.expect("forks");
    assert_eq!(forked.len(), 1);
    // A request that fails counts too, under its status.
    assert!(client.get_sandbox("sb0000000000000000").await.is_err());

    let http = reqwest::Client::new();
    let resp = http
        .get(format!("{}/metrics", srv.metrics_url))
        .send()
        .await
        .expect("scraped");
    assert!(resp.status().is_success());
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
    );
    let text = resp.text().await.unwrap();
    let has = |prefix: &str| {
        sample(&text, prefix).unwrap_or_else(|| panic!("no sample {prefix}:\n{text}"))
    };
    assert_eq!(
        has(r#"sandpit_http_requests_total{route="/v1/sandboxes",method="POST",status="201"}"#),
        1.0
    );
    assert!(
        has(r#"sandpit_http_requests_total{route="/v1/sandboxes/{id}",method="GET",status="404"}"#)
            >= 1.0
    );
    assert!(
        has(
            r#"sandpit_http_request_duration_seconds_count{route="/v1/sandboxes/{id}/exec",method="POST"}"#
        ) >= 1.0
    );
    for op in [
        r#"op="create",path="cold",outcome="ok""#,
        r#"op="exec",path="",outcome="ok""#,
        r#"op="hibernate",path="",outcome="ok""#,
        r#"op="wake",path="",outcome="ok""#,
        r#"op="fork",path="",outcome="ok""#,
    ] {
        assert!(
            has(&format!("sandpit_lifecycle_duration_seconds_count{{{op}}}")) >= 1.0,
            "{op}"
        );
        assert!(has(&format!("sandpit_lifecycle_duration_seconds_sum{{{op}}}")) > 0.0);
    }
    // Both sandboxes run, in the test token's workspace (the only one running any).
    let running: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(r#"sandpit_sandboxes{status="running","#))
        .collect();
    assert_eq!(running.len(), 1, "{text}");
    let (labels, n) = running[0].rsplit_once(' ').unwrap();
    assert_eq!(n, "2", "{text}");
    assert!(has("sandpit_disk_free_bytes") > 0.0);
    assert!(has("sandpit_memory_available_bytes") > 0.0);
    assert!(text.trim_end().ends_with("# EOF"), "{text}");

    // A destroy is seen at the next scrape; the API listener has no /metrics; the metrics
    // listener serves nothing else.
    client.destroy_sandbox(&sb.id).await.unwrap();
    let text = http
        .get(format!("{}/metrics", srv.metrics_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(sample(&text, labels), Some(1.0), "{text}");
    let api = http
        .get(format!("{}/metrics", srv.url))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 404);
    let other = http
        .get(format!("{}/v1/sandboxes", srv.metrics_url))
        .header("Authorization", format!("Bearer {}", srv.token))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
}
