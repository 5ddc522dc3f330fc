//! Egress policy and the nftables scripts that enforce it (pure text generation).
//!
//! Everything lives in one `inet` table per [`crate::Network`] (`sandpit_<prefix>`):
//!
//! - set `veths` (`ifname`): the host-side veth of every attached slot;
//! - map `slots` (`ifname : verdict`): host-side veth → `goto slot_<n>`;
//! - chain `deny`: rejects TCP with a reset, everything else with ICMP admin-prohibited;
//! - base chain `forward`: packets from a veth go to their slot's chain (`iifname vmap @slots`);
//!   anything else from a veth is dropped; towards a veth only replies are let through;
//! - base chain `input`: from a veth only `ct state established,related` reaches the host (the
//!   host opens connections to the agent; sandboxes never open connections to the host);
//! - base chain `postrouting` (nat): pool sources leaving through a non-veth interface are
//!   masqueraded;
//! - chain `slot_<n>` per slot: the slot's policy, replaced atomically by `flush` + `add`;
//! - sets `domain_veths` (slots whose policy lists domains: TCP 80/443 and UDP 53 go to the
//!   domain filter) and `secret_veths` (slots holding secrets: TCP 80/443 go to the same
//!   listener, which intercepts TLS for the secrets' hosts, see [`crate::secrets`]).

use serde::{Deserialize, Serialize};

use crate::{Ipv4Net, NetError};

/// Outbound policy of one sandbox (the `/v1/sandboxes` egress semantics).
///
/// `deny_cidrs` are rejected first. Then `allow_all` accepts everything else; otherwise only
/// destinations in `allow_cidrs` are accepted, and when `allow_ports` is non-empty only TCP to
/// those destination ports (UDP and ICMP to the allowed CIDRs are then rejected too).
/// `allow_ports` has no effect with `allow_all`. The always-denied set is rejected whatever the
/// policy says, however wide its `allow_cidrs`: the fixed ranges of
/// [`crate::dial::ALWAYS_DENIED_V4`] (unspecified, loopback, link-local with the metadata
/// service, multicast, reserved and broadcast) and the address pool (other sandboxes) in each
/// slot chain, the host itself in the `input` chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRules {
    pub allow_all: bool,
    #[serde(default)]
    pub allow_cidrs: Vec<Ipv4Net>,
    #[serde(default)]
    pub deny_cidrs: Vec<Ipv4Net>,
    #[serde(default)]
    pub allow_ports: Vec<u16>,
    /// Names (`example.com`) and wildcards (`*.example.com`) whose web traffic (TCP 80 and
    /// 443, named by TLS SNI or HTTP `Host`) and DNS queries pass, checked on the connection
    /// (see [`crate::domains`]). Without `allow_all` only; normalized by
    /// [`crate::sniff::normalize_pattern`].
    #[serde(default)]
    pub allow_domains: Vec<String>,
}

impl EgressRules {
    /// Everything allowed (apart from what is always blocked).
    pub fn allow_all() -> Self {
        Self {
            allow_all: true,
            ..Self::default()
        }
    }

    /// Nothing allowed.
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// Rejects port 0 and domain patterns that are not normalized.
    pub fn validate(&self) -> Result<(), NetError> {
        if self.allow_ports.contains(&0) {
            return Err(NetError::InvalidRules {
                reason: "port 0 in allow_ports".into(),
            });
        }
        for d in &self.allow_domains {
            if crate::sniff::normalize_pattern(d).as_deref() != Ok(d.as_str()) {
                return Err(NetError::InvalidRules {
                    reason: format!("{d:?} is not a normalized domain pattern"),
                });
            }
        }
        Ok(())
    }
}

/// The host ports of the domain filter's listeners (see [`crate::domains`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FilterPorts {
    pub tcp: u16,
    pub dns: u16,
}

/// Names of the nft objects of one [`crate::Network`].
#[derive(Debug, Clone)]
pub(crate) struct Tables {
    /// `sandpit_<prefix>`, family `inet`.
    pub table: String,
    pub pool: Ipv4Net,
}

impl Tables {
    pub fn slot_chain(slot: u32) -> String {
        format!("slot_{slot}")
    }

    /// The idempotent script that creates the table, its set, map and base chains. Base chains
    /// are flushed and refilled in the same transaction, so running it again is harmless.
    pub fn init_script(&self, filter: FilterPorts) -> String {
        let t = format!("inet {}", self.table);
        let pool = self.pool;
        let FilterPorts { tcp, dns } = filter;
        [
            format!("add table {t}"),
            format!("add set {t} veths {{ type ifname; }}"),
            format!("add set {t} domain_veths {{ type ifname; }}"),
            format!("add set {t} secret_veths {{ type ifname; }}"),
            format!("add map {t} slots {{ type ifname : verdict; }}"),
            format!("add chain {t} deny"),
            format!("flush chain {t} deny"),
            format!("add rule {t} deny meta l4proto tcp reject with tcp reset"),
            format!("add rule {t} deny reject with icmpx type admin-prohibited"),
            format!(
                "add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}"
            ),
            format!("flush chain {t} forward"),
            format!("add rule {t} forward iifname vmap @slots"),
            format!("add rule {t} forward iifname @veths drop"),
            format!("add rule {t} forward oifname @veths ct state established,related accept"),
            format!("add rule {t} forward oifname @veths drop"),
            format!(
                "add chain {t} input {{ type filter hook input priority filter; policy accept; }}"
            ),
            format!("flush chain {t} input"),
            format!("add rule {t} input iifname @veths ct state established,related accept"),
            format!(
                "add rule {t} input iifname @domain_veths ct status dnat tcp dport {tcp} accept"
            ),
            format!(
                "add rule {t} input iifname @domain_veths ct status dnat udp dport {dns} accept"
            ),
            format!(
                "add rule {t} input iifname @secret_veths ct status dnat tcp dport {tcp} accept"
            ),
            format!("add rule {t} input iifname @veths goto deny"),
            format!(
                "add chain {t} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}"
            ),
            format!("flush chain {t} prerouting"),
            format!(
                "add rule {t} prerouting iifname @domain_veths tcp dport {{ 80, 443 }} redirect to :{tcp}"
            ),
            format!("add rule {t} prerouting iifname @domain_veths udp dport 53 redirect to :{dns}"),
            format!(
                "add rule {t} prerouting iifname @secret_veths tcp dport {{ 80, 443 }} redirect to :{tcp}"
            ),
            format!(
                "add chain {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}"
            ),
            format!("flush chain {t} postrouting"),
            format!("add rule {t} postrouting ip saddr {pool} oifname != @veths masquerade"),
        ]
        .join("\n")
            + "\n"
    }

    /// The rules of a slot chain (without the chain creation/flush).
    pub fn slot_rules(&self, slot: u32, rules: &EgressRules) -> Vec<String> {
        let t = format!("inet {}", self.table);
        let chain = Self::slot_chain(slot);
        // The sandbox's own address: what a sandbox sends with any other source (it has raw
        // sockets, for ping) is dropped, so it cannot pose as a neighbour.
        let own = std::net::Ipv4Addr::from(u32::from(self.pool.network()) + 4 * slot + 2);
        let mut body = vec![
            "meta nfproto ipv6 drop".to_string(),
            format!("ip saddr != {own} drop"),
            format!("ip daddr {} goto deny", cidr_set(&fixed_denied())),
            format!("ip daddr {} goto deny", self.pool),
        ];
        let deny = normalize_cidrs(&rules.deny_cidrs);
        if !deny.is_empty() {
            body.push(format!("ip daddr {} goto deny", cidr_set(&deny)));
        }
        if rules.allow_all {
            body.push("accept".into());
        } else {
            let allow = normalize_cidrs(&rules.allow_cidrs);
            if !allow.is_empty() {
                let mut ports = rules.allow_ports.clone();
                ports.sort_unstable();
                ports.dedup();
                if ports.is_empty() {
                    body.push(format!("ip daddr {} accept", cidr_set(&allow)));
                } else {
                    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                    body.push(format!(
                        "ip daddr {} tcp dport {{ {} }} accept",
                        cidr_set(&allow),
                        ports.join(", ")
                    ));
                }
            }
            body.push("goto deny".into());
        }
        body.into_iter()
            .map(|r| format!("add rule {t} {chain} {r}"))
            .collect()
    }

    /// Puts the veth in or takes it out of the domain-filtered set (adding first, so the
    /// delete never fails on a missing element).
    fn domain_member(&self, host_if: &str, rules: Option<&EgressRules>) -> Vec<String> {
        let t = format!("inet {}", self.table);
        let mut lines = vec![format!("add element {t} domain_veths {{ \"{host_if}\" }}")];
        if !rules.is_some_and(EgressRules::uses_domains) {
            lines.push(format!(
                "delete element {t} domain_veths {{ \"{host_if}\" }}"
            ));
        }
        lines
    }

    /// Puts the veth in (`true`) or takes it out of the set of slots holding secrets.
    pub fn secret_member(&self, host_if: &str, member: bool) -> String {
        let t = format!("inet {}", self.table);
        let mut lines = vec![format!("add element {t} secret_veths {{ \"{host_if}\" }}")];
        if !member {
            lines.push(format!(
                "delete element {t} secret_veths {{ \"{host_if}\" }}"
            ));
        }
        lines.join("\n") + "\n"
    }

    /// Creates the slot's chain with its rules and registers its veth: one transaction.
    /// Fails if the chain exists already or the table does not.
    pub fn attach_script(&self, slot: u32, host_if: &str, rules: &EgressRules) -> String {
        let t = format!("inet {}", self.table);
        let chain = Self::slot_chain(slot);
        // `create` fails if the chain exists (the slot is busy) or the table does not.
        let mut lines = vec![format!("create chain {t} {chain}")];
        lines.extend(self.slot_rules(slot, rules));
        lines.extend(self.domain_member(host_if, Some(rules)));
        lines.push(format!("add element {t} veths {{ \"{host_if}\" }}"));
        lines.push(format!(
            "add element {t} slots {{ \"{host_if}\" : goto {chain} }}"
        ));
        lines.join("\n") + "\n"
    }

    /// Replaces the slot's rules: one transaction, so no packet sees a half-written policy.
    /// Fails if the chain does not exist.
    pub fn replace_script(&self, slot: u32, host_if: &str, rules: &EgressRules) -> String {
        let t = format!("inet {}", self.table);
        let chain = Self::slot_chain(slot);
        let mut lines = vec![format!("flush chain {t} {chain}")];
        lines.extend(self.slot_rules(slot, rules));
        lines.extend(self.domain_member(host_if, Some(rules)));
        lines.join("\n") + "\n"
    }

    /// Removes the slot's chain and elements whether or not they exist (nft 1.0.6 has no
    /// `destroy`: add them first, which is a no-op when present, then delete).
    pub fn detach_script(&self, slot: u32, host_if: &str) -> String {
        let t = format!("inet {}", self.table);
        let chain = Self::slot_chain(slot);
        [
            format!("add chain {t} {chain}"),
            format!("add element {t} veths {{ \"{host_if}\" }}"),
            format!("add element {t} slots {{ \"{host_if}\" : goto {chain} }}"),
            format!("add element {t} domain_veths {{ \"{host_if}\" }}"),
            format!("delete element {t} domain_veths {{ \"{host_if}\" }}"),
            format!("add element {t} secret_veths {{ \"{host_if}\" }}"),
            format!("delete element {t} secret_veths {{ \"{host_if}\" }}"),
            format!("delete element {t} slots {{ \"{host_if}\" }}"),
            format!("delete element {t} veths {{ \"{host_if}\" }}"),
            format!("flush chain {t} {chain}"),
            format!("delete chain {t} {chain}"),
        ]
        .join("\n")
            + "\n"
    }
}

/// Sorted, deduplicated, and without networks contained in another (nft rejects overlapping
/// intervals in anonymous sets).
pub(crate) fn normalize_cidrs(cidrs: &[Ipv4Net]) -> Vec<Ipv4Net> {
    let mut sorted: Vec<Ipv4Net> = cidrs.to_vec();
    sorted.sort_by_key(|n| (n.prefix_len, n.addr));
    let mut kept: Vec<Ipv4Net> = Vec::new();
    for n in sorted {
        if !kept.iter().any(|k| k.contains_net(&n)) {
            kept.push(n);
        }
    }
    kept.sort_by_key(|n| (n.addr, n.prefix_len));
    kept
}

/// The fixed ranges of the always-denied set (see [`crate::dial`]).
fn fixed_denied() -> Vec<Ipv4Net> {
    crate::dial::ALWAYS_DENIED_V4
        .iter()
        .map(|(n, _)| *n)
        .collect()
}

fn cidr_set(cidrs: &[Ipv4Net]) -> String {
    let items: Vec<String> = cidrs.iter().map(Ipv4Net::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> Tables {
        Tables {
            table: "sandpit_t1".into(),
            pool: "10.88.0.0/16".parse().unwrap(),
        }
    }

    fn nets(s: &[&str]) -> Vec<Ipv4Net> {
        s.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn allow_all_rules() {
        let r = tables().slot_rules(3, &EgressRules::allow_all());
        assert_eq!(
            r,
            vec![
                "add rule inet sandpit_t1 slot_3 meta nfproto ipv6 drop",
                "add rule inet sandpit_t1 slot_3 ip saddr != 10.88.0.14 drop",
                "add rule inet sandpit_t1 slot_3 ip daddr { 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/4, 240.0.0.0/4 } goto deny",
                "add rule inet sandpit_t1 slot_3 ip daddr 10.88.0.0/16 goto deny",
                "add rule inet sandpit_t1 slot_3 accept",
            ]
        );
    }

    #[test]
    fn deny_all_rules() {
        let r = tables().slot_rules(0, &EgressRules::deny_all());
        assert_eq!(
            r.last().unwrap(),
            "add rule inet sandpit_t1 slot_0 goto deny"
        );
        assert!(!r.iter().any(|l| l.ends_with(" accept")));
    }

    #[test]
    fn deny_before_allow_and_ports() {
        let rules = EgressRules {
            allow_all: false,
            allow_cidrs: nets(&["10.0.0.0/8", "1.2.3.4"]),
            deny_cidrs: nets(&["10.1.0.0/16"]),
            allow_ports: vec![443, 80, 443],
            allow_domains: Vec::new(),
        };
        let r = tables().slot_rules(7, &rules);
        let deny = r
            .iter()
            .position(|l| l.ends_with("ip daddr { 10.1.0.0/16 } goto deny"))
            .unwrap();
        let allow = r
            .iter()
            .position(|l| {
                l.ends_with("ip daddr { 1.2.3.4/32, 10.0.0.0/8 } tcp dport { 80, 443 } accept")
            })
            .unwrap();
        assert!(deny < allow);
        assert_eq!(
            r.last().unwrap(),
            "add rule inet sandpit_t1 slot_7 goto deny"
        );
    }

    #[test]
    fn allow_ports_ignored_with_allow_all_and_empty_allow_list_denies() {
        let rules = EgressRules {
            allow_all: true,
            allow_ports: vec![22],
            ..Default::default()
        };
        assert!(
            !tables()
                .slot_rules(1, &rules)
                .iter()
                .any(|l| l.contains("dport"))
        );
        let rules = EgressRules {
            allow_ports: vec![22],
            ..Default::default()
        };
        let r = tables().slot_rules(1, &rules);
        assert!(!r.iter().any(|l| l.contains("dport")));
        assert_eq!(
            r.last().unwrap(),
            "add rule inet sandpit_t1 slot_1 goto deny"
        );
    }

    /// However wide `allow_cidrs` are, the always-denied ranges and the pool are rejected
    /// before any accept.
    #[test]
    fn wide_allow_cidrs_never_accept_the_always_denied_set() {
        for allow in [
            &["0.0.0.0/0"][..],
            &["10.0.0.0/8", "128.0.0.0/1"],
            &["10.88.0.0/16"],
        ] {
            let rules = EgressRules {
                allow_cidrs: nets(allow),
                allow_ports: vec![80],
                ..EgressRules::deny_all()
            };
            let r = tables().slot_rules(4, &rules);
            let first_accept = r.iter().position(|l| l.ends_with(" accept")).unwrap();
            let denied = |what: &str| {
                r.iter()
                    .position(|l| l.contains(&format!("ip daddr {what} goto deny")))
                    .unwrap_or_else(|| panic!("no deny of {what}: {r:?}"))
            };
            let fixed = denied(&cidr_set(&fixed_denied()));
            let pool = denied("10.88.0.0/16");
            assert!(fixed < first_accept && pool < first_accept, "{r:?}");
        }
        let fixed: Vec<String> = fixed_denied().iter().map(|n| n.to_string()).collect();
        for range in [
            "0.0.0.0/8",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "224.0.0.0/4",
            "240.0.0.0/4",
        ] {
            assert!(fixed.contains(&range.to_string()), "{range}");
        }
    }

    #[test]
    fn normalize_removes_nested_and_duplicates() {
        let n = normalize_cidrs(&nets(&[
            "10.1.2.0/24",
            "10.0.0.0/8",
            "192.168.1.1",
            "10.0.0.0/8",
            "192.168.0.0/16",
            "8.8.8.8",
        ]));
        assert_eq!(n, nets(&["8.8.8.8/32", "10.0.0.0/8", "192.168.0.0/16"]));
    }

    #[test]
    fn scripts() {
        let t = tables();
        let init = t.init_script(FilterPorts {
            tcp: 4100,
            dns: 4101,
        });
        assert!(init.starts_with("add table inet sandpit_t1\n"));
        assert!(
            init.contains(
                "prerouting iifname @domain_veths tcp dport { 80, 443 } redirect to :4100"
            )
        );
        assert!(init.contains("prerouting iifname @domain_veths udp dport 53 redirect to :4101"));
        assert!(init.contains("input iifname @domain_veths ct status dnat tcp dport 4100 accept"));
        assert!(init.contains("forward iifname vmap @slots"));
        assert!(init.contains("input iifname @veths goto deny"));
        assert!(init.contains("ip saddr 10.88.0.0/16 oifname != @veths masquerade"));
        let a = t.attach_script(2, "t1h2", &EgressRules::allow_all());
        // `create`, not `add`: the transaction fails on a busy slot or a missing table.
        assert!(a.starts_with("create chain inet sandpit_t1 slot_2\nadd rule "));
        assert!(a.ends_with("add element inet sandpit_t1 slots { \"t1h2\" : goto slot_2 }\n"));
        assert!(a.contains("delete element inet sandpit_t1 domain_veths { \"t1h2\" }"));
        let r = t.replace_script(2, "t1h2", &EgressRules::deny_all());
        assert!(r.starts_with("flush chain inet sandpit_t1 slot_2\n"));
        let with_domains = EgressRules {
            allow_domains: vec!["example.com".into()],
            ..EgressRules::deny_all()
        };
        let r = t.replace_script(2, "t1h2", &with_domains);
        assert!(r.ends_with("add element inet sandpit_t1 domain_veths { \"t1h2\" }\n"));
        assert!(!r.contains("add chain"));
        let d = t.detach_script(2, "t1h2");
        assert!(d.ends_with("delete chain inet sandpit_t1 slot_2\n"));
    }

    #[test]
    fn validate_ports() {
        assert!(EgressRules::allow_all().validate().is_ok());
        let bad = EgressRules {
            allow_ports: vec![0],
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn rules_json() {
        let r: EgressRules =
            serde_json::from_str(r#"{"allow_all":false,"allow_cidrs":["10.0.0.0/8"]}"#).unwrap();
        assert_eq!(r.allow_cidrs, nets(&["10.0.0.0/8"]));
        assert!(r.deny_cidrs.is_empty() && r.allow_ports.is_empty());
    }
}
