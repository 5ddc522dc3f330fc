//! IPv4 prefixes (`10.88.0.0/16`): parsing, display, containment.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::NetError;

/// An IPv4 network: an address and a prefix length. Host bits are always zero: parsing and
/// [`Ipv4Net::new`] mask them away, so `10.1.2.3/16` becomes `10.1.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Net {
    /// A network with its host bits cleared. `prefix_len` must be at most 32.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Self, NetError> {
        if prefix_len > 32 {
            return Err(NetError::InvalidCidr {
                input: format!("{addr}/{prefix_len}"),
                reason: "prefix length is larger than 32".into(),
            });
        }
        Ok(Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix_len)),
            prefix_len,
        })
    }

    /// The netmask as a number (`/24` is `0xffff_ff00`).
    pub fn mask(&self) -> u32 {
        mask(self.prefix_len)
    }

    /// The first address (the network address, host bits zero).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The last address of the network.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) | !self.mask())
    }

    /// Number of addresses in the network (2^(32 - prefix_len)).
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix_len))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// Whether `other` lies entirely inside `self`.
    pub fn contains_net(&self, other: &Ipv4Net) -> bool {
        other.prefix_len >= self.prefix_len && self.contains(other.network())
    }

    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.contains_net(other) || other.contains_net(self)
    }
}

fn mask(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n.min(32))),
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix_len)
    }
}

/// Parses `a.b.c.d/len`; a bare address means `/32`.
impl FromStr for Ipv4Net {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| NetError::InvalidCidr {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (addr, len) = match s.trim().split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s.trim(), None),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix_len = match len {
            None => 32,
            Some(l) => {
                if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) || l.len() > 2 {
                    return Err(bad("prefix length is not a number from 0 to 32"));
                }
                l.parse::<u8>()
                    .map_err(|_| bad("prefix length is not a number"))?
            }
        };
        if prefix_len > 32 {
            return Err(bad("prefix length is larger than 32"));
        }
        Ipv4Net::new(addr, prefix_len)
    }
}

impl serde::Serialize for Ipv4Net {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Ipv4Net {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        let n: Ipv4Net = "10.88.0.0/16".parse().unwrap();
        assert_eq!(n.addr, Ipv4Addr::new(10, 88, 0, 0));
        assert_eq!(n.prefix_len, 16);
        assert_eq!(n.to_string(), "10.88.0.0/16");
        assert_eq!(n.size(), 65536);
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 88, 255, 255));
    }

    #[test]
    fn masks_host_bits_and_bare_addresses() {
        let n: Ipv4Net = "10.1.2.3/16".parse().unwrap();
        assert_eq!(n.to_string(), "10.1.0.0/16");
        let h: Ipv4Net = "1.2.3.4".parse().unwrap();
        assert_eq!(h.to_string(), "1.2.3.4/32");
        let all: Ipv4Net = "1.2.3.4/0".parse().unwrap();
        assert_eq!(all.to_string(), "0.0.0.0/0");
        assert!(all.contains(Ipv4Addr::new(255, 1, 2, 3)));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/33",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/+8",
            "10.0.0.0/008",
            "::1/128",
        ] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad} should not parse");
        }
        assert!(Ipv4Net::new(Ipv4Addr::LOCALHOST, 40).is_err());
    }

    #[test]
    fn containment() {
        let pool: Ipv4Net = "10.88.0.0/16".parse().unwrap();
        assert!(pool.contains(Ipv4Addr::new(10, 88, 200, 1)));
        assert!(!pool.contains(Ipv4Addr::new(10, 89, 0, 1)));
        let sub: Ipv4Net = "10.88.4.0/30".parse().unwrap();
        assert!(pool.contains_net(&sub));
        assert!(!sub.contains_net(&pool));
        assert!(sub.overlaps(&pool) && pool.overlaps(&sub));
        let other: Ipv4Net = "10.89.0.0/16".parse().unwrap();
        assert!(!other.overlaps(&pool));
    }

    #[test]
    fn serde_as_string() {
        let n: Ipv4Net = "192.168.0.0/24".parse().unwrap();
        let j = serde_json::to_string(&n).unwrap();
        assert_eq!(j, "\"192.168.0.0/24\"");
        let back: Ipv4Net = serde_json::from_str(&j).unwrap();
        assert_eq!(back, n);
        assert!(serde_json::from_str::<Ipv4Net>("\"nope\"").is_err());
    }
}
