//! Egress policy end to end, with real gVisor sandboxes: what a sandbox can reach under each
//! policy, what it never reaches, live policy changes (`PUT /v1/sandboxes/{id}/egress`), UDP
//! and DNS.
//!
//! Traffic goes only to loopback, to the test's own sandboxes, and to a "target" network
//! namespace this test creates (standing in for the internet): `tegr<index>`, linked to the
//! root namespace by the veth `tegr<index>h`/`tegr<index>t`, addresses `10.215.<index>.0/29`
//! (the index of the test server's pool reservation, so parallel tests never collide). The
//! metadata address 169.254.169.254 lives on the target's loopback and is routed there only
//! for packets from the test server's pool (a policy-routing rule), so the host's own route
//! to a real metadata service is never touched. Everything is removed by [`Target`]'s drop.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sandpit_sdk::Client;
use sandpit_sdk::types::{CreateSandboxRequest, EgressPolicy, SandboxMode, SandboxStatus};
use sandpit_test_support::{TestServer, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{assert_api_err, base, bin, create, sh};

/// TCP services of the target: answer `hi <port>` and close.
const TCP_A: u16 = 7001;
const TCP_B: u16 = 7002;
/// TCP service of the target that records what it receives.
const TCP_SINK: u16 = 7004;
/// A UDP port other than DNS where the target answers DNS queries too.
const UDP_ALT: u16 = 7003;
const DNS: u16 = 53;
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// Listeners on the host's own addresses.
const HOST_PORT: u16 = 7006;
/// What sandbox B listens on.
const SANDBOX_PORT: u16 = 7005;

/// Runs a command, panicking with its stderr if it fails.
pub(crate) fn run(args: &[&str]) -> String {
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
pub(crate) fn run_quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).output();
}

/// Runs `f` on a fresh thread that has entered the named network namespace; sockets created
/// there stay in that namespace.
pub(crate) fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
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

/// What the target's (and the host's) test listeners have seen.
#[derive(Debug, Default)]
struct Seen {
    /// (local address, local port) → accepted TCP connections.
    accepts: HashMap<(Ipv4Addr, u16), usize>,
    /// Bytes received by the sink.
    sink: Vec<u8>,
    /// (local port) → DNS queries answered.
    udp: HashMap<u16, usize>,
}

type Shared = Arc<Mutex<Seen>>;

/// The answer of the target's DNS responder for every A query.
fn dns_answer(index: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 215, index as u8, 6)
}

/// A DNS reply to `query`: one A record `answer` for A queries, no records otherwise.
pub(crate) fn dns_reply(query: &[u8], answer: Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // The question: labels up to a zero byte, then type and class.
    let mut end = 12;
    while end < query.len() && query[end] != 0 {
        end += 1 + query[end] as usize;
    }
    let qend = end + 5;
    if qend > query.len() {
        return None;
    }
    let is_a = query[end + 1..end + 3] == [0, 1];
    let mut out = Vec::with_capacity(qend + 16);
    out.extend_from_slice(&query[..2]); // id
    out.extend_from_slice(&[0x81, 0x80, 0, 1, 0, is_a as u8, 0, 0, 0, 0]);
    out.extend_from_slice(&query[12..qend]);
    if is_a {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        out.extend_from_slice(&answer.octets());
    }
    Some(out)
}

/// The target namespace, its listeners, the metadata route and the host listeners.
struct Target {
    index: u32,
    ns: String,
    host_if: String,
    /// The root namespace's address on the target veth (a host address).
    gw: Ipv4Addr,
    /// Two addresses inside the target namespace.
    t1: Ipv4Addr,
    t2: Ipv4Addr,
    /// Policy-routing table and rule priority for the metadata route.
    table: String,
    seen: Shared,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Target {
    fn net(index: u32) -> String {
        format!("10.215.{index}.0/29")
    }

    /// Create the namespace and start its listeners. Leftovers of a dead run with the same
    /// reservation index are removed first.
    async fn new(srv: &TestServer) -> Target {
        let index = srv.index;
        let base = u32::from(Ipv4Addr::new(10, 215, index as u8, 0));
        let mut t = Target {
            index,
            ns: format!("tegr{index}"),
            host_if: format!("tegr{index}h"),
            gw: Ipv4Addr::from(base + 1),
            t1: Ipv4Addr::from(base + 2),
            t2: Ipv4Addr::from(base + 3),
            table: (21500 + index).to_string(),
            seen: Shared::default(),
            tasks: Vec::new(),
        };
        t.remove();
        let routes = run(&["ip", "-4", "route", "show", "table", "all"]);
        let addrs = run(&["ip", "-4", "-o", "addr"]);
        let prefix = format!("10.215.{index}.");
        assert!(
            !routes.contains(&prefix) && !addrs.contains(&prefix),
            "{} is in use on this host",
            Self::net(index)
        );
        let ns = t.ns.clone();
        let peer = format!("tegr{index}t");
        run(&["ip", "netns", "add", &ns]);
        run(&[
            "ip", "link", "add", &t.host_if, "type", "veth", "peer", "name", &peer, "netns", &ns,
        ]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/29", t.gw),
            "dev",
            &t.host_if,
        ]);
        run(&["ip", "link", "set", &t.host_if, "up"]);
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        for a in [t.t1, t.t2, dns_answer(index)] {
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{a}/29"),
                "dev",
                &peer,
            ]);
        }
        run(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{METADATA}/32"),
            "dev",
            "lo",
        ]);
        run(&["ip", "-n", &ns, "link", "set", &peer, "up"]);
        run(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &t.gw.to_string(),
        ]);
        // Packets from the test server's sandboxes to the metadata address go to the target
        // (where a listener waits), so only the egress rules stand between them.
        run(&[
            "ip",
            "rule",
            "add",
            "pref",
            &t.table,
            "from",
            &srv.pool,
            "to",
            &METADATA.to_string(),
            "lookup",
            &t.table,
        ]);
        run(&[
            "ip",
            "route",
            "add",
            &format!("{METADATA}/32"),
            "via",
            &t.t1.to_string(),
            "dev",
            &t.host_if,
            "table",
            &t.table,
        ]);
        t.serve();
        t
    }

    fn serve(&mut self) {
        let (tcp, udp) = in_netns(&self.ns, || {
            let tcp: Vec<_> = [TCP_A, TCP_B, TCP_SINK, DNS, 80, 443]
                .into_iter()
                .map(|p| std::net::TcpListener::bind(("0.0.0.0", p)).unwrap())
                .collect();
            let udp: Vec<_> = [DNS, UDP_ALT]
                .into_iter()
                .map(|p| std::net::UdpSocket::bind(("0.0.0.0", p)).unwrap())
                .collect();
            (tcp, udp)
        });
        for l in tcp {
            l.set_nonblocking(true).unwrap();
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            self.tasks
                .push(tokio::spawn(accept_loop(l, self.seen.clone())));
        }
        let answer = dns_answer(self.index);
        for u in udp {
            u.set_nonblocking(true).unwrap();
            let u = tokio::net::UdpSocket::from_std(u).unwrap();
            let seen = self.seen.clone();
            self.tasks.push(tokio::spawn(async move {
                let port = u.local_addr().unwrap().port();
                let mut buf = [0u8; 512];
                loop {
                    let Ok((n, peer)) = u.recv_from(&mut buf).await else {
                        return;
                    };
                    *seen.lock().unwrap().udp.entry(port).or_default() += 1;
                    if let Some(reply) = dns_reply(&buf[..n], answer) {
                        let _ = u.send_to(&reply, peer).await;
                    }
                }
            }));
        }
    }

    /// A listener on a host address (root namespace).
    async fn listen_on_host(&mut self, addr: Ipv4Addr, port: u16) {
        let l = tokio::net::TcpListener::bind((addr, port))
            .await
            .unwrap_or_else(|e| panic!("bind {addr}:{port}: {e}"));
        self.tasks
            .push(tokio::spawn(accept_loop(l, self.seen.clone())));
    }

    fn accepts(&self, addr: Ipv4Addr, port: u16) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.accepts.get(&(addr, port)).copied().unwrap_or(0)
    }

    fn udp(&self, port: u16) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.udp.get(&port).copied().unwrap_or(0)
    }

    fn sink(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap().sink).into_owned()
    }

    fn remove(&self) {
        run_quiet(&["ip", "rule", "del", "pref", &self.table]);
        run_quiet(&["ip", "route", "flush", "table", &self.table]);
        run_quiet(&["ip", "link", "del", &self.host_if]);
        run_quiet(&["ip", "netns", "del", &self.ns]);
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.remove();
    }
}

async fn accept_loop(l: tokio::net::TcpListener, seen: Shared) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            return;
        };
        let SocketAddr::V4(local) = s.local_addr().unwrap() else {
            continue;
        };
        *seen
            .lock()
            .unwrap()
            .accepts
            .entry((*local.ip(), local.port()))
            .or_default() += 1;
        let seen = seen.clone();
        tokio::spawn(async move {
            if local.port() == TCP_SINK {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    seen.lock().unwrap().sink.extend_from_slice(&buf[..n]);
                }
            } else {
                let _ = s.write_all(format!("hi {}", local.port()).as_bytes()).await;
            }
        });
    }
}

/// The outcome of a TCP connection attempt from inside a sandbox.
#[derive(Debug, PartialEq, Eq)]
enum Tcp {
    /// Connected; what the server sent.
    Open(String),
    /// Rejected with a reset, as denied TCP must be (and fast, see [`tcp`]).
    Refused,
    Other(String),
}

/// Connect from the sandbox with busybox `nc`.
async fn tcp(client: &Client, id: &str, ip: Ipv4Addr, port: u16) -> Tcp {
    let out = sh(client, id, &format!("nc -w 3 {ip} {port} </dev/null")).await;
    if out.exit_code == 0 {
        return Tcp::Open(out.stdout);
    }
    if out.stderr.contains("Connection refused") {
        assert!(
            out.duration_ms < 1000,
            "a denied connection to {ip}:{port} must be reset at once, took {} ms",
            out.duration_ms
        );
        return Tcp::Refused;
    }
    Tcp::Other(format!("{out:?}"))
}

/// Whether an ICMP echo from the sandbox (busybox `ping`, raw socket) to `ip` is answered.
async fn ping(client: &Client, id: &str, ip: Ipv4Addr) -> bool {
    sh(client, id, &format!("ping -c 1 -W 2 {ip}"))
        .await
        .exit_code
        == 0
}

/// A DNS query over UDP from the sandbox (busybox `nslookup`, one try of one second) to
/// `server:port`, or to the resolv.conf nameserver when `server` is `None`. Returns the
/// address the answer holds.
async fn dns(client: &Client, id: &str, server: Option<(Ipv4Addr, u16)>) -> Option<Ipv4Addr> {
    let cmd = match server {
        Some((ip, port)) => format!("nslookup -port={port} -timeout=1 -retry=1 probe.test {ip}"),
        None => "nslookup -timeout=1 -retry=1 probe.test".to_string(),
    };
    let out = sh(client, id, &cmd).await;
    out.stdout
        .split("Name:")
        .nth(1)?
        .lines()
        .find_map(|l| l.strip_prefix("Address:"))
        .and_then(|a| a.trim().parse().ok())
}

fn policy(mode: &str, allow: &[&str], deny: &[&str], ports: &[u32]) -> EgressPolicy {
    EgressPolicy {
        mode: mode.into(),
        allow_cidrs: allow.iter().map(|s| s.to_string()).collect(),
        deny_cidrs: deny.iter().map(|s| s.to_string()).collect(),
        allow_ports: ports.to_vec(),
        allow_domains: Vec::new(),
    }
}

/// The sandbox's address and its gateway (the host side of its veth), from inside.
async fn addrs_of(client: &Client, id: &str) -> (Ipv4Addr, Ipv4Addr) {
    let out = sh(client, id, "ip -4 route").await;
    let gw: Ipv4Addr = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("default via "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no default route: {out:?}"));
    (Ipv4Addr::from(u32::from(gw) + 1), gw)
}

#[tokio::test]
async fn egress_policy_is_enforced_and_changes_live() {
    let srv = TestServer::start_with_index_env(bin(), |index| {
        vec![("SANDPIT_DNS".to_string(), format!("10.215.{index}.2"))]
    })
    .await
    .expect("server starts");
    let mut target = Target::new(&srv).await;
    let (t1, t2) = (target.t1, target.t2);
    let answer = dns_answer(target.index);
    let client = srv.client();

    // A: persistent (so it can be suspended), allow_all. B: a neighbour with a listener.
    let a = create(
        &client,
        CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            idle_timeout: Some("10m".into()),
            ..Default::default()
        },
    )
    .await;
    let a = a.id;
    let b = create(&client, base()).await.id;
    assert_eq!(
        sh(&client, &a, "cat /etc/resolv.conf").await.stdout,
        format!("# written by sandpit; queries follow the egress policy\nnameserver {t1}\n")
    );

    // ---- a policy changed while suspended applies on wake ----
    // (First, before any connection exists: gVisor cannot checkpoint open TCP endpoints.)
    assert_eq!(
        client.hibernate(&a).await.unwrap().status,
        SandboxStatus::Suspended
    );
    let changed = client
        .set_egress(&a, &policy("deny_all", &[], &[], &[]))
        .await
        .unwrap();
    assert_eq!(changed.status, SandboxStatus::Suspended);
    assert_eq!(changed.egress.mode, "deny_all");
    assert_eq!(
        client.wake(&a).await.unwrap().egress,
        policy("deny_all", &[], &[], &[])
    );
    assert_eq!(tcp(&client, &a, t1, TCP_A).await, Tcp::Refused);
    assert_eq!(target.accepts(t1, TCP_A), 0, "deny_all reached the target");

    // ---- allow_all: TCP, UDP and DNS (through resolv.conf) reach the target ----
    client
        .set_egress(&a, &EgressPolicy::default())
        .await
        .unwrap();
    assert_eq!(
        tcp(&client, &a, t1, TCP_A).await,
        Tcp::Open("hi 7001".into())
    );
    assert_eq!(
        tcp(&client, &a, t2, TCP_B).await,
        Tcp::Open("hi 7002".into())
    );
    assert_eq!(target.accepts(t1, TCP_A), 1);
    assert_eq!(dns(&client, &a, Some((t1, UDP_ALT))).await, Some(answer));
    assert_eq!(dns(&client, &a, None).await, Some(answer), "resolv.conf");
    assert!(target.udp(UDP_ALT) >= 1 && target.udp(DNS) >= 1);
    assert!(ping(&client, &a, t1).await, "ICMP under allow_all");

    // ---- always blocked, even under allow_all ----
    // The metadata address: routed to a listener in the target namespace.
    let (a_ip, a_gw) = addrs_of(&client, &a).await;
    let slot = (u32::from(a_ip) - u32::from(Ipv4Addr::new(10, 213, target.index as u8, 0))) / 4;
    let route = run(&[
        "ip",
        "-o",
        "route",
        "get",
        &METADATA.to_string(),
        "from",
        &a_ip.to_string(),
        "iif",
        &format!("t{}h{slot}", target.index),
    ]);
    assert!(
        route.contains(&format!("dev {}", target.host_if)),
        "the metadata address must be routed to the target: {route}"
    );
    assert_eq!(tcp(&client, &a, METADATA, 80).await, Tcp::Refused);
    assert_eq!(target.accepts(METADATA, 80), 0, "metadata reached");
    // The host's own addresses: the sandbox's gateway and another interface's address.
    let target_gw = target.gw;
    target.listen_on_host(a_gw, HOST_PORT).await;
    target.listen_on_host(target_gw, HOST_PORT).await;
    for host_ip in [a_gw, target_gw] {
        assert_eq!(tcp(&client, &a, host_ip, HOST_PORT).await, Tcp::Refused);
        assert_eq!(
            target.accepts(host_ip, HOST_PORT),
            0,
            "host {host_ip} reached"
        );
    }
    // Another sandbox: reachable from the host, never from A.
    sh(&client, &b, &format!("httpd -p {SANDBOX_PORT} -h /tmp")).await;
    let (b_ip, _) = addrs_of(&client, &b).await;
    wait_until(Duration::from_secs(10), "B's listener", || async {
        tokio::net::TcpStream::connect((b_ip, SANDBOX_PORT))
            .await
            .ok()
            .map(drop)
    })
    .await
    .unwrap();
    assert_eq!(tcp(&client, &a, b_ip, SANDBOX_PORT).await, Tcp::Refused);

    // ---- an open connection is cut when the policy changes ----
    sh(
        &client,
        &a,
        &format!(
            "(i=0; while [ $i -lt 300 ]; do echo line$i; i=$((i+1)); sleep 0.1; done) | nc {t1} {TCP_SINK} >/dev/null 2>&1 &"
        ),
    )
    .await;
    wait_until(Duration::from_secs(10), "the stream flows", || async {
        target.sink().contains("line3").then_some(())
    })
    .await
    .unwrap();
    client
        .set_egress(&a, &policy("deny_all", &[], &[], &[]))
        .await
        .unwrap();
    let at_change = target.sink().len();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = target.sink();
    assert!(
        after.len() <= at_change + "line100\n".len(),
        "the stream went on after deny_all: {at_change} -> {} bytes",
        after.len()
    );
    let out = sh(
        &client,
        &a,
        "sleep 0.5; if ps | grep -v grep | grep -q 'nc 10.215'; then echo running; else echo gone; fi",
    )
    .await;
    assert_eq!(out.stdout.trim(), "gone", "nc was reset");

    // ---- deny_all: nothing, UDP and DNS included ----
    let (udp_before, dns_before) = (target.udp(UDP_ALT), target.udp(DNS));
    assert_eq!(tcp(&client, &a, t1, TCP_A).await, Tcp::Refused);
    assert_eq!(tcp(&client, &a, t1, DNS).await, Tcp::Refused, "TCP 53");
    assert_eq!(dns(&client, &a, Some((t1, UDP_ALT))).await, None);
    assert_eq!(dns(&client, &a, None).await, None, "DNS under deny_all");
    assert_eq!(
        (target.udp(UDP_ALT), target.udp(DNS)),
        (udp_before, dns_before),
        "UDP reached the target under deny_all"
    );
    assert!(!ping(&client, &a, t1).await, "ICMP under deny_all");

    // ---- deny_all + allow_cidrs: that CIDR only (UDP included) ----
    let t1_cidr = format!("{t1}/32");
    let t2_cidr = format!("{t2}/32");
    client
        .set_egress(&a, &policy("deny_all", &[t1_cidr.as_str()], &[], &[]))
        .await
        .unwrap();
    assert_eq!(
        tcp(&client, &a, t1, TCP_A).await,
        Tcp::Open("hi 7001".into())
    );
    assert_eq!(tcp(&client, &a, t2, TCP_A).await, Tcp::Refused);
    assert_eq!(
        dns(&client, &a, None).await,
        Some(answer),
        "allowed resolver"
    );
    assert!(ping(&client, &a, t1).await, "ICMP to an allowed CIDR");
    assert!(
        !ping(&client, &a, t2).await,
        "ICMP outside the allowed CIDRs"
    );

    // ---- allow_ports: only those TCP ports of the allowed CIDRs; no UDP ----
    client
        .set_egress(
            &a,
            &policy("deny_all", &[t1_cidr.as_str()], &[], &[TCP_A as u32]),
        )
        .await
        .unwrap();
    assert_eq!(
        tcp(&client, &a, t1, TCP_A).await,
        Tcp::Open("hi 7001".into())
    );
    assert_eq!(tcp(&client, &a, t1, TCP_B).await, Tcp::Refused);
    let dns_before = target.udp(DNS);
    assert_eq!(dns(&client, &a, None).await, None, "UDP with allow_ports");
    assert_eq!(target.udp(DNS), dns_before);
    assert!(!ping(&client, &a, t1).await, "ICMP with allow_ports");

    // ---- deny_cidrs beat allow_cidrs, and apply under allow_all ----
    client
        .set_egress(
            &a,
            &policy(
                "deny_all",
                &[Target::net(target.index).as_str()],
                &[t2_cidr.as_str()],
                &[],
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        tcp(&client, &a, t1, TCP_B).await,
        Tcp::Open("hi 7002".into())
    );
    assert_eq!(tcp(&client, &a, t2, TCP_B).await, Tcp::Refused);
    client
        .set_egress(&a, &policy("allow_all", &[], &[t1_cidr.as_str()], &[]))
        .await
        .unwrap();
    assert_eq!(tcp(&client, &a, t1, TCP_A).await, Tcp::Refused);
    assert_eq!(
        tcp(&client, &a, t2, TCP_A).await,
        Tcp::Open("hi 7001".into())
    );

    // ---- allow_domains: web traffic and DNS by name; connections go where the host
    // resolves the name (the target's DNS answers `answer` for every name) ----
    client
        .set_egress(
            &a,
            &EgressPolicy {
                allow_domains: vec!["probe.test".into(), "*.web.test".into()],
                ..policy("deny_all", &[], &[], &[])
            },
        )
        .await
        .unwrap();
    let dns_before = target.udp(DNS);
    assert_eq!(
        dns(&client, &a, None).await,
        Some(answer),
        "an allowed name"
    );
    assert!(target.udp(DNS) > dns_before);
    let dns_before = target.udp(DNS);
    let refused = sh(&client, &a, "nslookup -timeout=1 -retry=1 secret.evil.test").await;
    assert_ne!(refused.exit_code, 0, "{refused:?}");
    assert_eq!(
        target.udp(DNS),
        dns_before,
        "a refused name never leaves the host"
    );
    let get = |host: &str| {
        format!("printf 'GET / HTTP/1.1\\r\\nHost: {host}\\r\\n\\r\\n' | nc -w 3 {t1} 80")
    };
    assert_eq!(sh(&client, &a, &get("www.web.test")).await.stdout, "hi 80");
    assert_eq!(
        target.accepts(answer, 80),
        1,
        "connected to the resolved address"
    );
    assert_eq!(target.accepts(t1, 80), 0, "not to the dialled one");
    let blocked = sh(&client, &a, &get("evil.test")).await.stdout;
    assert!(blocked.starts_with("HTTP/1.1 403"), "{blocked}");
    assert!(
        blocked.contains("evil.test is not in allow_domains"),
        "{blocked}"
    );
    client
        .upload(
            &a,
            "/tmp/hello",
            sandpit_net::sniff::client_hello("api.web.test"),
        )
        .await
        .unwrap();
    let tls = sh(&client, &a, &format!("nc -w 3 {t2} 443 < /tmp/hello")).await;
    assert_eq!(tls.stdout, "hi 443", "{tls:?}");
    assert_eq!(target.accepts(answer, 443), 1);
    assert_eq!(
        tcp(&client, &a, t1, TCP_A).await,
        Tcp::Refused,
        "other ports"
    );

    // ---- the CLI ----
    let out = Command::new(bin())
        .args(["sandbox", "egress", &a, r#"{"mode":"deny_all"}"#])
        .env("SANDPIT_URL", &srv.url)
        .env("SANDPIT_TOKEN", &srv.token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["egress"]["mode"], "deny_all");
    assert_eq!(tcp(&client, &a, t2, TCP_A).await, Tcp::Refused);

    // ---- bad requests change nothing ----
    let bad = |mode: &str, allow: &[&str], ports: &[u32]| policy(mode, allow, &[], ports);
    for (p, code) in [
        (bad("open", &[], &[]), "invalid_egress_mode"),
        (bad("deny_all", &["10.0.0.1/8"], &[]), "invalid_cidr"),
        (bad("deny_all", &["10.0.0.0/8"], &[0]), "invalid_port"),
        (
            EgressPolicy {
                allow_domains: vec!["*.com".into()],
                ..bad("deny_all", &[], &[])
            },
            "invalid_domain",
        ),
        (
            bad("allow_all", &["10.0.0.0/8"], &[]),
            "invalid_egress_policy",
        ),
    ] {
        assert_api_err(client.set_egress(&a, &p).await, 400, code);
    }
    let r = client
        .request(reqwest::Method::PUT, &format!("/v1/sandboxes/{a}/egress"))
        .body(r#"{"mode":"allow_all","bogus":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        client.get_sandbox(&a).await.unwrap().egress.mode,
        "deny_all",
        "rejected updates changed nothing"
    );
    assert_api_err(
        client
            .set_egress("sb0000000000000000", &EgressPolicy::default())
            .await,
        404,
        "sandbox_not_found",
    );
    let ws = client.create_workspace("other").await.unwrap();
    let other = client
        .create_token(&ws.id, &Default::default())
        .await
        .unwrap();
    let other = srv.client_with(other.token.as_deref().unwrap());
    assert_api_err(
        other.set_egress(&a, &EgressPolicy::default()).await,
        403,
        "forbidden",
    );
    let read_only = client
        .create_token(
            &ws.id,
            &sandpit_sdk::types::TokenCreateRequest {
                scopes: Some(vec!["sandbox_read".into()]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_api_err(
        srv.client_with(read_only.token.as_deref().unwrap())
            .set_egress(&a, &EgressPolicy::default())
            .await,
        403,
        "missing_scope",
    );
    client.destroy_sandbox(&b).await.unwrap();
    assert_api_err(
        client.set_egress(&b, &EgressPolicy::default()).await,
        409,
        "invalid_state",
    );

    client.destroy_sandbox(&a).await.unwrap();
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// Issue #12, hole 4: with `deny_all` + `allow_cidrs` covering the sandbox pool (or
/// everything) + `allow_domains`, a sandbox's web traffic goes through the domain filter,
/// which connects from the host. It must not read another tenant's sandbox web server, or the
/// host's, that way: such a connection goes where the name in its `Host` resolves, or is
/// refused. Entries that lie entirely inside the always-denied set are refused outright.
#[tokio::test]
async fn allow_domains_with_wide_allow_cidrs_never_reach_other_sandboxes() {
    let srv = TestServer::start_with_index_env(bin(), |index| {
        vec![("SANDPIT_DNS".to_string(), format!("10.215.{index}.2"))]
    })
    .await
    .expect("server starts");
    let mut target = Target::new(&srv).await;
    let answer = dns_answer(target.index);
    let client = srv.client();

    // B: another tenant's web server on port 80, with a page only B should serve.
    let ws = client.create_workspace("tenant-b").await.unwrap();
    let b_token = client
        .create_token(&ws.id, &Default::default())
        .await
        .unwrap();
    let tenant_b = srv.client_with(b_token.token.as_deref().unwrap());
    let b = create(&tenant_b, base()).await.id;
    sh(
        &tenant_b,
        &b,
        &format!(
            "mkdir -p /tmp/www && echo tenant-b-secret > /tmp/www/index.html && httpd -p 80 -h /tmp/www && httpd -p {SANDBOX_PORT} -h /tmp/www"
        ),
    )
    .await;
    let (b_ip, _) = addrs_of(&tenant_b, &b).await;
    wait_until(Duration::from_secs(10), "B's web server", || async {
        tokio::net::TcpStream::connect((b_ip, 80))
            .await
            .ok()
            .map(drop)
    })
    .await
    .unwrap();

    // A: the attacker; the host listens on A's gateway and on another host address.
    let a = create(&client, base()).await.id;
    let (_, a_gw) = addrs_of(&client, &a).await;
    let target_gw = target.gw;
    target.listen_on_host(a_gw, 80).await;
    target.listen_on_host(target_gw, 80).await;
    let get = |host: &str, ip: Ipv4Addr| {
        format!(
            "printf 'GET /index.html HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n' | nc -w 3 {ip} 80"
        )
    };
    // A /16 over every test pool (the server's own pool alone is refused, see below), and
    // everything.
    for wide in ["10.213.0.0/16", "0.0.0.0/0"] {
        client
            .set_egress(
                &a,
                &EgressPolicy {
                    allow_domains: vec!["probe.test".into()],
                    ..policy("deny_all", &[wide], &[], &[])
                },
            )
            .await
            .unwrap();
        for (ip, what) in [
            (b_ip, "another sandbox"),
            (a_gw, "the host (A's gateway)"),
            (target_gw, "the host (another address)"),
        ] {
            // An allowed name: the connection goes where the name resolves.
            let before = target.accepts(answer, 80);
            let out = sh(&client, &a, &get("probe.test", ip)).await;
            assert!(
                !out.stdout.contains("tenant-b-secret"),
                "{wide}: {what} read through the filter: {out:?}"
            );
            assert_eq!(out.stdout, "hi 80", "{wide}: {what}: {out:?}");
            assert_eq!(target.accepts(answer, 80), before + 1, "{wide}: {what}");
            // Another name: refused by the filter.
            let out = sh(&client, &a, &get("evil.test", ip)).await;
            assert!(
                out.stdout.starts_with("HTTP/1.1 403")
                    && out.stdout.contains("evil.test is not in allow_domains"),
                "{wide}: {what}: {out:?}"
            );
            assert_eq!(target.accepts(ip, 80), 0, "{wide}: {what} was reached");
        }
        // Other ports are nftables' business: the neighbour is unreachable there too.
        assert_eq!(tcp(&client, &a, b_ip, SANDBOX_PORT).await, Tcp::Refused);
    }
    // Addresses outside the always-denied set still pass on the address alone.
    assert_eq!(
        tcp(&client, &a, target.t1, TCP_A).await,
        Tcp::Open("hi 7001".into())
    );

    // Entries entirely inside the always-denied set are refused, naming the range; nothing
    // changes.
    for (entry, named) in [
        (srv.pool.as_str(), "sandbox pool"),
        ("169.254.169.254/32", "metadata"),
        ("127.0.0.0/8", "loopback"),
    ] {
        match client
            .set_egress(&a, &policy("deny_all", &[entry], &[], &[]))
            .await
        {
            Err(sandpit_sdk::SdkError::Api {
                status,
                code,
                message,
            }) => {
                assert_eq!(
                    (status.as_u16(), code.as_str()),
                    (400, "invalid_egress_policy")
                );
                assert!(message.contains(named), "{entry}: {message}");
            }
            other => panic!("{entry}: {other:?}"),
        }
    }
    assert_eq!(
        client.get_sandbox(&a).await.unwrap().egress.allow_cidrs,
        vec!["0.0.0.0/0".to_string()]
    );

    client.destroy_sandbox(&a).await.unwrap();
    tenant_b.destroy_sandbox(&b).await.unwrap();
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}
