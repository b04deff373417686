//! PROXY protocol headers (HAProxy's `proxy-protocol.txt`, versions 1 and
//! 2): what a TCP load balancer in front of the public listener sends
//! before the first HTTP byte to tell us who its client is.
//!
//! Sans-IO like the rest of `http`: [`parse`] looks at the front of the
//! connection's buffer and answers "read more", "this client, this many
//! bytes", or an error. It never consumes input; the caller advances its
//! buffer by the returned length, so the HTTP head parser starts exactly
//! where the header ended.
//!
//! Errors come as early as the bytes allow (a first byte that starts
//! neither signature, a v2 version, command, family or length that cannot
//! be right), so a client that does not speak the protocol is closed
//! without waiting for a header timeout. Memory is bounded: a v1 line is at
//! most [`V1_MAX`] bytes, a v2 header at most 16 + [`V2_MAX_BODY`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest v1 line, CRLF included (the specification's own bound:
/// `PROXY TCP6` with two full IPv6 addresses and ports).
pub const V1_MAX: usize = 107;

/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Longest v2 address block plus TLVs we accept. The addresses take at
/// most 216 bytes (AF_UNIX); the TLVs load balancers send (unique ids up
/// to 128 bytes, cloud endpoint ids, TLS facts) fit well within. Without a
/// bound a peer could make us buffer 64 KiB before the first HTTP byte.
pub const V2_MAX_BODY: usize = 4096;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_FIXED: usize = 16;

/// Who the proxy says the connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxySource {
    /// Relayed for `src`, which connected to `dst` on the proxy.
    Client { src: SocketAddr, dst: SocketAddr },
    /// No client address to use: a v2 LOCAL connection (the proxy's own
    /// health check), v1 `UNKNOWN`, or a v2 AF_UNSPEC / AF_UNIX source.
    /// The socket's peer stands for the client.
    Local,
}

impl ProxySource {
    /// The client address, or `None` when the socket peer is the client.
    pub fn client(&self) -> Option<SocketAddr> {
        match self {
            ProxySource::Client { src, .. } => Some(*src),
            ProxySource::Local => None,
        }
    }
}

/// Why a connection's first bytes are not a PROXY header we accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyError(pub &'static str);

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad PROXY header: {}", self.0)
    }
}

impl std::error::Error for ProxyError {}

/// Parses a PROXY header (v1 or v2) at the front of `buf`.
///
/// `Ok(None)`: every byte so far fits a header; read more.
/// `Ok(Some((source, n)))`: the header is the first `n` bytes.
pub fn parse(buf: &[u8]) -> Result<Option<(ProxySource, usize)>, ProxyError> {
    match buf.first() {
        None => Ok(None),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(ProxyError("no PROXY signature")),
    }
}

/// Whether `buf` could still become `prefix` (or starts with it).
fn fits_prefix(buf: &[u8], prefix: &[u8]) -> bool {
    let n = buf.len().min(prefix.len());
    buf[..n] == prefix[..n]
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxySource, usize)>, ProxyError> {
    if !fits_prefix(buf, V1_PREFIX) {
        return Err(ProxyError("no PROXY signature"));
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError("v1 line longer than 107 bytes"))
        } else {
            Ok(None)
        };
    };
    let Some(line) = window[..lf].strip_suffix(b"\r") else {
        return Err(ProxyError("v1 line not ended by CRLF"));
    };
    if !line.is_ascii() {
        return Err(ProxyError("v1 line not ASCII"));
    }
    let line = std::str::from_utf8(line).map_err(|_| ProxyError("v1 line not ASCII"))?;
    let mut fields = line.split(' ');
    fields.next(); // "PROXY", checked above
    let v6 = match fields.next() {
        Some("TCP4") => false,
        Some("TCP6") => true,
        // The specification lets anything follow UNKNOWN, and says to
        // ignore it.
        Some("UNKNOWN") => return Ok(Some((ProxySource::Local, lf + 1))),
        _ => return Err(ProxyError("v1 protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ProxyError("v1 line needs exactly 4 address fields"));
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyError> {
        let parsed = if v6 {
            s.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            s.parse::<Ipv4Addr>().map(IpAddr::V4)
        };
        parsed.map_err(|_| ProxyError("v1 address does not match its protocol"))
    };
    let src = SocketAddr::new(ip(src)?, v1_port(sport)?);
    let dst = SocketAddr::new(ip(dst)?, v1_port(dport)?);
    Ok(Some((ProxySource::Client { src, dst }, lf + 1)))
}

fn v1_port(s: &str) -> Result<u16, ProxyError> {
    // `u16::from_str` would take a leading '+'.
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProxyError("v1 port is not a number in 0..=65535"));
    }
    s.parse()
        .map_err(|_| ProxyError("v1 port is not a number in 0..=65535"))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxySource, usize)>, ProxyError> {
    if !fits_prefix(buf, &V2_SIGNATURE) {
        return Err(ProxyError("no PROXY signature"));
    }
    if let Some(&ver_cmd) = buf.get(12) {
        if ver_cmd >> 4 != 2 {
            return Err(ProxyError("v2 version is not 2"));
        }
        if ver_cmd & 0x0f > 1 {
            return Err(ProxyError("v2 command is neither LOCAL nor PROXY"));
        }
    }
    if buf.len() < V2_FIXED {
        return Ok(None);
    }
    let local = buf[12] & 0x0f == 0;
    let (family, transport) = (buf[13] >> 4, buf[13] & 0x0f);
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX_BODY {
        return Err(ProxyError("v2 header longer than 4 KiB"));
    }
    // Judged before the body arrives, so a wrong header fails at once.
    // LOCAL ignores the family (the specification says so).
    let need = if local {
        0
    } else {
        match (family, transport) {
            (0, _) => 0,
            (1, 1) => 12,
            (2, 1) => 36,
            (3, 1 | 2) => 216,
            (1 | 2, _) => return Err(ProxyError("v2 transport is not a TCP stream")),
            _ => return Err(ProxyError("v2 address family unknown")),
        }
    };
    if len < need {
        return Err(ProxyError("v2 length too short for its address family"));
    }
    let total = V2_FIXED + len;
    if buf.len() < total {
        return Ok(None);
    }
    // TLVs (after the addresses, up to `len`) carry nothing we act on.
    let a = &buf[V2_FIXED..total];
    let source = match (local, family) {
        (false, 1) => ProxySource::Client {
            src: SocketAddr::new(ipv4(&a[0..4]), port(&a[8..10])),
            dst: SocketAddr::new(ipv4(&a[4..8]), port(&a[10..12])),
        },
        (false, 2) => ProxySource::Client {
            src: SocketAddr::new(ipv6(&a[0..16]), port(&a[32..34])),
            dst: SocketAddr::new(ipv6(&a[16..32]), port(&a[34..36])),
        },
        _ => ProxySource::Local,
    };
    Ok(Some((source, total)))
}

fn ipv4(b: &[u8]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

fn ipv6(b: &[u8]) -> IpAddr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(b);
    IpAddr::V6(Ipv6Addr::from(octets))
}

fn port(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// A v2 header for tests (ours and the end-to-end ones): `ver_cmd` and
/// `fam` as on the wire, then `body` (addresses and TLVs).
#[doc(hidden)]
pub fn v2_header(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let mut v = V2_SIGNATURE.to_vec();
    v.push(ver_cmd);
    v.push(fam);
    v.extend_from_slice(&(body.len() as u16).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A v2 PROXY/TCP header for `src` -> `dst` (same family), followed by
/// `tlvs`.
#[doc(hidden)]
pub fn v2_tcp(src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    let fam = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            body.extend_from_slice(&s.octets());
            body.extend_from_slice(&d.octets());
            0x11
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            body.extend_from_slice(&s.octets());
            body.extend_from_slice(&d.octets());
            0x21
        }
        _ => panic!("v2_tcp: src and dst must be of one family"),
    };
    body.extend_from_slice(&src.port().to_be_bytes());
    body.extend_from_slice(&dst.port().to_be_bytes());
    body.extend_from_slice(tlvs);
    v2_header(0x21, fam, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Every strict prefix of `header` asks for more; the whole of it, with
    /// HTTP bytes after it, gives `want` and the header's exact length.
    fn check_split(header: &[u8], want: ProxySource) {
        for i in 0..header.len() {
            assert_eq!(parse(&header[..i]), Ok(None), "prefix {i} of {header:?}");
        }
        let mut with_http = header.to_vec();
        with_http.extend_from_slice(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n");
        assert_eq!(parse(&with_http), Ok(Some((want, header.len()))));
        assert_eq!(parse(header), Ok(Some((want, header.len()))));
    }

    #[test]
    fn v1_tcp4_tcp6_unknown_at_every_split() {
        check_split(
            b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n",
            ProxySource::Client {
                src: sa("192.0.2.7:56324"),
                dst: sa("198.51.100.1:443"),
            },
        );
        check_split(
            b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 0\r\n",
            ProxySource::Client {
                src: sa("[2001:db8::7]:65535"),
                dst: sa("[2001:db8::1]:0"),
            },
        );
        check_split(b"PROXY UNKNOWN\r\n", ProxySource::Local);
        check_split(
            b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
            ProxySource::Local,
        );
    }

    #[test]
    fn v1_longest_line_fits_and_one_more_byte_does_not() {
        // The specification's worst case: UNKNOWN with full IPv6 fields.
        let full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let line = format!("PROXY UNKNOWN {full} {full} 65535 65535\r\n");
        assert_eq!(line.len(), V1_MAX);
        assert_eq!(
            parse(line.as_bytes()),
            Ok(Some((ProxySource::Local, V1_MAX)))
        );
        let tcp6 = format!("PROXY TCP6 {full} {full} 65535 65535\r\n");
        assert!(matches!(parse(tcp6.as_bytes()), Ok(Some((_, 104)))));
        // No line end within 107 bytes: refused, not waited for.
        let long = format!("PROXY UNKNOWN {}", "x".repeat(V1_MAX));
        assert_eq!(parse(&long.as_bytes()[..V1_MAX - 1]), Ok(None));
        assert_eq!(
            parse(&long.as_bytes()[..V1_MAX]),
            Err(ProxyError("v1 line longer than 107 bytes"))
        );
    }

    #[test]
    fn v1_malformed() {
        for (bad, why) in [
            (
                &b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n"[..],
                "no PROXY signature",
            ),
            (
                b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
                "v1 protocol is not TCP4, TCP6 or UNKNOWN",
            ),
            (
                b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
                "v1 protocol is not TCP4, TCP6 or UNKNOWN",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
                "v1 line not ended by CRLF",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
                "v1 line needs exactly 4 address fields",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
                "v1 line needs exactly 4 address fields",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
                "v1 line needs exactly 4 address fields",
            ),
            (
                b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
                "v1 line needs exactly 4 address fields",
            ),
            (
                b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
                "v1 address does not match its protocol",
            ),
            (
                b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
                "v1 address does not match its protocol",
            ),
            (
                b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
                "v1 address does not match its protocol",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
                "v1 port is not a number in 0..=65535",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
                "v1 port is not a number in 0..=65535",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n",
                "v1 port is not a number in 0..=65535",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n",
                "v1 port is not a number in 0..=65535",
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.\xff 1 2\r\n",
                "v1 line not ASCII",
            ),
        ] {
            assert_eq!(
                parse(bad),
                Err(ProxyError(why)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn plain_http_or_tls_fails_on_its_first_wrong_byte() {
        assert_eq!(parse(b"G"), Err(ProxyError("no PROXY signature")));
        assert_eq!(
            parse(b"\x16\x03\x01"),
            Err(ProxyError("no PROXY signature"))
        );
        assert_eq!(
            parse(b"PRI * HTTP/2.0"),
            Err(ProxyError("no PROXY signature"))
        );
        assert_eq!(parse(b"PROX"), Ok(None));
        // An HTTP request that starts with empty lines looks like v2 for
        // two bytes, no longer.
        assert_eq!(parse(b"\r\n"), Ok(None));
        assert_eq!(parse(b"\r\nGET"), Err(ProxyError("no PROXY signature")));
        assert_eq!(parse(b"\r\n\r\nGET"), Err(ProxyError("no PROXY signature")));
    }

    #[test]
    fn v2_families_at_every_split() {
        check_split(
            &v2_tcp(sa("192.0.2.7:56324"), sa("198.51.100.1:443"), &[]),
            ProxySource::Client {
                src: sa("192.0.2.7:56324"),
                dst: sa("198.51.100.1:443"),
            },
        );
        check_split(
            &v2_tcp(sa("[2001:db8::7]:1"), sa("[::1]:8080"), &[]),
            ProxySource::Client {
                src: sa("[2001:db8::7]:1"),
                dst: sa("[::1]:8080"),
            },
        );
        // TLVs are skipped: type 0x05 (unique id), length 3.
        check_split(
            &v2_tcp(
                sa("10.1.2.3:4"),
                sa("10.0.0.1:80"),
                &[0x05, 0, 3, b'a', b'b', b'c'],
            ),
            ProxySource::Client {
                src: sa("10.1.2.3:4"),
                dst: sa("10.0.0.1:80"),
            },
        );
        // LOCAL: the family and addresses are ignored, even nonsense ones.
        check_split(&v2_header(0x20, 0x00, &[]), ProxySource::Local);
        check_split(&v2_header(0x20, 0xff, &[1, 2, 3]), ProxySource::Local);
        // PROXY with AF_UNSPEC, or AF_UNIX paths: use the socket peer.
        check_split(&v2_header(0x21, 0x00, &[]), ProxySource::Local);
        check_split(&v2_header(0x21, 0x31, &[0; 216]), ProxySource::Local);
        check_split(&v2_header(0x21, 0x32, &[0; 216]), ProxySource::Local);
    }

    #[test]
    fn v2_malformed_fails_as_soon_as_the_byte_arrives() {
        let good = v2_tcp(sa("1.2.3.4:5"), sa("6.7.8.9:10"), &[]);
        let with = |i: usize, b: u8| {
            let mut v = good.clone();
            v[i] = b;
            v
        };
        let cases: Vec<(Vec<u8>, usize, &str)> = vec![
            // (header, bytes after which the error is known, reason)
            (with(4, b'X'), 5, "no PROXY signature"),
            (with(11, b'\r'), 12, "no PROXY signature"),
            (with(12, 0x11), 13, "v2 version is not 2"),
            (with(12, 0x31), 13, "v2 version is not 2"),
            (with(12, 0x22), 13, "v2 command is neither LOCAL nor PROXY"),
            (with(13, 0x12), 16, "v2 transport is not a TCP stream"),
            (with(13, 0x10), 16, "v2 transport is not a TCP stream"),
            (with(13, 0x41), 16, "v2 address family unknown"),
            (with(13, 0x30), 16, "v2 address family unknown"),
            (
                with(13, 0x21),
                16,
                "v2 length too short for its address family",
            ),
            (
                v2_header(0x21, 0x11, &[0; 11]),
                16,
                "v2 length too short for its address family",
            ),
            (
                v2_header(0x21, 0x21, &[0; 35]),
                16,
                "v2 length too short for its address family",
            ),
            (
                v2_header(0x21, 0x31, &[0; 215]),
                16,
                "v2 length too short for its address family",
            ),
            (
                v2_header(0x21, 0x11, &[0; V2_MAX_BODY + 1]),
                16,
                "v2 header longer than 4 KiB",
            ),
        ];
        for (bytes, known_at, why) in cases {
            for i in 0..known_at {
                assert_eq!(parse(&bytes[..i]), Ok(None), "{why}: prefix {i}");
            }
            for i in known_at..=bytes.len() {
                assert_eq!(
                    parse(&bytes[..i]),
                    Err(ProxyError(why)),
                    "{why}: prefix {i}"
                );
            }
        }
        // The largest body accepted.
        let big = v2_header(0x21, 0x11, &[0; V2_MAX_BODY]);
        assert!(matches!(parse(&big), Ok(Some((_, n))) if n == 16 + V2_MAX_BODY));
    }
}
