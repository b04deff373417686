//! End-to-end: echo backend + gateway + agent as real processes on
//! 127.0.0.1, driven by curl and raw sockets. Every scenario runs on the
//! io_uring and the epoll driver.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

both_drivers!(get_post_put_round_trips, |d| {
    let s = Stack::start(d, 0);
    let p = s.public();
    let (st, body) = curl(p, "demo", "/", &[]);
    assert_eq!((st, body.as_slice()), (200, &b"ringtunnel echo\n"[..]));
    let (st, body) = curl(
        p,
        "demo",
        "/echo",
        &["-X", "POST", "--data-binary", "hello post"],
    );
    assert_eq!((st, body.as_slice()), (200, &b"hello post"[..]));
    let (st, body) = curl(
        p,
        "demo",
        "/echo",
        &["-X", "PUT", "--data-binary", "hello put"],
    );
    assert_eq!((st, body.as_slice()), (200, &b"hello put"[..]));
    let (st, body) = curl(p, "demo", "/status/418", &[]);
    assert_eq!(st, 418, "{}", String::from_utf8_lossy(&body));
    // X-Forwarded-* are set by the gateway (a client's own X-Forwarded-For
    // is not believed: no --trusted-proxies); hop-by-hop headers do not
    // cross.
    let (st, body) = curl(
        p,
        "demo",
        "/headers",
        &[
            "-H",
            "X-Forwarded-For: 10.9.9.9",
            "-H",
            "Keep-Alive: timeout=5",
            "-H",
            "X-Custom: yes",
        ],
    );
    let text = String::from_utf8_lossy(&body).to_lowercase();
    assert_eq!(st, 200);
    assert!(text.contains("x-forwarded-for: 127.0.0.1\n"), "{text}");
    assert!(!text.contains("10.9.9.9"), "{text}");
    assert!(text.contains("x-forwarded-proto: http"), "{text}");
    assert!(text.contains("x-forwarded-host: demo"), "{text}");
    assert!(text.contains("x-custom: yes"), "{text}");
    assert!(!text.contains("keep-alive: timeout"), "{text}");
});

both_drivers!(ten_mib_upload_and_download_with_checksums, |d| {
    let s = Stack::start(d, 0);
    let p = s.public();
    let n = 10 * 1024 * 1024;
    let (st, body) = curl(p, "demo", &format!("/bytes/{n}"), &[]);
    assert_eq!(st, 200);
    assert_eq!(body.len(), n);
    assert_eq!(checksum(&body), checksum(&pattern(n)));
    let up: Vec<u8> = (0..n).map(|i| (i * 31 % 253) as u8).collect();
    let path = std::env::temp_dir().join(format!("rt-up-{}-{d}.bin", std::process::id()));
    std::fs::write(&path, &up).unwrap();
    let (st, body) = curl(
        p,
        "demo",
        "/echo",
        &["--data-binary", &format!("@{}", path.display())],
    );
    assert_eq!(st, 200);
    assert_eq!(body.len(), n);
    assert_eq!(checksum(&body), checksum(&up));
    // The same upload chunked: echoed back chunked, same bytes.
    let (st, body) = curl(
        p,
        "demo",
        "/echo",
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("@{}", path.display()),
        ],
    );
    let _ = std::fs::remove_file(&path);
    assert_eq!(st, 200);
    assert_eq!(checksum(&body), checksum(&up));
});

both_drivers!(chunked_request_and_response, |d| {
    let s = Stack::start(d, 0);
    let mut c = connect(s.public());
    c.write_all(b"POST /echo HTTP/1.1\r\nHost: demo\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut c, &mut buf, false).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.body, b"hello world");
    c.write_all(b"GET /stream/5 HTTP/1.1\r\nHost: demo\r\n\r\n")
        .unwrap();
    let r = read_response(&mut c, &mut buf, false).unwrap();
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.text().lines().count(), 5);
});

both_drivers!(keep_alive_and_pipelining_in_order, |d| {
    let s = Stack::start(d, 0);
    let mut c = connect(s.public());
    let mut buf = Vec::new();
    for i in 0..5 {
        c.write_all(
            format!("GET /headers HTTP/1.1\r\nHost: demo\r\nX-Seq: {i}\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let r = read_response(&mut c, &mut buf, false).unwrap();
        assert_eq!(r.status, 200);
        assert!(r.text().contains(&format!("X-Seq: {i}")));
    }
    // Pipelined: all requests written at once, answers come in order, the
    // slow first one does not let the fast ones overtake it.
    let mut batch = Vec::new();
    batch.extend_from_slice(b"GET /delay/100 HTTP/1.1\r\nHost: demo\r\n\r\n");
    for i in 0..10 {
        batch.extend_from_slice(
            format!("GET /headers HTTP/1.1\r\nHost: demo\r\nX-Seq: p{i}\r\n\r\n").as_bytes(),
        );
    }
    batch.extend_from_slice(b"POST /echo HTTP/1.1\r\nHost: demo\r\nContent-Length: 4\r\n\r\nlast");
    c.write_all(&batch).unwrap();
    let r = read_response(&mut c, &mut buf, false).unwrap();
    assert_eq!(r.status, 200);
    for i in 0..10 {
        let r = read_response(&mut c, &mut buf, false).unwrap();
        assert!(
            r.text().contains(&format!("X-Seq: p{i}\n")),
            "out of order at {i}: {}",
            r.text()
        );
    }
    let r = read_response(&mut c, &mut buf, false).unwrap();
    assert_eq!(r.body, b"last");
});

both_drivers!(expect_100_continue, |d| {
    let s = Stack::start(d, 0);
    let mut c = connect(s.public());
    c.write_all(
        b"POST /echo HTTP/1.1\r\nHost: demo\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut c, &mut buf, false).unwrap();
    assert_eq!(
        r.status, 100,
        "the client must be told to continue before it sends the body"
    );
    c.write_all(b"hello there").unwrap();
    let r = read_response(&mut c, &mut buf, false).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello there");
});

fn ws_frame(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0x82u8];
    let n = payload.len();
    if n < 126 {
        f.push(0x80 | n as u8);
    } else if n < 65536 {
        f.push(0x80 | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(n as u64).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

both_drivers!(websocket_upgrade_echoes_one_mib, |d| {
    let s = Stack::start(d, 0);
    let mut c = connect(s.public());
    c.write_all(
        b"GET /upgrade HTTP/1.1\r\nHost: demo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut c, &mut buf, false).unwrap();
    assert_eq!(r.status, 101);
    assert_eq!(
        r.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    assert!(r
        .header("upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket")));
    let payload: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    let frame = ws_frame(&payload, [1, 2, 3, 4]);
    let mut w = c.try_clone().unwrap();
    let f2 = frame.clone();
    let writer = std::thread::spawn(move || w.write_all(&f2).unwrap());
    let mut got = buf;
    let mut tmp = vec![0u8; 65536];
    while got.len() < frame.len() {
        let n = c.read(&mut tmp).unwrap();
        assert!(
            n > 0,
            "upgraded stream closed early after {} bytes",
            got.len()
        );
        got.extend_from_slice(&tmp[..n]);
    }
    writer.join().unwrap();
    assert_eq!(checksum(&got), checksum(&frame));
    // Half-close travels through: we close our side, the echo closes its.
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let n = c.read(&mut tmp).unwrap();
    assert_eq!(n, 0);
});

both_drivers!(head_204_304_have_no_body, |d| {
    let s = Stack::start(d, 0);
    let mut c = connect(s.public());
    let mut buf = Vec::new();
    c.write_all(b"HEAD /bytes/100 HTTP/1.1\r\nHost: demo\r\n\r\n")
        .unwrap();
    let r = read_response(&mut c, &mut buf, true).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("100"));
    for code in [204, 304] {
        c.write_all(format!("GET /status/{code} HTTP/1.1\r\nHost: demo\r\n\r\n").as_bytes())
            .unwrap();
        let r = read_response(&mut c, &mut buf, false).unwrap();
        assert_eq!(r.status, code);
    }
    // Had any of them carried a body, this response would be garbled.
    c.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n")
        .unwrap();
    let r = read_response(&mut c, &mut buf, false).unwrap();
    assert_eq!(r.body, b"ringtunnel echo\n");
    assert!(
        buf.is_empty(),
        "stray bytes: {:?}",
        String::from_utf8_lossy(&buf)
    );
});

both_drivers!(thousand_concurrent_requests_one_session, |d| {
    let s = Stack::start(d, 35);
    let p = s.public();
    let threads: Vec<_> = (0..1000)
        .map(|i| {
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    let r = request(p, &format!("GET /headers HTTP/1.1\r\nHost: demo\r\nX-Req: {i}\r\nConnection: close\r\n\r\n"));
                    (r.status, r.text().contains(&format!("X-Req: {i}\n")))
                })
                .unwrap()
        })
        .collect();
    let mut ok = 0;
    for t in threads {
        let (st, body_ok) = t.join().unwrap();
        assert_eq!(st, 200);
        assert!(body_ok);
        ok += 1;
    }
    assert_eq!(ok, 1000);
});

both_drivers!(unknown_host_and_bad_requests, |d| {
    let s = Stack::start(d, 0);
    let p = s.public();
    // A name nobody holds: 404 (a held name whose agent is away gets 502
    // after the hold timeout: tests/scopes.rs).
    let r = request(p, "GET / HTTP/1.1\r\nHost: nosuch\r\n\r\n");
    assert_eq!(r.status, 404);
    assert!(
        r.text().contains("no tunnel for host 'nosuch'"),
        "{}",
        r.text()
    );
    let r = request(
        p,
        "GET / HTTP/1.1\r\nHost: demo\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    assert_eq!(r.status, 400);
    let r = request(
        p,
        "GET / HTTP/1.1\r\nHost: demo\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    );
    assert_eq!(r.status, 400);
    let r = request(p, "GARBAGE\r\n\r\n");
    assert_eq!(r.status, 400);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: demo\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let r = request(p, &big);
    assert_eq!(r.status, 431);
    let r = request(p, "GET / HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 400, "HTTP/1.1 without Host");
    let r = request(
        p,
        "POST /echo HTTP/1.1\r\nHost: demo\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    );
    assert!(
        r.status == 400 || r.status == 0,
        "bad chunk size must not reach the backend as a 200: {}",
        r.status
    );
});

/// Nothing polls: an idle gateway and agent sleep until an event or a
/// timer with work behind it (the 15 s heartbeat) wakes them. Before,
/// the agent's threads woke ~140 times a second and the gateway's ~20.
#[test]
fn idle_gateway_and_agent_do_not_wake_up() {
    let echo = echo("uring", 0);
    let gw = gateway("uring", &[]);
    let agent = agent("uring", &gw, "idle", echo.addr("listen"), &[]);
    wait_routable(gw.addr("public"), "idle");
    // Let the start-up settle (connects, first directory messages).
    std::thread::sleep(Duration::from_millis(500));
    let (g0, a0) = (gw.wakeups(), agent.wakeups());
    std::thread::sleep(Duration::from_secs(3));
    let (g, a) = (gw.wakeups() - g0, agent.wakeups() - a0);
    // A heartbeat may fall in the window: a few wake-ups, not hundreds.
    assert!(g <= 10, "gateway woke {g} times in 3 s while idle");
    assert!(a <= 10, "agent woke {a} times in 3 s while idle");
}

/// `/health` on the admin listener: ready, then draining from SIGTERM
/// while a request is still in flight (no token needed).
#[test]
fn health_says_ready_then_draining() {
    let echo = echo("uring", 0);
    let mut gw = gateway("uring", &["--admin-token", "s3cret-admin"]);
    let agent = agent(
        "uring",
        &gw,
        "hl",
        echo.addr("listen"),
        &["--admin-listen", "127.0.0.1:0"],
    );
    let (public, admin) = (gw.addr("public"), gw.addr("admin"));
    wait_routable(public, "hl");
    let health = |a| request(a, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = health(admin);
    assert_eq!((r.status, r.text()), (200, "ready\n".to_string()));
    let r = health(agent.addr("admin"));
    assert_eq!((r.status, r.text()), (200, "ready\n".to_string()));
    // Keep a request in flight so the gateway drains for a while.
    let slow = std::thread::spawn(move || {
        request(
            public,
            "GET /delay/2000 HTTP/1.1\r\nHost: hl\r\nConnection: close\r\n\r\n",
        )
        .status
    });
    std::thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(gw.pid() as i32, libc::SIGTERM) };
    let t = std::time::Instant::now();
    let r = loop {
        let r = health(admin);
        if r.status != 200 || t.elapsed() > Duration::from_secs(2) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!((r.status, r.text()), (503, "draining\n".to_string()));
    assert_eq!(slow.join().unwrap(), 200, "the in-flight request finishes");
    assert!(gw.terminate(Duration::from_secs(10)), "gateway exits");
}

#[test]
fn slow_header_gets_408() {
    let echo = echo("uring", 0);
    let gw = gateway("uring", &["--header-timeout", "0.5"]);
    let _agent = agent("uring", &gw, "demo", echo.addr("listen"), &[]);
    let mut c = connect(gw.addr("public"));
    c.write_all(b"GET / HTTP/1.1\r\nHost: de").unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut c, &mut buf, false).unwrap();
    assert_eq!(r.status, 408);
}

#[test]
fn backend_down_is_502_backend_slow_is_504() {
    // A port with nothing listening: reserve one and free it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = gateway("uring", &[]);
    let _a = agent("uring", &gw, "dead", dead, &[]);
    wait_ready_status(gw.addr("public"), "dead", 502);
    let r = request(gw.addr("public"), "GET / HTTP/1.1\r\nHost: dead\r\n\r\n");
    assert_eq!(r.status, 502);
    assert!(r.text().contains("backend"), "{}", r.text());

    let echo = echo("uring", 0);
    let _b = agent(
        "uring",
        &gw,
        "slow",
        echo.addr("listen"),
        &["--backend-timeout", "0.3"],
    );
    wait_routable(gw.addr("public"), "slow");
    let r = request(
        gw.addr("public"),
        "GET /delay/2000 HTTP/1.1\r\nHost: slow\r\n\r\n",
    );
    assert_eq!(r.status, 504, "{}", r.text());
    // The session still works afterwards.
    let r = request(gw.addr("public"), "GET / HTTP/1.1\r\nHost: slow\r\n\r\n");
    assert_eq!(r.status, 200);
}

fn wait_ready_status(p: std::net::SocketAddr, host: &str, want: u16) {
    let t = std::time::Instant::now();
    loop {
        let r = request(p, &format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n"));
        if r.status == want && !r.text().contains("no agent") {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{host}: last {} {}",
            r.status,
            r.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn admin_counters_move_with_traffic() {
    let s = Stack::start("uring", 0);
    let before = metrics(s.admin());
    let names = [
        "ringtunnel_gateway_requests_total",
        "ringtunnel_uplink_frames_total",
        "ringtunnel_uplink_writev_total",
        "ringtunnel_uplink_bytes_total",
        "ringtunnel_uplink_frames_per_writev_count",
    ];
    for _ in 0..50 {
        assert_eq!(
            request(
                s.public(),
                "POST /echo HTTP/1.1\r\nHost: demo\r\nContent-Length: 5\r\n\r\nhello"
            )
            .status,
            200
        );
    }
    let _ = request(s.public(), "GET / HTTP/1.1\r\nHost: unknown-host\r\n\r\n");
    let after = metrics(s.admin());
    for n in names {
        let (a, b) = (
            metric_sum(&before, n, "core="),
            metric_sum(&after, n, "core="),
        );
        assert!(b > a, "{n} did not move: {a} -> {b}\n{after}");
    }
    assert!(metric_sum(&after, "ringtunnel_gateway_requests_total", "core=") >= 51);
    assert!(metric_sum(&after, "ringtunnel_errors_total", "kind=\"no_session\"") >= 1);
    for n in [
        "ringtunnel_gateway_handoffs_total",
        "ringtunnel_uplink_queue_depth",
        "ringtunnel_active_streams",
    ] {
        assert!(after.contains(&format!("{n}{{core=\"0\"}}")), "missing {n}");
    }
    assert!(after.contains("ringtunnel_uplink_frames_per_writev_bucket{core=\"0\",le=\"+Inf\"}"));
    let json = stats_json(s.admin());
    for key in [
        "\"frames_per_writev\"",
        "\"writev_calls\"",
        "\"queue_depth_max\"",
        "\"handoffs_out\"",
        "\"uplinks_per_core\":[1,1]",
    ] {
        assert!(json.contains(key), "{key} missing in {json}");
    }
}

both_drivers!(http10_clients_and_routing_by_domain_and_default, |d| {
    let echo = echo(d, 0);
    let gw = gateway(
        d,
        &["--domain", "t.example.com", "--default-session", "fallback"],
    );
    let _a = agent(d, &gw, "named", echo.addr("listen"), &[]);
    let _b = agent(d, &gw, "fallback", tag_backend("fallback"), &[]);
    let p = gw.addr("public");
    wait_routable(p, "fallback");
    // Until "named" connects, its Host falls back too: wait for the echo.
    let t = std::time::Instant::now();
    while !request(p, "GET / HTTP/1.1\r\nHost: named\r\n\r\n")
        .text()
        .starts_with("ringtunnel echo")
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "named never routable"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // NAME.<domain>, with a port, routes to NAME.
    let r = request(
        p,
        "GET /headers HTTP/1.1\r\nHost: named.t.example.com:8080\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert!(
        r.text()
            .contains("X-Forwarded-Host: named.t.example.com:8080"),
        "{}",
        r.text()
    );
    // Anything else goes to the default session.
    for host in [
        "other.example.org",
        "127.0.0.1",
        "nosuch",
        "x.t.example.com",
    ] {
        let r = request(p, &format!("GET /headers HTTP/1.1\r\nHost: {host}\r\n\r\n"));
        assert_eq!(r.status, 200, "{host}");
        assert!(
            r.text().starts_with("backend=fallback"),
            "{host}: {}",
            r.text()
        );
        assert!(
            r.text().contains(&format!("X-Forwarded-Host: {host}")),
            "{}",
            r.text()
        );
    }
    // HTTP/1.0: a chunked backend answer reaches the client close-delimited.
    let mut c = connect(p);
    c.write_all(b"GET /stream/3 HTTP/1.0\r\nHost: named\r\n\r\n")
        .unwrap();
    let mut all = Vec::new();
    c.read_to_end(&mut all).unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    assert!(
        !text.to_ascii_lowercase().contains("transfer-encoding"),
        "{text}"
    );
    assert_eq!(
        text.split("\r\n\r\n").nth(1).unwrap().lines().count(),
        3,
        "{text}"
    );
    // HTTP/1.0 with keep-alive and a length-framed answer keeps the connection.
    let mut c = connect(p);
    let mut buf = Vec::new();
    for _ in 0..2 {
        c.write_all(b"GET / HTTP/1.0\r\nHost: named\r\nConnection: keep-alive\r\n\r\n")
            .unwrap();
        let r = read_response(&mut c, &mut buf, false).unwrap();
        assert_eq!(r.body, b"ringtunnel echo\n");
    }
});

both_drivers!(upgrade_refused_by_backend_keeps_connection_usable, |d| {
    let s = Stack::start(d, 0);
    let mut c = connect(s.public());
    let mut buf = Vec::new();
    // The backend answers an upgrade request to /headers normally: no 101,
    // so the stream stays HTTP and the connection carries the next request.
    c.write_all(
        b"GET /headers HTTP/1.1\r\nHost: demo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .unwrap();
    let r = read_response(&mut c, &mut buf, false).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().contains("Upgrade: websocket"), "{}", r.text());
    c.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n")
        .unwrap();
    let r = read_response(&mut c, &mut buf, false).unwrap();
    assert_eq!(r.body, b"ringtunnel echo\n");
});

/// `/stats` carries each session's last minute: requests, errors, rates
/// and latency quantiles, merged over the cores; `?limit=` pages them.
#[test]
fn stats_session_window_counts_requests_errors_and_latency() {
    let s = Stack::start("uring", 3);
    let json = |q: &str| -> serde_json::Value {
        let r = request(
            s.admin(),
            &format!("GET /stats{q} HTTP/1.1\r\nHost: x\r\n\r\n"),
        );
        serde_json::from_slice(&r.body).expect("JSON")
    };
    // The set-up's last requests are counted just after their answers.
    std::thread::sleep(Duration::from_millis(100));
    let before = json("")["sessions"]["demo"]["window"]["requests"]
        .as_u64()
        .unwrap();
    for _ in 0..30 {
        let r = request(
            s.public(),
            "GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(r.status, 200);
    }
    // A malformed chunked body: a 400 from the gateway, counted for demo.
    let r = request(
        s.public(),
        "POST /echo HTTP/1.1\r\nHost: demo\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    );
    assert_eq!(r.status, 400);
    // A request is counted once its exchange is over, which may be just
    // after its client has the answer.
    let t = std::time::Instant::now();
    let w = loop {
        let w = json("")["sessions"]["demo"]["window"].clone();
        if w["requests"].as_u64().unwrap() >= before + 31 || t.elapsed() > Duration::from_secs(2) {
            break w;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(w["requests"].as_u64().unwrap(), before + 31, "{w}");
    assert_eq!(w["errors"].as_u64().unwrap(), 1, "{w}");
    // The echo waits 3 ms: the median is in the (2, 5] ms bucket or above.
    let (p50, p99) = (w["p50_us"].as_u64().unwrap(), w["p99_us"].as_u64().unwrap());
    assert!(
        p50 >= 2_000 && p99 >= p50 && w["max_us"].as_u64().unwrap() >= p99,
        "{w}"
    );
    // The recent rate counts complete seconds only: it shows once the
    // second of these requests is over.
    let t = std::time::Instant::now();
    while json("")["sessions"]["demo"]["window"]["rps"]
        .as_f64()
        .unwrap()
        == 0.0
    {
        assert!(t.elapsed() < Duration::from_secs(3), "rps stayed 0");
        std::thread::sleep(Duration::from_millis(100));
    }
    // One page of one row, filtered; its series adds up to its requests.
    let page = json("?limit=1&q=DEM")["sessions_page"].clone();
    assert_eq!(
        (page["total"].as_u64(), page["matched"].as_u64()),
        (Some(1), Some(1))
    );
    let row = &page["rows"][0];
    assert_eq!(row["name"], "demo");
    let series: u64 = row["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(series, row["requests"].as_u64().unwrap());
    assert_eq!(row["series"].as_array().unwrap().len(), 60);
    let none = json("?limit=10&q=zzz")["sessions_page"].clone();
    assert_eq!(
        (
            none["matched"].as_u64(),
            none["rows"].as_array().map(Vec::len)
        ),
        (Some(0), Some(0))
    );
    assert_eq!(json("")["window"]["max_sessions_per_core"], 2048);
    // Garbage in the query is ignored, never an error; limit=0 is an
    // empty page.
    for q in ["?limit=%zz&offset=-3&q=%", "?&&==&q", "?limit=0"] {
        let v = json(q);
        assert_eq!(v["role"], "gateway", "{q}");
        if let Some(rows) = v["sessions_page"]["rows"].as_array() {
            assert!(rows.is_empty(), "{q}");
        }
    }
    // Every request to the admin endpoint is counted.
    let n = json("")["admin_requests"].as_u64().unwrap();
    assert_eq!(json("")["admin_requests"].as_u64().unwrap(), n + 1);
}
