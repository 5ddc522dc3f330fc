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
//!   through the [`crate::Dialer`] (never into the always-denied set), and its certificate is
//!   verified against the host's roots (plus the operator's extra CAs).
//! - any other name, or no name: the connection passes end to end as for the domain filter
//!   (the sandbox's own TLS, SNI only).
//!
//! Plain HTTP (port 80) is never intercepted: a placeholder sent there goes out unchanged.
//!
//! **ALPN is mirrored.** The upstream is offered the protocols of the sandbox's ClientHello
//! that the proxy speaks (`h2`, `http/1.1`, in the sandbox's order; none if it offered none)
//! and its handshake completes first. Then the sandbox is answered with a leaf for the name
//! signed by its lineage's CA ([`LineageCa`], whose key stays on the host), offering only the
//! protocol the upstream chose (`http/1.1` when it chose none). The sandbox thus sees what it
//! would see without the proxy.
//!
//! **Each request is proxied** (hyper on both sides, in that protocol: http/1.1 with
//! keep-alive, or h2 streams; one upstream connection per sandbox connection, bodies
//! streamed both ways, not buffered). A request is strict: an origin-form target (`/path`;
//! over h2, scheme `https` and an `:authority` naming the connection's host), exactly one
//! `Host` (over h2 at most one) naming the host the connection was opened for, no `CONNECT`;
//! otherwise it is answered `400` and never forwarded. Upgrades (WebSocket over http/1.1)
//! are answered `501`: after one the stream is no longer HTTP the proxy can read, and
//! passing it through would carry the rest of the connection unchecked. Hop-by-hop headers
//! (`Connection` and what it names, `Keep-Alive`, `Transfer-Encoding`, `Upgrade`, `TE` but
//! `te: trailers`) are dropped both ways. In each request the placeholder is replaced by the
//! secret's current value where the secret says ([`Inject`]: a header, a query parameter,
//! basic-auth credentials) and nowhere else. Over http/1.1 a refused request also closes the
//! connection.
//!
//! Bounds: a request head of at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields (`431`;
//! over h2 the same size is the `SETTINGS_MAX_HEADER_LIST_SIZE`), at most [`MAX_STREAMS`]
//! concurrent h2 streams, and a connection without a request in flight for [`IDLE_TIMEOUT`]
//! is closed, which also bounds the time a head may take to arrive. (hyper's own http/1.1
//! header timeout is off: it runs between requests too and ends the connection with an
//! error, where the proxy's idle close sends a proper close_notify and FIN.)
//!
//! The proxy holds, per sandbox, the placeholders and the lineage CA; a secret's value is
//! fetched from its [`SecretSource`] for each request (so a replaced value is used by the next
//! request, on an open connection too, and a deleted secret is no longer injected), counted
//! with [`SecretSource::injected`] for each request it goes into, never logged, and dropped
//! once the request is handed to the upstream connection. A header holding a value is marked
//! sensitive (h2's HPACK never indexes it).
//!
//! **Closing** (for gVisor): a sandbox holding a TCP endpoint in TIME_WAIT cannot be
//! checkpointed, and TIME_WAIT is for the side that closes first. When the proxy ends a
//! connection (the upstream ended its own, or answered `Connection: close`; the connection
//! idled; a request was refused over http/1.1), its TLS close_notify and TCP FIN go out in
//! one segment (corked), it waits up to [`CLOSE_WAIT`] for the sandbox's FIN, and resets. When
//! the sandbox closes first (the usual end of a keep-alive connection), the proxy sends no
//! FIN and resets at once: the sandbox's endpoint ends without a TIME_WAIT.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::NetError;
use crate::sniff;

/// Longest request head (request line and headers; over h2, the header list) the proxy reads.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a request.
pub const MAX_HEADERS: usize = 128;
/// How long an intercepted connection may stay without a request in flight (idle, or
/// receiving a request head), from its start or the end of its last request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most concurrent streams of an h2 connection from a sandbox.
pub const MAX_STREAMS: u32 = 100;
/// How long the TLS handshakes (sandbox side, upstream side) may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the proxy's FIN, how long it waits for the sandbox's before resetting.
const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// Leaves for this many names are kept per lineage; more and the cache starts over.
const MAX_LEAVES: usize = 256;
/// The application protocols the proxy speaks (ALPN names).
const H2: &[u8] = b"h2";
const HTTP11: &[u8] = b"http/1.1";

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
    current_for(binding, name).await.unwrap_or_else(|why| {
        tracing::warn!(sandbox = %binding.sandbox, %why, "secrets proxy: secrets unavailable; not intercepting");
        Vec::new()
    })
}

/// The current secrets of `binding` whose hosts list `name`, as its source has them now.
async fn current_for(binding: &SecretsBinding, name: &str) -> Result<Vec<LiveSecret>, String> {
    Ok(binding
        .source
        .current(&binding.names())
        .await?
        .into_iter()
        .filter(|s| sniff::name_allowed(&s.hosts, name))
        .collect())
}

/// The application protocol spoken on both sides of an intercepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    H2,
}

impl Proto {
    /// What the upstream's handshake chose: h2, or http/1.1 (chosen, or nothing chosen).
    fn chosen(alpn: Option<&[u8]>) -> Proto {
        if alpn == Some(H2) {
            Proto::H2
        } else {
            Proto::Http1
        }
    }

    fn alpn(self) -> &'static [u8] {
        match self {
            Proto::Http1 => HTTP11,
            Proto::H2 => H2,
        }
    }
}

/// What the upstream is offered: the protocols the sandbox's ClientHello (`hello`) offers that
/// the proxy speaks, in the sandbox's order; none when it offers none (or its offer does not
/// parse: the sandbox's handshake then fails on its own).
fn upstream_offer(hello: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for p in sniff::tls_alpn(hello).unwrap_or_default() {
        if (p == H2 || p == HTTP11) && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// One intercepted connection: TLS to `upstream` verified for `name`, offering what the
/// sandbox offers (its ClientHello is in `head`, read already); then TLS from the sandbox
/// terminated with a leaf for `name`, offering only what the upstream chose; then HTTP on
/// both sides ([`serve`]) until either ends; then the sandbox's side is closed so that it
/// keeps no TIME_WAIT ([`finish`]).
pub(crate) async fn intercept(
    inbound: TcpStream,
    head: Vec<u8>,
    upstream: TcpStream,
    name: &str,
    binding: Arc<SecretsBinding>,
) -> Result<(), String> {
    let leaf = binding.ca.server_config(name).map_err(|e| e.to_string())?;
    // Another handle on the sandbox's socket, for its options once TLS wraps it and for its
    // end.
    let ctl = Arc::new(
        std::os::fd::AsFd::as_fd(&inbound)
            .try_clone_to_owned()
            .map_err(|e| format!("duplicating the sandbox's socket: {e}"))?,
    );
    let state = Arc::new(CloseState::default());
    let offer = upstream_offer(&head);
    let (result, upstream_conn) = match connect_upstream(upstream, name, &binding, offer).await {
        Ok(server) => {
            let proto = Proto::chosen(server.get_ref().1.alpn_protocol());
            match accept(inbound, head, &leaf, proto, &ctl, &state).await {
                Ok(client) => match serve(client, server, proto, name, binding.clone()).await {
                    Ok(rest) => (Ok(()), rest),
                    Err(why) => (Err(why), None),
                },
                Err(why) => (Err(why), None),
            }
        }
        Err((status, why)) => {
            // The sandbox is told why, over http/1.1 (a sandbox that offered only h2 fails
            // its handshake instead).
            if let Ok(mut client) = accept(inbound, head, &leaf, Proto::Http1, &ctl, &state).await {
                answer(&mut client, status, &why).await;
            }
            (Err(why), None)
        }
    };
    let upstream_closed = async {
        if let Some(conn) = upstream_conn {
            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn).await;
        }
    };
    tokio::join!(finish(ctl, &state), upstream_closed);
    result
}

/// TLS to the upstream, verified for `name` against the binding's roots, offering `offer`.
/// On failure, the status the sandbox is answered with and why.
async fn connect_upstream(
    upstream: TcpStream,
    name: &str,
    binding: &SecretsBinding,
    offer: Vec<Vec<u8>>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, (u16, String)> {
    let server_name = ServerName::try_from(name.to_string())
        .map_err(|e| (502, format!("server name {name}: {e}")))?;
    let mut config = (*binding.upstream).clone();
    config.alpn_protocols = offer;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name, upstream)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err((502, format!("the upstream TLS handshake with {name}: {e}"))),
        Err(_) => Err((
            504,
            format!("the upstream TLS handshake with {name} timed out"),
        )),
    }
}

/// The sandbox's TLS (its ClientHello in `head`) terminated with `leaf`, offering only
/// `proto`.
async fn accept(
    inbound: TcpStream,
    head: Vec<u8>,
    leaf: &rustls::ServerConfig,
    proto: Proto,
    ctl: &Arc<OwnedFd>,
    state: &Arc<CloseState>,
) -> Result<Guarded<tokio_rustls::server::TlsStream<Prefixed>>, String> {
    let mut config = leaf.clone();
    config.alpn_protocols = vec![proto.alpn().to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let prefixed = Prefixed {
        head,
        pos: 0,
        inner: inbound,
    };
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(prefixed))
        .await
        .map_err(|_| "the sandbox's TLS handshake timed out".to_string())?
        .map_err(|e| format!("the sandbox's TLS handshake: {e}"))?;
    Ok(Guarded {
        inner: tls,
        ctl: ctl.clone(),
        state: state.clone(),
        corked: false,
    })
}

/// The upstream's side of a connection once the sandbox's has ended: driven a moment longer
/// so it closes cleanly.
type UpstreamConn = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// HTTP on both sides, in `proto`: the sandbox's requests served by hyper, each checked,
/// injected and sent over the one upstream connection. Returns when the sandbox's side is
/// done (it closed; or the proxy closed it: the upstream's side ended, or it was idle
/// [`IDLE_TIMEOUT`]), with the upstream's side if it is still open.
async fn serve(
    client: Guarded<tokio_rustls::server::TlsStream<Prefixed>>,
    server: tokio_rustls::client::TlsStream<TcpStream>,
    proto: Proto,
    name: &str,
    binding: Arc<SecretsBinding>,
) -> Result<Option<UpstreamConn>, String> {
    let io = TokioIo::new(server);
    let (upstream, upstream_conn): (Upstream, UpstreamConn) = match proto {
        Proto::Http1 => {
            let (send, conn) = hyper::client::conn::http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| format!("the HTTP handshake with {name}: {e}"))?;
            (Upstream::Http1(Mutex::new(send)), Box::pin(conn))
        }
        Proto::H2 => {
            let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| format!("the HTTP/2 handshake with {name}: {e}"))?;
            (Upstream::H2(send), Box::pin(conn))
        }
    };
    let activity = Arc::new(Activity::new());
    let proxy = Arc::new(Proxy {
        name: name.to_string(),
        binding,
        upstream,
        proto,
        activity: activity.clone(),
    });
    let service = hyper::service::service_fn(move |req| {
        let proxy = proxy.clone();
        async move { Ok::<_, Infallible>(proxy.handle(req).await) }
    });
    let io = TokioIo::new(client);
    let (served, rest) = match proto {
        Proto::Http1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(None)
                .max_buf_size(MAX_HEAD)
                .max_header_size(MAX_HEAD)
                .max_headers(MAX_HEADERS)
                .keep_alive(true)
                .serve_connection(io, service);
            let conn = std::pin::pin!(conn);
            drive(conn, |c| c.graceful_shutdown(), upstream_conn, &activity).await
        }
        Proto::H2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_HEAD as u32)
                .max_concurrent_streams(MAX_STREAMS)
                .serve_connection(io, service);
            let conn = std::pin::pin!(conn);
            drive(conn, |c| c.graceful_shutdown(), upstream_conn, &activity).await
        }
    };
    served.map_err(|e| format!("serving the sandbox: {}", error_text(&e)))?;
    Ok(rest)
}

/// Polls the sandbox's connection `conn` to its end, shutting it down gracefully (requests
/// in flight finish, then it closes) when the upstream's connection ends or when no request
/// has been in flight for [`IDLE_TIMEOUT`].
async fn drive<C, G>(
    mut conn: Pin<&mut C>,
    mut graceful: G,
    upstream: UpstreamConn,
    activity: &Activity,
) -> (hyper::Result<()>, Option<UpstreamConn>)
where
    C: Future<Output = hyper::Result<()>> + ?Sized,
    G: FnMut(Pin<&mut C>),
{
    let mut upstream = Some(upstream);
    let mut closing = false;
    loop {
        let idle_at = activity.idle_deadline();
        let upstream_ended = async {
            match upstream.as_mut() {
                Some(u) => u.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            served = conn.as_mut() => return (served, upstream),
            ended = upstream_ended => {
                upstream = None;
                if let Err(e) = ended {
                    tracing::debug!(error = %error_text(&e), "secrets proxy: upstream connection failed");
                }
                if !closing {
                    graceful(conn.as_mut());
                    closing = true;
                }
            }
            () = tokio::time::sleep_until(idle_at), if !closing => {
                if activity.idle_deadline() <= Instant::now() {
                    graceful(conn.as_mut());
                    closing = true;
                }
            }
        }
    }
}

/// The error and its sources, for the log.
fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Whether a connection has requests in flight, and since when it has none.
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    /// When the last request ended, in milliseconds since `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
        }
    }

    /// A request starts; it ends when the returned guard is dropped (with its response body).
    fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// When the connection is idle too long if nothing happens until then.
    fn idle_deadline(&self) -> Instant {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Instant::now() + IDLE_TIMEOUT;
        }
        self.start + Duration::from_millis(self.last.load(Ordering::SeqCst)) + IDLE_TIMEOUT
    }
}

/// A request in flight (see [`Activity::busy`]).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let elapsed = self.0.start.elapsed().as_millis();
        self.0
            .last
            .store(u64::try_from(elapsed).unwrap_or(u64::MAX), Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The upstream's side of a connection: requests go out one at a time (http/1.1) or as
/// streams (h2).
enum Upstream {
    /// Guards only the handle: held while polling it, never across an `.await`.
    Http1(Mutex<hyper::client::conn::http1::SendRequest<Incoming>>),
    H2(hyper::client::conn::http2::SendRequest<Incoming>),
}

impl Upstream {
    async fn send(&self, req: Request<Incoming>) -> hyper::Result<Response<Incoming>> {
        match self {
            Upstream::Http1(send) => {
                // hyper serves a sandbox's http/1.1 requests one after another: the handle is
                // ready once the previous exchange is done.
                let mut req = Some(req);
                let response = std::future::poll_fn(|cx| {
                    let mut send = send.lock().expect("not poisoned");
                    match send.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {
                            let req = req.take().expect("sent once");
                            Poll::Ready(Ok(send.send_request(req)))
                        }
                        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                        Poll::Pending => Poll::Pending,
                    }
                })
                .await?;
                response.await
            }
            Upstream::H2(send) => {
                let mut send = send.clone();
                send.ready().await?;
                send.send_request(req).await
            }
        }
    }
}

/// What one intercepted connection serves each request with.
struct Proxy {
    /// The name the connection was opened for (its SNI).
    name: String,
    binding: Arc<SecretsBinding>,
    upstream: Upstream,
    proto: Proto,
    activity: Arc<Activity>,
}

impl Proxy {
    /// One request of the sandbox: checked, injected, sent upstream; the upstream's answer
    /// (streamed), or the proxy's own when the request is refused or the upstream fails.
    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let busy = self.activity.busy();
        let sandbox = &self.binding.sandbox;
        let name = self.name.as_str();
        let (mut parts, body) = req.into_parts();
        if let Err((status, why)) = check_request(&parts, name, self.proto) {
            tracing::info!(%sandbox, %name, %why, "secrets proxy: request refused");
            return self.refusal(status, &why);
        }
        strip_hop_by_hop(&mut parts.headers, true);
        // The values are looked up only for a request that holds a placeholder (nothing
        // else can be injected).
        let lookup = if holds_placeholder(&parts, &self.binding.placeholders) {
            current_for(&self.binding, name).await
        } else {
            Ok(Vec::new())
        };
        let secrets = match lookup {
            Ok(s) => s,
            Err(why) => {
                tracing::warn!(%sandbox, %why, "secrets proxy: secrets unavailable");
                return self.refusal(StatusCode::BAD_GATEWAY, "secrets unavailable");
            }
        };
        let placeholders: Vec<(&LiveSecret, &str)> = secrets
            .iter()
            .filter_map(|s| Some((s, self.binding.placeholder(&s.name)?)))
            .collect();
        let injected = match rewrite_request(&mut parts, name, self.proto, &placeholders) {
            Ok(i) => i,
            Err(why) => {
                tracing::info!(%sandbox, %name, %why, "secrets proxy: request refused");
                return self.refusal(StatusCode::BAD_REQUEST, &why);
            }
        };
        drop(placeholders);
        drop(secrets);
        for secret in &injected {
            self.binding.source.injected(secret, name);
        }
        let sent = self.upstream.send(Request::from_parts(parts, body)).await;
        match sent {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                let close =
                    self.proto == Proto::Http1 && wants_close(&parts.headers, parts.version);
                strip_hop_by_hop(&mut parts.headers, false);
                if close {
                    // The upstream closes its connection after this answer: so does the
                    // sandbox's (hyper closes after an answer that says so), and the sandbox
                    // knows not to send another request on it.
                    parts
                        .headers
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                tracing::debug!(%sandbox, %name, injected = injected.len(), status = %parts.status, "secrets proxy: request forwarded");
                Response::from_parts(parts, ProxyBody::Upstream { body, _busy: busy })
            }
            Err(e) => {
                let why = format!("{name}: {}", error_text(&e));
                tracing::info!(%sandbox, %why, "secrets proxy: upstream failed");
                self.refusal(StatusCode::BAD_GATEWAY, &why)
            }
        }
    }

    /// The proxy's own answer; over http/1.1 the connection then closes.
    fn refusal(&self, status: StatusCode, why: &str) -> Response<ProxyBody> {
        let body = format!("sandpit secrets proxy: {why}\n");
        let mut r = Response::new(ProxyBody::Text(Some(Bytes::from(body))));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if self.proto == Proto::Http1 {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// A response body: the upstream's, streamed (the request stays in flight until it is
/// dropped), or the proxy's own text.
enum ProxyBody {
    Upstream { body: Incoming, _busy: Busy },
    Text(Option<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream { body, .. } => Pin::new(body).poll_frame(cx),
            ProxyBody::Text(text) => Poll::Ready(text.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Text(text) => text.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Text(text) => {
                SizeHint::with_exact(text.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// Whether `host` (a `Host` header or an `:authority`) names `name`: the same name, with port
/// 443 or none, a trailing dot or none.
fn host_matches(host: &str, name: &str) -> bool {
    let h = host.strip_suffix(":443").unwrap_or(host);
    let h = h.strip_suffix('.').unwrap_or(h);
    h.eq_ignore_ascii_case(name)
}

/// Whether the request `parts` may go to `name` (the connection's host); else the status
/// to answer and why. Strict: an origin-form target (for h2: scheme `https`, an `:authority`
/// naming `name`), exactly one `Host` naming `name` (h2: at most one), no `CONNECT`, no
/// upgrade, at most [`MAX_HEADERS`] fields.
fn check_request(parts: &Parts, name: &str, proto: Proto) -> Result<(), (StatusCode, String)> {
    let bad = |why: String| Err((StatusCode::BAD_REQUEST, why));
    if parts.headers.len() > MAX_HEADERS {
        return Err((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("more than {MAX_HEADERS} header fields"),
        ));
    }
    if parts.method == Method::CONNECT {
        return bad("CONNECT is not proxied".into());
    }
    if parts.headers.contains_key(header::UPGRADE) {
        return Err((
            StatusCode::NOT_IMPLEMENTED,
            "upgrades (WebSocket) are not proxied for a secret's host".into(),
        ));
    }
    let uri = &parts.uri;
    let origin_form = uri.path().starts_with('/')
        && match proto {
            Proto::Http1 => uri.scheme().is_none() && uri.authority().is_none(),
            Proto::H2 => uri.scheme_str() == Some("https"),
        };
    if !origin_form {
        return bad("only origin-form request targets (`/path`) are accepted".into());
    }
    if proto == Proto::H2 {
        let authority = uri.authority().map_or("", |a| a.as_str());
        if !host_matches(authority, name) {
            return bad(format!(
                ":authority {authority:?} is not the name the connection was opened for ({name})"
            ));
        }
    }
    let hosts: Vec<&HeaderValue> = parts.headers.get_all(header::HOST).iter().collect();
    match hosts.as_slice() {
        [host] => {
            let host = String::from_utf8_lossy(host.as_bytes());
            if !host_matches(&host, name) {
                return bad(format!(
                    "Host {host:?} is not the name the connection was opened for ({name})"
                ));
            }
        }
        [] if proto == Proto::H2 => {}
        _ => return bad("the request needs exactly one Host header".into()),
    }
    Ok(())
}

/// Headers that concern one connection, not the request or answer they travel with (RFC 9110
/// §7.6.1), dropped before the other side gets them. `te: trailers` stays in requests (gRPC
/// needs it).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
];

/// Drops the hop-by-hop headers of `headers` and those its `Connection` names (never
/// `Host`); `te: trailers` stays in a request.
fn strip_hop_by_hop(headers: &mut HeaderMap, request: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| *n != header::HOST)
        .collect();
    let trailers = request
        && headers
            .get_all(header::TE)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(n);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether an http/1.x answer (its headers and version) closes its connection.
fn wants_close(headers: &HeaderMap, version: Version) -> bool {
    let has = |token: &str| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has("close") || (version == Version::HTTP_10 && !has("keep-alive"))
}

/// The request `parts` (checked by [`check_request`]) as the upstream gets it: the
/// placeholders of `secrets` replaced by their values where each secret says ([`Inject`])
/// and nowhere else, the target made what `proto` sends (`/path` for http/1.1,
/// `https://<name>/path` for h2, whose `:authority` replaces `Host`). Returns the names of the
/// secrets injected. A value put in a header is marked sensitive (h2 never indexes it).
fn rewrite_request(
    parts: &mut Parts,
    name: &str,
    proto: Proto,
    secrets: &[(&LiveSecret, &str)],
) -> Result<Vec<String>, String> {
    let mut target = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let mut injected = Vec::new();
    for (secret, placeholder) in secrets {
        let mut done = false;
        match &secret.inject {
            Inject::Header { name: h, format } => {
                let Ok(h) = HeaderName::from_bytes(h.as_bytes()) else {
                    continue;
                };
                for (k, v) in parts.headers.iter_mut() {
                    if *k == h && v.to_str().is_ok_and(|v| v.contains(placeholder)) {
                        *v = sensitive(&format.replace("{value}", &secret.value), &secret.name)?;
                        done = true;
                    }
                }
            }
            Inject::Query { param } => {
                if let Some(t) = replace_query(&target, param, placeholder, &secret.value) {
                    target = t;
                    done = true;
                }
            }
            Inject::Basic { username } => {
                let want = format!("{username}:{placeholder}");
                for (k, v) in parts.headers.iter_mut() {
                    if *k != header::AUTHORIZATION {
                        continue;
                    }
                    let Some(cred) = v
                        .to_str()
                        .ok()
                        .and_then(|v| v.split_once(' '))
                        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
                        .and_then(|(_, c)| {
                            base64::engine::general_purpose::STANDARD
                                .decode(c.trim())
                                .ok()
                        })
                    else {
                        continue;
                    };
                    if cred == want.as_bytes() {
                        let encoded = base64::engine::general_purpose::STANDARD
                            .encode(format!("{username}:{}", secret.value));
                        *v = sensitive(&format!("Basic {encoded}"), &secret.name)?;
                        done = true;
                    }
                }
            }
        }
        if done {
            injected.push(secret.name.clone());
        }
    }
    let uri = match proto {
        Proto::Http1 => {
            parts.version = Version::HTTP_11;
            Uri::try_from(target).map_err(|e| e.to_string())
        }
        Proto::H2 => {
            parts.headers.remove(header::HOST);
            Uri::builder()
                .scheme("https")
                .authority(name)
                .path_and_query(target)
                .build()
                .map_err(|e| e.to_string())
        }
    };
    parts.uri = uri.map_err(|e| format!("the request target: {e}"))?;
    Ok(injected)
}

/// Whether any of `placeholders` (secret name, placeholder) is where [`rewrite_request`]
/// could replace it: in a header value, in the query, or in `Authorization: Basic`
/// credentials (base64).
fn holds_placeholder(parts: &Parts, placeholders: &[(String, String)]) -> bool {
    let holds = |bytes: &[u8]| {
        placeholders
            .iter()
            .any(|(_, p)| !p.is_empty() && bytes.windows(p.len()).any(|w| w == p.as_bytes()))
    };
    if parts.uri.query().is_some_and(|q| holds(q.as_bytes())) {
        return true;
    }
    parts.headers.iter().any(|(k, v)| {
        holds(v.as_bytes())
            || (*k == header::AUTHORIZATION
                && v.to_str()
                    .ok()
                    .and_then(|v| v.split_once(' '))
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
                    .and_then(|(_, c)| {
                        base64::engine::general_purpose::STANDARD
                            .decode(c.trim())
                            .ok()
                    })
                    .is_some_and(|cred| holds(&cred)))
    })
}

/// A header value holding a secret's value, marked sensitive.
fn sensitive(text: &str, secret: &str) -> Result<HeaderValue, String> {
    let mut v = HeaderValue::from_str(text)
        .map_err(|_| format!("the value of secret {secret} cannot go into a header"))?;
    v.set_sensitive(true);
    Ok(v)
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

/// How an intercepted connection's sandbox side ended, as [`Guarded`] saw it.
#[derive(Debug, Default)]
struct CloseState {
    /// The sandbox closed (EOF, TLS close_notify) or broke its side.
    peer_closed: AtomicBool,
    /// The proxy sent its close_notify and FIN.
    proxy_closed: AtomicBool,
}

/// The sandbox's side of an intercepted connection as hyper uses it. A shutdown sends TLS
/// close_notify and the TCP FIN in one segment (corked), unless the sandbox closed first:
/// then nothing, and [`finish`] resets the connection.
struct Guarded<S> {
    inner: S,
    /// The sandbox's socket (a duplicate of the descriptor the TLS stream reads).
    ctl: Arc<OwnedFd>,
    state: Arc<CloseState>,
    corked: bool,
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let (before, room) = (buf.filled().len(), buf.remaining() > 0);
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        let ended = match &read {
            Poll::Ready(Ok(())) => room && buf.filled().len() == before,
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        };
        if ended {
            self.state.peer_closed.store(true, Ordering::SeqCst);
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.state.peer_closed.load(Ordering::SeqCst) {
            // A FIN now would leave the sandbox's endpoint in TIME_WAIT: [`finish`] resets.
            return Poll::Ready(Ok(()));
        }
        if !self.corked {
            let _ = socket2::SockRef::from(&*self.ctl).set_tcp_cork(true);
            self.corked = true;
        }
        let done = std::task::ready!(Pin::new(&mut self.inner).poll_shutdown(cx));
        let _ = socket2::SockRef::from(&*self.ctl).set_tcp_cork(false);
        self.corked = false;
        self.state.proxy_closed.store(true, Ordering::SeqCst);
        Poll::Ready(done)
    }
}

/// The end of the sandbox's side of an intercepted connection, once nothing else holds it
/// (`ctl` is the last descriptor). gVisor cannot checkpoint a sandbox holding a TCP endpoint
/// in TIME_WAIT, which the side that closes first gets. So: if the proxy closed first (its
/// close_notify and FIN went out together), it waits up to [`CLOSE_WAIT`] for the sandbox's
/// FIN (then the sandbox has everything it was sent), and resets; if the sandbox closed
/// first, the proxy sent no FIN and resets at once, which ends the sandbox's endpoint
/// without a TIME_WAIT.
async fn finish(ctl: Arc<OwnedFd>, state: &CloseState) {
    if state.proxy_closed.load(Ordering::SeqCst) && !state.peer_closed.load(Ordering::SeqCst) {
        let dup = ctl
            .try_clone()
            .map(std::net::TcpStream::from)
            .and_then(TcpStream::from_std);
        if let Ok(mut s) = dup {
            let _ = tokio::time::timeout(CLOSE_WAIT, async {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        }
    }
    let _ = socket2::SockRef::from(&*ctl).set_linger(Some(Duration::ZERO));
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

    const NAME: &str = "api.example.com";

    fn request(method: &str, uri: &str, version: Version, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().method(method).uri(uri).version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn h1(uri: &str, headers: &[(&str, &str)]) -> Parts {
        request("GET", uri, Version::HTTP_11, headers)
    }

    fn h2(uri: &str, headers: &[(&str, &str)]) -> Parts {
        request("GET", uri, Version::HTTP_2, headers)
    }

    /// What [`Proxy::handle`] does to a request before sending it.
    fn rewrite(
        p: &mut Parts,
        proto: Proto,
        secrets: &[(LiveSecret, &str)],
    ) -> Result<Vec<String>, (StatusCode, String)> {
        check_request(p, NAME, proto)?;
        strip_hop_by_hop(&mut p.headers, true);
        let refs: Vec<(&LiveSecret, &str)> = secrets.iter().map(|(s, ph)| (s, *ph)).collect();
        rewrite_request(p, NAME, proto, &refs).map_err(|e| (StatusCode::BAD_REQUEST, e))
    }

    #[test]
    fn header_placeholder_becomes_the_formatted_value() {
        let s = [(secret("openai", bearer(), "sk-real"), "ph-123")];
        let mut p = h1(
            "/v1/x",
            &[
                ("Host", "api.example.com"),
                ("Authorization", "Bearer ph-123"),
                ("Connection", "keep-alive, x-hop"),
                ("X-Hop", "1"),
                ("X-Other", "ph-123"),
            ],
        );
        assert_eq!(rewrite(&mut p, Proto::Http1, &s).unwrap(), ["openai"]);
        assert_eq!(p.headers[header::AUTHORIZATION], "Bearer sk-real");
        assert!(p.headers[header::AUTHORIZATION].is_sensitive());
        assert_eq!(p.headers["x-other"], "ph-123", "only where the secret says");
        assert!(!p.headers.contains_key(header::CONNECTION));
        assert!(!p.headers.contains_key("x-hop"), "named by Connection");
        assert_eq!(p.headers[header::HOST], "api.example.com");
        assert_eq!(p.uri, "/v1/x");
        assert_eq!(p.version, Version::HTTP_11);
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
        let mut p = h1(
            "/p?x=1&key=ph-q&key=other",
            &[
                ("Host", "api.example.com:443"),
                ("Authorization", &format!("Basic {cred}")),
            ],
        );
        let secrets = [q, b];
        assert_eq!(rewrite(&mut p, Proto::Http1, &secrets).unwrap(), ["q", "b"]);
        assert_eq!(p.uri, "/p?x=1&key=a%20b%26c&key=other");
        let want = base64::engine::general_purpose::STANDARD.encode("me:pw");
        assert_eq!(p.headers[header::AUTHORIZATION], format!("Basic {want}"));
        // Over h2 the target is absolute and `:authority` replaces `Host`.
        let mut p = h2(
            "https://api.example.com/p?key=ph-q",
            &[("host", "api.example.com")],
        );
        assert_eq!(rewrite(&mut p, Proto::H2, &secrets).unwrap(), ["q"]);
        assert_eq!(p.uri, "https://api.example.com/p?key=a%20b%26c");
        assert!(!p.headers.contains_key(header::HOST));
    }

    #[test]
    fn no_placeholder_no_injection() {
        let s = [(secret("openai", bearer(), "sk-real"), "ph-123")];
        let mut p = h1(
            "/",
            &[
                ("Host", "api.example.com"),
                ("Authorization", "Bearer mine"),
            ],
        );
        assert!(rewrite(&mut p, Proto::Http1, &s).unwrap().is_empty());
        assert_eq!(p.headers[header::AUTHORIZATION], "Bearer mine");
    }

    #[test]
    fn hostile_requests_are_refused() {
        let s = [(secret("openai", bearer(), "sk-real"), "ph-123")];
        let host = ("Host", "api.example.com");
        let cases: Vec<(Parts, Proto, StatusCode)> = vec![
            // Another host behind the same connection (a CDN would route by Host).
            (
                h1(
                    "/",
                    &[
                        ("Host", "evil.example.net"),
                        ("Authorization", "Bearer ph-123"),
                    ],
                ),
                Proto::Http1,
                StatusCode::BAD_REQUEST,
            ),
            (
                h1("/", &[host, ("Host", "evil.example.net")]),
                Proto::Http1,
                StatusCode::BAD_REQUEST,
            ),
            (
                h1("/", &[("Authorization", "Bearer ph-123")]),
                Proto::Http1,
                StatusCode::BAD_REQUEST,
            ),
            (
                h1("/", &[("Host", "api.example.com.evil.net")]),
                Proto::Http1,
                StatusCode::BAD_REQUEST,
            ),
            (
                h1("/", &[("Host", "api.example.com:8443")]),
                Proto::Http1,
                StatusCode::BAD_REQUEST,
            ),
            (
                h1("/", &[("Host", "me@api.example.com")]),
                Proto::Http1,
                StatusCode::BAD_REQUEST,
            ),
            // Absolute, asterisk and authority forms.
            (
                h1("https://evil.example.net/", &[host]),
                Proto::Http1,
                StatusCode::BAD_REQUEST,
            ),
            (
                h1("https://api.example.com/", &[host]),
                Proto::Http1,
                StatusCode::BAD_REQUEST,
            ),
            (
                request("OPTIONS", "*", Version::HTTP_11, &[host]),
                Proto::Http1,
                StatusCode::BAD_REQUEST,
            ),
            (
                request("CONNECT", "evil.example.net:443", Version::HTTP_11, &[host]),
                Proto::Http1,
                StatusCode::BAD_REQUEST,
            ),
            (
                h1(
                    "/",
                    &[host, ("Upgrade", "websocket"), ("Connection", "Upgrade")],
                ),
                Proto::Http1,
                StatusCode::NOT_IMPLEMENTED,
            ),
            // h2: the `:authority`, the scheme, a `Host` beside them.
            (
                h2("https://evil.example.net/", &[]),
                Proto::H2,
                StatusCode::BAD_REQUEST,
            ),
            (
                h2("https://me@api.example.com/", &[]),
                Proto::H2,
                StatusCode::BAD_REQUEST,
            ),
            (
                h2("http://api.example.com/", &[]),
                Proto::H2,
                StatusCode::BAD_REQUEST,
            ),
            (
                h2("https://api.example.com/", &[("host", "evil.example.net")]),
                Proto::H2,
                StatusCode::BAD_REQUEST,
            ),
            (
                request("CONNECT", "https://api.example.com/", Version::HTTP_2, &[]),
                Proto::H2,
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (mut p, proto, status) in cases {
            let what = format!("{} {} {:?}", p.method, p.uri, p.headers);
            match rewrite(&mut p, proto, &s) {
                Err((got, _)) => assert_eq!(got, status, "{what}"),
                Ok(_) => panic!("{what} was accepted"),
            }
        }
        let many: Vec<(String, String)> = (0..=MAX_HEADERS)
            .map(|i| (format!("x-{i}"), "y".to_string()))
            .collect();
        let mut headers: Vec<(&str, &str)> =
            many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        headers.push(host);
        let got = rewrite(&mut h1("/", &headers), Proto::Http1, &s).unwrap_err();
        assert_eq!(got.0, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }

    #[test]
    fn the_store_is_asked_only_for_requests_holding_a_placeholder() {
        let ph = [("openai".to_string(), "ph-123".to_string())];
        let holds = |uri: &str, headers: &[(&str, &str)]| holds_placeholder(&h1(uri, headers), &ph);
        assert!(!holds("/ph-123", &[("Host", NAME), ("X", "Bearer mine")]));
        assert!(holds("/?key=ph-123", &[("Host", NAME)]));
        assert!(holds("/", &[("Host", NAME), ("X-Key", "Bearer ph-123")]));
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("me:ph-123")
        );
        assert!(holds("/", &[("Host", NAME), ("Authorization", &basic)]));
        let other = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("me:pw")
        );
        assert!(!holds("/", &[("Host", NAME), ("Authorization", &other)]));
    }

    #[test]
    fn hop_by_hop_headers() {
        let mut p = h1(
            "/",
            &[
                ("Host", "api.example.com"),
                ("Connection", "host, x-a"),
                ("X-A", "1"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Connection", "keep-alive"),
                ("Transfer-Encoding", "chunked"),
                ("TE", "trailers"),
                ("X-B", "2"),
            ],
        );
        strip_hop_by_hop(&mut p.headers, true);
        let names: Vec<&str> = p.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["host", "x-b", "te"], "Connection cannot drop Host");
        let mut answer = HeaderMap::new();
        answer.insert(header::TE, HeaderValue::from_static("trailers"));
        answer.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut answer, false);
        assert_eq!(answer.len(), 1);
        let close = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, HeaderValue::from_static(v));
            h
        };
        assert!(wants_close(&close("keep-alive, Close"), Version::HTTP_11));
        assert!(!wants_close(&close("keep-alive"), Version::HTTP_11));
        assert!(wants_close(&HeaderMap::new(), Version::HTTP_10));
        assert!(!wants_close(&close("keep-alive"), Version::HTTP_10));
    }

    #[test]
    fn the_upstream_is_offered_what_both_speak() {
        let offer = |alpn: &[&[u8]]| {
            upstream_offer(&sniff::client_hello_with_alpn(NAME, alpn))
                .into_iter()
                .map(|p| String::from_utf8(p).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(offer(&[b"h2", b"http/1.1"]), ["h2", "http/1.1"]);
        assert_eq!(offer(&[b"http/1.1", b"h2"]), ["http/1.1", "h2"]);
        assert_eq!(offer(&[b"spdy/3", b"http/1.1", b"http/1.1"]), ["http/1.1"]);
        assert_eq!(offer(&[b"h3"]), Vec::<String>::new());
        assert_eq!(offer(&[]), Vec::<String>::new());
        assert_eq!(Proto::chosen(Some(b"h2")), Proto::H2);
        assert_eq!(Proto::chosen(Some(b"http/1.1")), Proto::Http1);
        assert_eq!(Proto::chosen(None), Proto::Http1);
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

    /// A stand-in for hyper's connection in [`drive`]: it ends once shut down gracefully.
    fn closable() -> (UpstreamConn, Arc<tokio::sync::Notify>) {
        let shut = Arc::new(tokio::sync::Notify::new());
        let s = shut.clone();
        (
            Box::pin(async move {
                s.notified().await;
                Ok(())
            }),
            shut,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_shut_down() {
        let (mut conn, shut) = closable();
        let activity = Arc::new(Activity::new());
        let busy = activity.busy();
        let started = Instant::now();
        let release = async {
            tokio::time::sleep(IDLE_TIMEOUT * 2).await;
            drop(busy);
        };
        let ((served, rest), ()) = tokio::join!(
            drive(
                conn.as_mut(),
                |_| shut.notify_one(),
                Box::pin(std::future::pending()),
                &activity
            ),
            release
        );
        assert!(served.is_ok());
        assert!(rest.is_some(), "the upstream's side is handed back");
        // Busy for 2 idle timeouts, then idle for one.
        assert_eq!(started.elapsed().as_secs(), IDLE_TIMEOUT.as_secs() * 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_end_of_the_upstream_shuts_the_sandbox_down() {
        let (mut conn, shut) = closable();
        let activity = Arc::new(Activity::new());
        let started = Instant::now();
        let upstream: UpstreamConn = Box::pin(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        });
        let (served, rest) = drive(conn.as_mut(), |_| shut.notify_one(), upstream, &activity).await;
        assert!(served.is_ok());
        assert!(rest.is_none());
        assert_eq!(started.elapsed().as_secs(), 5);
    }

    /// Loopback tests of [`intercept`]: a TLS upstream (its own test CA; hyper, http/1.1 or h2
    /// as its ALPN says), the proxy on a listener of its own (reads the ClientHello as the
    /// domain filter does, dials the upstream, intercepts), and a client playing the sandbox
    /// (trusting only the lineage's CA).
    mod loopback {
        use super::*;
        use std::net::SocketAddr;

        const PLACEHOLDER: &str = "sandpit-placeholder-openai";

        /// What the upstream received of one request.
        #[derive(Debug, Clone)]
        struct Seen {
            /// Which of the upstream's connections (0, 1, …).
            conn: usize,
            version: Version,
            uri: String,
            authorization: Option<String>,
        }

        /// The sandbox's secrets as the control layer would hold them, changed by the test.
        #[derive(Debug, Default)]
        struct Store {
            secrets: Mutex<Vec<LiveSecret>>,
            injected: Mutex<Vec<(String, String)>>,
            lookups: AtomicUsize,
        }

        impl Store {
            fn set(&self, value: Option<&str>) {
                *self.secrets.lock().unwrap() = value
                    .map(|v| secret("openai", bearer(), v))
                    .into_iter()
                    .collect();
            }
        }

        #[async_trait]
        impl SecretSource for Store {
            async fn current(&self, names: &[String]) -> Result<Vec<LiveSecret>, String> {
                self.lookups.fetch_add(1, Ordering::SeqCst);
                Ok(self
                    .secrets
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|s| names.contains(&s.name))
                    .cloned()
                    .collect())
            }
            fn injected(&self, secret: &str, host: &str) {
                self.injected
                    .lock()
                    .unwrap()
                    .push((secret.to_string(), host.to_string()));
            }
        }

        struct Harness {
            proxy: SocketAddr,
            ca: Arc<LineageCa>,
            store: Arc<Store>,
            seen: Arc<Mutex<Vec<Seen>>>,
            upstream_conns: Arc<AtomicUsize>,
            /// Each intercepted connection's outcome, when it ends.
            ended: tokio::sync::mpsc::UnboundedReceiver<Result<(), String>>,
        }

        impl Harness {
            /// An upstream offering `upstream_alpn`, the proxy in front of it.
            async fn new(upstream_alpn: &[&[u8]]) -> Harness {
                Harness::build(upstream_alpn, true).await
            }

            /// [`Harness::new`], with a proxy that trusts the upstream's CA or nothing.
            async fn build(upstream_alpn: &[&[u8]], trusted: bool) -> Harness {
                let (upstream, mut upstream_config) = upstream(upstream_alpn).await;
                if !trusted {
                    upstream_config = client_config(rustls::RootCertStore::empty());
                }
                let (cert, key) = LineageCa::generate().unwrap();
                let ca = Arc::new(LineageCa::load(&cert, &key).unwrap());
                let store = Arc::new(Store::default());
                store.set(Some("sk-one"));
                let binding = Arc::new(SecretsBinding {
                    sandbox: "sb-test".into(),
                    ca: ca.clone(),
                    placeholders: vec![("openai".into(), PLACEHOLDER.into())],
                    source: store.clone(),
                    upstream: Arc::new(upstream_config),
                });
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let proxy = listener.local_addr().unwrap();
                let (tx, ended) = tokio::sync::mpsc::unbounded_channel();
                let up = upstream.addr;
                tokio::spawn(async move {
                    while let Ok((mut inbound, _)) = listener.accept().await {
                        let (binding, tx) = (binding.clone(), tx.clone());
                        tokio::spawn(async move {
                            let mut head = Vec::new();
                            let name = loop {
                                let mut chunk = [0u8; 4096];
                                let n = inbound.read(&mut chunk).await.unwrap();
                                assert!(n > 0, "closed before its ClientHello");
                                head.extend_from_slice(&chunk[..n]);
                                match sniff::tls_sni(&head) {
                                    sniff::Sniff::Name(name) => break name,
                                    sniff::Sniff::NeedMore => {}
                                    sniff::Sniff::NoName => panic!("no SNI"),
                                }
                            };
                            let outbound = TcpStream::connect(up).await.unwrap();
                            let r = intercept(inbound, head, outbound, &name, binding).await;
                            let _ = tx.send(r);
                        });
                    }
                });
                Harness {
                    proxy,
                    ca,
                    store,
                    seen: upstream.seen,
                    upstream_conns: upstream.conns,
                    ended,
                }
            }

            /// A TLS connection from the sandbox offering `alpn`.
            async fn connect(&self, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<TcpStream> {
                self.try_connect(alpn)
                    .await
                    .expect("the sandbox's handshake")
            }

            async fn try_connect(
                &self,
                alpn: &[&[u8]],
            ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(self.ca.cert_der.clone()).unwrap();
                let mut config = client_config(roots);
                config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
                let tcp = TcpStream::connect(self.proxy).await.unwrap();
                tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect(ServerName::try_from(NAME).unwrap(), tcp)
                    .await
            }

            fn seen(&self) -> Vec<Seen> {
                self.seen.lock().unwrap().clone()
            }

            /// The outcome of the next intercepted connection to end.
            async fn ended(&mut self) -> Result<(), String> {
                tokio::time::timeout(Duration::from_secs(10), self.ended.recv())
                    .await
                    .expect("the intercepted connection ends")
                    .unwrap()
            }
        }

        fn client_config(roots: rustls::RootCertStore) -> rustls::ClientConfig {
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
        }

        struct Upstream {
            addr: SocketAddr,
            seen: Arc<Mutex<Vec<Seen>>>,
            conns: Arc<AtomicUsize>,
        }

        /// An HTTPS server for `api.example.com` offering `alpn`: it records each request and
        /// answers `ok` (with `Connection: close` to a request for `/close`). Returns it and a
        /// client configuration trusting its CA.
        async fn upstream(alpn: &[&[u8]]) -> (Upstream, rustls::ClientConfig) {
            let ca_key = KeyPair::generate().unwrap();
            let mut ca_params = CertificateParams::default();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(DnType::CommonName, "upstream test CA");
            let ca_cert = ca_params.self_signed(&ca_key).unwrap();
            let issuer = Issuer::new(ca_params, ca_key);
            let leaf_key = KeyPair::generate().unwrap();
            let leaf = CertificateParams::new(vec![NAME.to_string()])
                .unwrap()
                .signed_by(&leaf_key, &issuer)
                .unwrap();
            let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone(), ca_cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .unwrap();
            server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca_cert.der().clone()).unwrap();
            let mut client = client_config(roots);
            // As the control layer builds it; the proxy offers what the sandbox offers.
            client.alpn_protocols = vec![b"http/1.1".to_vec()];

            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let up = Upstream {
                addr: listener.local_addr().unwrap(),
                seen: Arc::default(),
                conns: Arc::default(),
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
            let (seen, conns) = (up.seen.clone(), up.conns.clone());
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let conn = conns.fetch_add(1, Ordering::SeqCst);
                    let (acceptor, seen) = (acceptor.clone(), seen.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let is_h2 = tls.get_ref().1.alpn_protocol() == Some(H2);
                        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let seen = seen.clone();
                            async move {
                                seen.lock().unwrap().push(Seen {
                                    conn,
                                    version: req.version(),
                                    uri: req.uri().to_string(),
                                    authorization: req
                                        .headers()
                                        .get(header::AUTHORIZATION)
                                        .map(|v| v.to_str().unwrap().to_string()),
                                });
                                let mut r = Response::new("ok".to_string());
                                if req.uri().path() == "/close" {
                                    r.headers_mut().insert(
                                        header::CONNECTION,
                                        HeaderValue::from_static("close"),
                                    );
                                }
                                Ok::<_, Infallible>(r)
                            }
                        });
                        let io = TokioIo::new(tls);
                        let _ = if is_h2 {
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, service)
                                .await
                        } else {
                            hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service)
                                .await
                        };
                    });
                }
            });
            (up, client)
        }

        /// The sandbox's HTTP client on one connection, in the protocol its handshake chose.
        enum Client {
            Http1(hyper::client::conn::http1::SendRequest<String>),
            H2(hyper::client::conn::http2::SendRequest<String>),
        }

        impl Client {
            async fn new(tls: tokio_rustls::client::TlsStream<TcpStream>) -> Client {
                let is_h2 = tls.get_ref().1.alpn_protocol() == Some(H2);
                let io = TokioIo::new(tls);
                if is_h2 {
                    let (send, conn) =
                        hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                            .await
                            .unwrap();
                    tokio::spawn(conn);
                    Client::H2(send)
                } else {
                    let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                    tokio::spawn(conn);
                    Client::Http1(send)
                }
            }

            /// GET `path` (to `authority`, `api.example.com` if `None`) with these headers:
            /// the status and the body.
            async fn get(
                &mut self,
                path: &str,
                authority: Option<&str>,
                headers: &[(&str, &str)],
            ) -> hyper::Result<(StatusCode, String)> {
                let authority = authority.unwrap_or(NAME);
                let mut b = Request::builder();
                b = match self {
                    Client::Http1(_) => b.uri(path).header(header::HOST, authority),
                    Client::H2(_) => b.uri(format!("https://{authority}{path}")),
                };
                for (k, v) in headers {
                    b = b.header(*k, *v);
                }
                let req = b.body(String::new()).unwrap();
                let response = match self {
                    Client::Http1(s) => {
                        s.ready().await?;
                        s.send_request(req).await?
                    }
                    Client::H2(s) => {
                        s.ready().await?;
                        s.send_request(req).await?
                    }
                };
                let status = response.status();
                let mut body = response.into_body();
                let mut out = Vec::new();
                while let Some(frame) =
                    std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                {
                    if let Ok(data) = frame?.into_data() {
                        out.extend_from_slice(&data);
                    }
                }
                Ok((status, String::from_utf8_lossy(&out).into_owned()))
            }
        }

        const BOTH: &[&[u8]] = &[b"h2", b"http/1.1"];
        const HTTP1_ONLY: &[&[u8]] = &[b"http/1.1"];
        const NONE: &[&[u8]] = &[];

        /// A sandbox offering `sandbox_alpn` to an upstream offering `upstream_alpn`: the
        /// sandbox gets `expect` (what the upstream chose), and three requests on its one
        /// connection go out on one upstream connection, each with the secret's value as it
        /// is at that moment.
        async fn three_requests(
            sandbox_alpn: &[&[u8]],
            upstream_alpn: &[&[u8]],
            expect: Option<&[u8]>,
        ) {
            let mut t = Harness::new(upstream_alpn).await;
            let tls = t.connect(sandbox_alpn).await;
            assert_eq!(tls.get_ref().1.alpn_protocol(), expect);
            let mut c = Client::new(tls).await;
            let auth = format!("Bearer {PLACEHOLDER}");
            let auth = [("authorization", auth.as_str())];
            assert_eq!(
                c.get("/one?x=1", None, &auth).await.unwrap(),
                (StatusCode::OK, "ok".into())
            );
            t.store.set(Some("sk-two"));
            assert_eq!(
                c.get("/two", None, &auth).await.unwrap(),
                (StatusCode::OK, "ok".into())
            );
            t.store.set(None);
            assert_eq!(
                c.get("/three", None, &auth).await.unwrap(),
                (StatusCode::OK, "ok".into())
            );
            let seen = t.seen();
            let authorizations: Vec<Option<&str>> =
                seen.iter().map(|s| s.authorization.as_deref()).collect();
            assert_eq!(
                authorizations,
                [
                    Some("Bearer sk-one"),
                    Some("Bearer sk-two"),
                    Some(format!("Bearer {PLACEHOLDER}").as_str())
                ]
            );
            assert!(seen.iter().all(|s| s.conn == 0), "{seen:?}");
            assert_eq!(t.upstream_conns.load(Ordering::SeqCst), 1);
            let version = if expect == Some(H2) {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            };
            assert!(seen.iter().all(|s| s.version == version), "{seen:?}");
            let uris: Vec<&str> = seen.iter().map(|s| s.uri.as_str()).collect();
            if version == Version::HTTP_2 {
                assert_eq!(
                    uris,
                    [
                        "https://api.example.com/one?x=1",
                        "https://api.example.com/two",
                        "https://api.example.com/three"
                    ]
                );
            } else {
                assert_eq!(uris, ["/one?x=1", "/two", "/three"]);
            }
            let host = (String::from("openai"), NAME.to_string());
            assert_eq!(*t.store.injected.lock().unwrap(), [host.clone(), host]);
            // A request without a placeholder: the store is not asked.
            assert_eq!(t.store.lookups.load(Ordering::SeqCst), 3);
            let mine = [("authorization", "Bearer mine")];
            assert_eq!(
                c.get("/four", None, &mine).await.unwrap(),
                (StatusCode::OK, "ok".into())
            );
            assert_eq!(t.store.lookups.load(Ordering::SeqCst), 3);
            assert_eq!(t.seen()[3].authorization.as_deref(), Some("Bearer mine"));
            // The sandbox closes first: the proxy ends the connection at once.
            drop(c);
            assert_eq!(t.ended().await, Ok(()));
        }

        #[tokio::test]
        async fn h2_when_both_speak_it() {
            three_requests(BOTH, BOTH, Some(b"h2")).await;
        }

        #[tokio::test]
        async fn http1_when_the_upstream_speaks_only_that() {
            three_requests(BOTH, HTTP1_ONLY, Some(b"http/1.1")).await;
        }

        #[tokio::test]
        async fn http1_when_the_sandbox_offers_only_that() {
            three_requests(HTTP1_ONLY, BOTH, Some(b"http/1.1")).await;
        }

        #[tokio::test]
        async fn no_alpn_when_the_sandbox_offers_none() {
            three_requests(NONE, BOTH, None).await;
        }

        #[tokio::test]
        async fn http1_when_the_upstream_chooses_nothing() {
            three_requests(BOTH, NONE, Some(b"http/1.1")).await;
        }

        #[tokio::test]
        async fn a_protocol_the_upstream_does_not_speak_is_not_offered() {
            // The sandbox wants h2 only; the upstream chooses nothing: the proxy offers
            // http/1.1, and the sandbox's handshake fails rather than falling back.
            let mut t = Harness::new(NONE).await;
            assert!(t.try_connect(&[b"h2"]).await.is_err());
            assert!(t.ended().await.is_err());
        }

        /// Raw bytes over one http/1.1 connection: all the proxy sends back until it closes.
        async fn raw(t: &Harness, request: Vec<u8>) -> String {
            let tls = t.connect(HTTP1_ONLY).await;
            let (mut rd, mut wr) = tokio::io::split(tls);
            let write = async move {
                let _ = wr.write_all(&request).await;
                wr
            };
            let read = async {
                let mut out = Vec::new();
                let _ = rd.read_to_end(&mut out).await;
                out
            };
            let (out, _wr) =
                tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(read, write) })
                    .await
                    .expect("the proxy answers and closes");
            String::from_utf8_lossy(&out).into_owned()
        }

        #[tokio::test]
        async fn hostile_http1_requests_are_answered_and_never_forwarded() {
            let mut t = Harness::new(BOTH).await;
            let big = "x".repeat(MAX_HEAD + 1);
            let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
            for (request, status) in [
                (
                    format!(
                        "GET / HTTP/1.1\r\nHost: evil.example.net\r\nAuthorization: Bearer {PLACEHOLDER}\r\n\r\n"
                    ),
                    "400",
                ),
                (
                    "GET https://evil.example.net/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n"
                        .to_string(),
                    "400",
                ),
                (
                    "OPTIONS * HTTP/1.1\r\nHost: api.example.com\r\n\r\n".to_string(),
                    "400",
                ),
                (
                    "GET / HTTP/1.1\r\nHost: api.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                        .to_string(),
                    "501",
                ),
                (
                    format!("GET / HTTP/1.1\r\nHost: api.example.com\r\nX-Big: {big}\r\n\r\n"),
                    "431",
                ),
                (
                    format!("GET / HTTP/1.1\r\nHost: api.example.com\r\n{many}\r\n"),
                    "431",
                ),
            ] {
                let out = raw(&t, request.clone().into_bytes()).await;
                assert!(
                    out.starts_with(&format!("HTTP/1.1 {status} ")),
                    "{:.80}: {out}",
                    request
                );
                assert!(!out.contains("sk-one"));
                let _ = t.ended().await;
            }
            assert!(t.seen().is_empty(), "{:?}", t.seen());
            assert_eq!(t.upstream_conns.load(Ordering::SeqCst), 6);
            assert!(t.store.injected.lock().unwrap().is_empty());
        }

        #[tokio::test]
        async fn hostile_h2_requests_are_refused_and_the_connection_lives_on() {
            let mut t = Harness::new(BOTH).await;
            let mut c = Client::new(t.connect(BOTH).await).await;
            let auth = format!("Bearer {PLACEHOLDER}");
            let auth = ("authorization", auth.as_str());
            let (status, body) = c.get("/", Some("evil.example.net"), &[auth]).await.unwrap();
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
            let (status, _) = c
                .get("/", None, &[auth, ("host", "evil.example.net")])
                .await
                .unwrap();
            assert_eq!(status, StatusCode::BAD_REQUEST);
            let big = "x".repeat(MAX_HEAD + 1);
            // hyper's h2 server refuses a header list over its SETTINGS_MAX_HEADER_LIST_SIZE.
            let (status, _) = c.get("/", None, &[auth, ("x-big", &big)]).await.unwrap();
            assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
            assert!(t.seen().is_empty(), "{:?}", t.seen());
            assert_eq!(
                c.get("/fine", None, &[auth]).await.unwrap(),
                (StatusCode::OK, "ok".into())
            );
            let seen = t.seen();
            assert_eq!(seen.len(), 1);
            assert_eq!(seen[0].authorization.as_deref(), Some("Bearer sk-one"));
            drop(c);
            assert_eq!(t.ended().await, Ok(()));
        }

        #[tokio::test]
        async fn the_proxy_closes_when_the_upstream_does() {
            // The upstream answers `Connection: close`: the sandbox gets it, then TLS
            // close_notify and EOF from the proxy (a client reading until the server closes,
            // as `openssl s_client` does, ends).
            let mut t = Harness::new(NONE).await;
            let out = raw(
                &t,
                format!(
                    "GET /close HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer {PLACEHOLDER}\r\n\r\n"
                )
                .into_bytes(),
            )
            .await;
            assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
            assert!(
                out.to_ascii_lowercase().contains("connection: close"),
                "{out}"
            );
            assert!(out.ends_with("\r\n\r\nok"), "{out}");
            assert_eq!(t.ended().await, Ok(()));
            assert_eq!(t.seen()[0].authorization.as_deref(), Some("Bearer sk-one"));
        }

        #[tokio::test]
        async fn a_failing_upstream_is_reported_to_the_sandbox() {
            // The proxy does not trust the upstream's certificate: the sandbox is told so
            // over http/1.1, and nothing is sent upstream.
            let mut t = Harness::build(BOTH, false).await;
            let out = raw(
                &t,
                b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n".to_vec(),
            )
            .await;
            assert!(out.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{out}");
            assert!(
                out.contains("the upstream TLS handshake with api.example.com"),
                "{out}"
            );
            assert!(t.ended().await.is_err());
            assert!(t.seen().is_empty());
        }
    }
}
