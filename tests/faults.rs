//! Faults and limits: agents dying mid-stream, slow readers, malformed
//! frames, graceful shutdown. Real processes on 127.0.0.1.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use ringtunnel::proto::{self, Decoder, ErrorCode, Frame, FrameType};

both_drivers!(agent_killed_mid_stream_other_sessions_unaffected, |d| {
    let echo = echo(d, 0);
    let gw = gateway(d, &[]);
    let mut a = agent(d, &gw, "alpha", echo.addr("listen"), &[]);
    let _b = agent(d, &gw, "beta", echo.addr("listen"), &[]);
    let p = gw.addr("public");
    wait_routable(p, "alpha");
    wait_routable(p, "beta");
    // A large download through alpha, read slowly so it is in flight.
    let mut c = connect(p);
    c.write_all(b"GET /bytes/209715200 HTTP/1.1\r\nHost: alpha\r\n\r\n")
        .unwrap();
    let mut first = vec![0u8; 65536];
    let n = c.read(&mut first).unwrap();
    assert!(n > 0 && first.starts_with(b"HTTP/1.1 200"));
    a.kill();
    // Headers were already sent: the only honest signal is a close
    // before the promised length.
    let mut total = 0usize;
    let mut tmp = vec![0u8; 1 << 20];
    loop {
        match c.read(&mut tmp) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    assert!(
        total < 209_715_200,
        "download should be cut short, got {total}"
    );
    // beta keeps working, alpha answers 502 naming the host.
    for _ in 0..20 {
        let r = request(p, "GET /headers HTTP/1.1\r\nHost: beta\r\n\r\n");
        assert_eq!(r.status, 200);
    }
    let t = Instant::now();
    loop {
        let r = request(p, "GET / HTTP/1.1\r\nHost: alpha\r\n\r\n");
        if r.status == 502 {
            assert!(r.text().contains("alpha"), "{}", r.text());
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "alpha still answers {}",
            r.status
        );
        std::thread::sleep(Duration::from_millis(20));
    }
});

both_drivers!(slow_reader_100mib_memory_bounded_other_streams_flow, |d| {
    let echo = echo(d, 0);
    // One core, one uplink: the slow stream and the others share it.
    let gw = gateway(d, &["--cores", "1"]);
    let ag = agent(
        d,
        &gw,
        "demo",
        echo.addr("listen"),
        &["--cores", "1", "--uplinks", "1"],
    );
    let p = gw.addr("public");
    wait_routable(p, "demo");
    let rss0 = (gw.peak_rss_kib(), ag.peak_rss_kib());
    let n: usize = 100 * 1024 * 1024;
    let mut c = connect(p);
    // A small receive buffer makes the client a genuinely slow consumer.
    c.write_all(format!("GET /bytes/{n} HTTP/1.1\r\nHost: demo\r\n\r\n").as_bytes())
        .unwrap();
    let mut got = 0usize;
    let mut tmp = vec![0u8; 1 << 20];
    let mut head_skipped = false;
    let mut sum: u64 = 0;
    let mut read_some = |c: &mut std::net::TcpStream,
                         limit: usize,
                         got: &mut usize,
                         sum: &mut u64,
                         head_skipped: &mut bool| {
        while *got < limit {
            let k = c.read(&mut tmp).unwrap();
            assert!(k > 0, "download ended early at {got}");
            let mut data = &tmp[..k];
            if !*head_skipped {
                let p = data
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .expect("head in first read")
                    + 4;
                data = &data[p..];
                *head_skipped = true;
            }
            for (i, b) in data.iter().enumerate() {
                let off = (*got + i) as u64;
                if off % 4093 == 0 {
                    assert_eq!(*b, ringtunnel::echo::pattern_byte(off), "byte {off}");
                }
            }
            *sum += data.len() as u64;
            *got += data.len();
        }
    };
    read_some(&mut c, 4 << 20, &mut got, &mut sum, &mut head_skipped);
    // Stall the reader. Everything upstream must stop at its window, and
    // the shared uplink must keep serving other streams meanwhile.
    let t = Instant::now();
    for i in 0..20 {
        let r = request(
            p,
            &format!("GET /headers HTTP/1.1\r\nHost: demo\r\nX-I: {i}\r\n\r\n"),
        );
        assert_eq!(r.status, 200);
        let r = request(p, "GET /bytes/300000 HTTP/1.1\r\nHost: demo\r\n\r\n");
        assert_eq!(r.body.len(), 300_000);
    }
    let side = t.elapsed();
    std::thread::sleep(Duration::from_millis(1500));
    let stalled = (gw.peak_rss_kib(), ag.peak_rss_kib());
    read_some(&mut c, n, &mut got, &mut sum, &mut head_skipped);
    assert_eq!(got, n);
    let end = (gw.peak_rss_kib(), ag.peak_rss_kib());
    eprintln!("peak RSS KiB gateway/agent: start {rss0:?}, stalled {stalled:?}, end {end:?}; side traffic took {side:?}");
    // Bound: stream window (512 KiB) + uplink window (16 MiB) + buffers.
    // Without flow control the stall alone would pull ~100 MiB in.
    for (peak, base, who) in [(end.0, rss0.0, "gateway"), (end.1, rss0.1, "agent")] {
        assert!(
            peak < base + 40 * 1024,
            "{who} peak RSS grew from {base} to {peak} KiB"
        );
    }
    assert!(
        side < Duration::from_secs(10),
        "other streams were blocked behind the slow one: {side:?}"
    );
});

fn read_frame(s: &mut std::net::TcpStream, buf: &mut BytesMut) -> Option<Frame> {
    let mut dec = Decoder::new(proto::DEFAULT_MAX_FRAME);
    loop {
        if let Ok(Some(f)) = dec.decode(buf) {
            return Some(f);
        }
        let mut tmp = [0u8; 4096];
        let n = s.read(&mut tmp).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn fake_uplink(tunnel: std::net::SocketAddr, session: &str) -> (std::net::TcpStream, BytesMut) {
    let mut s = connect(tunnel);
    let mut b = BytesMut::new();
    proto::encode(&fake_hello(session), &mut b);
    s.write_all(&b).unwrap();
    let mut buf = BytesMut::new();
    let f = read_frame(&mut s, &mut buf).expect("ACCEPT");
    assert_eq!(f.kind, FrameType::Accept);
    (s, buf)
}

/// Waits until `host` is served by a (fake) agent: any answer but the
/// gateway's own "no agent" 502.
fn wait_routable_status(p: std::net::SocketAddr, host: &str) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        let mut c = connect(p);
        c.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        c.write_all(format!("GET /probe HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
            .unwrap();
        let mut tmp = [0u8; 512];
        match c.read(&mut tmp) {
            Ok(n) if n > 0 && String::from_utf8_lossy(&tmp[..n]).contains("no agent") => {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Timed out: the request reached the fake agent, which did not
            // answer; the gateway routes it.
            _ => return,
        }
    }
    panic!("{host} never became routable");
}

/// After a GOAWAY (with `code`), the gateway closes the uplink.
fn expect_goaway_then_close(s: &mut std::net::TcpStream, buf: &mut BytesMut, code: ErrorCode) {
    loop {
        let f = read_frame(s, buf).expect("GOAWAY before close");
        if f.kind == FrameType::GoAway {
            let (c, reason) = f.parse_goaway().unwrap();
            assert_eq!(c, code, "reason: {reason}");
            assert!(!reason.is_empty());
            break;
        }
    }
    assert!(
        read_frame(s, buf).is_none(),
        "uplink must be closed after GOAWAY"
    );
}

both_drivers!(malformed_frames_close_only_that_uplink, |d| {
    let s = Stack::start(d, 0);
    let tunnel = s.gw.addr("tunnel");
    let p = s.public();
    // Unknown frame type.
    let (mut up, mut buf) = fake_uplink(tunnel, "evil");
    up.write_all(&[0, 0, 0, 0, 0x7f, 0, 0, 0, 0, 0, 0, 1])
        .unwrap();
    expect_goaway_then_close(&mut up, &mut buf, ErrorCode::ProtocolError);
    // A frame announcing more than the maximum size.
    let (mut up, mut buf) = fake_uplink(tunnel, "evil");
    up.write_all(&[0x7f, 0xff, 0xff, 0xff, 0x12, 0, 0, 0, 0, 0, 0, 1])
        .unwrap();
    expect_goaway_then_close(&mut up, &mut buf, ErrorCode::FrameTooLarge);
    // DATA for a stream the gateway never opened.
    let (mut up, mut buf) = fake_uplink(tunnel, "evil");
    let mut b = BytesMut::new();
    proto::encode(&Frame::data(99, bytes::Bytes::from_static(b"x")), &mut b);
    up.write_all(&b).unwrap();
    expect_goaway_then_close(&mut up, &mut buf, ErrorCode::ProtocolError);
    // DATA beyond the granted credit: a public client that does not read
    // its response cannot have granted 32 MiB.
    let (mut up, mut buf) = fake_uplink(tunnel, "evil");
    wait_routable_status(p, "evil");
    let mut client = connect(p);
    client
        .write_all(b"GET /big HTTP/1.1\r\nHost: evil\r\n\r\n")
        .unwrap();
    let open = loop {
        let f = read_frame(&mut up, &mut buf).expect("OPEN");
        if f.kind == FrameType::Open && f.payload.starts_with(b"GET /big ") {
            break f;
        }
    };
    let mut b = BytesMut::new();
    proto::encode(
        &Frame::response(
            open.stream,
            bytes::Bytes::from_static(b"HTTP/1.1 200 OK\r\nContent-Length: 33554432\r\n\r\n"),
        ),
        &mut b,
    );
    for _ in 0..128 {
        proto::encode(
            &Frame::data(open.stream, bytes::Bytes::from(vec![0u8; 256 * 1024])),
            &mut b,
        );
    }
    let w = {
        let mut up2 = up.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = up2.write_all(&b);
        })
    };
    expect_goaway_then_close(&mut up, &mut buf, ErrorCode::FlowControlError);
    w.join().unwrap();
    drop(client);
    // The real session never noticed.
    for _ in 0..20 {
        let r = request(p, "GET / HTTP/1.1\r\nHost: demo\r\n\r\n");
        assert_eq!(r.status, 200);
    }
    let m = metrics(s.admin());
    assert!(
        metric_sum(&m, "ringtunnel_errors_total", "kind=\"protocol\"") >= 3,
        "{m}"
    );
});

#[test]
fn bad_token_and_bad_hello_are_refused() {
    let gw = gateway("uring", &["--token", "secret"]);
    let tunnel = gw.addr("tunnel");
    let mut s = connect(tunnel);
    let mut b = BytesMut::new();
    proto::encode(&fake_hello("app"), &mut b);
    s.write_all(&b).unwrap();
    let mut buf = BytesMut::new();
    let f = read_frame(&mut s, &mut buf).expect("REFUSE");
    assert_eq!(f.kind, FrameType::Refuse);
    let (code, reason) = f.parse_refuse().unwrap();
    assert_eq!(code, ErrorCode::AuthFailed, "{reason}");
    // Garbage instead of a HELLO: the gateway just drops it.
    let mut s = connect(tunnel);
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut buf = BytesMut::new();
    assert!(read_frame(&mut s, &mut buf)
        .map(|f| f.kind != FrameType::Accept)
        .unwrap_or(true));
}

#[test]
fn sigterm_finishes_in_flight_requests() {
    let s = Stack::start("uring", 0);
    let p = s.public();
    let t = std::thread::spawn(move || request(p, "GET /delay/800 HTTP/1.1\r\nHost: demo\r\n\r\n"));
    std::thread::sleep(Duration::from_millis(200));
    let Stack {
        echo: _e,
        mut gw,
        agent: _a,
    } = s;
    assert!(
        gw.terminate(Duration::from_secs(15)),
        "gateway did not exit after SIGTERM"
    );
    let r = t.join().unwrap();
    assert_eq!(
        r.status, 200,
        "in-flight request must complete during shutdown"
    );
    assert!(
        std::net::TcpStream::connect(p).is_err(),
        "public listener must be closed"
    );
}

/// Sends `n` requests at once on separate connections; returns statuses
/// and Retry-After values.
fn concurrent(p: std::net::SocketAddr, n: usize, raw: &'static str) -> Vec<(u16, Option<String>)> {
    let ts: Vec<_> = (0..n)
        .map(|_| {
            std::thread::spawn(move || {
                let r = request(p, raw);
                (r.status, r.header("retry-after").map(str::to_string))
            })
        })
        .collect();
    ts.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn stream_limit_and_agent_queue_answer_503_with_retry_after() {
    let echo = echo("uring", 0);
    // Gateway side: 2 streams per uplink, one uplink.
    let gw = gateway("uring", &["--cores", "1", "--max-streams", "2"]);
    let _a = agent(
        "uring",
        &gw,
        "tight",
        echo.addr("listen"),
        &["--cores", "1"],
    );
    let p = gw.addr("public");
    wait_routable(p, "tight");
    let res = concurrent(p, 4, "GET /delay/1500 HTTP/1.1\r\nHost: tight\r\n\r\n");
    let ok = res.iter().filter(|r| r.0 == 200).count();
    let busy: Vec<_> = res.iter().filter(|r| r.0 == 503).collect();
    assert_eq!(ok, 2, "{res:?}");
    assert_eq!(busy.len(), 2, "{res:?}");
    assert!(busy.iter().all(|r| r.1.as_deref() == Some("1")), "{res:?}");

    // Agent side: one backend request at a time, one waiting, the rest 503.
    let gw2 = gateway("uring", &["--cores", "1"]);
    let _b = agent(
        "uring",
        &gw2,
        "queue",
        echo.addr("listen"),
        &[
            "--cores",
            "1",
            "--backend-concurrency",
            "1",
            "--backend-queue",
            "1",
        ],
    );
    let p2 = gw2.addr("public");
    wait_routable(p2, "queue");
    let res = concurrent(p2, 4, "GET /delay/1500 HTTP/1.1\r\nHost: queue\r\n\r\n");
    let ok = res.iter().filter(|r| r.0 == 200).count();
    let busy = res.iter().filter(|r| r.0 == 503 && r.1.is_some()).count();
    assert_eq!((ok, busy), (2, 2), "{res:?}");
}

#[test]
fn agent_reconnects_after_gateway_restart() {
    let echo = echo("uring", 0);
    let free = |_: ()| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string()
    };
    let (pub_addr, tun_addr) = (free(()), free(()));
    let args = |extra: &'static str| {
        vec![
            "--listen".to_string(),
            pub_addr.clone(),
            "--tunnel-listen".into(),
            tun_addr.clone(),
            extra.to_string(),
        ]
    };
    let start_gw = || {
        let a = args("--no-pin");
        let v: Vec<&str> = a.iter().map(String::as_str).collect();
        let mut full = vec![
            "gateway",
            "--admin-listen",
            "off",
            "--cores",
            "2",
            "--driver",
            "uring",
        ];
        full.extend(v);
        spawn("gateway", &full, "ringtunnel gateway ready")
    };
    let mut gw = start_gw();
    let _a = agent("uring", &gw, "phoenix", echo.addr("listen"), &[]);
    let p: std::net::SocketAddr = pub_addr.parse().unwrap();
    wait_routable(p, "phoenix");
    gw.kill();
    std::thread::sleep(Duration::from_millis(300));
    let _gw2 = start_gw();
    // The agent notices, backs off (100 ms doubling, jittered) and comes back.
    let t = Instant::now();
    loop {
        let r = request(p, "GET / HTTP/1.1\r\nHost: phoenix\r\n\r\n");
        if r.status == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "agent did not come back: {} {}",
            r.status,
            r.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A backend that answers every connection with `reply` and closes.
fn scripted_backend(reply: &'static [u8]) -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut tmp = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut tmp) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&tmp[..n]),
                    }
                }
                let _ = c.write_all(reply);
            });
        }
    });
    addr
}

#[test]
fn broken_backends_fail_only_their_request() {
    let gw = gateway("uring", &[]);
    let p = gw.addr("public");
    // Garbage instead of a response head: 502 naming the problem.
    let _a = agent(
        "uring",
        &gw,
        "garbage",
        scripted_backend(b"SMTP ready\r\n\r\n"),
        &[],
    );
    // Headers promise 1000 bytes, 10 arrive, then the backend hangs up.
    let _b = agent(
        "uring",
        &gw,
        "short",
        scripted_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789"),
        &[],
    );
    let echo = echo("uring", 0);
    let _c = agent("uring", &gw, "good", echo.addr("listen"), &[]);
    wait_routable(p, "good");
    let t = Instant::now();
    let r = loop {
        let r = request(p, "GET / HTTP/1.1\r\nHost: garbage\r\n\r\n");
        if !r.text().contains("no agent") || t.elapsed() > Duration::from_secs(10) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("backend"), "{}", r.text());
    // Headers already sent: the client sees the connection end short.
    let t = Instant::now();
    let all = loop {
        let mut c = connect(p);
        c.write_all(b"GET / HTTP/1.1\r\nHost: short\r\n\r\n")
            .unwrap();
        let mut all = Vec::new();
        let _ = c.read_to_end(&mut all);
        if !String::from_utf8_lossy(&all).contains("no agent")
            || t.elapsed() > Duration::from_secs(10)
        {
            break all;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("0123456789"), "{text}");
    assert!(
        all.len() < 1000,
        "the body cannot be complete: {} bytes",
        all.len()
    );
    for _ in 0..20 {
        assert_eq!(
            request(p, "GET / HTTP/1.1\r\nHost: good\r\n\r\n").status,
            200
        );
    }
}

#[test]
fn client_abort_mid_download_frees_the_stream() {
    let s = Stack::start("uring", 0);
    let p = s.public();
    for _ in 0..5 {
        let mut c = connect(p);
        c.write_all(b"GET /bytes/104857600 HTTP/1.1\r\nHost: demo\r\n\r\n")
            .unwrap();
        let mut tmp = vec![0u8; 65536];
        let _ = c.read(&mut tmp).unwrap();
        drop(c);
    }
    // Every aborted stream is reset and forgotten; the session serves on.
    let t = Instant::now();
    loop {
        let m = metrics(s.admin());
        if metric_sum(&m, "ringtunnel_active_streams", "core=") == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "streams still active:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..20 {
        let r = request(p, "GET /bytes/100000 HTTP/1.1\r\nHost: demo\r\n\r\n");
        assert_eq!(r.body.len(), 100_000);
    }
}

#[test]
fn silent_peers_are_detected_by_heartbeat() {
    // Gateway side: an agent that completes the handshake, then never
    // sends another frame, is dropped after three heartbeat intervals.
    let gw = gateway("uring", &["--heartbeat-interval", "0.2"]);
    let (mut up, mut buf) = fake_uplink(gw.addr("tunnel"), "mute");
    let t = Instant::now();
    while read_frame(&mut up, &mut buf).is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "gateway kept a silent uplink"
        );
    }
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "closed too early: {:?}",
        t.elapsed()
    );

    // Agent side: a "gateway" that accepts, answers ACCEPT and then goes
    // silent is treated as lost, and the agent connects again.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming().take(2) {
            let mut c = c.unwrap();
            let mut b = BytesMut::new();
            let hello = read_frame(&mut c, &mut b).expect("HELLO");
            assert_eq!(hello.kind, FrameType::Hello);
            let mut out = BytesMut::new();
            let accept = proto::Accept {
                version: proto::PROTOCOL_VERSION,
                gateway_cores: 1,
                core: 0,
                max_frame: proto::DEFAULT_MAX_FRAME,
                stream_window: 512 * 1024,
                conn_window: 16 * 1024 * 1024,
                max_streams: 16,
                capabilities: 0,
                tcp: Vec::new(),
                public: None,
                nodes: Vec::new(),
            };
            proto::encode(&Frame::accept(&accept), &mut out);
            c.write_all(&out).unwrap();
            let _ = tx.send(Instant::now());
            held.push(c); // keep it open, say nothing
        }
    });
    let echo = echo("uring", 0);
    let a = [
        "agent",
        "--gateway",
        &addr.to_string(),
        "--session",
        "lonely",
        "--to",
        &echo.field("listen"),
        "--cores",
        "1",
        "--no-pin",
        "--heartbeat-interval",
        "0.2",
    ];
    let _agent = spawn("agent", &a, "ringtunnel agent ready");
    let first = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("first uplink");
    let second = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the agent never reconnected after the gateway fell silent");
    assert!(
        second - first >= Duration::from_millis(400),
        "reconnected before the heartbeat could have expired"
    );
}
