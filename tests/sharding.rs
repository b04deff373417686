//! Thread-per-core sharding: uplink placement over gateway cores, requests
//! served on the accepting core or handed off to a core holding the
//! session, uplinks dying under load, many sessions at once, session
//! claims and their release. Gateway (and most agents) run `--cores 2`.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use ringtunnel::proto::{
    encode, Accept, Decoder, ErrorCode, Frame, FrameType, Hello, PROTOCOL_VERSION,
};

fn core_label(i: usize) -> String {
    format!("core=\"{i}\"")
}

/// (requests, handoffs) per core from the gateway's `/metrics`.
fn per_core_counts(admin: SocketAddr) -> [(u64, u64); 2] {
    let m = metrics(admin);
    [0, 1].map(|i| {
        (
            metric_sum(&m, "ringtunnel_gateway_requests_total", &core_label(i)),
            metric_sum(&m, "ringtunnel_gateway_handoffs_total", &core_label(i)),
        )
    })
}

fn refused_count(admin: SocketAddr) -> u64 {
    metric_sum(
        &metrics(admin),
        "ringtunnel_errors_total",
        "kind=\"handshake_refused\"",
    )
}

/// Polls `/stats` until `name`'s placement satisfies `ok`.
fn wait_placement(admin: SocketAddr, name: &str, ok: impl Fn(&[u32]) -> bool) -> Vec<u32> {
    let t = Instant::now();
    loop {
        let s = stats_json(admin);
        if let Some(p) = session_placement(&s, name) {
            if ok(&p) {
                return p;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "placement of {name} never settled: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `n` requests, each on its own TCP connection, from `threads` threads.
/// `make(i)` builds request i; returns the responses in order.
fn fresh_requests(
    public: SocketAddr,
    n: usize,
    threads: usize,
    make: impl Fn(usize) -> String + Send + Sync + 'static,
) -> Vec<Resp> {
    let make = Arc::new(make);
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let make = make.clone();
            std::thread::spawn(move || {
                (t..n)
                    .step_by(threads)
                    .map(|i| (i, request(public, &make(i))))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut out: Vec<(usize, Resp)> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

// ---------------------------------------------------------------------
// 1. Placement
// ---------------------------------------------------------------------

fn uplinks_spread_over_both_cores(d: &str) {
    let echo = echo(d, 0);
    let gw = gateway(d, &[]);
    let admin = gw.addr("admin");
    // Default: the agent opens as many uplinks as the gateway has cores.
    let a = agent(d, &gw, "demo", echo.addr("listen"), &[]);
    assert_eq!(a.field("uplinks"), "2", "{}", a.ready);
    let p = wait_placement(admin, "demo", |p| p.iter().sum::<u32>() == 2);
    assert_eq!(p, vec![1, 1], "one uplink of the session on each core");
    // More uplinks than cores: still balanced.
    let _b = agent(
        d,
        &gw,
        "four",
        echo.addr("listen"),
        &["--cores", "1", "--uplinks", "4"],
    );
    let p = wait_placement(admin, "four", |p| p.iter().sum::<u32>() == 4);
    assert_eq!(p, vec![2, 2]);
    // The per-core gauge agrees (the uplinks are live on those cores).
    let t = Instant::now();
    loop {
        let up = json_numbers(&stats_json(admin), "uplinks");
        if up == vec![3, 3] {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "per-core uplinks {up:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_routable(gw.addr("public"), "demo");
    wait_routable(gw.addr("public"), "four");
}

both_drivers!(
    uplinks_spread_over_both_cores,
    super::uplinks_spread_over_both_cores
);

// ---------------------------------------------------------------------
// 2. Requests accepted on either core, no handoff with K >= cores
// ---------------------------------------------------------------------

fn requests_on_either_core_with_few_handoffs(d: &str) {
    let echo = echo(d, 0);
    let gw = gateway(d, &[]);
    let admin = gw.addr("admin");
    let public = gw.addr("public");
    let _a = agent(d, &gw, "demo", echo.addr("listen"), &["--uplinks", "2"]);
    wait_placement(admin, "demo", |p| p == [1, 1]);
    wait_routable(public, "demo");
    let before = per_core_counts(admin);
    let n = 200;
    let rs = fresh_requests(public, n, 4, |i| {
        format!("GET /headers HTTP/1.1\r\nHost: demo\r\nX-Req: {i}\r\nConnection: close\r\n\r\n")
    });
    for (i, r) in rs.iter().enumerate() {
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert!(r.text().contains(&format!("X-Req: {i}\n")), "{}", r.text());
    }
    let after = per_core_counts(admin);
    let reqs: Vec<u64> = (0..2).map(|i| after[i].0 - before[i].0).collect();
    let handoffs: u64 = (0..2).map(|i| after[i].1 - before[i].1).sum();
    assert!(
        reqs.iter().all(|r| *r > 0),
        "SO_REUSEPORT must spread connections over both cores: {reqs:?}"
    );
    assert_eq!(reqs.iter().sum::<u64>(), n as u64, "{reqs:?}");
    assert!(
        handoffs * 20 < n as u64,
        "{handoffs} handoffs for {n} requests with an uplink on every core"
    );
}

both_drivers!(
    requests_on_either_core_with_few_handoffs,
    super::requests_on_either_core_with_few_handoffs
);

// ---------------------------------------------------------------------
// 3. Handoff path
// ---------------------------------------------------------------------

fn handoff_with_one_uplink(d: &str) {
    let echo = echo(d, 0);
    let gw = gateway(d, &[]);
    let admin = gw.addr("admin");
    let public = gw.addr("public");
    let _a = agent(d, &gw, "solo", echo.addr("listen"), &["--uplinks", "1"]);
    let p = wait_placement(admin, "solo", |p| p.iter().sum::<u32>() == 1);
    wait_routable(public, "solo");
    let before = per_core_counts(admin);
    let n = 200;
    let rs = fresh_requests(public, n, 4, |i| {
        if i % 4 == 3 {
            // A body crosses the handoff too (bytes read before the move).
            let body = format!("payload-{i}-{}", "x".repeat(i * 7));
            format!(
                "POST /echo HTTP/1.1\r\nHost: solo\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        } else {
            format!(
                "GET /headers HTTP/1.1\r\nHost: solo\r\nX-Unique: u{i}\r\nConnection: close\r\n\r\n"
            )
        }
    });
    for (i, r) in rs.iter().enumerate() {
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        if i % 4 == 3 {
            assert_eq!(r.text(), format!("payload-{i}-{}", "x".repeat(i * 7)));
        } else {
            assert!(
                r.text().contains(&format!("X-Unique: u{i}\n")),
                "request {i}: {}",
                r.text()
            );
        }
    }
    let after = per_core_counts(admin);
    let handoffs: Vec<u64> = (0..2).map(|i| after[i].1 - before[i].1).collect();
    let empty = p.iter().position(|n| *n == 0).unwrap();
    assert!(
        handoffs[empty] > 0,
        "core {empty} holds no uplink of the session, so it must hand off: {handoffs:?}"
    );
    assert_eq!(
        handoffs[1 - empty],
        0,
        "the core holding the uplink never hands off: {handoffs:?}"
    );
    // Every request is counted once, on the core that served it.
    let reqs: u64 = (0..2).map(|i| after[i].0 - before[i].0).sum();
    assert_eq!(reqs, n as u64);

    // Pipelined requests and a body larger than the first read: what was
    // read before the move and what is still in the socket both arrive,
    // in order. Fresh connections, so about half of them are handed off.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let bytes_sum = checksum(&pattern(70_000));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let big = big.clone();
            std::thread::spawn(move || {
                let mut c = connect(public);
                let mut batch = format!(
                    "GET /headers HTTP/1.1\r\nHost: solo\r\nX-Seq: {t}\r\n\r\n\
                     POST /echo HTTP/1.1\r\nHost: solo\r\nContent-Length: {}\r\n\r\n",
                    big.len()
                )
                .into_bytes();
                batch.extend_from_slice(&big);
                batch.extend_from_slice(b"GET /bytes/70000 HTTP/1.1\r\nHost: solo\r\n\r\n");
                let mut w = c.try_clone().unwrap();
                let writer = std::thread::spawn(move || w.write_all(&batch).unwrap());
                let mut buf = Vec::new();
                let r = read_response(&mut c, &mut buf, false).expect("first answer");
                assert!(r.text().contains(&format!("X-Seq: {t}\n")), "{}", r.text());
                let r = read_response(&mut c, &mut buf, false).expect("second answer");
                assert_eq!((r.status, checksum(&r.body)), (200, checksum(&big)));
                let r = read_response(&mut c, &mut buf, false).expect("third answer");
                assert_eq!((r.status, checksum(&r.body)), (200, bytes_sum));
                writer.join().unwrap();
                // Expect: 100-continue: the 100 comes from whichever core
                // ends up serving the connection.
                let mut c = connect(public);
                c.write_all(
                    b"POST /echo HTTP/1.1\r\nHost: solo\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
                )
                .unwrap();
                let mut buf = Vec::new();
                let r = read_response(&mut c, &mut buf, false).expect("100");
                assert_eq!(r.status, 100);
                c.write_all(b"hello").unwrap();
                let r = read_response(&mut c, &mut buf, false).expect("200");
                assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

both_drivers!(handoff_with_one_uplink, super::handoff_with_one_uplink);

/// One keep-alive connection alternating between two sessions, each with
/// a single uplink; the sessions are placed on different cores, so the
/// connection has to move between cores again and again.
fn keep_alive_connection_alternating_sessions_on_different_cores(d: &str) {
    let gw = gateway(d, &[]);
    let admin = gw.addr("admin");
    let public = gw.addr("public");
    let (ba, bb) = (tag_backend("a"), tag_backend("b"));
    let _a = agent(d, &gw, "a", ba, &["--cores", "1", "--uplinks", "1"]);
    let pa = wait_placement(admin, "a", |p| p.iter().sum::<u32>() == 1);
    // The uplink's core follows the kernel's SO_REUSEPORT hash; reconnect
    // agent b until it lands on the other core (each try is a coin flip).
    let mut b = None;
    for _ in 0..12 {
        let ag = agent(d, &gw, "b", bb, &["--cores", "1", "--uplinks", "1"]);
        let pb = wait_placement(admin, "b", |p| p.iter().sum::<u32>() == 1);
        if pb != pa {
            b = Some(ag);
            break;
        }
        drop(ag);
        let t = Instant::now();
        while session_placement(&stats_json(admin), "b").is_some() {
            assert!(t.elapsed() < Duration::from_secs(5), "b never released");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _b = b.expect("session b never landed on the other core in 12 tries");
    wait_routable(public, "a");
    wait_routable(public, "b");

    let mut c = connect(public);
    let mut buf = Vec::new();
    for i in 0..20 {
        let host = if i % 2 == 0 { "a" } else { "b" };
        c.write_all(format!("GET /r{i} HTTP/1.1\r\nHost: {host}\r\nX-Seq: {i}\r\n\r\n").as_bytes())
            .unwrap();
        let r = read_response(&mut c, &mut buf, false)
            .unwrap_or_else(|| panic!("request {i} (Host {host}): connection closed"));
        assert_eq!(
            r.status,
            200,
            "request {i} (Host {host}) on one keep-alive connection alternating between \
             sessions held by different cores (a {pa:?}, b the other): {}",
            r.text()
        );
        let t = r.text();
        assert!(t.starts_with(&format!("backend={host}\n")), "{i}: {t}");
        assert!(t.contains(&format!("GET /r{i} HTTP/1.1")), "{i}: {t}");
        assert!(t.contains(&format!("X-Seq: {i}\r\n")), "{i}: {t}");
    }
}

both_drivers!(
    keep_alive_connection_alternating_sessions_on_different_cores,
    super::keep_alive_connection_alternating_sessions_on_different_cores
);

// ---------------------------------------------------------------------
// 4. A fake agent: one of two uplinks dies with requests in flight
// ---------------------------------------------------------------------

/// One uplink of a minimal agent written with std sockets and the
/// `ringtunnel::proto` codec. It answers every OPEN with a small 200
/// (`uplink=INDEX target=TARGET`), except that with `hang` set it never
/// answers targets containing "/hang".
struct FakeUplink {
    sock: TcpStream,
    accept: Accept,
    /// OPENs whose target contains "/hang", answered or not.
    hang_opens: Arc<AtomicUsize>,
    reader: Option<JoinHandle<()>>,
}

fn read_frame(s: &mut TcpStream, dec: &mut Decoder, buf: &mut BytesMut) -> Option<Frame> {
    loop {
        if let Some(f) = dec.decode(buf).expect("gateway sent a malformed frame") {
            return Some(f);
        }
        let mut tmp = [0u8; 65536];
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

fn send_frames(s: &mut TcpStream, frames: &[Frame]) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    for f in frames {
        encode(f, &mut out);
    }
    s.write_all(&out)
}

impl FakeUplink {
    fn connect(
        tunnel: SocketAddr,
        session: &str,
        token: &str,
        agent_id: u64,
        index: u16,
        total: u16,
        hang: bool,
    ) -> Result<FakeUplink, (ErrorCode, String)> {
        let mut s = TcpStream::connect(tunnel).unwrap();
        s.set_nodelay(true).unwrap();
        let hello = Hello {
            version: PROTOCOL_VERSION,
            capabilities: 0,
            agent_id,
            uplink_index: index,
            uplinks_total: total,
            token: token.into(),
            session: session.into(),
            tcp: Vec::new(),
        };
        send_frames(&mut s, &[Frame::hello(&hello)]).unwrap();
        let mut dec = Decoder::new(64 * 1024);
        let mut buf = BytesMut::new();
        let f = read_frame(&mut s, &mut dec, &mut buf).expect("no handshake answer");
        let accept = match f.kind {
            FrameType::Accept => f.parse_accept().unwrap(),
            FrameType::Refuse => return Err(f.parse_refuse().unwrap()),
            other => panic!("unexpected {other:?} in handshake"),
        };
        dec.set_max_payload(accept.max_frame);
        let hang_opens = Arc::new(AtomicUsize::new(0));
        let ho = hang_opens.clone();
        let mut rs = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            while let Some(f) = read_frame(&mut rs, &mut dec, &mut buf) {
                let reply = match f.kind {
                    FrameType::Open => {
                        let head = String::from_utf8_lossy(&f.payload).into_owned();
                        let target = head.split(' ').nth(1).unwrap_or("").to_string();
                        if target.contains("/hang") {
                            ho.fetch_add(1, Ordering::SeqCst);
                            if hang {
                                continue;
                            }
                        }
                        let body = format!("uplink={index} target={target}\n");
                        vec![
                            Frame::response(
                                f.stream,
                                Bytes::from(format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                                    body.len()
                                )),
                            ),
                            Frame::data(f.stream, Bytes::from(body)),
                            Frame::end(f.stream),
                        ]
                    }
                    FrameType::Ping => vec![Frame::pong(f.ping_payload().unwrap())],
                    // WINDOW, END, RESET, GOAWAY, request DATA: nothing to do
                    // for GETs with small answers.
                    _ => continue,
                };
                if send_frames(&mut rs, &reply).is_err() {
                    return;
                }
            }
        });
        Ok(FakeUplink {
            sock: s,
            accept,
            hang_opens,
            reader: Some(reader),
        })
    }

    /// Drops the uplink's TCP connection (both directions).
    fn kill(&mut self) {
        let _ = self.sock.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for FakeUplink {
    fn drop(&mut self) {
        self.kill();
    }
}

fn losing_one_of_two_uplinks_fails_only_its_streams(d: &str) {
    let gw = gateway(d, &[]);
    let admin = gw.addr("admin");
    let public = gw.addr("public");
    let tunnel = gw.addr("tunnel");
    let id = 0x5eed_f00d;
    let mut up0 = FakeUplink::connect(tunnel, "fake", "", id, 0, 2, true).unwrap();
    let up1 = FakeUplink::connect(tunnel, "fake", "", id, 1, 2, false).unwrap();
    assert_eq!(up0.accept.gateway_cores, 2);
    assert_ne!(
        up0.accept.core, up1.accept.core,
        "two uplinks of one session go to different cores"
    );
    wait_placement(admin, "fake", |p| p == [1, 1]);
    wait_routable(public, "fake");

    // /hang requests on fresh connections until a few hang on uplink 0
    // (the others land on uplink 1's core and are answered at once).
    let mut pending = Vec::new();
    let hung0 = loop {
        let i = pending.len();
        pending.push(std::thread::spawn(move || {
            request(
                public,
                &format!("GET /hang/{i} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n"),
            )
        }));
        let t = Instant::now();
        while up0.hang_opens.load(Ordering::SeqCst) + up1.hang_opens.load(Ordering::SeqCst)
            < pending.len()
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "/hang {i} never arrived"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let h = up0.hang_opens.load(Ordering::SeqCst);
        if h >= 3 || pending.len() >= 40 {
            break h;
        }
    };
    assert!(hung0 > 0, "no /hang request reached uplink 0");
    let answered1 = up1.hang_opens.load(Ordering::SeqCst);

    up0.kill();
    let results: Vec<Resp> = pending.into_iter().map(|h| h.join().unwrap()).collect();
    let failed: Vec<&Resp> = results.iter().filter(|r| r.status != 200).collect();
    assert_eq!(
        failed.len(),
        hung0,
        "exactly the requests in flight on the dead uplink fail: {:?}",
        failed
            .iter()
            .map(|r| (r.status, r.text()))
            .collect::<Vec<_>>()
    );
    for r in &failed {
        assert_eq!(r.status, 502, "no head was sent yet: {}", r.text());
    }
    for r in results.iter().filter(|r| r.status == 200) {
        assert!(
            r.text().starts_with("uplink=1 target=/hang/"),
            "{}",
            r.text()
        );
    }
    assert_eq!(results.len() - failed.len(), answered1);

    // The session lives on through its other uplink; the core that lost
    // its uplink now hands its connections to the other one.
    wait_placement(admin, "fake", |p| p.iter().sum::<u32>() == 1);
    let before = per_core_counts(admin);
    let rs = fresh_requests(public, 50, 4, |i| {
        format!("GET /after/{i} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n")
    });
    for (i, r) in rs.iter().enumerate() {
        assert_eq!(
            r.status,
            200,
            "request {i} after the uplink died: {}",
            r.text()
        );
        assert_eq!(r.text(), format!("uplink=1 target=/after/{i}\n"));
    }
    let after = per_core_counts(admin);
    let dead_core = up0.accept.core as usize;
    assert!(
        after[dead_core].1 > before[dead_core].1,
        "core {dead_core} lost its uplink and must hand off"
    );
    drop(up1);
}

both_drivers!(
    losing_one_of_two_uplinks_fails_only_its_streams,
    super::losing_one_of_two_uplinks_fails_only_its_streams
);

// ---------------------------------------------------------------------
// 5. Many sessions, mixed traffic
// ---------------------------------------------------------------------

fn twenty_sessions_two_uplinks_each_mixed_traffic(d: &str) {
    let echo = echo(d, 0);
    let gw = gateway(d, &[]);
    let admin = gw.addr("admin");
    let public = gw.addr("public");
    let backend = echo.addr("listen");
    let gwr = &gw;
    let agents: Vec<Proc> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..20)
            .map(|i| {
                s.spawn(move || {
                    agent(
                        d,
                        gwr,
                        &format!("s{i}"),
                        backend,
                        &["--cores", "1", "--uplinks", "2"],
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(agents.len(), 20);
    for i in 0..20 {
        wait_placement(admin, &format!("s{i}"), |p| p == [1, 1]);
    }
    for i in 0..20 {
        wait_routable(public, &format!("s{i}"));
    }
    let big = pattern(100_000);
    let big_sum = checksum(&big);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = connect(public);
                let mut buf = Vec::new();
                for k in 0..30 {
                    let session = format!("s{}", (t * 7 + k * 3) % 20);
                    let (req, want): (Vec<u8>, Option<Vec<u8>>) = match k % 3 {
                        0 => (
                            format!("GET / HTTP/1.1\r\nHost: {session}\r\n\r\n").into_bytes(),
                            Some(b"ringtunnel echo\n".to_vec()),
                        ),
                        1 => {
                            let body: Vec<u8> = (0..(t * 1000 + k * 997) % 20_000)
                                .map(|i| (i * 13 + t + k) as u8)
                                .collect();
                            let mut r = format!(
                                "POST /echo HTTP/1.1\r\nHost: {session}\r\nContent-Length: {}\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            r.extend_from_slice(&body);
                            (r, Some(body))
                        }
                        _ => (
                            format!("GET /bytes/100000 HTTP/1.1\r\nHost: {session}\r\n\r\n")
                                .into_bytes(),
                            None,
                        ),
                    };
                    c.write_all(&req).unwrap();
                    let r = read_response(&mut c, &mut buf, false)
                        .unwrap_or_else(|| panic!("thread {t} request {k}: connection closed"));
                    assert_eq!(r.status, 200, "thread {t} request {k} {session}: {}", r.text());
                    match want {
                        Some(w) => assert_eq!(r.body, w, "thread {t} request {k} {session}"),
                        None => assert_eq!(
                            checksum(&r.body),
                            big_sum,
                            "thread {t} request {k} {session}: {} bytes",
                            r.body.len()
                        ),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Every session's uplinks are still in place.
    let s = stats_json(admin);
    for i in 0..20 {
        assert_eq!(session_placement(&s, &format!("s{i}")), Some(vec![1, 1]));
    }
    drop(agents);
}

both_drivers!(
    twenty_sessions_two_uplinks_each_mixed_traffic,
    super::twenty_sessions_two_uplinks_each_mixed_traffic
);

// ---------------------------------------------------------------------
// 6. Claims: same name with another token, wrong gateway token
// ---------------------------------------------------------------------

fn same_name_with_another_token_is_refused(d: &str) {
    let gw = gateway(d, &[]);
    let admin = gw.addr("admin");
    let public = gw.addr("public");
    let (ba, bb) = (tag_backend("A"), tag_backend("B"));
    let _a = agent(d, &gw, "taken", ba, &["--token", "aaa"]);
    wait_routable(public, "taken");
    let refused_before = refused_count(admin);

    let args = agent_args(d, &gw, "taken", bb, &["--token", "bbb"]);
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let b = spawn_nowait("agent-b", &args);
    let t = Instant::now();
    while refused_count(admin) == refused_before {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the gateway never refused agent B"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        b.wait_stderr("gateway refused the uplink", Duration::from_secs(5)),
        "agent B stderr: {}",
        b.stderr()
    );
    // B keeps retrying: more refusals follow (backoff starts at 100 ms).
    let first = refused_count(admin);
    let t = Instant::now();
    while refused_count(admin) == first {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "agent B stopped retrying: {}",
            b.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !b.stdout().contains("ringtunnel agent ready"),
        "agent B must never become ready: {}",
        b.stdout()
    );
    // A's session is untouched: its uplinks only, answers from A's backend.
    assert_eq!(
        session_placement(&stats_json(admin), "taken"),
        Some(vec![1, 1])
    );
    let rs = fresh_requests(public, 20, 2, |i| {
        format!("GET /t{i} HTTP/1.1\r\nHost: taken\r\nConnection: close\r\n\r\n")
    });
    for (i, r) in rs.iter().enumerate() {
        assert_eq!(r.status, 200, "{i}: {}", r.text());
        assert!(r.text().starts_with("backend=A\n"), "{i}: {}", r.text());
    }
    drop(b);

    // A gateway with a token refuses an agent presenting another one.
    let gw2 = gateway(d, &["--token", "secret"]);
    let admin2 = gw2.addr("admin");
    let args = agent_args(d, &gw2, "locked", ba, &["--token", "wrong"]);
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let w = spawn_nowait("agent-wrong", &args);
    assert!(
        w.wait_stderr("gateway refused the uplink", Duration::from_secs(5)),
        "agent with a wrong token: {}",
        w.stderr()
    );
    assert!(refused_count(admin2) > 0);
    assert!(!w.stdout().contains("ringtunnel agent ready"));
    assert_eq!(session_placement(&stats_json(admin2), "locked"), None);
    let r = request(
        gw2.addr("public"),
        "GET / HTTP/1.1\r\nHost: locked\r\nConnection: close\r\n\r\n",
    );
    // Never registered: no tunnel for that host.
    assert_eq!(r.status, 404, "{}", r.text());
    drop(w);
    // The right token is accepted.
    let _ok = agent(d, &gw2, "locked", ba, &["--token", "secret"]);
    wait_routable(gw2.addr("public"), "locked");
}

both_drivers!(
    same_name_with_another_token_is_refused,
    super::same_name_with_another_token_is_refused
);

// ---------------------------------------------------------------------
// 7. A session is released when its last agent goes
// ---------------------------------------------------------------------

fn session_released_when_its_agent_dies(d: &str) {
    // No lease: the name is free as soon as its last uplink goes (the
    // lease itself is tested in tests/scopes.rs).
    let gw = gateway(d, &["--session-lease", "0"]);
    let admin = gw.addr("admin");
    let public = gw.addr("public");
    let (b1, b2) = (tag_backend("one"), tag_backend("two"));
    let mut a = agent(d, &gw, "gone", b1, &["--token", "t1"]);
    wait_routable(public, "gone");
    let r = request(
        public,
        "GET / HTTP/1.1\r\nHost: gone\r\nConnection: close\r\n\r\n",
    );
    assert!(r.text().starts_with("backend=one\n"), "{}", r.text());

    a.kill();
    // Without a lease the name is forgotten with its agent: 404.
    let r = wait_status(public, "gone", 404, Duration::from_secs(5));
    assert!(r.text().contains("gone"), "{}", r.text());
    // Every core says 404 (no stale uplink anywhere), and the claim is gone.
    let rs = fresh_requests(public, 20, 2, |_| {
        "GET / HTTP/1.1\r\nHost: gone\r\nConnection: close\r\n\r\n".to_string()
    });
    assert!(rs.iter().all(|r| r.status == 404));
    let t = Instant::now();
    while session_placement(&stats_json(admin), "gone").is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "claim not released: {}",
            stats_json(admin)
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The name is free again, whatever the token.
    let _b = agent(d, &gw, "gone", b2, &["--token", "t2"]);
    wait_routable(public, "gone");
    let rs = fresh_requests(public, 20, 2, |i| {
        format!("GET /n{i} HTTP/1.1\r\nHost: gone\r\nConnection: close\r\n\r\n")
    });
    for r in &rs {
        assert_eq!(r.status, 200);
        assert!(r.text().starts_with("backend=two\n"), "{}", r.text());
    }
    assert_eq!(
        session_placement(&stats_json(admin), "gone"),
        Some(vec![1, 1])
    );
}

both_drivers!(
    session_released_when_its_agent_dies,
    super::session_released_when_its_agent_dies
);
