//! Around the binary: shell completions and the manual page come from the
//! same clap definitions as the parser; addresses as people type them;
//! nonsense refused at start (real processes, stdout/stderr checked).

mod common;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn stdout_of(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run ringtunnel");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn completions_know_the_subcommands_and_their_flags() {
    for shell in ["bash", "zsh", "fish"] {
        let s = stdout_of(&["completions", shell]);
        for word in [
            "gateway",
            "agent",
            "tunnel-listen",
            "session-lease",
            "backend-timeout",
        ] {
            assert!(s.contains(word), "{shell} completion lacks {word}");
        }
    }
    let bad = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!bad.status.success(), "an unknown shell was accepted");
}

#[test]
fn man_has_a_page_per_subcommand() {
    let m = stdout_of(&["man"]);
    assert!(m.contains(".TH ringtunnel 1"), "no top page");
    for sub in ["gateway", "agent", "echo", "bench", "demo"] {
        assert!(
            m.contains(&format!(".TH ringtunnel-{sub} 1")),
            "no page for {sub}"
        );
    }
    assert!(
        m.contains("write\\-stall\\-timeout"),
        "flags missing from the pages"
    );
}

#[test]
fn a_bare_port_is_a_local_backend() {
    let echo = echo("uring", 0);
    let gw = gateway("uring", &[]);
    let port = echo.addr("listen").port().to_string();
    let tunnel = gw.field("tunnel");
    let _agent = spawn(
        "agent",
        &[
            "agent",
            "--gateway",
            &tunnel,
            "--session",
            "demo",
            "--to",
            &port,
            "--cores",
            "1",
            "--no-pin",
        ],
        "ringtunnel agent ready",
    );
    let p = gw.addr("public");
    wait_routable(p, "demo");
    let r = request(
        p,
        "GET /echo HTTP/1.1\r\nHost: demo\r\nContent-Length: 2\r\n\r\nhi",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, b"hi");
}

#[test]
fn zero_cores_and_https_backends_are_refused_at_start() {
    for (args, want) in [
        (
            &["echo", "--listen", "127.0.0.1:0", "--cores", "0"][..],
            "--cores 0",
        ),
        (
            &[
                "agent",
                "--session",
                "x",
                "--to",
                "https://127.0.0.1:3000",
                "--cores",
                "1",
            ][..],
            "plain HTTP",
        ),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

// ---------------------------------------------------------------------
// What a new user meets: the one-liner, the Forwarding line, request
// lines, backend failures, wrong ports.
// ---------------------------------------------------------------------

/// Environment for a child that must not read the runner's own config
/// file: an empty home and config directory.
fn clean_env(home: &str) -> Vec<(&'static str, String)> {
    vec![
        ("HOME", home.to_string()),
        ("XDG_CONFIG_HOME", format!("{home}/config")),
    ]
}

fn envs<'a>(
    base: &'a [(&'static str, String)],
    more: &[(&'static str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut v: Vec<(&str, &str)> = base
        .iter()
        .filter(|(k, _)| !more.iter().any(|(m, _)| m == k))
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    v.extend(more.iter().copied());
    v
}

/// Waits for a line starting with `prefix` on the child's stdout.
fn wait_stdout_line(bg: &Bg, prefix: &str) -> String {
    let t = Instant::now();
    loop {
        if let Some(l) = bg.stdout().lines().find(|l| l.starts_with(prefix)) {
            return l.to_string();
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "no {prefix:?} line; stdout: {} stderr: {}",
            bg.stdout(),
            bg.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

const REQUEST_LOG: &str = "warn,ringtunnel::request=info";

#[test]
fn one_liner_against_a_localhost_domain_gateway_works_with_curl() {
    let home = pki::Dir::new("http-home");
    let base = clean_env(home.0.to_str().unwrap());
    let echo = echo("uring", 0);
    let gw = gateway("uring", &["--domain", "localhost"]);
    // Before any agent: a Host that names nothing says how hosts map.
    let r = request(
        gw.addr("public"),
        "GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 502);
    assert!(
        r.text().starts_with("no tunnel for host 'example.com'\n"),
        "{}",
        r.text()
    );
    assert!(r.text().contains("NAME.localhost"), "{}", r.text());
    let tunnel = gw.field("tunnel");
    let port = echo.addr("listen").port().to_string();
    let http = spawn_nowait_env(
        "http",
        &["http", &port, "--cores", "1"],
        &envs(
            &base,
            &[("RINGTUNNEL_GATEWAY", &tunnel), ("RUST_LOG", REQUEST_LOG)],
        ),
    );
    let line = wait_stdout_line(&http, "Forwarding ");
    // Forwarding http://brave-otter-3f2a.localhost:PORT -> 127.0.0.1:P
    let url = line.split_whitespace().nth(1).unwrap().to_string();
    let public_port = gw.addr("public").port();
    let name = url
        .strip_prefix("http://")
        .and_then(|r| r.strip_suffix(&format!(".localhost:{public_port}")))
        .unwrap_or_else(|| panic!("{line}"));
    let words: Vec<&str> = name.split('-').collect();
    assert_eq!(words.len(), 3, "{name}");
    assert!(words[2].len() == 4 && words[2].bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(
        line.ends_with(&format!("-> {}", echo.addr("listen"))),
        "{line}"
    );
    wait_stdout_line(&http, "ringtunnel agent ready");
    wait_routable(gw.addr("public"), name);
    // As the README has it: curl resolves *.localhost to 127.0.0.1 itself.
    let out = Command::new("curl")
        .args([
            "-sS",
            "-m",
            "10",
            "--data-binary",
            "hi",
            &format!("{url}/echo"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi", "{out:?}");
    assert!(
        http.wait_stderr("POST /echo 200 ", Duration::from_secs(5)),
        "no request line: {}",
        http.stderr()
    );
}

#[test]
fn one_liner_reads_the_user_config_file() {
    let home = pki::Dir::new("http-file");
    let base = clean_env(home.0.to_str().unwrap());
    let echo = echo("uring", 0);
    let secret = "file-token-0123456789";
    let gw = gateway("uring", &["--token", secret]);
    std::fs::create_dir_all(home.0.join("config/ringtunnel")).unwrap();
    std::fs::write(
        home.0.join("config/ringtunnel/agent.toml"),
        format!(
            "gateway = \"{}\"\ntoken = \"{secret}\"\ncores = 1\n",
            gw.field("tunnel")
        ),
    )
    .unwrap();
    let port = echo.addr("listen").port().to_string();
    let http = spawn_nowait_env(
        "http",
        &["http", &port, "--name", "myapp", "--quiet"],
        &envs(&base, &[("RUST_LOG", REQUEST_LOG)]),
    );
    let line = wait_stdout_line(&http, "Forwarding ");
    // No --domain on this gateway: the line says which Host to send.
    assert!(line.starts_with("Forwarding http://myapp -> "), "{line}");
    assert!(line.contains("Host: myapp"), "{line}");
    wait_stdout_line(&http, "ringtunnel agent ready");
    wait_routable(gw.addr("public"), "myapp");
    let r = request(
        gw.addr("public"),
        "GET /quiet HTTP/1.1\r\nHost: myapp\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 404, "{}", r.text());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !http.stderr().contains("GET /"),
        "--quiet printed: {}",
        http.stderr()
    );
}

#[test]
fn backend_failures_are_logged_once_with_the_address() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw = gateway("uring", &[]);
    let args = agent_args("uring", &gw, "dead", dead, &["--cores", "1"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = spawn_nowait_env("agent", &refs, &[("RUST_LOG", "info")]);
    assert!(
        agent.wait_stderr(
            &format!("nothing answers on {dead}"),
            Duration::from_secs(5)
        ),
        "{}",
        agent.stderr()
    );
    wait_stdout_line(&agent, "ringtunnel agent ready");
    let public = gw.addr("public");
    wait_status(public, "dead", 502, Duration::from_secs(5));
    for i in 0..5 {
        let r = request(
            public,
            &format!("GET /x{i} HTTP/1.1\r\nHost: dead\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(r.status, 502, "{}", r.text());
    }
    assert!(
        agent.wait_stderr("GET /x4 502 ", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    let err = agent.stderr();
    let warns = err
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(&format!("backend {dead}: cannot connect")))
        .count();
    // Six failures within WARN_EVERY (5 s): one line, not six.
    assert_eq!(warns, 1, "{err}");
    assert!(err.contains("backend refused or unreachable"), "{err}");
}

#[test]
fn an_agent_on_the_http_port_exits_and_says_so() {
    let gw = gateway("uring", &[]);
    let public = gw.field("public");
    let mut agent = spawn_nowait(
        "agent",
        &[
            "agent",
            "--gateway",
            &public,
            "--session",
            "x",
            "--to",
            "1",
            "--cores",
            "1",
        ],
    );
    let code = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(2), "{}", agent.stderr());
    assert!(
        agent
            .stderr()
            .contains("is an HTTP port, not a tunnel port"),
        "{}",
        agent.stderr()
    );
    // Said once by the agent and once as its exit reason; never retried.
    assert!(
        !agent.stderr().contains("reconnecting"),
        "{}",
        agent.stderr()
    );
}

#[test]
fn wrong_clients_on_the_tunnel_and_public_ports_are_told_or_logged() {
    let mut args = GATEWAY_BASE.to_vec();
    args.extend(["--cores", "1", "--no-pin"]);
    let gw = spawn_nowait_env("gateway", &args, &[("RUST_LOG", "warn")]);
    let ready = wait_stdout_line(&gw, "ringtunnel gateway ready");
    let field = |k: &str| -> std::net::SocketAddr {
        ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (public, tunnel) = (field("public"), field("tunnel"));
    let fds = gw.proc.fd_count();
    // curl on the tunnel port: a plain 400 that names the HTTP port.
    let r = request(tunnel, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("tunnel port"), "{}", r.text());
    assert!(r.text().contains(&public.to_string()), "{}", r.text());
    // A TLS ClientHello, three times on each port: closed without an
    // HTTP answer, logged once per port (a minute's rate limit).
    let hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 not really a full client hello";
    for addr in [tunnel, public, tunnel, public, tunnel, public] {
        let mut s = connect(addr);
        s.write_all(hello).unwrap();
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut got);
        assert!(
            got.is_empty(),
            "answered {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    assert!(gw.wait_stderr("plain HTTP listener", Duration::from_secs(5)));
    assert!(gw.wait_stderr("plaintext tunnel listener", Duration::from_secs(5)));
    let err = gw.stderr();
    assert_eq!(err.matches("TLS client").count(), 2, "{err}");
    // Nothing of theirs is left open.
    wait_fds_at_most(&gw.proc, fds);
}

#[test]
fn a_plaintext_tunnel_listener_defaults_to_loopback() {
    // So `ringtunnel gateway --domain localhost` starts as the README has
    // it; with a certificate the default faces the network.
    let plain = stdout_of(&["gateway", "--print-config"]);
    assert!(
        plain.contains("tunnel_listen = \"127.0.0.1:7000\""),
        "{plain}"
    );
    let tls = stdout_of(&[
        "gateway",
        "--print-config",
        "--tunnel-tls-cert",
        "gw.pem",
        "--tunnel-tls-key",
        "gw.key",
    ]);
    assert!(tls.contains("tunnel_listen = \"0.0.0.0:7000\""), "{tls}");
}

/// A backend that accepts and reads a request, then closes at once
/// (`close`) or never answers (its connections held until the test ends).
fn bad_backend(close: bool) -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut c, &mut buf);
            if !close {
                held.push(c);
            }
        }
    });
    addr
}

#[test]
fn backend_resets_and_timeouts_are_warned_with_the_address() {
    let gw = gateway("uring", &[]);
    let public = gw.addr("public");
    for (session, close, status, words) in [
        (
            "reset",
            true,
            502,
            "connection closed or reset before a complete response head",
        ),
        (
            "slow",
            false,
            504,
            "no response within --backend-timeout (1 s)",
        ),
    ] {
        let backend = bad_backend(close);
        let args = agent_args(
            "uring",
            &gw,
            session,
            backend,
            &["--cores", "1", "--backend-timeout", "1"],
        );
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = spawn_nowait_env("agent", &refs, &[("RUST_LOG", "warn")]);
        wait_stdout_line(&agent, "ringtunnel agent ready");
        let r = wait_status(public, session, status, Duration::from_secs(10));
        assert_eq!(r.status, status, "{}", r.text());
        let want = format!("backend {backend}: {words}");
        assert!(
            agent.wait_stderr(&want, Duration::from_secs(5)),
            "{want:?} not in {}",
            agent.stderr()
        );
    }
}

#[test]
fn a_final_refusal_is_said_once_and_retries_say_where_and_when() {
    let gw = gateway("uring", &["--token", "right-token-0123456789"]);
    let args = agent_args(
        "uring",
        &gw,
        "x",
        "127.0.0.1:9".parse().unwrap(),
        &["--cores", "1", "--token", "wrong"],
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = spawn_nowait_env("agent", &refs, &[("RUST_LOG", "info")]);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(2));
    let err = agent.stderr();
    assert_eq!(
        err.matches("gateway refused the uplink: bad token (AUTH_FAILED)")
            .count(),
        1,
        "{err}"
    );
    // The token's value is not in --help either.
    let help = Command::new(BIN)
        .args(["agent", "--help"])
        .env("RINGTUNNEL_TOKEN", "do-not-print-me")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("RINGTUNNEL_TOKEN"), "{help}");
    assert!(!help.contains("do-not-print-me"), "{help}");

    // Nobody listens: each retry names the address and the delay.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let retry = spawn_nowait_env(
        "agent",
        &[
            "agent",
            "--gateway",
            &closed,
            "--session",
            "x",
            "--to",
            "9",
            "--cores",
            "1",
        ],
        &[("RUST_LOG", "warn")],
    );
    let want = format!("; uplink 0 reconnects to {closed} in ");
    assert!(
        retry.wait_stderr(&want, Duration::from_secs(5)),
        "{}",
        retry.stderr()
    );
    assert!(
        retry.stderr().contains("cannot reach the gateway: "),
        "{}",
        retry.stderr()
    );
}

#[test]
fn a_second_ctrl_c_exits_at_once_and_says_so() {
    let echo = echo("uring", 0);
    let gw = gateway("uring", &[]);
    let args = agent_args("uring", &gw, "slow", echo.addr("listen"), &["--cores", "1"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = spawn_nowait_env("agent", &refs, &[("RUST_LOG", "warn")]);
    wait_stdout_line(&agent, "ringtunnel agent ready");
    let public = gw.addr("public");
    wait_routable(public, "slow");
    // One request in flight (the backend takes 5 s).
    let inflight = std::thread::spawn(move || {
        request(
            public,
            "GET /delay/5000 HTTP/1.1\r\nHost: slow\r\nConnection: close\r\n\r\n",
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let pid = agent.proc.pid() as i32;
    unsafe { libc::kill(pid, libc::SIGINT) };
    assert!(
        agent.wait_stderr("ringtunnel agent: stopping", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    // Still draining (the request has seconds to go): the second one ends it.
    assert_eq!(agent.wait_exit(Duration::from_millis(300)), None);
    let t = Instant::now();
    unsafe { libc::kill(pid, libc::SIGINT) };
    assert_eq!(agent.wait_exit(Duration::from_secs(5)), Some(130));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(
        agent.wait_stderr("second stop signal", Duration::from_secs(2)),
        "{}",
        agent.stderr()
    );
    // The cut request is answered by the gateway, not left hanging.
    let r = inflight.join().unwrap();
    assert!(r.status == 502 || r.status == 0, "{}", r.status);
}

#[test]
fn the_token_can_come_from_a_file() {
    let secret = "file-held-token-0123456789";
    let dir = pki::Dir::new("token-file");
    let path = dir.write("token", &format!("{secret}\n"));
    let echo = echo("uring", 0);
    let gw = gateway("uring", &["--token", secret]);
    let _agent = agent(
        "uring",
        &gw,
        "filetok",
        echo.addr("listen"),
        &["--cores", "1", "--token-file", &path],
    );
    wait_routable(gw.addr("public"), "filetok");
    for (extra, want) in [
        (vec!["--token-file", &path, "--token", "x"], "not both"),
        (
            vec!["--token-file", "/nonexistent/token"],
            "/nonexistent/token",
        ),
    ] {
        let mut args = vec!["agent", "--session", "x", "--to", "9", "--cores", "1"];
        args.extend(extra);
        let out = Command::new(BIN).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn tcp_one_liner_prints_its_address_and_relays() {
    // The local service: echoes what it reads.
    let svc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let svc_addr = svc.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in svc.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut r = c.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut c);
            });
        }
    });
    // One public port for this test, below the ephemeral range.
    let first = 30_000 + (std::process::id() % 1000) as u16;
    let port = (first..32_000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port");
    let range = format!("{port}-{port}");
    let gw = gateway("uring", &["--tcp-ports", &range]);
    let home = pki::Dir::new("tcp-home");
    let base = clean_env(home.0.to_str().unwrap());
    let tunnel = gw.field("tunnel");
    let target = svc_addr.port().to_string();
    let tcp = spawn_nowait_env(
        "tcp",
        &["tcp", &target, "--cores", "1"],
        &envs(&base, &[("RINGTUNNEL_GATEWAY", &tunnel)]),
    );
    let line = wait_stdout_line(&tcp, "TCP tunnel: ");
    assert_eq!(
        line,
        format!("TCP tunnel: tcp://127.0.0.1:{port} -> {svc_addr}")
    );
    wait_stdout_line(&tcp, "ringtunnel agent ready");
    let mut c = connect(format!("127.0.0.1:{port}").parse().unwrap());
    c.write_all(b"ping\n").unwrap();
    let mut got = [0u8; 5];
    std::io::Read::read_exact(&mut c, &mut got).unwrap();
    assert_eq!(&got, b"ping\n");
    // A TCP-only agent has no HTTP backend to check or announce.
    assert!(!tcp.stdout().contains("Forwarding"), "{}", tcp.stdout());
    assert!(
        !tcp.stderr().contains("nothing answers"),
        "{}",
        tcp.stderr()
    );
}
