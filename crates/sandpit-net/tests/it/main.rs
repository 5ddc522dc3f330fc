//! Integration tests of sandpit-net against the real kernel: namespaces, veths, nftables.
//!
//! They need root. Traffic only ever goes to addresses inside namespaces the test creates (the
//! slots' own namespaces and a "target" namespace standing in for the internet), or to host
//! addresses on the test's own veths. Every test uses a random prefix and pool and cleans up in
//! a drop guard, even when it fails.
#![allow(
    clippy::disallowed_methods,
    reason = "integration tests build host-side fixtures and read host state by path"
)]

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandpit_net::{EgressRules, Ipv4Net, NetConfig, NetError, Network};

const TCP_A: u16 = 7001;
const TCP_B: u16 = 7002;
const UDP: u16 = 7003;

fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

/// Runs a command, panicking with its stderr if it fails.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command, ignoring failure (cleanup).
fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).output();
}

/// Whether any host address or route touches `net` (so the test must not use it).
fn in_use(net: &Ipv4Net) -> bool {
    let mut hit = false;
    let mut check = |s: &str| {
        if let Ok(n) = s.parse::<Ipv4Net>() {
            hit |= n.overlaps(net);
        }
    };
    for cmd in [
        &["ip", "-4", "-j", "route", "show", "table", "all"][..],
        &["ip", "-4", "-j", "addr"][..],
    ] {
        let v: serde_json::Value = serde_json::from_str(&sh(cmd)).unwrap();
        for item in v.as_array().into_iter().flatten() {
            if let Some(dst) = item["dst"].as_str() {
                check(dst);
            }
            for a in item["addr_info"].as_array().into_iter().flatten() {
                if let (Some(l), Some(p)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
                    check(&format!("{l}/{p}"));
                }
            }
        }
    }
    hit
}

/// A random test prefix, a free /24 pool in 10.231.0.0/16 and a free /29 target network in
/// 10.232.0.0/16.
fn pick(tag: &str) -> (String, Ipv4Net, Ipv4Net) {
    for _ in 0..50 {
        let r = random();
        let prefix = format!("{tag}{:04x}", r as u16);
        let third = (r >> 16) as u8;
        let pool: Ipv4Net = format!("10.231.{third}.0/24").parse().unwrap();
        let target: Ipv4Net = format!("10.232.{third}.0/29").parse().unwrap();
        if !in_use(&pool) && !in_use(&target) {
            return (prefix, pool, target);
        }
    }
    panic!("no free test network found");
}

/// Runs `f` on a fresh thread that has entered the named network namespace; sockets created
/// there stay in that namespace.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns");
        f()
    })
    .join()
    .expect("netns thread panicked")
}

#[derive(Debug, PartialEq, Eq)]
enum Tcp {
    Open(String),
    Refused,
    Timeout,
    Error(String),
}

#[derive(Debug, PartialEq, Eq)]
enum Udp {
    Reply(String),
    Error(String),
    Timeout,
}

fn tcp_probe(ns: &str, ip: Ipv4Addr, port: u16) -> Tcp {
    in_netns(ns, move || {
        let addr = SocketAddr::V4(SocketAddrV4::new(ip, port));
        match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut buf = String::new();
                match s.read_to_string(&mut buf) {
                    Ok(_) => Tcp::Open(buf),
                    Err(e) => Tcp::Error(format!("read: {e}")),
                }
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => Tcp::Refused,
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                Tcp::Timeout
            }
            Err(e) => Tcp::Error(e.to_string()),
        }
    })
}

fn udp_probe(ns: &str, ip: Ipv4Addr, port: u16) -> Udp {
    in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(SocketAddrV4::new(ip, port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        if let Err(e) = s.send(b"ping") {
            return Udp::Error(e.to_string());
        }
        let mut buf = [0u8; 64];
        match s.recv(&mut buf) {
            Ok(n) => Udp::Reply(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                Udp::Timeout
            }
            Err(e) => Udp::Error(e.to_string()),
        }
    })
}

/// What the target's servers have seen.
#[derive(Debug, Default)]
struct Seen {
    /// (local port) → number of accepted connections.
    accepts: HashMap<u16, usize>,
    /// Peer address of the latest TCP connection.
    last_peer: Option<SocketAddr>,
    udp: usize,
}

/// TCP servers on `TCP_A`/`TCP_B` and a UDP echo server on `UDP` in namespace `ns`, on every
/// address of the namespace.
async fn serve(ns: &str, seen: Arc<Mutex<Seen>>) -> Vec<tokio::task::JoinHandle<()>> {
    let (a, b, u) = in_netns(ns, || {
        let a = std::net::TcpListener::bind(("0.0.0.0", TCP_A)).unwrap();
        let b = std::net::TcpListener::bind(("0.0.0.0", TCP_B)).unwrap();
        let u = UdpSocket::bind(("0.0.0.0", UDP)).unwrap();
        (a, b, u)
    });
    let mut tasks = Vec::new();
    for l in [a, b] {
        l.set_nonblocking(true).unwrap();
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((mut s, peer)) = l.accept().await else {
                    return;
                };
                let port = s.local_addr().unwrap().port();
                {
                    let mut seen = seen.lock().unwrap();
                    *seen.accepts.entry(port).or_default() += 1;
                    seen.last_peer = Some(peer);
                }
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(format!("hi {port}").as_bytes()).await;
            }
        }));
    }
    u.set_nonblocking(true).unwrap();
    let u = tokio::net::UdpSocket::from_std(u).unwrap();
    tasks.push(tokio::spawn(async move {
        let mut buf = [0u8; 64];
        loop {
            let Ok((n, peer)) = u.recv_from(&mut buf).await else {
                return;
            };
            seen.lock().unwrap().udp += 1;
            let mut reply = b"pong ".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = u.send_to(&reply, peer).await;
        }
    }));
    tasks
}

/// Test fixture: a network with a random prefix and pool, plus a target namespace
/// `<prefix>tgt` linked to the host by veth `<prefix>ta`/`<prefix>tb`, holding two addresses.
/// Dropping it removes everything.
struct Fixture {
    net: Network,
    prefix: String,
    target_ns: String,
    target_if: String,
    target_gw: Ipv4Addr,
    /// Two addresses inside the target namespace.
    t1: Ipv4Addr,
    t2: Ipv4Addr,
}

impl Fixture {
    fn new(tag: &str) -> Self {
        let (prefix, pool, target) = pick(tag);
        let base = u32::from(target.addr);
        let net = Network::new(NetConfig {
            prefix: prefix.clone(),
            pool,
            // t1 answers DNS in the tests that use it.
            nameservers: vec![Ipv4Addr::from(base + 2)],
        })
        .unwrap();
        let fx = Fixture {
            net,
            target_ns: format!("{prefix}tgt"),
            target_if: format!("{prefix}ta"),
            target_gw: Ipv4Addr::from(base + 1),
            t1: Ipv4Addr::from(base + 2),
            t2: Ipv4Addr::from(base + 3),
            prefix,
        };
        let ns = fx.target_ns.as_str();
        let peer = format!("{}tb", fx.prefix);
        sh(&["ip", "netns", "add", ns]);
        sh(&[
            "ip",
            "link",
            "add",
            &fx.target_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            ns,
        ]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/29", fx.target_gw),
            "dev",
            &fx.target_if,
        ]);
        sh(&["ip", "link", "set", &fx.target_if, "up"]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        for a in [fx.t1, fx.t2] {
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{a}/29"),
                "dev",
                &peer,
            ]);
        }
        sh(&["ip", "-n", ns, "link", "set", &peer, "up"]);
        sh(&[
            "ip",
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &fx.target_gw.to_string(),
        ]);
        fx
    }

    fn remove_target(&self) {
        sh_quiet(&["ip", "link", "del", &self.target_if]);
        sh_quiet(&["ip", "netns", "del", &self.target_ns]);
    }

    /// Everything on the host that carries the test prefix.
    fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/var/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&self.prefix) {
                found.push(format!("netns {name}"));
            }
        }
        let links: serde_json::Value = serde_json::from_str(&sh(&["ip", "-j", "link"])).unwrap();
        for l in links.as_array().unwrap() {
            let name = l["ifname"].as_str().unwrap_or_default();
            if name.starts_with(&self.prefix) {
                found.push(format!("link {name}"));
            }
        }
        if sh(&["nft", "list", "tables"]).contains(self.net.table_name()) {
            found.push(format!("nft table {}", self.net.table_name()));
        }
        found
    }

    /// Waits (namespace destruction is asynchronous) until nothing is left.
    fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "left behind: {left:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let net = self.net.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            if let Err(e) = rt.block_on(net.teardown()) {
                eprintln!("teardown failed: {e}");
            }
        })
        .join();
        self.remove_target();
    }
}

fn seen_accepts(seen: &Arc<Mutex<Seen>>, port: u16) -> usize {
    seen.lock()
        .unwrap()
        .accepts
        .get(&port)
        .copied()
        .unwrap_or(0)
}

/// Asserts that TCP to `ip:port` from `ns` is rejected with a reset and never reaches the
/// target, and likewise for UDP (ICMP admin-prohibited).
fn assert_denied(ns: &str, seen: &Arc<Mutex<Seen>>, ip: Ipv4Addr, port: u16, what: &str) {
    let before = seen_accepts(seen, port);
    let t = Instant::now();
    assert_eq!(
        tcp_probe(ns, ip, port),
        Tcp::Refused,
        "{what}: tcp {ip}:{port}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "{what}: reject is not fast"
    );
    assert_eq!(
        seen_accepts(seen, port),
        before,
        "{what}: reached the target"
    );
}

fn assert_udp_denied(ns: &str, seen: &Arc<Mutex<Seen>>, ip: Ipv4Addr, what: &str) {
    let before = seen.lock().unwrap().udp;
    let r = udp_probe(ns, ip, UDP);
    assert!(matches!(r, Udp::Error(_)), "{what}: udp {ip} gave {r:?}");
    assert_eq!(
        seen.lock().unwrap().udp,
        before,
        "{what}: udp reached the target"
    );
}

fn assert_allowed(ns: &str, ip: Ipv4Addr, port: u16, what: &str) {
    assert_eq!(
        tcp_probe(ns, ip, port),
        Tcp::Open(format!("hi {port}")),
        "{what}: tcp {ip}:{port}"
    );
}

fn assert_udp_allowed(ns: &str, ip: Ipv4Addr, what: &str) {
    assert_eq!(
        udp_probe(ns, ip, UDP),
        Udp::Reply("pong ping".into()),
        "{what}: udp {ip}"
    );
}

fn cidr(ip: Ipv4Addr, len: u8) -> Ipv4Net {
    Ipv4Net::new(ip, len).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_policy_end_to_end() {
    let fx = Fixture::new("tn");
    let net = &fx.net;
    net.init().await.unwrap();
    net.init().await.unwrap(); // idempotent

    let seen = Arc::new(Mutex::new(Seen::default()));
    let _servers = serve(&fx.target_ns, seen.clone()).await;

    let t0 = Instant::now();
    let s1 = net.attach(1, &EgressRules::deny_all()).await.unwrap();
    eprintln!("attach took {:?}", t0.elapsed());
    assert_eq!(s1, net.addrs(1));
    assert!(s1.netns_path.exists());
    let ns = s1.netns_name.clone();
    let (t1, t2) = (fx.t1, fx.t2);

    // deny_all: nothing gets out, TCP and UDP fail fast.
    assert_denied(&ns, &seen, t1, TCP_A, "deny_all");
    assert_udp_denied(&ns, &seen, t1, "deny_all");

    // Live switch to allow_all on the same namespace.
    net.set_egress(1, &EgressRules::allow_all()).await.unwrap();
    assert_allowed(&ns, t1, TCP_A, "allow_all");
    assert_allowed(&ns, t2, TCP_B, "allow_all");
    assert_udp_allowed(&ns, t1, "allow_all");
    // Masqueraded: the target sees the host's address on its link.
    assert_eq!(
        seen.lock().unwrap().last_peer.map(|p| p.ip()),
        Some(fx.target_gw.into())
    );

    // allow_all with deny_cidrs.
    let rules = EgressRules {
        allow_all: true,
        deny_cidrs: vec![cidr(t2, 32)],
        ..Default::default()
    };
    net.set_egress(1, &rules).await.unwrap();
    assert_allowed(&ns, t1, TCP_A, "allow_all - deny t2");
    assert_denied(&ns, &seen, t2, TCP_A, "allow_all - deny t2");
    assert_udp_allowed(&ns, t1, "allow_all - deny t2");
    assert_udp_denied(&ns, &seen, t2, "allow_all - deny t2");

    // deny_all with one allowed address.
    let rules = EgressRules {
        allow_cidrs: vec![cidr(t1, 32)],
        ..Default::default()
    };
    net.set_egress(1, &rules).await.unwrap();
    assert_allowed(&ns, t1, TCP_A, "allow t1");
    assert_allowed(&ns, t1, TCP_B, "allow t1");
    assert_udp_allowed(&ns, t1, "allow t1");
    assert_denied(&ns, &seen, t2, TCP_A, "allow t1");
    assert_udp_denied(&ns, &seen, t2, "allow t1");

    // allow_ports restricts the allowed CIDRs to those TCP ports (UDP is then rejected).
    let rules = EgressRules {
        allow_cidrs: vec![cidr(t1, 29)],
        allow_ports: vec![TCP_A],
        ..Default::default()
    };
    net.set_egress(1, &rules).await.unwrap();
    assert_allowed(&ns, t1, TCP_A, "ports");
    assert_allowed(&ns, t2, TCP_A, "ports");
    assert_denied(&ns, &seen, t1, TCP_B, "ports");
    assert_udp_denied(&ns, &seen, t1, "ports");

    // deny_cidrs beat allow_cidrs.
    let rules = EgressRules {
        allow_cidrs: vec![cidr(t1, 29)],
        deny_cidrs: vec![cidr(t2, 32)],
        ..Default::default()
    };
    net.set_egress(1, &rules).await.unwrap();
    assert_allowed(&ns, t1, TCP_B, "deny beats allow");
    assert_denied(&ns, &seen, t2, TCP_B, "deny beats allow");
    assert_udp_allowed(&ns, t1, "deny beats allow");
    assert_udp_denied(&ns, &seen, t2, "deny beats allow");

    // Always blocked, even under allow_all: other sandboxes and the host itself. The host can
    // still connect to the sandbox (replies are established).
    net.set_egress(1, &EgressRules::allow_all()).await.unwrap();
    let s2 = net.attach(2, &EgressRules::allow_all()).await.unwrap();
    let seen2 = Arc::new(Mutex::new(Seen::default()));
    let _servers2 = serve(&s2.netns_name, seen2.clone()).await;
    assert_denied(&ns, &seen2, s2.sandbox_ip, TCP_A, "other sandbox");
    assert_udp_denied(&ns, &seen2, s2.sandbox_ip, "other sandbox");
    // Listeners on two host addresses: without the input chain these would accept.
    let l1 = tokio::net::TcpListener::bind((s1.host_ip, 7100))
        .await
        .unwrap();
    let l2 = tokio::net::TcpListener::bind((fx.target_gw, 7100))
        .await
        .unwrap();
    assert_eq!(
        tcp_probe(&ns, s1.host_ip, 7100),
        Tcp::Refused,
        "host veth address"
    );
    assert_eq!(
        tcp_probe(&ns, fx.target_gw, 7100),
        Tcp::Refused,
        "host address"
    );
    drop((l1, l2));
    // Host → sandbox 2 works.
    let mut s = tokio::net::TcpStream::connect((s2.sandbox_ip, TCP_A))
        .await
        .unwrap();
    let mut buf = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut buf)
        .await
        .unwrap();
    assert_eq!(buf, format!("hi {TCP_A}"));

    // reapply_addr is harmless on a configured namespace.
    net.reapply_addr(1).await.unwrap();
    assert_allowed(&ns, t1, TCP_A, "after reapply_addr");

    assert_eq!(net.list_slots().await.unwrap(), vec![1, 2]);
    let t0 = Instant::now();
    net.detach(1).await.unwrap();
    eprintln!("detach took {:?}", t0.elapsed());
    net.detach(1).await.unwrap(); // idempotent
    assert!(!s1.netns_path.exists());
    assert_eq!(net.list_slots().await.unwrap(), vec![2]);
    assert!(matches!(
        net.set_egress(1, &EgressRules::allow_all()).await,
        Err(NetError::NotAttached { slot: 1, .. })
    ));
    net.teardown().await.unwrap();
    assert_eq!(net.list_slots().await.unwrap(), Vec::<u32>::new());
    fx.remove_target();
    fx.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_refuses_busy_slots_and_cleans_up() {
    let fx = Fixture::new("tb");
    let net = &fx.net;

    // Not initialised: attach fails cleanly.
    assert!(matches!(
        net.attach(0, &EgressRules::allow_all()).await,
        Err(NetError::NotInitialized { .. })
    ));
    net.init().await.unwrap();
    assert!(matches!(
        net.attach(net.capacity(), &EgressRules::allow_all()).await,
        Err(NetError::SlotOutOfRange { .. })
    ));

    // A stray interface with the slot's name: the slot is busy and the stray stays untouched.
    let a3 = net.addrs(3);
    let stray_peer = format!("{}zz3", fx.prefix);
    sh(&[
        "ip",
        "link",
        "add",
        &a3.host_if,
        "type",
        "veth",
        "peer",
        "name",
        &stray_peer,
    ]);
    let err = net.attach(3, &EgressRules::allow_all()).await.unwrap_err();
    assert!(matches!(err, NetError::SlotBusy { slot: 3, .. }), "{err}");
    assert!(!a3.netns_path.exists());
    // list_slots finds the stray (crash reconciliation), detach removes it.
    assert_eq!(net.list_slots().await.unwrap(), vec![3]);
    net.detach(3).await.unwrap();
    assert_eq!(net.list_slots().await.unwrap(), Vec::<u32>::new());

    // A slot attached twice is busy; the first attachment keeps working.
    let a0 = net.attach(0, &EgressRules::allow_all()).await.unwrap();
    let err = net.attach(0, &EgressRules::deny_all()).await.unwrap_err();
    assert!(matches!(err, NetError::SlotBusy { slot: 0, .. }), "{err}");
    assert!(a0.netns_path.exists());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let _servers = serve(&fx.target_ns, seen.clone()).await;
    assert_allowed(&a0.netns_name, fx.t1, TCP_A, "still attached");

    // A leftover namespace alone also makes the slot busy and is found by list_slots.
    let a5 = net.addrs(5);
    sh(&["ip", "netns", "add", &a5.netns_name]);
    assert!(matches!(
        net.attach(5, &EgressRules::allow_all()).await,
        Err(NetError::SlotBusy { slot: 5, .. })
    ));
    assert_eq!(net.list_slots().await.unwrap(), vec![0, 5]);

    // A leftover chain alone: busy, found, and the failed attach leaves no namespace or veth.
    let a6 = net.addrs(6);
    sh(&[
        "nft",
        "add",
        "chain",
        "inet",
        &format!("sandpit_{}", fx.prefix),
        "slot_6",
    ]);
    let err = net.attach(6, &EgressRules::allow_all()).await.unwrap_err();
    assert!(matches!(err, NetError::SlotBusy { slot: 6, .. }), "{err}");
    assert!(!a6.netns_path.exists());
    assert_eq!(net.list_slots().await.unwrap(), vec![0, 5, 6]);
    net.detach(6).await.unwrap();
    net.detach(6).await.unwrap(); // idempotent
    net.attach(6, &EgressRules::deny_all()).await.unwrap();
    net.detach(6).await.unwrap();
    // Slot 0 kept its policy through all of it.
    assert_allowed(
        &a0.netns_name,
        fx.t1,
        TCP_A,
        "still attached after slot 6 came and went",
    );

    net.teardown().await.unwrap();
    net.teardown().await.unwrap(); // idempotent
    fx.remove_target();
    fx.assert_clean();
}

/// A DNS responder on `t1:53` answering every A query with `answer`, and web listeners on
/// ports 80 and 443 that record the first bytes they get and answer `hi <port>`.
async fn serve_named(
    ns: &str,
    t1: Ipv4Addr,
    answer: Ipv4Addr,
    seen: Arc<Mutex<NamedSeen>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let dns = in_netns(ns, move || UdpSocket::bind((t1, 53)).unwrap());
    let mut tasks = serve_web(ns, seen.clone());
    dns.set_nonblocking(true).unwrap();
    let dns = tokio::net::UdpSocket::from_std(dns).unwrap();
    let s = seen.clone();
    tasks.push(tokio::spawn(async move {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, peer)) = dns.recv_from(&mut buf).await else {
                return;
            };
            let Some((_, name, _, end)) = sandpit_net::sniff::dns_question(&buf[..n]) else {
                continue;
            };
            s.lock().unwrap().queries.push(name);
            let mut reply = buf[..end].to_vec();
            reply[2] |= 0x80;
            reply[7] = 1;
            reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            reply.extend_from_slice(&answer.octets());
            let _ = dns.send_to(&reply, peer).await;
        }
    }));
    tasks
}

/// Web listeners on ports 80 and 443 of every address of namespace `ns` that record the
/// first bytes they get and answer `hi <port>`.
fn serve_web(ns: &str, seen: Arc<Mutex<NamedSeen>>) -> Vec<tokio::task::JoinHandle<()>> {
    let web: Vec<_> = in_netns(ns, move || {
        [80u16, 443]
            .into_iter()
            .map(|p| std::net::TcpListener::bind(("0.0.0.0", p)).unwrap())
            .collect()
    });
    web.into_iter().map(|l| web_loop(l, seen.clone())).collect()
}

fn web_loop(l: std::net::TcpListener, seen: Arc<Mutex<NamedSeen>>) -> tokio::task::JoinHandle<()> {
    l.set_nonblocking(true).unwrap();
    let l = tokio::net::TcpListener::from_std(l).unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let local = s.local_addr().unwrap();
            let mut buf = [0u8; 2048];
            let n = s.read(&mut buf).await.unwrap_or(0);
            seen.lock().unwrap().web.push((local, buf[..n].to_vec()));
            let _ = s.write_all(format!("hi {}", local.port()).as_bytes()).await;
        }
    })
}

#[derive(Debug, Default)]
struct NamedSeen {
    /// Names the DNS responder was asked for.
    queries: Vec<String>,
    /// (local address, first bytes) of every web connection.
    web: Vec<(SocketAddr, Vec<u8>)>,
}

/// Sends `request` to `ip:port` from namespace `ns` and reads the answer to the end.
fn exchange(ns: &str, ip: Ipv4Addr, port: u16, request: Vec<u8>) -> Tcp {
    in_netns(ns, move || {
        use std::io::Write;
        let addr = SocketAddr::V4(SocketAddrV4::new(ip, port));
        let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Tcp::Refused,
            Err(e) => return Tcp::Error(e.to_string()),
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&request).unwrap();
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf) {
            Ok(_) => Tcp::Open(String::from_utf8_lossy(&buf).into_owned()),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Tcp::Refused,
            Err(e) => Tcp::Error(format!("read: {e}")),
        }
    })
}

/// An A query from namespace `ns` to `server:53`: the answer's addresses, or the rcode.
fn lookup(ns: &str, server: Ipv4Addr, name: &str) -> Result<Vec<Ipv4Addr>, u8> {
    let query = sandpit_net::sniff::dns_a_query(0x4242, name);
    in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(&query, (server, 53)).unwrap();
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).map_err(|_| 255u8)?;
        match buf[3] & 0x0f {
            0 => Ok(sandpit_net::sniff::dns_a_answers(&buf[..n], 0x4242)),
            rcode => Err(rcode),
        }
    })
}

fn http_get(host: &str) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_domains_filter_web_and_dns_by_name() {
    let fx = Fixture::new("td");
    let net = &fx.net;
    net.init().await.unwrap();
    let (t1, t2) = (fx.t1, fx.t2);
    let seen = Arc::new(Mutex::new(NamedSeen::default()));
    // Every name resolves to t2.
    let _servers = serve_named(&fx.target_ns, t1, t2, seen.clone()).await;
    let others = Arc::new(Mutex::new(Seen::default()));
    let _other = serve(&fx.target_ns, others.clone()).await;

    let rules = EgressRules {
        allow_domains: vec!["allowed.test".into(), "*.ok.test".into()],
        ..EgressRules::deny_all()
    };
    let ns = net.attach(0, &rules).await.unwrap().netns_name;

    // DNS: allowed names are forwarded (whatever server the sandbox asked), others refused
    // without reaching the resolver.
    assert_eq!(lookup(&ns, t1, "allowed.test"), Ok(vec![t2]));
    assert_eq!(lookup(&ns, t2, "api.ok.test"), Ok(vec![t2]));
    assert_eq!(lookup(&ns, t1, "secret-data.evil.test"), Err(5));
    assert_eq!(
        lookup(&ns, t1, "ok.test"),
        Err(5),
        "a wildcard is for names below"
    );
    assert_eq!(
        seen.lock().unwrap().queries,
        vec!["allowed.test", "api.ok.test"],
        "refused names never reach the resolver"
    );

    // HTTP: by Host, to the address the name resolves to (t2), not the one dialled (t1).
    assert_eq!(
        exchange(&ns, t1, 80, http_get("allowed.test")),
        Tcp::Open("hi 80".into())
    );
    {
        let seen = seen.lock().unwrap();
        let (local, head) = seen.web.last().unwrap();
        assert_eq!(*local, SocketAddr::from((t2, 80)));
        assert!(head.starts_with(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n"));
    }
    match exchange(&ns, t2, 80, http_get("evil.test")) {
        Tcp::Open(r) => {
            assert!(r.starts_with("HTTP/1.1 403 "), "{r}");
            assert!(r.contains("evil.test is not in allow_domains"), "{r}");
        }
        other => panic!("{other:?}"),
    }

    // TLS: by SNI.
    let before = seen.lock().unwrap().web.len();
    assert_eq!(
        exchange(
            &ns,
            t1,
            443,
            sandpit_net::sniff::client_hello("www.ok.test")
        ),
        Tcp::Open("hi 443".into())
    );
    assert_eq!(seen.lock().unwrap().web.len(), before + 1);
    assert_eq!(
        exchange(&ns, t1, 443, sandpit_net::sniff::client_hello("evil.test")),
        Tcp::Refused
    );
    assert_eq!(
        exchange(&ns, t1, 443, b"not tls at all\r\n\r\n".to_vec()),
        Tcp::Refused
    );
    assert_eq!(
        seen.lock().unwrap().web.len(),
        before + 1,
        "nothing else got through"
    );

    // Other ports and UDP still follow the addresses of the policy: denied.
    assert_denied(
        &ns,
        &others,
        t1,
        TCP_A,
        "allow_domains does not open other ports",
    );
    assert_udp_denied(&ns, &others, t1, "allow_domains does not open UDP");

    // An allowed CIDR passes on its address, without a name.
    let rules = EgressRules {
        allow_cidrs: vec![cidr(t1, 32)],
        ..rules
    };
    net.set_egress(0, &rules).await.unwrap();
    assert_eq!(
        exchange(&ns, t1, 80, b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        Tcp::Open("hi 80".into())
    );
    assert_eq!(
        seen.lock().unwrap().web.last().unwrap().0,
        SocketAddr::from((t1, 80))
    );

    // Back to plain deny_all: nothing is filtered by name any more, everything is denied.
    net.set_egress(0, &EgressRules::deny_all()).await.unwrap();
    assert_eq!(lookup(&ns, t1, "allowed.test"), Err(255), "DNS is dropped");
    assert!(matches!(
        exchange(&ns, t2, 80, http_get("allowed.test")),
        Tcp::Refused
    ));

    net.detach(0).await.unwrap();
    net.teardown().await.unwrap();
    fx.remove_target();
    assert!(fx.leftovers().is_empty(), "{:?}", fx.leftovers());
}

/// Hole 4 of issue #12: a policy whose `allow_cidrs` cover the pool, the host and everything
/// else (plus `allow_domains`, so web traffic goes through the domain filter) must not let a
/// sandbox reach a neighbour's or the host's web server through the filter, which connects
/// from the host. Connections the address does not pass fall back to the name they carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_filter_never_connects_into_the_always_denied_set() {
    let fx = Fixture::new("tf");
    let net = &fx.net;
    net.init().await.unwrap();
    let (t1, t2) = (fx.t1, fx.t2);
    let target = Arc::new(Mutex::new(NamedSeen::default()));
    // Every name resolves to t2.
    let _servers = serve_named(&fx.target_ns, t1, t2, target.clone()).await;

    // The neighbour: slot 2, serving web on its address.
    let s2 = net.attach(2, &EgressRules::deny_all()).await.unwrap();
    let neighbour = Arc::new(Mutex::new(NamedSeen::default()));
    let _web2 = serve_web(&s2.netns_name, neighbour.clone());
    // The host: a web server on an address of its own (the target link).
    let host_seen = Arc::new(Mutex::new(NamedSeen::default()));
    let _host_web = web_loop(
        std::net::TcpListener::bind((fx.target_gw, 80)).unwrap(),
        host_seen.clone(),
    );

    let rules = EgressRules {
        allow_cidrs: vec![cidr(Ipv4Addr::UNSPECIFIED, 0)],
        allow_domains: vec!["allowed.test".into()],
        ..EgressRules::deny_all()
    };
    let s1 = net.attach(1, &rules).await.unwrap();
    let ns = s1.netns_name.clone();
    let nothing_reached = |what: &str| {
        assert!(
            neighbour.lock().unwrap().web.is_empty(),
            "{what}: the neighbour was reached"
        );
        assert!(
            host_seen.lock().unwrap().web.is_empty(),
            "{what}: the host was reached"
        );
    };

    for (ip, what) in [
        (s2.sandbox_ip, "another sandbox"),
        (s1.host_ip, "the host side of the own veth"),
        (s2.host_ip, "the host side of another veth"),
        (fx.target_gw, "a host address"),
    ] {
        // A name outside the list: refused, and nothing was connected to.
        match exchange(&ns, ip, 80, http_get("evil.test")) {
            Tcp::Open(r) => {
                assert!(r.starts_with("HTTP/1.1 403 "), "{what}: {r}");
                assert!(
                    r.contains("evil.test is not in allow_domains"),
                    "{what}: {r}"
                );
            }
            other => panic!("{what}: {other:?}"),
        }
        nothing_reached(what);
        // An allowed name: it goes where the name resolves, never to the address dialled.
        let before = target.lock().unwrap().web.len();
        assert_eq!(
            exchange(&ns, ip, 80, http_get("allowed.test")),
            Tcp::Open("hi 80".into()),
            "{what}"
        );
        assert_eq!(
            target.lock().unwrap().web[before].0,
            SocketAddr::from((t2, 80)),
            "{what}"
        );
        nothing_reached(what);
        // TLS without an allowed name: reset.
        assert_eq!(
            exchange(&ns, ip, 443, sandpit_net::sniff::client_hello("evil.test")),
            Tcp::Refused,
            "{what}"
        );
        nothing_reached(what);
    }

    // Elsewhere the wide allow_cidrs still pass on the address alone.
    assert_eq!(
        exchange(&ns, t1, 80, b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        Tcp::Open("hi 80".into())
    );
    assert_eq!(
        target.lock().unwrap().web.last().unwrap().0,
        SocketAddr::from((t1, 80))
    );

    net.detach(1).await.unwrap();
    net.detach(2).await.unwrap();
    net.teardown().await.unwrap();
    fx.remove_target();
    assert!(fx.leftovers().is_empty(), "{:?}", fx.leftovers());
}
