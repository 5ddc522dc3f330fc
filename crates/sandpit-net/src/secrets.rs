//! The secrets proxy: TLS interception for the hosts of a sandbox's secrets, so a sandbox can
//! use an API key it never sees.
//!
//! A sandbox holding secrets has its outbound TCP 80 and 443 redirected to the domain
//! filter's listener (nft set `secret_veths`, see [`crate::rules`]), whatever its egress mode.
//! There, on port 443, the ClientHello's server name (SNI) decides:
//!
//! - a name one of the sandbox's secrets lists in its `hosts` (a name or `*.<name>`): the
//!   connection is **intercepted**. The egress policy is checked for that name (as for any
//!   connection: `allow_domains`, or the addresses it resolves to), the upstream is dialled
//!   through the [`crate::Dialer`] (never into the always-denied set), its certificate is
//!   verified against the host's roots (plus the operator's extra CAs), and the sandbox is
//!   answered with a leaf for that name signed by its lineage's CA ([`LineageCa`], whose key
//!   stays on the host). Each request's head is read (bounded: [`MAX_HEAD`] bytes, at most
//!   [`MAX_HEADERS`] lines, in [`HEAD_TIMEOUT`]) and parsed strictly; the placeholder is
//!   replaced by the secret's current value where the secret says ([`Inject`]) and nowhere
//!   else, the request goes out with `Connection: close` (one request per connection), and the
//!   rest of the stream is copied both ways. A head that does not parse, names another host
//!   in `Host`, or uses an absolute or asterisk target is answered `400` and never forwarded.
//! - any other name, or no name: the connection passes end to end as for the domain filter
//!   (the sandbox's own TLS, SNI only).
//!
//! Plain HTTP (port 80) is never intercepted: a placeholder sent there goes out unchanged.
//! ALPN towards the sandbox and the upstream is `http/1.1` only.
//!
//! The proxy holds, per sandbox, the placeholders and the lineage CA; a secret's value is
//! fetched from its [`SecretSource`] for each intercepted connection (so a replaced value is
//! used by the next connection and a deleted secret is no longer injected) and dropped when
//! the request head is written.

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::NetError;
use crate::sniff;

/// Longest request head (request line and headers) the proxy reads.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header lines in a request head.
pub const MAX_HEADERS: usize = 128;
/// How long a sandbox has to send a whole request head once TLS is up.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the TLS handshakes (sandbox side, upstream side) may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Leaves for this many names are kept per lineage; more and the cache starts over.
const MAX_LEAVES: usize = 256;

/// Where a secret's value goes in a request to one of its hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inject {
    /// The header `name`, when it holds the placeholder, becomes `format` with `{value}`
    /// replaced by the value.
    Header { name: String, format: String },
    /// The query parameter `param`, when its value is the placeholder, gets the value
    /// (percent-encoded).
    Query { param: String },
    /// `Authorization: Basic` whose credentials are `username:placeholder` gets
    /// `username:value`.
    Basic { username: String },
}

/// A secret as the proxy uses it: what it is for and its current value.
#[derive(Clone)]
pub struct LiveSecret {
    pub name: String,
    /// Normalized names and `*.` wildcards ([`sniff::normalize_pattern`]).
    pub hosts: Vec<String>,
    pub inject: Inject,
    pub value: String,
}

impl fmt::Debug for LiveSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveSecret")
            .field("name", &self.name)
            .field("hosts", &self.hosts)
            .field("inject", &self.inject)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// Where the proxy gets a sandbox's secrets (the control layer: its store and master key).
#[async_trait]
pub trait SecretSource: Send + Sync + fmt::Debug {
    /// The current definition of each named secret that still exists (deleted ones are left
    /// out). Called for each intercepted connection.
    async fn current(&self, names: &[String]) -> Result<Vec<LiveSecret>, String>;
    /// A value was put into a request to `host` (audit: counted, never the value).
    fn injected(&self, secret: &str, host: &str);
}

/// What the proxy knows of one sandbox holding secrets.
#[derive(Debug)]
pub struct SecretsBinding {
    /// For logs.
    pub sandbox: String,
    /// The CA of the sandbox's lineage (shared with its forks).
    pub ca: Arc<LineageCa>,
    /// Secret name → the placeholder this sandbox's environment holds for it.
    pub placeholders: Vec<(String, String)>,
    pub source: Arc<dyn SecretSource>,
    /// How the proxy connects upstream: the host's roots plus the operator's extra CAs.
    pub upstream: Arc<rustls::ClientConfig>,
}

impl SecretsBinding {
    fn names(&self) -> Vec<String> {
        self.placeholders.iter().map(|(n, _)| n.clone()).collect()
    }

    fn placeholder(&self, name: &str) -> Option<&str> {
        self.placeholders
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.as_str())
    }
}

/// The certificate authority of one sandbox lineage: its certificate goes into the sandbox's
/// trust store, its key never leaves the host. Signs (and caches) a leaf per server name.
pub struct LineageCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// Server name → its TLS configuration. Guards only the map.
    leaves: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl fmt::Debug for LineageCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LineageCa").finish_non_exhaustive()
    }
}

/// The CA's subject (the same at generation and load, so leaves chain to the stored cert).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Sandpit");
    dn.push(DnType::CommonName, "Sandpit secrets proxy CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn cert_error(what: &str) -> impl FnOnce(rcgen::Error) -> NetError + '_ {
    move |e| NetError::Certificate {
        what: what.to_string(),
        reason: e.to_string(),
    }
}

impl LineageCa {
    /// A new CA: its certificate and its key (PKCS#8), both PEM. Valid ten years.
    pub fn generate() -> Result<(String, String), NetError> {
        let key = KeyPair::generate().map_err(cert_error("generating a CA key"))?;
        let mut params = ca_params();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params
            .self_signed(&key)
            .map_err(cert_error("signing the CA certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The CA from what [`LineageCa::generate`] made.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<LineageCa, NetError> {
        let key = KeyPair::from_pem(key_pem).map_err(cert_error("reading the CA key"))?;
        let der = pem_der(cert_pem).ok_or_else(|| NetError::Certificate {
            what: "reading the CA certificate".into(),
            reason: "no CERTIFICATE block".into(),
        })?;
        Ok(LineageCa {
            cert_pem: cert_pem.to_string(),
            cert_der: CertificateDer::from(der),
            issuer: Issuer::new(ca_params(), key),
            leaves: Mutex::default(),
        })
    }

    /// The certificate, PEM: what the sandbox trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The TLS server configuration for `name` (a normalized host name), signed now or cached.
    pub fn server_config(&self, name: &str) -> Result<Arc<rustls::ServerConfig>, NetError> {
        if let Some(c) = self.leaves.lock().expect("not poisoned").get(name) {
            return Ok(c.clone());
        }
        let key = KeyPair::generate().map_err(cert_error("generating a leaf key"))?;
        let mut params =
            CertificateParams::new(vec![name.to_string()]).map_err(cert_error("naming a leaf"))?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, name.to_string());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(365);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_error("signing a leaf"))?;
        let chain = vec![leaf.der().clone(), self.cert_der.clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| NetError::Certificate {
            what: format!("the TLS configuration for {name}"),
            reason: e.to_string(),
        })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let mut leaves = self.leaves.lock().expect("not poisoned");
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(name.to_string(), config.clone());
        Ok(config)
    }
}

/// The DER bytes of the first `CERTIFICATE` block of `pem`.
fn pem_der(pem: &str) -> Option<Vec<u8>> {
    let body = pem
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)?
        .split("-----END CERTIFICATE-----")
        .next()?;
    let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// The secrets of `binding` whose hosts list `name`; empty when none does (or the source
/// fails: then nothing is intercepted, and no value can be injected).
pub(crate) async fn secrets_for(binding: &SecretsBinding, name: &str) -> Vec<LiveSecret> {
    match binding.source.current(&binding.names()).await {
        Ok(all) => all
            .into_iter()
            .filter(|s| sniff::name_allowed(&s.hosts, name))
            .collect(),
        Err(why) => {
            tracing::warn!(sandbox = %binding.sandbox, %why, "secrets proxy: secrets unavailable; not intercepting");
            Vec::new()
        }
    }
}

/// One intercepted connection: TLS from the sandbox (whose first bytes, `head`, were read
/// already) terminated with a leaf for `name`, TLS to `upstream` verified for `name`, one
/// request rewritten, the rest copied.
pub(crate) async fn intercept(
    inbound: TcpStream,
    head: Vec<u8>,
    upstream: TcpStream,
    name: &str,
    binding: &SecretsBinding,
    secrets: &[LiveSecret],
) -> Result<(), String> {
    let server_config = binding.ca.server_config(name).map_err(|e| e.to_string())?;
    // Another handle on the sandbox's socket, for its options once TLS wraps it.
    let ctl = std::os::fd::AsFd::as_fd(&inbound)
        .try_clone_to_owned()
        .map_err(|e| format!("duplicating the sandbox's socket: {e}"))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
    let prefixed = Prefixed {
        head,
        pos: 0,
        inner: inbound,
    };
    let mut client = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(prefixed))
        .await
        .map_err(|_| "the sandbox's TLS handshake timed out".to_string())?
        .map_err(|e| format!("the sandbox's TLS handshake: {e}"))?;
    let server_name =
        ServerName::try_from(name.to_string()).map_err(|e| format!("server name {name}: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(binding.upstream.clone());
    let mut server =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name, upstream))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let why = format!("the upstream TLS handshake with {name}: {e}");
                answer(&mut client, 502, &why).await;
                return Err(why);
            }
            Err(_) => {
                let why = format!("the upstream TLS handshake with {name} timed out");
                answer(&mut client, 504, &why).await;
                return Err(why);
            }
        };
    let (raw, rest) = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await {
        Ok(Ok(x)) => x,
        Ok(Err(why)) => {
            answer(&mut client, 400, &why).await;
            return Err(why);
        }
        Err(_) => {
            answer(&mut client, 408, "no complete request head in time").await;
            return Err("no complete request head in time".into());
        }
    };
    let placeholders: Vec<(LiveSecret, &str)> = secrets
        .iter()
        .filter_map(|s| Some((s.clone(), binding.placeholder(&s.name)?)))
        .collect();
    let (out, injected) = match rewrite_head(&raw, name, &placeholders) {
        Ok(x) => x,
        Err(why) => {
            answer(&mut client, 400, &why).await;
            return Err(why);
        }
    };
    drop(placeholders);
    server
        .write_all(&out)
        .await
        .map_err(|e| format!("writing to {name}: {e}"))?;
    drop(out);
    server
        .write_all(&rest)
        .await
        .map_err(|e| format!("writing to {name}: {e}"))?;
    for secret in &injected {
        binding.source.injected(secret, name);
    }
    tracing::debug!(sandbox = %binding.sandbox, %name, injected = injected.len(), "secrets proxy: request forwarded");
    // The answer is copied back; when it ends, the sandbox gets TLS close_notify and the
    // TCP FIN in one segment (corked), so it never closes first: a connection the sandbox
    // closes first lingers in its TIME_WAIT, and gVisor cannot checkpoint a sandbox holding
    // one. At the very end its side is reset for the same reason.
    let (mut from_client, mut to_client) = tokio::io::split(client);
    let (mut from_server, mut to_server) = tokio::io::split(server);
    let up = async {
        let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
        let _ = to_server.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        let sock = socket2::SockRef::from(&ctl);
        let _ = sock.set_tcp_cork(true);
        let _ = to_client.shutdown().await;
        let _ = sock.set_tcp_cork(false);
    };
    tokio::join!(up, down);
    let _ = socket2::SockRef::from(&ctl).set_linger(Some(Duration::ZERO));
    Ok(())
}

/// Reads a request head up to its blank line: the head, and whatever came after it.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<(Vec<u8>, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let mut chunk = [0u8; 4096];
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the request: {e}"))?;
        if n == 0 {
            return Err("closed before a whole request head".into());
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = find(&buf[from..], b"\r\n\r\n") {
            let end = from + i + 4;
            if end > MAX_HEAD {
                return Err(format!("request head longer than {MAX_HEAD} bytes"));
            }
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(format!("request head longer than {MAX_HEAD} bytes"));
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether `b` is an HTTP token character (RFC 9110 `tchar`).
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The head of one request to `name`, with the placeholders of `secrets` replaced where each
/// secret says, `Connection: close` forced, and the names of the secrets injected. Strict:
/// CRLF line ends only, no folded or malformed header lines, exactly one `Host` naming `name`
/// (port 443 or none), an origin-form target; otherwise `Err` and nothing is forwarded.
pub fn rewrite_head(
    raw: &[u8],
    name: &str,
    secrets: &[(LiveSecret, &str)],
) -> Result<(Vec<u8>, Vec<String>), String> {
    let text = std::str::from_utf8(raw).map_err(|_| "request head is not UTF-8".to_string())?;
    let body = text
        .strip_suffix("\r\n\r\n")
        .ok_or("request head does not end with CRLF CRLF")?;
    let mut lines = body.split("\r\n");
    let request_line = lines.next().ok_or("empty request")?;
    if request_line.bytes().any(|b| b.is_ascii_control()) {
        return Err("control character in the request line".into());
    }
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line".into());
    };
    if method.is_empty() || !method.bytes().all(tchar) {
        return Err("malformed method".into());
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(format!("unsupported version {version:?}"));
    }
    if !target.starts_with('/') {
        return Err("only origin-form request targets (`/path`) are accepted".into());
    }
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        if headers.len() >= MAX_HEADERS {
            return Err(format!("more than {MAX_HEADERS} header lines"));
        }
        let (k, v) = line.split_once(':').ok_or("header line without a colon")?;
        if k.is_empty() || !k.bytes().all(tchar) {
            return Err("malformed header name (or a folded line)".into());
        }
        if v.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err("control character in a header value".into());
        }
        headers.push((k.to_string(), v.trim_matches([' ', '\t']).to_string()));
    }
    let hosts: Vec<&(String, String)> = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
        .collect();
    let [(_, host)] = hosts.as_slice() else {
        return Err("the request needs exactly one Host header".into());
    };
    let host_name = host
        .strip_suffix(":443")
        .unwrap_or(host)
        .strip_suffix('.')
        .unwrap_or_else(|| host.strip_suffix(":443").unwrap_or(host));
    if !host_name.eq_ignore_ascii_case(name) {
        return Err(format!(
            "Host {host:?} is not the name the connection was opened for ({name})"
        ));
    }
    let mut injected = Vec::new();
    let mut target = target.to_string();
    for (secret, placeholder) in secrets {
        let done = match &secret.inject {
            Inject::Header { name: h, format } => {
                let mut done = false;
                for (k, v) in headers.iter_mut() {
                    if k.eq_ignore_ascii_case(h) && v.contains(placeholder) {
                        *v = format.replace("{value}", &secret.value);
                        done = true;
                    }
                }
                done
            }
            Inject::Query { param } => {
                match replace_query(&target, param, placeholder, &secret.value) {
                    Some(t) => {
                        target = t;
                        true
                    }
                    None => false,
                }
            }
            Inject::Basic { username } => {
                let mut done = false;
                for (k, v) in headers.iter_mut() {
                    if !k.eq_ignore_ascii_case("authorization") {
                        continue;
                    }
                    let Some(cred) = v
                        .split_once(' ')
                        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
                        .and_then(|(_, c)| {
                            base64::engine::general_purpose::STANDARD
                                .decode(c.trim())
                                .ok()
                        })
                    else {
                        continue;
                    };
                    if cred == format!("{username}:{placeholder}").as_bytes() {
                        *v = format!(
                            "Basic {}",
                            base64::engine::general_purpose::STANDARD
                                .encode(format!("{username}:{}", secret.value))
                        );
                        done = true;
                    }
                }
                done
            }
        };
        if done {
            injected.push(secret.name.clone());
        }
    }
    let mut out = format!("{method} {target} {version}\r\n");
    for (k, v) in &headers {
        if k.eq_ignore_ascii_case("connection") || k.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    Ok((out.into_bytes(), injected))
}

/// `target` with the query parameter `param` whose value is `placeholder` given `value`
/// (percent-encoded); `None` if no such parameter.
fn replace_query(target: &str, param: &str, placeholder: &str, value: &str) -> Option<String> {
    let (path, query) = target.split_once('?')?;
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let mut hit = false;
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if k == param && v == placeholder => {
                hit = true;
                format!("{k}={}", percent_encode(value))
            }
            _ => pair.to_string(),
        })
        .collect();
    if !hit {
        return None;
    }
    let mut out = format!("{path}?{}", pairs.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    Some(out)
}

/// Everything but unreserved characters (RFC 3986) percent-encoded.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A short HTTP answer from the proxy itself, then close.
async fn answer<S: AsyncWrite + Unpin>(s: &mut S, status: u16, why: &str) {
    let reason = match status {
        400 => "Bad Request",
        408 => "Request Timeout",
        502 => "Bad Gateway",
        _ => "Gateway Timeout",
    };
    let body = format!("sandpit secrets proxy: {why}\n");
    let _ = s
        .write_all(
            format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await;
    let _ = s.shutdown().await;
}

/// A stream whose first bytes were read already: they are served again first.
struct Prefixed {
    head: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.head.len() {
            let n = (self.head.len() - self.pos).min(buf.remaining());
            let from = self.pos;
            buf.put_slice(&self.head[from..from + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(name: &str, inject: Inject, value: &str) -> LiveSecret {
        LiveSecret {
            name: name.into(),
            hosts: vec!["api.example.com".into()],
            inject,
            value: value.into(),
        }
    }

    fn bearer() -> Inject {
        Inject::Header {
            name: "Authorization".into(),
            format: "Bearer {value}".into(),
        }
    }

    fn rewrite(raw: &str, secrets: &[(LiveSecret, &str)]) -> Result<(String, Vec<String>), String> {
        rewrite_head(raw.as_bytes(), "api.example.com", secrets)
            .map(|(out, inj)| (String::from_utf8(out).unwrap(), inj))
    }

    #[test]
    fn header_placeholder_becomes_the_formatted_value() {
        let s = [(secret("openai", bearer(), "sk-real"), "ph-123")];
        let (out, inj) = rewrite(
            "POST /v1/x HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer ph-123\r\nConnection: keep-alive\r\nX-Other: ph-123\r\n\r\n",
            &s,
        )
        .unwrap();
        assert_eq!(
            out,
            "POST /v1/x HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer sk-real\r\nX-Other: ph-123\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(inj, vec!["openai".to_string()]);
    }

    #[test]
    fn query_and_basic_forms() {
        let q = (
            secret(
                "q",
                Inject::Query {
                    param: "key".into(),
                },
                "a b&c",
            ),
            "ph-q",
        );
        let b = (
            secret(
                "b",
                Inject::Basic {
                    username: "me".into(),
                },
                "pw",
            ),
            "ph-b",
        );
        let cred = base64::engine::general_purpose::STANDARD.encode("me:ph-b");
        let (out, inj) = rewrite(
            &format!("GET /p?x=1&key=ph-q&key=other HTTP/1.1\r\nHost: api.example.com:443\r\nAuthorization: Basic {cred}\r\n\r\n"),
            &[q, b],
        )
        .unwrap();
        let want = base64::engine::general_purpose::STANDARD.encode("me:pw");
        assert_eq!(
            out,
            format!(
                "GET /p?x=1&key=a%20b%26c&key=other HTTP/1.1\r\nHost: api.example.com:443\r\nAuthorization: Basic {want}\r\nConnection: close\r\n\r\n"
            )
        );
        assert_eq!(inj, vec!["q".to_string(), "b".to_string()]);
    }

    #[test]
    fn no_placeholder_no_injection() {
        let s = [(secret("openai", bearer(), "sk-real"), "ph-123")];
        let (out, inj) = rewrite(
            "GET / HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer mine\r\n\r\n",
            &s,
        )
        .unwrap();
        assert!(!out.contains("sk-real"));
        assert!(inj.is_empty());
    }

    #[test]
    fn hostile_heads_are_refused() {
        let s = [(secret("openai", bearer(), "sk-real"), "ph-123")];
        for raw in [
            // Another host behind the same connection (a CDN would route by Host).
            "GET / HTTP/1.1\r\nHost: evil.example.net\r\nAuthorization: Bearer ph-123\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: api.example.com\r\nHost: evil.example.net\r\n\r\n",
            "GET / HTTP/1.1\r\nAuthorization: Bearer ph-123\r\n\r\n",
            "GET https://evil.example.net/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: api.example.com\r\n folded: line\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: api.example.com\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: api.example.com\r\nX: a\rb\r\n\r\n",
            "GET / HTTP/2\r\nHost: api.example.com\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
            "GET / HTTP/1.1\nHost: api.example.com\r\n\r\n",
        ] {
            assert!(rewrite(raw, &s).is_err(), "{raw:?} was accepted");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\nHost: api.example.com\r\n{many}\r\n");
        assert!(rewrite(&raw, &s).is_err());
    }

    #[tokio::test]
    async fn heads_are_bounded() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            let _ = a.write_all(&vec![b'a'; MAX_HEAD + 10]).await;
        });
        assert!(read_head(&mut b).await.is_err());
        writer.abort();
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody")
            .await
            .unwrap();
        let (head, rest) = read_head(&mut b).await.unwrap();
        assert_eq!(head, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(rest, b"body");
    }

    /// A TLS client that trusts only `ca`.
    fn client_trusting(ca: &LineageCa) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// Whether a client trusting `trusted` completes a handshake with a leaf of `signer`
    /// for `leaf_name`, asking for `asked`.
    async fn handshake(
        trusted: &LineageCa,
        signer: &LineageCa,
        leaf_name: &str,
        asked: &str,
    ) -> bool {
        let (a, b) = tokio::io::duplex(1 << 16);
        let acceptor = tokio_rustls::TlsAcceptor::from(signer.server_config(leaf_name).unwrap());
        let server = tokio::spawn(async move { acceptor.accept(b).await.is_ok() });
        let name = ServerName::try_from(asked.to_string()).unwrap();
        let ok = client_trusting(trusted).connect(name, a).await.is_ok();
        let _ = server.await;
        ok
    }

    #[tokio::test]
    async fn leaves_chain_to_the_stored_ca() {
        let (cert, key) = LineageCa::generate().unwrap();
        assert!(cert.contains("BEGIN CERTIFICATE"));
        assert!(key.contains("PRIVATE KEY"));
        let ca = LineageCa::load(&cert, &key).unwrap();
        assert!(handshake(&ca, &ca, "api.example.com", "api.example.com").await);
        // The leaf names only its host.
        assert!(!handshake(&ca, &ca, "api.example.com", "other.example.com").await);
        // Loaded again (a restart, a fork): same trust.
        let again = LineageCa::load(&cert, &key).unwrap();
        assert!(handshake(&ca, &again, "b.example.com", "b.example.com").await);
        // Another lineage's CA is not trusted.
        let (cert2, key2) = LineageCa::generate().unwrap();
        let other = LineageCa::load(&cert2, &key2).unwrap();
        assert!(!handshake(&ca, &other, "api.example.com", "api.example.com").await);
        assert!(LineageCa::load(&cert, "junk").is_err());
    }
}
