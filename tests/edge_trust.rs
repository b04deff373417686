//! Client addresses at the public edge, over real processes: forwarding
//! headers from untrusted and trusted peers (`--trusted-proxies`), PROXY
//! protocol v1/v2 (`--proxy-protocol`), and absolute-form targets that
//! disagree with Host. The echo backend's `/headers` shows what crossed.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use ringtunnel::http::proxy::{v2_header, v2_tcp};

/// echo + gateway (with `gw_extra`) + agent (`agent_extra`) for "demo";
/// routable once `prefix` (a PROXY header or nothing) + a request works.
struct Edge {
    _echo: Proc,
    gw: Proc,
    _agent: Proc,
}

impl Edge {
    fn start(d: &str, gw_extra: &[&str], agent_extra: &[&str], prefix: &[u8]) -> Edge {
        let echo = echo(d, 0);
        let gw = gateway(d, gw_extra);
        let agent = agent(d, &gw, "demo", echo.addr("listen"), agent_extra);
        let e = Edge {
            _echo: echo,
            gw,
            _agent: agent,
        };
        // Every core must know the session (directory updates arrive
        // asynchronously): 20 answers in a row on fresh connections.
        let t = Instant::now();
        let mut ok = 0;
        while ok < 20 {
            let r = e.send(
                prefix,
                "GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n",
            );
            if r.status == 200 {
                ok += 1;
            } else {
                ok = 0;
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(t.elapsed() < Duration::from_secs(15), "never routable");
        }
        e
    }

    fn public(&self) -> SocketAddr {
        self.gw.addr("public")
    }

    /// `prefix` then `req` on a fresh connection; status 0 if no answer.
    fn send(&self, prefix: &[u8], req: &str) -> Resp {
        let mut raw = prefix.to_vec();
        raw.extend_from_slice(req.as_bytes());
        request_bytes(self.public(), &raw)
    }

    /// The backend's view of the forwarding headers of one `/headers`
    /// request sent after `prefix` with `extra` header lines.
    fn seen(&self, prefix: &[u8], extra: &str) -> Seen {
        let r = self.send(
            prefix,
            &format!("GET /headers HTTP/1.1\r\nHost: demo\r\n{extra}Connection: close\r\n\r\n"),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        Seen(r.text())
    }

    fn errors(&self, kind: &str) -> u64 {
        metric_sum(
            &metrics(self.gw.addr("admin")),
            "ringtunnel_errors_total",
            &format!("kind=\"{kind}\""),
        )
    }
}

/// Header lines as the echo backend listed them (`Name: value\n`).
struct Seen(String);

impl Seen {
    /// Every value of `name`, in order.
    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }
}

const SPOOF: &str = "X-Forwarded-For: 10.9.9.9\r\nForwarded: for=10.9.9.9;proto=https\r\n\
                     X-Real-IP: 10.9.9.9\r\nX-Forwarded-Proto: https\r\n";

/// Whether the gateway closes `s` without sending a byte.
fn closed_unanswered(mut s: TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => true,
        // A close with our request unread is a reset.
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(n) => panic!(
            "expected a close, got {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

both_drivers!(untrusted_peer_cannot_spoof_its_address, |d| {
    // No --trusted-proxies, then a list that does not hold 127.0.0.1.
    for gw_extra in [&[][..], &["--trusted-proxies", "10.0.0.0/8,::1/128"][..]] {
        let e = Edge::start(d, gw_extra, &[], b"");
        let s = e.seen(b"", SPOOF);
        assert_eq!(s.all("x-forwarded-for"), ["127.0.0.1"], "{}", s.0);
        assert_eq!(
            s.all("forwarded"),
            ["for=127.0.0.1;proto=http;host=demo"],
            "{}",
            s.0
        );
        assert_eq!(s.all("x-real-ip"), ["127.0.0.1"], "{}", s.0);
        assert_eq!(s.all("x-forwarded-proto"), ["http"], "{}", s.0);
        assert_eq!(s.all("x-forwarded-host"), ["demo"], "{}", s.0);
    }
});

both_drivers!(trusted_peer_chains_are_kept_and_extended, |d| {
    let e = Edge::start(d, &["--trusted-proxies", "127.0.0.1/32"], &[], b"");
    let s = e.seen(b"", SPOOF);
    assert_eq!(s.all("x-forwarded-for"), ["10.9.9.9, 127.0.0.1"], "{}", s.0);
    assert_eq!(
        s.all("forwarded"),
        ["for=10.9.9.9;proto=https, for=127.0.0.1;proto=http;host=demo"],
        "{}",
        s.0
    );
    assert_eq!(s.all("x-real-ip"), ["10.9.9.9"], "{}", s.0);
    assert_eq!(s.all("x-forwarded-proto"), ["https"], "{}", s.0);
    // A trusted proxy that sent none of them: ours only.
    let s = e.seen(b"", "");
    assert_eq!(s.all("x-forwarded-for"), ["127.0.0.1"], "{}", s.0);
    assert_eq!(s.all("x-real-ip"), ["127.0.0.1"], "{}", s.0);
    assert_eq!(s.all("x-forwarded-proto"), ["http"], "{}", s.0);
});

both_drivers!(proxy_v1_and_v2_name_the_client, |d| {
    let v1 = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 8080\r\n";
    let e = Edge::start(d, &["--proxy-protocol"], &[], v1);
    let s = e.seen(v1, SPOOF);
    assert_eq!(s.all("x-forwarded-for"), ["203.0.113.9"], "{}", s.0);
    assert_eq!(s.all("x-real-ip"), ["203.0.113.9"], "{}", s.0);
    assert_eq!(
        s.all("forwarded"),
        ["for=203.0.113.9;proto=http;host=demo"],
        "{}",
        s.0
    );
    let v1_6 = b"PROXY TCP6 2001:db8::9 ::1 40000 8080\r\n";
    let s = e.seen(v1_6, "");
    assert_eq!(s.all("x-forwarded-for"), ["2001:db8::9"], "{}", s.0);
    assert_eq!(
        s.all("forwarded"),
        ["for=\"[2001:db8::9]\";proto=http;host=demo"],
        "{}",
        s.0
    );
    // v2 with a TLV (unique id) to skip.
    let v2 = v2_tcp(
        sa("198.51.100.4:5555"),
        sa("127.0.0.1:8080"),
        &[0x05, 0, 2, b'i', b'd'],
    );
    let s = e.seen(&v2, SPOOF);
    assert_eq!(s.all("x-forwarded-for"), ["198.51.100.4"], "{}", s.0);
    let v2_6 = v2_tcp(sa("[2001:db8::4]:1"), sa("[::1]:8080"), &[]);
    let s = e.seen(&v2_6, "");
    assert_eq!(s.all("x-forwarded-for"), ["2001:db8::4"], "{}", s.0);
    // LOCAL (a health check) and UNKNOWN: the socket peer is the client.
    let s = e.seen(&v2_header(0x20, 0x00, &[]), "");
    assert_eq!(s.all("x-forwarded-for"), ["127.0.0.1"], "{}", s.0);
    let s = e.seen(b"PROXY UNKNOWN\r\n", "");
    assert_eq!(s.all("x-forwarded-for"), ["127.0.0.1"], "{}", s.0);

    // The header is read once: keep-alive requests after it, sent in one
    // piece with it, all carry its address; an HTTP error after it is an
    // HTTP answer.
    let mut c = connect(e.public());
    let mut raw = v1.to_vec();
    for _ in 0..3 {
        raw.extend_from_slice(b"GET /headers HTTP/1.1\r\nHost: demo\r\n\r\n");
    }
    raw.extend_from_slice(b"GET /headers HTTP/1.1\r\n\r\n");
    c.write_all(&raw).unwrap();
    let mut buf = Vec::new();
    for i in 0..3 {
        let r = read_response(&mut c, &mut buf, false).expect("response");
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(Seen(r.text()).all("x-forwarded-for"), ["203.0.113.9"]);
    }
    let r = read_response(&mut c, &mut buf, false).expect("400");
    assert_eq!(r.status, 400, "{}", r.text());
});

both_drivers!(without_a_valid_proxy_header_the_connection_is_closed, |d| {
    let v1 = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 8080\r\n";
    let e = Edge::start(d, &["--proxy-protocol"], &[], v1);
    let before = e.errors("proxy_protocol");
    let good_v2 = v2_tcp(sa("1.2.3.4:5"), sa("127.0.0.1:80"), &[]);
    let bad_version = {
        let mut v = good_v2.clone();
        v[12] = 0x11;
        v
    };
    let short_len = v2_header(0x21, 0x11, &[0; 11]);
    let long_v1 = format!("PROXY UNKNOWN {}", "x".repeat(110));
    for (what, first) in [
        ("plain HTTP", &b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n"[..]),
        ("v1 lowercase", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
        (
            "v1 bad port",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\nGET / HTTP/1.1\r\nHost: demo\r\n\r\n",
        ),
        ("v1 without CRLF in 107 bytes", long_v1.as_bytes()),
        ("v2 version 1", &bad_version),
        ("v2 too short for AF_INET", &short_len),
    ] {
        let mut s = connect(e.public());
        s.write_all(first).unwrap();
        assert!(closed_unanswered(s), "{what}");
    }
    // Counted, on whichever core took them.
    let t = Instant::now();
    while e.errors("proxy_protocol") < before + 6 {
        assert!(t.elapsed() < Duration::from_secs(5), "not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The gateway still serves PROXY clients.
    assert_eq!(
        e.send(&good_v2, "GET / HTTP/1.1\r\nHost: demo\r\n\r\n")
            .status,
        200
    );
});

#[test]
fn proxy_header_accepted_from_trusted_proxies_only() {
    let d = "uring";
    let v1 = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 8080\r\n";
    // 127.0.0.1 is not trusted: even a valid header is refused.
    let gw = gateway(d, &["--proxy-protocol", "--trusted-proxies", "10.0.0.0/8"]);
    for _ in 0..4 {
        let mut s = connect(gw.addr("public"));
        let mut raw = v1.to_vec();
        raw.extend_from_slice(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n");
        // The gateway may close before reading a byte: a failed write is
        // as good as a close.
        let _ = s.write_all(&raw);
        assert!(closed_unanswered(s));
    }
    drop(gw);
    // 127.0.0.0/8 is trusted: the PROXY source decides the forwarding
    // headers. An untrusted client's spoof is replaced; a source inside the
    // trusted block is itself a proxy whose chain is kept.
    let e = Edge::start(
        d,
        &["--proxy-protocol", "--trusted-proxies", "127.0.0.0/8"],
        &[],
        v1,
    );
    let s = e.seen(v1, SPOOF);
    assert_eq!(s.all("x-forwarded-for"), ["203.0.113.9"], "{}", s.0);
    let inner = b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 8080\r\n";
    let s = e.seen(inner, SPOOF);
    assert_eq!(s.all("x-forwarded-for"), ["10.9.9.9, 127.0.0.9"], "{}", s.0);
    assert_eq!(s.all("x-real-ip"), ["10.9.9.9"], "{}", s.0);
}

both_drivers!(a_handoff_carries_the_proxy_address, |d| {
    // One uplink on a 2-core gateway: connections accepted by the other
    // core move, and the PROXY header must not be needed again there.
    let v1 = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 8080\r\n";
    let e = Edge::start(d, &["--proxy-protocol"], &["--uplinks", "1"], v1);
    let handoffs = || {
        metric_sum(
            &metrics(e.gw.addr("admin")),
            "ringtunnel_gateway_handoffs_total",
            "",
        )
    };
    let before = handoffs();
    for i in 0..24u8 {
        let hdr = format!(
            "PROXY TCP4 203.0.113.{i} 127.0.0.1 {} 8080\r\n",
            40000 + u16::from(i)
        );
        let s = e.seen(hdr.as_bytes(), SPOOF);
        assert_eq!(
            s.all("x-forwarded-for"),
            [format!("203.0.113.{i}")],
            "{}",
            s.0
        );
    }
    assert!(handoffs() > before, "no connection was handed off");
});

both_drivers!(absolute_form_must_name_the_host, |d| {
    let e = Edge::start(d, &[], &[], b"");
    let r = e.send(
        b"",
        "GET http://demo/headers HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("absolute-form"), "{}", r.text());
    // The other way round: routing by either name must not be possible.
    let r = e.send(
        b"",
        "GET http://other/headers HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    // Same host, other case and port: served.
    let r = e.send(
        b"",
        "GET http://DEMO:9999/headers HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("Host: demo\n"), "{}", r.text());
});

#[test]
fn a_bad_trusted_proxies_list_is_refused_at_start_up() {
    for (list, why) in [
        ("10.1.2.3/8", "bits set past the /8 prefix"),
        ("10.0.0.0/33", "prefix longer than 32 bits"),
        ("10.0.0.0/8,localhost", "not an IPv4 or IPv6 address"),
    ] {
        let out = std::process::Command::new(BIN)
            .args(["gateway", "--listen", "127.0.0.1:0", "--tunnel-listen"])
            .args([
                "127.0.0.1:0",
                "--admin-listen",
                "off",
                "--trusted-proxies",
                list,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{list}: {err}");
        assert!(
            err.contains("--trusted-proxies") && err.contains(why),
            "{list}: {err}"
        );
    }
}
