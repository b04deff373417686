//! TLS on the uplink, end to end with real processes on 127.0.0.1.
//! Certificates are made at test time with rcgen into a private temp dir.
//! Verification failures must stop the agent with a message naming the
//! reason, and must never get it registered.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::pki::{Ca, Dir};
use common::*;

/// Files of one test: a CA, the gateway's certificate for localhost and
/// 127.0.0.1, and a second, unrelated CA.
struct Pki {
    dir: Dir,
    ca: String,
    other_ca: String,
    cert: String,
    key: String,
}

impl Pki {
    fn new() -> Pki {
        Pki::with_gateway_cert(false)
    }

    fn with_gateway_cert(expired: bool) -> Pki {
        let dir = Dir::new("tls");
        let ca = Ca::new("ringtunnel test CA");
        let other = Ca::new("some other CA");
        let (cert, key) = ca.issue(&["localhost", "127.0.0.1"], false, expired);
        Pki {
            ca: dir.write("ca.pem", &ca.pem),
            other_ca: dir.write("other-ca.pem", &other.pem),
            cert: dir.write("gw.pem", &cert),
            key: dir.write("gw.key", &key),
            dir,
        }
    }

    fn gateway_args(&self) -> Vec<&str> {
        vec![
            "--tunnel-tls-cert",
            &self.cert,
            "--tunnel-tls-key",
            &self.key,
        ]
    }
}

/// Starts an agent expected to give up; returns its stderr once it exited.
fn refused_agent(gw: &Proc, backend: SocketAddr, extra: &[&str]) -> String {
    let args = agent_args("uring", gw, "demo", backend, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut bg = spawn_nowait("agent", &refs);
    let code = bg.wait_exit(Duration::from_secs(10));
    // The reader threads may lag the exit by a moment.
    std::thread::sleep(Duration::from_millis(100));
    let err = bg.stderr();
    assert!(
        matches!(code, Some(c) if c != 0),
        "agent should exit non-zero, got {code:?}; stderr:\n{err}"
    );
    assert!(
        !bg.stdout().contains("ringtunnel agent ready"),
        "agent must never be ready"
    );
    err
}

/// The session was never registered: its Host gets 404.
fn assert_not_registered(gw: &Proc) {
    let r = request(
        gw.addr("public"),
        "GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 404, "session must not be routable");
}

fn assert_serves(gw: &Proc) {
    let public = gw.addr("public");
    wait_routable(public, "demo");
    // Big enough for many TLS records each way.
    let r = request(
        public,
        "GET /bytes/300000 HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 300_000);
}

#[test]
fn tls_uplink_end_to_end_on_both_drivers() {
    let pki = Pki::new();
    for driver in ["uring", "legacy"] {
        let echo = echo(driver, 0);
        let gw = gateway(driver, &pki.gateway_args());
        // No --server-name: the certificate carries the IP of --gateway.
        let _agent = agent(driver, &gw, "demo", echo.addr("listen"), &["--ca", &pki.ca]);
        assert_serves(&gw);
    }
}

#[test]
fn untrusted_issuer_is_refused_and_named() {
    let pki = Pki::new();
    let echo = echo("uring", 0);
    let gw = gateway("uring", &pki.gateway_args());
    let err = refused_agent(&gw, echo.addr("listen"), &["--ca", &pki.other_ca]);
    assert!(err.contains("unknown issuer"), "stderr:\n{err}");
    assert_not_registered(&gw);
}

#[test]
fn name_mismatch_is_refused_and_named() {
    let pki = Pki::new();
    let echo = echo("uring", 0);
    let gw = gateway("uring", &pki.gateway_args());
    let err = refused_agent(
        &gw,
        echo.addr("listen"),
        &["--ca", &pki.ca, "--server-name", "gw.example.com"],
    );
    assert!(err.contains("name mismatch"), "stderr:\n{err}");
    assert!(err.contains("gw.example.com"), "stderr:\n{err}");
    assert_not_registered(&gw);
}

#[test]
fn expired_certificate_is_refused_and_named() {
    let pki = Pki::with_gateway_cert(true);
    let echo = echo("uring", 0);
    let gw = gateway("uring", &pki.gateway_args());
    let err = refused_agent(&gw, echo.addr("listen"), &["--ca", &pki.ca]);
    assert!(err.contains("expired certificate"), "stderr:\n{err}");
    assert_not_registered(&gw);
}

#[test]
fn mutual_tls_needs_a_client_certificate_from_the_client_ca() {
    let pki = Pki::new();
    let client_ca = Ca::new("agents CA");
    let client_ca_file = pki.dir.write("agents-ca.pem", &client_ca.pem);
    let (cert, key) = client_ca.issue(&["agent-1"], true, false);
    let (cert, key) = (
        pki.dir.write("agent.pem", &cert),
        pki.dir.write("agent.key", &key),
    );
    // Signed by a CA the gateway does not trust for clients.
    let stranger = Ca::new("stranger CA");
    let (s_cert, s_key) = stranger.issue(&["agent-2"], true, false);
    let (s_cert, s_key) = (
        pki.dir.write("stranger.pem", &s_cert),
        pki.dir.write("stranger.key", &s_key),
    );

    let echo = echo("uring", 0);
    let mut gw_args = pki.gateway_args();
    gw_args.extend(["--client-ca", &client_ca_file]);
    let gw = gateway("uring", &gw_args);

    let err = refused_agent(&gw, echo.addr("listen"), &["--ca", &pki.ca]);
    assert!(
        err.contains("requires a client certificate"),
        "stderr:\n{err}"
    );
    let err = refused_agent(
        &gw,
        echo.addr("listen"),
        &["--ca", &pki.ca, "--cert", &s_cert, "--key", &s_key],
    );
    assert!(
        err.contains("rejected this agent's client certificate"),
        "stderr:\n{err}"
    );
    assert_not_registered(&gw);

    let _agent = agent(
        "uring",
        &gw,
        "demo",
        echo.addr("listen"),
        &["--ca", &pki.ca, "--cert", &cert, "--key", &key],
    );
    assert_serves(&gw);
}

#[test]
fn plaintext_agent_against_tls_gateway_fails_cleanly() {
    let pki = Pki::new();
    let echo = echo("uring", 0);
    let gw = gateway("uring", &pki.gateway_args());
    let _good = agent(
        "uring",
        &gw,
        "good",
        echo.addr("listen"),
        &["--ca", &pki.ca],
    );
    wait_routable(gw.addr("public"), "good");

    let err = refused_agent(&gw, echo.addr("listen"), &[]);
    assert!(err.contains("answered with TLS"), "stderr:\n{err}");
    assert_not_registered(&gw);

    // A stranger speaking garbage on the tunnel port changes nothing.
    let mut s = connect(gw.addr("tunnel"));
    let _ = std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\n\r\n");
    drop(s);

    // The gateway kept serving the TLS agent, and counted the failures.
    assert_serves_host(&gw, "good");
    let m = metrics(gw.addr("admin"));
    assert!(
        metric_sum(&m, "ringtunnel_errors_total", "kind=\"tls_handshake\"") >= 1,
        "TLS handshake failures are counted"
    );
}

fn assert_serves_host(gw: &Proc, host: &str) {
    let r = request(
        gw.addr("public"),
        &format!("GET /bytes/1000 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 1000);
}

#[test]
fn plaintext_gateway_off_loopback_refuses_to_start() {
    // Port 0 and the check runs before any bind: nothing listens, nothing
    // is sent anywhere.
    let args = [
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--tunnel-listen",
        "0.0.0.0:0",
        "--admin-listen",
        "off",
        "--cores",
        "1",
        "--no-pin",
    ];
    let mut bg = spawn_nowait("gateway", &args);
    let code = bg.wait_exit(Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(100));
    let err = bg.stderr();
    assert!(
        matches!(code, Some(c) if c != 0),
        "must exit at once, got {code:?}"
    );
    assert!(
        err.contains("in clear") && err.contains("--insecure-plaintext"),
        "stderr:\n{err}"
    );
    assert!(!bg.stdout().contains("ready"));

    // The explicit opt-out starts (bound on a free port, no traffic).
    let mut with = args.to_vec();
    with.push("--insecure-plaintext");
    let gw = spawn("gateway", &with, "ringtunnel gateway ready");
    drop(gw);
}

#[test]
fn bad_tls_files_are_named_at_start_up() {
    let pki = Pki::new();
    let missing = pki.dir.0.join("missing.pem");
    let missing = missing.to_str().unwrap();
    let args = [
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--tunnel-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
        "--cores",
        "1",
        "--no-pin",
        "--tunnel-tls-cert",
        missing,
        "--tunnel-tls-key",
        &pki.key,
    ];
    let mut bg = spawn_nowait("gateway", &args);
    let code = bg.wait_exit(Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(100));
    assert!(matches!(code, Some(c) if c != 0));
    let err = bg.stderr();
    assert!(
        err.contains("--tunnel-tls-cert") && err.contains("missing.pem"),
        "stderr:\n{err}"
    );
}

#[test]
fn tls_uplinks_stay_and_are_counted_on_the_core_that_accepted_them() {
    // A TLS session cannot follow its fd to another core, so the gateway
    // keeps each TLS uplink where the kernel put it. The placement table
    // must say where they really are, or later plaintext uplinks of the
    // session would be balanced against a fiction.
    let pki = Pki::new();
    let echo = echo("uring", 0);
    let gw = gateway("uring", &pki.gateway_args());
    let _agent = agent(
        "uring",
        &gw,
        "demo",
        echo.addr("listen"),
        &["--ca", &pki.ca, "--uplinks", "16", "--cores", "1"],
    );
    wait_routable(gw.addr("public"), "demo");
    let t = Instant::now();
    loop {
        let stats = stats_json(gw.addr("admin"));
        let placed: Vec<u64> = session_placement(&stats, "demo")
            .unwrap_or_default()
            .into_iter()
            .map(u64::from)
            .collect();
        let open = json_numbers(&stats, "uplinks");
        if placed.iter().sum::<u64>() == 16 && placed == open {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "placement {placed:?} vs open uplinks per core {open:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_serves(&gw);
}

#[test]
fn tls_handshakes_are_bounded_by_the_handshake_deadlines() {
    use std::io::Read;
    let pki = Pki::new();
    // Gateway: a peer that opens the tunnel port and never starts TLS is
    // dropped after --header-timeout.
    let gw = gateway(
        "uring",
        &[&pki.gateway_args()[..], &["--header-timeout", "0.5"]].concat(),
    );
    let mut s = connect(gw.addr("tunnel"));
    let t = Instant::now();
    let mut b = [0u8; 64];
    let n = s.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        t.elapsed()
    );

    // Agent: a "gateway" that accepts and never answers the ClientHello
    // costs the agent --handshake-timeout, then it retries.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        silent.set_nonblocking(true).unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(4) {
            if let Ok((c, _)) = silent.accept() {
                conns.push(c);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let args = [
        "agent",
        "--gateway",
        &addr,
        "--session",
        "demo",
        "--to",
        "127.0.0.1:9",
        "--ca",
        &pki.ca,
        "--server-name",
        "localhost",
        "--handshake-timeout",
        "0.5",
        "--uplinks",
        "1",
        "--cores",
        "1",
        "--no-pin",
    ];
    let bg = spawn_nowait("agent", &args);
    assert!(
        bg.wait_stderr("no handshake answer within 0.5 s", Duration::from_secs(3)),
        "stderr:\n{}",
        bg.stderr()
    );
    drop(bg);
    held.join().unwrap();
}
