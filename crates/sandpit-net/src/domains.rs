//! Domain allow-lists (`allow_domains`), enforced on the connection rather than by trusting
//! DNS.
//!
//! For a slot whose policy lists domains, nftables redirects the sandbox's TCP connections to
//! ports 80 and 443 and its DNS queries (UDP 53) to this module's listeners on the host:
//!
//! - **TCP**: the first bytes name the destination (TLS SNI, or the HTTP `Host`). A name the
//!   policy allows is resolved *here*, through the server's nameservers, and the connection
//!   goes to that address at the original port, never to the address the sandbox chose. A
//!   connection to an address in `allow_cidrs` passes without a name. Anything else is
//!   refused (HTTP gets a 403 that says why, TLS a reset).
//! - **DNS**: queries for allowed names are forwarded to the nameservers; others get
//!   REFUSED, so names outside the list cannot carry data out.
//!
//! Resolved addresses get the same protection as packets: link-local (metadata), loopback,
//! the sandbox pool, the host's own addresses and `deny_cidrs` are refused.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::rules::{EgressRules, LINK_LOCAL};
use crate::sniff::{self, Sniff};
use crate::{Ipv4Net, NetError};

/// How long a sandbox has to send the bytes that name its destination.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);
/// Upstream DNS answer and outbound connect limits.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of a stream read before giving up on finding a name.
const SNIFF_LIMIT: usize = 16 * 1024;

/// The listeners and the policies of the slots that use them.
#[derive(Debug)]
pub(crate) struct DomainFilter {
    pub tcp_port: u16,
    pub dns_port: u16,
    pool: Ipv4Net,
    nameservers: Vec<Ipv4Addr>,
    /// Sandbox address → its rules (only slots whose rules list domains).
    policies: Mutex<HashMap<Ipv4Addr, Arc<EgressRules>>>,
}

impl DomainFilter {
    /// Binds the listeners (any address, ephemeral ports: nftables sends only redirected
    /// sandbox traffic there, and connections from anything but a listed sandbox are
    /// dropped) and serves them until the process ends.
    pub async fn start(pool: Ipv4Net, nameservers: Vec<Ipv4Addr>) -> Result<Arc<Self>, NetError> {
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
            pool,
            nameservers,
            policies: Mutex::default(),
        });
        tokio::spawn(filter.clone().accept_loop(tcp));
        tokio::spawn(filter.clone().dns_loop(Arc::new(udp)));
        Ok(filter)
    }

    /// Records (or with `None` forgets) the rules of the sandbox at `addr`.
    pub fn set(&self, addr: Ipv4Addr, rules: Option<&EgressRules>) {
        let mut p = self.policies.lock().expect("not poisoned");
        match rules {
            Some(r) if r.uses_domains() => {
                p.insert(addr, Arc::new(r.clone()));
            }
            _ => {
                p.remove(&addr);
            }
        }
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
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(why) = this.serve(stream, &rules).await {
                    tracing::info!(%peer, %why, "domain filter: connection refused");
                }
            });
        }
    }

    /// One redirected connection: name it, check it, connect it.
    async fn serve(&self, mut inbound: TcpStream, rules: &EgressRules) -> Result<(), String> {
        let original = socket2::SockRef::from(&inbound)
            .original_dst_v4()
            .ok()
            .and_then(|a| a.as_socket_ipv4())
            .ok_or("no original destination")?;
        let port = original.port();
        let (target, head) = if rules.allows_addr(*original.ip(), port) {
            (original, Vec::new())
        } else {
            let (name, head) = match read_name(&mut inbound, port).await {
                Ok(x) => x,
                Err(why) => {
                    reset(inbound);
                    return Err(why);
                }
            };
            let refused = if !sniff::name_allowed(&rules.allow_domains, &name) {
                Err(format!("{name} is not in allow_domains"))
            } else {
                match self.resolve(&name).await {
                    Some(a) if self.reachable(a, rules) => Ok(a),
                    Some(a) => Err(format!("{name} resolves to {a}, which the policy blocks")),
                    None => Err(format!("{name} does not resolve")),
                }
            };
            match refused {
                Ok(addr) => (SocketAddrV4::new(addr, port), head),
                Err(why) => {
                    refuse(inbound, port, &why).await;
                    return Err(why);
                }
            }
        };
        let mut outbound = connect(target).await?;
        outbound
            .write_all(&head)
            .await
            .map_err(|e| format!("writing to {target}: {e}"))?;
        tracing::debug!(%target, "domain filter: connected");
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        Ok(())
    }

    /// Not always blocked, not denied by the policy.
    fn reachable(&self, addr: Ipv4Addr, rules: &EgressRules) -> bool {
        let net = |n: &Ipv4Net| n.contains(addr);
        !(addr.is_loopback()
            || addr.is_unspecified()
            || addr.is_broadcast()
            || addr.is_multicast()
            || net(&LINK_LOCAL)
            || net(&self.pool)
            || rules.deny_cidrs.iter().any(net)
            || is_local_address(addr))
    }

    /// The first A record of `name`, asked of each nameserver in turn.
    async fn resolve(&self, name: &str) -> Option<Ipv4Addr> {
        for ns in &self.nameservers {
            let Ok(sock) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await else {
                continue;
            };
            let id: u16 = rand_id();
            let query = sniff::dns_a_query(id, name);
            if sock.send_to(&query, (*ns, 53)).await.is_err() {
                continue;
            }
            let mut buf = [0u8; 1500];
            let answer = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
                loop {
                    let (n, from) = sock.recv_from(&mut buf).await.ok()?;
                    if from == SocketAddr::from((*ns, 53)) {
                        return Some(sniff::dns_a_answers(&buf[..n], id));
                    }
                }
            })
            .await;
            if let Ok(Some(addrs)) = answer
                && let Some(a) = addrs.first()
            {
                return Some(*a);
            }
        }
        None
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

    /// Whether a packet to `addr:port` (TCP) passes on its address alone.
    fn allows_addr(&self, addr: Ipv4Addr, port: u16) -> bool {
        let denied = self.deny_cidrs.iter().any(|n| n.contains(addr));
        let allowed = self.allow_cidrs.iter().any(|n| n.contains(addr))
            && (self.allow_ports.is_empty() || self.allow_ports.contains(&port));
        !denied && (self.allow_all || allowed)
    }
}

/// Reads until the stream names its destination (TLS on 443, HTTP otherwise).
async fn read_name(s: &mut TcpStream, port: u16) -> Result<(String, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(2048);
    let found = tokio::time::timeout(SNIFF_TIMEOUT, async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before naming its destination".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
            let sniffed = if port == 443 {
                sniff::tls_sni(&buf)
            } else {
                sniff::http_host(&buf)
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
    .map_err(|_| "sent no server name in time".to_string())??;
    Ok((found, buf))
}

async fn connect(target: SocketAddrV4) -> Result<TcpStream, String> {
    match tokio::time::timeout(UPSTREAM_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("connecting to {target}: {e}")),
        Err(_) => Err(format!("connecting to {target}: timed out")),
    }
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

/// Whether `addr` is one of this host's own addresses (binding to it works).
fn is_local_address(addr: Ipv4Addr) -> bool {
    std::net::UdpSocket::bind((addr, 0)).is_ok()
}

fn rand_id() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish() as u16
}
