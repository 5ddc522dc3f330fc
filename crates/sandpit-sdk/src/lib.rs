//! Rust client for the Sandpit HTTP API, over the shared types of `sandpit-api-types`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sandpit_sdk::SdkError> {
//! use sandpit_sdk::{Client, types::{CreateSandboxRequest, ExecRequest}};
//! let client = Client::new("http://127.0.0.1:7878", "sp_...");
//! let sb = client.create_sandbox(&CreateSandboxRequest { template: "base".into(), ..Default::default() }).await?;
//! let out = client.exec(&sb.id, &ExecRequest { command: Some("echo hi".into()), ..Default::default() }).await?;
//! assert_eq!(out.stdout, "hi\n");
//! # Ok(()) }
//! ```
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        reason = "unit tests build host-side fixtures by path"
    )
)]

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;

pub use sandpit_api_types as types;
use types::*;

/// What can go wrong calling the API.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// The server answered with an error status.
    #[error("{status}: {code}: {message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("request to {url} failed")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("unexpected response from {url}: {detail}")]
    Decode { url: String, detail: String },
}

impl SdkError {
    /// The API error code, if the server sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            SdkError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            SdkError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An answer with the server's own account of where the time went: its `Server-Timing`
/// metrics (phase name, milliseconds, then `total`), empty when the header is absent or
/// malformed (see `sandpit_api_types::server_timing`).
#[derive(Debug, Clone)]
pub struct Timed<T> {
    pub value: T,
    pub server_timing: Vec<(String, f64)>,
}

/// A client bound to one server and one token.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str, token: &str) -> Self {
        Client {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: reqwest::Client::builder()
                .pool_idle_timeout(std::time::Duration::from_secs(30))
                .build()
                .expect("the HTTP client builds"),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// A request with the token set, for routes this client has no method for.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    async fn send(&self, rb: RequestBuilder) -> Result<Response, SdkError> {
        let req = rb.build().map_err(|source| SdkError::Http {
            url: self.base.clone(),
            source,
        })?;
        let url = req.url().to_string();
        let resp = self
            .http
            .execute(req)
            .await
            .map_err(|source| SdkError::Http {
                url: url.clone(),
                source,
            })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let parsed: Option<ErrorBody> = serde_json::from_str(&text).ok();
        Err(match parsed {
            Some(b) => SdkError::Api {
                status,
                code: b.error.code,
                message: b.error.message,
            },
            None => SdkError::Api {
                status,
                code: "unknown".into(),
                message: text,
            },
        })
    }

    async fn json<T: DeserializeOwned>(&self, rb: RequestBuilder) -> Result<T, SdkError> {
        let resp = self.send(rb).await?;
        let url = resp.url().to_string();
        let bytes = resp.bytes().await.map_err(|source| SdkError::Http {
            url: url.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| SdkError::Decode {
            url,
            detail: e.to_string(),
        })
    }

    async fn json_timed<T: DeserializeOwned>(
        &self,
        rb: RequestBuilder,
    ) -> Result<Timed<T>, SdkError> {
        let resp = self.send(rb).await?;
        let server_timing = resp
            .headers()
            .get(types::server_timing::HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(types::server_timing::parse)
            .unwrap_or_default();
        let url = resp.url().to_string();
        let bytes = resp.bytes().await.map_err(|source| SdkError::Http {
            url: url.clone(),
            source,
        })?;
        let value = serde_json::from_slice(&bytes).map_err(|e| SdkError::Decode {
            url,
            detail: e.to_string(),
        })?;
        Ok(Timed {
            value,
            server_timing,
        })
    }

    fn sandbox_path(id: &str, rest: &str) -> String {
        format!("/v1/sandboxes/{}{rest}", urlencode(id))
    }

    pub async fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<Sandbox, SdkError> {
        self.json(self.request(Method::POST, "/v1/sandboxes").json(req))
            .await
    }

    /// [`Client::create_sandbox`] with the server's timings.
    pub async fn create_sandbox_timed(
        &self,
        req: &CreateSandboxRequest,
    ) -> Result<Timed<Sandbox>, SdkError> {
        self.json_timed(self.request(Method::POST, "/v1/sandboxes").json(req))
            .await
    }

    pub async fn list_sandboxes(&self, status: Option<&str>) -> Result<Vec<Sandbox>, SdkError> {
        let mut rb = self.request(Method::GET, "/v1/sandboxes");
        if let Some(s) = status {
            rb = rb.query(&[("status", s)]);
        }
        let list: SandboxList = self.json(rb).await?;
        Ok(list.sandboxes)
    }

    pub async fn get_sandbox(&self, id: &str) -> Result<Sandbox, SdkError> {
        self.json(self.request(Method::GET, &Self::sandbox_path(id, "")))
            .await
    }

    pub async fn destroy_sandbox(&self, id: &str) -> Result<(), SdkError> {
        self.send(self.request(Method::DELETE, &Self::sandbox_path(id, "")))
            .await
            .map(drop)
    }

    pub async fn keepalive(&self, id: &str, timeout: &str) -> Result<Sandbox, SdkError> {
        let body = KeepaliveRequest {
            timeout: timeout.into(),
        };
        self.json(
            self.request(Method::POST, &Self::sandbox_path(id, "/keepalive"))
                .json(&body),
        )
        .await
    }

    /// Replace the egress policy; a running sandbox gets it at once.
    pub async fn set_egress(&self, id: &str, policy: &EgressPolicy) -> Result<Sandbox, SdkError> {
        self.json(
            self.request(Method::PUT, &Self::sandbox_path(id, "/egress"))
                .json(policy),
        )
        .await
    }

    pub async fn wake(&self, id: &str) -> Result<Sandbox, SdkError> {
        self.json(self.request(Method::POST, &Self::sandbox_path(id, "/wake")))
            .await
    }

    /// [`Client::wake`] with the server's timings.
    pub async fn wake_timed(&self, id: &str) -> Result<Timed<Sandbox>, SdkError> {
        self.json_timed(self.request(Method::POST, &Self::sandbox_path(id, "/wake")))
            .await
    }

    /// [`Client::hibernate`] with the server's timings.
    pub async fn hibernate_timed(&self, id: &str) -> Result<Timed<Sandbox>, SdkError> {
        self.json_timed(self.request(Method::POST, &Self::sandbox_path(id, "/hibernate")))
            .await
    }

    /// [`Client::fork`] with the server's timings.
    pub async fn fork_timed(
        &self,
        id: &str,
        count: u32,
    ) -> Result<Timed<Vec<ForkResult>>, SdkError> {
        let body = ForkRequest { count: Some(count) };
        let resp: Timed<ForkResponse> = self
            .json_timed(
                self.request(Method::POST, &Self::sandbox_path(id, "/fork"))
                    .json(&body),
            )
            .await?;
        Ok(Timed {
            value: resp.value.sandboxes,
            server_timing: resp.server_timing,
        })
    }

    /// Stop without memory; the next wake boots afresh with the sandbox's files.
    pub async fn shutdown(&self, id: &str) -> Result<Sandbox, SdkError> {
        self.json(self.request(Method::POST, &Self::sandbox_path(id, "/shutdown")))
            .await
    }

    pub async fn hibernate(&self, id: &str) -> Result<Sandbox, SdkError> {
        self.json(self.request(Method::POST, &Self::sandbox_path(id, "/hibernate")))
            .await
    }

    /// Fork into `count` children; one result per child.
    pub async fn fork(&self, id: &str, count: u32) -> Result<Vec<ForkResult>, SdkError> {
        let body = ForkRequest { count: Some(count) };
        let resp: ForkResponse = self
            .json(
                self.request(Method::POST, &Self::sandbox_path(id, "/fork"))
                    .json(&body),
            )
            .await?;
        Ok(resp.sandboxes)
    }

    pub async fn create_snapshot(&self, id: &str) -> Result<Snapshot, SdkError> {
        self.json(self.request(Method::POST, &Self::sandbox_path(id, "/snapshots")))
            .await
    }

    pub async fn list_snapshots(&self, id: &str) -> Result<Vec<Snapshot>, SdkError> {
        let list: SnapshotList = self
            .json(self.request(Method::GET, &Self::sandbox_path(id, "/snapshots")))
            .await?;
        Ok(list.snapshots)
    }

    pub async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), SdkError> {
        let path = format!("/v1/snapshots/{}", urlencode(snapshot_id));
        self.send(self.request(Method::DELETE, &path))
            .await
            .map(drop)
    }

    /// `POST /v1/volumes`: a named volume of `size` (e.g. `1G`; `None`: the server's default).
    pub async fn create_volume(&self, name: &str, size: Option<&str>) -> Result<Volume, SdkError> {
        let req = CreateVolumeRequest {
            name: name.into(),
            size: size.map(str::to_string),
        };
        self.json(self.request(Method::POST, "/v1/volumes").json(&req))
            .await
    }

    pub async fn list_volumes(&self) -> Result<Vec<Volume>, SdkError> {
        let list: VolumeList = self.json(self.request(Method::GET, "/v1/volumes")).await?;
        Ok(list.volumes)
    }

    pub async fn get_volume(&self, name: &str) -> Result<Volume, SdkError> {
        let path = format!("/v1/volumes/{}", urlencode(name));
        self.json(self.request(Method::GET, &path)).await
    }

    /// Refused (409 `volume_in_use`) while a live sandbox mounts it or a snapshot refers to it.
    pub async fn delete_volume(&self, name: &str) -> Result<(), SdkError> {
        let path = format!("/v1/volumes/{}", urlencode(name));
        self.send(self.request(Method::DELETE, &path))
            .await
            .map(drop)
    }

    /// `POST /v1/secrets`: a workspace secret (its value is never returned).
    pub async fn create_secret(&self, req: &CreateSecretRequest) -> Result<Secret, SdkError> {
        self.json(self.request(Method::POST, "/v1/secrets").json(req))
            .await
    }

    pub async fn list_secrets(&self) -> Result<Vec<Secret>, SdkError> {
        let list: SecretList = self.json(self.request(Method::GET, "/v1/secrets")).await?;
        Ok(list.secrets)
    }

    /// `PUT /v1/secrets/{name}`: a new value, used by the next request of every sandbox
    /// holding the secret.
    pub async fn replace_secret(&self, name: &str, value: &str) -> Result<Secret, SdkError> {
        let path = format!("/v1/secrets/{}", urlencode(name));
        let req = UpdateSecretRequest {
            value: value.into(),
        };
        self.json(self.request(Method::PUT, &path).json(&req)).await
    }

    pub async fn delete_secret(&self, name: &str) -> Result<(), SdkError> {
        let path = format!("/v1/secrets/{}", urlencode(name));
        self.send(self.request(Method::DELETE, &path))
            .await
            .map(drop)
    }

    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResponse, SdkError> {
        self.json(
            self.request(Method::POST, &Self::sandbox_path(id, "/exec"))
                .json(req),
        )
        .await
    }

    /// Run a command and receive its output as it is produced.
    pub async fn exec_stream(
        &self,
        id: &str,
        req: &ExecRequest,
    ) -> Result<impl Stream<Item = Result<ExecEvent, SdkError>> + use<>, SdkError> {
        let resp = self
            .send(
                self.request(Method::POST, &Self::sandbox_path(id, "/exec/stream"))
                    .json(req),
            )
            .await?;
        let url = resp.url().to_string();
        Ok(sse_events(resp.bytes_stream(), url))
    }

    /// Upload a file from any body (bytes, or a stream with `reqwest::Body::wrap_stream`).
    pub async fn upload(
        &self,
        id: &str,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<(), SdkError> {
        let rb = self
            .request(Method::PUT, &Self::sandbox_path(id, "/files"))
            .query(&[("path", path)])
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        self.send(rb).await.map(drop)
    }

    /// Start a download; read the body with `bytes_stream()` to stream it.
    pub async fn download(&self, id: &str, path: &str) -> Result<Response, SdkError> {
        let rb = self
            .request(Method::GET, &Self::sandbox_path(id, "/files"))
            .query(&[("path", path)]);
        self.send(rb).await
    }

    /// Watch a file or directory: one [`FileEvent`] per change (`add`, `change`, `remove`,
    /// `overflow`, `limit`), then `end`. Dropping the stream ends the watch. `excludes` are
    /// glob patterns relative to `path`.
    pub async fn watch(
        &self,
        id: &str,
        path: &str,
        recursive: bool,
        excludes: &[&str],
    ) -> Result<impl Stream<Item = Result<FileEvent, SdkError>> + use<>, SdkError> {
        let mut query = vec![
            ("path", path.to_string()),
            ("recursive", recursive.to_string()),
        ];
        query.extend(excludes.iter().map(|e| ("exclude", e.to_string())));
        let rb = self
            .request(Method::GET, &Self::sandbox_path(id, "/watch"))
            .query(&query);
        let resp = self.send(rb).await?;
        let url = resp.url().to_string();
        Ok(sse_events(resp.bytes_stream(), url))
    }

    pub async fn list_files(&self, id: &str, path: &str) -> Result<FileList, SdkError> {
        let rb = self
            .request(Method::GET, &Self::sandbox_path(id, "/files/list"))
            .query(&[("path", path)]);
        self.json(rb).await
    }

    /// The TCP ports listening inside the sandbox.
    pub async fn list_ports(&self, id: &str) -> Result<Vec<Port>, SdkError> {
        let list: PortList = self
            .json(self.request(Method::GET, &Self::sandbox_path(id, "/ports")))
            .await?;
        Ok(list.ports)
    }

    /// Wait until `port` listens inside the sandbox (`timeout` like `30s`; server default
    /// 30s). Fails with status 504, code `port_wait_timeout`, when it does not in time.
    pub async fn wait_port(
        &self,
        id: &str,
        port: u16,
        timeout: Option<&str>,
    ) -> Result<Vec<Port>, SdkError> {
        let mut rb = self.request(
            Method::GET,
            &Self::sandbox_path(id, &format!("/ports/{port}/wait")),
        );
        if let Some(t) = timeout {
            rb = rb.query(&[("timeout", t)]);
        }
        let list: PortList = self.json(rb).await?;
        Ok(list.ports)
    }

    /// The sandbox's terminals, running and exited.
    pub async fn list_terminals(&self, id: &str) -> Result<Vec<Terminal>, SdkError> {
        let list: TerminalList = self
            .json(self.request(Method::GET, &Self::sandbox_path(id, "/terminals")))
            .await?;
        Ok(list.terminals)
    }

    /// Start a process on a pseudo-terminal (the login shell unless `command` or `argv`).
    pub async fn create_terminal(
        &self,
        id: &str,
        req: &TerminalCreateRequest,
    ) -> Result<Terminal, SdkError> {
        self.json(
            self.request(Method::POST, &Self::sandbox_path(id, "/terminals"))
                .json(req),
        )
        .await
    }

    /// Kill a terminal's processes and forget it.
    pub async fn kill_terminal(&self, id: &str, terminal: &str) -> Result<(), SdkError> {
        let path = Self::sandbox_path(id, &format!("/terminals/{}", urlencode(terminal)));
        self.send(self.request(Method::DELETE, &path))
            .await
            .map(drop)
    }

    /// Change a terminal's window size.
    pub async fn resize_terminal(
        &self,
        id: &str,
        terminal: &str,
        cols: u32,
        rows: u32,
    ) -> Result<(), SdkError> {
        let path = Self::sandbox_path(id, &format!("/terminals/{}/resize", urlencode(terminal)));
        self.send(
            self.request(Method::POST, &path)
                .json(&TerminalResizeRequest { cols, rows }),
        )
        .await
        .map(drop)
    }

    /// The WebSocket URL (`ws://` or `wss://`) that attaches to a terminal; connect with
    /// this client's token as a bearer `Authorization` header ([`Client::token`]). Binary
    /// messages are the terminal's bytes both ways; text messages are JSON
    /// [`TerminalMessage`]s.
    pub fn terminal_attach_url(&self, id: &str, terminal: &str, replay: bool) -> String {
        let base = if let Some(rest) = self.base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = self.base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            self.base.clone()
        };
        format!(
            "{base}{}?replay={replay}",
            Self::sandbox_path(id, &format!("/terminals/{}/attach", urlencode(terminal)))
        )
    }

    /// The API token this client sends.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Change a sandbox's settings (preview privacy).
    pub async fn update_sandbox(
        &self,
        id: &str,
        req: &UpdateSandboxRequest,
    ) -> Result<Sandbox, SdkError> {
        self.json(
            self.request(Method::PATCH, &Self::sandbox_path(id, ""))
                .json(req),
        )
        .await
    }

    /// Create a preview token; `token` is set in this response only.
    pub async fn create_preview_token(
        &self,
        id: &str,
        req: &PreviewTokenCreateRequest,
    ) -> Result<PreviewToken, SdkError> {
        self.json(
            self.request(Method::POST, &Self::sandbox_path(id, "/preview-tokens"))
                .json(req),
        )
        .await
    }

    pub async fn list_preview_tokens(&self, id: &str) -> Result<Vec<PreviewToken>, SdkError> {
        let list: PreviewTokenList = self
            .json(self.request(Method::GET, &Self::sandbox_path(id, "/preview-tokens")))
            .await?;
        Ok(list.tokens)
    }

    pub async fn update_preview_token(
        &self,
        id: &str,
        token_id: &str,
        req: &PreviewTokenUpdateRequest,
    ) -> Result<PreviewToken, SdkError> {
        let path = format!("/preview-tokens/{}", urlencode(token_id));
        self.json(
            self.request(Method::PATCH, &Self::sandbox_path(id, &path))
                .json(req),
        )
        .await
    }

    pub async fn revoke_preview_token(&self, id: &str, token_id: &str) -> Result<(), SdkError> {
        let path = format!("/preview-tokens/{}", urlencode(token_id));
        self.send(self.request(Method::DELETE, &Self::sandbox_path(id, &path)))
            .await
            .map(drop)
    }

    /// Start a template build (from `req.image` or `req.dockerfile` + `req.context`).
    pub async fn create_template(&self, req: &CreateTemplateRequest) -> Result<Template, SdkError> {
        self.json(self.request(Method::POST, "/v1/templates").json(req))
            .await
    }

    /// A template by id, name or `namespace@alias`.
    pub async fn get_template(&self, id: &str) -> Result<Template, SdkError> {
        self.json(self.request(Method::GET, &format!("/v1/templates/{}", urlencode(id))))
            .await
    }

    pub async fn delete_template(&self, id: &str, force: bool) -> Result<(), SdkError> {
        let path = format!("/v1/templates/{}?force={force}", urlencode(id));
        self.send(self.request(Method::DELETE, &path))
            .await
            .map(drop)
    }

    /// Start the build of a built-in template built on demand (`toolchain`).
    pub async fn build_builtin_template(&self, id: &str) -> Result<Template, SdkError> {
        let path = format!("/v1/templates/{}/build", urlencode(id));
        self.json(self.request(Method::POST, &path)).await
    }

    /// A build's events from its start; ends after `finished`.
    pub async fn template_build_events(
        &self,
        id: &str,
    ) -> Result<impl Stream<Item = Result<TemplateBuildEvent, SdkError>> + use<>, SdkError> {
        let path = format!("/v1/templates/{}/build", urlencode(id));
        let resp = self.send(self.request(Method::GET, &path)).await?;
        let url = resp.url().to_string();
        Ok(sse_events(resp.bytes_stream(), url))
    }

    /// Point `namespace@alias` at a template.
    pub async fn set_template_alias(
        &self,
        id: &str,
        alias: &str,
    ) -> Result<TemplateAlias, SdkError> {
        let path = format!(
            "/v1/templates/{}/aliases/{}",
            urlencode(id),
            urlencode(alias)
        );
        self.json(self.request(Method::PUT, &path)).await
    }

    pub async fn delete_template_alias(&self, id: &str, alias: &str) -> Result<(), SdkError> {
        let path = format!(
            "/v1/templates/{}/aliases/{}",
            urlencode(id),
            urlencode(alias)
        );
        self.send(self.request(Method::DELETE, &path))
            .await
            .map(drop)
    }

    /// The versions of the template name `id` (an id, name, `name:N` or alias) belongs to,
    /// oldest first.
    pub async fn template_versions(&self, id: &str) -> Result<Vec<Template>, SdkError> {
        let path = format!("/v1/templates/{}/versions", urlencode(id));
        let list: TemplateList = self.json(self.request(Method::GET, &path)).await?;
        Ok(list.templates)
    }

    pub async fn templates(&self) -> Result<Vec<Template>, SdkError> {
        let list: TemplateList = self
            .json(self.request(Method::GET, "/v1/templates"))
            .await?;
        Ok(list.templates)
    }

    pub async fn create_workspace(&self, name: &str) -> Result<Workspace, SdkError> {
        let body = WorkspaceCreateRequest { name: name.into() };
        let env: Envelope<Workspace> = self
            .json(self.request(Method::POST, "/org/workspace").json(&body))
            .await?;
        unwrap_envelope(env, "/org/workspace")
    }

    pub async fn create_token(
        &self,
        team_id: &str,
        req: &TokenCreateRequest,
    ) -> Result<TokenInfo, SdkError> {
        let path = format!("/org/workspace/{}/tokens", urlencode(team_id));
        let env: Envelope<TokenInfo> = self
            .json(self.request(Method::POST, &path).json(req))
            .await?;
        unwrap_envelope(env, &path)
    }

    pub async fn update_token(
        &self,
        team_id: &str,
        token_id: &str,
        req: &TokenUpdateRequest,
    ) -> Result<TokenInfo, SdkError> {
        let path = format!(
            "/org/workspace/{}/tokens/{}",
            urlencode(team_id),
            urlencode(token_id)
        );
        let env: Envelope<TokenInfo> = self
            .json(self.request(Method::PATCH, &path).json(req))
            .await?;
        unwrap_envelope(env, &path)
    }

    pub async fn revoke_token(&self, team_id: &str, token_id: &str) -> Result<(), SdkError> {
        let path = format!(
            "/org/workspace/{}/tokens/{}",
            urlencode(team_id),
            urlencode(token_id)
        );
        self.send(self.request(Method::DELETE, &path))
            .await
            .map(drop)
    }
}

fn unwrap_envelope<T>(env: Envelope<T>, url: &str) -> Result<T, SdkError> {
    env.data.ok_or_else(|| SdkError::Decode {
        url: url.into(),
        detail: "envelope without data".into(),
    })
}

/// Percent-encode one path segment.
fn urlencode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parse a Server-Sent Events byte stream into exec events.
fn sse_events<T: DeserializeOwned>(
    bytes: impl Stream<Item = Result<Bytes, reqwest::Error>> + Unpin,
    url: String,
) -> impl Stream<Item = Result<T, SdkError>> {
    futures::stream::unfold(
        (bytes, Vec::<u8>::new(), url),
        |(mut bytes, mut buf, url)| async move {
            loop {
                if let Some(end) = find_event_end(&buf) {
                    let raw: Vec<u8> = buf.drain(..end.0 + end.1).collect();
                    let text = String::from_utf8_lossy(&raw[..end.0]).to_string();
                    let data: String = text
                        .lines()
                        .filter_map(|l| l.strip_prefix("data:"))
                        .map(|d| d.strip_prefix(' ').unwrap_or(d))
                        .collect::<Vec<_>>()
                        .join("\n");
                    if data.is_empty() {
                        continue; // keep-alive comment
                    }
                    let item = serde_json::from_str::<T>(&data).map_err(|e| SdkError::Decode {
                        url: url.clone(),
                        detail: format!("bad event {data:?}: {e}"),
                    });
                    return Some((item, (bytes, buf, url)));
                }
                match bytes.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(source)) => {
                        return Some((
                            Err(SdkError::Http {
                                url: url.clone(),
                                source,
                            }),
                            (bytes, Vec::new(), url),
                        ));
                    }
                    None => return None,
                }
            }
        },
    )
}

/// Position and length of the first blank-line separator in an SSE buffer.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_sse_events_across_chunks() {
        let chunks: Vec<Result<Bytes, reqwest::Error>> = vec![
            Ok(Bytes::from_static(b": keep-alive\n\nevent: stdout\ndata: {\"type\":\"stdout\",\"seq\":1,")),
            Ok(Bytes::from_static(b"\"data\":\"aGkK\"}\n\nevent: exit\ndata: {\"type\":\"exit\",\"exit_code\":3,\"duration_ms\":5,\"timed_out\":false}\n\n")),
        ];
        let events: Vec<_> = sse_events(futures::stream::iter(chunks), "u".into())
            .map(|e| e.unwrap())
            .collect()
            .await;
        assert_eq!(events.len(), 2);
        assert!(matches!(&events[0], ExecEvent::Stdout { seq: 1, data } if data == "aGkK"));
        assert!(matches!(events[1], ExecEvent::Exit { exit_code: 3, .. }));
    }

    #[test]
    fn encodes_path_segments() {
        assert_eq!(urlencode("sb12"), "sb12");
        assert_eq!(urlencode("../x y"), "..%2Fx%20y");
    }
}
