//! Scoped tokens, owned names, the session lease, held requests and agent
//! drain, over real sockets: an in-process gateway (the scoped rules have
//! no flag of their own; the config file will carry them) and real agent
//! processes, stopped and restarted by PID.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ringtunnel::config::{Cores, GatewayConfig};
use ringtunnel::gateway::Gateway;
use ringtunnel::runtime::DriverKind;
use ringtunnel::scope::{Secret, TokenRule};

fn rule(secret: &str, sessions: &[&str]) -> TokenRule {
    TokenRule {
        sessions: sessions.iter().map(|s| s.to_string()).collect(),
        ..TokenRule::any_session(secret)
    }
}

/// A 2-core gateway on loopback with `rules`, a lease and a hold timeout.
fn gateway_with(rules: Vec<TokenRule>, lease: Duration, hold: Duration) -> Gateway {
    ringtunnel::gateway::start(GatewayConfig {
        listen: "127.0.0.1:0".into(),
        tunnel_listen: "127.0.0.1:0".into(),
        admin_listen: None,
        cores: Cores::new(Some(2), false, DriverKind::Auto),
        tokens: rules,
        session_lease: lease,
        hold_timeout: hold,
        ..GatewayConfig::default()
    })
    .expect("gateway starts")
}

fn agent_argv(gw: &Gateway, session: &str, backend: SocketAddr, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "agent",
        "--gateway",
        &gw.tunnel_addr().to_string(),
        "--session",
        session,
        "--to",
        &backend.to_string(),
        "--no-pin",
        "--cores",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// An agent process that must become ready.
fn agent_ready(gw: &Gateway, session: &str, backend: SocketAddr, extra: &[&str]) -> Proc {
    let args = agent_argv(gw, session, backend, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn("agent", &refs, "ringtunnel agent ready")
}

/// An agent process watched through its output (it may be refused).
fn agent_bg(gw: &Gateway, session: &str, backend: SocketAddr, extra: &[&str]) -> Bg {
    let args = agent_argv(gw, session, backend, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_nowait("agent-bg", &refs)
}

fn get(public: SocketAddr, host: &str, path: &str) -> Resp {
    request(
        public,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
}

fn public_conns(gw: &Gateway) -> u64 {
    gw.stats()
        .iter()
        .map(|s| s.public_conns.load(Ordering::SeqCst))
        .sum()
}

const SEC: Duration = Duration::from_secs(1);

#[test]
fn a_token_cannot_claim_outside_its_scope() {
    let gw = gateway_with(vec![rule("alpha-key", &["alpha", "team-*"])], SEC, SEC);
    let b = tag_backend("A");
    let _ok = agent_ready(&gw, "team-x", b, &["--token", "alpha-key"]);
    let out = agent_bg(&gw, "beta", b, &["--token", "alpha-key"]);
    assert!(
        out.wait_stderr("token not allowed to claim 'beta'", 5 * SEC),
        "{}",
        out.stderr()
    );
    // BAD_SESSION is final: the agent gives up instead of retrying.
    let mut p = out.proc;
    let t = Instant::now();
    while p.child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < 5 * SEC, "a refused agent must exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Never claimed: no tunnel for that host.
    assert_eq!(get(gw.public_addr(), "beta", "/").status, 404);
    let r = get(gw.public_addr(), "team-x", "/");
    assert!(r.text().starts_with("backend=A\n"), "{}", r.text());
}

#[test]
fn a_hashed_secret_admits_the_token_that_hashes_to_it() {
    use sha2::{Digest, Sha256};
    let sha: [u8; 32] = Sha256::digest(b"hashed-secret").into();
    let gw = gateway_with(
        vec![TokenRule {
            secret: Secret::Sha256(sha),
            ..rule("", &["hashed"])
        }],
        SEC,
        SEC,
    );
    let _a = agent_ready(
        &gw,
        "hashed",
        tag_backend("S"),
        &["--token", "hashed-secret"],
    );
    let r = get(gw.public_addr(), "hashed", "/");
    assert!(r.text().starts_with("backend=S\n"), "{}", r.text());
    let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
    let bad = agent_bg(&gw, "hashed", tag_backend("T"), &["--token", &hex]);
    assert!(bad.wait_stderr("bad token", 5 * SEC), "{}", bad.stderr());
}

#[test]
fn same_token_other_agent_is_refused_unless_pooled() {
    let rules = vec![
        rule("solo-key", &["solo"]),
        TokenRule {
            pool: true,
            ..rule("pool-key", &["pooled"])
        },
    ];
    let gw = gateway_with(rules, SEC, SEC);
    let public = gw.public_addr();
    let (ba, bb) = (tag_backend("A"), tag_backend("B"));

    let _a = agent_ready(&gw, "solo", ba, &["--token", "solo-key", "--agent-id", "1"]);
    let b = agent_bg(&gw, "solo", bb, &["--token", "solo-key", "--agent-id", "2"]);
    assert!(
        b.wait_stderr("session 'solo' is held by another agent", 5 * SEC),
        "{}",
        b.stderr()
    );
    for i in 0..20 {
        let r = get(public, "solo", &format!("/s{i}"));
        assert!(r.text().starts_with("backend=A\n"), "{i}: {}", r.text());
    }
    drop(b);

    // pool = true: both agents serve the session; requests reach both.
    let _pa = agent_ready(
        &gw,
        "pooled",
        ba,
        &["--token", "pool-key", "--agent-id", "1"],
    );
    let mut pb = agent_ready(
        &gw,
        "pooled",
        bb,
        &["--token", "pool-key", "--agent-id", "2"],
    );
    let (mut seen_a, mut seen_b) = (0, 0);
    for i in 0..60 {
        let r = get(public, "pooled", &format!("/p{i}"));
        assert_eq!(r.status, 200, "{}", r.text());
        if r.text().starts_with("backend=A\n") {
            seen_a += 1;
        } else if r.text().starts_with("backend=B\n") {
            seen_b += 1;
        }
    }
    assert!(seen_a > 0 && seen_b > 0, "A {seen_a}, B {seen_b}");
    // One of them goes away: the other carries on alone.
    pb.kill();
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..20 {
        let r = get(public, "pooled", &format!("/q{i}"));
        assert!(r.text().starts_with("backend=A\n"), "{i}: {}", r.text());
    }
}

#[test]
fn lease_keeps_the_name_for_its_owner_then_frees_it() {
    let lease = Duration::from_secs(3);
    let gw = gateway_with(vec![TokenRule::any_session("k")], lease, SEC);
    let public = gw.public_addr();
    let (ba, bb) = (tag_backend("owner"), tag_backend("stranger"));
    let owner = ["--token", "k", "--agent-id", "1"];
    let stranger = ["--token", "k", "--agent-id", "2"];

    let mut a = agent_ready(&gw, "leased", ba, &owner);
    a.kill();
    let s = agent_bg(&gw, "leased", bb, &stranger);
    assert!(
        s.wait_stderr("session 'leased' is reserved for its owner for", 5 * SEC),
        "{}",
        s.stderr()
    );
    drop(s);
    // The owner is back within the lease: its name, its backend.
    let mut a = agent_ready(&gw, "leased", ba, &owner);
    let r = get(public, "leased", "/");
    assert!(r.text().starts_with("backend=owner\n"), "{}", r.text());

    a.kill();
    let gone = Instant::now();
    std::thread::sleep(lease + Duration::from_millis(300));
    let _s = agent_ready(&gw, "leased", bb, &stranger);
    assert!(gone.elapsed() >= lease);
    let r = get(public, "leased", "/");
    assert!(r.text().starts_with("backend=stranger\n"), "{}", r.text());
}

#[test]
fn held_requests_succeed_when_the_agent_returns_and_get_502_after_the_timeout() {
    let hold = Duration::from_secs(3);
    let gw = gateway_with(vec![], Duration::from_secs(30), hold);
    let public = gw.public_addr();
    let b = tag_backend("H");
    let args = ["--token", "t", "--agent-id", "7"];
    let mut a = agent_ready(&gw, "held", b, &args);
    assert_eq!(public_conns(&gw), 0);
    a.kill();
    std::thread::sleep(Duration::from_millis(200));

    // Requests sent while the agent is away wait; it is back after ~1 s.
    let waiting: Vec<_> = (0..4)
        .map(|i| std::thread::spawn(move || get(public, "held", &format!("/w{i}"))))
        .collect();
    std::thread::sleep(SEC);
    let _a = agent_ready(&gw, "held", b, &args);
    for (i, w) in waiting.into_iter().enumerate() {
        let r = w.join().unwrap();
        assert_eq!(r.status, 200, "{i}: {}", r.text());
        assert!(r.text().starts_with("backend=H\n"), "{}", r.text());
    }
    drop(_a);

    // Nobody comes back: 502 after the hold timeout, not before.
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let waiting: Vec<_> = (0..4)
        .map(|i| std::thread::spawn(move || get(public, "held", &format!("/x{i}"))))
        .collect();
    for w in waiting {
        let r = w.join().unwrap();
        assert_eq!(r.status, 502, "{}", r.text());
        assert!(
            r.text().contains("no agent connected for host"),
            "{}",
            r.text()
        );
    }
    let waited = t.elapsed();
    assert!(waited >= hold - Duration::from_millis(200), "{waited:?}");
    assert!(waited < hold + 3 * SEC, "{waited:?}");
    // The held connections are all gone again.
    let t = Instant::now();
    while public_conns(&gw) != 0 {
        assert!(t.elapsed() < 5 * SEC, "public_conns {}", public_conns(&gw));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn hold_queue_is_bounded() {
    let gw = ringtunnel::gateway::start(GatewayConfig {
        listen: "127.0.0.1:0".into(),
        tunnel_listen: "127.0.0.1:0".into(),
        admin_listen: None,
        // One core, so both requests queue on the same one.
        cores: Cores::new(Some(1), false, DriverKind::Auto),
        hold_timeout: Duration::from_secs(2),
        hold_queue: 1,
        ..GatewayConfig::default()
    })
    .unwrap();
    let public = gw.public_addr();
    let mut a = agent_ready(&gw, "busy", tag_backend("Q"), &["--agent-id", "3"]);
    a.kill();
    std::thread::sleep(Duration::from_millis(200));
    let first = std::thread::spawn(move || get(public, "busy", "/1"));
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let r = get(public, "busy", "/2");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(t.elapsed() < SEC, "a full queue answers at once");
    assert_eq!(first.join().unwrap().status, 502);
}

#[test]
fn max_sessions_and_max_uplinks_are_enforced_at_claim() {
    let rules = vec![
        TokenRule {
            max_sessions: Some(1),
            ..rule("one-session", &["*"])
        },
        TokenRule {
            max_uplinks: Some(1),
            ..rule("one-uplink", &["*"])
        },
    ];
    let gw = gateway_with(rules, SEC, SEC);
    let b = tag_backend("L");
    let _a = agent_ready(&gw, "first", b, &["--token", "one-session"]);
    let s = agent_bg(&gw, "second", b, &["--token", "one-session"]);
    assert!(
        s.wait_stderr("token may hold at most 1 sessions", 5 * SEC),
        "{}",
        s.stderr()
    );
    let u = agent_bg(
        &gw,
        "narrow",
        b,
        &["--token", "one-uplink", "--uplinks", "2"],
    );
    assert!(
        u.wait_stderr("token may hold at most 1 uplinks", 5 * SEC),
        "{}",
        u.stderr()
    );
    // The one uplink it may have serves.
    let r = get(gw.public_addr(), "narrow", "/");
    assert!(r.text().starts_with("backend=L\n"), "{}", r.text());
}

/// 8 clients POST 256 KiB bodies to /echo and check every byte, while the
/// agent is restarted 3 times. Returns (ok, failed).
fn restart_under_load(graceful: bool) -> (u64, u64) {
    let echo = echo("uring", 0);
    // Held requests wait up to the hold timeout for the new agent: 15 s,
    // because on a loaded 2-core machine starting the new (debug) agent
    // took more than the default 5 s, and the held requests got 502.
    let gw = gateway_with(vec![], Duration::from_secs(30), Duration::from_secs(15));
    let public = gw.public_addr();
    let args = ["--agent-id", "11"];
    let mut agent = agent_ready(&gw, "roll", echo.addr("listen"), &args);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..8u64)
        .map(|t| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                let mut conn: Option<std::net::TcpStream> = None;
                let mut buf = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let seed = t * 1_000_003 + i;
                    let body: Vec<u8> = (0..256 * 1024u64)
                        .map(|j| (j.wrapping_mul(31) ^ seed.wrapping_mul(7)) as u8)
                        .collect();
                    let c = conn.get_or_insert_with(|| {
                        buf.clear();
                        connect(public)
                    });
                    let head = format!(
                        "POST /echo HTTP/1.1\r\nHost: roll\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    let sent = c
                        .write_all(head.as_bytes())
                        .and_then(|_| c.write_all(&body))
                        .is_ok();
                    let r = if sent {
                        read_response(c, &mut buf, false)
                    } else {
                        None
                    };
                    match r {
                        Some(r) if r.status == 200 => {
                            // Never a corrupted byte.
                            assert_eq!(r.body.len(), body.len(), "client {t} request {i}");
                            assert_eq!(checksum(&r.body), checksum(&body), "client {t} req {i}");
                            ok.fetch_add(1, Ordering::SeqCst);
                            if r.header("connection") == Some("close") {
                                conn = None;
                            }
                        }
                        other => {
                            if let Some(r) = other {
                                eprintln!("client {t} request {i}: {} {}", r.status, r.text());
                            } else {
                                eprintln!("client {t} request {i}: no response");
                            }
                            failed.fetch_add(1, Ordering::SeqCst);
                            conn = None;
                        }
                    }
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        if graceful {
            assert!(
                agent.terminate(Duration::from_secs(15)),
                "agent drains and exits"
            );
        } else {
            agent.kill();
        }
        agent = agent_ready(&gw, "roll", echo.addr("listen"), &args);
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("no corrupted byte");
    }
    eprintln!(
        "restarts graceful={graceful}: {} ok, {} failed in {:?}",
        ok.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
        t0.elapsed()
    );
    drop(agent);
    (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst))
}

#[test]
fn sigterm_restarts_lose_no_request() {
    let (ok, failed) = restart_under_load(true);
    assert!(ok > 50, "too little traffic to prove anything: {ok}");
    assert_eq!(failed, 0, "requests lost across graceful restarts");
}

#[test]
fn sigkill_restarts_lose_at_most_the_requests_in_flight() {
    let (ok, failed) = restart_under_load(false);
    assert!(ok > 50, "too little traffic to prove anything: {ok}");
    // 8 clients, one request each in flight per kill.
    assert!(failed <= 3 * 8, "{failed} failed");
}

#[test]
fn a_draining_agent_does_not_count_toward_max_uplinks() {
    let rules = vec![TokenRule {
        max_uplinks: Some(2),
        ..rule("two-uplinks-key", &["*"])
    }];
    let gw = gateway_with(rules, Duration::from_secs(30), Duration::from_secs(5));
    let public = gw.public_addr();
    let echo = echo("uring", 0);
    let args = [
        "--token",
        "two-uplinks-key",
        "--agent-id",
        "21",
        "--uplinks",
        "2",
    ];
    let mut old = agent_ready(&gw, "drain", echo.addr("listen"), &args);
    // A response that takes 6 s keeps one old uplink draining.
    let inflight = std::thread::spawn(move || get(public, "drain", "/drip?bytes=60&delay_ms=100"));
    std::thread::sleep(Duration::from_millis(500));
    unsafe {
        libc::kill(old.pid() as i32, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(300));
    // The same agent id, restarted: its 2 uplinks are accepted although
    // the old process still holds a draining one (before, this waited for
    // the drain to end: max_uplinks counted it).
    let _new = agent_ready(&gw, "drain", tag_backend("new"), &args);
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the old agent should still be draining"
    );
    assert!(!inflight.is_finished(), "the long response ended too soon");
    let r = get(public, "drain", "/");
    assert!(r.text().starts_with("backend=new\n"), "{}", r.text());
    // The drained request finishes whole, then the old agent exits.
    let r = inflight.join().unwrap();
    assert_eq!((r.status, r.body.len()), (200, 60), "{}", r.text());
    let t = Instant::now();
    while old.child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < 10 * SEC, "the old agent never exited");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn held_requests_get_503_when_the_gateway_shuts_down() {
    let driver = "uring";
    let mut gw = gateway(
        driver,
        &[
            "--session-lease",
            "30",
            "--hold-timeout",
            "30",
            "--shutdown-grace",
            "5",
        ],
    );
    let public = gw.addr("public");
    let mut a = agent(driver, &gw, "away", tag_backend("A"), &["--agent-id", "5"]);
    wait_routable(public, "away");
    a.kill();
    std::thread::sleep(Duration::from_millis(300));
    let waiting: Vec<_> = (0..3)
        .map(|i| std::thread::spawn(move || get(public, "away", &format!("/h{i}"))))
        .collect();
    // One more held client goes away before the shutdown (reset).
    let mut gone = connect(public);
    gone.write_all(b"GET /gone HTTP/1.1\r\nHost: away\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(waiting.iter().all(|w| !w.is_finished()), "not held");
    abort(gone);
    std::thread::sleep(Duration::from_millis(100));
    // The hold timeout is 30 s; the gateway must answer them and exit
    // within its 5 s grace instead.
    assert!(gw.terminate(Duration::from_secs(7)), "gateway did not exit");
    for w in waiting {
        let r = w.join().unwrap();
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.text().contains("shutting down"), "{}", r.text());
        assert_eq!(r.header("Retry-After"), Some("1"));
        assert_eq!(r.header("Connection"), Some("close"));
    }
}

#[test]
fn requests_for_unknown_or_leased_hosts_never_take_the_claims_lock() {
    let hold = Duration::from_millis(300);
    let gw = gateway_with(vec![], Duration::from_secs(30), hold);
    let public = gw.public_addr();
    let mut a = agent_ready(&gw, "leased", tag_backend("L"), &["--agent-id", "4"]);
    a.kill();
    // The uplinks' release (which locks the registry) is over.
    std::thread::sleep(Duration::from_millis(300));
    let before = gw.claims_lock_count();
    // A flood for names nobody holds: 404 at once.
    for i in 0..300 {
        let r = get(public, &format!("nobody-{i}"), "/");
        assert_eq!(r.status, 404, "{}", r.text());
    }
    // Requests for the leased name are held, then 502.
    let held: Vec<_> = (0..16)
        .map(|i| std::thread::spawn(move || get(public, "leased", &format!("/{i}"))))
        .collect();
    for h in held {
        assert_eq!(h.join().unwrap().status, 502);
    }
    assert_eq!(gw.claims_lock_count(), before);
}
