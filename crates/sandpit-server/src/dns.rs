//! The `/etc/resolv.conf` written into every new sandbox: the host's upstream nameservers
//! (or the configured ones), never a loopback resolver, which a sandbox cannot reach.
//!
//! The nameservers are ordinary destinations of the egress policy: under `deny_all` a query
//! to them is rejected like any other packet unless `allow_cidrs` lets it through, so a
//! resolver cannot become an exfiltration channel the policy does not see.
#![expect(
    clippy::disallowed_methods,
    reason = "the host's resolver configuration"
)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

/// Where the host's resolver configuration is read from, in order. The second is
/// systemd-resolved's list of upstream servers, for hosts whose `/etc/resolv.conf` names
/// only its stub listener 127.0.0.53.
pub const HOST_RESOLV_CONFS: &[&str] = &["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"];

/// The nameservers sandboxes use: `configured` when given, otherwise the first host file in
/// [`HOST_RESOLV_CONFS`] that names an IPv4 nameserver outside loopback.
pub fn sandbox_nameservers(configured: Option<&[Ipv4Addr]>) -> Vec<Ipv4Addr> {
    if let Some(list) = configured {
        return list.to_vec();
    }
    for path in HOST_RESOLV_CONFS {
        let Ok(text) = std::fs::read_to_string(Path::new(path)) else {
            continue;
        };
        let found = usable_nameservers(&text);
        if !found.is_empty() {
            return found;
        }
    }
    Vec::new()
}

/// IPv4 `nameserver` entries of a resolv.conf that a sandbox can reach: not loopback, not
/// link-local or unspecified (always blocked by the egress rules). IPv6 entries are skipped:
/// sandboxes have no IPv6 egress yet.
pub fn usable_nameservers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|addr| match addr.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) if !a.is_loopback() && !a.is_link_local() && !a.is_unspecified() => {
                Some(a)
            }
            _ => None,
        })
        .collect()
}

/// The file's contents for these nameservers.
pub fn resolv_conf(nameservers: &[Ipv4Addr]) -> String {
    if nameservers.is_empty() {
        return "# sandpit: the host has no resolver a sandbox can reach (only loopback ones,\n\
                # e.g. systemd-resolved's 127.0.0.53); start the server with --dns <addr>\n"
            .to_string();
    }
    let mut out = String::from("# written by sandpit; queries follow the egress policy\n");
    for ns in nameservers {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_reachable_ipv4_nameservers() {
        let conf = "# generated\nnameserver 127.0.0.53\nnameserver 10.255.255.53\n\
                    nameserver ::1\nnameserver 2001:db8::1\nnameserver 169.254.169.253\n\
                    search example.com\n nameserver 192.0.2.9 \nnameserverx 1.1.1.1\n";
        assert_eq!(
            usable_nameservers(conf),
            vec![Ipv4Addr::new(10, 255, 255, 53), Ipv4Addr::new(192, 0, 2, 9)]
        );
        assert!(usable_nameservers("nameserver 127.0.0.53\noptions edns0\n").is_empty());
    }

    #[test]
    fn configured_list_wins_and_renders() {
        let list = [Ipv4Addr::new(10, 0, 0, 2)];
        assert_eq!(sandbox_nameservers(Some(&list)), list.to_vec());
        assert!(resolv_conf(&list).ends_with("nameserver 10.0.0.2\n"));
        assert!(resolv_conf(&[]).starts_with('#'));
        assert!(!resolv_conf(&[]).contains("\nnameserver"));
    }
}
