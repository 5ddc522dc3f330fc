//! A local OCI registry for tests: Debian's `docker-registry` on 127.0.0.1 with a random
//! port and a temporary storage directory (optionally behind basic auth), and images made
//! offline from the host's static busybox, pushed with `oci-client`.
#![expect(
    clippy::disallowed_methods,
    reason = "the test registry's own temp dirs"
)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use sandpit_image::oci_client::client::{Config, ImageLayer};
use sandpit_image::oci_client::secrets::RegistryAuth;
use sha2::{Digest, Sha256};

/// A running registry; killed on drop.
pub struct Registry {
    /// `127.0.0.1:<port>`.
    pub host: String,
    pub auth: Option<(String, String)>,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Start a registry; with `auth`, it requires basic auth with that user and password.
    pub async fn start(auth: Option<(&str, &str)>) -> anyhow::Result<Registry> {
        let bin = ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("docker-registry is not installed (scripts/install-deps installs it)")?;
        let dir = tempfile::Builder::new()
            .prefix("sandpit-registry-")
            .tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let host = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = auth {
            let hash = bcrypt::hash(password, 4)?;
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, format!("{user}:{hash}\n"))?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: sandpit-test\n    path: {}\n",
                file.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(bin)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning docker-registry")?;
        let registry = Registry {
            host,
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
            child,
            _dir: dir,
        };
        let url = format!("http://{}/v2/", registry.host);
        let http = reqwest::Client::new();
        crate::wait_until(Duration::from_secs(20), "the registry to answer", || {
            let (http, url) = (http.clone(), url.clone());
            async move { http.get(&url).send().await.ok().map(|_| ()) }
        })
        .await?;
        Ok(registry)
    }

    fn registry_auth(&self) -> RegistryAuth {
        match &self.auth {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    /// Push an image of `layers` (uncompressed tarballs, lowest first) with `config` (the
    /// image config's `config` object) as `<host>/<repo>:<tag>`; returns the reference.
    pub async fn push(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Vec<u8>],
        config: serde_json::Value,
    ) -> anyhow::Result<String> {
        let reference = format!("{}/{repo}:{tag}", self.host);
        let r = sandpit_image::registry::parse_reference(&reference)?;
        let client = sandpit_image::registry::push_client(&r, &[]);
        let mut diff_ids = Vec::new();
        let mut image_layers = Vec::new();
        for tar in layers {
            diff_ids.push(format!("sha256:{}", hex::encode(Sha256::digest(tar))));
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, tar)?;
            image_layers.push(ImageLayer::new(
                gz.finish()?,
                "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                None,
            ));
        }
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = Config::new(
            serde_json::to_vec(&config)?,
            "application/vnd.oci.image.config.v1+json".into(),
            None::<BTreeMap<String, String>>,
        );
        client
            .push(&r, &image_layers, config, &self.registry_auth(), None)
            .await
            .with_context(|| format!("pushing {reference}"))?;
        Ok(reference)
    }
}

/// An uncompressed tar of a busybox root file system: the host's static busybox with a
/// symlink per applet, `/etc/passwd`, `/tmp`, plus whatever `extra` adds.
pub fn busybox_rootfs_tar(
    extra: impl FnOnce(&mut tar::Builder<Vec<u8>>),
) -> anyhow::Result<Vec<u8>> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("no /bin/busybox (install busybox-static)");
    }
    let mut t = tar::Builder::new(Vec::new());
    let dir = |t: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        t.append_data(&mut h, path, std::io::empty())
    };
    for d in ["bin/", "etc/", "root/", "proc/", "sys/", "dev/"] {
        dir(&mut t, d, 0o755)?;
    }
    dir(&mut t, "tmp/", 0o1777)?;
    t.append_path_with_name(busybox, "bin/busybox")?;
    let list = Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet.is_empty() || applet == "busybox" {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        t.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
    }
    file(
        &mut t,
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        0o644,
    )?;
    file(&mut t, "etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    extra(&mut t);
    Ok(t.into_inner()?)
}

/// Append a regular file to a tar.
pub fn file(
    t: &mut tar::Builder<Vec<u8>>,
    path: &str,
    body: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(body.len() as u64);
    h.set_mode(mode);
    t.append_data(&mut h, path, body)
}

/// A front for a registry (started without auth) that speaks the Docker token flow: every
/// `/v2/` request without `Authorization: Bearer <token>` gets a 401 whose
/// `WWW-Authenticate: Bearer realm=…` names this front's `/token` endpoint, which hands out the
/// token for the right basic credentials. Authorized requests are forwarded to the registry.
pub struct BearerFront {
    /// `127.0.0.1:<port>`: pull `<host>/<repo>:<tag>` from here.
    pub host: String,
    /// How many tokens `/token` handed out.
    pub tokens_issued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BearerFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Front {
    upstream: String,
    realm: String,
    basic: String,
    token: String,
    issued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    http: reqwest::Client,
}

impl Registry {
    /// Serve this registry behind the bearer-token flow, for `user`/`password`.
    pub async fn bearer_front(&self, user: &str, password: &str) -> anyhow::Result<BearerFront> {
        use base64::Engine;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let host = listener.local_addr()?.to_string();
        let issued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let front = std::sync::Arc::new(Front {
            upstream: self.host.clone(),
            realm: format!("http://{host}/token"),
            basic: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            ),
            token: "sandpit-test-bearer-token".into(),
            issued: issued.clone(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
        });
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let front = front.clone();
            async move { front.serve(req).await }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(BearerFront {
            host,
            tokens_issued: issued,
            task,
        })
    }
}

impl Front {
    async fn serve(&self, req: axum::extract::Request) -> axum::response::Response {
        use axum::http::{StatusCode, header};
        use axum::response::IntoResponse;
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if req.uri().path() == "/token" {
            if auth != self.basic {
                return StatusCode::UNAUTHORIZED.into_response();
            }
            self.issued
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return axum::Json(serde_json::json!({
                "token": self.token,
                "access_token": self.token,
                "expires_in": 300,
            }))
            .into_response();
        }
        if auth != format!("Bearer {}", self.token) {
            return (
                StatusCode::UNAUTHORIZED,
                [(
                    header::WWW_AUTHENTICATE,
                    format!(
                        "Bearer realm=\"{}\",service=\"sandpit-test\",scope=\"repository:*:pull\"",
                        self.realm
                    ),
                )],
                axum::Json(serde_json::json!({"errors": [{"code": "UNAUTHORIZED"}]})),
            )
                .into_response();
        }
        let path_and_query = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        let method = req.method().clone();
        let mut headers = req.headers().clone();
        headers.remove(header::AUTHORIZATION);
        headers.remove(header::HOST);
        let body = match axum::body::to_bytes(req.into_body(), 1 << 30).await {
            Ok(b) => b,
            Err(_) => return StatusCode::BAD_REQUEST.into_response(),
        };
        let upstream = self
            .http
            .request(method, format!("http://{}{path_and_query}", self.upstream))
            .headers(headers)
            .body(body)
            .send()
            .await;
        match upstream {
            Ok(r) => {
                let status = r.status();
                let headers = r.headers().clone();
                let body = r.bytes().await.unwrap_or_default();
                let mut resp = (status, body).into_response();
                for (k, v) in &headers {
                    if k != header::CONTENT_LENGTH && k != header::TRANSFER_ENCODING {
                        resp.headers_mut().insert(k, v.clone());
                    }
                }
                resp
            }
            Err(_) => StatusCode::BAD_GATEWAY.into_response(),
        }
    }
}
