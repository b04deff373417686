//! Which peers are trusted proxies (`--trusted-proxies`): IPv4 and IPv6
//! CIDR blocks, parsed once at start-up and matched per connection.
//!
//! Pure and small on purpose: a list of (network, prefix length) pairs,
//! matched by masking. Addresses are canonicalised first, so an IPv4 peer
//! seen through a dual-stack socket (`::ffff:10.1.2.3`) matches
//! `10.0.0.0/8`; an IPv6 block never matches an IPv4 address.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One block of addresses: `10.0.0.0/8`, `::1/128`, or a bare address
/// (a block of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u128::from(u32::from(a)), self.prefix, 32) == u128::from(u32::from(n))
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(u128::from(a), self.prefix, 128) == u128::from(n)
            }
            _ => false,
        }
    }
}

/// `v` (a `bits`-wide address) with all but its first `prefix` bits cleared.
fn masked(v: u128, prefix: u8, bits: u32) -> u128 {
    let host_bits = bits - u32::from(prefix);
    if host_bits >= 128 {
        0
    } else {
        (v >> host_bits) << host_bits
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: not an IPv4 or IPv6 address"))?;
        let bits: u8 = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => {
                // `u8::from_str` would take "+8".
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("{s:?}: prefix length is not a number"));
                }
                let p: u8 = p
                    .parse()
                    .map_err(|_| format!("{s:?}: prefix length is not a number"))?;
                if p > bits {
                    return Err(format!("{s:?}: prefix longer than {bits} bits"));
                }
                p
            }
        };
        let cidr = Cidr { net, prefix };
        let wide = match net {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        // `10.1.2.3/8` is most likely a typo for a host or for 10.0.0.0/8:
        // refuse rather than guess which.
        if masked(wide, prefix, u32::from(bits)) != wide {
            return Err(format!(
                "{s:?}: address has bits set past the /{prefix} prefix"
            ));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// The blocks of `--trusted-proxies`; empty trusts no one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// Parses a comma-separated list (spaces around items allowed).
    pub fn parse_list(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(Cidr::from_str)
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_blocks() {
        let c = cidr("10.0.0.0/8");
        assert!(c.contains(ip("10.0.0.0")));
        assert!(c.contains(ip("10.255.255.255")));
        assert!(!c.contains(ip("11.0.0.0")));
        assert!(!c.contains(ip("9.255.255.255")));
        let c = cidr("192.168.1.128/25");
        assert!(c.contains(ip("192.168.1.200")));
        assert!(!c.contains(ip("192.168.1.127")));
        let c = cidr("127.0.0.1/32");
        assert!(c.contains(ip("127.0.0.1")));
        assert!(!c.contains(ip("127.0.0.2")));
        // A bare address is a block of one.
        assert_eq!(cidr("127.0.0.1"), c);
        // /0 is everything of its family, nothing of the other.
        let all = cidr("0.0.0.0/0");
        assert!(all.contains(ip("1.2.3.4")));
        assert!(all.contains(ip("255.255.255.255")));
        assert!(!all.contains(ip("::1")));
    }

    #[test]
    fn ipv6_blocks_and_mapped_ipv4() {
        let c = cidr("2001:db8::/32");
        assert!(c.contains(ip("2001:db8::1")));
        assert!(c.contains(ip("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(!c.contains(ip("2001:db9::")));
        let lo = cidr("::1/128");
        assert!(lo.contains(ip("::1")));
        assert!(!lo.contains(ip("::2")));
        assert!(!lo.contains(ip("127.0.0.1")));
        let all = cidr("::/0");
        assert!(all.contains(ip("fe80::1")));
        assert!(!all.contains(ip("10.0.0.1")));
        // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(!cidr("10.0.0.0/8").contains(ip("::ffff:11.1.2.3")));
        assert!(!cidr("::ffff:0:0/96").contains(ip("10.1.2.3")));
    }

    #[test]
    fn refused_blocks() {
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
            "10.0.0/8",
            "example.com/8",
            "10.1.2.3/8",
            "2001:db8::1/32",
            "[::1]/128",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap_err(),
            "\"10.1.2.3/8\": address has bits set past the /8 prefix"
        );
    }

    #[test]
    fn lists() {
        let t = TrustedProxies::parse_list("10.0.0.0/8, ::1/128,,192.0.2.7").unwrap();
        assert_eq!(t.to_string(), "10.0.0.0/8,::1/128,192.0.2.7/32");
        assert!(t.contains(ip("10.9.9.9")));
        assert!(t.contains(ip("::1")));
        assert!(t.contains(ip("192.0.2.7")));
        assert!(!t.contains(ip("192.0.2.8")));
        assert!(!t.contains(ip("127.0.0.1")));
        let none = TrustedProxies::parse_list("").unwrap();
        assert!(none.is_empty());
        assert!(!none.contains(ip("127.0.0.1")));
        assert!(TrustedProxies::parse_list("10.0.0.0/8,nope").is_err());
    }
}
