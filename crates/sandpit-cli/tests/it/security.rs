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

/// Symlink swaps racing the file API: while a process in the sandbox keeps turning
/// `/tmp/race` and `/tmp/dir` into a file, a directory and symlinks to host paths, uploads,
/// downloads and listings through the API never read or write outside the sandbox (paths
/// resolve in the sandbox's own kernel). Nor does destroying a sandbox whose files point at
/// host paths touch them.
#[tokio::test]
async fn symlink_swaps_racing_the_file_api_stay_inside() {
    let srv = server().await;
    let client = srv.client();
    let sb = create(&client, base()).await;
    // Host canaries the sandbox names by their host paths.
    let canary_dir = tempfile::Builder::new()
        .prefix("sandpit-canary-")
        .tempdir()
        .unwrap();
    let canary = canary_dir.path().join("secret");
    std::fs::write(&canary, "host only").unwrap();
    let (host_file, host_dir) = (
        canary.display().to_string(),
        canary_dir.path().display().to_string(),
    );
    let swapper = format!(
        "mkdir -p /tmp/realdir; setsid sh -c 'while :; do \
           ln -sfn /../../../..{host_file} /tmp/race; ln -sfn /../../..{host_dir} /tmp/dir; \
           rm -f /tmp/race; echo inside > /tmp/race; \
           rm -f /tmp/dir; ln -sfn /tmp/realdir /tmp/dir; \
           rm -f /tmp/dir; ln -sfn ../../..{host_dir}/ /tmp/dir; \
         done' </dev/null >/dev/null 2>&1 & echo started"
    );
    assert_eq!(sh(&client, &sb.id, &swapper).await.stdout, "started\n");

    const ROUNDS: usize = 60;
    let (mut ops, mut refused) = (0usize, 0usize);
    for i in 0..ROUNDS {
        let (a, b, c, d, e) = tokio::join!(
            client.upload(&sb.id, "/tmp/race", format!("api {i}")),
            client.download(&sb.id, "/tmp/race"),
            client.upload(&sb.id, "/tmp/dir/secret", format!("api {i}")),
            client.download(&sb.id, "/tmp/dir/secret"),
            client.list_files(&sb.id, "/tmp/dir"),
        );
        ops += 5;
        for r in [a.err(), c.err(), e.err()].into_iter().flatten() {
            let status = r.status().map_or(0, |s| s.as_u16());
            assert!((400..500).contains(&status), "{r:?}");
            refused += 1;
        }
        for r in [b, d] {
            match r {
                Ok(resp) => {
                    let body = resp.text().await.unwrap_or_default();
                    assert_ne!(body, "host only", "a download read the host's file");
                }
                Err(r) => {
                    let status = r.status().map_or(0, |s| s.as_u16());
                    assert!((400..500).contains(&status), "{r:?}");
                    refused += 1;
                }
            }
        }
    }
    let host_entries: Vec<_> = std::fs::read_dir(canary_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(host_entries, vec![std::ffi::OsString::from("secret")]);
    assert_eq!(std::fs::read_to_string(&canary).unwrap(), "host only");

    // Destroy with links to host paths in the sandbox's files.
    sh(
        &client,
        &sb.id,
        &format!(
            "ln -s /../../..{host_dir} /home/dirlink; ln -s /../../../..{host_file} /home/filelink; \
             ln -s {host_dir} /home/abslink"
        ),
    )
    .await;
    client.destroy_sandbox(&sb.id).await.unwrap();
    assert_eq!(std::fs::read_to_string(&canary).unwrap(), "host only");
    assert!(canary_dir.path().is_dir());
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
    println!("FIGURE bad_inputs symlink_races={ops} refused={refused}");
}

/// Hostile template builds (#12): contexts, RUN layers and archives aimed at the host.
#[path = "security_builds.rs"]
mod builds;
