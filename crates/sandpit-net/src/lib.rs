//! Sandbox networking: one network namespace per sandbox slot, a veth pair to the host,
//! addresses from a pool of /30s, and a per-slot egress policy enforced by nftables in the
//! root namespace.
//!
//! Everything this crate creates carries the configured prefix: namespaces `<prefix>-<slot>`,
//! veths `<prefix>h<slot>` (host side) and `<prefix>s<slot>` (sandbox side), and one nftables
//! table `inet sandpit_<prefix>` (see [`rules`] for its layout). It shells out to `ip` and
//! `nft`, so it needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).
//!
//! Rules match packets entering the root namespace from a slot's host-side veth: with gVisor the
//! sandbox's packets come from its user-space netstack, so rules inside the namespace would
//! never see them.
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        reason = "unit tests build host-side fixtures by path"
    )
)]
#![expect(
    clippy::disallowed_methods,
    reason = "/proc/sys and /run/netns are the kernel's and iproute2's"
)]

mod cmd;
pub mod dial;
pub mod domains;
mod error;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
mod ipnet;
pub mod rules;
mod seam;
pub mod secrets;
pub mod sniff;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub use dial::{Dialer, Endpoint};
pub use error::NetError;
pub use ipnet::Ipv4Net;
pub use rules::EgressRules;
pub use seam::SandboxNetwork;

use cmd::{nft_script, run, stderr_contains};
use rules::Tables;

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";
/// Slots detached at once by [`Network::teardown`].
pub const TEARDOWN_PARALLEL: usize = 16;

/// Configuration of a [`Network`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// 1–6 characters `[a-z0-9]`; names everything this crate creates. Two instances on one
    /// host must use different prefixes and non-overlapping pools.
    pub prefix: String,
    /// Split into /30 slots. Default `10.88.0.0/16`.
    pub pool: Ipv4Net,
    /// Where the domain filter resolves allowed names and forwards allowed queries.
    pub nameservers: Vec<Ipv4Addr>,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            prefix: "sp".into(),
            pool: Ipv4Net {
                addr: Ipv4Addr::new(10, 88, 0, 0),
                prefix_len: 16,
            },
            nameservers: Vec::new(),
        }
    }
}

/// Names and addresses of one slot. Pure function of the configuration and the slot number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotAddrs {
    /// `<prefix>-<slot>`.
    pub netns_name: String,
    /// `/var/run/netns/<prefix>-<slot>`.
    pub netns_path: PathBuf,
    /// `<prefix>h<slot>`, in the root namespace.
    pub host_if: String,
    /// `<prefix>s<slot>`, inside the slot's namespace.
    pub sandbox_if: String,
    /// Slot base + 1: the sandbox's gateway.
    pub host_ip: Ipv4Addr,
    /// Slot base + 2.
    pub sandbox_ip: Ipv4Addr,
    /// Always 30.
    pub prefix_len: u8,
}

/// Sandbox networking of one server instance.
#[derive(Debug, Clone)]
pub struct Network {
    cfg: NetConfig,
    tables: Tables,
    capacity: u32,
    /// Every connection the host makes for a sandbox or a tenant (the domain filter here;
    /// pulls through [`Network::dialer`]).
    dialer: Dialer,
    /// Started by [`Network::init`].
    filter: Arc<OnceLock<Arc<domains::DomainFilter>>>,
}

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;
const SLOT_PREFIX_LEN: u8 = 30;

impl Network {
    /// Validates the prefix and the pool; touches nothing on the host.
    pub fn new(cfg: NetConfig) -> Result<Self, NetError> {
        let prefix = &cfg.prefix;
        let bad_prefix = |reason: &str| NetError::InvalidPrefix {
            prefix: prefix.clone(),
            reason: reason.into(),
        };
        if prefix.is_empty() || prefix.len() > 6 {
            return Err(bad_prefix("must be 1 to 6 characters long"));
        }
        if !prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(bad_prefix("only a-z and 0-9 are allowed"));
        }
        let pool = Ipv4Net::new(cfg.pool.addr, cfg.pool.prefix_len)?;
        let bad_pool = |reason: &str| NetError::InvalidPool {
            pool: pool.to_string(),
            reason: reason.into(),
        };
        if !(8..=SLOT_PREFIX_LEN).contains(&pool.prefix_len) {
            return Err(bad_pool("prefix length must be between /8 and /30"));
        }
        for (reserved, what) in [
            ("0.0.0.0/8", "the 0.0.0.0/8 range"),
            ("127.0.0.0/8", "loopback"),
            ("169.254.0.0/16", "link-local addresses"),
            ("224.0.0.0/3", "multicast and reserved addresses"),
        ] {
            let reserved: Ipv4Net = reserved.parse().expect("valid constant");
            if reserved.overlaps(&pool) {
                return Err(bad_pool(&format!("overlaps {what}")));
            }
        }
        let capacity = 1u32 << (SLOT_PREFIX_LEN - pool.prefix_len);
        let longest = format!("{prefix}h{}", capacity - 1);
        if longest.len() > MAX_IFNAME {
            return Err(bad_pool(
                "too many slots for interface names of 15 characters",
            ));
        }
        let tables = Tables {
            table: format!("sandpit_{prefix}"),
            pool,
        };
        Ok(Self {
            cfg: NetConfig {
                prefix: prefix.clone(),
                pool,
                nameservers: cfg.nameservers.clone(),
            },
            tables,
            capacity,
            dialer: Dialer::new(pool, cfg.nameservers.clone()),
            filter: Arc::default(),
        })
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// The dialer for connections the host makes on a tenant's behalf: it knows this
    /// instance's pool and the host's addresses (see [`dial`]). Add the operator's exceptions
    /// for pulls with [`Dialer::with_exceptions`].
    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    /// The nftables table (family `inet`) this instance owns.
    pub fn table_name(&self) -> &str {
        &self.tables.table
    }

    /// Number of /30 slots in the pool; slots are `0..capacity`.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Names and addresses of `slot`: base = pool + 4 × slot, host .1, sandbox .2.
    ///
    /// # Panics
    /// If `slot >= capacity()`.
    pub fn addrs(&self, slot: u32) -> SlotAddrs {
        assert!(
            slot < self.capacity,
            "slot {slot} outside the pool (capacity {})",
            self.capacity
        );
        let base = u32::from(self.cfg.pool.network()) + 4 * slot;
        let p = &self.cfg.prefix;
        let netns_name = format!("{p}-{slot}");
        SlotAddrs {
            netns_path: Path::new(NETNS_DIR).join(&netns_name),
            netns_name,
            host_if: format!("{p}h{slot}"),
            sandbox_if: format!("{p}s{slot}"),
            host_ip: Ipv4Addr::from(base + 1),
            sandbox_ip: Ipv4Addr::from(base + 2),
            prefix_len: SLOT_PREFIX_LEN,
        }
    }

    /// Creates (or refreshes) the nftables table with its base chains, and enables IPv4
    /// forwarding. Idempotent; existing slot chains are kept.
    pub async fn init(&self) -> Result<(), NetError> {
        let key = "net.ipv4.ip_forward";
        tokio::fs::write("/proc/sys/net/ipv4/ip_forward", b"1\n")
            .await
            .map_err(|source| NetError::Sysctl {
                key: key.into(),
                source,
            })?;
        let filter = match self.filter.get() {
            Some(f) => f.clone(),
            None => {
                let f =
                    domains::DomainFilter::start(self.dialer.clone(), self.cfg.nameservers.clone())
                        .await?;
                self.filter.get_or_init(|| f).clone()
            }
        };
        let ports = rules::FilterPorts {
            tcp: filter.tcp_port,
            dns: filter.dns_port,
        };
        nft_script(&self.tables.init_script(ports)).await?;
        tracing::debug!(table = %self.tables.table, "nftables table ready");
        Ok(())
    }

    /// Creates the slot's namespace and veth pair, addresses and routes, and its egress rules.
    /// The nft rules go in first, so the veth never exists unfiltered. On failure everything
    /// done so far is undone. Fails with [`NetError::SlotBusy`] if anything of the slot exists
    /// already (call [`Network::detach`] first to clear leftovers).
    pub async fn attach(&self, slot: u32, rules: &EgressRules) -> Result<SlotAddrs, NetError> {
        self.check_slot(slot)?;
        rules.validate()?;
        let a = self.addrs(slot);
        if a.netns_path.exists() {
            return Err(NetError::SlotBusy {
                slot,
                what: format!("network namespace {}", a.netns_name),
            });
        }
        for ifname in [&a.host_if, &a.sandbox_if] {
            if link_exists(ifname)? {
                return Err(NetError::SlotBusy {
                    slot,
                    what: format!("interface {ifname}"),
                });
            }
        }
        let mut done = Done::default();
        match self.attach_steps(slot, &a, rules, &mut done).await {
            Ok(()) => {
                tracing::debug!(slot, netns = %a.netns_name, ip = %a.sandbox_ip, "slot attached");
                Ok(a)
            }
            Err(e) => {
                self.undo(slot, &a, &done).await;
                Err(e)
            }
        }
    }

    /// Three commands, not one per step (each costs a process): the nft transaction (which
    /// also refuses a slot whose chain exists, and a missing table), then one `ip` batch in
    /// the root namespace and one inside the slot's.
    async fn attach_steps(
        &self,
        slot: u32,
        a: &SlotAddrs,
        rules: &EgressRules,
        done: &mut Done,
    ) -> Result<(), NetError> {
        match nft_script(&self.tables.attach_script(slot, &a.host_if, rules)).await {
            Ok(_) => {}
            Err(e) if stderr_contains(&e, "File exists") => {
                return Err(NetError::SlotBusy {
                    slot,
                    what: format!("nft chain {}", Tables::slot_chain(slot)),
                });
            }
            Err(e) if stderr_contains(&e, "No such file or directory") => {
                return Err(NetError::NotInitialized {
                    table: self.tables.table.clone(),
                });
            }
            Err(e) => return Err(e),
        }
        done.nft = true;
        // The domain filter learns the rules before the veth exists.
        self.remember(slot, Some(rules))?;
        // From here on a failure may have left any prefix of the batch done: undo checks.
        done.links = true;
        ip_batch(None, &host_side_batch(a)).await?;
        ip_batch(Some(&a.netns_name), &sandbox_side_batch(a)).await?;
        Ok(())
    }

    async fn undo(&self, slot: u32, a: &SlotAddrs, done: &Done) {
        if done.nft {
            let _ = self.remember(slot, None);
        }
        if done.links
            && let Err(e) = remove_links(a).await
        {
            tracing::warn!(slot, error = %e, "rollback: deleting the veth and namespace");
        }
        if done.nft
            && let Err(e) = nft_script(&self.tables.detach_script(slot, &a.host_if)).await
        {
            tracing::warn!(slot, error = %e, "rollback: removing nft rules");
        }
    }

    /// Replaces the slot's egress rules in one nftables transaction; applies to the running
    /// sandbox at once (established flows included: their next packet meets the new rules).
    pub async fn set_egress(&self, slot: u32, rules: &EgressRules) -> Result<(), NetError> {
        self.check_slot(slot)?;
        rules.validate()?;
        self.remember(slot, Some(rules))?;
        let host_if = self.addrs(slot).host_if;
        match nft_script(&self.tables.replace_script(slot, &host_if, rules)).await {
            Err(e) if stderr_contains(&e, "No such file or directory") => {
                Err(NetError::NotAttached {
                    slot,
                    chain: Tables::slot_chain(slot),
                })
            }
            other => other.map(drop),
        }
    }

    /// Puts the sandbox address and default route back on the in-namespace interface. runsc
    /// moves them into its netstack and removes them from the interface, so call this before
    /// every restore — never while a sandbox runs in the namespace.
    pub async fn reapply_addr(&self, slot: u32) -> Result<(), NetError> {
        self.check_slot(slot)?;
        let a = self.addrs(slot);
        ip_batch(Some(&a.netns_name), &readdress_batch(&a))
            .await
            .map(drop)
    }

    /// Removes the slot's veth pair, namespace and rules, whichever exist. Idempotent.
    pub async fn detach(&self, slot: u32) -> Result<(), NetError> {
        self.check_slot(slot)?;
        let a = self.addrs(slot);
        remove_links(&a).await?;
        match nft_script(&self.tables.detach_script(slot, &a.host_if)).await {
            Ok(_) => {}
            // The table is gone (and with it every slot's rules), or never was.
            Err(e)
                if stderr_contains(&e, "No such file or directory")
                    && !self.table_exists().await? => {}
            Err(e) => return Err(e),
        }
        self.remember(slot, None)?;
        tracing::debug!(slot, "slot detached");
        Ok(())
    }

    /// Slots with anything left of them: a namespace, a veth (host or sandbox side in the root
    /// namespace) or an nft chain. For reconciliation after a crash.
    pub async fn list_slots(&self) -> Result<Vec<u32>, NetError> {
        let mut slots = BTreeSet::new();
        match std::fs::read_dir(NETNS_DIR) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    if let Some(slot) = entry.file_name().to_str().and_then(|n| self.parse_netns(n))
                    {
                        slots.insert(slot);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(NetError::Read {
                    path: NETNS_DIR.into(),
                    source,
                });
            }
        }
        let links = run("ip", &["-j", "link", "show"], None).await?;
        let links: serde_json::Value =
            serde_json::from_str(&links).map_err(|source| NetError::Output {
                command: "ip -j link show".into(),
                source,
            })?;
        for link in links.as_array().into_iter().flatten() {
            if let Some(slot) = link["ifname"].as_str().and_then(|n| self.parse_ifname(n)) {
                slots.insert(slot);
            }
        }
        for chain in self.chains().await? {
            if let Some(slot) = parse_chain(&chain) {
                slots.insert(slot);
            }
        }
        Ok(slots.into_iter().filter(|s| *s < self.capacity).collect())
    }

    /// Detaches every slot found by [`Network::list_slots`] and deletes the nftables table.
    /// The table goes first, whole (one transaction, where detaching would edit it once per
    /// slot); then the slots' veths and namespaces, [`TEARDOWN_PARALLEL`] at a time.
    pub async fn teardown(&self) -> Result<(), NetError> {
        use futures::StreamExt;
        let mut first_err = None;
        let slots = self.list_slots().await?;
        if self.table_exists().await? {
            let script = format!("delete table inet {}\n", self.tables.table);
            if let Err(e) = nft_script(&script).await {
                first_err.get_or_insert(e);
            }
        }
        let mut detached = futures::stream::iter(slots)
            .map(|slot| async move { (slot, self.detach(slot).await) })
            .buffer_unordered(TEARDOWN_PARALLEL);
        while let Some((slot, r)) = detached.next().await {
            if let Err(e) = r {
                tracing::warn!(slot, error = %e, "teardown: detach failed");
                first_err.get_or_insert(e);
            }
        }
        drop(detached);
        first_err.map_or(Ok(()), Err)
    }

    /// Takes over a slot attached by an earlier process (its namespace and nft rules
    /// survived): only this process's domain filter has to learn its rules. No host changes.
    pub fn adopt(&self, slot: u32, rules: &EgressRules) -> Result<(), NetError> {
        self.check_slot(slot)?;
        self.remember(slot, Some(rules))
    }

    /// Gives the slot's sandbox its secrets (`None`: takes them away): the proxy learns them,
    /// then its veth joins `secret_veths`, whose TCP 80 and 443 go to the proxy (see
    /// [`secrets`]). Idempotent; the slot must be attached. Detach forgets them too.
    pub async fn set_secrets(
        &self,
        slot: u32,
        binding: Option<Arc<secrets::SecretsBinding>>,
    ) -> Result<(), NetError> {
        self.check_slot(slot)?;
        let a = self.addrs(slot);
        let Some(filter) = self.filter.get() else {
            return Err(NetError::NotInitialized {
                table: self.tables.table.clone(),
            });
        };
        let member = binding.is_some();
        if member {
            filter.set_secrets(a.sandbox_ip, binding);
        }
        nft_script(&self.tables.secret_member(&a.host_if, member)).await?;
        if !member {
            filter.set_secrets(a.sandbox_ip, None);
        }
        Ok(())
    }

    /// Tells the domain filter the slot's rules (`None`: forget the slot).
    fn remember(&self, slot: u32, rules: Option<&EgressRules>) -> Result<(), NetError> {
        let addr = self.addrs(slot).sandbox_ip;
        match self.filter.get() {
            Some(f) => f.set(addr, rules),
            None if rules.is_some_and(EgressRules::uses_domains) => {
                return Err(NetError::NotInitialized {
                    table: self.tables.table.clone(),
                });
            }
            None => {}
        }
        Ok(())
    }

    fn check_slot(&self, slot: u32) -> Result<(), NetError> {
        if slot >= self.capacity {
            return Err(NetError::SlotOutOfRange {
                slot,
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    /// Whether our table exists: `nft list tables` prints names only, where listing the
    /// table would print every slot's chain.
    async fn table_exists(&self) -> Result<bool, NetError> {
        let out = run("nft", &["list", "tables"], None).await?;
        let wanted = format!("table inet {}", self.tables.table);
        Ok(out.lines().any(|l| l.trim() == wanted))
    }

    /// Names of the chains of our table (empty if it does not exist).
    async fn chains(&self) -> Result<Vec<String>, NetError> {
        let command = format!("nft -j list table inet {}", self.tables.table);
        let out = match run(
            "nft",
            &["-j", "list", "table", "inet", &self.tables.table],
            None,
        )
        .await
        {
            Ok(out) => out,
            Err(e) if stderr_contains(&e, "No such file or directory") => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let v: serde_json::Value =
            serde_json::from_str(&out).map_err(|source| NetError::Output { command, source })?;
        Ok(v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| item["chain"]["name"].as_str().map(str::to_string))
            .collect())
    }

    fn parse_netns(&self, name: &str) -> Option<u32> {
        parse_number(name.strip_prefix(&self.cfg.prefix)?.strip_prefix('-')?)
    }

    fn parse_ifname(&self, name: &str) -> Option<u32> {
        let rest = name.strip_prefix(&self.cfg.prefix)?;
        let digits = rest.strip_prefix('h').or_else(|| rest.strip_prefix('s'))?;
        parse_number(digits)
    }
}

/// What [`Network::attach`] has done so far, for rollback.
#[derive(Debug, Default)]
struct Done {
    nft: bool,
    /// The namespace and veth pair may exist (in part).
    links: bool,
}

/// `slot_<n>` → n.
fn parse_chain(name: &str) -> Option<u32> {
    parse_number(name.strip_prefix("slot_")?)
}

/// A decimal number exactly as `format!("{n}")` writes it (no sign, no leading zeros).
fn parse_number(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// Whether the root namespace (the server's) has an interface `ifname`: one `ioctl`, no
/// process.
fn link_exists(ifname: &str) -> Result<bool, NetError> {
    use rustix::net::{AddressFamily, SocketType, netdevice};
    let io = |source: rustix::io::Errno| NetError::Read {
        path: format!("interface {ifname}").into(),
        source: source.into(),
    };
    let sock = rustix::net::socket(AddressFamily::INET, SocketType::DGRAM, None).map_err(io)?;
    match netdevice::name_to_index(&sock, ifname) {
        Ok(_) => Ok(true),
        Err(rustix::io::Errno::NODEV) => Ok(false),
        Err(e) => Err(io(e)),
    }
}

/// Removes the slot's veth pair and namespace, whichever exist: one `ip` batch. Deleting
/// the host side removes its peer too; the sandbox side is only found in the root
/// namespace if an earlier attach died between creating and moving it.
async fn remove_links(a: &SlotAddrs) -> Result<(), NetError> {
    let mut lines = Vec::new();
    for ifname in [&a.host_if, &a.sandbox_if] {
        if link_exists(ifname)? {
            lines.push(format!("link del {ifname}"));
        }
    }
    if a.netns_path.exists() {
        lines.push(format!("netns del {}", a.netns_name));
    }
    if lines.is_empty() {
        return Ok(());
    }
    match ip_batch(None, &lines).await {
        Ok(_) => Ok(()),
        // Something went away meanwhile (a concurrent detach): one at a time, tolerating
        // what is gone.
        Err(e)
            if stderr_contains(&e, "Cannot find device")
                || stderr_contains(&e, "No such file or directory") =>
        {
            for line in lines {
                let args: Vec<&str> = line.split(' ').collect();
                match run("ip", &args, None).await {
                    Err(e)
                        if stderr_contains(&e, "Cannot find device")
                            || stderr_contains(&e, "No such file or directory") => {}
                    other => other.map(drop)?,
                }
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Root-namespace half of an attach: the namespace, the veth pair (its sandbox side created
/// inside the namespace), the host side's address, up.
fn host_side_batch(a: &SlotAddrs) -> Vec<String> {
    vec![
        format!("netns add {}", a.netns_name),
        format!(
            "link add {} type veth peer name {} netns {}",
            a.host_if, a.sandbox_if, a.netns_name
        ),
        format!("addr add {}/{} dev {}", a.host_ip, a.prefix_len, a.host_if),
        format!("link set {} up", a.host_if),
    ]
}

/// In-namespace half of an attach: loopback up, then the sandbox's address and route.
fn sandbox_side_batch(a: &SlotAddrs) -> Vec<String> {
    let mut lines = vec!["link set lo up".to_string()];
    lines.extend(readdress_batch(a));
    lines
}

/// The sandbox's address, link and default route, replaced (idempotent).
fn readdress_batch(a: &SlotAddrs) -> Vec<String> {
    vec![
        format!(
            "addr replace {}/{} dev {}",
            a.sandbox_ip, a.prefix_len, a.sandbox_if
        ),
        format!("link set {} up", a.sandbox_if),
        format!(
            "route replace default via {} dev {}",
            a.host_ip, a.sandbox_if
        ),
    ]
}

/// Runs `lines` as one `ip -batch -` (in namespace `netns` if given); stops at the first
/// failing line.
async fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<String, NetError> {
    let mut args = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    let script = lines.join("\n") + "\n";
    run("ip", &args, Some(&script)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(prefix: &str, pool: &str) -> Result<Network, NetError> {
        Network::new(NetConfig {
            prefix: prefix.into(),
            pool: pool.parse().unwrap(),
            nameservers: Vec::new(),
        })
    }

    #[test]
    fn slot_addresses() {
        let n = net("sp", "10.88.0.0/16").unwrap();
        assert_eq!(n.capacity(), 16384);
        let a = n.addrs(0);
        assert_eq!(a.host_ip, Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(a.sandbox_ip, Ipv4Addr::new(10, 88, 0, 2));
        assert_eq!(a.prefix_len, 30);
        let a = n.addrs(70);
        assert_eq!(a.host_ip, Ipv4Addr::new(10, 88, 1, 25));
        assert_eq!(a.sandbox_ip, Ipv4Addr::new(10, 88, 1, 26));
        assert_eq!(a.netns_name, "sp-70");
        assert_eq!(a.netns_path, PathBuf::from("/var/run/netns/sp-70"));
        assert_eq!(a.host_if, "sph70");
        assert_eq!(a.sandbox_if, "sps70");
        let last = n.addrs(16383);
        assert_eq!(last.sandbox_ip, Ipv4Addr::new(10, 88, 255, 254));
        assert_eq!(n.table_name(), "sandpit_sp");
    }

    #[test]
    #[should_panic(expected = "outside the pool")]
    fn addrs_out_of_range_panics() {
        net("sp", "10.88.0.0/24").unwrap().addrs(64);
    }

    #[test]
    fn pool_host_bits_are_masked() {
        let n = net("sp", "10.88.7.9/24").unwrap();
        assert_eq!(n.config().pool.to_string(), "10.88.7.0/24");
        assert_eq!(n.capacity(), 64);
        assert_eq!(n.addrs(1).sandbox_ip, Ipv4Addr::new(10, 88, 7, 6));
    }

    #[test]
    fn validation() {
        assert!(matches!(
            net("", "10.88.0.0/16"),
            Err(NetError::InvalidPrefix { .. })
        ));
        assert!(matches!(
            net("toolong", "10.88.0.0/16"),
            Err(NetError::InvalidPrefix { .. })
        ));
        assert!(matches!(
            net("Ab", "10.88.0.0/16"),
            Err(NetError::InvalidPrefix { .. })
        ));
        assert!(matches!(
            net("a-b", "10.88.0.0/16"),
            Err(NetError::InvalidPrefix { .. })
        ));
        assert!(matches!(
            net("sp", "10.88.0.0/31"),
            Err(NetError::InvalidPool { .. })
        ));
        assert!(matches!(
            net("sp", "10.0.0.0/7"),
            Err(NetError::InvalidPool { .. })
        ));
        assert!(matches!(
            net("sp", "127.0.0.0/16"),
            Err(NetError::InvalidPool { .. })
        ));
        assert!(matches!(
            net("sp", "169.254.0.0/24"),
            Err(NetError::InvalidPool { .. })
        ));
        assert!(net("abcdef", "10.0.0.0/8").is_ok());
        assert_eq!(net("a1", "192.168.5.0/30").unwrap().capacity(), 1);
        let e = net("abcdef", "10.0.0.0/8").unwrap();
        assert!(e.addrs(e.capacity() - 1).host_if.len() <= 15);
    }

    #[test]
    fn name_parsing() {
        let n = net("tn1", "10.88.0.0/16").unwrap();
        assert_eq!(n.parse_netns("tn1-5"), Some(5));
        assert_eq!(n.parse_netns("tn1-05"), None);
        assert_eq!(n.parse_netns("tn1-"), None);
        assert_eq!(n.parse_netns("tn-5"), None);
        assert_eq!(n.parse_netns("tn12-5"), None);
        assert_eq!(n.parse_ifname("tn1h12"), Some(12));
        assert_eq!(n.parse_ifname("tn1s0"), Some(0));
        assert_eq!(n.parse_ifname("tn1x0"), None);
        assert_eq!(n.parse_ifname("tn1hh1"), None);
        assert_eq!(n.parse_ifname("eth0"), None);
        assert_eq!(parse_chain("slot_9"), Some(9));
        assert_eq!(parse_chain("forward"), None);
        assert_eq!(parse_number("+1"), None);
    }

    #[tokio::test]
    async fn slot_checks_before_touching_the_host() {
        let n = net("sp", "10.88.0.0/30").unwrap();
        assert!(matches!(
            n.detach(1).await,
            Err(NetError::SlotOutOfRange {
                slot: 1,
                capacity: 1
            })
        ));
        let bad = EgressRules {
            allow_ports: vec![0],
            ..Default::default()
        };
        assert!(matches!(
            n.set_egress(0, &bad).await,
            Err(NetError::InvalidRules { .. })
        ));
    }
}
