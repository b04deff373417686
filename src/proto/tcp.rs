//! Raw TCP tunnels on the wire (sans-IO): the capability bit, the port
//! lists carried by HELLO and ACCEPT, the OPEN payload of a TCP stream and
//! its "connected" RESPONSE, and the port ranges a gateway or a token rule
//! allows (`20000-20999`, `20000-20099,21000`, `none`).
//!
//! A TCP stream reuses the HTTP stream machinery unchanged: OPEN, then the
//! agent's RESPONSE (here one byte: connected), DATA both ways under the
//! same credit, END as a half-close in each direction, RESET as an abort.
//! Only its OPEN and RESPONSE payloads differ, and a gateway sends such an
//! OPEN only on an uplink whose HELLO asked for TCP ports (`CAP_TCP`), so a
//! peer that does not know TCP tunnels never sees one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};

use super::error::ProtoError;

/// Capability bit: raw TCP tunnels (HELLO: the agent asks for ports;
/// ACCEPT: the gateway granted them).
pub const CAP_TCP: u32 = 0x0000_0001;

/// Capability bits this implementation knows.
pub const KNOWN_CAPS: u32 = CAP_TCP;

/// Most TCP tunnels one agent may ask for.
pub const MAX_TCP_TUNNELS: usize = 64;

/// First byte of a TCP stream's OPEN payload. An HTTP request head starts
/// with a method token, never with a NUL byte, so the agent tells the two
/// apart by it.
pub const TCP_OPEN_MARK: u8 = 0x00;

/// The RESPONSE payload of a TCP stream: the agent has connected to its
/// local target.
pub const TCP_CONNECTED: &[u8] = &[0x00];

/// Whether an OPEN payload is a TCP stream's.
pub fn is_tcp_open(payload: &[u8]) -> bool {
    payload.first() == Some(&TCP_OPEN_MARK)
}

/// The OPEN of a TCP stream: which public port the connection came in on,
/// and who connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOpen {
    pub port: u16,
    pub client: SocketAddr,
}

impl TcpOpen {
    /// mark, port u16, family u8, address (4 or 16), client port u16.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(1 + 2 + 1 + 16 + 2);
        b.put_u8(TCP_OPEN_MARK);
        b.put_u16(self.port);
        match self.client.ip() {
            IpAddr::V4(ip) => {
                b.put_u8(4);
                b.put_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                b.put_u8(6);
                b.put_slice(&ip.octets());
            }
        }
        b.put_u16(self.client.port());
        b.freeze()
    }

    pub fn decode(p: &[u8]) -> Result<TcpOpen, ProtoError> {
        let bad = ProtoError::BadPayload("malformed TCP OPEN");
        if p.len() < 4 || p[0] != TCP_OPEN_MARK {
            return Err(bad);
        }
        let port = u16::from_be_bytes([p[1], p[2]]);
        let (ip, rest): (IpAddr, &[u8]) = match p[3] {
            4 if p.len() == 4 + 4 + 2 => {
                let o: [u8; 4] = p[4..8].try_into().expect("4 bytes");
                (Ipv4Addr::from(o).into(), &p[8..])
            }
            6 if p.len() == 4 + 16 + 2 => {
                let o: [u8; 16] = p[4..20].try_into().expect("16 bytes");
                (Ipv6Addr::from(o).into(), &p[20..])
            }
            _ => return Err(bad),
        };
        let cport = u16::from_be_bytes([rest[0], rest[1]]);
        Ok(TcpOpen {
            port,
            client: SocketAddr::new(ip, cport),
        })
    }
}

/// `count u16` then `count` ports, each u16 (0 in a request: any free port).
pub(crate) fn put_ports(dst: &mut BytesMut, ports: &[u16]) {
    let n = u16::try_from(ports.len()).expect("port list longer than 65535");
    dst.put_u16(n);
    for p in ports {
        dst.put_u16(*p);
    }
}

/// Ports a gateway opens for TCP tunnels, or a token rule allows: a list
/// of inclusive ranges. Empty = none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortRanges {
    ranges: Vec<(u16, u16)>,
}

impl PortRanges {
    pub fn none() -> PortRanges {
        PortRanges::default()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// `none`, or comma-separated `LOW-HIGH` / `PORT` items (1..=65535).
    pub fn parse(text: &str) -> Result<PortRanges, String> {
        let t = text.trim();
        if t.is_empty() || t.eq_ignore_ascii_case("none") {
            return Ok(PortRanges::none());
        }
        let port = |s: &str| -> Result<u16, String> {
            match s.trim().parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(format!("{s:?} is not a port (1-65535)")),
            }
        };
        let mut ranges = Vec::new();
        for item in t.split(',') {
            let (lo, hi) = match item.split_once('-') {
                Some((a, b)) => (port(a)?, port(b)?),
                None => {
                    let p = port(item)?;
                    (p, p)
                }
            };
            if lo > hi {
                return Err(format!("port range {item:?} runs backwards"));
            }
            ranges.push((lo, hi));
        }
        Ok(PortRanges { ranges })
    }

    pub fn contains(&self, port: u16) -> bool {
        self.ranges
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&port))
    }

    /// Every port, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.ranges.iter().flat_map(|&(lo, hi)| lo..=hi)
    }
}

impl std::fmt::Display for PortRanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ranges.is_empty() {
            return f.write_str("none");
        }
        for (i, &(lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

/// One `--tcp` of the agent: a local target and the public port asked for
/// (0: any free port of the gateway's range).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSpec {
    /// `host:port` to connect to (a bare port means 127.0.0.1).
    pub local: String,
    pub remote: u16,
}

impl TcpSpec {
    /// `22`, `22=20022`, `127.0.0.1:5432`, `db.internal:5432=20100`.
    pub fn parse(text: &str) -> Result<TcpSpec, String> {
        let t = text.trim();
        let (local, remote) = match t.rsplit_once('=') {
            Some((l, r)) => match r.trim().parse::<u16>() {
                Ok(p) if p > 0 => (l.trim(), p),
                _ => return Err(format!("--tcp {t}: {r:?} is not a public port (1-65535)")),
            },
            None => (t, 0),
        };
        if local.is_empty() {
            return Err(format!("--tcp {t}: no local port"));
        }
        let digits = local.strip_prefix(':').unwrap_or(local);
        let local = if digits.bytes().all(|b| b.is_ascii_digit()) {
            match digits.parse::<u16>() {
                Ok(p) if p > 0 => format!("127.0.0.1:{p}"),
                _ => return Err(format!("--tcp {t}: {local:?} is not a port (1-65535)")),
            }
        } else {
            match local.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => {
                    local.to_string()
                }
                _ => {
                    return Err(format!(
                        "--tcp {t}: expected PORT, HOST:PORT, optionally =PUBLIC_PORT"
                    ))
                }
            }
        };
        Ok(TcpSpec { local, remote })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_round_trips_v4_and_v6() {
        for client in ["1.2.3.4:5678", "[::1]:40000", "[2001:db8::7]:1"] {
            let o = TcpOpen {
                port: 20022,
                client: client.parse().unwrap(),
            };
            let wire = o.encode();
            assert!(is_tcp_open(&wire));
            assert_eq!(TcpOpen::decode(&wire), Ok(o));
            // Every truncation and every extra byte is refused.
            for cut in 0..wire.len() {
                assert!(TcpOpen::decode(&wire[..cut]).is_err(), "cut {cut}");
            }
            let mut long = wire.to_vec();
            long.push(0);
            assert!(TcpOpen::decode(&long).is_err());
        }
        assert!(!is_tcp_open(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!is_tcp_open(b""));
        assert!(TcpOpen::decode(&[0, 0, 22, 5, 1, 2, 3, 4, 0, 1]).is_err());
    }

    #[test]
    fn open_layout_as_in_the_protocol_doc() {
        let o = TcpOpen {
            port: 20022,
            client: "10.0.0.7:40000".parse().unwrap(),
        };
        assert_eq!(
            o.encode().as_ref(),
            [0x00, 0x4e, 0x36, 0x04, 0x0a, 0x00, 0x00, 0x07, 0x9c, 0x40]
        );
    }

    #[test]
    fn random_open_payloads_never_panic() {
        let mut rng = crate::proto::test_rng::XorShift::new(7);
        for _ in 0..20_000 {
            let mut noise = rng.noise(30);
            if !noise.is_empty() && rng.chance(2) {
                noise[0] = 0;
            }
            if let Ok(o) = TcpOpen::decode(&noise) {
                assert_eq!(TcpOpen::decode(&o.encode()), Ok(o));
            }
        }
    }

    #[test]
    fn port_ranges() {
        let r = PortRanges::parse("20000-20002, 21000").unwrap();
        assert_eq!(r.iter().collect::<Vec<_>>(), [20000, 20001, 20002, 21000]);
        assert!(r.contains(20001) && r.contains(21000));
        assert!(!r.contains(19999) && !r.contains(20003));
        assert_eq!(r.to_string(), "20000-20002,21000");
        assert_eq!(PortRanges::parse("none").unwrap(), PortRanges::none());
        assert_eq!(PortRanges::parse("").unwrap().to_string(), "none");
        for bad in ["0", "20-10", "x", "1-", "70000", "1,,2"] {
            assert!(PortRanges::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tcp_specs() {
        let s = |t: &str| TcpSpec::parse(t).map(|s| (s.local, s.remote));
        assert_eq!(s("22"), Ok(("127.0.0.1:22".into(), 0)));
        assert_eq!(s(":22=20022"), Ok(("127.0.0.1:22".into(), 20022)));
        assert_eq!(s("127.0.0.1:5432"), Ok(("127.0.0.1:5432".into(), 0)));
        assert_eq!(s("db:5432=20100"), Ok(("db:5432".into(), 20100)));
        assert_eq!(s("[::1]:22=1"), Ok(("[::1]:22".into(), 1)));
        for bad in ["", "0", "22=0", "22=x", "=20022", "host", "host:0", "70000"] {
            assert!(TcpSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
