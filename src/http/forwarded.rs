//! The client facts a request carries to its backend: `X-Forwarded-For`,
//! `Forwarded` (RFC 7239), `X-Real-IP`, `X-Forwarded-Proto` and
//! `X-Forwarded-Host`, and whose word they are.
//!
//! A backend can only believe these headers if every hop that set them is
//! trusted. So the policy lives here, in one pure function: from a peer
//! that is not a trusted proxy (`--trusted-proxies`), whatever the client
//! wrote in them is dropped and replaced by what the gateway saw; from a
//! trusted proxy, its chain is kept and the gateway appends the hop it saw.
//! `X-Forwarded-Host` always says the Host the gateway routed by.

use std::net::IpAddr;

use bytes::BytesMut;

use super::encode::encode_request_forward_except;
use super::head::{trim_ows, RequestHead};

/// The scheme the client used to reach the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// The client of one public connection as forwarded headers name it;
/// built once per connection, used for every request on it.
#[derive(Clone, Debug)]
pub struct Origin {
    /// Text form for `X-Forwarded-For` and `X-Real-IP`.
    ip: String,
    /// RFC 7239 node: IPv4 bare, IPv6 bracketed and quoted.
    node: String,
    trusted: bool,
    scheme: Scheme,
}

impl Origin {
    /// `client`: the address the gateway saw (the socket peer, or the
    /// PROXY header's source). `trusted`: whether it is a trusted proxy
    /// whose forwarding headers are kept.
    pub fn new(client: IpAddr, trusted: bool, scheme: Scheme) -> Self {
        // IPv4 clients of a dual-stack listener appear as ::ffff:a.b.c.d;
        // backends expect the IPv4 form.
        let ip = client.to_canonical();
        let node = match ip {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("\"[{a}]\""),
        };
        Origin {
            ip: ip.to_string(),
            node,
            trusted,
            scheme,
        }
    }

    pub fn trusted(&self) -> bool {
        self.trusted
    }
}

/// Headers whose client-sent values we replace (untrusted) or extend
/// (trusted); every other header passes as the encoder decides.
const OURS: [&str; 5] = [
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// Encodes `head` as the backend gets it (see
/// [`encode_request_forward_except`]), with the forwarding headers of
/// `origin` last.
pub fn encode_request_forwarded(head: &RequestHead, origin: &Origin, dst: &mut BytesMut) {
    let mut xff = Vec::new();
    let mut fwd = Vec::new();
    let mut real_ip: Option<&[u8]> = None;
    let mut proto: Option<&[u8]> = None;
    let mut host_raw: Option<&[u8]> = None;
    for (name, value) in &head.headers {
        if host_raw.is_none() && name.eq_ignore_ascii_case("host") {
            host_raw = Some(value);
        }
        if !origin.trusted {
            continue;
        }
        // Several lines of a list header are one list (RFC 9110 5.3).
        let v = trim_ows(value);
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            join(&mut xff, v);
        } else if name.eq_ignore_ascii_case("forwarded") {
            join(&mut fwd, v);
        } else if name.eq_ignore_ascii_case("x-real-ip") {
            real_ip = real_ip.or(Some(v).filter(|v| !v.is_empty()));
        } else if name.eq_ignore_ascii_case("x-forwarded-proto") {
            proto = proto.or(Some(v).filter(|v| !v.is_empty()));
        }
    }
    // Borrowed, not copied: the head outlives the encoding.
    let host_raw: &[u8] = match host_raw {
        Some(h) => trim_ows(h),
        None => head.host.as_deref().unwrap_or("").as_bytes(),
    };
    join(&mut xff, origin.ip.as_bytes());

    // This hop's element, written straight onto the list.
    fwd.reserve(48 + host_raw.len());
    if !fwd.is_empty() {
        fwd.extend_from_slice(b", ");
    }
    fwd.extend_from_slice(b"for=");
    fwd.extend_from_slice(origin.node.as_bytes());
    fwd.extend_from_slice(b";proto=");
    fwd.extend_from_slice(origin.scheme.as_str().as_bytes());
    if !host_raw.is_empty() {
        fwd.extend_from_slice(b";host=");
        put_value(&mut fwd, host_raw);
    }

    encode_request_forward_except(
        head,
        &OURS,
        &[
            ("X-Forwarded-For", &xff),
            ("Forwarded", &fwd),
            ("X-Real-IP", real_ip.unwrap_or(origin.ip.as_bytes())),
            (
                "X-Forwarded-Proto",
                proto.unwrap_or(origin.scheme.as_str().as_bytes()),
            ),
            ("X-Forwarded-Host", host_raw),
        ],
        dst,
    );
}

/// Appends a list element, with ", " between elements.
fn join(list: &mut Vec<u8>, item: &[u8]) {
    if item.is_empty() {
        return;
    }
    if !list.is_empty() {
        list.extend_from_slice(b", ");
    }
    list.extend_from_slice(item);
}

/// An RFC 7239 value: a token as is, anything else as a quoted-string
/// (a Host with a port has a ':', which is not a token character).
fn put_value(dst: &mut Vec<u8>, v: &[u8]) {
    if v.iter().all(|&b| super::body::is_tchar(b)) {
        dst.extend_from_slice(v);
        return;
    }
    dst.push(b'"');
    for &b in v {
        if b == b'"' || b == b'\\' {
            dst.push(b'\\');
        }
        dst.push(b);
    }
    dst.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{parse_request, DEFAULT_MAX_HEAD};

    /// The forwarded head's headers named `name`, as text, in order.
    fn forwarded(raw: &str, origin: &Origin) -> RequestHead {
        let head = parse_request(raw.as_bytes(), DEFAULT_MAX_HEAD)
            .unwrap()
            .unwrap();
        let mut dst = BytesMut::new();
        encode_request_forwarded(&head, origin, &mut dst);
        parse_request(&dst, DEFAULT_MAX_HEAD).unwrap().unwrap()
    }

    fn all(h: &RequestHead, name: &str) -> Vec<String> {
        h.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    const SPOOF: &str = "GET /p HTTP/1.1\r\nHost: demo:8080\r\n\
        X-Forwarded-For: 6.6.6.6\r\nx-forwarded-for: 7.7.7.7, 8.8.8.8\r\n\
        Forwarded: for=6.6.6.6;proto=https\r\nX-Real-IP: 6.6.6.6\r\n\
        X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\nX-Other: kept\r\n\r\n";

    #[test]
    fn untrusted_peer_headers_are_replaced() {
        let o = Origin::new("192.0.2.7".parse().unwrap(), false, Scheme::Http);
        let h = forwarded(SPOOF, &o);
        assert_eq!(all(&h, "x-forwarded-for"), ["192.0.2.7"]);
        assert_eq!(
            all(&h, "forwarded"),
            ["for=192.0.2.7;proto=http;host=\"demo:8080\""]
        );
        assert_eq!(all(&h, "x-real-ip"), ["192.0.2.7"]);
        assert_eq!(all(&h, "x-forwarded-proto"), ["http"]);
        assert_eq!(all(&h, "x-forwarded-host"), ["demo:8080"]);
        assert_eq!(all(&h, "x-other"), ["kept"]);
        assert_eq!(all(&h, "host"), ["demo:8080"]);
    }

    #[test]
    fn trusted_peer_chains_are_kept_and_extended() {
        let o = Origin::new("10.0.0.2".parse().unwrap(), true, Scheme::Http);
        let h = forwarded(SPOOF, &o);
        assert_eq!(
            all(&h, "x-forwarded-for"),
            ["6.6.6.6, 7.7.7.7, 8.8.8.8, 10.0.0.2"]
        );
        assert_eq!(
            all(&h, "forwarded"),
            ["for=6.6.6.6;proto=https, for=10.0.0.2;proto=http;host=\"demo:8080\""]
        );
        assert_eq!(all(&h, "x-real-ip"), ["6.6.6.6"]);
        // The proxy in front saw the real scheme.
        assert_eq!(all(&h, "x-forwarded-proto"), ["https"]);
        // We routed by Host, so that is what we tell.
        assert_eq!(all(&h, "x-forwarded-host"), ["demo:8080"]);
    }

    #[test]
    fn trusted_peer_without_headers_gets_ours() {
        let o = Origin::new("10.0.0.2".parse().unwrap(), true, Scheme::Https);
        let h = forwarded("GET / HTTP/1.1\r\nHost: demo\r\n\r\n", &o);
        assert_eq!(all(&h, "x-forwarded-for"), ["10.0.0.2"]);
        assert_eq!(all(&h, "forwarded"), ["for=10.0.0.2;proto=https;host=demo"]);
        assert_eq!(all(&h, "x-real-ip"), ["10.0.0.2"]);
        assert_eq!(all(&h, "x-forwarded-proto"), ["https"]);
    }

    #[test]
    fn ipv6_and_mapped_ipv4_clients() {
        let o = Origin::new("2001:db8::7".parse().unwrap(), false, Scheme::Http);
        let h = forwarded("GET / HTTP/1.1\r\nHost: demo\r\n\r\n", &o);
        assert_eq!(all(&h, "x-forwarded-for"), ["2001:db8::7"]);
        assert_eq!(
            all(&h, "forwarded"),
            ["for=\"[2001:db8::7]\";proto=http;host=demo"]
        );
        assert_eq!(all(&h, "x-real-ip"), ["2001:db8::7"]);
        let o = Origin::new("::ffff:192.0.2.9".parse().unwrap(), false, Scheme::Http);
        let h = forwarded("GET / HTTP/1.1\r\nHost: demo\r\n\r\n", &o);
        assert_eq!(all(&h, "x-forwarded-for"), ["192.0.2.9"]);
        assert_eq!(all(&h, "forwarded"), ["for=192.0.2.9;proto=http;host=demo"]);
    }

    #[test]
    fn http10_without_host_and_absolute_form() {
        let o = Origin::new("192.0.2.7".parse().unwrap(), false, Scheme::Http);
        // No Host anywhere: no host= parameter, and an empty X-Forwarded-Host.
        let h = forwarded("GET / HTTP/1.0\r\n\r\n", &o);
        assert_eq!(all(&h, "forwarded"), ["for=192.0.2.7;proto=http"]);
        assert_eq!(all(&h, "x-forwarded-host"), [""]);
        // HTTP/1.0 absolute-form without Host: the authority's host.
        let h = forwarded("GET http://Demo:81/ HTTP/1.0\r\n\r\n", &o);
        assert_eq!(all(&h, "forwarded"), ["for=192.0.2.7;proto=http;host=demo"]);
    }

    #[test]
    fn quoting() {
        let mut d = Vec::new();
        put_value(&mut d, b"demo.example");
        put_value(&mut d, b"[::1]:80");
        put_value(&mut d, b"a\"b\\c");
        assert_eq!(&d[..], &b"demo.example\"[::1]:80\"\"a\\\"b\\\\c\""[..]);
    }
}
