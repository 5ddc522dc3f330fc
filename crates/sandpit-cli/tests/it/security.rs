//! Security properties: the authorization matrix of every `/v1` route, and tokens that never
//! leave their hash (not in the store, the logs, or a sandbox).

use reqwest::{Method, StatusCode};
use sandpit_sdk::types::{TokenCreateRequest, TokenUpdateRequest};

use crate::{base, create, server, sh};

/// Every `/v1` route that names a sandbox, with a body it accepts.
fn sandbox_routes(id: &str) -> Vec<(Method, String, Option<&'static str>)> {
    let p = |rest: &str| format!("/v1/sandboxes/{id}{rest}");
    vec![
        (Method::GET, p(""), None),
        (Method::POST, p("/keepalive"), Some(r#"{"timeout":"5m"}"#)),
        (Method::POST, p("/exec"), Some(r#"{"command":"true"}"#)),
        (
            Method::POST,
            p("/exec/stream"),
            Some(r#"{"command":"true"}"#),
        ),
        (Method::PUT, p("/files?path=/tmp/x"), Some("data")),
        (Method::GET, p("/files?path=/etc/hostname"), None),
        (Method::GET, p("/files/list?path=/"), None),
        (Method::GET, p("/snapshots"), None),
        (Method::POST, p("/wake"), None),
        // Last: these change the sandbox's state when allowed.
        (Method::POST, p("/fork"), Some(r#"{"count":1}"#)),
        (Method::POST, p("/hibernate"), None),
        (Method::POST, p("/shutdown"), None),
        (Method::DELETE, p(""), None),
    ]
}

async fn call(
    url: &str,
    token: Option<&str>,
    method: &Method,
    path: &str,
    body: Option<&str>,
) -> (StatusCode, String) {
    let mut rb = reqwest::Client::new().request(method.clone(), format!("{url}{path}"));
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    if let Some(b) = body {
        rb = rb.body(b.to_string());
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status();
    (status, resp.text().await.unwrap_or_default())
}

#[tokio::test]
async fn authorization_matrix_and_token_hygiene() {
    let srv = server().await;
    let admin = srv.client();
    let sb = create(&admin, base()).await;

    // Tenants and tokens: another workspace with every sandbox scope, a read-only token of
    // the owner's workspace, and a revoked one.
    let me = admin.create_workspace("me").await.unwrap();
    let other_ws = admin.create_workspace("other").await.unwrap();
    let other = admin
        .create_token(&other_ws.id, &TokenCreateRequest::default())
        .await
        .unwrap();
    let other = other.token.unwrap();
    let scopes = |s: &[&str]| TokenCreateRequest {
        scopes: Some(s.iter().map(|x| x.to_string()).collect()),
        ..Default::default()
    };
    // A revoked token (of a third workspace) and one whose scopes were all taken away.
    let revoked = admin
        .create_token(&me.id, &scopes(&["sandbox_read"]))
        .await
        .unwrap();
    admin.revoke_token(&me.id, &revoked.token_id).await.unwrap();
    let revoked = revoked.token.unwrap();
    let narrowed = admin
        .create_token(&other_ws.id, &TokenCreateRequest::default())
        .await
        .unwrap();
    admin
        .update_token(
            &other_ws.id,
            &narrowed.token_id,
            &TokenUpdateRequest {
                scopes: Some(vec![]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let no_scopes = narrowed.token.unwrap();

    // Refused calls tried (each a bad input: no, forged, revoked, scopeless, foreign token,
    // or a bad id), for the reliability figures.
    let mut refused = 0;
    for (method, path, body) in sandbox_routes(&sb.id) {
        refused += 5 + 4;
        let what = format!("{method} {path}");
        let (s, text) = call(&srv.url, None, &method, &path, body).await;
        assert_eq!(s, 401, "{what} without a token: {text}");
        assert!(
            text.contains("\"code\""),
            "{what}: error body has a code: {text}"
        );
        assert_eq!(
            call(&srv.url, Some("sp_forged"), &method, &path, body)
                .await
                .0,
            401,
            "{what} forged token"
        );
        assert_eq!(
            call(&srv.url, Some(&revoked), &method, &path, body).await.0,
            401,
            "{what} revoked token"
        );
        assert_eq!(
            call(&srv.url, Some(&no_scopes), &method, &path, body)
                .await
                .0,
            403,
            "{what} token without scopes"
        );
        let (s, text) = call(&srv.url, Some(&other), &method, &path, body).await;
        assert_eq!(s, 403, "{what} from another workspace: {text}");
        assert!(
            !text.contains(&sb.id) || text.contains("another workspace"),
            "{what} reveals nothing: {text}"
        );
        // Unknown and malformed ids are 404 (never 500), whoever asks.
        for bad in ["sb0000000000000000", "..", "%2e%2e%2fetc", "x%00y"] {
            let bad_path = path.replacen(&sb.id, bad, 1);
            let (s, text) = call(&srv.url, Some(&srv.token), &method, &bad_path, body).await;
            assert!(
                [400, 404, 405].contains(&s.as_u16()),
                "{method} {bad_path}: {s} {text}"
            );
        }
    }
    // The sandbox survived every refused call.
    assert_eq!(sh(&admin, &sb.id, "echo alive").await.stdout, "alive\n");

    // Tokens never appear anywhere but in the response that created them.
    let issued = [
        srv.token.clone(),
        other.clone(),
        revoked.clone(),
        no_scopes.clone(),
    ];
    let env_dump = sh(
        &admin,
        &sb.id,
        "cat /proc/1/environ | tr '\\0' '\\n'; env; cat /etc/* 2>/dev/null",
    )
    .await;
    let db = std::fs::read(srv.data_dir.join("sandpit.db")).unwrap();
    let mut wal = std::fs::read(srv.data_dir.join("sandpit.db-wal")).unwrap_or_default();
    wal.extend(db);
    let db_text = String::from_utf8_lossy(&wal);
    let log = srv.log();
    for t in &issued {
        assert!(!db_text.contains(t.as_str()), "a token is stored in clear");
        assert!(!log.contains(t.as_str()), "a token is in the server log");
        assert!(
            !env_dump.stdout.contains(t.as_str()),
            "a token is visible inside the sandbox"
        );
    }
    admin.destroy_sandbox(&sb.id).await.unwrap();
    println!(
        "FIGURE bad_inputs authorization_matrix={refused} token_places_checked={}",
        issued.len() * 3
    );
}
