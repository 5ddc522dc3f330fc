//! `sandpit serve --tls-cert --tls-key`: the API, a streamed response and a WebSocket upgrade
//! (a terminal attachment) over HTTPS, with a test CA; `--tls-dev-ca`. The E2B SDK over TLS is
//! in `e2b.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use rustls::pki_types::pem::PemObject;
use sandpit_test_support::TestServer;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::bin;

/// A test CA and a server certificate it signed for `localhost`, `*.localhost`,
/// `sandpit.localhost`, `*.sandpit.localhost` and 127.0.0.1, made with the openssl CLI:
/// (CA, certificate, key). Clients refuse a wildcard over a single label (`*.localhost`),
/// so the TLS tests serve previews under `sandpit.localhost`.
pub(crate) fn test_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    test_certificates_for(
        dir,
        "DNS:localhost,DNS:*.localhost,DNS:sandpit.localhost,DNS:*.sandpit.localhost,IP:127.0.0.1",
    )
}

/// A test CA and a server certificate it signed for `san` (an openssl subjectAltName list):
/// (CA, certificate, key).
pub(crate) fn test_certificates_for(dir: &Path, san: &str) -> (PathBuf, PathBuf, PathBuf) {
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\n"),
    )
    .expect("write ext.cnf");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-days", "2", "-subj", "/CN=sandpit test CA"],
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=localhost",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ],
        ]
        .concat(),
    );
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// The API, an SSE exec stream and a terminal's WebSocket over HTTPS; a plain-HTTP request
/// to the TLS listener gets no answer from the API.
#[tokio::test]
async fn the_api_streams_and_websockets_work_over_tls() {
    let certs = tempfile::tempdir().expect("temp dir");
    let (ca, cert, key) = test_certificates(certs.path());
    let srv = TestServer::start_tls(bin(), &cert, &key, &ca, &[])
        .await
        .expect("server starts");
    let pem = std::fs::read(&ca).expect("read the CA");
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA"))
        .build()
        .expect("client");
    let auth = format!("Bearer {}", srv.token);
    let made: Value = http
        .post(format!("{}/v1/sandboxes", srv.url))
        .header("Authorization", &auth)
        .json(&json!({"template": "base"}))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let id = made["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{made}"))
        .to_string();

    // A streamed response (server-sent events of an exec) arrives whole.
    let resp = http
        .post(format!("{}/v1/sandboxes/{id}/exec/stream", srv.url))
        .header("Authorization", &auth)
        .json(&json!({"command": "for i in 1 2 3; do echo line$i; sleep 0.1; done"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.expect("stream");
    let mut stdout = Vec::new();
    let mut exit = None;
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let event: Value = serde_json::from_str(data).expect("event JSON");
        match event["type"].as_str() {
            Some("stdout") => stdout.extend(
                base64::engine::Engine::decode(
                    &base64::engine::general_purpose::STANDARD,
                    event["data"].as_str().expect("data"),
                )
                .expect("base64"),
            ),
            Some("exit") => exit = event["exit_code"].as_i64(),
            _ => {}
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&stdout),
        "line1\nline2\nline3\n",
        "{text}"
    );
    assert_eq!(exit, Some(0), "{text}");

    // A terminal: the attach WebSocket upgrade over the TLS stream.
    let term: Value = http
        .post(format!("{}/v1/sandboxes/{id}/terminals", srv.url))
        .header("Authorization", &auth)
        .json(&json!({"command": "/bin/sh"}))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let tid = term["id"].as_str().unwrap_or_else(|| panic!("{term}"));
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.expect("CA pem")).expect("CA root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let addr = srv.url.trim_start_matches("https://").to_string();
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name"),
            tcp,
        )
        .await
        .expect("TLS handshake");
    let mut req = format!("wss://{addr}/v1/sandboxes/{id}/terminals/{tid}/attach")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("authorization", auth.parse().expect("header"));
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("WebSocket over TLS");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::Binary(b"echo over-$((40+2))\n".to_vec().into()))
        .await
        .expect("type");
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&seen).contains("over-42") {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => seen.extend_from_slice(&b),
            Ok(Some(Ok(_))) => {}
            other => panic!(
                "no echo over the TLS WebSocket: {other:?}; seen {:?}",
                String::from_utf8_lossy(&seen)
            ),
        }
    }

    // Plain HTTP to the TLS listener: the handshake fails, no API answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(15))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    let resp = http
        .delete(format!("{}/v1/sandboxes/{id}", srv.url))
        .header("Authorization", &auth)
        .send()
        .await
        .expect("sent");
    assert!(resp.status().is_success(), "{}", resp.status());
}

/// `sandpit tls dev-ca` then `sandpit serve --tls-dev-ca`: the CA made ahead is kept, the
/// API and a preview host answer over HTTPS to a client trusting only `ca.pem`, a client
/// trusting nothing is refused, and the flag does not go with `--tls-cert`.
#[tokio::test]
async fn the_development_ca_serves_the_api_and_previews() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("tls");
    let out = std::process::Command::new(bin())
        .args(["tls", "dev-ca"])
        .arg(&dir)
        .args([
            "--listen",
            "127.0.0.1:7878",
            "--preview-domain",
            "sandpit.localhost",
        ])
        .output()
        .expect("sandpit tls dev-ca runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("made ") && stdout.contains("ca.pem"),
        "{stdout}"
    );
    let ca = dir.join("ca.pem");
    let ca_before = std::fs::read(&ca).expect("ca.pem");
    let dir_s = dir.display().to_string();
    let srv = TestServer::start_trusting(
        bin(),
        &ca,
        &[
            ("SANDPIT_TLS_DEV_CA", dir_s.as_str()),
            ("SANDPIT_PREVIEW_DOMAIN", "sandpit.localhost"),
        ],
    )
    .await
    .expect("server starts");
    // The same CA, and the same names: nothing made again.
    assert_eq!(std::fs::read(&ca).expect("ca.pem"), ca_before);
    assert!(
        !srv.log().contains("made a new development CA")
            && !srv.log().contains("made a server certificate"),
        "{}",
        srv.log()
    );
    let addr = srv.url.trim_start_matches("https://").to_string();
    let sock: std::net::SocketAddr = addr.parse().expect("address");
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_before).expect("CA"))
        .resolve("sb0123456789abcdef-8080.sandpit.localhost", sock)
        .build()
        .expect("client");
    let resp = http
        .get(format!("{}/v1/sandboxes", srv.url))
        .header("Authorization", format!("Bearer {}", srv.token))
        .send()
        .await
        .expect("the API over HTTPS");
    assert_eq!(resp.status(), StatusCode::OK);
    // A preview host: the handshake passes (the wildcard), the preview proxy answers.
    let resp = http
        .get(format!(
            "https://sb0123456789abcdef-8080.sandpit.localhost:{}/",
            sock.port()
        ))
        .send()
        .await
        .expect("a preview host over HTTPS");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "no such sandbox");
    // Trusting only the platform's roots: refused.
    let untrusting = reqwest::Client::new()
        .get(format!("{}/healthz", srv.url))
        .send()
        .await;
    assert!(untrusting.is_err(), "{untrusting:?}");

    let out = std::process::Command::new(bin())
        .args(["serve", "--tls-dev-ca"])
        .arg(&dir)
        .args(["--tls-cert", "a.pem", "--tls-key", "a.key"])
        .output()
        .expect("sandpit serve runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("cannot be used with"),
        "{stderr}"
    );
}
