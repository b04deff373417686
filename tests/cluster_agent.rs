//! Agents on K cluster nodes (issue 11, part 3), over real sockets:
//! in-process gateways started with a cluster configuration and handed a
//! view with `Gateway::set_cluster_view` (as the etcd registry does),
//! real agent processes, real HTTP clients.
//!
//! Every node's tunnel port is reached through a small TCP relay owned by
//! the test (`Relay`): the view advertises the relay, so "killing a node"
//! for its agents is closing the relay's connections and its listener at
//! once, which is what an agent sees when a node dies (its uplinks drop,
//! new connections are refused).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use ringtunnel::cluster::{rendezvous, ClusterConfig, ClusterView, NodeInfo, NodeState};
use ringtunnel::config::{Cores, GatewayConfig};
use ringtunnel::gateway::Gateway;
use ringtunnel::proto::{
    Accept, Decoder, ErrorCode, Frame, FrameType, Hello, CAP_CLUSTER, CAP_PUBLIC_URL,
    PROTOCOL_VERSION,
};
use ringtunnel::runtime::DriverKind;

/// A TCP relay in front of a node's tunnel port; `kill` drops every
/// connection through it and stops listening.
struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(upstream: SocketAddr) -> Relay {
        Relay::start_on("127.0.0.1:0".parse().unwrap(), upstream)
    }

    /// On `at` (a killed relay's address: the node comes back where the
    /// view says it is).
    fn start_on(at: SocketAddr, upstream: SocketAddr) -> Relay {
        let l = TcpListener::bind(at).unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (s, c) = (stop.clone(), conns.clone());
        let accept = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let (down, _) = match l.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                down.set_nonblocking(false).unwrap();
                let Ok(up) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = up.set_nodelay(true);
                let _ = down.set_nodelay(true);
                {
                    let mut v = c.lock().unwrap();
                    v.push(down.try_clone().unwrap());
                    v.push(up.try_clone().unwrap());
                }
                for (mut a, mut b) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(Shutdown::Write);
                    });
                }
            }
            // The listener closes here: new connections are refused.
        });
        Relay {
            addr,
            stop,
            conns,
            accept: Some(accept),
        }
    }

    /// The node dies, as its agents see it.
    fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            t.join().unwrap();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Node {
    name: String,
    gw: Option<Gateway>,
    relay: Relay,
    public: SocketAddr,
    admin: SocketAddr,
}

impl Node {
    fn start(name: &str) -> Node {
        let gw = ringtunnel::gateway::start(GatewayConfig {
            listen: "127.0.0.1:0".into(),
            tunnel_listen: "127.0.0.1:0".into(),
            admin_listen: Some("127.0.0.1:0".into()),
            cores: Cores::new(Some(2), false, DriverKind::Auto),
            shutdown_grace: Duration::from_secs(10),
            cluster: Some(ClusterConfig {
                // Not contacted: there is no registry on this branch's
                // gateways; the test hands them their view.
                etcd: vec!["http://127.0.0.1:9".into()],
                node: name.into(),
                peer_listen: "127.0.0.1:0".into(),
                advertise: None,
                secret: "0123456789abcdef".into(),
                lease_ttl: ringtunnel::cluster::DEFAULT_LEASE_TTL,
            }),
            ..GatewayConfig::default()
        })
        .expect("gateway starts");
        let relay = Relay::start(gw.tunnel_addr());
        Node {
            name: name.into(),
            public: gw.public_addr(),
            admin: gw.admin_addr().unwrap(),
            gw: Some(gw),
            relay,
        }
    }

    fn gw(&self) -> &Gateway {
        self.gw.as_ref().unwrap()
    }

    /// Uplinks of `session` this node routes to (not draining).
    fn placed(&self, session: &str) -> u32 {
        session_placement(&stats_json(self.admin), session).map_or(0, |v| v.iter().sum())
    }

    /// Open uplinks on this node, draining ones included.
    fn open_uplinks(&self) -> u64 {
        json_numbers(&stats_json(self.admin), "uplinks")
            .iter()
            .sum()
    }
}

/// Established TCP sockets of process `pid` whose remote port is one of
/// `ports` (its uplinks, when `ports` are the nodes' relays): the
/// process's socket inodes matched against /proc/net/tcp.
fn sockets_to(pid: u32, ports: &[u16]) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().to_string();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    tcp.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let remote_port = f
                .get(2)
                .and_then(|r| r.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            f.get(3) == Some(&"01")
                && remote_port.is_some_and(|p| ports.contains(&p))
                && f.get(9).is_some_and(|i| inodes.contains(*i))
        })
        .count()
}

/// A view listing `nodes` (tunnel: their relays) plus `extra` entries.
fn view(nodes: &[&Node], extra: &[(&str, SocketAddr)]) -> ClusterView {
    // Peer links are not what these tests look at: a port nobody serves.
    let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let entries = nodes
        .iter()
        .map(|n| (n.name.clone(), n.relay.addr))
        .chain(extra.iter().map(|(n, a)| (n.to_string(), *a)))
        .map(|(name, tunnel)| (name, peer, tunnel, 2));
    common::cluster::view_of(1, entries, &[], &[])
}

fn give_view(nodes: &[&Node], v: &ClusterView) {
    for n in nodes {
        n.gw().set_cluster_view(v.clone());
    }
    // The cores take it from their mailboxes.
    std::thread::sleep(Duration::from_millis(100));
}

fn cluster_agent(
    bootstrap: SocketAddr,
    session: &str,
    backend: SocketAddr,
    extra: &[&str],
) -> Proc {
    let (gw, to) = (bootstrap.to_string(), backend.to_string());
    let mut args = vec![
        "agent",
        "--gateway",
        &gw,
        "--session",
        session,
        "--to",
        &to,
        "--no-pin",
        "--cores",
        "2",
        "--uplinks",
        "2",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    spawn("agent", &args, "ringtunnel agent ready")
}

/// Polls `cond` every 20 ms for up to `limit`; the time it took.
fn within(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

/// Three nodes, all in every node's view.
fn three() -> Vec<Node> {
    let nodes: Vec<Node> = ["gw-a", "gw-b", "gw-c"]
        .iter()
        .map(|n| Node::start(n))
        .collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    give_view(&refs, &view(&refs, &[]));
    nodes
}

fn by_name<'a>(nodes: &'a [Node], name: &str) -> &'a Node {
    nodes.iter().find(|n| n.name == name).unwrap()
}

/// The three nodes' names as session "demo" ranks them (best first).
fn demo_rank() -> Vec<String> {
    rendezvous::rank("demo", ["gw-a", "gw-b", "gw-c"])
        .into_iter()
        .map(String::from)
        .collect()
}

/// An agent of "demo" bootstrapped through `rank[via]`, once it holds its
/// uplinks on the top 2 nodes (10 s at most).
fn agent_on_top_two(nodes: &[Node], rank: &[String], via: usize, backend: SocketAddr) -> Proc {
    let agent = cluster_agent(by_name(nodes, &rank[via]).relay.addr, "demo", backend, &[]);
    within(Duration::from_secs(10), "on the top 2", || {
        on_top_two(nodes, rank)
    });
    agent
}

/// Uplink sockets exactly as many as before (4, to `relays`); the fds
/// other than backend connections (a pool that may have grown under load)
/// within the harness's tolerance of `fds`.
fn agent_back_at_baseline(agent: &Proc, relays: &[u16], backend: SocketAddr, fds: usize) {
    within(
        Duration::from_secs(3),
        "agent back at 4 uplink sockets",
        || sockets_to(agent.pid(), relays) == 4,
    );
    within(
        Duration::from_secs(3),
        "agent fds back at their baseline",
        || agent.fd_count() - sockets_to(agent.pid(), &[backend.port()]) <= fds + 2,
    );
}

/// Whether "demo" holds its 2 uplinks on each of the top 2 nodes.
fn on_top_two(nodes: &[Node], rank: &[String]) -> bool {
    by_name(nodes, &rank[0]).placed("demo") == 2 && by_name(nodes, &rank[1]).placed("demo") == 2
}

/// The agent holds its uplinks on exactly the rendezvous top 2, says so
/// on /health and /stats, and the session is served through both.
#[test]
fn agent_holds_uplinks_on_exactly_the_rendezvous_top_k() {
    let echo = echo("auto", 0);
    let nodes = three();
    let rank = rendezvous::rank("demo", ["gw-a", "gw-b", "gw-c"]);
    // Bootstrap through the node that ranks last: the agent must move
    // its first uplink off it.
    let agent = cluster_agent(
        by_name(&nodes, rank[2]).relay.addr,
        "demo",
        echo.addr("listen"),
        &["--nodes", "2"],
    );
    assert_eq!(agent.field("uplinks"), "4", "2 nodes x 2 uplinks");
    within(Duration::from_secs(10), "uplinks on the top 2 only", || {
        by_name(&nodes, rank[0]).placed("demo") == 2
            && by_name(&nodes, rank[1]).placed("demo") == 2
            && by_name(&nodes, rank[2]).open_uplinks() == 0
    });
    let health = request(
        agent.addr("admin"),
        "GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(health.status, 200);
    let mut on = [rank[0], rank[1]];
    on.sort();
    assert_eq!(health.text(), format!("ready\nnodes {} {}\n", on[0], on[1]));
    let stats = stats_json(agent.addr("admin"));
    assert!(
        stats.contains(&format!(
            "\"on\":[{{\"node\":\"{}\",\"uplinks\":2}},{{\"node\":\"{}\",\"uplinks\":2}}]",
            on[0], on[1]
        )),
        "{stats}"
    );
    assert!(
        stats.contains("\"nodes_wanted\":2,\"uplinks_per_node\":2"),
        "{stats}"
    );
    for n in [rank[0], rank[1]] {
        wait_routable(by_name(&nodes, n).public, "demo");
    }
}

/// One of its nodes dies: the agent moves that slot to the third node
/// (bounded time), the other slot does not move, and the session is
/// served by the new holder.
#[test]
fn a_dead_node_is_replaced_by_the_next_ranked_one_and_gets_its_slot_back() {
    let echo = echo("auto", 0);
    let mut nodes = three();
    let rank = demo_rank();
    let agent = agent_on_top_two(&nodes, &rank, 1, echo.addr("listen"));
    let dead = nodes.iter().position(|n| n.name == rank[0]).unwrap();
    let backend = echo.addr("listen");
    let agent_fds = agent.fd_count() - sockets_to(agent.pid(), &[backend.port()]);
    let relays: Vec<u16> = nodes.iter().map(|n| n.relay.addr.port()).collect();
    nodes[dead].relay.kill();
    let took = within(
        Duration::from_secs(5),
        "slot moved to the third node",
        || by_name(&nodes, &rank[2]).placed("demo") == 2,
    );
    eprintln!("slot moved to {} in {took:?}", rank[2]);
    assert_eq!(
        by_name(&nodes, &rank[1]).placed("demo"),
        2,
        "the other slot stays"
    );
    wait_routable(by_name(&nodes, &rank[2]).public, "demo");
    let health = request(
        agent.addr("admin"),
        "GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let mut on = [rank[1].as_str(), rank[2].as_str()];
    on.sort();
    assert_eq!(health.text(), format!("ready\nnodes {} {}\n", on[0], on[1]));
    let stats = stats_json(agent.addr("admin"));
    assert!(
        stats.contains(&format!("\"excluded\":[{{\"node\":\"{}\"", rank[0])),
        "{stats}"
    );
    // The dead node's gateway saw its uplinks go too, and the agent holds
    // no more sockets than before.
    within(Duration::from_secs(5), "dead node's uplinks closed", || {
        nodes[dead].open_uplinks() == 0
    });
    agent_back_at_baseline(&agent, &relays, backend, agent_fds);

    // The node comes back: once its exclusion (1 s) has run out it ranks
    // first again and gets its slot back, the replacement accepted there
    // before the third node's uplinks close.
    let upstream = nodes[dead].gw().tunnel_addr();
    let at = nodes[dead].relay.addr;
    nodes[dead].relay = Relay::start_on(at, upstream);
    let took = within(
        Duration::from_secs(5),
        "slot back on the revived node",
        || nodes[dead].placed("demo") == 2,
    );
    eprintln!("slot back on {} in {took:?}", rank[0]);
    within(
        Duration::from_secs(3),
        "third node's uplinks closed",
        || by_name(&nodes, &rank[2]).open_uplinks() == 0,
    );
    assert_eq!(
        by_name(&nodes, &rank[1]).placed("demo"),
        2,
        "the other slot stays"
    );
    wait_routable(nodes[dead].public, "demo");
}

/// Drain one holder under load: the agent's replacement on the third node
/// is accepted before the drained node's uplinks close (sampled all
/// along), requests in flight on the draining node finish (with
/// `Connection: close`), and the holder that stays fails nothing.
#[test]
fn draining_a_node_rehomes_its_uplinks_without_losing_a_request() {
    let echo = echo("auto", 0);
    let mut nodes = three();
    let rank = demo_rank();
    let agent = agent_on_top_two(&nodes, &rank, 0, echo.addr("listen"));
    let (draining, stays, third) = (
        by_name(&nodes, &rank[0]),
        by_name(&nodes, &rank[1]),
        by_name(&nodes, &rank[2]),
    );
    wait_routable(stays.public, "demo");
    wait_routable(draining.public, "demo");

    // Load on the holder that stays, for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed, public) =
                (stop.clone(), ok.clone(), failed.clone(), stays.public);
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let r = request(
                        public,
                        "GET /delay/20 HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n",
                    );
                    if r.status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    // Requests in flight on the draining node when the drain starts
    // (keep-alive requests: the answer must close the connection).
    let launched = Instant::now();
    let inflight: Vec<_> = (0..8)
        .map(|_| {
            let public = draining.public;
            std::thread::spawn(move || {
                request(public, "GET /delay/1500 HTTP/1.1\r\nHost: demo\r\n\r\n")
            })
        })
        .collect();
    // Sampler: the drained node's open uplinks (read first) plus the
    // third node's never fall below 2; an old uplink closing before its
    // replacement was accepted would show as a dip.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (go, d, t) = (sampling.clone(), draining.admin, third.admin);
        std::thread::spawn(move || {
            let mut min = u64::MAX;
            let mut samples = 0;
            while go.load(Ordering::SeqCst) {
                let a: u64 = json_numbers(&stats_json(d), "uplinks").iter().sum();
                let b: u64 = json_numbers(&stats_json(t), "uplinks").iter().sum();
                min = min.min(a + b);
                samples += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            (min, samples)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    // With every request of the test in flight (the backend pool at its
    // largest): 4 uplinks plus backend connections.
    let backend = echo.addr("listen");
    let agent_fds = agent.fd_count() - sockets_to(agent.pid(), &[backend.port()]);
    let relays: Vec<u16> = nodes.iter().map(|n| n.relay.addr.port()).collect();
    // 1.5 s requests: still in flight when the drain starts.
    let drain_at = launched.elapsed();
    assert!(
        drain_at < Duration::from_millis(1200),
        "drain at {drain_at:?}"
    );
    draining.gw().begin_shutdown();
    // The replacement: the third node holds the slot.
    let moved = within(
        Duration::from_secs(5),
        "replacement on the third node",
        || third.placed("demo") == 2,
    );
    // The drained node's uplinks are closed by the agent once its streams
    // are done (1.5 s requests, then the agent's 250 ms settle).
    within(
        Duration::from_secs(8),
        "drained node's uplinks closed",
        || draining.open_uplinks() == 0,
    );
    let closed = launched.elapsed() - drain_at;
    eprintln!(
        "drain: replacement accepted {moved:?} after the drain began, old uplinks closed after {closed:?}"
    );
    assert!(
        launched.elapsed() >= Duration::from_millis(1500),
        "old uplinks closed before their requests could finish"
    );
    for h in inflight {
        let r = h.join().unwrap();
        assert_eq!(
            r.status,
            200,
            "in flight on the draining node: {}",
            r.text()
        );
        assert_eq!(r.text(), "delayed\n");
        assert_eq!(r.header("connection"), Some("close"), "{:?}", r.headers);
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for h in load {
        h.join().unwrap();
    }
    sampling.store(false, Ordering::SeqCst);
    let (min, samples) = sampler.join().unwrap();
    assert!(samples > 10, "{samples} samples");
    assert!(
        min >= 2,
        "an uplink closed before its replacement was accepted (min {min})"
    );
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "failed on the holder that stays"
    );
    assert!(ok.load(Ordering::SeqCst) > 20, "load ran: {ok:?}");
    assert_eq!(stays.placed("demo"), 2);
    let third_public = third.public;
    within(
        Duration::from_secs(2),
        "no stream left on the holder that stays",
        || metric_sum(&metrics(stays.admin), "ringtunnel_active_streams", "core=") == 0,
    );
    agent_back_at_baseline(&agent, &relays, backend, agent_fds);
    // The drained node's workers end once its uplinks are gone.
    let d = nodes.iter().position(|n| n.name == rank[0]).unwrap();
    let gw = nodes[d].gw.take().unwrap();
    let t = Instant::now();
    gw.join();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "drained node took {:?} to stop",
        t.elapsed()
    );
    let health = request(
        agent.addr("admin"),
        "GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let mut on = [rank[1].as_str(), rank[2].as_str()];
    on.sort();
    assert_eq!(health.text(), format!("ready\nnodes {} {}\n", on[0], on[1]));
    wait_routable(third_public, "demo");
}

/// A node list naming an address where nothing listens: that node is
/// excluded and the others are used.
#[test]
fn an_unreachable_node_in_the_list_is_excluded_and_the_others_used() {
    let echo = echo("auto", 0);
    let nodes: Vec<Node> = ["gw-b", "gw-c"].iter().map(|n| Node::start(n)).collect();
    // A port nothing listens on.
    let ghost_addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let names = ["ghost", "gw-b", "gw-c"];
    // A session for which the ghost ranks first.
    let session = (0..100)
        .map(|i| format!("s{i}"))
        .find(|s| rendezvous::rank(s, names)[0] == "ghost")
        .unwrap();
    let refs: Vec<&Node> = nodes.iter().collect();
    give_view(&refs, &view(&refs, &[("ghost", ghost_addr)]));
    let agent = cluster_agent(nodes[0].relay.addr, &session, echo.addr("listen"), &[]);
    within(Duration::from_secs(10), "on the two real nodes", || {
        nodes[0].placed(&session) == 2 && nodes[1].placed(&session) == 2
    });
    within(Duration::from_secs(3), "ghost listed as excluded", || {
        stats_json(agent.addr("admin")).contains("\"excluded\":[{\"node\":\"ghost\"")
    });
    // Each node lists itself first in its ACCEPT (the last ACCEPT wins).
    let stats = stats_json(agent.addr("admin"));
    assert!(
        stats.contains("\"known\":[{\"node\":\"gw-b\"")
            || stats.contains("\"known\":[{\"node\":\"gw-c\""),
        "{stats}"
    );
    // Its exclusion runs out and the agent tries the ghost again (it
    // ranks first), 1 s then 2 s later: a failed connect each time, never
    // a working uplink lost.
    // (Once the bootstrap uplinks that moved have closed.)
    within(Duration::from_secs(3), "4 uplinks open", || {
        nodes[0].open_uplinks() + nodes[1].open_uplinks() == 4
    });
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(3500) {
        let (a, b) = (nodes[0].open_uplinks(), nodes[1].open_uplinks());
        assert_eq!(a + b, 4, "{a} + {b} at {:?}", t.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        (nodes[0].placed(&session), nodes[1].placed(&session)),
        (2, 2)
    );
}

/// An agent of this version against a gateway outside any cluster: no
/// node list, the same uplinks as before, nothing about nodes on /health
/// or /stats.
#[test]
fn a_single_gateway_agent_is_unchanged() {
    let echo = echo("auto", 0);
    let gw = gateway("auto", &[]);
    let agent = agent(
        "auto",
        &gw,
        "demo",
        echo.addr("listen"),
        &["--nodes", "2", "--admin-listen", "127.0.0.1:0"],
    );
    assert_eq!(agent.field("uplinks"), "2", "the gateway's core count");
    wait_routable(gw.addr("public"), "demo");
    assert_eq!(
        session_placement(&stats_json(gw.addr("admin")), "demo"),
        Some(vec![1, 1])
    );
    let health = request(
        agent.addr("admin"),
        "GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(health.text(), "ready\n");
    assert!(!stats_json(agent.addr("admin")).contains("\"cluster\""));
}

/// A fake agent over a std socket: sends `hello`, returns the socket,
/// the ACCEPT and the bytes read past it.
fn fake_agent(tunnel: SocketAddr, capabilities: u32) -> (TcpStream, Accept, BytesMut) {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        capabilities,
        agent_id: 7 + u64::from(capabilities),
        uplink_index: 0,
        uplinks_total: 1,
        token: String::new(),
        session: format!("raw{capabilities}"),
        tcp: Vec::new(),
    };
    let mut s = TcpStream::connect(tunnel).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = BytesMut::new();
    ringtunnel::proto::encode(&Frame::hello(&hello), &mut b);
    s.write_all(&b).unwrap();
    let mut buf = BytesMut::new();
    let f = next_frame(&mut s, &mut buf).expect("ACCEPT");
    assert_eq!(f.kind, FrameType::Accept);
    (s, f.parse_accept().unwrap(), buf)
}

/// The next frame other than PING/PONG, `None` at EOF.
fn next_frame(s: &mut TcpStream, buf: &mut BytesMut) -> Option<Frame> {
    let mut dec = Decoder::new(ringtunnel::proto::DEFAULT_MAX_FRAME);
    loop {
        while let Ok(Some(f)) = dec.decode(buf) {
            if !matches!(f.kind, FrameType::Ping | FrameType::Pong) {
                return Some(f);
            }
        }
        let mut tmp = [0u8; 4096];
        let n = s.read(&mut tmp).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// What a clustered gateway says, byte for byte on a raw socket: the node
/// list only to an agent that asked (CAP_CLUSTER), this node first with
/// its advertised address, the other ready nodes by name, draining ones
/// left out; on drain REHOME to that agent and SHUTDOWN to one that
/// cannot move, which keeps the uplink until the gateway closes it.
#[test]
fn a_clustered_gateway_lists_nodes_and_says_rehome_only_to_agents_that_can_move() {
    let me = Node::start("gw-m");
    let mut v = view(&[&me], &[("gw-z", "10.0.0.9:7000".parse().unwrap())]);
    v.nodes.insert(
        "gw-d".into(),
        NodeInfo {
            name: "gw-d".into(),
            peer: "127.0.0.1:9".parse().unwrap(),
            tunnel: "10.0.0.8:7000".parse().unwrap(),
            cores: 2,
            state: NodeState::Draining,
        },
    );
    v.nodes.insert(
        "gw-a".into(),
        NodeInfo {
            name: "gw-a".into(),
            peer: "127.0.0.1:9".parse().unwrap(),
            tunnel: "10.0.0.7:7000".parse().unwrap(),
            cores: 2,
            state: NodeState::Ready,
        },
    );
    give_view(&[&me], &v);
    let tunnel = me.gw().tunnel_addr();
    let (mut mover, acc, mut mbuf) = fake_agent(tunnel, CAP_CLUSTER);
    assert_eq!(acc.capabilities & CAP_CLUSTER, CAP_CLUSTER);
    let listed: Vec<(String, String)> = acc
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.tunnel.clone()))
        .collect();
    assert_eq!(
        listed,
        [
            ("gw-m".to_string(), me.relay.addr.to_string()),
            ("gw-a".to_string(), "10.0.0.7:7000".to_string()),
            ("gw-z".to_string(), "10.0.0.9:7000".to_string()),
        ]
    );
    let (mut stayer, acc, mut sbuf) = fake_agent(tunnel, 0);
    assert_eq!(acc.capabilities & CAP_CLUSTER, 0);
    assert!(acc.nodes.is_empty());

    // Without a view entry for itself, the node lists its own advertised
    // address (the --peer-listen host and the tunnel port).
    give_view(&[&me], &ClusterView::default());
    let (_s, acc, _) = fake_agent(tunnel, CAP_CLUSTER | CAP_PUBLIC_URL);
    assert_eq!(acc.nodes.len(), 1);
    assert_eq!(acc.nodes[0].name, "gw-m");
    assert_eq!(acc.nodes[0].tunnel, tunnel.to_string());
    drop(_s);

    let t = Instant::now();
    me.gw().begin_shutdown();
    let g = next_frame(&mut mover, &mut mbuf).expect("GOAWAY");
    assert_eq!(g.kind, FrameType::GoAway);
    assert_eq!(g.parse_goaway().unwrap().0, ErrorCode::Rehome);
    let g = next_frame(&mut stayer, &mut sbuf).expect("GOAWAY");
    assert_eq!(g.parse_goaway().unwrap().0, ErrorCode::Shutdown);
    // The REHOME'd uplink is the agent's to close: the node waits for it
    // (here until the fake agent hangs up), the idle SHUTDOWN one is not
    // waited for.
    std::thread::sleep(Duration::from_millis(500));
    assert!(me.open_uplinks() >= 1, "closed before its agent moved");
    drop(mover);
    assert!(
        next_frame(&mut stayer, &mut sbuf).is_none(),
        "closed by the gateway"
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "{took:?}"
    );
    within(Duration::from_secs(2), "no uplink left", || {
        me.open_uplinks() == 0
    });
}

/// A node that accepts connections and never answers the handshake (a
/// stalled or wedged process): the agent gives up on it after its
/// handshake timeout, excludes it, uses the others, and keeps no socket
/// to it.
#[test]
fn a_node_that_never_answers_the_handshake_is_excluded() {
    let echo = echo("auto", 0);
    let nodes: Vec<Node> = ["gw-b", "gw-c"].iter().map(|n| Node::start(n)).collect();
    // Accepts, holds every connection, reads nothing.
    let mute = TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_addr = mute.local_addr().unwrap();
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    {
        let held = held.clone();
        std::thread::spawn(move || {
            for c in mute.incoming().flatten() {
                held.lock().unwrap().push(c);
            }
        });
    }
    let names = ["mute", "gw-b", "gw-c"];
    let session = (0..100)
        .map(|i| format!("s{i}"))
        .find(|s| rendezvous::rank(s, names)[0] == "mute")
        .unwrap();
    let refs: Vec<&Node> = nodes.iter().collect();
    give_view(&refs, &view(&refs, &[("mute", mute_addr)]));
    let t = Instant::now();
    let agent = cluster_agent(
        nodes[0].relay.addr,
        &session,
        echo.addr("listen"),
        &["--handshake-timeout", "1"],
    );
    within(Duration::from_secs(10), "on the two real nodes", || {
        nodes[0].placed(&session) == 2 && nodes[1].placed(&session) == 2
    });
    eprintln!("placed around the mute node in {:?}", t.elapsed());
    assert!(
        !held.lock().unwrap().is_empty(),
        "the agent tried the mute node"
    );
    within(Duration::from_secs(3), "mute node excluded", || {
        let s = stats_json(agent.addr("admin"));
        s.contains("\"excluded\":[{\"node\":\"mute\"") && s.contains("no handshake answer")
    });
    // The agent closed its side of every attempt.
    within(
        Duration::from_secs(3),
        "no socket left to the mute node",
        || sockets_to(agent.pid(), &[mute_addr.port()]) == 0,
    );
}

/// A lying gateway: its ACCEPT carries a node list with a name that is no
/// node name. The agent's codec refuses the ACCEPT (a connection error),
/// the agent says why, retries with backoff, never counts that uplink as
/// connected, and neither crashes nor follows the list.
#[test]
fn an_accept_with_a_garbage_node_list_is_refused() {
    let liar = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = liar.local_addr().unwrap();
    let attempts = Arc::new(AtomicU64::new(0));
    {
        let attempts = attempts.clone();
        std::thread::spawn(move || {
            let acc = Accept {
                version: PROTOCOL_VERSION,
                gateway_cores: 2,
                core: 0,
                max_frame: 256 * 1024,
                stream_window: 256 * 1024,
                conn_window: 1024 * 1024,
                max_streams: 100,
                capabilities: CAP_CLUSTER,
                tcp: Vec::new(),
                public: None,
                nodes: vec![ringtunnel::proto::AcceptNode {
                    name: "gw-a".into(),
                    tunnel: "127.0.0.1:1".into(),
                }],
            };
            let mut payload = BytesMut::new();
            acc.encode(&mut payload);
            // The name's first byte (after count and name length): "Gw-a".
            let name_at = payload.len() - (4 + 1 + 11);
            assert_eq!(&payload[name_at..name_at + 4], b"gw-a");
            payload[name_at] = b'G';
            let mut wire = BytesMut::new();
            ringtunnel::proto::encode(
                &Frame::new(FrameType::Accept, 0, payload.freeze()),
                &mut wire,
            );
            for mut c in liar.incoming().flatten() {
                attempts.fetch_add(1, Ordering::SeqCst);
                let mut b = [0u8; 4096];
                let _ = c.read(&mut b);
                let _ = c.write_all(&wire);
                // Left open: the agent must be the one to close.
                std::thread::spawn(move || {
                    let _ = c.read(&mut b);
                });
            }
        });
    }
    let echo = echo("auto", 0);
    let (gw, to) = (addr.to_string(), echo.addr("listen").to_string());
    let mut agent = spawn_nowait(
        "agent",
        &[
            "agent",
            "--gateway",
            &gw,
            "--session",
            "demo",
            "--to",
            &to,
            "--no-pin",
            "--cores",
            "1",
            "--uplinks",
            "1",
        ],
    );
    assert!(
        agent.wait_stderr("ACCEPT node with a bad name", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    within(Duration::from_secs(5), "the agent retried", || {
        attempts.load(Ordering::SeqCst) >= 3
    });
    assert_eq!(
        agent.wait_exit(Duration::from_millis(200)),
        None,
        "still running"
    );
    assert!(!agent.stdout().contains("ready"), "{}", agent.stdout());
    assert!(!agent.stderr().contains("panicked"), "{}", agent.stderr());
}

/// An agent that connected while its node knew only itself (the cluster
/// still forming) learns the other nodes: uplink 0 re-dials every 10 s
/// while fewer nodes are known than `--nodes`, and the new ACCEPT's list
/// gives it its second node.
#[test]
fn an_agent_that_saw_one_node_learns_the_others() {
    let echo = echo("auto", 0);
    let nodes: Vec<Node> = ["gw-a", "gw-b", "gw-c"]
        .iter()
        .map(|n| Node::start(n))
        .collect();
    let rank = demo_rank();
    // No view yet: each node lists only itself.
    let first = by_name(&nodes, &rank[0]);
    let agent = cluster_agent(first.relay.addr, "demo", echo.addr("listen"), &[]);
    assert_eq!(agent.field("uplinks"), "2", "one node known: K = 1");
    let refs: Vec<&Node> = nodes.iter().collect();
    give_view(&refs, &view(&refs, &[]));
    let took = within(Duration::from_secs(15), "on the top 2", || {
        on_top_two(&nodes, &rank)
    });
    eprintln!("second node after {took:?}");
    let stats = stats_json(agent.addr("admin"));
    assert!(stats.contains("\"slots\":[\""), "{stats}");
    assert_eq!(by_name(&nodes, &rank[2]).open_uplinks(), 0);
}
