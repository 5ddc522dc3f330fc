//! Domain allow-lists (`allow_domains`), enforced on the connection rather than by trusting
//! DNS.
//!
//! For a slot whose policy lists domains, nftables redirects the sandbox's TCP connections to
//! ports 80 and 443 and its DNS queries (UDP 53) to this module's listeners on the host:
//!
//! - **TCP**: a connection to an address the policy allows on its own (`allow_cidrs`,
//!   `allow_ports`, minus `deny_cidrs` and the always-denied set) passes without a name.
//!   Otherwise the first bytes name the destination (TLS SNI, or the HTTP `Host`): a name the
//!   policy allows is resolved *here*, through the server's nameservers, and the connection
//!   goes to that address at the original port, never to the address the sandbox chose.
//!   Anything else is refused (HTTP gets a 403 that says why, TLS a reset).
//! - **DNS**: queries for allowed names are forwarded to the nameservers; others get
//!   REFUSED, so names outside the list cannot carry data out.
//!
//! A slot holding secrets ([`crate::secrets`]) has its TCP 80 and 443 redirected here too,
//! whatever its policy: on 443 its ClientHello is read first, and a name one of its secrets
//! lists is intercepted there; everything else is handled as above (a policy that lists no
//! domains passes what its addresses allow, and nothing more).
//!
//! Every outbound connection goes through the server's [`Dialer`], so whatever the policy
//! says, the filter never connects into the always-denied set (the sandbox pool, the host's
//! addresses, loopback, link-local with the metadata address, multicast, broadcast): a
//! policy whose `allow_cidrs` cover the pool does not let a sandbox reach its neighbours
//! through the filter, as nftables does not let it reach them directly.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::NetError;
use crate::dial::{Dialer, Purpose};
use crate::rules::EgressRules;
use crate::secrets::{self, SecretsBinding};
use crate::sniff::{self, Sniff};

/// How long a sandbox has to send the bytes that name its destination.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);
/// Upstream DNS answer limit.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of a stream read before giving up on finding a name.
const SNIFF_LIMIT: usize = 16 * 1024;

/// The listeners and the policies of the slots that use them.
#[derive(Debug)]
pub(crate) struct DomainFilter {
    pub tcp_port: u16,
    pub dns_port: u16,
    /// Every connection the filter makes goes through it.
    dialer: Dialer,
    nameservers: Vec<Ipv4Addr>,
    /// Sandbox address → its rules (every attached slot; nftables sends only the slots of
    /// `domain_veths` and `secret_veths` here).
    policies: Mutex<HashMap<Ipv4Addr, Arc<EgressRules>>>,
    /// Sandbox address → its secrets (slots holding secrets only).
    secrets: Mutex<HashMap<Ipv4Addr, Arc<SecretsBinding>>>,
}

impl DomainFilter {
    /// Binds the listeners (any address, ephemeral ports: nftables sends only redirected
    /// sandbox traffic there, and connections from anything but a listed sandbox are
    /// dropped) and serves them until the process ends.
    pub async fn start(dialer: Dialer, nameservers: Vec<Ipv4Addr>) -> Result<Arc<Self>, NetError> {
        let io = |e: std::io::Error| NetError::Io {
            what: "binding the domain filter".into(),
            source: e,
        };
        let tcp = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .map_err(io)?;
        let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .map_err(io)?;
        let filter = Arc::new(DomainFilter {
            tcp_port: tcp.local_addr().map_err(io)?.port(),
            dns_port: udp.local_addr().map_err(io)?.port(),
            dialer,
            nameservers,
            policies: Mutex::default(),
            secrets: Mutex::default(),
        });
        tokio::spawn(filter.clone().accept_loop(tcp));
        tokio::spawn(filter.clone().dns_loop(Arc::new(udp)));
        Ok(filter)
    }

    /// Records (or with `None` forgets) the rules of the sandbox at `addr`.
    pub fn set(&self, addr: Ipv4Addr, rules: Option<&EgressRules>) {
        let mut p = self.policies.lock().expect("not poisoned");
        match rules {
            Some(r) => {
                p.insert(addr, Arc::new(r.clone()));
            }
            None => {
                p.remove(&addr);
                self.secrets.lock().expect("not poisoned").remove(&addr);
            }
        }
    }

    /// Records (or with `None` forgets) the secrets of the sandbox at `addr`.
    pub fn set_secrets(&self, addr: Ipv4Addr, binding: Option<Arc<SecretsBinding>>) {
        let mut s = self.secrets.lock().expect("not poisoned");
        match binding {
            Some(b) => {
                s.insert(addr, b);
            }
            None => {
                s.remove(&addr);
            }
        }
    }

    fn secrets_of(&self, peer: SocketAddr) -> Option<Arc<SecretsBinding>> {
        let SocketAddr::V4(peer) = peer else {
            return None;
        };
        self.secrets
            .lock()
            .expect("not poisoned")
            .get(peer.ip())
            .cloned()
    }

    fn rules_of(&self, peer: SocketAddr) -> Option<Arc<EgressRules>> {
        let SocketAddr::V4(peer) = peer else {
            return None;
        };
        self.policies
            .lock()
            .expect("not poisoned")
            .get(peer.ip())
            .cloned()
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "domain filter: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(rules) = self.rules_of(peer) else {
                reset(stream);
                continue;
            };
            let binding = self.secrets_of(peer);
            let this = self.clone();
            tokio::spawn(async move {
                let served = match binding {
                    Some(b) => this.serve_with_secrets(stream, &rules, &b).await,
                    None => this.serve(stream, &rules).await,
                };
                if let Err(why) = served {
                    tracing::info!(%peer, %why, "domain filter: connection refused");
                }
            });
        }
    }

    /// A redirected connection of a sandbox holding secrets: on 443, a name one of its
    /// secrets lists is intercepted ([`secrets::intercept`]); everything else is served as
    /// any connection ([`DomainFilter::serve`]).
    async fn serve_with_secrets(
        &self,
        mut inbound: TcpStream,
        rules: &EgressRules,
        binding: &Arc<SecretsBinding>,
    ) -> Result<(), String> {
        let original = original_dst(&inbound)?;
        if original.port() != 443 {
            return self.serve_from(inbound, rules, original, None).await;
        }
        let mut head = Vec::with_capacity(2048);
        let name = match read_name_into(&mut inbound, 443, &mut head).await {
            Ok(name) => name,
            // Not TLS with a name: never intercepted; what the policy allows on the address
            // passes with the bytes read so far (nothing else can: there is no name).
            Err(_) => return self.serve_from(inbound, rules, original, Some(head)).await,
        };
        // The secrets' values are fetched again for each request; here only whether any
        // secret lists the name.
        if secrets::secrets_for(binding, &name).await.is_empty() {
            return self.serve_from(inbound, rules, original, Some(head)).await;
        }
        // The policy decides as for any connection to that name: by allow_domains, else by
        // the addresses the name resolves to.
        let purpose = if rules.uses_domains() && sniff::name_allowed(&rules.allow_domains, &name) {
            Purpose::SandboxName(rules)
        } else {
            Purpose::SandboxAddr(rules)
        };
        let outbound = match self.dialer.dial(&name, 443, purpose).await {
            Ok(s) => s,
            Err(e) => {
                reset(inbound);
                return Err(format!("{name}: {}", error_text(&e)));
            }
        };
        secrets::intercept(inbound, head, outbound, &name, binding.clone()).await
    }

    /// One redirected connection: pass it on its address, or name it, check the name and
    /// connect to where the name resolves.
    async fn serve(&self, inbound: TcpStream, rules: &EgressRules) -> Result<(), String> {
        let original = original_dst(&inbound)?;
        self.serve_from(inbound, rules, original, None).await
    }

    /// [`DomainFilter::serve`] to `original`, with `sniffed` the bytes read already (they
    /// go out first; a name in them is the stream's name).
    async fn serve_from(
        &self,
        mut inbound: TcpStream,
        rules: &EgressRules,
        original: std::net::SocketAddrV4,
        sniffed: Option<Vec<u8>>,
    ) -> Result<(), String> {
        let port = original.port();
        let dialled = IpAddr::V4(*original.ip()).to_string();
        let by_address = Purpose::SandboxAddr(rules);
        let passes = self
            .dialer
            .check(by_address, &dialled, port, IpAddr::V4(*original.ip()))
            .is_ok();
        let (mut outbound, head) = if passes {
            let s = self
                .dialer
                .dial(&dialled, port, by_address)
                .await
                .map_err(|e| error_text(&e))?;
            (s, sniffed.unwrap_or_default())
        } else if !rules.uses_domains() {
            // Redirected for its secrets only: what the addresses do not allow, nothing does.
            reset(inbound);
            return Err(format!("{original} is not allowed by the policy"));
        } else {
            let read = match sniffed {
                Some(head) => match sniff::tls_sni(&head) {
                    Sniff::Name(name) => Ok((name, head)),
                    _ => Err("no server name in the first bytes".to_string()),
                },
                None => read_name(&mut inbound, port).await,
            };
            let (name, head) = match read {
                Ok(x) => x,
                Err(why) => {
                    reset(inbound);
                    return Err(why);
                }
            };
            let connected = if sniff::name_allowed(&rules.allow_domains, &name) {
                self.dialer
                    .dial(&name, port, Purpose::SandboxName(rules))
                    .await
                    .map_err(|e| match e {
                        NetError::Refused(r) => format!("{r}, which the policy blocks"),
                        NetError::Resolve { .. } => format!("{name} does not resolve"),
                        other => error_text(&other),
                    })
            } else {
                Err(format!("{name} is not in allow_domains"))
            };
            match connected {
                Ok(s) => (s, head),
                Err(why) => {
                    refuse(inbound, port, &why).await;
                    return Err(why);
                }
            }
        };
        let target = outbound
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        outbound
            .write_all(&head)
            .await
            .map_err(|e| format!("writing to {target}: {e}"))?;
        tracing::debug!(%target, "domain filter: connected");
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        Ok(())
    }

    async fn dns_loop(self: Arc<Self>, sock: Arc<UdpSocket>) {
        let mut buf = [0u8; 1500];
        loop {
            let (n, peer) = match sock.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "domain filter: DNS receive failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(rules) = self.rules_of(peer) else {
                continue;
            };
            let query = buf[..n].to_vec();
            let Some((_, name, _, _)) = sniff::dns_question(&query) else {
                continue;
            };
            let this = self.clone();
            let sock = sock.clone();
            tokio::spawn(async move {
                let reply = if sniff::name_allowed(&rules.allow_domains, &name) {
                    this.forward(&query).await
                } else {
                    tracing::info!(%peer, %name, "domain filter: DNS query refused");
                    sniff::dns_refused(&query)
                };
                if let Some(reply) = reply {
                    let _ = sock.send_to(&reply, peer).await;
                }
            });
        }
    }

    /// The first nameserver's answer to a sandbox's query, unchanged.
    async fn forward(&self, query: &[u8]) -> Option<Vec<u8>> {
        for ns in &self.nameservers {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await.ok()?;
            sock.connect((*ns, 53)).await.ok()?;
            sock.send(query).await.ok()?;
            let mut buf = vec![0u8; 4096];
            if let Ok(Ok(n)) = tokio::time::timeout(UPSTREAM_TIMEOUT, sock.recv(&mut buf)).await {
                buf.truncate(n);
                return Some(buf);
            }
        }
        None
    }
}

impl EgressRules {
    /// Whether the policy filters web traffic and DNS by name.
    pub fn uses_domains(&self) -> bool {
        !self.allow_all && !self.allow_domains.is_empty()
    }
}

/// Where the sandbox meant to connect (before nftables redirected it).
fn original_dst(s: &TcpStream) -> Result<std::net::SocketAddrV4, String> {
    socket2::SockRef::from(s)
        .original_dst_v4()
        .ok()
        .and_then(|a| a.as_socket_ipv4())
        .ok_or_else(|| "no original destination".to_string())
}

/// Reads until the stream names its destination (TLS on 443, HTTP otherwise).
async fn read_name(s: &mut TcpStream, port: u16) -> Result<(String, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(2048);
    let name = read_name_into(s, port, &mut buf).await?;
    Ok((name, buf))
}

/// [`read_name`], keeping what it read in `buf` whatever the outcome.
async fn read_name_into(s: &mut TcpStream, port: u16, buf: &mut Vec<u8>) -> Result<String, String> {
    tokio::time::timeout(SNIFF_TIMEOUT, async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before naming its destination".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
            let sniffed = if port == 443 {
                sniff::tls_sni(buf)
            } else {
                sniff::http_host(buf)
            };
            match sniffed {
                Sniff::Name(name) => return Ok(name),
                Sniff::NoName => return Err("no server name in the first bytes".to_string()),
                Sniff::NeedMore if buf.len() > SNIFF_LIMIT => {
                    return Err("no server name in the first 16 KiB".to_string());
                }
                Sniff::NeedMore => {}
            }
        }
    })
    .await
    .map_err(|_| "sent no server name in time".to_string())?
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

/// Refuses a connection: an HTTP 403 that says why on plain HTTP, a reset otherwise.
async fn refuse(mut s: TcpStream, port: u16, why: &str) {
    if port != 443 {
        let body = format!("blocked by the sandbox's egress policy: {why}\n");
        let _ = s
            .write_all(
                format!(
                    "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        let _ = s.shutdown().await;
        return;
    }
    reset(s);
}

/// Closes with a reset (linger 0).
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}
