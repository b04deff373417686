//! Raw TCP tunnels across a cluster (issue 11, "raw TCP tunnels forward
//! the same way"): two gateways in this process as cluster nodes, node A
//! on 127.0.0.1 and node B on 127.0.0.2 (so both can bind the tunnel's
//! port), their views set by the test (`Gateway::set_cluster_view`, what
//! the etcd registry does in a running cluster), an agent process with
//! `--tcp` on node A only, a TCP service written here, and std clients on
//! node B's copy of the port.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ringtunnel::cluster::{ClusterConfig, ClusterView, NodeInfo, NodeState};
use ringtunnel::config::{Cores, GatewayConfig};
use ringtunnel::gateway::Gateway;
use ringtunnel::proto::tcp::PortRanges;
use ringtunnel::runtime::DriverKind;

const SECRET: &str = "a-cluster-secret-of-some-length";
const SEC: Duration = Duration::from_secs(1);
/// What the service says first, before the client sends anything.
const GREETING: &[u8] = b"hi\n";
/// What the service sends after it read the client's EOF.
const TRAILER: &[u8] = b"\nEOF-SEEN\n";
/// B's `--tcp-max-conns-per-port`.
const MAX_CONNS: usize = 3;

/// A port free on both 127.0.0.1 and 127.0.0.2, different per call,
/// below the ephemeral range (so no client socket takes it between the
/// check and the gateway's bind).
fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    if NEXT.load(Ordering::SeqCst) == 0 {
        let start = 12_000 + (std::process::id() % 100) as u16 * 70;
        let _ = NEXT.compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst);
    }
    loop {
        let p = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(p < 19_999, "no free port found");
        let free = ["127.0.0.1", "127.0.0.2"]
            .iter()
            .all(|h| TcpListener::bind((*h, p)).is_ok());
        if free {
            return p;
        }
    }
}

fn node(name: &str, host: &str, port: u16, max_conns: usize) -> Gateway {
    ringtunnel::gateway::start(GatewayConfig {
        listen: format!("{host}:0"),
        tunnel_listen: format!("{host}:0"),
        admin_listen: Some("127.0.0.1:0".into()),
        cores: Cores::new(Some(2), false, DriverKind::Auto),
        shutdown_grace: 5 * SEC,
        write_stall_timeout: SEC,
        tcp_ports: PortRanges::parse(&format!("{port}-{port}")).unwrap(),
        tcp_max_conns_per_port: max_conns,
        cluster: Some(ClusterConfig {
            // Never contacted here: the test hands the views out.
            etcd: vec!["http://127.0.0.1:9".into()],
            node: name.into(),
            peer_listen: format!("{host}:0"),
            advertise: None,
            secret: SECRET.into(),
            lease_ttl: ringtunnel::cluster::DEFAULT_LEASE_TTL,
        }),
        ..GatewayConfig::default()
    })
    .expect("node starts")
}

/// A view of nodes A and B in which `holders` hold session "demo" with
/// TCP ports `tcp`.
/// The agent stops by itself (20 s at most), having said `why`.
fn stops_saying(agent: &mut Bg, why: &str) {
    assert!(
        agent.wait_exit(20 * SEC).is_some(),
        "the agent kept going: {}",
        agent.stderr()
    );
    // Its stderr is collected by a thread: wait for the line, bounded.
    assert!(agent.wait_stderr(why, 5 * SEC), "{}", agent.stderr());
}

/// Hands both nodes the same `view` (as the registry would).
fn give_view(a: &Gateway, b: &Gateway, holders: &[&str], tcp: &[u16], rev: i64) {
    let v = view(a, b, holders, tcp, rev);
    a.set_cluster_view(v.clone());
    b.set_cluster_view(v);
}

fn view(a: &Gateway, b: &Gateway, holders: &[&str], tcp: &[u16], rev: i64) -> ClusterView {
    let nodes = [("node-a", a), ("node-b", b)].map(|(name, gw)| {
        (
            name.to_string(),
            gw.peer_addr().unwrap(),
            gw.tunnel_addr(),
            2,
        )
    });
    common::cluster::view_of(rev, nodes, holders, tcp)
}

fn sum(gw: &Gateway, f: impl Fn(&ringtunnel::io::stats::CoreStats) -> &AtomicU64) -> u64 {
    gw.stats().iter().map(|c| f(c).load(Ordering::SeqCst)).sum()
}

/// The TCP service: greets, echoes, and after the client's EOF sends
/// [`TRAILER`] and closes. `open` counts its live connections.
struct Service {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
}

/// The two-node set-up of most tests here: a free TCP tunnel port, the
/// service behind it, node A on 127.0.0.1 and node B on 127.0.0.2.
fn two_nodes() -> (u16, Service, Gateway, Gateway) {
    let port = free_port();
    let svc = service();
    let a = node("node-a", "127.0.0.1", port, MAX_CONNS);
    let b = node("node-b", "127.0.0.2", port, MAX_CONNS);
    (port, svc, a, b)
}

/// The tunnel port as node B serves it.
fn b_side(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 2], port))
}

fn service() -> Service {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let o = open.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let o = o.clone();
            o.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(30 * SEC));
                let mut buf = vec![0u8; 64 * 1024];
                // true: the client's EOF arrived (not an error).
                let eof = s.write_all(GREETING).is_ok()
                    && loop {
                        match s.read(&mut buf) {
                            Ok(0) => break true,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    break false;
                                }
                            }
                            Err(_) => break false,
                        }
                    };
                if eof {
                    let _ = s.write_all(TRAILER);
                    let _ = s.shutdown(Shutdown::Write);
                }
                drop(s);
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Service { addr, open }
}

fn tcp_agent(gw: &Gateway, spec: &str) -> Bg {
    let tunnel = gw.tunnel_addr().to_string();
    spawn_nowait(
        "agent",
        &[
            "agent",
            "--gateway",
            &tunnel,
            "--session",
            "demo",
            "--no-pin",
            "--cores",
            "1",
            "--nodes",
            "1",
            // The id the views of these tests give the session's holds.
            "--agent-id",
            "1",
            "--tcp",
            spec,
        ],
    )
}

fn wait_stdout(bg: &Bg, needle: &str) {
    let t = Instant::now();
    while !bg.stdout().contains(needle) {
        assert!(
            t.elapsed() < 20 * SEC,
            "agent never said {needle:?}: stdout {:?} stderr {:?}",
            bg.stdout(),
            bg.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn client(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to B's tunnel port");
    s.set_read_timeout(Some(10 * SEC)).unwrap();
    s
}

fn read_exact(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).expect("read");
    v
}

/// Sockets of this process with local port `port` that are not
/// listening and have an inode (accepted ones held open by an fd).
fn held_sockets(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f[1].rsplit(':').next().unwrap();
            u16::from_str_radix(local, 16).unwrap() == port && f[3] != "0A" && f[9] != "0"
        })
        .count()
}

/// Waits until neither node has a stream or TCP tunnel connection, the
/// service has no connection, nobody holds an accepted socket on the
/// tunnel port, and A's peer port holds `peer_base` sockets (the links).
fn wait_back(a: &Gateway, b: &Gateway, svc: &Service, port: u16, peer_base: usize, what: &str) {
    let peer = a.peer_addr().unwrap().port();
    let t = Instant::now();
    loop {
        let now = (
            sum(a, |c| &c.active_streams),
            sum(b, |c| &c.active_streams),
            sum(a, |c| &c.tcp_conns),
            sum(b, |c| &c.tcp_conns),
            svc.open.load(Ordering::SeqCst),
            held_sockets(port),
            held_sockets(peer),
        );
        if now == (0, 0, 0, 0, 0, 0, peer_base) {
            return;
        }
        assert!(
            t.elapsed() < 10 * SEC,
            "{what}: (A streams, B streams, A tcp, B tcp, service conns, port sockets, A peer \
             sockets) = {now:?}, want peer sockets {peer_base}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metric(gw: &Gateway, name: &str) -> u64 {
    let m = metrics(gw.admin_addr().unwrap());
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until connecting to `addr` is refused (the listener is closed).
fn wait_refused(addr: SocketAddr, what: &str) {
    let t = Instant::now();
    loop {
        match TcpStream::connect_timeout(&addr, SEC) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            _ => {}
        }
        assert!(t.elapsed() < 10 * SEC, "{what}: {addr} still accepts");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until B's copy of the port serves the tunnel (B has read the
/// view and its listener is up on every core).
fn wait_served(addr: SocketAddr) {
    let t = Instant::now();
    loop {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, SEC) {
            s.set_read_timeout(Some(5 * SEC)).unwrap();
            let mut g = [0u8; 3];
            if s.read_exact(&mut g).is_ok() && g == GREETING {
                return;
            }
        }
        assert!(t.elapsed() < 10 * SEC, "{addr} never served the tunnel");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_tcp_tunnel_is_served_through_a_node_without_its_agent() {
    let (port, svc, a, b) = two_nodes();
    let at_b = b_side(port);

    // Before any view, B has no listener on the port.
    assert!(TcpStream::connect(at_b).is_err());

    let agent = tcp_agent(&a, &format!("{}={port}", svc.addr));
    wait_stdout(&agent, &format!("TCP tunnel: tcp://127.0.0.1:{port} ->"));
    give_view(&a, &b, &["node-a"], &[port], 1);
    wait_served(at_b);
    // The links are up (the probe crossed one): their sockets are the
    // baseline of A's peer port.
    wait_back(
        &a,
        &b,
        &svc,
        port,
        held_sockets(a.peer_addr().unwrap().port()),
        "probe",
    );
    let peer_base = held_sockets(a.peer_addr().unwrap().port());
    assert!(peer_base > 0, "no peer link counted");
    let fwd_before = metric(&b, "ringtunnel_tcp_forwarded_total");

    // 1 MiB both ways, then the client's half-close: the service still
    // answers after it (its trailer), then its own EOF reaches the client.
    let mut s = client(at_b);
    assert_eq!(read_exact(&mut s, GREETING.len()), GREETING);
    let body = pattern(1024 * 1024);
    let mut w = s.try_clone().unwrap();
    let sent = body.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read to the service's EOF");
    writer.join().unwrap();
    assert_eq!(got.len(), body.len() + TRAILER.len());
    assert_eq!(checksum(&got[..body.len()]), checksum(&body));
    assert_eq!(&got[body.len()..], TRAILER);
    drop(s);
    assert_eq!(metric(&b, "ringtunnel_tcp_forwarded_total"), fwd_before + 1);
    wait_back(&a, &b, &svc, port, peer_base, "after a clean exchange");

    // A client that vanishes mid-connection (RST): the service's
    // connection ends, both nodes let go of the streams.
    let mut s = client(at_b);
    assert_eq!(read_exact(&mut s, GREETING.len()), GREETING);
    s.write_all(b"ping").unwrap();
    assert_eq!(read_exact(&mut s, 4), b"ping");
    abort(s);
    wait_back(&a, &b, &svc, port, peer_base, "after a client vanished");

    // B's port limit holds for forwarded connections too: the one over
    // it is closed at once, the others keep working.
    let mut held: Vec<TcpStream> = (0..MAX_CONNS)
        .map(|_| {
            let mut s = client(at_b);
            assert_eq!(read_exact(&mut s, GREETING.len()), GREETING);
            s
        })
        .collect();
    let over_before = metric_sum(
        &metrics(b.admin_addr().unwrap()),
        "ringtunnel_tcp_refused_total",
        "over_limit",
    );
    let mut extra = client(at_b);
    let mut one = [0u8; 1];
    assert!(
        matches!(extra.read(&mut one), Ok(0) | Err(_)),
        "a connection over the limit was served"
    );
    let m = metrics(b.admin_addr().unwrap());
    assert!(
        metric_sum(&m, "ringtunnel_tcp_refused_total", "over_limit") > over_before,
        "{m}"
    );
    for s in &mut held {
        s.write_all(b"x").unwrap();
        assert_eq!(read_exact(s, 1), b"x");
    }
    drop(extra);
    drop(held);
    wait_back(&a, &b, &svc, port, peer_base, "after the limit");

    // A's hold goes (its agent left, in the registry's words): B closes
    // its copy of the port. A's own listener is the claim's business.
    give_view(&a, &b, &[], &[], 2);
    wait_refused(at_b, "B after A's hold went");
    // And back: the view lists it again, B listens again.
    give_view(&a, &b, &["node-a"], &[port], 3);
    wait_served(at_b);
    wait_back(
        &a,
        &b,
        &svc,
        port,
        peer_base,
        "after the listener came back",
    );

    // The agent vanishes mid-connection (SIGKILL): the client's
    // connection through B ends, nothing is left on either node.
    let mut s = client(at_b);
    assert_eq!(read_exact(&mut s, GREETING.len()), GREETING);
    s.write_all(b"ping").unwrap();
    assert_eq!(read_exact(&mut s, 4), b"ping");
    let mut agent = agent;
    agent.proc.kill();
    let mut rest = Vec::new();
    let t = Instant::now();
    let _ = s.read_to_end(&mut rest);
    assert!(t.elapsed() < 10 * SEC, "the client was not let go");
    assert!(rest.is_empty(), "{rest:?}");
    drop(s);
    wait_back(&a, &b, &svc, port, peer_base, "after the agent vanished");
}

#[test]
fn not_here_sends_a_tcp_connection_to_the_next_holder() {
    // C is listed as a holder but has no agent: B's connections that try
    // C first get NOT_HERE and go on to A, and every one is served.
    let port = free_port();
    assert!(TcpListener::bind(("127.0.0.3", port)).is_ok());
    let svc = service();
    let a = node("node-a", "127.0.0.1", port, MAX_CONNS);
    let b = node("node-b", "127.0.0.2", port, MAX_CONNS);
    let c = node("node-c", "127.0.0.3", port, MAX_CONNS);
    let at_b = b_side(port);
    let agent = tcp_agent(&a, &format!("{}={port}", svc.addr));
    wait_stdout(&agent, &format!("TCP tunnel: tcp://127.0.0.1:{port} ->"));
    let mut v = view(&a, &b, &["node-a", "node-c"], &[port], 1);
    v.nodes.insert(
        "node-c".into(),
        NodeInfo {
            name: "node-c".into(),
            peer: c.peer_addr().unwrap(),
            tunnel: c.tunnel_addr(),
            cores: 2,
            state: NodeState::Ready,
        },
    );
    for gw in [&a, &b, &c] {
        gw.set_cluster_view(v.clone());
    }
    wait_served(at_b);
    // Give every core of B its links to A and C (the probe proved one).
    std::thread::sleep(Duration::from_millis(500));
    let retries = sum(&b, |c| &c.forward_retries);
    for i in 0..8u8 {
        let mut s = client(at_b);
        assert_eq!(
            read_exact(&mut s, GREETING.len()),
            GREETING,
            "connection {i}"
        );
        s.write_all(&[i]).unwrap();
        assert_eq!(read_exact(&mut s, 1), [i]);
    }
    assert!(
        sum(&b, |c| &c.forward_retries) > retries,
        "no connection tried C first"
    );
    let peer_base = held_sockets(a.peer_addr().unwrap().port());
    wait_back(&a, &b, &svc, port, peer_base, "after the retries");
    drop(agent);
}

#[test]
fn a_holder_that_is_not_here_makes_b_close_the_connection() {
    // The view says A holds the session, but no agent is connected to A:
    // A answers NOT_HERE, B has no other holder and closes the client's
    // connection at once; nothing is left behind.
    let (port, svc, a, b) = two_nodes();
    let at_b = b_side(port);
    give_view(&a, &b, &["node-a"], &[port], 1);
    // Until the peer links are up B closes for lack of a link; after,
    // for NOT_HERE: wait for the retry counter to prove the second.
    let t = Instant::now();
    loop {
        if let Ok(mut s) = TcpStream::connect_timeout(&at_b, SEC) {
            s.set_read_timeout(Some(5 * SEC)).unwrap();
            let mut one = [0u8; 1];
            assert!(
                matches!(s.read(&mut one), Ok(0) | Err(_)),
                "served without an agent"
            );
        }
        if sum(&b, |c| &c.forward_retries) > 0 {
            break;
        }
        assert!(t.elapsed() < 10 * SEC, "B never asked A");
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = metrics(b.admin_addr().unwrap());
    assert!(
        metric_sum(&m, "ringtunnel_tcp_refused_total", "no_agent") > 0,
        "{m}"
    );
    let peer_base = held_sockets(a.peer_addr().unwrap().port());
    wait_back(&a, &b, &svc, port, peer_base, "after NOT_HERE");
}

#[test]
fn in_a_cluster_a_tcp_tunnel_needs_an_explicit_port_and_a_node_reuses_the_remote_one() {
    let (port, svc, a, b) = two_nodes();

    // A port the gateway would pick could differ per node: refused.
    let mut auto = tcp_agent(&a, &svc.addr.to_string());
    stops_saying(&mut auto, "explicit public port");

    // A holds the port for "demo"; B opened its copy for A's hold. The
    // same agent's uplink to B then gets that port on B (the listener B
    // has is taken over, not bound twice) and B serves it itself.
    let on_a = tcp_agent(&a, &format!("{}={port}", svc.addr));
    wait_stdout(&on_a, &format!("TCP tunnel: tcp://127.0.0.1:{port} ->"));
    give_view(&a, &b, &["node-a"], &[port], 1);
    let at_b = b_side(port);
    wait_served(at_b);
    // Another session asking B for that port is refused: A's session
    // has it on the other node.
    let tunnel = b.tunnel_addr().to_string();
    let spec = format!("{}={port}", svc.addr);
    let mut other = spawn_nowait(
        "agent",
        &[
            "agent",
            "--gateway",
            &tunnel,
            "--session",
            "other",
            "--no-pin",
            "--cores",
            "1",
            "--nodes",
            "1",
            "--tcp",
            &spec,
        ],
    );
    stops_saying(&mut other, "another session on another node");
    let on_b = tcp_agent(&b, &format!("{}={port}", svc.addr));
    wait_stdout(&on_b, &format!("TCP tunnel: tcp://127.0.0.2:{port} ->"));
    std::thread::sleep(Duration::from_millis(200));
    let fwd = metric(&b, "ringtunnel_tcp_forwarded_total");
    let mut s = client(at_b);
    assert_eq!(read_exact(&mut s, GREETING.len()), GREETING);
    s.write_all(b"local").unwrap();
    assert_eq!(read_exact(&mut s, 5), b"local");
    drop(s);
    assert_eq!(
        metric(&b, "ringtunnel_tcp_forwarded_total"),
        fwd,
        "served over a peer link although B has an uplink"
    );

    drop(on_b);
    drop(on_a);
}
