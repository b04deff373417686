//! `--config FILE`, `--print-config` and SIGHUP reloads, over real
//! processes on 127.0.0.1. Files (and certificates, made with rcgen) live
//! in a private temp dir per test.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::pki::{Ca, Dir};
use common::*;

const ALPHA: &str = "alpha-secret-0123456789abcdef";
const BETA: &str = "beta-secret-0123456789abcdef";
const GAMMA: &str = "gamma-secret-0123456789abcdef";

/// The keys every gateway file here starts with: loopback on free ports,
/// two unpinned cores (the tests share the machine).
fn gw_file(driver: &str, rest: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\ntunnel_listen = \"127.0.0.1:0\"\n\
         admin_listen = \"off\"\ncores = 2\npin = false\ndriver = \"{driver}\"\n{rest}"
    )
}

fn token_table(secret: &str, sessions: &str) -> String {
    format!("\n[[tokens]]\nsecret = \"{secret}\"\nsessions = {sessions}\n")
}

/// `ringtunnel gateway --config FILE EXTRA`, waited for its ready line;
/// stderr is kept (reload verdicts are printed there).
fn gateway_from(file: &str, extra: &[&str]) -> Bg {
    let mut args = vec!["gateway", "--config", file];
    args.extend_from_slice(extra);
    let mut bg = spawn_nowait("gateway", &args);
    let t = Instant::now();
    loop {
        let out = bg.stdout();
        if let Some(l) = out
            .lines()
            .find(|l| l.starts_with("ringtunnel gateway ready"))
        {
            bg.proc.ready = l.to_string();
            return bg;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "gateway did not start: {}",
            bg.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn agent_with(gw: &Proc, session: &str, backend: SocketAddr, extra: &[&str]) -> Proc {
    agent("legacy", gw, session, backend, extra)
}

/// Starts an agent expected to give up; returns its stderr once it exited.
fn refused_agent(gw: &Proc, session: &str, backend: SocketAddr, extra: &[&str]) -> String {
    let args = agent_args("legacy", gw, session, backend, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut bg = spawn_nowait("agent", &refs);
    let code = bg.wait_exit(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(100));
    let err = bg.stderr();
    assert!(
        matches!(code, Some(c) if c != 0),
        "agent should exit non-zero, got {code:?}; stderr:\n{err}"
    );
    err
}

/// `ringtunnel ARGS` run to completion: (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .output()
        .expect("run ringtunnel");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn hup(gw: &Bg) {
    unsafe {
        libc::kill(gw.proc.pid() as i32, libc::SIGHUP);
    }
}

/// Sends SIGHUP and waits for the gateway's verdict; `ok` says which one.
fn reload(gw: &Bg, ok: bool) {
    let before = gw.stderr().len();
    hup(gw);
    let needle = if ok {
        "configuration reloaded"
    } else {
        "reload refused"
    };
    let t = Instant::now();
    while !gw.stderr()[before..].contains(needle) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no {needle:?} after SIGHUP; stderr:\n{}",
            gw.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn get(public: SocketAddr, host: &str, path: &str) -> Resp {
    request(
        public,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
}

#[test]
fn gateway_and_agent_start_from_files() {
    let dir = Dir::new("cfg");
    let echo = echo("legacy", 0);
    let file = dir.write(
        "gw.toml",
        &gw_file(
            "legacy",
            &format!(
                "{}{}",
                token_table(ALPHA, "[\"alpha\", \"team-*\"]"),
                token_table(BETA, "[\"beta\"]")
            ),
        ),
    );
    let gw = gateway_from(&file, &[]);
    let agent_file = dir.write(
        "agent.toml",
        &format!(
            "gateway = \"{}\"\nsession = \"team-a\"\nto = \"{}\"\ntoken = \"{ALPHA}\"\n\
             cores = 1\npin = false\ndriver = \"legacy\"\n",
            gw.proc.field("tunnel"),
            echo.addr("listen")
        ),
    );
    let _agent = spawn(
        "agent",
        &["agent", "--config", &agent_file],
        "ringtunnel agent ready",
    );
    let public = gw.proc.addr("public");
    wait_routable(public, "team-a");
    assert_eq!(get(public, "team-a", "/bytes/1000").body.len(), 1000);
    // The file's tokens are the only ones: an unknown token is refused.
    let err = refused_agent(
        &gw.proc,
        "delta",
        echo.addr("listen"),
        &["--token", "not-a-configured-token"],
    );
    assert!(err.contains("bad token"), "stderr:\n{err}");
    // A second scoped token from the same file works too.
    let _b = agent_with(&gw.proc, "beta", echo.addr("listen"), &["--token", BETA]);
    wait_routable(public, "beta");
}

#[test]
fn flags_override_the_file_and_print_config_masks_secrets() {
    let dir = Dir::new("cfg");
    let hashed = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    let file = dir.write(
        "gw.toml",
        &gw_file(
            "legacy",
            &format!(
                "body_idle_timeout = 12.5\nmax_streams = 77\n{}\n[[tokens]]\n\
                 secret_sha256 = \"{hashed}\"\nsessions = [\"*\"]\nrate = \"50/s\"\n",
                token_table(ALPHA, "[\"alpha\"]")
            ),
        ),
    );
    let (code, out, err) = run(&["gateway", "--config", &file, "--print-config"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("body_idle_timeout = 12.5"), "{out}");
    assert!(out.contains("max_streams = 77"), "{out}");
    // Neither flag nor file: the flag's default.
    assert!(out.contains("write_stall_timeout = 30.0"), "{out}");
    let (code, out, err) = run(&[
        "gateway",
        "--config",
        &file,
        "--body-idle-timeout",
        "3",
        "--token",
        "cli-token-0123456789",
        "--print-config",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("body_idle_timeout = 3.0"), "{out}");
    assert!(out.contains("max_streams = 77"), "{out}");
    assert!(!out.contains(ALPHA) && !out.contains("cli-token"), "{out}");
    assert!(
        out.contains("secret = \"***\"") && out.contains("token = \"***\""),
        "{out}"
    );
    assert!(
        out.contains(hashed) && out.contains("rate = \"50/s\""),
        "{out}"
    );
    // A clap default must not beat the file: `--listen` was not given.
    assert!(out.contains("listen = \"127.0.0.1:0\""), "{out}");
    assert!(out.contains("pin = false"), "{out}");
    // `--pin` and `--no-pin` are one setting: the flag wins either way.
    let (_, out, _) = run(&["gateway", "--config", &file, "--pin", "--print-config"]);
    assert!(out.contains("pin = true"), "{out}");
    let bad_driver = dir.write("driver.toml", "driver = \"fast\"\n");
    let (code, _, err) = run(&["gateway", "--config", &bad_driver, "--print-config"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("driver = \"fast\"") && err.contains("legacy"),
        "{err}"
    );

    let agent_file = dir.write(
        "agent.toml",
        &format!("session = \"alpha\"\nto = \"127.0.0.1:3000\"\ntoken = \"{ALPHA}\"\nslot_timeout = 4.0\n"),
    );
    let (code, out, err) = run(&[
        "agent",
        "--config",
        &agent_file,
        "--session",
        "other",
        "--print-config",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("session = \"other\""), "{out}");
    assert!(out.contains("slot_timeout = 4.0"), "{out}");
    assert!(
        out.contains("token = \"***\"") && !out.contains(ALPHA),
        "{out}"
    );
}

#[test]
fn bad_files_fail_at_start_naming_key_and_line() {
    let dir = Dir::new("cfg");
    let file = dir.write(
        "gw.toml",
        &gw_file("legacy", "body_idle_timeout = 3\nbody_idel_timeout = 4\n"),
    );
    let (code, _, err) = run(&["gateway", "--config", &file]);
    assert_ne!(code, 0);
    assert!(
        err.contains("line 8") && err.contains("body_idel_timeout"),
        "stderr:\n{err}"
    );
    let file = dir.write(
        "short.toml",
        &gw_file("legacy", &token_table("short", "[\"a\"]")),
    );
    let (code, _, err) = run(&["gateway", "--config", &file]);
    assert_ne!(code, 0);
    assert!(
        err.contains("[[tokens]] #1") && err.contains("at least 16"),
        "{err}"
    );
    let file = dir.write("agent.toml", "session = \"a\"\nbackend = \"x\"\n");
    let (code, _, err) = run(&["agent", "--config", &file]);
    assert_ne!(code, 0);
    assert!(err.contains("line 2") && err.contains("backend"), "{err}");
}

#[test]
fn sighup_swaps_tokens_revokes_uplinks_and_keeps_transfers() {
    let dir = Dir::new("cfg");
    let echo = echo("legacy", 0);
    let name = "gw.toml";
    let v1 = gw_file(
        "legacy",
        &format!(
            "{}{}",
            token_table(ALPHA, "[\"alpha\"]"),
            token_table(BETA, "[\"beta\"]")
        ),
    );
    let file = dir.write(name, &v1);
    let gw = gateway_from(&file, &[]);
    let public = gw.proc.addr("public");
    let args = agent_args(
        "legacy",
        &gw.proc,
        "alpha",
        echo.addr("listen"),
        &["--token", ALPHA],
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut alpha = spawn_nowait("agent", &refs);
    let _beta = agent_with(&gw.proc, "beta", echo.addr("listen"), &["--token", BETA]);
    wait_routable(public, "alpha");
    wait_routable(public, "beta");

    // A response streaming on beta's uplinks across the reload (30 bytes,
    // one every 50 ms).
    let inflight = std::thread::spawn(move || get(public, "beta", "/drip?bytes=30&delay_ms=50"));
    std::thread::sleep(Duration::from_millis(300));
    // alpha's token goes, gamma's comes; beta's stays.
    dir.write(
        name,
        &gw_file(
            "legacy",
            &format!(
                "{}{}",
                token_table(BETA, "[\"beta\"]"),
                token_table(GAMMA, "[\"gamma\"]")
            ),
        ),
    );
    reload(&gw, true);
    let r = inflight.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body.len(), 30);

    // alpha's uplinks got GOAWAY; its agent is refused on reconnect and
    // gives up, and the session disappears.
    assert!(
        alpha
            .wait_exit(Duration::from_secs(10))
            .is_some_and(|c| c != 0),
        "the revoked agent should give up; stderr:\n{}",
        alpha.stderr()
    );
    wait_status(public, "alpha", 502, Duration::from_secs(5));
    let err = refused_agent(&gw.proc, "alpha", echo.addr("listen"), &["--token", ALPHA]);
    assert!(err.contains("bad token"), "stderr:\n{err}");
    let _gamma = agent_with(&gw.proc, "gamma", echo.addr("listen"), &["--token", GAMMA]);
    wait_routable(public, "gamma");
    assert_eq!(get(public, "beta", "/").status, 200);
}

#[test]
fn bad_file_on_sighup_keeps_the_running_configuration() {
    let dir = Dir::new("cfg");
    let echo = echo("legacy", 0);
    let name = "gw.toml";
    let file = dir.write(name, &gw_file("legacy", &token_table(ALPHA, "[\"alpha\"]")));
    let gw = gateway_from(&file, &[]);
    let public = gw.proc.addr("public");
    let _a = agent_with(&gw.proc, "alpha", echo.addr("listen"), &["--token", ALPHA]);
    wait_routable(public, "alpha");
    for broken in [
        // Unknown key.
        gw_file(
            "legacy",
            &format!("tokenz = 1\n{}", token_table(GAMMA, "[\"a\"]")),
        ),
        // A token table that does not validate.
        gw_file("legacy", &token_table("short", "[\"alpha\"]")),
        // Not TOML at all.
        "[[tokens]\n".to_string(),
    ] {
        dir.write(name, &broken);
        reload(&gw, false);
        assert_eq!(get(public, "alpha", "/").status, 200);
    }
    assert!(gw.stderr().contains("tokenz"), "{}", gw.stderr());
    // The old tokens still admit new agents.
    let _a2 = agent_with(&gw.proc, "alpha", echo.addr("listen"), &["--token", ALPHA]);
    let err = refused_agent(&gw.proc, "gamma", echo.addr("listen"), &["--token", GAMMA]);
    assert!(err.contains("bad token"), "stderr:\n{err}");
    // A valid file that changes a start-up-only setting is applied for
    // the rest and says what waits for a restart.
    dir.write(
        name,
        &gw_file(
            "legacy",
            &format!(
                "max_streams = 9
{}",
                token_table(ALPHA, "[\"alpha\"]")
            ),
        ),
    );
    reload(&gw, true);
    let err = gw.stderr();
    assert!(err.contains("next restart: max_streams"), "stderr:\n{err}");
}

#[test]
fn sighup_rotates_the_tunnel_certificate_without_dropping_uplinks() {
    let dir = Dir::new("cfg");
    let echo = echo("legacy", 0);
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let old_ca_file = dir.write("old-ca.pem", &old_ca.pem);
    let new_ca_file = dir.write("new-ca.pem", &new_ca.pem);
    let (cert, key) = old_ca.issue(&["127.0.0.1"], false, false);
    let cert_file = dir.write("gw.pem", &cert);
    let key_file = dir.write("gw.key", &key);
    let file = dir.write(
        "gw.toml",
        &gw_file(
            "legacy",
            &format!("tunnel_tls_cert = \"{cert_file}\"\ntunnel_tls_key = \"{key_file}\"\n"),
        ),
    );
    let gw = gateway_from(&file, &[]);
    let public = gw.proc.addr("public");
    let _old = agent_with(
        &gw.proc,
        "old",
        echo.addr("listen"),
        &["--ca", &old_ca_file],
    );
    wait_routable(public, "old");

    let (cert, key) = new_ca.issue(&["127.0.0.1"], false, false);
    dir.write("gw.pem", &cert);
    dir.write("gw.key", &key);
    reload(&gw, true);

    // New handshakes present the new certificate: only its CA accepts it.
    let err = refused_agent(
        &gw.proc,
        "stale",
        echo.addr("listen"),
        &["--ca", &old_ca_file],
    );
    assert!(err.contains("unknown issuer"), "stderr:\n{err}");
    let _new = agent_with(
        &gw.proc,
        "new",
        echo.addr("listen"),
        &["--ca", &new_ca_file],
    );
    wait_routable(public, "new");
    // The uplinks made under the old certificate are still there.
    let r = get(public, "old", "/bytes/200000");
    assert_eq!((r.status, r.body.len()), (200, 200_000));

    // A certificate that does not match its key is refused on reload, and
    // the new one stays in use.
    let (other_cert, _) = new_ca.issue(&["127.0.0.1"], false, false);
    dir.write("gw.pem", &other_cert);
    reload(&gw, false);
    let _new2 = agent_with(
        &gw.proc,
        "new2",
        echo.addr("listen"),
        &["--ca", &new_ca_file],
    );
    wait_routable(public, "new2");
}

/// A GET on an open keep-alive connection; its status, 0 if the
/// connection was closed instead (a connection refused at accept gets a
/// 503 or just the close).
fn get_on(s: &mut std::net::TcpStream, host: &str) -> u16 {
    use std::io::Write;
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    read_response(s, &mut Vec::new(), false).map_or(0, |r| r.status)
}

#[test]
fn sighup_lowers_max_conns_per_ip_for_new_connections_only() {
    let dir = Dir::new("cfg");
    let echo = echo("legacy", 0);
    let name = "gw.toml";
    let tokens = token_table(ALPHA, "[\"alpha\"]");
    let file = dir.write(
        name,
        &gw_file("legacy", &format!("max_conns_per_ip = 10\n{tokens}")),
    );
    let gw = gateway_from(&file, &[]);
    let public = gw.proc.addr("public");
    let _a = agent_with(&gw.proc, "alpha", echo.addr("listen"), &["--token", ALPHA]);
    wait_routable(public, "alpha");
    let mut held: Vec<_> = (0..3).map(|_| connect(public)).collect();
    for s in &mut held {
        assert_eq!(get_on(s, "alpha"), 200);
    }
    dir.write(
        name,
        &gw_file("legacy", &format!("max_conns_per_ip = 2\n{tokens}")),
    );
    reload(&gw, true);
    assert!(
        !gw.stderr().contains("next restart"),
        "max_conns_per_ip applies live; stderr:\n{}",
        gw.stderr()
    );
    // The three connections admitted under the old limit stay.
    for s in &mut held {
        assert_eq!(get_on(s, "alpha"), 200);
    }
    // A new one is over the new limit.
    let mut extra = connect(public);
    let status = get_on(&mut extra, "alpha");
    assert!(status == 503 || status == 0, "admitted: {status}");
    // Down to one held: exactly one more fits (once the closes are seen).
    held.truncate(1);
    let t = Instant::now();
    let mut fits = loop {
        let mut s = connect(public);
        if get_on(&mut s, "alpha") == 200 {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "slots never freed");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut over = connect(public);
    let status = get_on(&mut over, "alpha");
    assert!(status == 503 || status == 0, "admitted: {status}");
    assert_eq!(get_on(&mut fits, "alpha"), 200);
    assert_eq!(get_on(&mut held[0], "alpha"), 200);
}

/// `n` requests for `host`, each on a fresh connection; their statuses.
fn statuses(public: SocketAddr, host: &str, n: usize) -> Vec<u16> {
    (0..n).map(|_| get(public, host, "/").status).collect()
}

#[test]
fn sighup_changes_session_and_per_ip_rates() {
    let dir = Dir::new("cfg");
    let echo = echo("legacy", 0);
    let name = "gw.toml";
    let tokens = token_table(ALPHA, "[\"alpha\"]");
    // Generous at first: waiting for the session spends some of it.
    let v1 = gw_file(
        "legacy",
        &format!("session_rate = \"1/h\"\nsession_burst = 1000\n{tokens}"),
    );
    let file = dir.write(name, &v1);
    let gw = gateway_from(&file, &[]);
    let public = gw.proc.addr("public");
    let _a = agent_with(&gw.proc, "alpha", echo.addr("listen"), &["--token", ALPHA]);
    wait_routable(public, "alpha");
    assert_eq!(statuses(public, "alpha", 3), [200, 200, 200]);

    // A new burst of 3: a new cell, so exactly 3 pass from now on.
    let v2 = gw_file(
        "legacy",
        &format!("session_rate = \"1/h\"\nsession_burst = 3\n{tokens}"),
    );
    dir.write(name, &v2);
    reload(&gw, true);
    assert!(!gw.stderr().contains("next restart"), "{}", gw.stderr());
    let got = statuses(public, "alpha", 6);
    assert_eq!(got, [200, 200, 200, 429, 429, 429]);

    // The session rate goes; the token's rule limits each client IP to 2.
    let v3 = gw_file(
        "legacy",
        &format!("{tokens}rate_per_ip = \"1/h\"\nburst_per_ip = 2\n"),
    );
    dir.write(name, &v3);
    reload(&gw, true);
    let got = statuses(public, "alpha", 4);
    assert_eq!(got, [200, 200, 429, 429]);
    let r = get(public, "alpha", "/");
    assert!(r.text().contains("your address"), "{}", r.text());
}

#[test]
fn sessions_table_sets_a_sessions_rates_over_its_token() {
    let dir = Dir::new("cfg");
    let echo = echo("legacy", 0);
    let name = "gw.toml";
    // The token's own rate is generous (waiting for the session spends
    // some of it).
    let tokens = format!(
        "{}rate = \"1/h\"\nburst = 1000\n",
        token_table(ALPHA, "[\"alpha\"]")
    );
    let file = dir.write(name, &gw_file("legacy", &tokens));
    let gw = gateway_from(&file, &[]);
    let public = gw.proc.addr("public");
    let _a = agent_with(&gw.proc, "alpha", echo.addr("listen"), &["--token", ALPHA]);
    wait_routable(public, "alpha");
    assert_eq!(statuses(public, "alpha", 3), [200, 200, 200]);

    // A [[sessions]] table for alpha wins over the token's rule.
    let table = "\n[[sessions]]\nname = \"alpha\"\nrate = \"1/h\"\nburst = 2\n";
    dir.write(name, &gw_file("legacy", &format!("{tokens}{table}")));
    reload(&gw, true);
    assert_eq!(statuses(public, "alpha", 4), [200, 200, 429, 429]);

    // A table for another name leaves alpha to its token again.
    let other = "\n[[sessions]]\nname = \"beta\"\nrate = \"1/h\"\nburst = 1\n";
    dir.write(name, &gw_file("legacy", &format!("{tokens}{other}")));
    reload(&gw, true);
    assert_eq!(statuses(public, "alpha", 3), [200, 200, 200]);

    // A bad table is refused and the running rules stay.
    let bad = "\n[[sessions]]\nname = \"Alpha!\"\nrate = \"5/s\"\n";
    dir.write(name, &gw_file("legacy", &format!("{tokens}{bad}")));
    reload(&gw, false);
    assert!(
        gw.stderr().contains("not a session name"),
        "{}",
        gw.stderr()
    );
    assert_eq!(statuses(public, "alpha", 2), [200, 200]);
}
