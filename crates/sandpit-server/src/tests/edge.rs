//! What the edge adds in front of the node: the running quota answered early (before the
//! creation rate is spent), and the room it held handed back once the store counts a row.

use sandpit_api_types::SandboxMode;

use super::Harness;

#[tokio::test]
async fn the_running_quota_is_answered_early_and_its_room_handed_back() {
    let h = Harness::new(|cfg| cfg.limits.max_running = 2).await;
    let first = h.create(SandboxMode::Ephemeral).await.unwrap();
    let second = h.create(SandboxMode::Ephemeral).await.unwrap();
    let refused = h.create(SandboxMode::Ephemeral).await.unwrap_err();
    assert_eq!(refused.code, "running_quota_exceeded");
    // A fork of two children does not fit either, and makes nothing.
    let sb = h.authorized(h.row(&first.id).await);
    let refused = crate::fork::fork(&h.server, &sb, 1).await.unwrap_err();
    assert_eq!(refused.code, "running_quota_exceeded");
    assert_eq!(h.rt.held().len(), 2);
    // Room comes back with a destroy: nothing stays reserved for the creates that were
    // counted, or for the ones refused.
    crate::lifecycle::destroy(&h.server, &second.id)
        .await
        .unwrap();
    let third = h.create(SandboxMode::Ephemeral).await.unwrap();
    crate::lifecycle::suspend(&h.server, &third.id)
        .await
        .unwrap();
    // A wake counts like a create: room for it now, none once another create took it.
    crate::lifecycle::wake(&h.server, &third.id).await.unwrap();
    crate::lifecycle::suspend(&h.server, &third.id)
        .await
        .unwrap();
    h.create(SandboxMode::Ephemeral).await.unwrap();
    let refused = crate::lifecycle::wake(&h.server, &third.id)
        .await
        .unwrap_err();
    assert_eq!(refused.code, "running_quota_exceeded");
    assert_eq!(
        h.row(&third.id).await.status,
        sandpit_control::Status::Suspended
    );
}

/// The lifecycle routes answer with the server's own timings, phase names and numbers only:
/// create names the control layer's phases (slot, network, agent, resolv.conf, store), the
/// others theirs, each ending with the total.
#[tokio::test]
async fn lifecycle_answers_carry_server_timing() {
    use sandpit_api_types::server_timing;

    let h = Harness::new(|_| {}).await;
    let (addr, serving) = h.serve().await;
    let http = reqwest::Client::new();
    let call = |path: &str, body: Option<&str>| {
        let req = match body {
            Some(b) => http
                .post(format!("http://{addr}{path}"))
                .header("content-type", "application/json")
                .body(b.to_string()),
            None => http.post(format!("http://{addr}{path}")),
        };
        async move {
            let resp = req.bearer_auth(super::TOKEN).send().await.unwrap();
            let status = resp.status().as_u16();
            let timing = resp
                .headers()
                .get(server_timing::HEADER)
                .map(|v| v.to_str().unwrap().to_string());
            let body: serde_json::Value = resp.json().await.unwrap();
            (status, timing, body)
        }
    };
    let names = |timing: Option<String>| -> Vec<String> {
        let header = timing.expect("a Server-Timing header");
        let metrics = server_timing::parse(&header).expect("it parses");
        assert_eq!(
            metrics.last().map(|m| m.0.as_str()),
            Some("total"),
            "{header}"
        );
        metrics.into_iter().map(|(n, _)| n).collect()
    };

    let (status, timing, body) = call(
        "/v1/sandboxes",
        Some(r#"{"template":"base","mode":"persistent"}"#),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let create = names(timing);
    for phase in ["slot", "netns", "agent", "resolv", "store"] {
        assert!(create.iter().any(|n| n == phase), "{phase} in {create:?}");
    }

    let (status, timing, _) = call(&format!("/v1/sandboxes/{id}/hibernate"), None).await;
    assert_eq!(status, 200);
    let hibernate = names(timing);
    assert!(hibernate.iter().any(|n| n == "store"), "{hibernate:?}");

    let (status, timing, _) = call(&format!("/v1/sandboxes/{id}/wake"), None).await;
    assert_eq!(status, 200);
    let wake = names(timing);
    for phase in ["slot", "netns", "agent", "store"] {
        assert!(wake.iter().any(|n| n == phase), "{phase} in {wake:?}");
    }

    let (status, timing, body) =
        call(&format!("/v1/sandboxes/{id}/fork"), Some(r#"{"count":2}"#)).await;
    assert_eq!(status, 201, "{body}");
    let fork = names(timing);
    for phase in ["slot", "copy", "agent", "store"] {
        assert!(fork.iter().any(|n| n == phase), "{phase} in {fork:?}");
    }

    // Other routes carry none.
    let resp = http
        .get(format!("http://{addr}/v1/sandboxes/{id}"))
        .bearer_auth(super::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers().get(server_timing::HEADER).is_none());
    serving.abort();
}
