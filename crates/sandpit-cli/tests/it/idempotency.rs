//! Retried requests: `Idempotency-Key` on create and fork (concurrent duplicates make one
//! sandbox), idempotent destroy in every state and under races, and a destroy that ends a
//! running exec instead of waiting for it.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use sandpit_sdk::types::ExecRequest;

use crate::server;

/// Status, `idempotent-replayed` header and JSON body of a response.
async fn send(rb: reqwest::RequestBuilder) -> (StatusCode, bool, serde_json::Value) {
    let resp = rb.send().await.expect("request is sent");
    let status = resp.status();
    let replayed = resp.headers().contains_key("idempotent-replayed");
    (status, replayed, resp.json().await.unwrap_or_default())
}

#[tokio::test]
async fn idempotency_keys_and_destroy_races() {
    let srv = server().await;
    let client = srv.client();
    let create_with = |key: &str, body: serde_json::Value| {
        client
            .request(Method::POST, "/v1/sandboxes")
            .header("Idempotency-Key", key)
            .json(&body)
    };
    let body = serde_json::json!({"template": "base", "timeout": "10m", "metadata": {"n": "1"}});

    // Four concurrent duplicates: one sandbox, the same answer four times.
    let answers =
        futures::future::join_all((0..4).map(|_| send(create_with("k-1", body.clone())))).await;
    for (status, _, b) in &answers {
        assert_eq!(*status, StatusCode::CREATED, "{b}");
        assert_eq!(b["id"], answers[0].2["id"]);
    }
    assert_eq!(
        answers.iter().filter(|a| a.1).count(),
        3,
        "three were replays"
    );
    let all = client.list_sandboxes(None).await.unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    let id = answers[0].2["id"].as_str().unwrap().to_string();

    // Later repeats replay too; the same key with another body is refused and changes nothing.
    let (status, replayed, b) = send(create_with("k-1", body.clone())).await;
    assert_eq!(
        (status, replayed, b["id"].as_str()),
        (StatusCode::CREATED, true, Some(id.as_str()))
    );
    let other = serde_json::json!({"template": "base", "timeout": "5m"});
    let (status, _, b) = send(create_with("k-1", other.clone())).await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("idempotency_key_reused")
        )
    );
    let (status, _, b) = send(create_with("a b", body.clone())).await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_idempotency_key"))
    );
    // A failed request releases its key: the retry runs (and fails) again, not a replay.
    let missing = serde_json::json!({"template": "no-such-template"});
    for _ in 0..2 {
        let (status, replayed, b) = send(create_with("k-2", missing.clone())).await;
        assert_eq!(
            (status, replayed, b["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, false, Some("template_not_found"))
        );
    }
    // Keys are per workspace: another workspace's same key creates its own sandbox.
    let ws = client.create_workspace("other").await.unwrap();
    let token = client
        .create_token(&ws.id, &Default::default())
        .await
        .unwrap()
        .token
        .unwrap();
    let other_client = srv.client_with(&token);
    let (status, replayed, b) = send(
        other_client
            .request(Method::POST, "/v1/sandboxes")
            .header("Idempotency-Key", "k-1")
            .json(&body),
    )
    .await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    assert_ne!(b["id"].as_str(), Some(id.as_str()));
    other_client
        .destroy_sandbox(b["id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(client.list_sandboxes(None).await.unwrap().len(), 1);

    // Fork: two concurrent duplicates, one child.
    let fork = || {
        send(
            client
                .request(Method::POST, &format!("/v1/sandboxes/{id}/fork"))
                .header("Idempotency-Key", "f-1")
                .json(&serde_json::json!({"count": 1})),
        )
    };
    let (a, b) = tokio::join!(fork(), fork());
    assert_eq!(
        (a.0, b.0),
        (StatusCode::CREATED, StatusCode::CREATED),
        "{a:?} {b:?}"
    );
    assert_eq!(a.2, b.2);
    assert!(a.1 ^ b.1, "exactly one replay");
    let child = a.2["sandboxes"][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("a child: {}", a.2))
        .to_string();
    assert_eq!(client.list_sandboxes(None).await.unwrap().len(), 2);

    // Destroy ends a running exec instead of waiting for it (it used to wait).
    let execing = {
        let client = client.clone();
        let child = child.clone();
        tokio::spawn(async move {
            client
                .exec(
                    &child,
                    &ExecRequest {
                        command: Some("sleep 120".into()),
                        timeout: Some("5m".into()),
                        ..Default::default()
                    },
                )
                .await
        })
    };
    sandpit_test_support::wait_until(Duration::from_secs(20), "the command runs", || async {
        let ps = client
            .exec(
                &child,
                &ExecRequest {
                    command: Some("ps | grep -c '[s]leep 120'".into()),
                    ..Default::default()
                },
            )
            .await
            .ok()?;
        (ps.stdout.trim() == "1").then_some(())
    })
    .await
    .unwrap();
    let started = Instant::now();
    // Concurrent destroys of a running sandbox: all succeed.
    let destroys = futures::future::join_all((0..3).map(|_| client.destroy_sandbox(&child))).await;
    let took = started.elapsed();
    assert!(destroys.iter().all(Result::is_ok), "{destroys:?}");
    assert!(
        took < Duration::from_secs(30),
        "destroy waited {took:?} for the exec"
    );
    let exec = execing.await.unwrap();
    crate::assert_api_err(exec, 409, "sandbox_destroyed");
    // Destroyed: destroy again is fine.
    client.destroy_sandbox(&child).await.unwrap();

    // Suspended, with a destroy racing a wake: ends destroyed, nothing left behind.
    let parent = client.hibernate(&id).await.unwrap();
    assert_eq!(parent.status.as_str(), "suspended");
    let (w, d1, d2) = tokio::join!(
        client.wake(&id),
        client.destroy_sandbox(&id),
        client.destroy_sandbox(&id)
    );
    assert!(d1.is_ok() && d2.is_ok(), "{d1:?} {d2:?}");
    if let Err(e) = w {
        // The wake lost the race: it saw a destroyed sandbox.
        assert_eq!(e.code(), Some("invalid_state"), "{e:?}");
    }
    assert_eq!(
        client.get_sandbox(&id).await.unwrap().status.as_str(),
        "destroyed"
    );
    client.destroy_sandbox(&id).await.unwrap();
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}
