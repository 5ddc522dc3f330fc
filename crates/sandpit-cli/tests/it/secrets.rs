//! Secrets that never enter the sandbox, end to end: a real server with a secrets key, real
//! gVisor sandboxes, and an HTTPS API in a network namespace this test creates ("the
//! internet"): `tsec<index>`, veth `tsec<index>h`/`tsec<index>t`, addresses
//! `10.216.<index>.0/29` (the index of the test server's pool reservation). The namespace
//! answers every DNS query with its API address; the API has its own test CA, which the
//! server's proxy trusts through `SANDPIT_SECRETS_EXTRA_CA`; the sandbox does not trust it.
//!
//! The HTTPS client in the sandbox is `openssl s_client`, copied from the host with its
//! libraries and loader, which checks certificates: a request to a secret's host succeeds
//! only if the sandbox trusts its lineage's CA (`SSL_CERT_FILE`, set by the server).
//! (busybox's own TLS cannot parse the handshake records rustls coalesces.) Plain HTTP goes
//! through busybox `wget`.
//!
//! The API records each request head it receives and answers `ok`: it never echoes what it
//! got, so the real value never travels back into the sandbox.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sandpit_sdk::Client;
use sandpit_sdk::types::{
    BasicInject, CreateSandboxRequest, CreateSecretRequest, EgressPolicy, ForkResult, SandboxMode,
    SandboxStatus, SecretInject,
};
use sandpit_test_support::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::egress::{dns_reply, in_netns, run, run_quiet};
use crate::{assert_api_err, bin, sh};

/// What the API has received: each request head, in order.
type Heads = Arc<Mutex<Vec<String>>>;

/// The namespace with its DNS responder and the API (HTTPS on 443, plain HTTP on 80).
struct Internet {
    ns: String,
    host_if: String,
    heads: Heads,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Internet {
    async fn new(index: u32, server_config: Arc<rustls::ServerConfig>) -> Internet {
        let base = u32::from(Ipv4Addr::new(10, 216, index as u8, 0));
        let gw = Ipv4Addr::from(base + 1);
        let dns = Ipv4Addr::from(base + 2);
        let api = Ipv4Addr::from(base + 6);
        let mut t = Internet {
            ns: format!("tsec{index}"),
            host_if: format!("tsec{index}h"),
            heads: Heads::default(),
            tasks: Vec::new(),
        };
        t.remove();
        let peer = format!("tsec{index}t");
        let ns = t.ns.clone();
        run(&["ip", "netns", "add", &ns]);
        run(&[
            "ip", "link", "add", &t.host_if, "type", "veth", "peer", "name", &peer, "netns", &ns,
        ]);
        run(&["ip", "addr", "add", &format!("{gw}/29"), "dev", &t.host_if]);
        run(&["ip", "link", "set", &t.host_if, "up"]);
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        for a in [dns, api] {
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{a}/29"),
                "dev",
                &peer,
            ]);
        }
        run(&["ip", "-n", &ns, "link", "set", &peer, "up"]);
        run(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &gw.to_string(),
        ]);
        let (udp, https, http) = in_netns(&ns, move || {
            (
                std::net::UdpSocket::bind((dns, 53)).unwrap(),
                std::net::TcpListener::bind((api, 443)).unwrap(),
                std::net::TcpListener::bind((api, 80)).unwrap(),
            )
        });
        udp.set_nonblocking(true).unwrap();
        let udp = tokio::net::UdpSocket::from_std(udp).unwrap();
        t.tasks.push(tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                if let Some(reply) = dns_reply(&buf[..n], api) {
                    let _ = udp.send_to(&reply, from).await;
                }
            }
        }));
        for (listener, tls) in [(https, Some(server_config)), (http, None)] {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let heads = t.heads.clone();
            t.tasks.push(tokio::spawn(async move {
                while let Ok((s, _)) = listener.accept().await {
                    let heads = heads.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        match tls {
                            Some(cfg) => {
                                let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                                if let Ok(s) = acceptor.accept(s).await {
                                    if s.get_ref().1.alpn_protocol() == Some(b"h2") {
                                        answer_h2(s, &heads).await;
                                    } else {
                                        answer(s, &heads).await;
                                    }
                                }
                            }
                            None => answer(s, &heads).await,
                        }
                    });
                }
            }));
        }
        t
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    /// The last request head received, waiting a moment for it.
    async fn last(&self, before: usize) -> String {
        sandpit_test_support::wait_until(Duration::from_secs(10), "the API's request", || async {
            let h = self.heads();
            (h.len() > before).then(|| h.last().cloned().unwrap())
        })
        .await
        .unwrap()
    }

    fn remove(&self) {
        run_quiet(&["ip", "link", "del", &self.host_if]);
        run_quiet(&["ip", "netns", "del", &self.ns]);
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.remove();
    }
}

/// Reads one request head, records it, answers `ok` and closes.
async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, heads: &Heads) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    heads
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&buf).into_owned());
    let _ = s
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
        .await;
    let _ = s.shutdown().await;
}

/// Serves an h2 connection: each request's head recorded (as http/1.1 would spell it, with
/// `HTTP/2`), answered `ok`.
async fn answer_h2<S>(s: S, heads: &Heads)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let heads = heads.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut head = format!("{} {} HTTP/2\r\n", req.method(), req.uri());
        for (k, v) in req.headers() {
            head.push_str(&format!(
                "{k}: {}\r\n",
                String::from_utf8_lossy(v.as_bytes())
            ));
        }
        heads.lock().unwrap().push(head + "\r\n");
        async { Ok::<_, std::convert::Infallible>(hyper::Response::new("ok\n".to_string())) }
    });
    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(s), service)
        .await;
}

/// The test's CA and the API's TLS configuration (a leaf for `api.secret.test` and
/// `other.secret.test` and `elsewhere.test`; ALPN `h2` and `http/1.1`). Returns the CA
/// certificate (PEM) and the server configuration.
fn test_pki() -> (String, Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "secrets test CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![
        "api.secret.test".to_string(),
        "other.secret.test".to_string(),
        "elsewhere.test".to_string(),
    ])
    .unwrap()
    .signed_by(&leaf_key, &issuer)
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone(), ca_cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (ca_cert.pem(), Arc::new(config))
}

fn header_secret(name: &str, value: &str, hosts: &[&str]) -> CreateSecretRequest {
    CreateSecretRequest {
        name: name.into(),
        value: value.into(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        inject: SecretInject {
            header: Some("Authorization".into()),
            format: Some("Bearer {value}".into()),
            ..Default::default()
        },
    }
}

/// Whether any file under `dir` holds `needle` (the host's view of a sandbox's disk or
/// memory image).
fn tree_contains(dir: &Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    for e in entries.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        let path = e.path();
        if ft.is_dir() {
            if tree_contains(&path, needle) {
                return true;
            }
        } else if ft.is_file() && file_contains(&path, needle) {
            return true;
        }
    }
    false
}

fn file_contains(path: &Path, needle: &[u8]) -> bool {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        carry.extend_from_slice(&buf[..n]);
        if carry.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        let keep = needle.len().saturating_sub(1).min(carry.len());
        carry.drain(..carry.len() - keep);
    }
}

/// `wget` from the sandbox with an `Authorization` header built from `auth` (shell text:
/// it may name the placeholder's variable) to `url`, checking certificates; its exit code
/// and output.
async fn wget(client: &Client, id: &str, auth: &str, url: &str) -> (i32, String) {
    wget_with(client, id, auth, url, "").await
}

async fn wget_with(client: &Client, id: &str, auth: &str, url: &str, opts: &str) -> (i32, String) {
    // HTTPS through `openssl s_client` itself, which reads until the server closes (wget may
    // end first and its helper close the connection from the sandbox's side, leaving an
    // endpoint in TIME_WAIT that gVisor cannot checkpoint for a minute). The answer's body
    // alone comes back, as wget gives it.
    let cmd = match url.strip_prefix("https://") {
        Some(rest) => {
            let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let path = if path.is_empty() { "/" } else { path };
            let verify = if opts.contains("--no-check-certificate") {
                String::new()
            } else {
                format!("-verify_return_error -verify_hostname {host}")
            };
            format!(
                "out=$(printf 'GET %s HTTP/1.1\\r\\nHost: {host}\\r\\nAuthorization: %s\\r\\n\\r\\n' \"{path}\" \"{auth}\" | openssl s_client -quiet {verify} -servername {host} -connect {host}:443 2>/dev/null) || exit 1; printf '%s' \"$out\" | tr -d '\\r' | sed '1,/^$/d'"
            )
        }
        None => {
            format!("wget -q -T 10 {opts} -O - --header \"Authorization: {auth}\" \"{url}\" 2>&1")
        }
    };
    let out = sh(client, id, &cmd).await;
    (out.exit_code, out.stdout)
}

/// The host's `openssl` (with its libraries and the loader) into the sandbox, behind
/// `/usr/local/bin/openssl`.
async fn install_openssl(client: &Client, id: &str) {
    let files = [
        "/usr/bin/openssl",
        "/lib/x86_64-linux-gnu/libssl.so.3",
        "/lib/x86_64-linux-gnu/libcrypto.so.3",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
    ];
    for f in files {
        let name = Path::new(f).file_name().unwrap().to_str().unwrap();
        let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("{f}: {e}"));
        client
            .upload(id, &format!("/opt/ossl/{name}"), bytes)
            .await
            .unwrap();
    }
    let out = sh(
        client,
        id,
        "chmod +x /opt/ossl/* && mkdir -p /usr/local/bin && printf '#!/bin/sh\nexec /opt/ossl/ld-linux-x86-64.so.2 --library-path /opt/ossl /opt/ossl/openssl \"$@\"\n' > /usr/local/bin/openssl && chmod +x /usr/local/bin/openssl && openssl version",
    )
    .await;
    assert!(out.stdout.contains("OpenSSL"), "{out:?}");
}

fn header_of<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn secrets_are_injected_by_the_proxy_and_never_enter_the_sandbox() {
    let tmp = tempfile::tempdir().unwrap();
    let key_file = tmp.path().join("secrets.key");
    let key = [rand_bytes(), rand_bytes()].concat();
    std::fs::write(&key_file, format!("{}\n", hex::encode(key))).unwrap();
    let (ca_pem, server_config) = test_pki();
    let ca_file = tmp.path().join("test-ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    // runsc compresses memory images by default: the test's runsc writes them plain, so
    // scanning them means something (a marker a process holds is found, see below).
    let runsc = tmp.path().join("runsc");
    std::fs::write(
        &runsc,
        "#!/bin/sh\nfor a do shift; if [ \"$a\" = checkpoint ]; then set -- \"$@\" checkpoint -compression=none; else set -- \"$@\" \"$a\"; fi; done\nexec runsc \"$@\"\n",
    )
    .unwrap();
    run(&["chmod", "+x", &runsc.display().to_string()]);
    let (k, c, r) = (key_file.clone(), ca_file.clone(), runsc.clone());
    let srv = TestServer::start_with_index_env(bin(), move |index| {
        vec![
            ("SANDPIT_DNS".to_string(), format!("10.216.{index}.2")),
            (
                "SANDPIT_SECRETS_KEY_FILE".to_string(),
                k.display().to_string(),
            ),
            (
                "SANDPIT_SECRETS_EXTRA_CA".to_string(),
                c.display().to_string(),
            ),
            ("SANDPIT_RUNSC".to_string(), r.display().to_string()),
        ]
    })
    .await
    .expect("server starts");
    let internet = Internet::new(srv.index, server_config).await;
    let client = srv.client();

    // ---- hostile inputs: 4xx, nothing stored ----
    let value = format!("sk-live-{}", hex::encode(rand_bytes()));
    let good = header_secret("openai", &value, &["api.secret.test"]);
    for (bad, code) in [
        (
            CreateSecretRequest {
                name: "Bad-Name".into(),
                ..good.clone()
            },
            "invalid_secret_name",
        ),
        (
            CreateSecretRequest {
                value: "x".repeat(100_000),
                ..good.clone()
            },
            "invalid_secret_value",
        ),
        (
            CreateSecretRequest {
                value: "a\r\nX-Injected: 1".into(),
                ..good.clone()
            },
            "invalid_secret_value",
        ),
        (
            CreateSecretRequest {
                hosts: vec!["*.test".into()],
                ..good.clone()
            },
            "invalid_secret_hosts",
        ),
        (
            CreateSecretRequest {
                hosts: vec!["http://api.secret.test/".into()],
                ..good.clone()
            },
            "invalid_secret_hosts",
        ),
        (
            CreateSecretRequest {
                inject: SecretInject {
                    header: Some("Authorization".into()),
                    format: Some("Bearer".into()),
                    ..Default::default()
                },
                ..good.clone()
            },
            "invalid_secret_inject",
        ),
        (
            CreateSecretRequest {
                inject: SecretInject {
                    header: Some("Host".into()),
                    ..Default::default()
                },
                ..good.clone()
            },
            "invalid_secret_inject",
        ),
    ] {
        assert_api_err(client.create_secret(&bad).await, 400, code);
    }
    assert!(client.list_secrets().await.unwrap().is_empty());

    // ---- three secrets, one per form ----
    let created = client.create_secret(&good).await.unwrap();
    assert_eq!(created.env, "SANDPIT_SECRET_OPENAI");
    assert!(!serde_json::to_string(&created).unwrap().contains(&value));
    assert_api_err(client.create_secret(&good).await, 409, "secret_exists");
    let qvalue = format!("q{}", hex::encode(rand_bytes()));
    client
        .create_secret(&CreateSecretRequest {
            name: "qkey".into(),
            value: qvalue.clone(),
            hosts: vec!["*.secret.test".into()],
            inject: SecretInject {
                query: Some("key".into()),
                ..Default::default()
            },
        })
        .await
        .unwrap();
    let bvalue = format!("b{}", hex::encode(rand_bytes()));
    client
        .create_secret(&CreateSecretRequest {
            name: "basic".into(),
            value: bvalue.clone(),
            hosts: vec!["api.secret.test".into()],
            inject: SecretInject {
                basic: Some(BasicInject {
                    username: "me".into(),
                }),
                ..Default::default()
            },
        })
        .await
        .unwrap();
    let listed = client.list_secrets().await.unwrap();
    assert_eq!(listed.len(), 3);
    assert!(!serde_json::to_string(&listed).unwrap().contains(&value));
    // The store holds no value in clear either.
    let db = std::fs::read(srv.data_dir.join("sandpit.db")).unwrap_or_default();
    assert!(!db.windows(value.len()).any(|w| w == value.as_bytes()));

    // A create naming an unknown secret, or one twice: refused.
    let with = |secrets: &[&str]| CreateSandboxRequest {
        template: "base".into(),
        mode: SandboxMode::Persistent,
        idle_timeout: Some("10m".into()),
        secrets: secrets.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    assert_api_err(
        client.create_sandbox(&with(&["nope"])).await,
        404,
        "secret_not_found",
    );
    assert_api_err(
        client.create_sandbox(&with(&["openai", "openai"])).await,
        400,
        "invalid_secrets",
    );

    let a = client
        .create_sandbox(&with(&["openai", "qkey", "basic"]))
        .await
        .expect("sandbox with secrets")
        .id;
    install_openssl(&client, &a).await;
    let env = sh(&client, &a, "env").await.stdout;
    let placeholder = env
        .lines()
        .find_map(|l| l.strip_prefix("SANDPIT_SECRET_OPENAI="))
        .expect("the placeholder variable")
        .to_string();
    assert!(
        placeholder.starts_with("sandpit-placeholder-"),
        "{placeholder}"
    );
    assert!(
        env.contains("SSL_CERT_FILE=/etc/sandpit/ca-bundle.crt"),
        "{env}"
    );
    // The lineage's CA is in the sandbox's trust store (written through the agent).
    let ca_in_sandbox = sh(&client, &a, "cat /etc/sandpit/secrets-ca.crt")
        .await
        .stdout;
    assert!(
        ca_in_sandbox.contains("BEGIN CERTIFICATE"),
        "{ca_in_sandbox}"
    );
    let bundle = sh(&client, &a, "cat /etc/sandpit/ca-bundle.crt")
        .await
        .stdout;
    assert!(bundle.contains(ca_in_sandbox.trim()));

    // ---- injection: header, query, basic ----
    let n = internet.heads().len();
    let (code, out) = wget(
        &client,
        &a,
        "Bearer $SANDPIT_SECRET_OPENAI",
        "https://api.secret.test/v1/chat?key=$SANDPIT_SECRET_QKEY&x=1",
    )
    .await;
    assert_eq!(
        (code, out.trim()),
        (0, "ok"),
        "{out}\n{}",
        srv.log()
            .lines()
            .filter(|l| l.contains("filter") || l.contains("secret"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let head = internet.last(n).await;
    assert_eq!(
        header_of(&head, "authorization"),
        Some(format!("Bearer {value}").as_str()),
        "{head}"
    );
    assert!(
        head.starts_with(&format!("GET /v1/chat?key={qvalue}&x=1 HTTP/1.1")),
        "{head}"
    );
    assert!(!head.contains(&placeholder));

    let n = internet.heads().len();
    let (code, out) = wget(
        &client,
        &a,
        "Basic $(printf 'me:%s' \"$SANDPIT_SECRET_BASIC\" | base64)",
        "https://api.secret.test/basic",
    )
    .await;
    assert_eq!((code, out.trim()), (0, "ok"), "{out}");
    let head = internet.last(n).await;
    use base64::Engine;
    let want = base64::engine::general_purpose::STANDARD.encode(format!("me:{bvalue}"));
    assert_eq!(
        header_of(&head, "authorization"),
        Some(format!("Basic {want}").as_str()),
        "{head}"
    );

    // ---- ALPN mirrored: the sandbox is offered what the API chose from its offer (a
    // handshake only; the sandbox closes it, the proxy resets without leaving a TIME_WAIT,
    // and the wait before the hibernation below covers any) ----
    for (offer, chosen) in [("h2,http/1.1", "h2"), ("http/1.1", "http/1.1")] {
        let out = sh(
            &client,
            &a,
            &format!(
                "openssl s_client -alpn {offer} -verify_return_error -verify_hostname api.secret.test -servername api.secret.test -connect api.secret.test:443 </dev/null 2>&1"
            ),
        )
        .await;
        assert!(
            out.stdout.contains(&format!("ALPN protocol: {chosen}\n")),
            "{offer}: {out:?}"
        );
        assert!(
            out.stdout.contains("Verify return code: 0 (ok)"),
            "the lineage's leaf: {out:?}"
        );
    }

    // ---- audit: counted per secret and sandbox, an event each ----
    let metrics = reqwest::get(format!("{}/metrics", srv.metrics_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("sandpit_secret_injections_total")
                && l.contains(&format!("sandbox=\"{a}\""))
                && l.contains("secret=\"openai\"")
        })
        .unwrap_or_else(|| panic!("no injection counter: {metrics}"));
    assert!(line.ends_with(" 1"), "{line}");
    assert!(!metrics.contains(&value));

    // ---- nothing of the sandbox holds the value: environment, /proc, files, memory ----
    for cmd in [
        "env",
        "cat /proc/*/environ | tr '\\0' '\\n'",
        "cat /proc/*/cmdline",
    ] {
        let out = sh(&client, &a, cmd).await;
        assert!(
            !out.stdout.contains(&value) && !out.stderr.contains(&value),
            "{cmd}"
        );
    }
    assert!(
        sh(&client, &a, "cat /proc/*/environ | tr '\\0' '\\n'")
            .await
            .stdout
            .contains(&placeholder),
        "the placeholder is what the sandbox holds"
    );
    // A marker held by a running process: the scan of the memory image must find it.
    let marker = format!("memory-marker-{}", hex::encode(rand_bytes()));
    sh(
        &client,
        &a,
        &format!("MARKER={marker} sleep 600 > /dev/null 2>&1 &"),
    )
    .await;
    // gVisor cannot checkpoint a sandbox holding a TCP endpoint in TIME_WAIT (one whose
    // client closed before the proxy's FIN arrived, which the proxy makes rare but cannot
    // rule out): its netstack keeps them 60 s.
    tokio::time::sleep(Duration::from_secs(61)).await;
    let hibernated = client.hibernate(&a).await.expect("hibernate");
    assert_eq!(hibernated.status, SandboxStatus::Suspended);
    assert_eq!(hibernated.error, None, "the memory image was written");
    let images = srv.data_dir.join("checkpoints").join(&a);
    let files = srv.data_dir.join("sandboxes").join(&a);
    assert!(
        tree_contains(&files, ca_in_sandbox.lines().nth(1).unwrap().as_bytes()),
        "the scan sees the sandbox's files (the CA it was given)"
    );
    assert!(
        tree_contains(&images, marker.as_bytes()),
        "the scan sees the sandbox's memory (a running process's environment)"
    );
    for secret in [&value, &qvalue, &bvalue] {
        assert!(!tree_contains(&images, secret.as_bytes()), "memory image");
        assert!(!tree_contains(&files, secret.as_bytes()), "files");
    }
    assert!(!tree_contains(&images, want.as_bytes()));

    // ---- woken: still injected; a replaced value is used at once ----
    client.wake(&a).await.expect("wake");
    // Forked before it opens a connection (a fork checkpoints the parent too).
    let child = match client.fork(&a, 1).await.unwrap().remove(0) {
        ForkResult::Ok(sb) => sb.id,
        ForkResult::Err(e) => panic!("fork failed: {e:?}"),
    };
    let value2 = format!("sk-rotated-{}", hex::encode(rand_bytes()));
    client.replace_secret("openai", &value2).await.unwrap();
    let n = internet.heads().len();
    let (code, _) = wget(
        &client,
        &a,
        "Bearer $SANDPIT_SECRET_OPENAI",
        "https://api.secret.test/after-wake",
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(
        header_of(&internet.last(n).await, "authorization"),
        Some(format!("Bearer {value2}").as_str())
    );

    // ---- a fork (made above, right after the wake) keeps its parent's placeholders and
    // CA, and works ----
    assert_eq!(
        sh(&client, &child, "cat /etc/sandpit/secrets-ca.crt")
            .await
            .stdout,
        ca_in_sandbox
    );
    let n = internet.heads().len();
    let (code, _) = wget(
        &client,
        &child,
        "Bearer $SANDPIT_SECRET_OPENAI",
        "https://api.secret.test/child",
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(
        header_of(&internet.last(n).await, "authorization"),
        Some(format!("Bearer {value2}").as_str())
    );

    // ---- the placeholder elsewhere goes out unchanged ----
    // A host no secret lists: passed end to end, not intercepted (see below: its
    // certificate is the test CA's, which the sandbox does not trust).
    let n = internet.heads().len();
    let (code, out) = wget_with(
        &client,
        &a,
        "Bearer $SANDPIT_SECRET_OPENAI",
        "https://elsewhere.test/",
        "--no-check-certificate",
    )
    .await;
    assert_eq!((code, out.trim()), (0, "ok"), "{out}");
    let head = internet.last(n).await;
    assert_eq!(
        header_of(&head, "authorization"),
        Some(format!("Bearer {placeholder}").as_str())
    );
    // A host another secret lists (`qkey`: `*.secret.test`), intercepted: `openai`'s
    // placeholder stays as it is there.
    let n = internet.heads().len();
    let (code, out) = wget(
        &client,
        &a,
        "Bearer $SANDPIT_SECRET_OPENAI",
        "https://other.secret.test/?key=$SANDPIT_SECRET_QKEY",
    )
    .await;
    assert_eq!((code, out.trim()), (0, "ok"), "{out}");
    let head = internet.last(n).await;
    assert_eq!(
        header_of(&head, "authorization"),
        Some(format!("Bearer {placeholder}").as_str())
    );
    assert!(head.starts_with(&format!("GET /?key={qvalue} ")), "{head}");
    // Plain HTTP to the secret's own host: never injected.
    let n = internet.heads().len();
    let (code, out) = wget(
        &client,
        &a,
        "Bearer $SANDPIT_SECRET_OPENAI",
        "http://api.secret.test/plain",
    )
    .await;
    assert_eq!((code, out.trim()), (0, "ok"), "{out}");
    let head = internet.last(n).await;
    assert_eq!(
        header_of(&head, "authorization"),
        Some(format!("Bearer {placeholder}").as_str())
    );

    // ---- deleted: the next request carries the placeholder ----
    client.delete_secret("openai").await.unwrap();
    assert_api_err(
        client.delete_secret("openai").await,
        404,
        "secret_not_found",
    );
    let n = internet.heads().len();
    let (code, _) = wget(
        &client,
        &a,
        "Bearer $SANDPIT_SECRET_OPENAI",
        "https://api.secret.test/deleted",
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(
        header_of(&internet.last(n).await, "authorization"),
        Some(format!("Bearer {placeholder}").as_str())
    );

    // A head the proxy cannot vouch for (another Host behind the secret's name, which a
    // shared front end could route elsewhere) is refused, not forwarded.
    let n = internet.heads().len();
    let out = sh(
        &client,
        &a,
        "wget -q -T 10 -O - --header 'Host: evil.example' \"https://api.secret.test/?key=$SANDPIT_SECRET_QKEY\" 2>&1",
    )
    .await;
    assert_ne!(out.exit_code, 0, "{out:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        internet.heads().len(),
        n,
        "a mismatched Host reached the API"
    );

    // Not intercepted: the sandbox meets the real server's certificate, which it does not
    // trust. (Last: a connection the sandbox closes first lingers in TIME_WAIT, and gVisor
    // cannot checkpoint a sandbox holding one.)
    let (code, _) = wget(&client, &a, "x", "https://elsewhere.test/").await;
    assert_ne!(
        code, 0,
        "the sandbox trusts only its lineage's CA and its system roots"
    );

    // The egress policy still decides where an intercepted connection may go: a sandbox that
    // may reach only the nameserver resolves the API's name, but the proxy does not connect.
    let c = client
        .create_sandbox(&CreateSandboxRequest {
            egress: Some(EgressPolicy {
                mode: "deny_all".into(),
                allow_cidrs: vec![format!("10.216.{}.2/32", srv.index)],
                ..Default::default()
            }),
            ..with(&["qkey"])
        })
        .await
        .expect("sandbox with secrets and a policy")
        .id;
    let n = internet.heads().len();
    let out = sh(
        &client,
        &c,
        "nslookup api.secret.test >/dev/null && echo resolved; wget -q -T 5 -O - \"https://api.secret.test/?key=$SANDPIT_SECRET_QKEY\" 2>&1",
    )
    .await;
    assert!(out.stdout.starts_with("resolved"), "{out:?}");
    assert_ne!(out.exit_code, 0, "{out:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        internet.heads().len(),
        n,
        "the proxy connected past the policy"
    );

    for id in [&a, &child, &c] {
        client.destroy_sandbox(id).await.unwrap();
    }
    // The server log never holds a value.
    let log = srv.log();
    for secret in [&value, &value2, &qvalue, &bvalue] {
        assert!(!log.contains(secret.as_str()), "the log holds a value");
    }
}

/// `sandpit secrets rotate-key`, the real binary on the server's database: a sandbox made
/// before the rotation still has its requests injected after a restart with the new key
/// (the value opens with it, and the lineage's CA, which the sandbox trusts, is the same
/// one, read from the database), while the old key opens nothing any more: a server started
/// with it gives the sandbox no proxy and says why, and it cannot rotate again.
#[tokio::test]
async fn secrets_survive_a_master_key_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let key_file = |name: &str| {
        let path = tmp.path().join(name);
        let key = [rand_bytes(), rand_bytes()].concat();
        std::fs::write(&path, format!("{}\n", hex::encode(key))).unwrap();
        path
    };
    let (old_key, new_key, wrong_key) = (
        key_file("old.key"),
        key_file("new.key"),
        key_file("wrong.key"),
    );
    let (ca_pem, server_config) = test_pki();
    let ca_file = tmp.path().join("test-ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let (k, c) = (old_key.clone(), ca_file.clone());
    let mut srv = TestServer::start_with_index_env(bin(), move |index| {
        vec![
            ("SANDPIT_DNS".to_string(), format!("10.216.{index}.2")),
            (
                "SANDPIT_SECRETS_KEY_FILE".to_string(),
                k.display().to_string(),
            ),
            (
                "SANDPIT_SECRETS_EXTRA_CA".to_string(),
                c.display().to_string(),
            ),
        ]
    })
    .await
    .expect("server starts");
    let internet = Internet::new(srv.index, server_config).await;
    let client = srv.client();
    let value = format!("sk-live-{}", hex::encode(rand_bytes()));
    client
        .create_secret(&header_secret("openai", &value, &["api.secret.test"]))
        .await
        .unwrap();
    let id = client
        .create_sandbox(&CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            idle_timeout: Some("10m".into()),
            secrets: vec!["openai".into()],
            ..Default::default()
        })
        .await
        .expect("sandbox with secrets")
        .id;
    install_openssl(&client, &id).await;
    let injected = async |client: &Client, path: &str| {
        let n = internet.heads().len();
        let (code, out) = wget(
            client,
            &id,
            "Bearer $SANDPIT_SECRET_OPENAI",
            &format!("https://api.secret.test/{path}"),
        )
        .await;
        assert_eq!((code, out.trim()), (0, "ok"), "{out}");
        assert_eq!(
            header_of(&internet.last(n).await, "authorization"),
            Some(format!("Bearer {value}").as_str())
        );
    };
    injected(&client, "before").await;
    let ca_in_sandbox = sh(&client, &id, "cat /etc/sandpit/secrets-ca.crt")
        .await
        .stdout;
    // The CA is the database's, its key sealed there; nothing of it on the node's disk.
    assert!(!srv.data_dir.join("secrets-ca").exists());
    let db = std::fs::read(srv.data_dir.join("sandpit.db")).unwrap_or_default();
    assert!(
        !db.windows(11).any(|w| w == b"PRIVATE KEY"),
        "a CA key in clear"
    );

    // The server goes down (its sandbox keeps running); the operator rotates.
    srv.kill9();
    let rotate = |old: &Path, new: &Path| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(["secrets", "rotate-key", "--data-dir"])
            .arg(&srv.data_dir)
            .arg("--old-key-file")
            .arg(old)
            .arg("--new-key-file")
            .arg(new)
            .env_remove("SANDPIT_DATABASE");
        if let Some(db) = &srv.database {
            cmd.env("SANDPIT_DATABASE", &db.url);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = rotate(&wrong_key, &new_key);
    assert!(!ok, "a wrong old key is refused");
    assert!(
        err.contains("the old key does not open") && err.contains("nothing was written"),
        "{err}"
    );
    let (ok, out, err) = rotate(&old_key, &new_key);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("re-sealed 1 secret values and 1 lineage CA keys"),
        "{out}"
    );
    let (ok, _, err) = rotate(&old_key, &wrong_key);
    assert!(!ok, "the old key opens nothing any more");
    assert!(err.contains("the old key does not open"), "{err}");

    // A server started with the old key: the sandbox holding secrets gets no proxy, and
    // the log says why; its request goes out with no value.
    srv.restart().await.unwrap();
    let client = srv.client();
    sandpit_test_support::wait_until(
        Duration::from_secs(30),
        "the failed adoption logged",
        || async {
            srv.log()
                .contains("does not open with this secrets key")
                .then_some(())
        },
    )
    .await
    .unwrap();
    let n = internet.heads().len();
    let (code, _) = wget(
        &client,
        &id,
        "Bearer $SANDPIT_SECRET_OPENAI",
        "https://api.secret.test/old-key",
    )
    .await;
    assert_ne!(code, 0, "no proxy vouches for the API with the old key");
    assert!(
        !internet.heads()[n..].iter().any(|h| h.contains(&value)),
        "the value went out"
    );

    // With the new key: the same CA, the value injected again.
    srv.set_env("SANDPIT_SECRETS_KEY_FILE", new_key.to_str().unwrap());
    srv.restart().await.unwrap();
    let client = srv.client();
    injected(&client, "after").await;
    assert_eq!(
        sh(&client, &id, "cat /etc/sandpit/secrets-ca.crt")
            .await
            .stdout,
        ca_in_sandbox
    );
    client.destroy_sandbox(&id).await.unwrap();
    assert!(!srv.log().contains(&value), "the log holds the value");
}

/// Without a secrets key the routes say so, and a create naming secrets is refused.
#[tokio::test]
async fn secrets_need_a_key() {
    let srv = crate::server().await;
    let client = srv.client();
    assert_api_err(client.list_secrets().await, 403, "secrets_disabled");
    assert_api_err(
        client
            .create_secret(&header_secret("openai", "sk-1", &["api.example.com"]))
            .await,
        403,
        "secrets_disabled",
    );
    assert_api_err(
        client
            .create_sandbox(&CreateSandboxRequest {
                template: "base".into(),
                secrets: vec!["openai".into()],
                ..Default::default()
            })
            .await,
        403,
        "secrets_disabled",
    );
}

fn rand_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    let f = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut &f, &mut b).unwrap();
    b
}
