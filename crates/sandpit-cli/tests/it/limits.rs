//! Rate limits and quotas under concurrency: never over-admitted, 429 with `Retry-After`, a
//! code and the CodeSandbox SDK's headers; workspaces do not share allowances.

use reqwest::{Method, StatusCode};
use sandpit_sdk::Client;
use sandpit_sdk::types::TokenCreateRequest;
use sandpit_test_support::TestServer;

use crate::{base, bin};

/// A response's status, error code and headers.
async fn send(rb: reqwest::RequestBuilder) -> (StatusCode, String, reqwest::header::HeaderMap) {
    let resp = rb.send().await.expect("request is sent");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    let code = body["error"]["code"].as_str().unwrap_or("").to_string();
    (status, code, headers)
}

fn num(h: &reqwest::header::HeaderMap, name: &str) -> i64 {
    h.get(name)
        .unwrap_or_else(|| panic!("header {name} missing in {h:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("header {name} is not a number: {h:?}"))
}

#[tokio::test]
async fn quotas_and_rates_are_never_over_admitted() {
    let srv = TestServer::start_with(
        bin(),
        &[
            ("SANDPIT_MAX_RUNNING", "3"),
            ("SANDPIT_RATE_LIMIT_SANDBOXES", "6"),
            ("SANDPIT_RATE_LIMIT_REQUESTS", "40"),
            ("SANDPIT_RATE_LIMIT_AUTH_FAILURES", "12"),
        ],
    )
    .await
    .expect("server starts");
    let admin = srv.client();

    // Running quota: six concurrent creates against a quota of three.
    let attempts = futures::future::join_all(
        (0..6).map(|_| send(admin.request(Method::POST, "/v1/sandboxes").json(&base()))),
    )
    .await;
    let created = attempts
        .iter()
        .filter(|(s, _, _)| *s == StatusCode::CREATED)
        .count();
    assert_eq!(created, 3, "{attempts:?}");
    for (status, code, h) in attempts.iter().filter(|a| a.0 != StatusCode::CREATED) {
        assert_eq!(
            (*status, code.as_str()),
            (StatusCode::TOO_MANY_REQUESTS, "running_quota_exceeded")
        );
        assert!(num(h, "retry-after") >= 1);
        assert_eq!(num(h, "x-csb-vms-remaining"), 0);
        assert_eq!(num(h, "x-csb-vms-used"), 3);
    }
    let running = admin.list_sandboxes(Some("running")).await.unwrap();
    assert_eq!(running.len(), 3);
    // Refused creates changed nothing: no row, no sandbox.
    assert_eq!(admin.list_sandboxes(None).await.unwrap().len(), 3);

    // A fork needs room for all its children.
    let (status, code, _) = send(
        admin
            .request(
                Method::POST,
                &format!("/v1/sandboxes/{}/fork", running[0].id),
            )
            .json(&serde_json::json!({"count": 1})),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "running_quota_exceeded")
    );

    // Hibernating one makes room (suspended ones do not count).
    admin.hibernate(&running[1].id).await.unwrap();
    let (status, _, h) = send(admin.request(Method::POST, "/v1/sandboxes").json(&base())).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(num(&h, "x-csb-vms-used"), 3);
    assert_eq!(num(&h, "x-csb-vms-remaining"), 0);
    // Four of six hourly creations spent.
    assert_eq!(num(&h, "x-csb-sandbox-hourly-used"), 4);
    assert_eq!(num(&h, "x-csb-sandbox-hourly-remaining"), 2);
    assert!(h.contains_key("x-csb-sandbox-hourly-reset"));

    // Waking counts like creating: with three running, neither a wake nor a call that would
    // wake the sandbox gets through, and the sandbox stays suspended.
    let wake_path = format!("/v1/sandboxes/{}/wake", running[1].id);
    let (status, code, h) = send(admin.request(Method::POST, &wake_path)).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "running_quota_exceeded")
    );
    assert!(num(&h, "retry-after") >= 1);
    let e = admin
        .exec(
            &running[1].id,
            &sandpit_sdk::types::ExecRequest {
                command: Some("true".into()),
                ..Default::default()
            },
        )
        .await
        .expect_err("an exec that would wake the sandbox is refused");
    assert_eq!(e.code(), Some("running_quota_exceeded"), "{e:?}");
    let sb = admin.get_sandbox(&running[1].id).await.unwrap();
    assert_eq!(sb.status.as_str(), "suspended");
    assert_eq!(
        admin.list_sandboxes(Some("running")).await.unwrap().len(),
        3
    );
    // Destroying one makes room for the wake.
    admin.destroy_sandbox(&running[0].id).await.unwrap();
    let woken = admin.wake(&running[1].id).await.unwrap();
    assert_eq!(woken.status.as_str(), "running");
    assert_eq!(
        admin.list_sandboxes(Some("running")).await.unwrap().len(),
        3
    );

    // Creation rate: two more fit, the third is refused with a wait of about one refill
    // (3600 s / 6 = 10 min). Make room first so only the rate can refuse.
    for s in admin.list_sandboxes(Some("running")).await.unwrap() {
        admin.destroy_sandbox(&s.id).await.unwrap();
    }
    let attempts = futures::future::join_all(
        (0..3).map(|_| send(admin.request(Method::POST, "/v1/sandboxes").json(&base()))),
    )
    .await;
    let refused: Vec<_> = attempts
        .iter()
        .filter(|a| a.0 != StatusCode::CREATED)
        .collect();
    assert_eq!(refused.len(), 1, "{attempts:?}");
    let (status, code, h) = refused[0];
    assert_eq!(
        (*status, code.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "sandbox_rate_limited")
    );
    assert!((60..=601).contains(&num(h, "retry-after")), "{h:?}");
    assert_eq!(num(h, "x-csb-sandbox-hourly-remaining"), 0);

    // Request rate, in a workspace of its own: 40 per hour, fired 50 at once.
    let ws = admin.create_workspace("flood").await.unwrap();
    let token = admin
        .create_token(&ws.id, &TokenCreateRequest::default())
        .await
        .unwrap()
        .token
        .unwrap();
    let flood = Client::new(&srv.url, &token);
    let attempts = futures::future::join_all(
        (0..50).map(|_| send(flood.request(Method::GET, "/v1/sandboxes"))),
    )
    .await;
    let ok: Vec<_> = attempts.iter().filter(|a| a.0 == StatusCode::OK).collect();
    assert_eq!(ok.len(), 40, "{attempts:?}");
    let mut remaining: Vec<i64> = ok
        .iter()
        .map(|a| num(&a.2, "x-csb-rate-hourly-remaining"))
        .collect();
    remaining.sort();
    assert_eq!(remaining, (0..40).collect::<Vec<_>>());
    for (status, code, h) in attempts.iter().filter(|a| a.0 != StatusCode::OK) {
        assert_eq!(
            (*status, code.as_str()),
            (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
        );
        assert!((60..=91).contains(&num(h, "retry-after")), "{h:?}");
        assert_eq!(num(h, "x-csb-rate-hourly-remaining"), 0);
        assert_eq!(num(h, "x-csb-rate-hourly-used"), 40);
    }
    // Other workspaces are unaffected; requests without a valid token get 401, not 429.
    let (status, _, h) = send(admin.request(Method::GET, "/v1/sandboxes")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(num(&h, "x-csb-rate-hourly-remaining") > 0);
    let (status, code, _) =
        send(Client::new(&srv.url, "sp_wrong").request(Method::GET, "/v1/sandboxes")).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    // Guessing tokens: twelve bad-token requests per address per hour get their 401 (one
    // was spent just above), the rest 429 `auth_rate_limited`; valid tokens from the same
    // address are not held back, and requests with no token (public routes) never count.
    let guesses = futures::future::join_all((0..20).map(|i| {
        send(Client::new(&srv.url, &format!("sp_guess_{i}")).request(Method::GET, "/v1/sandboxes"))
    }))
    .await;
    let unauthorized = guesses
        .iter()
        .filter(|g| g.0 == StatusCode::UNAUTHORIZED)
        .count();
    assert_eq!(unauthorized, 11, "{guesses:?}");
    for (status, code, h) in guesses.iter().filter(|g| g.0 != StatusCode::UNAUTHORIZED) {
        assert_eq!(
            (*status, code.as_str()),
            (StatusCode::TOO_MANY_REQUESTS, "auth_rate_limited")
        );
        assert!((60..=301).contains(&num(h, "retry-after")), "{h:?}");
    }
    let (status, _, _) = send(admin.request(Method::GET, "/v1/sandboxes")).await;
    assert_eq!(status, StatusCode::OK);
    let health = reqwest::get(format!("{}/healthz", srv.url)).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    // The host's free-space reserve: with one larger than any disk, creates, forks and
    // snapshots answer 507 `host_disk_full` and change nothing; running sandboxes go on.
    let mut srv = srv;
    srv.set_env("SANDPIT_MIN_FREE_DISK", "1000000T");
    srv.restart().await.unwrap();
    let admin = srv.client();
    let rows_before = admin.list_sandboxes(None).await.unwrap().len();
    let running = admin.list_sandboxes(Some("running")).await.unwrap();
    let (status, code, _) = send(admin.request(Method::POST, "/v1/sandboxes").json(&base())).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::INSUFFICIENT_STORAGE, "host_disk_full")
    );
    for path in ["fork", "snapshots"] {
        let (status, code, _) = send(
            admin
                .request(
                    Method::POST,
                    &format!("/v1/sandboxes/{}/{path}", running[0].id),
                )
                .json(&serde_json::json!({"count": 1})),
        )
        .await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::INSUFFICIENT_STORAGE, "host_disk_full"),
            "{path}"
        );
    }
    assert_eq!(admin.list_sandboxes(None).await.unwrap().len(), rows_before);
    let out = crate::sh(&admin, &running[0].id, "echo still here").await;
    assert_eq!(out.stdout, "still here\n");

    for s in admin.list_sandboxes(None).await.unwrap() {
        admin.destroy_sandbox(&s.id).await.unwrap();
    }
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}
