//! Pulls against real servers on loopback: a local `docker-registry` (from
//! `sandpit-test-support`) and small hostile "registries" served by the test itself. Every
//! pull goes through a `sandpit_net::Dialer`, as the server's do; no traffic leaves loopback.

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use sandpit_image::registry::{PullOptions, pull, push_client};
use sandpit_image::{LayerStore, RegistryCredentials};
use sandpit_net::{Dialer, Endpoint, Ipv4Net};
use sandpit_test_support::registry::{Registry, busybox_rootfs_tar, file};

/// Marks bytes a fake registry sends in bodies: they must never appear in an error.
const SECRET: &str = "SECRET-BODY-d41d8cd98f00";

/// A dialer like a server's (pool 10.88.0.0/16) with these registries allowed.
fn dialer(allowed: &[&str]) -> Dialer {
    let pool: Ipv4Net = "10.88.0.0/16".parse().unwrap();
    Dialer::new(pool, Vec::new()).with_exceptions(
        allowed
            .iter()
            .map(|a| a.parse::<Endpoint>().unwrap())
            .collect(),
    )
}

fn opts(allowed: &[&str]) -> PullOptions {
    PullOptions {
        credentials: RegistryCredentials::Anonymous,
        insecure_registries: Vec::new(),
        dialer: Some(dialer(allowed)),
    }
}

/// A server on 127.0.0.1 answering every request with `answer`; counts requests.
struct Fake {
    host: String,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake<F>(answer: F) -> Fake
where
    F: Fn(&Method, &str, &HeaderMap) -> Response + Clone + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap| {
        let (answer, seen) = (answer.clone(), seen.clone());
        async move {
            seen.lock().unwrap().push(format!("{method} {uri}"));
            answer(&method, uri.path(), &headers)
        }
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Fake {
        host,
        requests,
        task,
    }
}

fn store() -> (tempfile::TempDir, LayerStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(dir.path().join("images")).unwrap();
    (dir, store)
}

async fn pull_err(store: &LayerStore, reference: &str, opts: &PullOptions) -> String {
    match pull(store, reference, opts, &|_| {}).await {
        Ok(p) => panic!("{reference} was pulled: {p:?}"),
        Err(e) => e.to_string(),
    }
}

/// A loopback registry the operator did not list is refused before any connection, with an
/// error that says why and what to do; listed, the same address is reached. Private and
/// link-local addresses are refused the same way.
#[tokio::test]
async fn unlisted_loopback_and_private_registries_are_refused() {
    let f = fake(|_, _, _| (StatusCode::NOT_FOUND, SECRET).into_response()).await;
    let (_dir, store) = store();
    let reference = format!("{}/app:1", f.host);

    let e = pull_err(&store, &reference, &opts(&[])).await;
    assert!(e.contains("loopback (127.0.0.0/8)"), "{e}");
    assert!(e.contains("--allowed-registries"), "{e}");
    assert!(!e.contains(SECRET), "{e}");
    assert!(f.requests.lock().unwrap().is_empty(), "a request was made");

    // `localhost` resolves to loopback: refused too, without naming the address.
    let port = f.host.rsplit_once(':').unwrap().1;
    let e = pull_err(&store, &format!("localhost:{port}/app:1"), &opts(&[])).await;
    assert!(e.contains("resolves to loopback"), "{e}");
    assert!(f.requests.lock().unwrap().is_empty());

    // Listed: reached (and the 404's body is not quoted).
    let e = pull_err(&store, &reference, &opts(&[&f.host])).await;
    assert!(!f.requests.lock().unwrap().is_empty(), "not reached: {e}");
    assert!(!e.contains(SECRET), "{e}");
    assert!(e.contains("404"), "{e}");

    // Never listable: link-local (metadata) and the pool, whatever the operator says. These
    // are refused before any packet is sent.
    for (host, range) in [
        ("169.254.169.254", "link-local"),
        ("10.88.0.6", "sandbox pool"),
    ] {
        let e = pull_err(&store, &format!("{host}/app:1"), &opts(&[host])).await;
        assert!(e.contains(range), "{e}");
        assert!(e.contains("never reach"), "{e}");
    }
    // Private: refused unless listed (not listed here; nothing is sent).
    let e = pull_err(&store, "192.168.77.1:5000/app:1", &opts(&[])).await;
    assert!(e.contains("private network (192.168.0.0/16)"), "{e}");
    // No dialer, no pulls.
    let e = pull_err(
        &store,
        &reference,
        &PullOptions {
            dialer: None,
            ..opts(&[])
        },
    )
    .await;
    assert!(e.contains("no dialer"), "{e}");
}

/// Whatever a registry answers, the error quotes none of it: OCI error envelopes give their
/// spec codes only, other bodies only their HTTP status; a redirect to an unlisted address is
/// refused.
#[tokio::test]
async fn registry_answers_are_never_echoed() {
    let (_dir, store) = store();
    let envelope = fake(|_, _, _| {
        (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "application/json")],
            format!(r#"{{"errors":[{{"code":"MANIFEST_UNKNOWN","message":"{SECRET}","detail":"{SECRET}"}},{{"code":"{SECRET}"}}]}}"#),
        )
            .into_response()
    })
    .await;
    let e = pull_err(
        &store,
        &format!("{}/app:1", envelope.host),
        &opts(&[&envelope.host]),
    )
    .await;
    assert!(e.contains("MANIFEST_UNKNOWN"), "{e}");
    assert!(!e.contains(SECRET), "{e}");

    let html = fake(|_, _, _| (StatusCode::INTERNAL_SERVER_ERROR, SECRET).into_response()).await;
    let e = pull_err(
        &store,
        &format!("{}/app:1", html.host),
        &opts(&[&html.host]),
    )
    .await;
    assert!(e.contains("500"), "{e}");
    assert!(!e.contains(SECRET), "{e}");

    // 200 with garbage where a manifest should be.
    let garbage = fake(|_, _, _| {
        (
            [(
                header::CONTENT_TYPE,
                "application/vnd.oci.image.manifest.v1+json",
            )],
            format!(r#"{{"schemaVersion":"{SECRET}"}}"#),
        )
            .into_response()
    })
    .await;
    let e = pull_err(
        &store,
        &format!("{}/app:1", garbage.host),
        &opts(&[&garbage.host]),
    )
    .await;
    assert!(!e.contains(SECRET), "{e}");

    // A listed registry that redirects to an unlisted loopback server.
    let target = fake(|_, _, _| (StatusCode::OK, SECRET).into_response()).await;
    let to = target.host.clone();
    let redirect = fake(move |_, path, _| {
        (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, format!("http://{to}{path}"))],
        )
            .into_response()
    })
    .await;
    let e = pull_err(
        &store,
        &format!("{}/app:1", redirect.host),
        &opts(&[&redirect.host]),
    )
    .await;
    assert!(!redirect.requests.lock().unwrap().is_empty());
    assert!(
        target.requests.lock().unwrap().is_empty(),
        "the redirect was followed"
    );
    assert!(
        e.contains(&format!("{} is in loopback", target.host)),
        "{e}"
    );
}

/// A layer already in the store is reused only for a pull from the repository it came from,
/// after the registry confirms the blob to this pull; from elsewhere it is downloaded and
/// verified again, so a registry that merely claims a digest gets nothing.
#[tokio::test]
async fn stored_layers_are_reused_only_after_proof() {
    let registry = Registry::start(None).await.expect("registry starts");
    let base = busybox_rootfs_tar(|t| file(t, "etc/owner", b"tenant-a\n", 0o600).unwrap()).unwrap();
    let image = registry
        .push(
            "tenant-a/private",
            "1",
            std::slice::from_ref(&base),
            serde_json::json!({"Env": ["PATH=/bin"]}),
        )
        .await
        .unwrap();
    let (_dir, store) = store();
    let allowed = opts(&[&registry.host]);
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let progress = |log: &Arc<Mutex<Vec<String>>>| {
        let log = log.clone();
        move |line: String| log.lock().unwrap().push(line)
    };

    let first = pull(&store, &image, &allowed, &progress(&log))
        .await
        .unwrap();
    assert!(first.downloaded_bytes > 0);
    assert!(log.lock().unwrap()[0].contains("pulled"), "{log:?}");
    // Again from the same repository: the HEAD proves access, nothing is downloaded.
    log.lock().unwrap().clear();
    let again = pull(&store, &image, &allowed, &progress(&log))
        .await
        .unwrap();
    assert_eq!(again.downloaded_bytes, 0);
    assert!(
        log.lock().unwrap()[0].contains("already present"),
        "{log:?}"
    );

    // The same layer in another repository: downloaded and verified once, not unpacked.
    let other = registry
        .push(
            "tenant-b/copy",
            "1",
            std::slice::from_ref(&base),
            serde_json::json!({"Env": ["PATH=/bin"]}),
        )
        .await
        .unwrap();
    log.lock().unwrap().clear();
    let copy = pull(&store, &other, &allowed, &progress(&log))
        .await
        .unwrap();
    assert!(copy.downloaded_bytes > 0);
    assert!(
        log.lock().unwrap()[0].contains("already unpacked"),
        "{log:?}"
    );
    assert_eq!(copy.unpacked_bytes, 0);

    // A hostile registry serving tenant A's manifest and config (which name the layer's
    // digest), answering yes to a HEAD of the layer and garbage to a GET.
    let r = sandpit_image::registry::parse_reference(&image).unwrap();
    let client = push_client(&r, &[]);
    let auth = sandpit_image::oci_client::secrets::RegistryAuth::Anonymous;
    let (manifest, _digest, config) = client.pull_manifest_and_config(&r, &auth).await.unwrap();
    let raw_manifest = serde_json::to_vec(&manifest).unwrap();
    let layer = manifest.layers[0].clone();
    let config_digest = manifest.config.digest.clone();
    let config = config.into_bytes();
    let hostile = fake(move |method, path, _| {
        let blob = |d: &str| path.ends_with(&format!("/blobs/{d}"));
        if path.ends_with("/manifests/1") {
            (
                [(
                    header::CONTENT_TYPE,
                    "application/vnd.oci.image.manifest.v1+json",
                )],
                raw_manifest.clone(),
            )
                .into_response()
        } else if blob(&config_digest) {
            config.clone().into_response()
        } else if blob(&layer.digest) && *method == Method::HEAD {
            (
                [(header::CONTENT_LENGTH, layer.size.to_string())],
                axum::body::Body::empty(),
            )
                .into_response()
        } else if blob(&layer.digest) {
            vec![0u8; layer.size as usize].into_response()
        } else {
            StatusCode::OK.into_response()
        }
    })
    .await;
    let e = pull_err(
        &store,
        &format!("{}/tenant-a/private:1", hostile.host),
        &opts(&[&hostile.host]),
    )
    .await;
    assert!(e.contains("digest"), "{e}");
    let requests = hostile.requests.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET") && r.contains("/blobs/sha256:")),
        "the layer was not downloaded: {requests:?}"
    );
}
