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
    /// Sandbox address → its rules (only slots whose rules list domains).
    policies: Mutex<HashMap<Ipv4Addr, Arc<EgressRules>>>,
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

    /// One redirected connection: pass it on its address, or name it, check the name and
    /// connect to where the name resolves.
    async fn serve(&self, mut inbound: TcpStream, rules: &EgressRules) -> Result<(), String> {
        let original = socket2::SockRef::from(&inbound)
            .original_dst_v4()
            .ok()
            .and_then(|a| a.as_socket_ipv4())
            .ok_or("no original destination")?;
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
            (s, Vec::new())
        } else {
            let (name, head) = match read_name(&mut inbound, port).await {
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
