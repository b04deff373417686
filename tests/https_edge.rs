//! The public HTTPS edge (`--https-listen`), end to end with real
//! processes on 127.0.0.1: curl (`--cacert`, `--resolve`) and a rustls
//! client in this process (keep-alive, PROXY headers, handshakes cut
//! short), plus raw sockets for what is not TLS at all. Certificates are
//! made at test time by the test CA (tests/common/pki.rs).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::{Ca, Dir};
use common::*;
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};

/// Sessions are served as `<name>.tunnel.test`.
const DOMAIN: &str = "tunnel.test";

/// A CA and three certificates: the default (`gw.test`), a wildcard
/// (`*.tunnel.test`) and an exact name under it (`api.tunnel.test`), each
/// with its own CN so client output tells them apart.
struct Pki {
    dir: Dir,
    ca: String,
    default: (String, String),
    wild: (String, String),
    exact: (String, String),
}

impl Pki {
    fn new() -> Pki {
        let dir = Dir::new("https");
        let ca = Ca::new("https edge test CA");
        let pair = |name: &str, cn: &str, san: &str| {
            let (cert, key) = ca.issue_named(cn, &[san]);
            (
                dir.write(&format!("{name}.pem"), &cert),
                dir.write(&format!("{name}.key"), &key),
            )
        };
        let default = pair("default", "edge-default", "gw.test");
        let wild = pair("wild", "edge-wild", "*.tunnel.test");
        let exact = pair("exact", "edge-exact", "api.tunnel.test");
        Pki {
            ca: dir.write("ca.pem", &ca.pem),
            dir,
            default,
            wild,
            exact,
        }
    }
}

/// A gateway with an HTTPS listener serving `cert` (the default
/// certificate) and sessions under DOMAIN.
fn https_gateway(driver: &str, cert: &(String, String), extra: &[&str]) -> Proc {
    let mut args = vec![
        "--https-listen",
        "127.0.0.1:0",
        "--https-cert",
        &cert.0,
        "--https-key",
        &cert.1,
        "--domain",
        DOMAIN,
    ];
    args.extend_from_slice(extra);
    gateway(driver, &args)
}

/// curl over HTTPS to `host` (resolved to 127.0.0.1) on the gateway's
/// HTTPS port, verifying against the test CA. Returns (status, body,
/// curl's -v output).
fn curl_https(
    gw: &Proc,
    ca: &str,
    host: &str,
    path: &str,
    extra: &[&str],
) -> (u16, Vec<u8>, String) {
    let port = gw.addr("https").port();
    let out = Command::new("curl")
        .args(["-sS", "-v", "-m", "60", "--cacert", ca, "-o", "-"])
        .args(["-w", "\n%{http_code}"])
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .args(extra)
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    let (status, body) = curl_status_body(out.stdout);
    (
        status,
        body,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn metric(gw: &Proc, name: &str, filter: &str) -> u64 {
    metric_sum(&metrics(gw.addr("admin")), name, filter)
}

fn https_conns(gw: &Proc) -> u64 {
    metric(gw, "ringtunnel_gateway_https_connections", "core=")
}

/// Idle again: the HTTP side's gauges and fds (wait_baseline) and the
/// TLS side's gauge.
fn wait_idle(gw: &Proc, base: Baseline) {
    wait_baseline(gw, gw.addr("admin"), base, Duration::from_secs(5));
    let t = Instant::now();
    while https_conns(gw) != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "HTTPS connections gauge stuck at {}",
            https_conns(gw)
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn client_config(ca: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection for `name` over `tcp`, handshake completed.
fn tls_over(tcp: TcpStream, cfg: &Arc<rustls::ClientConfig>, name: &str) -> Tls {
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn =
        rustls::ClientConnection::new(cfg.clone(), ServerName::try_from(name.to_string()).unwrap())
            .unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).expect("TLS handshake");
    }
    s
}

fn tls_connect(gw: &Proc, cfg: &Arc<rustls::ClientConfig>, name: &str) -> Tls {
    tls_over(TcpStream::connect(gw.addr("https")).unwrap(), cfg, name)
}

/// The DER of the certificate the server presented.
fn served_cert(s: &Tls) -> Vec<u8> {
    s.conn.peer_certificates().expect("a certificate")[0].to_vec()
}

fn der_of(pem_path: &str) -> Vec<u8> {
    CertificateDer::from_pem_file(pem_path).unwrap().to_vec()
}

/// One keep-alive GET over any stream; the answer must carry a
/// Content-Length (the echo backend's do). Returns (status, head, body).
fn get<S: Read + Write>(s: &mut S, host: &str, path: &str) -> (u16, String, Vec<u8>) {
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    s.flush().unwrap();
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16384];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut tmp).expect("response head");
        assert!(n > 0, "connection closed before a response head");
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("Content-Length");
    while buf.len() < end + len {
        let n = s.read(&mut tmp).expect("response body");
        assert!(n > 0, "connection closed mid-body");
        buf.extend_from_slice(&tmp[..n]);
    }
    (status, head, buf[end..end + len].to_vec())
}

/// Reads until the server closes; the bytes it sent before. A server
/// that keeps the connection open past 5 s fails the test.
fn read_until_closed(mut s: TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        match s.read(&mut tmp) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the gateway kept the connection open: {e}"),
        }
    }
}

fn echo_stack(driver: &str, gw: &Proc, agent_extra: &[&str]) -> (Proc, Proc) {
    let echo = echo(driver, 0);
    let agent = agent(driver, gw, "demo", echo.addr("listen"), agent_extra);
    wait_routable(gw.addr("public"), "demo");
    (echo, agent)
}

#[test]
fn https_request_end_to_end_on_both_drivers() {
    let pki = Pki::new();
    for driver in ["uring", "legacy"] {
        let gw = https_gateway(driver, &pki.wild, &[]);
        let (_echo, _agent) = echo_stack(driver, &gw, &[]);
        let base = baseline(&gw, gw.addr("admin"));
        let host = "demo.tunnel.test";

        // The client's own X-Forwarded-Proto is a lie from an untrusted
        // peer: replaced by the scheme it really used.
        let (status, body, verbose) = curl_https(
            &gw,
            &pki.ca,
            host,
            "/headers",
            &["-H", "X-Forwarded-Proto: http"],
        );
        let body = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 200, "{driver}: {verbose}");
        assert!(
            verbose.contains("ALPN: server accepted http/1.1"),
            "{driver}: ALPN http/1.1 not negotiated:\n{verbose}"
        );
        let xfp: Vec<&str> = body
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("x-forwarded-proto:"))
            .collect();
        assert_eq!(xfp, ["X-Forwarded-Proto: https"], "{driver}: {body}");
        assert!(
            body.contains(";proto=https;"),
            "{driver}: Forwarded: {body}"
        );

        // 8 MiB up (echoed back) and 8 MiB down, byte-exact.
        let up = pattern(8 << 20);
        let file = pki.dir.write(&format!("up-{driver}.bin"), "");
        std::fs::write(&file, &up).unwrap();
        let (status, back, _) = curl_https(
            &gw,
            &pki.ca,
            host,
            "/echo",
            &[
                "--data-binary",
                &format!("@{file}"),
                "-H",
                "Content-Type: application/octet-stream",
            ],
        );
        assert_eq!(status, 200, "{driver}: upload");
        assert_eq!(back.len(), up.len(), "{driver}: echoed length");
        assert_eq!(checksum(&back), checksum(&up), "{driver}: echoed bytes");
        let (status, down, _) = curl_https(&gw, &pki.ca, host, &format!("/bytes/{}", 8 << 20), &[]);
        assert_eq!(status, 200, "{driver}: download");
        assert_eq!(
            checksum(&down),
            checksum(&pattern(8 << 20)),
            "{driver}: downloaded bytes"
        );

        wait_idle(&gw, base);
    }
}

#[test]
fn sni_picks_exact_name_then_wildcard_then_the_default() {
    let pki = Pki::new();
    let file = pki.dir.write(
        "gw.toml",
        &format!(
            "[[https_certs]]\ncert = {:?}\nkey = {:?}\n\n[[https_certs]]\ncert = {:?}\nkey = {:?}\n",
            pki.wild.0, pki.wild.1, pki.exact.0, pki.exact.1
        ),
    );
    // --https-cert is listed first: the default.
    let gw = https_gateway("uring", &pki.default, &["--config", &file]);
    let subject = |host: &str, extra: &[&str]| {
        let (status, _, verbose) = curl_https(&gw, &pki.ca, host, "/", extra);
        assert_ne!(status, 0, "{host}: no HTTP answer over TLS:\n{verbose}");
        verbose
            .lines()
            .find_map(|l| l.trim_start_matches(['*', ' ']).strip_prefix("subject: "))
            .unwrap_or_else(|| panic!("{host}: no subject in\n{verbose}"))
            .to_string()
    };
    // Verified by curl against the names: each gets its own certificate.
    assert_eq!(subject("demo.tunnel.test", &[]), "CN=edge-wild");
    assert_eq!(subject("api.tunnel.test", &[]), "CN=edge-exact");
    assert_eq!(subject("gw.test", &[]), "CN=edge-default");
    // A wildcard covers one label only; unknown names and no SNI at all
    // (an IP address) get the default (-k: it does not match them).
    assert_eq!(subject("a.b.tunnel.test", &["-k"]), "CN=edge-default");
    assert_eq!(subject("elsewhere.example", &["-k"]), "CN=edge-default");
    assert_eq!(subject("127.0.0.1", &["-k"]), "CN=edge-default");
    let (_, _, verbose) = curl_https(&gw, &pki.ca, "demo.tunnel.test", "/", &[]);
    assert!(
        verbose.contains("matched cert's \"*.tunnel.test\""),
        "{verbose}"
    );
    let (_, _, verbose) = curl_https(&gw, &pki.ca, "api.tunnel.test", "/", &[]);
    assert!(
        verbose.contains("matched cert's \"api.tunnel.test\""),
        "{verbose}"
    );
}

#[test]
fn plain_http_garbage_and_broken_handshakes_are_closed_and_nothing_else() {
    let pki = Pki::new();
    let gw = https_gateway("uring", &pki.wild, &["--header-timeout", "1"]);
    let (_echo, _agent) = echo_stack("uring", &gw, &[]);
    let base = baseline(&gw, gw.addr("admin"));
    let fails = || metric(&gw, "ringtunnel_errors_total", "kind=\"https_handshake\"");
    let before = fails();
    let https = gw.addr("https");
    let send = |bytes: &[u8]| {
        let mut s = TcpStream::connect(https).unwrap();
        s.write_all(bytes).unwrap();
        s
    };

    // Plain HTTP: closed without a byte in answer.
    let s = send(b"GET / HTTP/1.1\r\nHost: demo.tunnel.test\r\n\r\n");
    assert_eq!(
        read_until_closed(s),
        b"",
        "plain HTTP must get nothing back"
    );
    // Bytes that are no TLS record at all.
    let s = send(b"\x00\x01garbage\r\n\r\n");
    assert_eq!(read_until_closed(s), b"");
    // A handshake record holding garbage: rustls may alert, then closed.
    let s = send(b"\x16\x03\x01\x00\x05hello");
    read_until_closed(s);
    // A ClientHello cut short, then the client's FIN.
    let mut truncated = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec();
    truncated.extend_from_slice(&[7u8; 90]);
    let s = send(&truncated);
    s.shutdown(std::net::Shutdown::Write).unwrap();
    read_until_closed(s);
    // A client that vanishes mid-handshake: a real ClientHello, the
    // server's first answer, then a reset.
    let cfg = client_config(&pki.ca);
    let mut tcp = TcpStream::connect(https).unwrap();
    let mut conn = rustls::ClientConnection::new(
        cfg.clone(),
        ServerName::try_from("demo.tunnel.test").unwrap(),
    )
    .unwrap();
    conn.write_tls(&mut tcp).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut some = [0u8; 64];
    assert!(tcp.read(&mut some).unwrap() > 0, "no ServerHello");
    abort(tcp);
    // A client that speaks only HTTP/2: refused. rustls queues a
    // no_application_protocol alert after its ServerHello, but
    // monoio-rustls flushes one record per failed handshake, so the
    // client sees the connection close (or reset) instead of the alert.
    let mut h2 = (*cfg).clone();
    h2.alpn_protocols = vec![b"h2".to_vec()];
    let conn = rustls::ClientConnection::new(
        Arc::new(h2),
        ServerName::try_from("demo.tunnel.test").unwrap(),
    )
    .unwrap();
    let mut s = rustls::StreamOwned::new(conn, TcpStream::connect(https).unwrap());
    let mut refused = false;
    for _ in 0..4 {
        if s.conn.complete_io(&mut s.sock).is_err() {
            refused = true;
            break;
        }
    }
    assert!(refused, "an h2-only client must be refused");
    assert!(
        s.conn.is_handshaking(),
        "no TLS session for an h2-only client"
    );
    drop(s);
    // A stalled handshake (slowloris on TLS): closed by --header-timeout.
    let t = Instant::now();
    let s = send(b"\x16\x03\x01");
    read_until_closed(s);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "closed before the header timeout"
    );

    // Each one failed its handshake, once.
    let t = Instant::now();
    while fails() < before + 7 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(fails(), before + 7, "https_handshake errors");
    // Nothing else was affected, and nothing leaked.
    let (status, _, verbose) = curl_https(&gw, &pki.ca, "demo.tunnel.test", "/", &[]);
    assert_eq!(status, 200, "{verbose}");
    wait_idle(&gw, base);
}

#[test]
fn sighup_rotates_the_certificate_while_a_keep_alive_connection_stays_up() {
    let pki = Pki::new();
    let ca = Ca::new("rotation CA");
    let ca_file = pki.dir.write("rot-ca.pem", &ca.pem);
    let (cert, key) = ca.issue_named("edge-old", &["*.tunnel.test"]);
    let cert_path = pki.dir.write("rot.pem", &cert);
    let key_path = pki.dir.write("rot.key", &key);
    let file = pki.dir.write(
        "gw.toml",
        &format!(
            "https_listen = \"127.0.0.1:0\"\nhttps_cert = {cert_path:?}\nhttps_key = {key_path:?}\ndomain = \"{DOMAIN}\"\n"
        ),
    );
    let gw = gateway("uring", &["--config", &file]);
    let (_echo, _agent) = echo_stack("uring", &gw, &[]);
    let base = baseline(&gw, gw.addr("admin"));
    let cfg = client_config(&ca_file);
    let host = "demo.tunnel.test";

    let old = der_of(&cert_path);
    let mut kept = tls_connect(&gw, &cfg, host);
    assert_eq!(served_cert(&kept), old);
    assert_eq!(kept.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, _, body) = get(&mut kept, host, "/headers");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("X-Forwarded-Proto: https"));

    // A key that does not load: the reload is refused, the running
    // certificate stays.
    pki.dir.write("rot.key", "not a key\n");
    unsafe {
        libc::kill(gw.pid() as i32, libc::SIGHUP);
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut s = tls_connect(&gw, &cfg, host);
    assert_eq!(
        served_cert(&s),
        old,
        "a bad reload must keep the old certificate"
    );
    assert_eq!(get(&mut s, host, "/").0, 200);
    drop(s);

    // New files under the same names, then SIGHUP.
    let (cert2, key2) = ca.issue_named("edge-new", &["*.tunnel.test"]);
    pki.dir.write("rot.key", &key2);
    pki.dir.write("rot.pem", &cert2);
    let new = der_of(&cert_path);
    assert_ne!(new, old);
    unsafe {
        libc::kill(gw.pid() as i32, libc::SIGHUP);
    }
    let t = Instant::now();
    loop {
        let mut s = tls_connect(&gw, &cfg, host);
        if served_cert(&s) == new {
            assert_eq!(get(&mut s, host, "/").0, 200);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "new handshakes still get the old certificate"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The connection from before the reload is untouched.
    let (status, _, _) = get(&mut kept, host, "/bytes/100000");
    assert_eq!(status, 200);
    assert_eq!(served_cert(&kept), old);

    // A reload can also add certificates: api.tunnel.test gets its own.
    let (api_cert, api_key) = ca.issue_named("edge-api", &["api.tunnel.test"]);
    let api_cert_path = pki.dir.write("api.pem", &api_cert);
    let api_key_path = pki.dir.write("api.key", &api_key);
    let text = std::fs::read_to_string(&file).unwrap();
    pki.dir.write(
        "gw.toml",
        &format!("{text}\n[[https_certs]]\ncert = {api_cert_path:?}\nkey = {api_key_path:?}\n"),
    );
    unsafe {
        libc::kill(gw.pid() as i32, libc::SIGHUP);
    }
    let api = der_of(&api_cert_path);
    let t = Instant::now();
    while served_cert(&tls_connect(&gw, &cfg, "api.tunnel.test")) != api {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the added certificate is not served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(served_cert(&tls_connect(&gw, &cfg, host)), new);
    assert_eq!(get(&mut kept, host, "/").0, 200);
    drop(kept);
    wait_idle(&gw, base);
}

#[test]
fn https_request_for_a_session_held_on_the_other_core() {
    let pki = Pki::new();
    let gw = https_gateway("uring", &pki.wild, &["--cores", "2"]);
    // One uplink: one core holds the session, the other must hand its
    // HTTPS connections over.
    let (_echo, _agent) = echo_stack("uring", &gw, &["--uplinks", "1"]);
    let base = baseline(&gw, gw.addr("admin"));
    let handoffs = || metric(&gw, "ringtunnel_gateway_handoffs_total", "core=");
    let before = handoffs();
    // 16 connections: all landing on the owning core has odds of 2^-16.
    for i in 0..16 {
        let (status, body, verbose) = curl_https(
            &gw,
            &pki.ca,
            "demo.tunnel.test",
            &format!("/bytes/{}", 1000 + i),
            &[],
        );
        assert_eq!(status, 200, "{verbose}");
        assert_eq!(body, pattern(1000 + i));
    }
    assert!(handoffs() > before, "no HTTPS connection crossed cores");
    wait_idle(&gw, base);
}

#[test]
fn proxy_protocol_and_connection_limits_apply_to_https() {
    let pki = Pki::new();
    let gw = https_gateway(
        "uring",
        &pki.wild,
        &["--proxy-protocol", "--max-conns-per-ip", "2"],
    );
    let echo = echo("uring", 0);
    let _agent = agent("uring", &gw, "demo", echo.addr("listen"), &[]);
    let cfg = client_config(&pki.ca);
    let host = "demo.tunnel.test";
    let with_proxy = |client: &str| {
        let mut tcp = TcpStream::connect(gw.addr("https")).unwrap();
        // The PROXY header comes before the ClientHello.
        write!(tcp, "PROXY TCP4 {client} 127.0.0.1 40000 443\r\n").unwrap();
        tls_over(tcp, &cfg, host)
    };
    // Every public listener wants PROXY headers now: wait_routable's
    // plain requests would be closed.
    let t = Instant::now();
    let mut ok = 0;
    while ok < 10 {
        if get(&mut with_proxy("192.0.2.1"), host, "/").0 == 200 {
            ok += 1;
        } else {
            assert!(t.elapsed() < Duration::from_secs(10), "demo never routable");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let base = baseline(&gw, gw.addr("admin"));
    // The PROXY header and the ClientHello in one write: the server reads
    // past the header and must hand those bytes to TLS.
    let mut a = {
        let name = ServerName::try_from(host).unwrap();
        let mut conn = rustls::ClientConnection::new(cfg.clone(), name).unwrap();
        let mut first = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 443\r\n".to_vec();
        conn.write_tls(&mut first).unwrap();
        let mut tcp = TcpStream::connect(gw.addr("https")).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        tcp.write_all(&first).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn
                .complete_io(&mut s.sock)
                .expect("TLS after a PROXY header");
        }
        s
    };
    let mut b = with_proxy("198.51.100.4");
    for (s, ip) in [(&mut a, "203.0.113.9"), (&mut b, "198.51.100.4")] {
        let (status, _, body) = get(s, host, "/headers");
        let body = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 200);
        assert!(
            body.lines().any(|l| l == format!("X-Forwarded-For: {ip}")),
            "{body}"
        );
        assert!(body.contains("X-Forwarded-Proto: https"), "{body}");
    }
    // A third connection from this IP: closed at accept, with no
    // cleartext answer on the TLS port.
    let limited = || metric(&gw, "ringtunnel_errors_total", "kind=\"conn_limit\"");
    let before = limited();
    let s = TcpStream::connect(gw.addr("https")).unwrap();
    assert_eq!(read_until_closed(s), b"");
    assert_eq!(limited(), before + 1);
    drop(a);
    drop(b);
    wait_idle(&gw, base);
    // Slots are back: a new connection is served.
    let mut c = with_proxy("192.0.2.1");
    assert_eq!(get(&mut c, host, "/").0, 200);
}

/// Exits non-zero before its ready line; returns its stderr.
fn refused_start(args: &[&str]) -> String {
    let mut bg = spawn_nowait("gateway", args);
    let code = bg.wait_exit(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        matches!(code, Some(c) if c != 0),
        "gateway should refuse to start: {args:?}"
    );
    assert!(!bg.stdout().contains("ready"));
    bg.stderr()
}

#[test]
fn https_settings_are_checked_at_start_and_https_may_serve_alone() {
    let pki = Pki::new();
    let base = [
        "gateway",
        "--tunnel-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    fn joined<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        base.iter().chain(extra).copied().collect()
    }
    let err = refused_start(&joined(
        &base,
        &["--listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0"],
    ));
    assert!(err.contains("--https-listen needs --https-cert"), "{err}");
    let (cert, key) = (pki.wild.0.as_str(), pki.wild.1.as_str());
    let err = refused_start(&joined(
        &base,
        &[
            "--listen",
            "127.0.0.1:0",
            "--https-cert",
            cert,
            "--https-key",
            key,
        ],
    ));
    assert!(err.contains("without --https-listen"), "{err}");
    let err = refused_start(&joined(&base, &["--listen", "off"]));
    assert!(
        err.contains("--listen off leaves no public listener"),
        "{err}"
    );
    // A key that is not the certificate's.
    let err = refused_start(&joined(
        &base,
        &[
            "--listen",
            "127.0.0.1:0",
            "--https-listen",
            "127.0.0.1:0",
            "--https-cert",
            cert,
            "--https-key",
            &pki.exact.1,
        ],
    ));
    assert!(err.contains("does not fit certificate"), "{err}");

    // HTTPS only.
    let gw = spawn(
        "gateway",
        &joined(
            &base,
            &[
                "--listen",
                "off",
                "--https-listen",
                "127.0.0.1:0",
                "--https-cert",
                cert,
                "--https-key",
                key,
                "--domain",
                DOMAIN,
                "--cores",
                "1",
                "--no-pin",
            ],
        ),
        "ringtunnel gateway ready",
    );
    assert_eq!(gw.field("public"), "off");
    let echo = echo("uring", 0);
    let _agent = agent("uring", &gw, "demo", echo.addr("listen"), &[]);
    let t = Instant::now();
    loop {
        let (status, body, _) = curl_https(&gw, &pki.ca, "demo.tunnel.test", "/bytes/10", &[]);
        if status == 200 {
            assert_eq!(body, pattern(10));
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "never routable: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Memory per idle HTTPS keep-alive connection: the relay's two 16 KiB
/// buffers, monoio-rustls's two 16 KiB buffers, rustls's state and the
/// HTTP side's. Bounded here at 256 KiB each over 200 connections.
#[test]
fn idle_https_connections_cost_bounded_memory() {
    let pki = Pki::new();
    let gw = https_gateway("uring", &pki.wild, &["--cores", "1"]);
    let (_echo, _agent) = echo_stack("uring", &gw, &[]);
    let base = baseline(&gw, gw.addr("admin"));
    let cfg = client_config(&pki.ca);
    let host = "demo.tunnel.test";
    // Warm up whatever a first connection allocates once.
    let mut warm = tls_connect(&gw, &cfg, host);
    assert_eq!(get(&mut warm, host, "/").0, 200);
    let rss0 = gw.rss_kib();
    let mut conns: Vec<Tls> = (0..200)
        .map(|_| {
            let mut s = tls_connect(&gw, &cfg, host);
            assert_eq!(get(&mut s, host, "/bytes/20000").0, 200);
            s
        })
        .collect();
    assert_eq!(https_conns(&gw), 201);
    let per_conn = gw.rss_kib().saturating_sub(rss0) / 200;
    eprintln!("{per_conn} KiB per idle HTTPS connection");
    assert!(per_conn <= 256, "{per_conn} KiB per idle HTTPS connection");
    // Still alive and usable.
    assert_eq!(get(&mut conns[199], host, "/").0, 200);
    drop(conns);
    drop(warm);
    wait_idle(&gw, base);
}

/// Mid-transfer faults over HTTPS: a client that vanishes (RST) in the
/// middle of a 64 MiB download, and one that never reads it. Both are
/// closed (the second by --write-stall-timeout, on the HTTP side and on
/// the TLS side of the relay) and everything returns to its baseline.
#[test]
fn https_client_that_vanishes_or_never_reads_mid_transfer_is_cleaned_up() {
    let pki = Pki::new();
    let gw = https_gateway("uring", &pki.wild, &["--write-stall-timeout", "1"]);
    let (_echo, _agent) = echo_stack("uring", &gw, &[]);
    let base = baseline(&gw, gw.addr("admin"));
    let cfg = client_config(&pki.ca);
    let host = "demo.tunnel.test";
    let big = format!("GET /bytes/{} HTTP/1.1\r\nHost: {host}\r\n\r\n", 64 << 20);

    // Vanishes after the first MiB.
    let mut s = tls_connect(&gw, &cfg, host);
    s.write_all(big.as_bytes()).unwrap();
    let mut got = 0;
    let mut tmp = [0u8; 65536];
    while got < 1 << 20 {
        let n = s.read(&mut tmp).unwrap();
        assert!(n > 0, "closed early");
        got += n;
    }
    abort(s.sock);
    wait_idle(&gw, base);

    // Never reads (a small receive buffer, so the stall starts at once).
    // Counted as a write stall, or as a client error when the relay's own
    // stall deadline closed the socketpair under the HTTP side first.
    let stalls = || {
        metric(&gw, "ringtunnel_errors_total", "kind=\"write_stall\"")
            + metric(&gw, "ringtunnel_errors_total", "kind=\"client_io\"")
    };
    let before = stalls();
    let mut s = tls_over(connect_small_rcvbuf(gw.addr("https"), 4096), &cfg, host);
    s.write_all(big.as_bytes()).unwrap();
    s.flush().unwrap();
    let t = Instant::now();
    while https_conns(&gw) != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "a client that never reads was kept"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(stalls() > before, "the stall was not counted");
    drop(s);
    wait_idle(&gw, base);
}
