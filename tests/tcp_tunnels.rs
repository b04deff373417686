//! Raw TCP tunnels over real processes: a gateway with `--tcp-ports`, an
//! agent with `--tcp`, local TCP services written here with std::net, and
//! plain std clients on the public port.
//!
//! Each fault test ends by checking that the gateway is back at its
//! baseline: no stream, no TCP tunnel connection, its fd count.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;

const SEC: Duration = Duration::from_secs(1);

// ---- ports, processes ------------------------------------------------

/// `n` consecutive free ports below the ephemeral range, different for
/// every call in this process (tests run in parallel).
fn free_ports(n: u16) -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    if NEXT.load(Ordering::SeqCst) == 0 {
        let start = 20_000 + (std::process::id() % 100) as u16 * 100;
        let _ = NEXT.compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst);
    }
    loop {
        let base = NEXT.fetch_add(n, Ordering::SeqCst);
        assert!(base < 32_000, "no free port range found");
        let free = (base..base + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return base;
        }
    }
}

fn tcp_gateway(driver: &str, first: u16, last: u16, extra: &[&str]) -> Proc {
    let range = format!("{first}-{last}");
    let mut args = vec!["--tcp-ports", &range];
    args.extend_from_slice(extra);
    gateway(driver, &args)
}

/// An agent with `--tcp` specs and no `--to`, started without waiting.
fn tcp_agent_bg(driver: &str, gw: &Proc, session: &str, specs: &[String], extra: &[&str]) -> Bg {
    let tunnel = gw.field("tunnel");
    let mut args: Vec<String> = [
        "agent",
        "--gateway",
        &tunnel,
        "--session",
        session,
        "--no-pin",
        "--driver",
        driver,
        "--cores",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for s in specs {
        args.push("--tcp".into());
        args.push(s.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_nowait("agent", &refs)
}

/// A running TCP agent and the public ports it printed, in `--tcp` order.
struct TcpAgent {
    bg: Bg,
    ports: Vec<u16>,
    /// Open fds once ready and idle (uplinks, runtime): the agent's
    /// baseline.
    fds: usize,
}

fn wait_ready(bg: &Bg) {
    let t = Instant::now();
    while !bg.stdout().contains("ringtunnel agent ready") {
        assert!(
            t.elapsed() < 20 * SEC,
            "agent not ready: stdout {:?} stderr {:?}",
            bg.stdout(),
            bg.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tcp_agent(driver: &str, gw: &Proc, session: &str, specs: &[String]) -> TcpAgent {
    tcp_agent_with(driver, gw, session, specs, &[])
}

fn tcp_agent_with(
    driver: &str,
    gw: &Proc,
    session: &str,
    specs: &[String],
    extra: &[&str],
) -> TcpAgent {
    let bg = tcp_agent_bg(driver, gw, session, specs, extra);
    wait_ready(&bg);
    let out = bg.stdout();
    let ports: Vec<u16> = out
        .lines()
        .filter_map(|l| l.strip_prefix("TCP tunnel: tcp://127.0.0.1:"))
        .map(|rest| rest.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ports.len(), specs.len(), "{out}");
    // ACCEPT goes out just before the gateway core registers the uplink.
    std::thread::sleep(Duration::from_millis(100));
    let fds = bg.proc.fd_count();
    TcpAgent { bg, ports, fds }
}

fn public(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the tunnel port");
    s.set_read_timeout(Some(20 * SEC)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A metric without labels (or 0 if absent).
fn metric(admin: SocketAddr, name: &str) -> u64 {
    let m = metrics(admin);
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits for the gateway's baseline (streams, HTTP connections, fds), for
/// no TCP tunnel connection left, and for the agent's fds (local
/// connections) to be back where they were.
fn back_to_baseline(gw: &Proc, base: Baseline, agent: Option<&TcpAgent>) {
    let admin = gw.addr("admin");
    wait_baseline(gw, admin, base, 5 * SEC);
    let t = Instant::now();
    while metric(admin, "ringtunnel_tcp_connections") != 0 {
        assert!(t.elapsed() < 5 * SEC, "TCP tunnel connections left open");
        std::thread::sleep(Duration::from_millis(25));
    }
    if let Some(a) = agent {
        let t = Instant::now();
        while a.bg.proc.fd_count() > a.fds + 1 {
            let n = a.bg.proc.fd_count();
            assert!(t.elapsed() < 5 * SEC, "agent fds {n}, baseline {}", a.fds);
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

// ---- local services --------------------------------------------------

/// A local service: `handler` runs on its own thread per connection.
fn service(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let h = handler.clone();
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || h(s))
                .unwrap();
        }
    });
    addr
}

/// SSH-like: the server speaks first (a banner), then answers each line.
fn banner_service() -> SocketAddr {
    service(|mut s| {
        if s.write_all(b"SSH-2.0-ringtunnel_test\r\n").is_err() {
            return;
        }
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            let reply = match line.trim_end().strip_prefix("ping ") {
                Some(n) => format!("pong {n}\n"),
                None => format!("? {}\n", line.trim_end()),
            };
            if s.write_all(reply.as_bytes()).is_err() {
                return;
            }
            line.clear();
        }
    })
}

fn spec(local: SocketAddr, public: Option<u16>) -> String {
    match public {
        Some(p) => format!("{local}={p}"),
        None => local.port().to_string(),
    }
}

fn read_line<R: Read>(r: &mut BufReader<R>) -> String {
    let mut line = String::new();
    r.read_line(&mut line).expect("read a line");
    line
}

// ---- verified bulk data ----------------------------------------------

const BLOCK: usize = 1 << 20;

/// The bulk stream of a seed: 1 MiB blocks of pseudo-random bytes, each
/// stamped with its index in its first 8 bytes, so that a lost, repeated
/// or reordered block is caught as well as a changed byte. Every byte the
/// receiver gets is compared with the stream (memcmp speed, even in a
/// debug build, where hashing 2 GiB a byte at a time would dominate).
struct Bulk {
    block: Vec<u8>,
    chunk: Vec<u8>,
    index: u64,
}

impl Bulk {
    fn new(seed: u64) -> Bulk {
        let mut block = vec![0u8; BLOCK];
        let mut x = seed | 1;
        for w in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        Bulk {
            block,
            chunk: vec![0u8; BLOCK],
            index: u64::MAX,
        }
    }

    fn chunk(&mut self, i: u64) -> &[u8] {
        if self.index != i {
            self.chunk.copy_from_slice(&self.block);
            self.chunk[..8].copy_from_slice(&i.to_le_bytes());
            self.index = i;
        }
        &self.chunk
    }
}

/// Writes the first `n` bytes of the stream of `seed`.
fn send_bulk(s: &mut TcpStream, seed: u64, n: u64) {
    let mut b = Bulk::new(seed);
    let mut pos = 0u64;
    while pos < n {
        let k = (n - pos).min(BLOCK as u64) as usize;
        s.write_all(&b.chunk(pos / BLOCK as u64)[..k])
            .expect("bulk write");
        pos += k as u64;
    }
}

/// Reads to EOF, checking every byte against the stream of `seed`;
/// returns how many came.
fn recv_bulk(s: &mut TcpStream, seed: u64) -> u64 {
    let mut b = Bulk::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut pos = 0u64;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => return pos,
            Ok(n) => n,
            Err(e) => panic!("bulk read failed after {pos} bytes: {e}"),
        };
        let mut data = &buf[..n];
        while !data.is_empty() {
            let at = (pos % BLOCK as u64) as usize;
            let k = data.len().min(BLOCK - at);
            let want = &b.chunk(pos / BLOCK as u64)[at..at + k];
            assert!(
                data[..k] == *want,
                "bytes differ in [{pos}, {})",
                pos + k as u64
            );
            pos += k as u64;
            data = &data[k..];
        }
    }
}

/// Sends `n` bytes of the stream of `send` (then a half-close) while
/// reading and checking the stream of `recv` to EOF; the bytes received.
fn exchange_bulk(s: TcpStream, send: u64, recv: u64, n: u64) -> u64 {
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        send_bulk(&mut w, send, n);
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut r = s;
    let got = recv_bulk(&mut r, recv);
    writer.join().unwrap();
    got
}

// ---- tests -------------------------------------------------------------

both_drivers!(ssh_like_interactive_exchange, |driver: &str| {
    let p0 = free_ports(8);
    let gw = tcp_gateway(driver, p0, p0 + 7, &[]);
    let admin = gw.addr("admin");
    let ssh = banner_service();
    // One port asked for, one picked by the gateway.
    let a = tcp_agent(
        driver,
        &gw,
        "ssh",
        &[spec(ssh, Some(p0 + 5)), spec(ssh, None)],
    );
    // Uplinks and the port's listeners are part of the idle state.
    let base = baseline(&gw, admin);
    assert_eq!(a.ports[0], p0 + 5);
    assert!((p0..=p0 + 7).contains(&a.ports[1]) && a.ports[1] != p0 + 5);
    assert!(
        a.bg.stdout()
            .contains(&format!("TCP tunnel: tcp://127.0.0.1:{} -> {ssh}", p0 + 5)),
        "{}",
        a.bg.stdout()
    );
    for port in a.ports.clone() {
        let s = public(port);
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        // The server talks first: nothing was sent yet.
        assert_eq!(read_line(&mut r), "SSH-2.0-ringtunnel_test\r\n");
        for i in 0..100 {
            w.write_all(format!("ping {i}\n").as_bytes()).unwrap();
            assert_eq!(read_line(&mut r), format!("pong {i}\n"));
        }
    }
    let total = metric(admin, "ringtunnel_tcp_connections_total");
    assert_eq!(total, 2);
    back_to_baseline(&gw, base, Some(&a));
});

#[test]
fn one_gib_each_way_verified() {
    const N: u64 = 1 << 30;
    let p0 = free_ports(1);
    let gw = tcp_gateway("uring", p0, p0, &[]);
    let admin = gw.addr("admin");
    let (tx, rx) = mpsc::channel();
    let local = service(move |s| {
        let _ = tx.send(exchange_bulk(s, 2, 1, N));
    });
    let a = tcp_agent("uring", &gw, "bulk", &[spec(local, Some(p0))]);
    // Uplinks and the port's listeners are part of the idle state.
    let base = baseline(&gw, admin);
    let t = Instant::now();
    let got_here = exchange_bulk(public(p0), 1, 2, N);
    let got_there = rx.recv_timeout(60 * SEC).unwrap();
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "1 GiB each way through a TCP tunnel (debug build): {secs:.1} s, {:.0} MiB/s per direction",
        1024.0 / secs
    );
    assert_eq!(got_there, N, "client -> service");
    assert_eq!(got_here, N, "service -> client");
    let m = metrics(admin);
    assert_eq!(metric_sum(&m, "ringtunnel_tcp_bytes_total", "\"in\""), N);
    assert_eq!(metric_sum(&m, "ringtunnel_tcp_bytes_total", "\"out\""), N);
    back_to_baseline(&gw, base, Some(&a));
}

#[test]
fn thousand_concurrent_connections() {
    const CONNS: usize = 1000;
    let p0 = free_ports(1);
    let gw = tcp_gateway("uring", p0, p0, &[]);
    let admin = gw.addr("admin");
    // Upper-cases one line, then waits for the client's EOF.
    let local = service(|s| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let mut line = String::new();
        if r.read_line(&mut line).is_ok_and(|n| n > 0) {
            let _ = w.write_all(line.to_uppercase().as_bytes());
        }
        let _ = r.read_line(&mut line);
    });
    let a = tcp_agent("uring", &gw, "many", &[spec(local, Some(p0))]);
    // Uplinks and the port's listeners are part of the idle state.
    let base = baseline(&gw, admin);
    let mut conns: Vec<TcpStream> = (0..CONNS).map(|_| public(p0)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(format!("hello {i}\n").as_bytes()).unwrap();
    }
    let t = Instant::now();
    while metric(admin, "ringtunnel_tcp_connections") < CONNS as u64 {
        assert!(
            t.elapsed() < 10 * SEC,
            "not all {CONNS} connections open at once"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let mut r = BufReader::new(c);
        assert_eq!(read_line(&mut r), format!("HELLO {i}\n"));
    }
    drop(conns);
    back_to_baseline(&gw, base, Some(&a));
    assert_eq!(
        metric(admin, "ringtunnel_tcp_connections_total"),
        CONNS as u64
    );
}

both_drivers!(half_close_crosses_both_ways, |driver: &str| {
    let p0 = free_ports(2);
    let gw = tcp_gateway(driver, p0, p0 + 1, &[]);
    let admin = gw.addr("admin");
    // Reads to EOF, then answers with the count.
    let counter = service(|mut s| {
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        s.write_all(format!("got {}\n", all.len()).as_bytes())
            .unwrap();
    });
    // Says goodbye and shuts its write side, then keeps reading.
    let (tx, rx) = mpsc::channel();
    let closer = service(move |mut s| {
        s.write_all(b"bye\n").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        let _ = tx.send(all);
    });
    let a = tcp_agent(
        driver,
        &gw,
        "half",
        &[spec(counter, Some(p0)), spec(closer, Some(p0 + 1))],
    );
    // Uplinks and the port's listeners are part of the idle state.
    let base = baseline(&gw, admin);

    // Client shuts its write side and still gets the server's answer.
    let mut c = public(a.ports[0]);
    c.write_all(&pattern(100_000)).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "got 100000\n");

    // The server shut its write side: the client sees EOF, and can still
    // send.
    let mut c = public(a.ports[1]);
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye\n");
    c.write_all(&pattern(5000)).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(rx.recv_timeout(10 * SEC).unwrap(), pattern(5000));
    drop(c);
    back_to_baseline(&gw, base, Some(&a));
});

both_drivers!(
    connections_on_a_core_without_uplink_are_handed_off,
    |driver: &str| {
        let p0 = free_ports(1);
        let gw = tcp_gateway(driver, p0, p0, &[]);
        let admin = gw.addr("admin");
        let ssh = banner_service();
        // One uplink on a 2-core gateway: the core without it hands off.
        let a = tcp_agent_with(
            driver,
            &gw,
            "one",
            &[spec(ssh, Some(p0))],
            &["--uplinks", "1"],
        );
        let base = baseline(&gw, admin);
        // Which core's accept the kernel wakes is its choice: batches of
        // 40, held open together and each served, until one was handed
        // off (at most 10 batches).
        let (mut handoffs, mut served) = (0, 0u64);
        for _ in 0..10 {
            let conns: Vec<TcpStream> = (0..40).map(|_| public(p0)).collect();
            for (i, c) in conns.iter().enumerate() {
                let mut r = BufReader::new(c.try_clone().unwrap());
                assert!(read_line(&mut r).starts_with("SSH-2.0"), "connection {i}");
                (&*c).write_all(format!("ping {i}\n").as_bytes()).unwrap();
                assert_eq!(read_line(&mut r), format!("pong {i}\n"));
            }
            served += 40;
            let m = metrics(admin);
            handoffs = metric_sum(&m, "ringtunnel_gateway_handoffs_total", "core=");
            if handoffs > 0 {
                break;
            }
        }
        eprintln!("{driver}: {handoffs} of {served} TCP connections handed off");
        assert_eq!(metric(admin, "ringtunnel_tcp_connections_total"), served);
        // io_uring queues the cores' accepts in turn (measured: 9 to 40 of
        // 40 land on the core without the uplink). epoll wakes both cores
        // and the first to run wins, which on a loaded machine can be the
        // same core for a whole run: there the connections above must be
        // served, but a handoff is not guaranteed.
        if driver == "uring" {
            assert!(handoffs > 0, "no connection was handed off");
        }
        back_to_baseline(&gw, base, Some(&a));
    }
);

/// Writes until the peer goes (at most 4 GiB); reports the bytes written.
fn firehose(done: mpsc::Sender<u64>) -> SocketAddr {
    service(move |mut s| {
        let buf = vec![7u8; 64 * 1024];
        let mut n = 0u64;
        while n < 4 << 30 {
            match s.write(&buf) {
                Ok(k) if k > 0 => n += k as u64,
                _ => break,
            }
        }
        let _ = done.send(n);
    })
}

#[test]
fn agent_killed_mid_transfer_closes_the_public_side() {
    let p0 = free_ports(1);
    let gw = tcp_gateway("uring", p0, p0, &["--session-lease", "0"]);
    let admin = gw.addr("admin");
    let base = baseline(&gw, admin);
    let (tx, _rx) = mpsc::channel();
    let local = firehose(tx);
    let mut a = tcp_agent("uring", &gw, "doomed", &[spec(local, Some(p0))]);
    let mut c = public(p0);
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < 8 << 20 {
        got += c.read(&mut buf).unwrap();
    }
    a.bg.proc.kill(); // SIGKILL
    let t = Instant::now();
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(t.elapsed() < 5 * SEC, "public side still open"),
        }
    }
    let closed_in = t.elapsed();
    assert!(closed_in < 5 * SEC, "closed after {closed_in:?}");
    drop(c);
    back_to_baseline(&gw, base, None);
    // Without a lease the port is closed with the session.
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", p0)).is_ok() {
        assert!(t.elapsed() < 5 * SEC, "port still open");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn client_that_never_reads_is_bounded_then_closed() {
    let p0 = free_ports(1);
    let gw = tcp_gateway("uring", p0, p0, &["--write-stall-timeout", "2"]);
    let admin = gw.addr("admin");
    let (tx, rx) = mpsc::channel();
    let written = Arc::new(AtomicU64::new(0));
    let w2 = written.clone();
    let local = service(move |mut s| {
        let buf = vec![1u8; 64 * 1024];
        loop {
            match s.write(&buf) {
                Ok(k) if k > 0 => {
                    w2.fetch_add(k as u64, Ordering::SeqCst);
                }
                _ => break,
            }
        }
        let _ = tx.send(());
    });
    let a = tcp_agent("uring", &gw, "stall", &[spec(local, Some(p0))]);
    // Uplinks and the port's listeners are part of the idle state.
    let base = baseline(&gw, admin);
    let rss0 = gw.rss_kib();
    let c = connect_small_rcvbuf(SocketAddr::from(([127, 0, 0, 1], p0)), 4096);
    std::thread::sleep(SEC);
    // The service is stalled on credit: one stream window plus socket
    // buffers, not the gigabytes it would write.
    let w = written.load(Ordering::SeqCst);
    assert!(w > 0 && w < 32 << 20, "the service wrote {w} bytes");
    let grown = gw.rss_kib().saturating_sub(rss0);
    assert!(grown < 16 * 1024, "gateway grew by {grown} KiB");
    // The write stall closes it; the service's writes fail.
    rx.recv_timeout(10 * SEC)
        .expect("the stalled connection was closed at the local service");
    drop(c);
    back_to_baseline(&gw, base, Some(&a));
}

#[test]
fn local_service_down_closes_the_public_connection() {
    let p0 = free_ports(1);
    let gw = tcp_gateway("uring", p0, p0, &[]);
    let admin = gw.addr("admin");
    // A port nothing listens on.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let a = tcp_agent("uring", &gw, "deadend", &[spec(dead, Some(p0))]);
    // Uplinks and the port's listeners are part of the idle state.
    let base = baseline(&gw, admin);
    let mut c = public(p0);
    let t = Instant::now();
    let mut buf = [0u8; 16];
    assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)));
    assert!(t.elapsed() < 3 * SEC, "closed after {:?}", t.elapsed());
    drop(c);
    back_to_baseline(&gw, base, Some(&a));
    drop(a);
}

#[test]
fn per_port_limit_closes_the_extra_connection() {
    let p0 = free_ports(1);
    let gw = tcp_gateway("uring", p0, p0, &["--tcp-max-conns-per-port", "2"]);
    let admin = gw.addr("admin");
    let ssh = banner_service();
    let a = tcp_agent("uring", &gw, "limited", &[spec(ssh, Some(p0))]);
    // Uplinks and the port's listeners are part of the idle state.
    let base = baseline(&gw, admin);
    let banner = |s: &TcpStream| read_line(&mut BufReader::new(s.try_clone().unwrap()));
    let one = public(p0);
    let two = public(p0);
    assert!(banner(&one).starts_with("SSH-2.0"));
    assert!(banner(&two).starts_with("SSH-2.0"));
    let mut three = public(p0);
    let mut buf = [0u8; 64];
    assert!(matches!(three.read(&mut buf), Ok(0) | Err(_)));
    let m = metrics(admin);
    assert_eq!(
        metric_sum(&m, "ringtunnel_tcp_refused_total", "over_limit"),
        1
    );
    drop((one, two, three));
    back_to_baseline(&gw, base, Some(&a));
    let again = public(p0);
    assert!(banner(&again).starts_with("SSH-2.0"));
}

/// Starts an agent that the gateway must refuse: it exits with code 2 (a
/// start-up error) and `needle` in its message.
fn assert_refused(gw: &Proc, session: &str, specs: &[String], extra: &[&str], needle: &str) {
    let mut bg = tcp_agent_bg("uring", gw, session, specs, extra);
    let code = bg.wait_exit(15 * SEC).unwrap_or_else(|| {
        panic!(
            "agent still running: stdout {:?} stderr {:?}",
            bg.stdout(),
            bg.stderr()
        )
    });
    assert_eq!(code, 2, "{}", bg.stderr());
    assert!(bg.stderr().contains(needle), "{}", bg.stderr());
}

#[test]
fn refused_ports_stop_the_agent_with_the_reason() {
    let p0 = free_ports(3);
    // Refusals count toward the handshake ban; this test makes many.
    let gw = tcp_gateway(
        "uring",
        p0,
        p0 + 1,
        &["--session-lease", "1", "--handshake-fail-limit", "0"],
    );
    let ssh = banner_service();
    let mut owner = tcp_agent("uring", &gw, "owner", &[spec(ssh, Some(p0))]);

    let taken = format!("TCP port {p0} is taken by another session");
    assert_refused(&gw, "thief", &[spec(ssh, Some(p0))], &[], &taken);

    let outside = format!(
        "TCP port {} is outside the gateway's range ({p0}-{})",
        p0 + 2,
        p0 + 1
    );
    assert_refused(&gw, "outside", &[spec(ssh, Some(p0 + 2))], &[], &outside);

    // Held by another process on the gateway's host.
    let squatter = TcpListener::bind(("127.0.0.1", p0 + 1)).unwrap();
    let in_use = format!("TCP port {} cannot be opened on the gateway", p0 + 1);
    assert_refused(&gw, "squat", &[spec(ssh, Some(p0 + 1))], &[], &in_use);
    drop(squatter);
    assert_eq!(
        metric(gw.addr("admin"), "ringtunnel_tcp_port_refusals_total"),
        3
    );

    // The owner goes: during the lease the port stays its own, then it is
    // free for others.
    owner.bg.proc.kill();
    let t = Instant::now();
    let mut next = tcp_agent_bg("uring", &gw, "next", &[spec(ssh, Some(p0))], &[]);
    loop {
        if next.stdout().contains("ringtunnel agent ready") {
            break;
        }
        if next.wait_exit(Duration::from_millis(50)).is_some() {
            // Refused while the lease ran: try again.
            // The process has exited; its stderr reader may not have
            // read the pipe to its end yet.
            assert!(next.wait_stderr("taken", SEC), "{}", next.stderr());
            assert!(t.elapsed() < 10 * SEC, "the lease never ended");
            next = tcp_agent_bg("uring", &gw, "next", &[spec(ssh, Some(p0))], &[]);
        }
    }
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_millis(100));
    let s = public(p0);
    assert!(read_line(&mut BufReader::new(s)).starts_with("SSH-2.0"));
}

#[test]
fn no_tcp_ports_configured_or_outside_the_token_scope() {
    let gw = gateway("uring", &[]);
    let none = "this gateway has no TCP tunnels (started without --tcp-ports)";
    assert_refused(&gw, "x", &["22".into()], &[], none);

    let p0 = free_ports(4);
    let dir = std::env::temp_dir().join(format!("rt-tcp-scope-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "tcp_ports = \"{p0}-{}\"\n[[tokens]]\nsecret = \"scoped-secret-0123456789\"\n\
             sessions = [\"*\"]\ntcp_ports = [\"{p0}-{}\"]\n",
            p0 + 3,
            p0 + 1
        ),
    )
    .unwrap();
    let gw = gateway("uring", &["--config", file.to_str().unwrap()]);
    let token = ["--token", "scoped-secret-0123456789"];
    let scope = format!(
        "token not allowed to open TCP port {} (its tcp_ports: {p0}-{})",
        p0 + 2,
        p0 + 1
    );
    assert_refused(&gw, "y", &[format!("22={}", p0 + 2)], &token, &scope);
    // Within its scope the same token gets a port.
    let bg = tcp_agent_bg("uring", &gw, "z", &["22".into()], &token);
    wait_ready(&bg);
    assert!(
        bg.stdout()
            .contains(&format!("TCP tunnel: tcp://127.0.0.1:{p0} -> 127.0.0.1:22")),
        "{}",
        bg.stdout()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An agent with `--tcp` against a gateway that predates TCP tunnels: that
/// gateway ignores the HELLO's port list and answers the 24-byte ACCEPT of
/// version 1. The agent must stop with a clear reason, not serve HTTP only
/// or retry.
#[test]
fn older_gateway_without_tcp_tunnels_stops_the_agent() {
    use bytes::BytesMut;
    use ringtunnel::proto::{self, Accept, Decoder, Frame, FrameType};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming().take(4) {
            let mut c = c.unwrap();
            let mut buf = BytesMut::new();
            let mut dec = Decoder::new(proto::DEFAULT_MAX_FRAME);
            let hello = loop {
                if let Ok(Some(f)) = dec.decode(&mut buf) {
                    break f;
                }
                let mut tmp = [0u8; 4096];
                match c.read(&mut tmp) {
                    Ok(n) if n > 0 => buf.extend_from_slice(&tmp[..n]),
                    _ => return,
                }
            };
            // The agent did ask for its port, behind the capability bit.
            let h = hello.parse_hello().unwrap();
            assert_eq!(h.capabilities & proto::tcp::CAP_TCP, proto::tcp::CAP_TCP);
            assert_eq!(h.tcp, vec![0]);
            let new = Frame::accept(&Accept {
                version: proto::PROTOCOL_VERSION,
                gateway_cores: 1,
                core: 0,
                max_frame: proto::DEFAULT_MAX_FRAME,
                stream_window: proto::DEFAULT_STREAM_WINDOW,
                conn_window: proto::DEFAULT_CONN_WINDOW,
                max_streams: 16,
                capabilities: 0,
                tcp: Vec::new(),
                public: None,
                nodes: Vec::new(),
            });
            let old = Frame::new(FrameType::Accept, 0, new.payload.slice(..Accept::BASE_LEN));
            let mut out = BytesMut::new();
            proto::encode(&old, &mut out);
            c.write_all(&out).unwrap();
            held.push(c);
        }
    });
    let mut bg = spawn_nowait(
        "agent",
        &[
            "agent",
            "--gateway",
            &addr,
            "--session",
            "old",
            "--tcp",
            "22",
            "--cores",
            "1",
            "--no-pin",
        ],
    );
    let code = bg.wait_exit(15 * SEC).expect("the agent kept running");
    assert_eq!(code, 2, "{}", bg.stderr());
    assert!(
        bg.stderr()
            .contains("the gateway does not offer TCP tunnels"),
        "{}",
        bg.stderr()
    );
}

/// A fake agent over a std socket: claims `session` asking for `ports`,
/// then answers each TCP OPEN on `ports[0]` with a RESPONSE that is not
/// "connected" (an HTTP head) and never answers one on `ports[1]`.
fn lying_agent(tunnel: SocketAddr, session: &str, ports: [u16; 2]) {
    use bytes::{Bytes, BytesMut};
    use ringtunnel::proto::{self, tcp, Decoder, Frame, FrameType, Hello};
    let mut s = TcpStream::connect(tunnel).unwrap();
    let mut out = BytesMut::new();
    proto::encode(
        &Frame::hello(&Hello {
            version: proto::PROTOCOL_VERSION,
            capabilities: tcp::CAP_TCP,
            agent_id: 99,
            uplink_index: 0,
            uplinks_total: 1,
            token: String::new(),
            session: session.into(),
            tcp: ports.to_vec(),
        }),
        &mut out,
    );
    s.write_all(&out).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut dec = Decoder::new(proto::DEFAULT_MAX_FRAME);
        let mut buf = BytesMut::new();
        let mut tmp = vec![0u8; 64 * 1024];
        loop {
            while let Ok(Some(f)) = dec.decode(&mut buf) {
                match f.kind {
                    FrameType::Accept => {
                        assert_eq!(f.parse_accept().unwrap().tcp, ports.to_vec());
                        let _ = tx.send(());
                    }
                    FrameType::Open => {
                        let open = tcp::TcpOpen::decode(&f.payload).unwrap();
                        if open.port == ports[0] {
                            let head = Bytes::from_static(b"HTTP/1.1 200 OK\r\n\r\n");
                            let mut out = BytesMut::new();
                            proto::encode(
                                &Frame::new(FrameType::Response, f.stream, head),
                                &mut out,
                            );
                            let _ = s.write_all(&out);
                        }
                    }
                    _ => {}
                }
            }
            match s.read(&mut tmp) {
                Ok(n) if n > 0 => buf.extend_from_slice(&tmp[..n]),
                _ => return,
            }
        }
    });
    rx.recv_timeout(10 * SEC)
        .expect("the gateway accepted the fake agent");
    std::thread::sleep(Duration::from_millis(100));
}

#[test]
fn lying_or_silent_agent_never_holds_a_public_connection() {
    let p0 = free_ports(2);
    let gw = tcp_gateway("uring", p0, p0 + 1, &["--response-timeout", "1"]);
    let admin = gw.addr("admin");
    lying_agent(gw.addr("tunnel"), "liar", [p0, p0 + 1]);
    let base = baseline(&gw, admin);
    let mut buf = [0u8; 64];
    // A RESPONSE that is not "connected": closed at once.
    let mut c = public(p0);
    let t = Instant::now();
    assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)));
    assert!(t.elapsed() < 3 * SEC, "closed after {:?}", t.elapsed());
    // No answer at all: closed after --response-timeout.
    let mut c = public(p0 + 1);
    let t = Instant::now();
    assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)));
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < 5 * SEC,
        "closed after {waited:?}"
    );
    back_to_baseline(&gw, base, None);
}

#[test]
fn restarted_agent_gets_its_port_back() {
    let p0 = free_ports(4);
    let gw = tcp_gateway("uring", p0, p0 + 3, &["--session-lease", "10"]);
    let ssh = banner_service();
    // Something else takes the first port, so "any" is not simply the
    // first of the range.
    let _other = tcp_agent("uring", &gw, "other", &[spec(ssh, None)]);
    let mut first = tcp_agent("uring", &gw, "back", &[spec(ssh, None)]);
    let port = first.ports[0];
    assert_ne!(port, p0);
    first.bg.proc.kill();
    // Same host, session and --tcp: the same owner, within the lease.
    let again = tcp_agent("uring", &gw, "back", &[spec(ssh, None)]);
    assert_eq!(again.ports, vec![port]);
    let s = public(port);
    assert!(read_line(&mut BufReader::new(s)).starts_with("SSH-2.0"));
}
