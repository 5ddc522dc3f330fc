//! Workspace secrets that never enter a sandbox: the master key and sealing of values at rest
//! (AES-256-GCM, a random nonce per value, the workspace and name as associated data), the
//! rules of a secret, the `/v1/secrets` operations, and what a sandbox holding secrets gets:
//! placeholders in its environment, its lineage's CA in its trust store (through its agent),
//! and a [`SecretsBinding`] in the network's proxy (`sandpit_net::secrets`) at every boot.
//!
//! The CA of a lineage belongs to the fleet, not to a node: it is made once, by whichever
//! node first needs it, and kept in the database (`secret_lineages`: the certificate, and
//! the key sealed with the master key like a value), so a sandbox that moves to another node
//! meets the CA it trusts. Earlier versions kept it in `<data dir>/secrets-ca/<lineage>/`
//! (`ca.crt`, `ca.key`): such a CA is imported into the database when it is first needed or
//! by the reaper's sweep ([`sweep`]), and its directory removed; that host-owned directory
//! is the only one this module touches, never a sandbox's tree.
#![expect(
    clippy::disallowed_methods,
    reason = "the old lineage CAs live in the data dir's own secrets-ca/, never a tenant tree"
)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use crate::store::{LineageRow, SandboxSecrets, SecretRow, Store};
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
/// How long a lineage CA made (or imported) stays, whatever holds it: a fork records its
/// child as holding its parent's lineage only after the child's row exists.
pub const LINEAGE_GRACE: Duration = Duration::from_secs(600);
/// The most lineage CAs one sweep deletes, and old CA directories it looks at.
const SWEEP_LINEAGES: i64 = 256;
const SWEEP_DIRS: usize = 64;
/// A loaded CA unused this long is dropped from a node's memory (read again when needed).
const CA_CACHE_IDLE: Duration = Duration::from_secs(3600);
/// The most of an old on-disk CA file read.
const MAX_DISK_CA: u64 = 64 << 10;
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
        self.seal_for(&format!("{workspace}/{name}"), value)
    }

    /// The value [`MasterKey::seal`] sealed for `name` of `workspace`. Fails closed
    /// (`Corrupt`) with another key, another secret's ciphertext, or altered bytes.
    pub fn open(&self, workspace: &str, name: &str, sealed: &str) -> Result<String, ControlError> {
        let what = || format!("value of secret {name:?} of workspace {workspace}");
        self.open_for(&format!("{workspace}/{name}"), sealed, what)
    }

    /// The private key of `lineage`'s CA (PEM) sealed like a value, bound to the workspace,
    /// the lineage and the certificate (`cert_pem`): a sealed key moved to another lineage,
    /// workspace or certificate, or into a secret's place, does not open.
    pub fn seal_ca_key(
        &self,
        workspace: &str,
        lineage: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<String, ControlError> {
        self.seal_for(&ca_aad(workspace, lineage, cert_pem), key_pem)
    }

    /// The key [`MasterKey::seal_ca_key`] sealed; `Corrupt` with another key or any change.
    pub fn open_ca_key(
        &self,
        workspace: &str,
        lineage: &str,
        cert_pem: &str,
        sealed: &str,
    ) -> Result<String, ControlError> {
        let what = || format!("CA key of secrets lineage {lineage} of workspace {workspace}");
        self.open_for(&ca_aad(workspace, lineage, cert_pem), sealed, what)
    }

    fn seal_for(&self, aad: &str, value: &str) -> Result<String, ControlError> {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
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

    fn open_for(
        &self,
        aad: &str,
        sealed: &str,
        what: impl Fn() -> String,
    ) -> Result<String, ControlError> {
        let raw = sealed
            .strip_prefix("v1:")
            .and_then(|h| hex::decode(h).ok())
            .filter(|b| b.len() > 12)
            .ok_or_else(|| ControlError::corrupt(what(), "not a sealed value"))?;
        let (nonce, ct) = raw.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().expect("split at 12");
        let plain = self
            .cipher()
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| {
                ControlError::corrupt(
                    what(),
                    "does not open with this secrets key (not the key it was sealed with, or altered)",
                )
            })?;
        String::from_utf8(plain).map_err(|_| ControlError::corrupt(what(), "not UTF-8"))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&Key::<Aes256Gcm>::from(self.0))
    }
}

/// The associated data of a lineage's sealed CA key. A secret's is `<workspace>/<name>`
/// (a name has no NUL), so neither opens in the other's place.
fn ca_aad(workspace: &str, lineage: &str, cert_pem: &str) -> String {
    format!("lineage-ca\0{workspace}\0{lineage}\0{cert_pem}")
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
    /// Lineage → its CA, as read from the store. Guards only the map.
    cas: Mutex<HashMap<String, CachedCa>>,
}

/// A loaded lineage CA and the workspace it belongs to (checked on every use: the cache
/// never hands one workspace another's CA).
#[derive(Debug)]
struct CachedCa {
    workspace: String,
    ca: Arc<LineageCa>,
    used: Instant,
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
    // No ALPN here: the proxy offers, per connection, what the sandbox offered
    // (`sandpit_net::secrets::intercept`).
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ControlError::Internal(format!("TLS versions: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
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

/// The directory where versions before the CAs moved into the database kept a lineage's
/// CA.
fn old_ca_dir(data_dir: &Path, lineage: &str) -> PathBuf {
    data_dir.join("secrets-ca").join(lineage)
}

/// 32 hex digits, as [`prepare_sandbox`] draws them; anything else is not a lineage.
fn valid_lineage(lineage: &str) -> bool {
    lineage.len() == 32 && lineage.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The CA of `lineage`, which sandboxes of `workspace` hold: loaded already, or read from
/// the store, or imported there from this node's old `secrets-ca/` directory, or made. Two
/// nodes that make one at once both insert-if-absent and use whichever went in. A lineage
/// recorded for another workspace, a key that does not open with this node's master key,
/// or a certificate that does not load is an error: the sandbox gets no proxy.
pub async fn lineage_ca(
    store: &Store,
    data_dir: &Path,
    state: &SecretsState,
    workspace: &str,
    lineage: &str,
) -> Result<Arc<LineageCa>, ControlError> {
    if !valid_lineage(lineage) {
        return Err(ControlError::corrupt(
            "a sandbox's secrets lineage",
            lineage,
        ));
    }
    let other_workspace = || {
        ControlError::corrupt(
            format!("secrets lineage {lineage}"),
            format!("it belongs to another workspace than {workspace}"),
        )
    };
    if let Some(c) = state.cas.lock().expect("not poisoned").get_mut(lineage) {
        if c.workspace != workspace {
            return Err(other_workspace());
        }
        c.used = Instant::now();
        return Ok(c.ca.clone());
    }
    let row = match store.secrets.lineage(lineage).await? {
        Some(row) => row,
        None => {
            let old = read_old_ca(data_dir, lineage)?;
            let imported = old.is_some();
            let (cert_pem, key_pem) = match old {
                Some(pair) => pair,
                None => LineageCa::generate()?,
            };
            let row = LineageRow {
                lineage: lineage.to_string(),
                workspace_id: workspace.to_string(),
                key_sealed: state
                    .cfg
                    .key
                    .seal_ca_key(workspace, lineage, &cert_pem, &key_pem)?,
                cert_pem,
                created_at: now_ms(),
            };
            let won = store.secrets.insert_lineage(&row).await?;
            let stored = store.secrets.lineage(lineage).await?.ok_or_else(|| {
                ControlError::Internal(format!(
                    "the CA of secrets lineage {lineage} went right after it was recorded"
                ))
            })?;
            if imported {
                if won {
                    tracing::info!(%lineage, "secrets: imported a lineage CA from this node's disk into the store");
                } else if stored.cert_pem != row.cert_pem {
                    tracing::warn!(%lineage, "secrets: the store holds another CA for a lineage this node kept on disk; the store's wins");
                }
                remove_old_ca(data_dir, lineage);
            }
            stored
        }
    };
    if row.workspace_id != workspace {
        return Err(other_workspace());
    }
    let key_pem = state
        .cfg
        .key
        .open_ca_key(workspace, lineage, &row.cert_pem, &row.key_sealed)?;
    let ca = Arc::new(LineageCa::load(&row.cert_pem, &key_pem)?);
    state.cas.lock().expect("not poisoned").insert(
        lineage.to_string(),
        CachedCa {
            workspace: workspace.to_string(),
            ca: ca.clone(),
            used: Instant::now(),
        },
    );
    Ok(ca)
}

/// The certificate and key an earlier version kept for `lineage` on this node, if any.
fn read_old_ca(data_dir: &Path, lineage: &str) -> Result<Option<(String, String)>, ControlError> {
    let dir = old_ca_dir(data_dir, lineage);
    let files = |what: &str| ControlError::files(format!("{what} of lineage {lineage}"));
    let key = match read_small(&dir.join("ca.key")) {
        Ok(key) => key,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(files("the old CA key")(e)),
    };
    let cert = read_small(&dir.join("ca.crt")).map_err(files("the old CA certificate"))?;
    Ok(Some((cert, key)))
}

/// A regular file of at most [`MAX_DISK_CA`] bytes, as text (the server's own file).
fn read_small(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    f.take(MAX_DISK_CA).read_to_string(&mut text)?;
    Ok(text)
}

/// Remove the old directory of `lineage`'s CA (its files by name, then the directory);
/// failures are logged.
fn remove_old_ca(data_dir: &Path, lineage: &str) {
    let dir = old_ca_dir(data_dir, lineage);
    for name in ["ca.key", "ca.crt", "ca.key.tmp", "ca.crt.tmp"] {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(%lineage, error = %e, "secrets: removing an old lineage CA file")
            }
        }
    }
    match std::fs::remove_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(%lineage, error = %e, "secrets: removing an old lineage CA directory")
        }
    }
}

/// What one [`sweep_lineages`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LineageSweep {
    /// Lineages whose CA nothing needed any more: deleted from the store.
    pub collected: Vec<String>,
    /// Old on-disk CAs a live sandbox holds: imported into the store.
    pub imported: usize,
    /// Old on-disk CAs nothing holds: removed.
    pub removed: usize,
}

/// Garbage collection of lineage CAs, bounded (the reaper runs it once a minute): the rows
/// of lineages made before `before` that no sandbox (other than a destroyed one) and no
/// snapshot holds any more go (at most [`SWEEP_LINEAGES`]), and so do their CAs in this
/// node's memory and those unused for an hour. Then up to [`SWEEP_DIRS`] old CA directories
/// of this node: one a sandbox still holds is imported into the store (with this node's
/// key, `state`; without one it stays), any other is removed. Importing here, not only at
/// a boot, matters for a sandbox suspended before the upgrade and woken on another node.
pub async fn sweep_lineages(
    store: &Store,
    data_dir: &Path,
    state: Option<&SecretsState>,
    before: i64,
) -> Result<LineageSweep, ControlError> {
    let mut done = LineageSweep {
        collected: store
            .secrets
            .collect_lineages(before, SWEEP_LINEAGES)
            .await?,
        ..LineageSweep::default()
    };
    if let Some(state) = state {
        let mut cas = state.cas.lock().expect("not poisoned");
        for l in &done.collected {
            cas.remove(l);
        }
        cas.retain(|_, c| c.used.elapsed() < CA_CACHE_IDLE);
    }
    let Ok(entries) = std::fs::read_dir(data_dir.join("secrets-ca")) else {
        return Ok(done);
    };
    let names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| valid_lineage(n))
        .take(SWEEP_DIRS)
        .collect();
    for lineage in names {
        match store.secrets.lineage_holder(&lineage).await? {
            Some(workspace) => {
                let Some(state) = state else { continue };
                match lineage_ca(store, data_dir, state, &workspace, &lineage).await {
                    Ok(_) => {
                        remove_old_ca(data_dir, &lineage);
                        done.imported += 1;
                    }
                    Err(e) => {
                        tracing::warn!(%lineage, error = %crate::DisplayChain(&e), "secrets: importing an old lineage CA")
                    }
                }
            }
            None => {
                remove_old_ca(data_dir, &lineage);
                done.removed += 1;
            }
        }
    }
    Ok(done)
}

/// [`sweep_lineages`] for this node (the reaper's round), logged.
pub async fn sweep(node: &Node) {
    let before =
        now_ms().saturating_sub(i64::try_from(LINEAGE_GRACE.as_millis()).unwrap_or(i64::MAX));
    let state = node.secrets.get().map(|s| &**s);
    match sweep_lineages(&node.store, &node.cfg.data_dir, state, before).await {
        Ok(done) => {
            if done != LineageSweep::default() {
                tracing::info!(
                    collected = done.collected.len(),
                    imported = done.imported,
                    removed = done.removed,
                    "secrets: swept lineage CAs"
                );
            }
        }
        Err(e) => tracing::warn!(error = %crate::DisplayChain(&e), "reaper: sweeping lineage CAs"),
    }
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

/// What sandbox `sandbox_id` holds, with this node's secrets state and its lineage's CA;
/// `None` for a sandbox holding no secrets.
async fn held_with_ca<'n>(
    node: &'n Node,
    sandbox_id: &str,
) -> Result<Option<(SandboxSecrets, &'n Arc<SecretsState>, Arc<LineageCa>)>, ControlError> {
    let Some(held) = node.store.secrets.held(sandbox_id).await? else {
        return Ok(None);
    };
    let state = state(node)?;
    let ca = lineage_ca(
        &node.store,
        &node.cfg.data_dir,
        state,
        &held.workspace_id,
        &held.lineage,
    )
    .await?;
    Ok(Some((held, state, ca)))
}

/// At every boot, after the slot is attached and before the sandbox runs: a sandbox holding
/// secrets has them handed to the proxy (and its web traffic redirected there). Without a
/// key on this node, a sandbox holding secrets does not start (`secrets_disabled`), so its
/// placeholders never go out where a value was expected.
pub async fn attach(node: &Node, sandbox_id: &str, slot: u32) -> Result<(), ControlError> {
    let Some((held, state, ca)) = held_with_ca(node, sandbox_id).await? else {
        return Ok(());
    };
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
    let Some((_, _, ca)) = held_with_ca(node, &row.id).await? else {
        return Ok(());
    };
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

/// What [`rotate_key`] re-sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotated {
    pub values: usize,
    pub lineage_keys: usize,
}

/// `sandpit secrets rotate-key`: every stored value and every lineage CA's key opened with
/// `old` and sealed again with `new`, written in one transaction. Nothing is written unless
/// everything opens with `old` (`wrong_secrets_key` names the first that does not) and
/// nothing changed meanwhile.
pub async fn rotate_key(
    store: &Store,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<Rotated, ControlError> {
    let wrong = |e: ControlError| {
        invalid(
            "wrong_secrets_key",
            format!(
                "the old key does not open what the database holds ({}); nothing was written",
                crate::DisplayChain(&e)
            ),
        )
    };
    let rows = store.secrets.all().await?;
    let mut values = Vec::with_capacity(rows.len());
    for r in &rows {
        let value = old
            .open(&r.workspace_id, &r.name, &r.sealed)
            .map_err(wrong)?;
        values.push((r, new.seal(&r.workspace_id, &r.name, &value)?));
    }
    let lineages = store.secrets.all_lineages().await?;
    let mut keys = Vec::with_capacity(lineages.len());
    for l in &lineages {
        let key = old
            .open_ca_key(&l.workspace_id, &l.lineage, &l.cert_pem, &l.key_sealed)
            .map_err(wrong)?;
        keys.push((
            l,
            new.seal_ca_key(&l.workspace_id, &l.lineage, &l.cert_pem, &key)?,
        ));
    }
    store.secrets.reseal(&values, &keys).await?;
    Ok(Rotated {
        values: values.len(),
        lineage_keys: keys.len(),
    })
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

    #[test]
    fn sealed_ca_keys_open_only_for_their_lineage_and_certificate() {
        let k = key();
        let (l, cert) = ("a".repeat(32), "-----BEGIN CERTIFICATE-----\nx\n");
        let sealed = k.seal_ca_key("ws1", &l, cert, "the key").unwrap();
        assert_eq!(k.open_ca_key("ws1", &l, cert, &sealed).unwrap(), "the key");
        assert!(k.open_ca_key("ws2", &l, cert, &sealed).is_err());
        assert!(
            k.open_ca_key("ws1", &"b".repeat(32), cert, &sealed)
                .is_err()
        );
        assert!(
            k.open_ca_key("ws1", &l, "another certificate", &sealed)
                .is_err()
        );
        assert!(key().open_ca_key("ws1", &l, cert, &sealed).is_err());
        // Never in a secret's place, nor a secret's value in a CA key's.
        assert!(k.open("ws1", &l, &sealed).is_err());
        let value = k.seal("ws1", "openai", "v").unwrap();
        assert!(k.open_ca_key("ws1", "openai", "", &value).is_err());
        match key().open_ca_key("ws1", &l, cert, &sealed) {
            Err(ControlError::Corrupt { detail, .. }) => {
                assert!(
                    detail.contains("does not open with this secrets key"),
                    "{detail}"
                )
            }
            other => panic!("{other:?}"),
        }
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
