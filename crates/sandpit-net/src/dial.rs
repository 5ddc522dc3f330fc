//! The one way the host opens a TCP connection on a tenant's behalf: the domain filter (a
//! sandbox's web traffic), image pulls, and whatever comes next (webhooks, a secrets proxy).
//!
//! [`Dialer::dial`] resolves the host, judges every address with [`Boundary::verdict`] (pure),
//! and connects only to an address that passed: the address judged is the address connected
//! to, so a DNS answer cannot change between the check and the connect, and a name with one
//! bad address among good ones never reaches the bad one.
//!
//! **Always denied**, whatever a policy or an operator says: the sandbox pool (other
//! sandboxes, and the host's side of their veths), the host's own addresses, loopback,
//! link-local (169.254.0.0/16 with the metadata service 169.254.169.254, fe80::/10),
//! multicast, reserved and broadcast (240.0.0.0/4), unspecified (0.0.0.0/8, ::). IPv6
//! addresses that carry an IPv4 one (`::ffff:a.b.c.d`, `::a.b.c.d`, `::ffff:0:a.b.c.d`,
//! `64:ff9b::a.b.c.d`, 6to4 `2002:aabb:ccdd::`) are judged as that IPv4 address.
//!
//! Beyond that set, the [`Purpose`] decides:
//! - a sandbox's connection to an address (`SandboxAddr`): what its egress policy allows on
//!   the address alone (`deny_cidrs` first, then `allow_cidrs` and `allow_ports`), exactly as
//!   nftables does;
//! - a sandbox's connection to a name its `allow_domains` lists (`SandboxName`): anywhere but
//!   `deny_cidrs`;
//! - an image pull (`Pull`): public addresses only. Private ranges (10/8, 172.16/12,
//!   192.168/16, 100.64/10, fc00::/7, fec0::/10), loopback and the host's addresses are
//!   refused too, unless the `host[:port]` asked for is one of the operator's exceptions
//!   (`--allowed-registries`). An exception never opens the pool, link-local, multicast,
//!   reserved or unspecified addresses.
//! - a webhook delivery (`Webhook`): the same as a pull, with its own exceptions
//!   (`--webhook-allow-hosts`, on the dialer the deliveries use).
//!
//! Names a sandbox asked for are resolved through the sandboxes' nameservers (what the
//! sandbox's own DNS would answer); names the host fetches (registries) through the host's
//! resolver. The host's addresses are read from `/proc/net/fib_trie` (every `LOCAL` and
//! `BROADCAST` entry, whole local routes included) and `/proc/net/if_inet6`, and read again
//! when older than [`HOST_ADDRS_MAX_AGE`] or on [`Dialer::refresh_host_addrs`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpStream, UdpSocket};

use crate::rules::EgressRules;
use crate::{Ipv4Net, NetError, sniff};

/// How long one connect may take, per address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a DNS answer may take, per nameserver.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// The host's addresses are read again when older than this.
pub const HOST_ADDRS_MAX_AGE: Duration = Duration::from_secs(5);

/// What a connection is for; decides what it may reach beyond the always-denied set.
#[derive(Debug, Clone, Copy)]
pub enum Purpose<'a> {
    /// A sandbox's connection to the address it dialled: what the policy allows on the address
    /// and port alone.
    SandboxAddr(&'a EgressRules),
    /// A sandbox's connection to a name its `allow_domains` lists: anywhere but `deny_cidrs`.
    SandboxName(&'a EgressRules),
    /// An image pull: public addresses, or anything but the fixed ranges for an exception.
    Pull,
    /// A webhook delivery: as a pull (the exceptions are the webhook dialer's).
    Webhook,
}

/// Why an address is refused: the range it lies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// The sandboxes' address pool.
    Pool(Ipv4Net),
    /// One of the host's own addresses.
    Host,
    Unspecified(&'static str),
    Loopback(&'static str),
    LinkLocal(&'static str),
    Multicast(&'static str),
    Reserved(&'static str),
    /// A private range (refused for pulls only).
    Private(&'static str),
    /// An entry of the policy's `deny_cidrs`.
    DenyCidr(Ipv4Net),
    /// Not in the policy's `allow_cidrs` (or not on one of its `allow_ports`).
    NotAllowed,
}

impl Range {
    /// Whether an operator exception (`--allowed-registries`) lifts it for pulls.
    pub fn liftable(&self) -> bool {
        matches!(self, Range::Host | Range::Loopback(_) | Range::Private(_))
    }

    /// Whether it belongs to the always-denied set (rather than to a policy or a purpose).
    pub fn always_denied(&self) -> bool {
        !matches!(
            self,
            Range::Private(_) | Range::DenyCidr(_) | Range::NotAllowed
        )
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Range::Pool(n) => write!(f, "the sandbox pool ({n})"),
            Range::Host => write!(f, "an address of the host"),
            Range::Unspecified(c) => write!(f, "unspecified ({c})"),
            Range::Loopback(c) => write!(f, "loopback ({c})"),
            Range::LinkLocal(c) => write!(f, "link-local ({c}, where the metadata service is)"),
            Range::Multicast(c) => write!(f, "multicast ({c})"),
            Range::Reserved(c) => write!(f, "reserved or broadcast ({c})"),
            Range::Private(c) => write!(f, "a private network ({c})"),
            Range::DenyCidr(n) => write!(f, "the policy's deny_cidrs ({n})"),
            Range::NotAllowed => write!(f, "not allowed by the policy's allow_cidrs/allow_ports"),
        }
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix_len: u8) -> Ipv4Net {
    Ipv4Net {
        addr: Ipv4Addr::new(a, b, c, d),
        prefix_len,
    }
}

/// The fixed IPv4 part of the always-denied set (the pool and the host's addresses are added
/// at run time). nftables rejects the same ranges (see [`crate::rules`]).
pub const ALWAYS_DENIED_V4: [(Ipv4Net, Range); 5] = [
    (v4(0, 0, 0, 0, 8), Range::Unspecified("0.0.0.0/8")),
    (v4(127, 0, 0, 0, 8), Range::Loopback("127.0.0.0/8")),
    (v4(169, 254, 0, 0, 16), Range::LinkLocal("169.254.0.0/16")),
    (v4(224, 0, 0, 0, 4), Range::Multicast("224.0.0.0/4")),
    (v4(240, 0, 0, 0, 4), Range::Reserved("240.0.0.0/4")),
];

/// IPv4 ranges pulls refuse unless the registry is an exception.
pub const PRIVATE_V4: [(Ipv4Net, Range); 4] = [
    (v4(10, 0, 0, 0, 8), Range::Private("10.0.0.0/8")),
    (v4(172, 16, 0, 0, 12), Range::Private("172.16.0.0/12")),
    (v4(192, 168, 0, 0, 16), Range::Private("192.168.0.0/16")),
    (v4(100, 64, 0, 0, 10), Range::Private("100.64.0.0/10")),
];

/// The fixed IPv6 part of the always-denied set (network as a number, prefix length).
const ALWAYS_DENIED_V6: [(u128, u8, Range); 4] = [
    (0, 128, Range::Unspecified("::")),
    (1, 128, Range::Loopback("::1")),
    (0xfe80 << 112, 10, Range::LinkLocal("fe80::/10")),
    (0xff00 << 112, 8, Range::Multicast("ff00::/8")),
];

const PRIVATE_V6: [(u128, u8, Range); 2] = [
    (0xfc00 << 112, 7, Range::Private("fc00::/7")),
    (0xfec0 << 112, 10, Range::Private("fec0::/10")),
];

fn in_v6(addr: u128, net: u128, len: u8) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    };
    addr & mask == net & mask
}

/// The IPv4 address an IPv6 address stands for, if it embeds one: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`, not `::` or `::1`), IPv4-translated
/// (`::ffff:0:a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`) and 6to4 (`2002:aabb:ccdd::/48`).
pub fn embedded_v4(addr: Ipv6Addr) -> Option<Ipv4Addr> {
    let n = u128::from(addr);
    let low = Ipv4Addr::from(n as u32);
    if in_v6(n, 0xffff << 32, 96)
        || in_v6(n, 0xffff << 48, 96)
        || in_v6(n, 0x0064_ff9b << 96, 96)
        || (in_v6(n, 0, 96) && n > 1)
    {
        return Some(low);
    }
    if in_v6(n, 0x2002 << 112, 16) {
        return Some(Ipv4Addr::from((n >> 80) as u32));
    }
    None
}

/// What the address reaches, for judging: the embedded IPv4 address of an IPv6 one.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) => embedded_v4(a).map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// A `host[:port]` an operator listed: pulls from it may reach loopback, private and host
/// addresses. The host is lowercase, without brackets or a trailing dot; without a port, every
/// port of the host matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: Option<u16>,
}

impl Endpoint {
    /// Whether `host:port` (as asked for, before resolution) is this endpoint.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        self.port.is_none_or(|p| p == port) && normalize_host(host) == self.host
    }
}

impl FromStr for Endpoint {
    type Err = String;

    /// `host`, `host:port`, `a.b.c.d[:port]`, `[v6][:port]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{s:?} is not host[:port]: {why}");
        let s = s.trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            match after {
                "" => (h, None),
                p => (
                    h,
                    Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
                ),
            }
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                Some(_) => return Err(bad("put an IPv6 address in brackets")),
                None => (s, None),
            }
        };
        let port = match port {
            None => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad("the port is not 1-65535"))?,
            ),
        };
        let host = normalize_host(host);
        if host.parse::<IpAddr>().is_err() && sniff::normalize_name(&host).is_none() {
            return Err(bad("not a host name or an IP address"));
        }
        Ok(Endpoint { host, port })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.host.contains(':'), self.port) {
            (true, Some(p)) => write!(f, "[{}]:{p}", self.host),
            (false, Some(p)) => write!(f, "{}:{p}", self.host),
            (_, None) => write!(f, "{}", self.host),
        }
    }
}

/// Lowercase, brackets and a trailing dot removed; IP addresses in their canonical text.
fn normalize_host(host: &str) -> String {
    let h = host.trim();
    let h = h
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(h);
    let h = h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase();
    match h.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => h,
    }
}

/// A local route of the host: every address in it is the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostNet {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl HostNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => Ipv4Net {
                addr: n,
                prefix_len: self.prefix_len.min(32),
            }
            .contains(a),
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                in_v6(u128::from(a), u128::from(n), self.prefix_len.min(128))
            }
            _ => false,
        }
    }
}

/// What the dialer knows besides the request: the pool, the host's addresses, the operator's
/// exceptions. [`Boundary::verdict`] is the whole decision, with no I/O.
#[derive(Debug, Clone, Copy)]
pub struct Boundary<'a> {
    pub pool: Ipv4Net,
    pub host: &'a [HostNet],
    pub exceptions: &'a [Endpoint],
}

impl Boundary<'_> {
    /// May a connection for `purpose`, asked for as `host:port`, go to `addr`? `Err` names the
    /// range that refuses it.
    ///
    /// **Guarantee** (proptested): an address in the always-denied set (the fixed ranges, the
    /// pool, the host's addresses, in any IPv6 spelling) is refused for every purpose and
    /// policy; for pulls, exceptions lift only loopback, private and host addresses.
    pub fn verdict(
        &self,
        purpose: Purpose<'_>,
        host: &str,
        port: u16,
        addr: IpAddr,
    ) -> Result<(), Range> {
        let a = canonical(addr);
        if let Some(range) = fixed_range(a) {
            return self.lift(purpose, host, port, range);
        }
        if let IpAddr::V4(v4) = a
            && self.pool.contains(v4)
        {
            return Err(Range::Pool(self.pool));
        }
        if self.host.iter().any(|n| n.contains(a) || n.contains(addr)) {
            return self.lift(purpose, host, port, Range::Host);
        }
        match purpose {
            Purpose::Pull | Purpose::Webhook => match private_range(a) {
                Some(range) => self.lift(purpose, host, port, range),
                None => Ok(()),
            },
            Purpose::SandboxAddr(rules) | Purpose::SandboxName(rules) => {
                let IpAddr::V4(v4) = a else {
                    // Policies speak IPv4; sandboxes have no IPv6 egress.
                    return Err(Range::NotAllowed);
                };
                if let Some(n) = rules.deny_cidrs.iter().find(|n| n.contains(v4)) {
                    return Err(Range::DenyCidr(*n));
                }
                let by_address = rules.allow_all
                    || (rules.allow_cidrs.iter().any(|n| n.contains(v4))
                        && (rules.allow_ports.is_empty() || rules.allow_ports.contains(&port)));
                match purpose {
                    Purpose::SandboxAddr(_) if !by_address => Err(Range::NotAllowed),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Refuses `range` unless it is liftable, this is a pull or a webhook and `host:port` an
    /// exception.
    fn lift(&self, purpose: Purpose<'_>, host: &str, port: u16, range: Range) -> Result<(), Range> {
        let excepted = matches!(purpose, Purpose::Pull | Purpose::Webhook)
            && range.liftable()
            && self.exceptions.iter().any(|e| e.matches(host, port));
        if excepted { Ok(()) } else { Err(range) }
    }
}

/// The fixed always-denied range `addr` (canonical) lies in.
fn fixed_range(addr: IpAddr) -> Option<Range> {
    match addr {
        IpAddr::V4(a) => ALWAYS_DENIED_V4
            .iter()
            .find(|(n, _)| n.contains(a))
            .map(|(_, r)| *r),
        IpAddr::V6(a) => ALWAYS_DENIED_V6
            .iter()
            .find(|(n, len, _)| in_v6(u128::from(a), *n, *len))
            .map(|(_, _, r)| *r),
    }
}

fn private_range(addr: IpAddr) -> Option<Range> {
    match addr {
        IpAddr::V4(a) => PRIVATE_V4
            .iter()
            .find(|(n, _)| n.contains(a))
            .map(|(_, r)| *r),
        IpAddr::V6(a) => PRIVATE_V6
            .iter()
            .find(|(n, len, _)| in_v6(u128::from(a), *n, *len))
            .map(|(_, _, r)| *r),
    }
}

/// A connection the dialer would not make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `host:port` as asked for.
    pub target: String,
    /// Whether the host was an address (then the message names it; a name's addresses are not
    /// shown).
    pub literal: bool,
    pub range: Range,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.literal {
            write!(f, "{} is in {}", self.target, self.range)
        } else {
            write!(f, "{} resolves to {}", self.target, self.range)
        }
    }
}

impl std::error::Error for Refusal {}

/// The host's addresses as last read.
#[derive(Debug, Default)]
struct HostAddrs {
    nets: Vec<HostNet>,
    read_at: Option<Instant>,
}

#[derive(Debug)]
struct Shared {
    pool: Ipv4Net,
    nameservers: Vec<Ipv4Addr>,
    /// Guards only the cached list; never held across an await.
    host: Mutex<HostAddrs>,
}

/// Connects on a tenant's behalf, never into the always-denied set (see the module docs).
/// Cheap to clone; clones share the host-address cache.
#[derive(Debug, Clone)]
pub struct Dialer {
    shared: Arc<Shared>,
    exceptions: Arc<[Endpoint]>,
}

impl Dialer {
    /// A dialer for a server whose sandboxes live in `pool` and resolve through
    /// `nameservers`. Reads nothing yet: the host's addresses are read on first use.
    pub fn new(pool: Ipv4Net, nameservers: Vec<Ipv4Addr>) -> Self {
        Dialer {
            shared: Arc::new(Shared {
                pool,
                nameservers,
                host: Mutex::default(),
            }),
            exceptions: Arc::from(Vec::new()),
        }
    }

    /// The same dialer with these operator exceptions for pulls (`--allowed-registries`).
    pub fn with_exceptions(&self, exceptions: Vec<Endpoint>) -> Self {
        Dialer {
            shared: self.shared.clone(),
            exceptions: Arc::from(exceptions),
        }
    }

    pub fn exceptions(&self) -> &[Endpoint] {
        &self.exceptions
    }

    /// Reads the host's addresses now.
    pub fn refresh_host_addrs(&self) -> Result<(), NetError> {
        let pool = self.shared.pool;
        // The host side of every slot's veth is a host address inside the pool, which is
        // denied as a whole first: no need to keep thousands of them.
        let nets: Vec<HostNet> = read_host_addrs()?
            .into_iter()
            .filter(|n| match n.addr {
                IpAddr::V4(a) => !pool.contains_net(&Ipv4Net {
                    addr: a,
                    prefix_len: n.prefix_len.min(32),
                }),
                IpAddr::V6(_) => true,
            })
            .collect();
        let mut h = self.shared.host.lock().expect("not poisoned");
        h.nets = nets;
        h.read_at = Some(Instant::now());
        Ok(())
    }

    /// [`Boundary::verdict`] with the current host addresses (read again if stale).
    pub fn check(
        &self,
        purpose: Purpose<'_>,
        host: &str,
        port: u16,
        addr: IpAddr,
    ) -> Result<(), Refusal> {
        self.judge(purpose, host, port, &[addr])
            .map(drop)
            .map_err(|e| match e {
                NetError::Refused(r) => r,
                // Host addresses unknown: fail closed, as if it were one of them.
                _ => Refusal {
                    target: target_text(host, port),
                    literal: true,
                    range: Range::Host,
                },
            })
    }

    /// Resolves `host` (an address, or a name: see the module docs for which resolver) and
    /// connects to the first of its addresses `purpose` allows.
    pub async fn dial(
        &self,
        host: &str,
        port: u16,
        purpose: Purpose<'_>,
    ) -> Result<TcpStream, NetError> {
        let target = target_text(host, port);
        let addrs = self.resolve(host, port, purpose).await?;
        let allowed = self.judge(purpose, host, port, &addrs)?;
        let mut last = None;
        for addr in allowed {
            let to = SocketAddr::new(addr, port);
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to)).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(std::io::ErrorKind::TimedOut.into()),
            }
        }
        Err(NetError::Connect {
            target,
            source: last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()),
        })
    }

    /// The addresses of `addrs` that `purpose` may reach, in order; the first refusal if none.
    fn judge(
        &self,
        purpose: Purpose<'_>,
        host: &str,
        port: u16,
        addrs: &[IpAddr],
    ) -> Result<Vec<IpAddr>, NetError> {
        self.ensure_fresh()?;
        let h = self.shared.host.lock().expect("not poisoned");
        let boundary = Boundary {
            pool: self.shared.pool,
            host: &h.nets,
            exceptions: &self.exceptions,
        };
        let mut allowed = Vec::new();
        let mut first_refusal = None;
        for &addr in addrs {
            match boundary.verdict(purpose, host, port, addr) {
                Ok(()) => allowed.push(addr),
                Err(range) => {
                    first_refusal.get_or_insert(range);
                }
            }
        }
        match (allowed.is_empty(), first_refusal) {
            (false, _) => Ok(allowed),
            (true, Some(range)) => Err(NetError::Refused(Refusal {
                target: target_text(host, port),
                literal: normalize_host(host).parse::<IpAddr>().is_ok(),
                range,
            })),
            (true, None) => Err(NetError::Resolve {
                host: host.to_string(),
                reason: "no addresses".into(),
            }),
        }
    }

    fn ensure_fresh(&self) -> Result<(), NetError> {
        let stale = {
            let h = self.shared.host.lock().expect("not poisoned");
            h.read_at.is_none_or(|t| t.elapsed() > HOST_ADDRS_MAX_AGE)
        };
        if stale {
            self.refresh_host_addrs()?;
        }
        Ok(())
    }

    async fn resolve(
        &self,
        host: &str,
        port: u16,
        purpose: Purpose<'_>,
    ) -> Result<Vec<IpAddr>, NetError> {
        let name = normalize_host(host);
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let failed = |reason: String| NetError::Resolve {
            host: host.to_string(),
            reason,
        };
        match purpose {
            Purpose::SandboxAddr(_) | Purpose::SandboxName(_) => {
                let found = resolve_a(&self.shared.nameservers, &name).await;
                if found.is_empty() {
                    return Err(failed("no A record from the sandboxes' nameservers".into()));
                }
                Ok(found.into_iter().map(IpAddr::V4).collect())
            }
            Purpose::Pull | Purpose::Webhook => {
                let found = tokio::time::timeout(
                    RESOLVE_TIMEOUT,
                    tokio::net::lookup_host((name.as_str(), port)),
                )
                .await
                .map_err(|_| failed("timed out".into()))?
                .map_err(|e| failed(e.to_string()))?;
                Ok(found.map(|a| a.ip()).collect())
            }
        }
    }
}

fn target_text(host: &str, port: u16) -> String {
    let h = normalize_host(host);
    if h.contains(':') {
        format!("[{h}]:{port}")
    } else {
        format!("{h}:{port}")
    }
}

/// The A records of `name`, from the first nameserver that answers.
pub(crate) async fn resolve_a(nameservers: &[Ipv4Addr], name: &str) -> Vec<Ipv4Addr> {
    for ns in nameservers {
        let Ok(sock) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await else {
            continue;
        };
        let id: u16 = rand_id();
        let query = sniff::dns_a_query(id, name);
        if sock.send_to(&query, (*ns, 53)).await.is_err() {
            continue;
        }
        let mut buf = [0u8; 1500];
        let answer = tokio::time::timeout(RESOLVE_TIMEOUT, async {
            loop {
                let (n, from) = sock.recv_from(&mut buf).await.ok()?;
                if from == SocketAddr::from((*ns, 53)) {
                    return Some(sniff::dns_a_answers(&buf[..n], id));
                }
            }
        })
        .await;
        if let Ok(Some(addrs)) = answer
            && !addrs.is_empty()
        {
            return addrs;
        }
    }
    Vec::new()
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

/// The host's local routes (IPv4, from the kernel's FIB) and addresses (IPv6).
fn read_host_addrs() -> Result<Vec<HostNet>, NetError> {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|source| NetError::Read {
            path: path.into(),
            source,
        })
    };
    let mut nets = parse_fib_trie(&read("/proc/net/fib_trie")?);
    // No IPv6 on the host is not an error.
    if let Ok(text) = std::fs::read_to_string("/proc/net/if_inet6") {
        nets.extend(parse_if_inet6(&text));
    }
    nets.sort();
    nets.dedup();
    Ok(nets)
}

/// Every `LOCAL` and `BROADCAST` entry of `/proc/net/fib_trie`: a `|-- <address>` line
/// followed by lines `/<len> <scope> <type>`.
pub fn parse_fib_trie(text: &str) -> Vec<HostNet> {
    let mut out = Vec::new();
    let mut current: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(a) = t.strip_prefix("|-- ") {
            current = a.trim().parse().ok();
        } else if let Some(rest) = t.strip_prefix('/') {
            let mut parts = rest.split_whitespace();
            let len = parts.next().and_then(|l| l.parse::<u8>().ok());
            let kind = parts.nth(1);
            if let (Some(addr), Some(len), Some("LOCAL" | "BROADCAST")) = (current, len, kind)
                && len <= 32
            {
                out.push(HostNet {
                    addr: IpAddr::V4(addr),
                    prefix_len: len,
                });
            }
        } else {
            current = None;
        }
    }
    out
}

/// The addresses of `/proc/net/if_inet6` (32 hex digits first on each line).
pub fn parse_if_inet6(text: &str) -> Vec<HostNet> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|h| h.len() == 32)
        .filter_map(|h| u128::from_str_radix(h, 16).ok())
        .map(|n| HostNet {
            addr: IpAddr::V6(Ipv6Addr::from(n)),
            prefix_len: 128,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: Ipv4Net = v4(10, 88, 0, 0, 16);

    fn host_nets() -> Vec<HostNet> {
        vec![
            HostNet {
                addr: "192.0.2.2".parse().unwrap(),
                prefix_len: 32,
            },
            HostNet {
                addr: "203.0.113.0".parse().unwrap(),
                prefix_len: 24,
            },
            HostNet {
                addr: "2001:db8::5".parse().unwrap(),
                prefix_len: 128,
            },
        ]
    }

    fn boundary<'a>(host: &'a [HostNet], exceptions: &'a [Endpoint]) -> Boundary<'a> {
        Boundary {
            pool: POOL,
            host,
            exceptions,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn wide() -> EgressRules {
        EgressRules {
            allow_cidrs: vec!["0.0.0.0/0".parse().unwrap()],
            allow_domains: vec!["example.com".into()],
            ..EgressRules::deny_all()
        }
    }

    #[test]
    fn wide_policies_never_reach_the_always_denied_set() {
        let host = host_nets();
        let b = boundary(&host, &[]);
        let rules = wide();
        for (addr, range) in [
            ("10.88.0.6", Range::Pool(POOL)),
            ("10.88.0.1", Range::Pool(POOL)),
            ("127.0.0.1", Range::Loopback("127.0.0.0/8")),
            ("169.254.169.254", Range::LinkLocal("169.254.0.0/16")),
            ("224.0.0.1", Range::Multicast("224.0.0.0/4")),
            ("255.255.255.255", Range::Reserved("240.0.0.0/4")),
            ("0.0.0.0", Range::Unspecified("0.0.0.0/8")),
            ("192.0.2.2", Range::Host),
            ("203.0.113.77", Range::Host),
            ("::1", Range::Loopback("::1")),
            ("::", Range::Unspecified("::")),
            ("fe80::1", Range::LinkLocal("fe80::/10")),
            ("ff02::1", Range::Multicast("ff00::/8")),
            ("2001:db8::5", Range::Host),
            ("::ffff:169.254.169.254", Range::LinkLocal("169.254.0.0/16")),
            ("::ffff:10.88.3.2", Range::Pool(POOL)),
            ("::127.0.0.1", Range::Loopback("127.0.0.0/8")),
            ("64:ff9b::a9fe:a9fe", Range::LinkLocal("169.254.0.0/16")),
            ("2002:7f00:1::", Range::Loopback("127.0.0.0/8")),
            ("::ffff:192.0.2.2", Range::Host),
        ] {
            for purpose in [
                Purpose::SandboxAddr(&rules),
                Purpose::SandboxName(&rules),
                Purpose::Pull,
            ] {
                assert_eq!(
                    b.verdict(purpose, addr, 80, ip(addr)),
                    Err(range),
                    "{addr} {purpose:?}"
                );
            }
        }
        assert_eq!(
            b.verdict(Purpose::SandboxAddr(&rules), "x", 80, ip("93.184.216.34")),
            Ok(())
        );
        assert_eq!(
            b.verdict(Purpose::SandboxAddr(&rules), "x", 80, ip("10.1.2.3")),
            Ok(()),
            "private addresses follow the policy for sandboxes"
        );
    }

    #[test]
    fn sandbox_purposes_follow_the_policy() {
        let b = boundary(&[], &[]);
        let rules = EgressRules {
            allow_cidrs: vec!["198.51.100.0/24".parse().unwrap()],
            deny_cidrs: vec!["198.51.100.7/32".parse().unwrap()],
            allow_ports: vec![80],
            allow_domains: vec!["example.com".into()],
            ..EgressRules::deny_all()
        };
        let addr = Purpose::SandboxAddr(&rules);
        let name = Purpose::SandboxName(&rules);
        assert_eq!(b.verdict(addr, "h", 80, ip("198.51.100.1")), Ok(()));
        assert_eq!(
            b.verdict(addr, "h", 443, ip("198.51.100.1")),
            Err(Range::NotAllowed)
        );
        assert_eq!(
            b.verdict(addr, "h", 80, ip("198.51.100.7")),
            Err(Range::DenyCidr("198.51.100.7/32".parse().unwrap()))
        );
        assert_eq!(
            b.verdict(addr, "h", 80, ip("93.184.216.34")),
            Err(Range::NotAllowed)
        );
        assert_eq!(b.verdict(name, "h", 443, ip("93.184.216.34")), Ok(()));
        assert_eq!(
            b.verdict(name, "h", 443, ip("198.51.100.7")),
            Err(Range::DenyCidr("198.51.100.7/32".parse().unwrap()))
        );
        assert_eq!(
            b.verdict(name, "h", 443, ip("2606:2800::1")),
            Err(Range::NotAllowed)
        );
    }

    #[test]
    fn webhooks_are_judged_as_pulls_with_their_own_exceptions() {
        let host = host_nets();
        let exceptions: Vec<Endpoint> = vec!["10.216.3.2:8080".parse().unwrap()];
        let b = boundary(&host, &exceptions);
        let w = Purpose::Webhook;
        assert_eq!(b.verdict(w, "hooks.example", 443, ip("54.1.2.3")), Ok(()));
        assert_eq!(b.verdict(w, "10.216.3.2", 8080, ip("10.216.3.2")), Ok(()));
        assert_eq!(
            b.verdict(w, "10.216.3.2", 8081, ip("10.216.3.2")),
            Err(Range::Private("10.0.0.0/8"))
        );
        assert_eq!(
            b.verdict(w, "127.0.0.1", 80, ip("127.0.0.1")),
            Err(Range::Loopback("127.0.0.0/8"))
        );
        assert_eq!(
            b.verdict(w, "10.216.3.2", 8080, ip("169.254.169.254")),
            Err(Range::LinkLocal("169.254.0.0/16"))
        );
        assert_eq!(
            b.verdict(w, "10.216.3.2", 8080, ip("10.88.0.6")),
            Err(Range::Pool(POOL))
        );
    }

    #[test]
    fn pulls_refuse_private_unless_excepted() {
        let host = host_nets();
        let exceptions: Vec<Endpoint> = ["127.0.0.1:5000", "registry.lan", "[::1]:5001"]
            .iter()
            .map(|e| e.parse().unwrap())
            .collect();
        let b = boundary(&host, &exceptions);
        let p = Purpose::Pull;
        assert_eq!(
            b.verdict(p, "registry-1.docker.io", 443, ip("54.1.2.3")),
            Ok(())
        );
        assert_eq!(
            b.verdict(p, "127.0.0.1", 5001, ip("127.0.0.1")),
            Err(Range::Loopback("127.0.0.0/8"))
        );
        assert_eq!(b.verdict(p, "127.0.0.1", 5000, ip("127.0.0.1")), Ok(()));
        assert_eq!(b.verdict(p, "[::1]", 5001, ip("::1")), Ok(()));
        assert_eq!(
            b.verdict(p, "evil.test", 443, ip("10.0.0.5")),
            Err(Range::Private("10.0.0.0/8"))
        );
        assert_eq!(
            b.verdict(p, "evil.test", 443, ip("fd00::2")),
            Err(Range::Private("fc00::/7"))
        );
        assert_eq!(b.verdict(p, "Registry.LAN.", 8443, ip("10.0.0.5")), Ok(()));
        assert_eq!(b.verdict(p, "registry.lan", 80, ip("192.0.2.2")), Ok(()));
        // Exceptions never open the fixed ranges or the pool.
        for a in ["169.254.169.254", "10.88.0.6", "224.0.0.1", "0.0.0.0"] {
            assert!(b.verdict(p, "registry.lan", 443, ip(a)).is_err(), "{a}");
        }
        // Exceptions are for pulls only.
        let rules = wide();
        assert_eq!(
            b.verdict(
                Purpose::SandboxAddr(&rules),
                "127.0.0.1",
                5000,
                ip("127.0.0.1")
            ),
            Err(Range::Loopback("127.0.0.0/8"))
        );
    }

    #[test]
    fn endpoints_parse() {
        let e = |s: &str| s.parse::<Endpoint>();
        assert_eq!(
            e("127.0.0.1:5000"),
            Ok(Endpoint {
                host: "127.0.0.1".into(),
                port: Some(5000)
            })
        );
        assert_eq!(
            e("Registry.Example.COM."),
            Ok(Endpoint {
                host: "registry.example.com".into(),
                port: None
            })
        );
        assert_eq!(
            e("[::1]:5000"),
            Ok(Endpoint {
                host: "::1".into(),
                port: Some(5000)
            })
        );
        assert_eq!(e("[::1]:5000").unwrap().to_string(), "[::1]:5000");
        for bad in [
            "", ":5000", "host:0", "host:x", "::1", "[::1", "a b:1", "h:70000",
        ] {
            assert!(e(bad).is_err(), "{bad:?}");
        }
        let local = e("localhost:5000").unwrap();
        assert!(local.matches("LOCALHOST", 5000));
        assert!(!local.matches("localhost", 5001));
        assert!(e("[::1]").unwrap().matches("[::1]", 1));
    }

    #[test]
    fn embedded_addresses() {
        let v = |s: &str| embedded_v4(s.parse().unwrap());
        assert_eq!(v("::ffff:1.2.3.4"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(v("::1.2.3.4"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(v("::ffff:0:1.2.3.4"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(v("64:ff9b::1.2.3.4"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(v("2002:102:304::1"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(v("::1"), None);
        assert_eq!(v("::"), None);
        assert_eq!(v("2001:db8::1"), None);
    }

    #[test]
    fn proc_files_parse() {
        let fib = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n\
                   \x20    +-- 127.0.0.0/8 2 0 2\n           |-- 127.0.0.0\n              /8 host LOCAL\n\
                   \x20          |-- 127.0.0.1\n              /32 host LOCAL\n\
                   \x20       |-- 127.255.255.255\n           /32 link BROADCAST\n\
                   \x20          |-- 192.0.2.0\n              /24 link UNICAST\n\
                   \x20          |-- 192.0.2.2\n              /32 host LOCAL\n\
                   \x20          |-- 10.99.0.0\n              /16 host LOCAL\n";
        let nets = parse_fib_trie(fib);
        let has = |a: &str| nets.iter().any(|n| n.contains(ip(a)));
        assert!(has("127.0.0.1") && has("127.255.255.255") && has("192.0.2.2"));
        assert!(has("10.99.200.1"), "a whole local route");
        assert!(!has("192.0.2.3") && !has("0.0.0.1"));
        let v6 = parse_if_inet6(
            "00000000000000000000000000000001 01 80 10 80       lo\n\
             fd000000000000000000000000000002 04 40 00 82     eth0\n",
        );
        assert_eq!(
            v6.iter().map(|n| n.addr).collect::<Vec<_>>(),
            vec![ip("::1"), ip("fd00::2")]
        );
    }

    #[test]
    fn this_hosts_addresses_are_read() {
        let nets = read_host_addrs().unwrap();
        assert!(nets.iter().any(|n| n.contains(ip("127.0.0.1"))));
        let d = Dialer::new(POOL, Vec::new());
        assert!(d.check(Purpose::Pull, "x", 80, ip("127.0.0.1")).is_err());
        let kept = d.shared.host.lock().unwrap().nets.clone();
        assert!(kept.iter().any(|n| n.contains(ip("127.0.0.1"))));
        assert!(
            !kept.iter().any(|n| match n.addr {
                IpAddr::V4(a) => POOL.contains(a),
                IpAddr::V6(_) => false,
            }),
            "addresses inside the pool are not kept: {kept:?}"
        );
    }

    /// The API's validation refuses `allow_cidrs` inside the same fixed ranges.
    #[test]
    fn the_api_knows_the_same_ranges() {
        let api: Vec<String> = sandpit_api_types::ALWAYS_DENIED
            .iter()
            .map(|(c, _)| c.to_string())
            .collect();
        let here: Vec<String> = ALWAYS_DENIED_V4
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        assert_eq!(api, here);
    }

    #[test]
    fn refusals_say_what() {
        let r = Refusal {
            target: "127.0.0.1:5000".into(),
            literal: true,
            range: Range::Loopback("127.0.0.0/8"),
        };
        assert_eq!(r.to_string(), "127.0.0.1:5000 is in loopback (127.0.0.0/8)");
        let r = Refusal {
            target: "localhost:5000".into(),
            literal: false,
            ..r
        };
        assert_eq!(
            r.to_string(),
            "localhost:5000 resolves to loopback (127.0.0.0/8)"
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn any_v4_net() -> impl Strategy<Value = Ipv4Net> {
            (any::<u32>(), 0u8..=32).prop_map(|(a, l)| Ipv4Net::new(Ipv4Addr::from(a), l).unwrap())
        }

        fn rules() -> impl Strategy<Value = EgressRules> {
            (
                any::<bool>(),
                proptest::collection::vec(any_v4_net(), 0..4),
                proptest::collection::vec(any_v4_net(), 0..3),
                proptest::collection::vec(1u16..=65535, 0..3),
            )
                .prop_map(|(allow_all, allow_cidrs, deny_cidrs, allow_ports)| {
                    EgressRules {
                        allow_all,
                        allow_cidrs,
                        deny_cidrs,
                        allow_ports,
                        allow_domains: vec!["example.com".into()],
                    }
                })
        }

        /// Addresses near and in every interesting range, and random ones, in IPv4 and
        /// IPv6 spellings.
        fn dest(pool: Ipv4Net) -> impl Strategy<Value = IpAddr> {
            let v4 = prop_oneof![
                any::<u32>().prop_map(Ipv4Addr::from),
                (0u32..(1 << 8)).prop_map(move |o| Ipv4Addr::from(u32::from(pool.addr) | o)),
                any::<u32>().prop_map(|o| Ipv4Addr::from(0x7f00_0000 | (o & 0x00ff_ffff))),
                any::<u16>().prop_map(|o| Ipv4Addr::from(0xa9fe_0000 | u32::from(o))),
                any::<u32>().prop_map(|o| Ipv4Addr::from(0xe000_0000 | (o >> 3))),
                any::<u32>().prop_map(|o| Ipv4Addr::from(o & 0x00ff_ffff)),
                Just(Ipv4Addr::new(192, 0, 2, 2)),
                any::<u8>().prop_map(|o| Ipv4Addr::new(203, 0, 113, o)),
            ];
            prop_oneof![
                v4.clone().prop_map(IpAddr::V4),
                v4.clone().prop_map(|a| IpAddr::V6(a.to_ipv6_mapped())),
                v4.clone().prop_map(|a| IpAddr::V6(a.to_ipv6_compatible())),
                v4.clone().prop_map(|a| IpAddr::V6(Ipv6Addr::from(
                    (0x0064_ff9bu128 << 96) | u128::from(u32::from(a))
                ))),
                v4.prop_map(|a| IpAddr::V6(Ipv6Addr::from(
                    (0x2002u128 << 112) | (u128::from(u32::from(a)) << 80)
                ))),
                any::<u128>().prop_map(|n| IpAddr::V6(Ipv6Addr::from(n))),
                any::<u128>()
                    .prop_map(|n| IpAddr::V6(Ipv6Addr::from((0xfe80u128 << 112) | (n >> 10)))),
                Just(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                Just(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            ]
        }

        /// The always-denied set, written independently of `verdict`.
        fn always_denied(pool: Ipv4Net, host: &[HostNet], addr: IpAddr) -> bool {
            let judged = canonical(addr);
            let v4_denied = |a: Ipv4Addr| {
                a.is_unspecified()
                    || a.octets()[0] == 0
                    || a.is_loopback()
                    || a.is_link_local()
                    || a.is_multicast()
                    || a.is_broadcast()
                    || a.octets()[0] >= 240
                    || pool.contains(a)
            };
            let in_host = host.iter().any(|n| n.contains(addr) || n.contains(judged));
            in_host
                || match judged {
                    IpAddr::V4(a) => v4_denied(a),
                    IpAddr::V6(a) => {
                        a.is_unspecified()
                            || a.is_loopback()
                            || a.is_multicast()
                            || (a.segments()[0] & 0xffc0) == 0xfe80
                    }
                }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]

            /// Random policies and destinations never let a sandbox's connection (by
            /// address or by name) or a pull reach the always-denied set; only pulls to an
            /// exception may reach loopback and host addresses.
            #[test]
            fn the_always_denied_set_is_never_reached(
                rules in rules(),
                pool in (any::<u32>(), 8u8..=30).prop_map(|(a, l)| Ipv4Net::new(Ipv4Addr::from(a), l).unwrap()),
                port in 1u16..=65535,
                addr in dest(v4(10, 88, 0, 0, 16)),
                excepted in any::<bool>(),
            ) {
                let host = host_nets();
                let exceptions = [Endpoint { host: "registry.test".into(), port: None }];
                let exceptions = if excepted { &exceptions[..] } else { &[][..] };
                for pool in [pool, v4(10, 88, 0, 0, 16)] {
                    let b = Boundary { pool, host: &host, exceptions };
                    let denied = always_denied(pool, &host, addr);
                    for purpose in [Purpose::SandboxAddr(&rules), Purpose::SandboxName(&rules)] {
                        let v = b.verdict(purpose, "registry.test", port, addr);
                        if denied {
                            prop_assert!(v.is_err(), "{addr} reached with {purpose:?}");
                        }
                        if let Err(r) = v {
                            prop_assert_eq!(r.always_denied(), denied, "{} named {:?}", addr, r);
                        }
                    }
                    for purpose in [Purpose::Pull, Purpose::Webhook] {
                        let v = b.verdict(purpose, "registry.test", port, addr);
                        if denied && !excepted {
                            prop_assert!(v.is_err(), "{addr} reached by {purpose:?}");
                        }
                        if denied && v.is_ok() {
                            prop_assert!(excepted);
                            let j = canonical(addr);
                            prop_assert!(
                                j.is_loopback() || host.iter().any(|n| n.contains(addr) || n.contains(j)),
                                "an exception opened {}", addr
                            );
                        }
                    }
                }
            }

            /// Without the always-denied set in the way, a sandbox's address-only connection
            /// passes exactly when nftables would accept it.
            #[test]
            fn addresses_follow_the_policy(rules in rules(), a in any::<u32>(), port in 1u16..=65535) {
                let host: Vec<HostNet> = Vec::new();
                let pool = v4(10, 88, 0, 0, 16);
                let addr = Ipv4Addr::from(a);
                prop_assume!(!always_denied(pool, &host, IpAddr::V4(addr)));
                let b = Boundary { pool, host: &host, exceptions: &[] };
                let denied = rules.deny_cidrs.iter().any(|n| n.contains(addr));
                let allowed = rules.allow_all
                    || (rules.allow_cidrs.iter().any(|n| n.contains(addr))
                        && (rules.allow_ports.is_empty() || rules.allow_ports.contains(&port)));
                prop_assert_eq!(
                    b.verdict(Purpose::SandboxAddr(&rules), "h", port, IpAddr::V4(addr)).is_ok(),
                    !denied && allowed
                );
                prop_assert_eq!(
                    b.verdict(Purpose::SandboxName(&rules), "h", port, IpAddr::V4(addr)).is_ok(),
                    !denied
                );
            }
        }
    }
}
