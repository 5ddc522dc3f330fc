//! Listening TCP ports, read from `/proc/net/tcp` and `/proc/net/tcp6` (gVisor's netstack
//! provides both, in the Linux format).

use std::net::{Ipv4Addr, Ipv6Addr};

use sandpit_agent_proto::{AgentError, AgentErrorCode, ListeningPort, PortList};

use crate::conn::agent_error;

/// The kernel's socket state code for LISTEN.
const TCP_LISTEN: &str = "0A";

/// Every listening TCP socket of the sandbox.
pub async fn list() -> Result<PortList, AgentError> {
    let mut ports = Vec::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        match tokio::fs::read_to_string(path).await {
            Ok(text) => ports.extend(parse(&text, v6)),
            // A sandbox without IPv6 may have no tcp6 table.
            Err(e) if v6 && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(agent_error(
                    AgentErrorCode::Io,
                    format!("reading {path}: {e}"),
                ));
            }
        }
    }
    ports.sort();
    ports.dedup();
    Ok(PortList { ports })
}

/// The listening sockets of one `/proc/net/tcp{,6}` table. Lines that do not parse are
/// skipped.
pub fn parse(table: &str, v6: bool) -> Vec<ListeningPort> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let local = cols.nth(1)?;
            let state = cols.nth(1)?;
            if state != TCP_LISTEN {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let address = if v6 {
                parse_v6(addr)?.to_string()
            } else {
                parse_v4(addr)?.to_string()
            };
            Some(ListeningPort { port, address })
        })
        .collect()
}

/// An IPv4 address as the kernel prints it: one 32-bit word in host (little-endian) order.
fn parse_v4(hex: &str) -> Option<Ipv4Addr> {
    let word = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(word.to_le_bytes()))
}

/// An IPv6 address as the kernel prints it: four 32-bit words, each in host order.
fn parse_v6(hex: &str) -> Option<Ipv6Addr> {
    if hex.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for i in 0..4 {
        let word = u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()?;
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
    }
    Some(Ipv6Addr::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(port: u16, address: &str) -> ListeningPort {
        ListeningPort {
            port,
            address: address.into(),
        }
    }

    #[test]
    fn parses_listening_ipv4_sockets() {
        // As read inside a gVisor sandbox: the agent listening, one connection to it.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   2: 00000000:C33F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0        3 1 0000000000000000 0 0 0 0 -1\n\
   4: 0263D60A:C33F 0163D60A:CC84 01 00000000:00000000 00:00000000 00000000     0        0        5 1 0000000000000000 0 0 0 0 -1\n\
   5: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0        6 1 0000000000000000 0 0 0 0 -1\n\
   garbage\n";
        assert_eq!(
            parse(table, false),
            vec![port(49983, "0.0.0.0"), port(8080, "127.0.0.1")]
        );
    }

    #[test]
    fn parses_listening_ipv6_sockets() {
        let table = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
   1: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1\n\
   2: 0000000000000000FFFF00000100007F:0051 00000000000000000000000000000000:0000 0A 0 0 0 0 0 0 0\n";
        assert_eq!(
            parse(table, true),
            vec![
                port(8080, "::"),
                port(80, "::1"),
                port(81, "::ffff:127.0.0.1")
            ]
        );
    }
}
