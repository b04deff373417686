//! Streams that always end (issue 7): every stream a client, an agent or
//! a backend abandons, stalls or malforms ends, and leaves the gateway as
//! it found it (streams, public connections and fds back at baseline).
//! Real processes on 127.0.0.1, raw std sockets, curl, and fake agents
//! speaking the uplink protocol over a std TcpStream.
//!
//! Scenarios run on both drivers, one after the other inside one test
//! (`RT_DRIVERS=legacy` picks one, for diagnosis).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use ringtunnel::proto::{self, Decoder, ErrorCode, Frame, FrameType};

// ---------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------

fn drivers() -> Vec<String> {
    std::env::var("RT_DRIVERS")
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_else(|_| vec!["uring".into(), "legacy".into()])
}

/// Runs `f` for each driver in turn (never two gateways at once).
fn each_driver(f: impl Fn(&str)) {
    for d in drivers() {
        eprintln!("=== driver {d}");
        f(&d);
    }
}

/// echo + gateway + agent (session "demo") with extra flags.
fn stack(d: &str, gw_extra: &[&str], agent_extra: &[&str]) -> Stack {
    let echo = echo(d, 0);
    let gw = gateway(d, gw_extra);
    let agent = agent(d, &gw, "demo", echo.addr("listen"), agent_extra);
    let s = Stack { echo, gw, agent };
    wait_routable(s.public(), "demo");
    s
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The peer closed (FIN).
    Eof,
    /// A read error (RST).
    Reset,
    /// The deadline passed with the connection still open.
    Timeout,
    /// The `done` predicate held.
    Done,
}

impl Ending {
    fn closed(self) -> bool {
        matches!(self, Ending::Eof | Ending::Reset)
    }
}

/// Reads into `raw` until EOF, a read error, `deadline`, or `done(raw)`.
fn read_until(
    s: &mut TcpStream,
    raw: &mut Vec<u8>,
    deadline: Instant,
    done: impl Fn(&[u8]) -> bool,
) -> Ending {
    let mut tmp = vec![0u8; 65536];
    loop {
        if done(raw) {
            return Ending::Done;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ending::Timeout;
        }
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut tmp) {
            Ok(0) => return Ending::Eof,
            Ok(n) => raw.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ending::Timeout
            }
            Err(_) => return Ending::Reset,
        }
    }
}

fn head_end(raw: &[u8]) -> Option<usize> {
    raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn status_of(raw: &[u8]) -> u16 {
    String::from_utf8_lossy(raw)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// `raw` holds one complete response framed by Content-Length (or none).
fn complete_response(raw: &[u8]) -> bool {
    head_end(raw).is_some_and(|he| raw.len() >= he + content_length(&raw[..he]).unwrap_or(0))
}

fn content_length(head: &[u8]) -> Option<usize> {
    String::from_utf8_lossy(head).lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

fn show(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(&raw[..raw.len().min(400)]).into_owned();
    format!("{s:?} ({} bytes)", raw.len())
}

/// One request on a fresh connection with every read bounded by
/// `timeout`; status 0 if no complete response came.
fn request_within(addr: SocketAddr, raw: &[u8], timeout: Duration) -> Resp {
    let none = Resp {
        status: 0,
        headers: vec![],
        body: vec![],
    };
    let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
        return none;
    };
    s.set_read_timeout(Some(timeout)).unwrap();
    s.set_write_timeout(Some(timeout)).unwrap();
    if s.write_all(raw).is_err() {
        return none;
    }
    let mut buf = Vec::new();
    read_response(&mut s, &mut buf, raw.starts_with(b"HEAD ")).unwrap_or(none)
}

fn get_within(addr: SocketAddr, host: &str, path: &str, timeout: Duration) -> Resp {
    request_within(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
        timeout,
    )
}

/// Polls the sum of a gateway counter until it stops moving (three equal
/// samples 100 ms apart), at most `limit`.
fn wait_quiet(admin: SocketAddr, metric: &str, limit: Duration) {
    let t = Instant::now();
    let mut last = u64::MAX;
    let mut same = 0;
    while t.elapsed() < limit && same < 3 {
        let v = metric_sum(&metrics(admin), metric, "core=");
        same = if v == last { same + 1 } else { 0 };
        last = v;
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A metric without labels (`name value`).
fn metric_plain(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

fn check_pattern(body: &[u8]) {
    for off in (0..body.len()).step_by(4093) {
        assert_eq!(
            body[off],
            ringtunnel::echo::pattern_byte(off as u64),
            "byte {off}"
        );
    }
}

// --- a fake agent over a std socket ---------------------------------

enum Next {
    Frame(Frame),
    Closed,
    Timeout,
}

/// One uplink spoken by hand.
struct Uplink {
    s: TcpStream,
    buf: BytesMut,
    dec: Decoder,
}

impl Uplink {
    /// HELLO on `s`, then ACCEPT expected.
    fn handshake(mut s: TcpStream, session: &str) -> Uplink {
        let mut b = BytesMut::new();
        proto::encode(&fake_hello(session), &mut b);
        s.write_all(&b).unwrap();
        let mut up = Uplink {
            s,
            buf: BytesMut::new(),
            dec: Decoder::new(proto::DEFAULT_MAX_FRAME),
        };
        match up.next(Instant::now() + Duration::from_secs(5)) {
            Next::Frame(f) => assert_eq!(f.kind, FrameType::Accept, "wanted ACCEPT"),
            _ => panic!("no ACCEPT from the gateway"),
        }
        up
    }

    fn connect(tunnel: SocketAddr, session: &str) -> Uplink {
        Uplink::handshake(connect(tunnel), session)
    }

    fn send(&mut self, frames: &[Frame]) -> std::io::Result<()> {
        let mut b = BytesMut::new();
        for f in frames {
            proto::encode(f, &mut b);
        }
        self.s.write_all(&b)
    }

    fn next(&mut self, deadline: Instant) -> Next {
        loop {
            match self.dec.decode(&mut self.buf) {
                Ok(Some(f)) => return Next::Frame(f),
                Ok(None) => {}
                Err(e) => panic!("gateway sent a bad frame: {e}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Timeout;
            }
            self.s.set_read_timeout(Some(left)).unwrap();
            let mut tmp = [0u8; 16384];
            match self.s.read(&mut tmp) {
                Ok(0) => return Next::Closed,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Next::Timeout
                }
                Err(_) => return Next::Closed,
            }
        }
    }

    /// Reads until the gateway closes the uplink (true) or `deadline`
    /// (false). A GOAWAY on the way must carry `goaway`.
    fn expect_closed(&mut self, deadline: Instant, goaway: ErrorCode) -> bool {
        loop {
            match self.next(deadline) {
                Next::Closed => return true,
                Next::Timeout => return false,
                Next::Frame(f) if f.kind == FrameType::GoAway => {
                    let (code, reason) = f.parse_goaway().unwrap();
                    assert_eq!(code, goaway, "GOAWAY reason: {reason}");
                }
                Next::Frame(_) => {}
            }
        }
    }
}

/// A fake agent for session `session` on its own thread: every OPEN is
/// answered with `script(request head)`, PINGs with PONGs. Stops with
/// the returned flag (or when the gateway closes the uplink).
fn fake_agent(
    tunnel: SocketAddr,
    session: &'static str,
    script: fn(&str) -> Vec<Frame>,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let mut up = Uplink::connect(tunnel, session);
    let h = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            match up.next(Instant::now() + Duration::from_millis(100)) {
                Next::Closed => return,
                Next::Timeout => {}
                Next::Frame(f) => match f.kind {
                    FrameType::Open => {
                        let head = String::from_utf8_lossy(&f.payload).into_owned();
                        let mut out = script(&head);
                        for o in &mut out {
                            o.stream = f.stream;
                        }
                        if up.send(&out).is_err() {
                            return;
                        }
                    }
                    FrameType::Ping => {
                        let p = f.ping_payload().unwrap();
                        if up.send(&[Frame::pong(p)]).is_err() {
                            return;
                        }
                    }
                    _ => {}
                },
            }
        }
    });
    (stop, h)
}

fn resp(head: &'static str) -> Frame {
    Frame::response(0, Bytes::from_static(head.as_bytes()))
}

fn data(b: &'static [u8]) -> Frame {
    Frame::data(0, Bytes::from_static(b))
}

/// Responses that break their own framing, by request path.
fn framing_script(head: &str) -> Vec<Frame> {
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    match path {
        // A body after a response to HEAD.
        "/a" => vec![
            resp("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            data(b"hello"),
            Frame::end(0),
        ],
        // More body than the head promised.
        "/b" => vec![
            resp("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"),
            data(b"abcdef"),
            Frame::end(0),
        ],
        // A body after 204.
        "/c" => vec![
            resp("HTTP/1.1 204 No Content\r\n\r\n"),
            data(b"xyz"),
            Frame::end(0),
        ],
        // An empty DATA inside a chunked body.
        "/d" => vec![
            resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            data(b"ab"),
            data(b""),
            data(b"cd"),
            Frame::end(0),
        ],
        // 101 to a request that did not ask for an upgrade.
        "/e" => vec![
            resp("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
            Frame::end(0),
        ],
        _ => vec![
            resp("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            data(b"probe"),
            Frame::end(0),
        ],
    }
}

fn wait_fake_routable(p: SocketAddr, host: &str) {
    let t = Instant::now();
    loop {
        let r = get_within(p, host, "/probe", Duration::from_secs(1));
        if r.status == 200 && r.body == b"probe" {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{host} never became routable: {} {}",
            r.status,
            r.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// --- small std backends ---------------------------------------------

/// A backend that reads the whole request body before it answers, then
/// echoes it (so the backend's answer starts only after the upload).
fn buffering_echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut tmp = vec![0u8; 65536];
                loop {
                    let Some(end) = head_end(&buf) else {
                        match c.read(&mut tmp) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                        continue;
                    };
                    let cl = content_length(&buf[..end]).unwrap_or(0);
                    while buf.len() < end + cl {
                        match c.read(&mut tmp) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..end + cl).skip(end).collect();
                    let mut out =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                            .into_bytes();
                    out.extend_from_slice(&body);
                    if c.write_all(&out).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A backend that counts the `/delay/...` requests it receives and holds
/// each for `hold` (answering early to nothing; a closed connection ends
/// the hold). Other paths are answered at once and not counted.
fn counting_backend(hold: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 16384];
                loop {
                    let _ = c.set_read_timeout(None);
                    let Some(end) = head_end(&buf) else {
                        match c.read(&mut tmp) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                        continue;
                    };
                    let head: Vec<u8> = buf.drain(..end).collect();
                    if head.starts_with(b"GET /delay/") {
                        count.fetch_add(1, Ordering::SeqCst);
                        let until = Instant::now() + hold;
                        loop {
                            let left = until.saturating_duration_since(Instant::now());
                            if left.is_zero() {
                                break;
                            }
                            let _ = c.set_read_timeout(Some(left));
                            match c.read(&mut tmp) {
                                Ok(0) => return,
                                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        ErrorKind::WouldBlock | ErrorKind::TimedOut
                                    ) =>
                                {
                                    break
                                }
                                Err(_) => return,
                            }
                        }
                    }
                    if c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

// ---------------------------------------------------------------------
// 1. Aborted uploads
// ---------------------------------------------------------------------

#[test]
fn aborted_uploads_leave_nothing_behind() {
    each_driver(|d| {
        let s = Stack::start(d, 0);
        let (p, admin) = (s.public(), s.admin());
        let base = baseline(&s.gw, admin);
        let mut conns = Vec::new();
        for _ in 0..200 {
            let mut c = connect(p);
            c.write_all(b"POST /echo HTTP/1.1\r\nHost: demo\r\nContent-Length: 10\r\n\r\nabc")
                .unwrap();
            conns.push(c);
        }
        std::thread::sleep(Duration::from_millis(200));
        let mid = gateway_load(&s.gw, admin);
        drop(conns);
        assert!(
            mid.conns >= base.conns + 100,
            "{d}: the 200 uploads were not in flight: {mid:?} (baseline {base:?})"
        );
        let took = wait_baseline(&s.gw, admin, base, Duration::from_secs(2));
        eprintln!("{d}: in flight {mid:?}; back at {base:?} after {took:?}");
        let Stack {
            echo: _e,
            mut gw,
            agent: _a,
        } = s;
        let t = Instant::now();
        assert!(
            gw.terminate(Duration::from_secs(2)),
            "{d}: gateway still running 2 s after SIGTERM with nothing in flight"
        );
        eprintln!("{d}: SIGTERM exit after {:?}", t.elapsed());
    });
}

// ---------------------------------------------------------------------
// 2. Malformed chunked request bodies
// ---------------------------------------------------------------------

#[test]
fn bad_chunk_lines_get_400_then_close() {
    let bad: [&[u8]; 5] = [
        b"zz\r\n",
        b"0x\r\n",
        b"-5\r\n",
        // A bare LF ends the size line; a lenient parser would echo "hello".
        b"5\nhello\r\n0\r\n\r\n",
        // No CRLF after the chunk data.
        b"3\r\nabcXY",
    ];
    each_driver(|d| {
        let s = Stack::start(d, 0);
        let (p, admin) = (s.public(), s.admin());
        let base = baseline(&s.gw, admin);
        for body in bad {
            let mut c = connect(p);
            let mut req =
                b"POST /echo HTTP/1.1\r\nHost: demo\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            req.extend_from_slice(body);
            c.write_all(&req).unwrap();
            let mut raw = Vec::new();
            let end = read_until(
                &mut c,
                &mut raw,
                Instant::now() + Duration::from_secs(5),
                |_| false,
            );
            let what = format!("{d}: body {:?}", String::from_utf8_lossy(body));
            assert_eq!(
                status_of(&raw),
                400,
                "{what}: got {} then {end:?}",
                show(&raw)
            );
            let he = head_end(&raw).unwrap_or_else(|| panic!("{what}: {}", show(&raw)));
            let cl = content_length(&raw[..he]).unwrap_or(0);
            assert_eq!(
                raw.len(),
                he + cl,
                "{what}: exactly one 400 response expected, got {}",
                show(&raw)
            );
            assert!(
                end.closed(),
                "{what}: connection not closed after the 400 ({end:?})"
            );
        }
        let took = wait_baseline(&s.gw, admin, base, Duration::from_secs(2));
        eprintln!("{d}: baseline after {took:?}");
    });
}

// ---------------------------------------------------------------------
// 3. Clients that leave while the backend is still working
// ---------------------------------------------------------------------

#[test]
fn clients_closing_mid_exchange_end_their_streams() {
    each_driver(|d| {
        let s = Stack::start(d, 0);
        let (p, admin) = (s.public(), s.admin());
        let base = baseline(&s.gw, admin);
        let mut conns = Vec::new();
        for _ in 0..50 {
            let mut c = connect(p);
            c.write_all(b"GET /delay/3000 HTTP/1.1\r\nHost: demo\r\n\r\n")
                .unwrap();
            conns.push(c);
        }
        std::thread::sleep(Duration::from_millis(20));
        drop(conns);
        let mid = gateway_load(&s.gw, admin);
        let took = wait_baseline(&s.gw, admin, base, Duration::from_secs(2));
        eprintln!("{d}: just after the closes {mid:?}; baseline {base:?} after {took:?}");
    });
}

// ---------------------------------------------------------------------
// 4. Credit of discarded data comes back exactly
// ---------------------------------------------------------------------

#[test]
fn aborted_downloads_return_their_credit() {
    each_driver(|d| {
        let s = stack(d, &["--cores", "1"], &["--cores", "1", "--uplinks", "1"]);
        let (p, admin) = (s.public(), s.admin());
        let base = baseline(&s.gw, admin);
        let t = Instant::now();
        let workers: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut tmp = vec![0u8; 65536];
                    for i in 0..50 {
                        let mut c = connect(p);
                        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        c.write_all(b"GET /bytes/20000000 HTTP/1.1\r\nHost: demo\r\n\r\n")
                            .unwrap();
                        let mut got = 0;
                        while got < 65536 {
                            let n = c
                                .read(&mut tmp)
                                .unwrap_or_else(|e| panic!("download {i} stalled at {got}: {e}"));
                            assert!(n > 0, "download closed early at {got}");
                            got += n;
                        }
                        abort(c);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .unwrap_or_else(|_| panic!("{d}: an aborted download stalled (see above)"));
        }
        eprintln!("{d}: 200 aborted downloads took {:?}", t.elapsed());
        let n: usize = 20 * 1024 * 1024;
        let t = Instant::now();
        let mut c = connect(p);
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(format!("GET /bytes/{n} HTTP/1.1\r\nHost: demo\r\n\r\n").as_bytes())
            .unwrap();
        let mut buf = Vec::new();
        let r = read_response(&mut c, &mut buf, false);
        let took = t.elapsed();
        let r = r.unwrap_or_else(|| panic!("{d}: 20 MiB download stalled ({took:?})"));
        eprintln!("{d}: 20 MiB download took {took:?}");
        assert_eq!(r.status, 200, "{d}");
        assert_eq!(r.body.len(), n, "{d}: length");
        check_pattern(&r.body);
        assert!(took < Duration::from_secs(10), "{d}: 20 MiB took {took:?}");
        drop(c);
        wait_baseline(&s.gw, admin, base, Duration::from_secs(2));
    });
}

// ---------------------------------------------------------------------
// 5. A client that stops reading is dropped after --write-stall-timeout
// ---------------------------------------------------------------------

#[test]
fn write_stall_timeout_drops_a_client_that_does_not_read() {
    each_driver(|d| {
        let s = stack(d, &["--write-stall-timeout", "1"], &[]);
        let (p, admin) = (s.public(), s.admin());
        let base = baseline(&s.gw, admin);
        let n: usize = 50_000_000;
        let mut c = connect_small_rcvbuf(p, 4096);
        c.write_all(format!("GET /bytes/{n} HTTP/1.1\r\nHost: demo\r\n\r\n").as_bytes())
            .unwrap();
        let t = Instant::now();
        // The gateway gives up on the stalled client: its stream and its
        // connection go, although the client never closed anything.
        let mut seen = false;
        loop {
            let now = gateway_load(&s.gw, admin);
            seen |= now.streams > base.streams;
            if seen && now.streams <= base.streams && now.conns <= base.conns {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_millis(3500),
                "{d}: stalled client still served after {:?}: {now:?} (baseline {base:?}, stream seen: {seen})",
                t.elapsed()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        let gone = t.elapsed();
        let mut raw = Vec::new();
        let end = read_until(
            &mut c,
            &mut raw,
            Instant::now() + Duration::from_secs(10),
            |_| false,
        );
        eprintln!(
            "{d}: dropped after {gone:?}; the client then read {} bytes and {end:?}",
            raw.len()
        );
        assert!(raw.starts_with(b"HTTP/1.1 200"), "{d}: {}", show(&raw));
        assert!(end.closed(), "{d}: connection still open ({end:?})");
        assert!(raw.len() < n, "{d}: the whole body arrived");
        drop(c);
        wait_baseline(&s.gw, admin, base, Duration::from_secs(2));
    });
}

// ---------------------------------------------------------------------
// 6. Stalled readers do not starve the uplink
// ---------------------------------------------------------------------

#[test]
fn stalled_readers_do_not_starve_a_fresh_download() {
    each_driver(|d| {
        let s = stack(d, &["--cores", "1"], &["--cores", "1", "--uplinks", "1"]);
        let (p, admin) = (s.public(), s.admin());
        let base = baseline(&s.gw, admin);
        // Loopback lets the kernel absorb ~2.8 MB per connection whatever
        // the reader does, so 2 MiB answers would never stall in the
        // gateway: 8 MiB ones do. 40 of them (the number) with the
        // old 512 KiB stream window held more than the 16 MiB uplink
        // window; with 256 KiB they hold 10 MiB and the rest keeps flowing.
        let mut stalled = Vec::new();
        for _ in 0..40 {
            let mut c = connect_small_rcvbuf(p, 4096);
            c.write_all(b"GET /bytes/8388608 HTTP/1.1\r\nHost: demo\r\n\r\n")
                .unwrap();
            stalled.push(c);
        }
        // Let every stalled stream take all the data it can.
        wait_quiet(
            admin,
            "ringtunnel_uplink_frames_received_total",
            Duration::from_secs(5),
        );
        let t = Instant::now();
        let r = get_within(p, "demo", "/bytes/300000", Duration::from_secs(5));
        let took = t.elapsed();
        eprintln!(
            "{d}: fresh 300000-byte download beside 40 stalled ones took {took:?} (status {})",
            r.status
        );
        assert_eq!(r.status, 200, "{d}: fresh download failed ({took:?})");
        assert_eq!(r.body.len(), 300_000, "{d}");
        check_pattern(&r.body);
        assert!(took < Duration::from_secs(2), "{d}: took {took:?}");
        drop(stalled);
        wait_baseline(&s.gw, admin, base, Duration::from_secs(2));
    });
}

// ---------------------------------------------------------------------
// 7. A request body that stops arriving
// ---------------------------------------------------------------------

#[test]
fn body_idle_timeout_ends_a_stalled_upload() {
    each_driver(|d| {
        let s = stack(d, &["--body-idle-timeout", "1"], &[]);
        let (p, admin) = (s.public(), s.admin());
        let base = baseline(&s.gw, admin);
        let mut c = connect(p);
        // /headers answers only after the whole body: nothing but the
        // gateway's timeout can end this exchange.
        c.write_all(
            b"POST /headers HTTP/1.1\r\nHost: demo\r\nContent-Length: 1000\r\n\r\n0123456789",
        )
        .unwrap();
        let t = Instant::now();
        let mut raw = Vec::new();
        let end = read_until(&mut c, &mut raw, t + Duration::from_millis(3500), |r| {
            head_end(r).is_some()
        });
        let took = t.elapsed();
        eprintln!("{d}: after {took:?}: {end:?} {}", show(&raw));
        if head_end(&raw).is_some() {
            assert_eq!(status_of(&raw), 408, "{d}: {}", show(&raw));
        } else {
            assert!(
                end.closed(),
                "{d}: neither 408 nor a close within 3.5 s ({end:?})"
            );
        }
        assert!(
            took >= Duration::from_millis(800),
            "{d}: ended after {took:?}, before the 1 s body idle timeout"
        );
        drop(c);
        wait_baseline(&s.gw, admin, base, Duration::from_secs(2));
    });
}

// ---------------------------------------------------------------------
// 8. --backend-timeout counts from the end of the request body
// ---------------------------------------------------------------------

#[test]
fn slow_upload_outlives_a_short_backend_timeout() {
    let d = "uring";
    let backend = buffering_echo_backend();
    let gw = gateway(d, &[]);
    let _a = agent(d, &gw, "demo", backend, &["--backend-timeout", "2"]);
    let (p, admin) = (gw.addr("public"), gw.addr("admin"));
    wait_routable(p, "demo");
    let base = baseline(&gw, admin);
    // 500 KB at ~100 KB/s: about 5 s, well past the 2 s backend timeout.
    let n = 500_000;
    let body: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
    let mut c = connect(p);
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(
        format!("POST /echo HTTP/1.1\r\nHost: demo\r\nContent-Length: {n}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let t = Instant::now();
    for piece in body.chunks(10_000) {
        if c.write_all(piece).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent = t.elapsed();
    let mut buf = Vec::new();
    let r = read_response(&mut c, &mut buf, false).expect("no response");
    eprintln!(
        "upload sent in {sent:?}; answer {} after {:?}",
        r.status,
        t.elapsed()
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body.len(), n);
    assert!(r.body == body, "echoed body differs");
    drop(c);
    wait_baseline(&gw, admin, base, Duration::from_secs(2));
}

// ---------------------------------------------------------------------
// 9. Response framing is enforced against the agent
// ---------------------------------------------------------------------

/// Runs `case(public address)` against a gateway whose session "fake"
/// is served by a fake agent answering with `framing_script`, then checks
/// the gateway is back at its baseline.
fn with_fake_agent(case: impl Fn(&str, SocketAddr)) {
    each_driver(|d| {
        let gw = gateway(d, &[]);
        let (p, admin) = (gw.addr("public"), gw.addr("admin"));
        let (stop, agent_thread) = fake_agent(gw.addr("tunnel"), "fake", framing_script);
        wait_fake_routable(p, "fake");
        let base = baseline(&gw, admin);
        case(d, p);
        wait_baseline(&gw, admin, base, Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        agent_thread.join().unwrap();
    });
}

fn secs_from_now(n: u64) -> Instant {
    Instant::now() + Duration::from_secs(n)
}

#[test]
fn framing_a_no_body_after_a_head_response() {
    with_fake_agent(|d, p| {
        let mut c = connect(p);
        c.write_all(b"HEAD /a HTTP/1.1\r\nHost: fake\r\n\r\n")
            .unwrap();
        let mut raw = Vec::new();
        read_until(&mut c, &mut raw, secs_from_now(3), |r| {
            head_end(r).is_some()
        });
        assert_eq!(status_of(&raw), 200, "{d}: {}", show(&raw));
        let he = head_end(&raw).unwrap();
        // The next request on the connection gets a response of its own
        // (a complete one, starting with a status line), or the
        // connection is closed.
        let _ = c.write_all(b"GET /probe HTTP/1.1\r\nHost: fake\r\n\r\n");
        let end = read_until(&mut c, &mut raw, secs_from_now(3), |r| {
            complete_response(&r[he..])
        });
        let rest = &raw[he..];
        eprintln!("{d}: after the HEAD response: {} ({end:?})", show(rest));
        assert!(
            !rest.windows(5).any(|w| w == b"hello"),
            "{d}: the body of a HEAD response reached the client: {}",
            show(&raw)
        );
        if rest.is_empty() {
            assert!(
                end.closed(),
                "{d}: second request neither answered nor closed ({end:?})"
            );
        } else {
            assert!(
                end == Ending::Done && rest.starts_with(b"HTTP/1.1 "),
                "{d}: after the HEAD response: {} ({end:?})",
                show(rest)
            );
        }
    });
}

#[test]
fn framing_b_no_more_than_content_length() {
    with_fake_agent(|d, p| {
        let mut c = connect(p);
        c.write_all(b"GET /b HTTP/1.1\r\nHost: fake\r\n\r\n")
            .unwrap();
        let mut raw = Vec::new();
        let end = read_until(&mut c, &mut raw, secs_from_now(3), |_| false);
        assert_eq!(status_of(&raw), 200, "{d}: {}", show(&raw));
        let body = &raw[head_end(&raw).unwrap()..];
        assert!(
            body.len() <= 3 && b"abc".starts_with(body),
            "{d}: client got {} after Content-Length: 3",
            show(body)
        );
        assert!(end.closed(), "{d}: connection not closed ({end:?})");
    });
}

#[test]
fn framing_c_no_body_after_204() {
    with_fake_agent(|d, p| {
        let mut c = connect(p);
        c.write_all(b"GET /c HTTP/1.1\r\nHost: fake\r\n\r\n")
            .unwrap();
        let mut raw = Vec::new();
        let end = read_until(&mut c, &mut raw, secs_from_now(3), |_| false);
        assert_eq!(status_of(&raw), 204, "{d}: {}", show(&raw));
        let he = head_end(&raw).unwrap();
        assert_eq!(&raw[he..], b"", "{d}: body after 204: {}", show(&raw));
        assert!(end.closed(), "{d}: connection not closed ({end:?})");
    });
}

#[test]
fn framing_d_empty_data_is_not_a_last_chunk() {
    with_fake_agent(|d, p| {
        let mut c = connect(p);
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c.write_all(b"GET /d HTTP/1.1\r\nHost: fake\r\n\r\n")
            .unwrap();
        let mut buf = Vec::new();
        let r = read_response(&mut c, &mut buf, false)
            .unwrap_or_else(|| panic!("{d}: no complete chunked response: {}", show(&buf)));
        assert_eq!(r.status, 200, "{d}");
        assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{d}");
        assert_eq!(r.text(), "abcd", "{d}: chunked body");
        // Nothing left over that the next response could be confused with.
        c.write_all(b"GET /probe HTTP/1.1\r\nHost: fake\r\n\r\n")
            .unwrap();
        let r = read_response(&mut c, &mut buf, false)
            .unwrap_or_else(|| panic!("{d}: no answer to the next request: {}", show(&buf)));
        assert_eq!((r.status, r.text().as_str()), (200, "probe"), "{d}: desync");
    });
}

#[test]
fn framing_e_unrequested_101_is_a_502() {
    with_fake_agent(|d, p| {
        let r = get_within(p, "fake", "/e", Duration::from_secs(3));
        assert_eq!(r.status, 502, "{d}: {:?} {}", r.headers, r.text());
    });
}

// ---------------------------------------------------------------------
// 10. Upgrade requests cannot carry a body
// ---------------------------------------------------------------------

#[test]
fn upgrade_with_a_body_is_refused_without_desync() {
    each_driver(|d| {
        let s = Stack::start(d, 0);
        let (p, admin) = (s.public(), s.admin());
        let base = baseline(&s.gw, admin);
        let r = request_within(
            p,
            b"GET /upgrade HTTP/1.1\r\nHost: demo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 5\r\n\r\nhello",
            Duration::from_secs(5),
        );
        assert_eq!(r.status, 400, "{d}: {:?} {}", r.headers, r.text());
        let r = get_within(p, "demo", "/", Duration::from_secs(5));
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "ringtunnel echo\n"),
            "{d}: next request"
        );
        wait_baseline(&s.gw, admin, base, Duration::from_secs(2));
    });
}

// ---------------------------------------------------------------------
// 11. An agent cannot make the gateway grow without bound
// ---------------------------------------------------------------------

#[test]
fn ping_flood_and_huge_window_close_the_uplink() {
    let gw = gateway("uring", &[]);
    let (tunnel, admin) = (gw.addr("tunnel"), gw.addr("admin"));
    let base = baseline(&gw, admin);
    let rss0 = gw.rss_kib();
    // Never reads: the PONGs pile up toward it.
    let mut up = Uplink::handshake(connect_small_rcvbuf(tunnel, 4096), "flood");
    let mut batch = BytesMut::new();
    for i in 0..1024u64 {
        proto::encode(&Frame::ping(i.to_be_bytes()), &mut batch);
    }
    up.s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let peak = AtomicU64::new(rss0);
    let done = AtomicBool::new(false);
    let (closed_at, written) = std::thread::scope(|sc| {
        sc.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(gw.rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let t = Instant::now();
        let mut off = 0;
        let mut written = 0u64;
        let mut closed_at = None;
        while t.elapsed() < Duration::from_secs(5) {
            if peak.load(Ordering::Relaxed) > rss0 + 128 * 1024 {
                break; // already failed; spare the machine
            }
            match up.s.write(&batch[off..]) {
                Ok(0) => {
                    closed_at = Some(t.elapsed());
                    break;
                }
                Ok(n) => {
                    written += n as u64;
                    off = (off + n) % batch.len();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => {
                    closed_at = Some(t.elapsed());
                    break;
                }
            }
        }
        if closed_at.is_none() {
            // Still writable or blocked: has the gateway closed its side?
            let mut raw = Vec::new();
            let end = read_until(&mut up.s, &mut raw, t + Duration::from_secs(8), |_| false);
            if end.closed() {
                closed_at = Some(t.elapsed());
            }
        }
        peak.fetch_max(gw.rss_kib(), Ordering::Relaxed);
        done.store(true, Ordering::Relaxed);
        (closed_at, written)
    });
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "ping flood: {} pings written, uplink closed after {closed_at:?}; VmRSS {rss0} KiB -> peak {peak} KiB",
        written / 20
    );
    assert!(
        peak < rss0 + 64 * 1024,
        "gateway RSS grew from {rss0} to {peak} KiB under a PING flood"
    );
    assert!(
        closed_at.is_some_and(|t| t <= Duration::from_secs(8)),
        "gateway kept an uplink that floods PINGs and never reads ({closed_at:?})"
    );

    // A WINDOW that lifts the uplink's credit past 2^31-1.
    let mut up = Uplink::connect(tunnel, "flood");
    up.send(&[Frame::window(0, 0x7fff_ffff)]).unwrap();
    assert!(
        up.expect_closed(
            Instant::now() + Duration::from_secs(3),
            ErrorCode::FlowControlError
        ),
        "uplink still open after WINDOW(0, 0x7fffffff)"
    );
    drop(up);
    wait_baseline(&gw, admin, base, Duration::from_secs(2));
}

// ---------------------------------------------------------------------
// 12. A panicking uplink task takes nothing else down
// ---------------------------------------------------------------------

#[test]
fn panic_in_an_uplink_task_is_isolated() {
    let d = "uring";
    let echo = echo(d, 0);
    let gw = gateway_env(
        d,
        &["--cores", "2"],
        &[("RINGTUNNEL_FAULT_PANIC_UPLINK", "1")],
    );
    let _a = agent(d, &gw, "demo", echo.addr("listen"), &["--uplinks", "2"]);
    let (p, admin) = (gw.addr("public"), gw.addr("admin"));
    // Both uplinks placed; no request yet (the first RESPONSE on uplink 1
    // is the fault).
    let t = Instant::now();
    while session_placement(&stats_json(admin), "demo").map(|v| v.iter().sum::<u32>()) != Some(2) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "uplinks not placed: {}",
            stats_json(admin)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let base = baseline(&gw, admin);
    let t = Instant::now();
    let mut log: Vec<(Duration, u16)> = Vec::new();
    let mut first_fail: Option<Duration> = None;
    while t.elapsed() < Duration::from_secs(5) {
        if first_fail.is_some_and(|f| t.elapsed() > f + Duration::from_millis(2500)) {
            break;
        }
        let at = t.elapsed();
        let r = get_within(p, "demo", "/", Duration::from_secs(1));
        if r.status != 200 && first_fail.is_none() {
            first_fail = Some(at);
        }
        log.push((at, r.status));
    }
    let failures: Vec<_> = log.iter().filter(|(_, s)| *s != 200).collect();
    eprintln!(
        "{} requests, first failure at {first_fail:?}, failures: {failures:?}",
        log.len()
    );
    let panics = metric_plain(&metrics(admin), "ringtunnel_task_panics_total");
    assert!(
        panics >= 1,
        "no task panicked (ringtunnel_task_panics_total {panics})"
    );
    if let Some(f) = first_fail {
        let late: Vec<_> = log
            .iter()
            .filter(|(at, s)| *at > f + Duration::from_secs(1) && *s != 200)
            .collect();
        assert!(
            late.is_empty(),
            "requests still failing more than 1 s after the first failure ({f:?}): {late:?}"
        );
    }
    for i in 0..20 {
        let r = get_within(p, "demo", "/", Duration::from_secs(2));
        assert_eq!(r.status, 200, "request {i} after the panic: {}", r.text());
    }
    wait_baseline(&gw, admin, base, Duration::from_secs(2));
}

// ---------------------------------------------------------------------
// 13. A client's cancel reaches the agent and its backend queue
// ---------------------------------------------------------------------

#[test]
fn cancellation_reaches_the_backend_queue() {
    each_driver(|d| {
        // The backend holds each /delay request 1 s: an agent that kept
        // feeding it cancelled requests would show ~2 more per second.
        let (backend, seen) = counting_backend(Duration::from_secs(1));
        let gw = gateway(d, &[]);
        let _a = agent(
            d,
            &gw,
            "demo",
            backend,
            &["--cores", "1", "--backend-concurrency", "2"],
        );
        let (p, admin) = (gw.addr("public"), gw.addr("admin"));
        wait_routable(p, "demo");
        let base = baseline(&gw, admin);
        let mut conns = Vec::new();
        for _ in 0..100 {
            let mut c = connect(p);
            c.write_all(b"GET /delay/10000 HTTP/1.1\r\nHost: demo\r\n\r\n")
                .unwrap();
            conns.push(c);
        }
        std::thread::sleep(Duration::from_millis(10));
        drop(conns);
        let t = Instant::now();
        let took = wait_baseline(&gw, admin, base, Duration::from_secs(2));
        std::thread::sleep(Duration::from_secs(3).saturating_sub(t.elapsed()));
        let n = seen.load(Ordering::SeqCst);
        eprintln!("{d}: gateway idle after {took:?}; the backend saw {n} of 100 requests");
        assert!(
            n <= 2 + 2,
            "{d}: the backend saw {n} of 100 cancelled requests (concurrency 2)"
        );
    });
}

// ---------------------------------------------------------------------
// 14. --cores above 64 is refused
// ---------------------------------------------------------------------

#[test]
fn cores_above_64_are_refused() {
    let runs: [(&'static str, &[&str]); 2] = [
        (
            "gateway",
            &[
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--tunnel-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "off",
                "--no-pin",
                "--cores",
                "65",
            ],
        ),
        (
            "agent",
            &[
                "agent",
                "--gateway",
                "127.0.0.1:9",
                "--session",
                "many",
                "--to",
                "127.0.0.1:9",
                "--no-pin",
                "--cores",
                "65",
            ],
        ),
    ];
    for (name, args) in runs {
        let mut bg = spawn_nowait(name, args);
        let t = Instant::now();
        let status = loop {
            if let Some(st) = bg.proc.child.try_wait().unwrap() {
                break Some(st);
            }
            if t.elapsed() > Duration::from_secs(5) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let status = status.unwrap_or_else(|| panic!("{name} --cores 65 is still running"));
        assert!(!status.success(), "{name} --cores 65 exited with {status}");
        assert!(
            bg.wait_stderr("64", Duration::from_secs(2)),
            "{name} --cores 65: stderr does not name the limit: {}",
            bg.stderr()
        );
    }
}

// ---------------------------------------------------------------------
// 15. The agent gives up on a gateway that never answers HELLO
// ---------------------------------------------------------------------

#[test]
fn agent_handshake_timeout_reconnects() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming().take(2) {
            let Ok(c) = c else { return };
            if tx.send((Instant::now(), c)).is_err() {
                return;
            }
        }
    });
    let a = [
        "agent",
        "--gateway",
        &addr.to_string(),
        "--session",
        "slow",
        "--to",
        "127.0.0.1:9",
        "--cores",
        "1",
        "--no-pin",
        "--uplinks",
        "1",
        "--handshake-timeout",
        "1",
    ];
    let bg = spawn_nowait("agent", &a);
    let (t1, mut first) = rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("the agent never connected: {}", bg.stderr()));
    let (t2, _second) = rx.recv_timeout(Duration::from_secs(4)).unwrap_or_else(|_| {
        panic!(
            "no second connection within 4 s of the first: {}",
            bg.stderr()
        )
    });
    let gap = t2 - t1;
    eprintln!("reconnected after {gap:?}");
    assert!(
        gap >= Duration::from_millis(800),
        "reconnected after {gap:?}, before the 1 s handshake timeout"
    );
    // The first attempt was given up, not leaked.
    let mut raw = Vec::new();
    let end = read_until(
        &mut first,
        &mut raw,
        Instant::now() + Duration::from_secs(2),
        |_| false,
    );
    assert!(end.closed(), "first connection still open ({end:?})");
    let t = Instant::now();
    while !bg.stderr().to_lowercase().contains("handshake") && t.elapsed() < Duration::from_secs(2)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        bg.stderr().to_lowercase().contains("handshake"),
        "the agent did not report the handshake timeout (RUST_LOG=warn): {}",
        bg.stderr()
    );
}

// ---------------------------------------------------------------------
// 16. A request that waits too long for a backend slot gets 503
// ---------------------------------------------------------------------

#[test]
fn slot_timeout_answers_503() {
    // One slot, held 3 s by the first request; the second waits 1 s.
    let (backend, seen) = counting_backend(Duration::from_secs(3));
    let gw = gateway("uring", &[]);
    let _a = agent(
        "uring",
        &gw,
        "demo",
        backend,
        &[
            "--cores",
            "1",
            "--backend-concurrency",
            "1",
            "--slot-timeout",
            "1",
        ],
    );
    let (p, admin) = (gw.addr("public"), gw.addr("admin"));
    wait_routable(p, "demo");
    let base = baseline(&gw, admin);
    let mut first = connect(p);
    first
        .write_all(b"GET /delay/1 HTTP/1.1\r\nHost: demo\r\n\r\n")
        .unwrap();
    // Let the first take the slot.
    let t = Instant::now();
    while seen.load(Ordering::SeqCst) == 0 && t.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = Instant::now();
    let r = request_within(
        p,
        b"GET /delay/1 HTTP/1.1\r\nHost: demo\r\n\r\n",
        Duration::from_secs(5),
    );
    let took = t.elapsed();
    eprintln!("queued request answered {} after {took:?}", r.status);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("Retry-After").is_some(), "503 without Retry-After");
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_millis(2500),
        "503 after {took:?}, not after the 1 s slot timeout"
    );
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "the refused request reached the backend"
    );
    drop(first);
    wait_baseline(&gw, admin, base, Duration::from_secs(2));
}

// ---------------------------------------------------------------------
// 17. An agent that never answers: 504 after --response-timeout
// ---------------------------------------------------------------------

/// Answers the routability probe, nothing else.
fn silent_script(head: &str) -> Vec<Frame> {
    if head.starts_with("GET /probe ") {
        framing_script(head)
    } else {
        Vec::new()
    }
}

#[test]
fn response_timeout_answers_504() {
    let gw = gateway("uring", &["--response-timeout", "1"]);
    let (p, admin) = (gw.addr("public"), gw.addr("admin"));
    let (stop, agent_thread) = fake_agent(gw.addr("tunnel"), "mute", silent_script);
    wait_fake_routable(p, "mute");
    let base = baseline(&gw, admin);
    let t = Instant::now();
    let r = request_within(
        p,
        b"GET /x HTTP/1.1\r\nHost: mute\r\n\r\n",
        Duration::from_secs(5),
    );
    let took = t.elapsed();
    eprintln!("silent agent: {} after {took:?}", r.status);
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "504 after {took:?}, not after the 1 s response timeout"
    );
    wait_baseline(&gw, admin, base, Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    agent_thread.join().unwrap();
}

// ---------------------------------------------------------------------
// 18. Only idempotent, body-less requests are replayed on a fresh
//     backend connection
// ---------------------------------------------------------------------

/// A backend that answers one request per connection with a keep-alive
/// 200 ("ok") and then closes: every connection the agent pools is dead
/// by the next request. Counts the requests it saw, by method.
fn one_shot_backend() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            while head_end(&buf).is_none() {
                match c.read(&mut tmp) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            }
            if head_end(&buf).is_none() {
                continue;
            }
            let method = String::from_utf8_lossy(&buf)
                .split(' ')
                .next()
                .unwrap_or("")
                .to_string();
            log.lock().unwrap().push(method);
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            // Dropping `c` closes it: the agent's pooled copy is now dead.
        }
    });
    (addr, seen)
}

#[test]
fn only_idempotent_requests_are_replayed() {
    let (backend, seen) = one_shot_backend();
    let gw = gateway("uring", &[]);
    let _a = agent("uring", &gw, "demo", backend, &["--cores", "1"]);
    let p = gw.addr("public");
    wait_routable(p, "demo");
    seen.lock().unwrap().clear();
    let ask = |raw: &[u8]| {
        // Let the backend's close reach the agent's pooled connection.
        std::thread::sleep(Duration::from_millis(200));
        request_within(p, raw, Duration::from_secs(5)).status
    };
    let get = b"GET /x HTTP/1.1\r\nHost: demo\r\n\r\n";
    // Leaves a pooled connection that the backend then closes.
    assert_eq!(ask(get), 200);
    // A body-less POST on it fails and must not be sent again.
    assert_eq!(
        ask(b"POST /x HTTP/1.1\r\nHost: demo\r\n\r\n"),
        502,
        "a POST was replayed"
    );
    // A fresh connection, pooled and closed again by the backend.
    assert_eq!(ask(get), 200);
    // A GET on the dead pooled connection is replayed on a fresh one.
    assert_eq!(
        ask(get),
        200,
        "a GET on a stale connection was not replayed"
    );
    let methods = seen.lock().unwrap().clone();
    assert_eq!(methods, ["GET", "GET", "GET"], "backend saw {methods:?}");
}
