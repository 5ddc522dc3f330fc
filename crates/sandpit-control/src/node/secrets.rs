//! Workspace secrets that never enter a sandbox: the master key and sealing of values at rest
//! (AES-256-GCM, a random nonce per value, the workspace and name as associated data), the
//! rules of a secret, the `/v1/secrets` operations, and what a sandbox holding secrets gets:
//! placeholders in its environment, its lineage's CA in its trust store (through its agent),
//! and a [`SecretsBinding`] in the network's proxy (`sandpit_net::secrets`) at every boot.
//!
//! The CA of a lineage lives in `<data dir>/secrets-ca/<lineage>/` (`ca.crt`, `ca.key` mode
//! 0600, the directory 0700): host-owned files, never in a sandbox's tree.
#![expect(
    clippy::disallowed_methods,
    reason = "the lineage CAs live in the data dir's own secrets-ca/, never a tenant tree"
)]

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use async_trait::async_trait;
use rand::RngCore;
use sandpit_api_types::{
    CreateSecretRequest, MAX_SANDBOX_SECRETS, MAX_SECRET_HOSTS, MAX_SECRET_VALUE, Secret,
    SecretInject, secret_env, valid_secret_name,
};
use sandpit_net::secrets::{Inject, LineageCa, LiveSecret, SecretSource, SecretsBinding};

use crate::error::ControlError;
use crate::metrics::SecretLabels;
use crate::node::Node;
use crate::store::{SandboxSecrets, SecretRow, Store};
use crate::util::{now_ms, random_hex, rfc3339};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Where a sandbox holding secrets finds its lineage's CA certificate.
pub const CA_CERT_PATH: &str = "/etc/sandpit/secrets-ca.crt";
/// The system's bundle and the CA together (what `SSL_CERT_FILE` names).
pub const CA_BUNDLE_PATH: &str = "/etc/sandpit/ca-bundle.crt";
/// Where the system bundle is looked for in the sandbox, first found wins.
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];
/// The most of a sandbox's system bundle read (it is the tenant's file).
const MAX_SYSTEM_BUNDLE: u64 = 4 << 20;
/// The longest header name, format, query parameter and basic-auth user name.
const MAX_INJECT_TEXT: usize = 256;
/// Headers that frame or route a request: never the target of a secret.
const RESERVED_HEADERS: [&str; 6] = [
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "keep-alive",
    "upgrade",
];

/// The operator's master key (`--secrets-key-file`, `SANDPIT_SECRETS_KEY`): 32 bytes, given
/// as 64 hex digits. Never printed.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// 64 hex digits (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<MasterKey, ControlError> {
        let bad = || {
            ControlError::invalid(
                "invalid_secrets_key",
                "the secrets key must be 64 hex digits (32 bytes; `openssl rand -hex 32`)",
            )
        };
        let bytes = hex::decode(text.trim()).map_err(|_| bad())?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
        Ok(MasterKey(key))
    }

    /// The key in the file at `path`.
    pub fn from_file(path: &Path) -> Result<MasterKey, ControlError> {
        let text = std::fs::read_to_string(path).map_err(ControlError::files(format!(
            "secrets key {}",
            path.display()
        )))?;
        MasterKey::parse(&text)
    }

    /// A new random key, as 64 hex digits.
    pub fn generate_hex() -> String {
        random_hex(32)
    }

    /// `value` sealed for secret `name` of `workspace`: `v1:` + hex(nonce ‖ ciphertext).
    pub fn seal(&self, workspace: &str, name: &str, value: &str) -> Result<String, ControlError> {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let aad = format!("{workspace}/{name}");
        let ct = self
            .cipher()
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| ControlError::Internal("sealing a secret failed".into()))?;
        Ok(format!("v1:{}{}", hex::encode(nonce), hex::encode(ct)))
    }

    /// The value [`MasterKey::seal`] sealed for `name` of `workspace`. Fails closed
    /// (`Corrupt`) with another key, another secret's ciphertext, or altered bytes.
    pub fn open(&self, workspace: &str, name: &str, sealed: &str) -> Result<String, ControlError> {
        let what = || format!("value of secret {name:?} of workspace {workspace}");
        let raw = sealed
            .strip_prefix("v1:")
            .and_then(|h| hex::decode(h).ok())
            .filter(|b| b.len() > 12)
            .ok_or_else(|| ControlError::corrupt(what(), "not a sealed value"))?;
        let (nonce, ct) = raw.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().expect("split at 12");
        let aad = format!("{workspace}/{name}");
        let plain = self
            .cipher()
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| ControlError::corrupt(what(), "does not open with this key"))?;
        String::from_utf8(plain).map_err(|_| ControlError::corrupt(what(), "not UTF-8"))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&Key::<Aes256Gcm>::from(self.0))
    }
}

/// What a node needs to serve secrets: the master key and how the proxy connects upstream.
#[derive(Debug)]
pub struct SecretsConfig {
    pub key: MasterKey,
    /// The host's roots plus the operator's extra CAs (`--secrets-extra-ca-file`).
    pub upstream: Arc<rustls::ClientConfig>,
}

/// A node's secrets state: its configuration and the lineage CAs it has loaded.
#[derive(Debug)]
pub struct SecretsState {
    pub cfg: SecretsConfig,
    /// Lineage → its CA. Guards only the map.
    cas: Mutex<HashMap<String, Arc<LineageCa>>>,
}

impl SecretsState {
    pub fn new(cfg: SecretsConfig) -> SecretsState {
        SecretsState {
            cfg,
            cas: Mutex::default(),
        }
    }
}

/// The TLS client configuration of the proxy's upstream connections: the host's root
/// certificates and the PEM certificates of `extra_ca_files`; ALPN `http/1.1`.
pub fn upstream_config(
    extra_ca_files: &[PathBuf],
) -> Result<Arc<rustls::ClientConfig>, ControlError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!(error = %e, "reading the host's root certificates");
    }
    let (added, _) = roots.add_parsable_certificates(native.certs);
    for path in extra_ca_files {
        let pem = std::fs::read_to_string(path).map_err(ControlError::files(format!(
            "extra CA file {}",
            path.display()
        )))?;
        let certs = pem_certs(&pem);
        if certs.is_empty() {
            return Err(ControlError::invalid(
                "invalid_secrets_ca",
                format!("{} holds no PEM certificate", path.display()),
            ));
        }
        for c in certs {
            roots.add(c).map_err(|e| {
                ControlError::invalid(
                    "invalid_secrets_ca",
                    format!("a certificate of {}: {e}", path.display()),
                )
            })?;
        }
    }
    tracing::debug!(
        host_roots = added,
        extra = extra_ca_files.len(),
        "secrets proxy: upstream roots"
    );
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ControlError::Internal(format!("TLS versions: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The DER certificates of every `CERTIFICATE` block of `pem`.
fn pem_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use base64::Engine;
    let mut out = Vec::new();
    for block in pem.split("-----BEGIN CERTIFICATE-----").skip(1) {
        let Some(body) = block.split("-----END CERTIFICATE-----").next() else {
            continue;
        };
        let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
        if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(b64) {
            out.push(der.into());
        }
    }
    out
}

/// A checked `POST /v1/secrets`.
#[derive(Debug, Clone)]
pub struct ValidSecret {
    pub name: String,
    pub hosts: Vec<String>,
    pub inject: SecretInject,
}

fn invalid(code: &'static str, message: impl Into<String>) -> ControlError {
    ControlError::invalid(code, message)
}

/// Printable ASCII (space to `~`), nothing else.
fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// 1 to 8192 bytes of printable ASCII: a value goes into header lines and URLs.
pub fn check_value(value: &str) -> Result<(), ControlError> {
    if value.is_empty() || value.len() > MAX_SECRET_VALUE {
        return Err(invalid(
            "invalid_secret_value",
            format!("a secret's value is 1 to {MAX_SECRET_VALUE} bytes"),
        ));
    }
    if !printable(value) {
        return Err(invalid(
            "invalid_secret_value",
            "a secret's value is printable ASCII (no control characters, no line breaks)",
        ));
    }
    Ok(())
}

/// Everything about a new secret that the request alone decides (nothing is read).
pub fn check_request(req: &CreateSecretRequest) -> Result<ValidSecret, ControlError> {
    if !valid_secret_name(&req.name) {
        return Err(invalid(
            "invalid_secret_name",
            "a secret's name is [a-z][a-z0-9_]*, 1 to 63 characters",
        ));
    }
    check_value(&req.value)?;
    if req.hosts.is_empty() || req.hosts.len() > MAX_SECRET_HOSTS {
        return Err(invalid(
            "invalid_secret_hosts",
            format!("a secret lists 1 to {MAX_SECRET_HOSTS} hosts"),
        ));
    }
    let mut hosts = Vec::new();
    for h in &req.hosts {
        let p = sandpit_net::sniff::normalize_pattern(h)
            .map_err(|m| invalid("invalid_secret_hosts", m))?;
        if !hosts.contains(&p) {
            hosts.push(p);
        }
    }
    let inject = check_inject(&req.inject)?;
    Ok(ValidSecret {
        name: req.name.clone(),
        hosts,
        inject,
    })
}

/// Exactly one form; names and formats short, printable, and unable to frame a request.
fn check_inject(i: &SecretInject) -> Result<SecretInject, ControlError> {
    let bad = |m: &str| invalid("invalid_secret_inject", m.to_string());
    let forms = [i.header.is_some(), i.query.is_some(), i.basic.is_some()];
    if forms.iter().filter(|f| **f).count() != 1 {
        return Err(bad("inject takes exactly one of header, query or basic"));
    }
    if i.format.is_some() && i.header.is_none() {
        return Err(bad("format goes with header only"));
    }
    let token = |s: &str| {
        !s.is_empty()
            && s.len() <= MAX_INJECT_TEXT
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if let Some(h) = &i.header {
        if !token(h) {
            return Err(bad("header is an HTTP header name"));
        }
        if RESERVED_HEADERS.iter().any(|r| h.eq_ignore_ascii_case(r)) {
            return Err(bad("header may not be one that frames or routes a request"));
        }
        let format = i.format.clone().unwrap_or_else(|| "{value}".into());
        if format.len() > MAX_INJECT_TEXT
            || !printable(&format)
            || format.matches("{value}").count() != 1
        {
            return Err(bad(
                "format is printable ASCII (at most 256 bytes) holding {value} once",
            ));
        }
        return Ok(SecretInject {
            header: Some(h.clone()),
            format: Some(format),
            ..Default::default()
        });
    }
    if let Some(q) = &i.query {
        let ok = !q.is_empty()
            && q.len() <= MAX_INJECT_TEXT
            && q.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
        if !ok {
            return Err(bad("query is a parameter name of [A-Za-z0-9._~-]"));
        }
        return Ok(i.clone());
    }
    let Some(b) = &i.basic else {
        return Err(bad("inject takes exactly one of header, query or basic"));
    };
    if b.username.len() > MAX_INJECT_TEXT || !printable(&b.username) || b.username.contains(':') {
        return Err(bad(
            "basic.username is printable ASCII without ':' (at most 256 bytes)",
        ));
    }
    Ok(i.clone())
}

/// The proxy's form of a stored `inject`; a stored one that does not check is `Corrupt`.
fn net_inject(stored: &str, what: impl Fn() -> String) -> Result<Inject, ControlError> {
    let api: SecretInject = crate::error::decode(&what, stored)?;
    let api = check_inject(&api).map_err(|e| ControlError::corrupt(what(), e))?;
    Ok(match (api.header, api.format, api.query, api.basic) {
        (Some(name), Some(format), _, _) => Inject::Header { name, format },
        (_, _, Some(param), _) => Inject::Query { param },
        (_, _, _, Some(b)) => Inject::Basic {
            username: b.username,
        },
        _ => return Err(ControlError::corrupt(what(), "no form")),
    })
}

/// The node's secrets state; `Forbidden{secrets_disabled}` when the server has no key.
pub fn state(node: &Node) -> Result<&Arc<SecretsState>, ControlError> {
    node.secrets.get().ok_or_else(|| ControlError::Forbidden {
        code: "secrets_disabled",
        message: "this server keeps no secrets: its operator has not configured a secrets key (--secrets-key-file or SANDPIT_SECRETS_KEY)".into(),
    })
}

/// A secret as responses show it (never its value). A stored record that does not decode
/// is `Corrupt`.
pub fn to_api(row: &SecretRow) -> Result<Secret, ControlError> {
    let what = || format!("secret {:?} of workspace {}", row.name, row.workspace_id);
    Ok(Secret {
        name: row.name.clone(),
        hosts: crate::error::decode(what, &row.hosts)?,
        inject: crate::error::decode(what, &row.inject)?,
        env: secret_env(&row.name),
        created_at: rfc3339(row.created_at),
        updated_at: rfc3339(row.updated_at),
    })
}

/// `POST /v1/secrets`.
pub async fn create(
    node: &Node,
    workspace: &str,
    req: &CreateSecretRequest,
) -> Result<Secret, ControlError> {
    let state = state(node)?;
    let valid = check_request(req)?;
    let now = now_ms();
    let row = SecretRow {
        workspace_id: workspace.to_string(),
        name: valid.name.clone(),
        sealed: state.cfg.key.seal(workspace, &valid.name, &req.value)?,
        hosts: serde_json::to_string(&valid.hosts).expect("strings encode"),
        inject: serde_json::to_string(&valid.inject).expect("plain struct encodes"),
        created_at: now,
        updated_at: now,
    };
    node.store.secrets.insert(&row).await?;
    to_api(&row)
}

fn not_found(name: &str) -> ControlError {
    ControlError::not_found("secret_not_found", format!("no secret {name:?}"))
}

/// `PUT /v1/secrets/{name}`: a new value, used by the next intercepted request.
pub async fn replace(
    node: &Node,
    workspace: &str,
    name: &str,
    value: &str,
) -> Result<Secret, ControlError> {
    let state = state(node)?;
    if !valid_secret_name(name) {
        return Err(not_found(name));
    }
    check_value(value)?;
    let sealed = state.cfg.key.seal(workspace, name, value)?;
    if !node
        .store
        .secrets
        .set_sealed(workspace, name, &sealed, now_ms())
        .await?
    {
        return Err(not_found(name));
    }
    let row = node
        .store
        .secrets
        .get(workspace, name)
        .await?
        .ok_or_else(|| not_found(name))?;
    to_api(&row)
}

/// `DELETE /v1/secrets/{name}`: no request is injected with it from now on.
pub async fn delete(node: &Node, workspace: &str, name: &str) -> Result<(), ControlError> {
    state(node)?;
    if !valid_secret_name(name) || !node.store.secrets.delete(workspace, name).await? {
        return Err(not_found(name));
    }
    Ok(())
}

/// `GET /v1/secrets`.
pub async fn list(node: &Node, workspace: &str) -> Result<Vec<Secret>, ControlError> {
    state(node)?;
    node.store
        .secrets
        .list(workspace)
        .await?
        .iter()
        .map(to_api)
        .collect()
}

/// For a create naming `names`: checks them (they exist in the workspace, at most 16, no
/// repeats), draws a new lineage and a placeholder per secret, and puts the placeholders
/// (`SANDPIT_SECRET_<NAME>`) and the CA variables into `env` (the request's own CA
/// variables win). `None` for no secrets. Changes nothing stored.
pub async fn prepare_sandbox(
    node: &Node,
    workspace: &str,
    names: &[String],
    env: &mut BTreeMap<String, String>,
) -> Result<Option<SandboxSecrets>, ControlError> {
    if names.is_empty() {
        return Ok(None);
    }
    state(node)?;
    if names.len() > MAX_SANDBOX_SECRETS {
        return Err(invalid(
            "invalid_secrets",
            format!("a sandbox holds at most {MAX_SANDBOX_SECRETS} secrets"),
        ));
    }
    let mut placeholders = BTreeMap::new();
    for name in names {
        if !valid_secret_name(name) || node.store.secrets.get(workspace, name).await?.is_none() {
            return Err(ControlError::not_found(
                "secret_not_found",
                format!("no secret {name:?}"),
            ));
        }
        let placeholder = format!("sandpit-placeholder-{}", random_hex(16));
        if placeholders.insert(name.clone(), placeholder).is_some() {
            return Err(invalid(
                "invalid_secrets",
                format!("secret {name:?} is named twice"),
            ));
        }
    }
    for (name, placeholder) in &placeholders {
        env.insert(secret_env(name), placeholder.clone());
    }
    for (var, path) in [
        ("SSL_CERT_FILE", CA_BUNDLE_PATH),
        ("REQUESTS_CA_BUNDLE", CA_BUNDLE_PATH),
        ("CURL_CA_BUNDLE", CA_BUNDLE_PATH),
        ("NODE_EXTRA_CA_CERTS", CA_CERT_PATH),
    ] {
        env.entry(var.to_string())
            .or_insert_with(|| path.to_string());
    }
    Ok(Some(SandboxSecrets {
        workspace_id: workspace.to_string(),
        lineage: random_hex(16),
        placeholders,
    }))
}

/// The directory of a lineage's CA.
fn ca_dir(node: &Node, lineage: &str) -> PathBuf {
    node.cfg.data_dir.join("secrets-ca").join(lineage)
}

/// The CA of `lineage`: loaded, or read from the data dir, or made there.
fn lineage_ca(
    node: &Node,
    state: &SecretsState,
    lineage: &str,
) -> Result<Arc<LineageCa>, ControlError> {
    if !lineage.bytes().all(|b| b.is_ascii_hexdigit()) || lineage.len() != 32 {
        return Err(ControlError::corrupt(
            "a sandbox's secrets lineage",
            lineage,
        ));
    }
    if let Some(ca) = state.cas.lock().expect("not poisoned").get(lineage) {
        return Ok(ca.clone());
    }
    let dir = ca_dir(node, lineage);
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let files = |what: &str| ControlError::files(format!("{what} of lineage {lineage}"));
    let (cert_pem, key_pem) = match std::fs::read_to_string(&key) {
        Ok(key_pem) => (
            std::fs::read_to_string(&crt).map_err(files("the CA certificate"))?,
            key_pem,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (cert_pem, key_pem) = LineageCa::generate()?;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(files("the CA directory"))?;
            write_new(&dir.join("ca.key.tmp"), &key_pem, 0o600).map_err(files("the CA key"))?;
            write_new(&dir.join("ca.crt.tmp"), &cert_pem, 0o644)
                .map_err(files("the CA certificate"))?;
            std::fs::rename(dir.join("ca.crt.tmp"), &crt).map_err(files("the CA certificate"))?;
            std::fs::rename(dir.join("ca.key.tmp"), &key).map_err(files("the CA key"))?;
            (cert_pem, key_pem)
        }
        Err(e) => return Err(files("the CA key")(e)),
    };
    let ca = Arc::new(LineageCa::load(&cert_pem, &key_pem)?);
    state
        .cas
        .lock()
        .expect("not poisoned")
        .insert(lineage.to_string(), ca.clone());
    Ok(ca)
}

/// Writes `text` to a new file of `mode` (replacing a leftover temporary file).
fn write_new(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Where the proxy reads a sandbox's secrets: the store, opened with the master key.
struct StoreSource {
    store: Store,
    key: MasterKey,
    workspace: String,
    sandbox: String,
    /// The node's `secret_injections` counters (shared with its registry).
    injections: Family<SecretLabels, Counter>,
}

impl std::fmt::Debug for StoreSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSource")
            .field("workspace", &self.workspace)
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl SecretSource for StoreSource {
    async fn current(&self, names: &[String]) -> Result<Vec<LiveSecret>, String> {
        let mut out = Vec::new();
        for name in names {
            let row = self
                .store
                .secrets
                .get(&self.workspace, name)
                .await
                .map_err(|e| crate::DisplayChain(&e).to_string())?;
            let Some(row) = row else { continue };
            let what = || format!("secret {name:?} of workspace {}", self.workspace);
            let hosts: Vec<String> =
                crate::error::decode(what, &row.hosts).map_err(|e| e.to_string())?;
            let inject = net_inject(&row.inject, what).map_err(|e| e.to_string())?;
            let value = self
                .key
                .open(&self.workspace, name, &row.sealed)
                .map_err(|e| e.to_string())?;
            out.push(LiveSecret {
                name: name.clone(),
                hosts,
                inject,
                value,
            });
        }
        Ok(out)
    }

    fn injected(&self, secret: &str, host: &str) {
        self.injections
            .get_or_create(&SecretLabels {
                workspace: self.workspace.clone(),
                sandbox: self.sandbox.clone(),
                secret: secret.to_string(),
            })
            .inc();
        let store = self.store.clone();
        let (workspace, sandbox) = (self.workspace.clone(), self.sandbox.clone());
        let detail = serde_json::json!({"secret": secret, "host": host});
        tokio::spawn(async move {
            if let Err(e) = store
                .events
                .append(
                    &workspace,
                    "secret_injected",
                    Some(&sandbox),
                    &detail,
                    now_ms(),
                )
                .await
            {
                tracing::warn!(%sandbox, error = %crate::DisplayChain(&e), "appending an event");
            }
        });
    }
}

/// At every boot, after the slot is attached and before the sandbox runs: a sandbox holding
/// secrets has them handed to the proxy (and its web traffic redirected there). Without a
/// key on this node, a sandbox holding secrets does not start (`secrets_disabled`), so its
/// placeholders never go out where a value was expected.
pub async fn attach(node: &Node, sandbox_id: &str, slot: u32) -> Result<(), ControlError> {
    let Some(held) = node.store.secrets.held(sandbox_id).await? else {
        return Ok(());
    };
    let state = state(node)?;
    let ca = lineage_ca(node, state, &held.lineage)?;
    let binding = SecretsBinding {
        sandbox: sandbox_id.to_string(),
        ca,
        placeholders: held.placeholders.into_iter().collect(),
        source: Arc::new(StoreSource {
            store: node.store.clone(),
            key: state.cfg.key.clone(),
            workspace: held.workspace_id,
            sandbox: sandbox_id.to_string(),
            injections: node.metrics.secret_injections.clone(),
        }),
        upstream: state.cfg.upstream.clone(),
    };
    node.net.set_secrets(slot, Some(Arc::new(binding))).await?;
    Ok(())
}

/// After a create's boot: the lineage's CA certificate into the sandbox's trust store,
/// through its agent ([`CA_CERT_PATH`], and [`CA_BUNDLE_PATH`]: the sandbox's own system
/// bundle, read bounded, with the CA after it). Nothing for a sandbox without secrets.
pub async fn install_ca(node: &Node, row: &crate::store::Sandbox) -> Result<(), ControlError> {
    let Some(held) = node.store.secrets.held(&row.id).await? else {
        return Ok(());
    };
    let state = state(node)?;
    let ca = lineage_ca(node, state, &held.lineage)?;
    let agent = crate::node::boot::agent_of(node, row).expect("a booted sandbox has a slot");
    let failed = |what: &str| {
        let what = what.to_string();
        move |f: crate::agent::AgentFailure| ControlError::Agent {
            sandbox: row.id.to_string(),
            what: format!("{what}: {f:?}"),
        }
    };
    let mut bundle = Vec::new();
    for path in SYSTEM_BUNDLES {
        if let Ok((_, bytes)) = agent.read_bounded(path, 0, MAX_SYSTEM_BUNDLE).await {
            bundle = bytes;
            break;
        }
    }
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(ca.cert_pem().as_bytes());
    agent
        .make_dir("/etc/sandpit", true, None)
        .await
        .map_err(failed("making /etc/sandpit"))?;
    for (path, body) in [
        (CA_CERT_PATH, ca.cert_pem().as_bytes().to_vec()),
        (CA_BUNDLE_PATH, bundle),
    ] {
        let len = body.len() as u64;
        let stream =
            futures::stream::iter([Ok::<_, std::convert::Infallible>(bytes::Bytes::from(body))]);
        agent
            .write_file(path, None, stream, len.max(1))
            .await
            .map_err(failed(&format!("writing {path}")))?;
    }
    Ok(())
}

/// `sandpit secrets rotate-key`: every stored value opened with `old` and sealed again with
/// `new`. Nothing is written unless every value opens with `old`. Returns how many.
pub async fn rotate_key(
    store: &Store,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<usize, ControlError> {
    let rows = store.secrets.all().await?;
    let mut resealed = Vec::with_capacity(rows.len());
    for r in &rows {
        let value = old.open(&r.workspace_id, &r.name, &r.sealed)?;
        resealed.push(new.seal(&r.workspace_id, &r.name, &value)?);
    }
    for (r, sealed) in rows.iter().zip(&resealed) {
        store
            .secrets
            .set_sealed(&r.workspace_id, &r.name, sealed, r.updated_at)
            .await?;
    }
    Ok(rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpit_api_types::BasicInject;

    fn key() -> MasterKey {
        MasterKey::parse(&MasterKey::generate_hex()).unwrap()
    }

    #[test]
    fn sealed_values_open_only_with_their_key_and_place() {
        let k = key();
        let sealed = k.seal("ws1", "openai", "sk-secret").unwrap();
        assert!(!sealed.contains("sk-secret"));
        assert_eq!(k.open("ws1", "openai", &sealed).unwrap(), "sk-secret");
        // Another nonce each time.
        assert_ne!(sealed, k.seal("ws1", "openai", "sk-secret").unwrap());
        assert!(k.open("ws2", "openai", &sealed).is_err());
        assert!(k.open("ws1", "other", &sealed).is_err());
        assert!(key().open("ws1", "openai", &sealed).is_err());
        let mut flipped = sealed.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        assert!(
            k.open("ws1", "openai", &String::from_utf8(flipped).unwrap())
                .is_err()
        );
        assert!(k.open("ws1", "openai", "v1:zz").is_err());
        assert!(MasterKey::parse("abcd").is_err());
        assert!(MasterKey::parse(&"g".repeat(64)).is_err());
        assert!(!format!("{k:?}").contains(&hex::encode(k.0)));
    }

    fn req(inject: SecretInject) -> CreateSecretRequest {
        CreateSecretRequest {
            name: "openai".into(),
            value: "sk-1".into(),
            hosts: vec!["API.example.com.".into(), "*.example.org".into()],
            inject,
        }
    }

    fn header(h: &str, f: Option<&str>) -> SecretInject {
        SecretInject {
            header: Some(h.into()),
            format: f.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn requests_are_checked() {
        let ok = check_request(&req(header("Authorization", Some("Bearer {value}")))).unwrap();
        assert_eq!(ok.hosts, vec!["api.example.com", "*.example.org"]);
        let d = check_request(&req(header("X-Key", None))).unwrap();
        assert_eq!(d.inject.format.as_deref(), Some("{value}"));
        let code = |r: CreateSecretRequest| match check_request(&r) {
            Err(ControlError::Invalid { code, .. }) => code,
            other => panic!("{other:?}"),
        };
        let base = || req(header("Authorization", Some("Bearer {value}")));
        for name in ["", "Open", "1a", "a-b", &"a".repeat(64), "a b"] {
            let mut r = base();
            r.name = name.into();
            assert_eq!(code(r), "invalid_secret_name", "{name:?}");
        }
        for value in [
            String::new(),
            "a\nb".into(),
            "é".into(),
            "x".repeat(MAX_SECRET_VALUE + 1),
        ] {
            let mut r = base();
            r.value = value;
            assert_eq!(code(r), "invalid_secret_value");
        }
        for hosts in [
            vec![],
            vec!["*.com".to_string()],
            vec!["a b".into()],
            vec!["x.com".into(); 33],
        ] {
            let mut r = base();
            r.hosts = hosts;
            assert_eq!(code(r), "invalid_secret_hosts");
        }
        for inject in [
            SecretInject::default(),
            header("Host", None),
            header("Content-Length", None),
            header("Bad Header", None),
            header("X", Some("no placeholder")),
            header("X", Some("{value}{value}")),
            header("X", Some("a\r\nb: {value}")),
            SecretInject {
                query: Some("key".into()),
                header: Some("X".into()),
                ..Default::default()
            },
            SecretInject {
                query: Some("k&y".into()),
                ..Default::default()
            },
            SecretInject {
                query: Some("k".into()),
                format: Some("{value}".into()),
                ..Default::default()
            },
            SecretInject {
                basic: Some(BasicInject {
                    username: "a:b".into(),
                }),
                ..Default::default()
            },
        ] {
            assert_eq!(
                code(req(inject.clone())),
                "invalid_secret_inject",
                "{inject:?}"
            );
        }
    }

    #[test]
    fn stored_injects_fail_closed() {
        let what = || "x".to_string();
        assert!(net_inject("{}", what).is_err());
        assert!(net_inject("not json", what).is_err());
        assert!(net_inject(r#"{"header":"Host"}"#, what).is_err());
        assert_eq!(
            net_inject(r#"{"query":"key"}"#, what).unwrap(),
            Inject::Query {
                param: "key".into()
            }
        );
    }
}
