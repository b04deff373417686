//! The cluster registry over real processes: a real etcd (3.4+, on free
//! loopback ports with a temporary data directory, killed by PID on drop)
//! and gateways started with `--cluster-etcd`. etcd is required: without
//! it these tests fail, they do not skip.
//!
//! Every wait is bounded; lease TTL 2 s unless a test says otherwise.
//! Agents run with `--nodes 1`: these tests follow one node's keys; the
//! placement over K nodes is tests/cluster_agent.rs's.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ringtunnel::cluster::etcd::{Client, Timeouts};

const SECRET: &str = "0123456789abcdef-cluster";
const TTL: u64 = 2;
const D: &str = "uring";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One etcd member on loopback.
struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    name: String,
    client: u16,
    peer: u16,
    /// `--initial-cluster` (this member alone, or every member's).
    initial: String,
}

impl Etcd {
    fn new(name: &str) -> Etcd {
        let dir =
            std::env::temp_dir().join(format!("rt-etcd-{}-{}", std::process::id(), free_port()));
        let peer = free_port();
        Etcd {
            child: None,
            dir,
            name: name.to_string(),
            client: free_port(),
            peer,
            initial: format!("{name}=http://127.0.0.1:{peer}"),
        }
    }

    /// A one-member cluster, answering.
    fn start() -> Etcd {
        let mut e = Etcd::new("t");
        e.run();
        e
    }

    /// A cluster of `n` members, answering.
    fn cluster(n: usize) -> Vec<Etcd> {
        let mut m: Vec<Etcd> = (0..n).map(|i| Etcd::new(&format!("m{i}"))).collect();
        let initial: Vec<String> = m.iter().map(|e| e.initial.clone()).collect();
        for e in &mut m {
            e.initial = initial.join(",");
            e.spawn();
        }
        for e in &m {
            e.wait_ready();
        }
        m
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("etcd running").id() as i32
    }

    /// Starts (again) on the same ports and data directory, and waits
    /// until it answers.
    fn run(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new("etcd")
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen-client-urls", &self.url()])
            .args(["--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "etcd must be installed for the cluster tests (apt-get install etcd-server; \
                 .ci/run installs it)",
            );
        self.child = Some(child);
    }

    /// Waits until the member answers a (linearizable) read: it has a
    /// leader.
    fn wait_ready(&self) {
        let t = Instant::now();
        loop {
            if self.client().range_prefix("/").is_ok() {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "etcd did not answer on {} within 15 s",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn client(&self) -> Client {
        Client::new(&[self.url()], Timeouts::default()).unwrap()
    }

    fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A stopped process must be continued to die promptly.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGCONT);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every key under /ringtunnel/ with its value, as text.
    fn keys(&self) -> Vec<(String, String)> {
        let page = self
            .client()
            .range_prefix("/ringtunnel/")
            .expect("range etcd");
        page.kvs
            .into_iter()
            .map(|kv| {
                (
                    String::from_utf8(kv.key).unwrap(),
                    String::from_utf8(kv.value).unwrap(),
                )
            })
            .collect()
    }

    fn has_key(&self, key: &str) -> bool {
        self.keys().iter().any(|(k, _)| k == key)
    }

    /// Waits up to `limit` until `key` is present (`want`) or absent.
    fn wait_key(&self, key: &str, want: bool, limit: Duration) -> Duration {
        let t = Instant::now();
        while self.has_key(key) != want {
            assert!(
                t.elapsed() < limit,
                "{key} still {} after {limit:?}; keys: {:?}",
                if want { "absent" } else { "present" },
                self.keys()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        t.elapsed()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A gateway node of the cluster at `etcd`.
/// The flags that make a gateway node `name` of the cluster at `urls`
/// (comma-separated), with its peer listener at `peer`, then `extra`; the
/// test's short lease unless `extra` sets one.
fn node_flags(urls: &str, name: &str, peer: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--cluster-etcd",
        urls,
        "--node-name",
        name,
        "--peer-listen",
        peer,
        "--cluster-secret",
        SECRET,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    if !extra.contains(&"--cluster-lease-ttl") {
        args.extend(["--cluster-lease-ttl".to_string(), TTL.to_string()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Node `name` of the cluster at `urls`, a peer listener on a free port.
fn node_at(urls: &str, name: &str, extra: &[&str]) -> Proc {
    let peer = format!("127.0.0.1:{}", free_port());
    let args = node_flags(urls, name, &peer, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    gateway(D, &args)
}

fn node(etcd: &Etcd, name: &str, extra: &[&str]) -> Proc {
    node_at(&etcd.url(), name, extra)
}

fn cluster_json(admin: SocketAddr) -> serde_json::Value {
    let s = stats_json(admin);
    let v: serde_json::Value =
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("/stats is not JSON ({e}): {s}"));
    v["cluster"].clone()
}

fn metric(admin: SocketAddr, name: &str) -> f64 {
    let m = metrics(admin);
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Waits up to `limit` for `f` to hold, saying `what` if it never does.
fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

/// The node names the view at `admin` shows holding `session`.
fn holders(admin: SocketAddr, session: &str) -> Vec<String> {
    cluster_json(admin)["sessions"][session]
        .as_array()
        .map(|a| a.iter().map(|n| n.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn node_names(admin: SocketAddr) -> Vec<String> {
    cluster_json(admin)["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| n["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn get(public: SocketAddr, host: &str) -> u16 {
    curl(public, host, "/", &["-m", "5"]).0
}

#[test]
fn keys_carry_their_json_and_every_node_sees_every_session() {
    let etcd = Etcd::start();
    let a = node(&etcd, "a", &[]);
    let b = node(&etcd, "b", &[]);
    let echo = echo(D, 0);
    let _agent = agent(D, &a, "demo", echo.addr("listen"), &["--nodes", "1"]);
    wait_routable(a.addr("public"), "demo");

    etcd.wait_key(
        "/ringtunnel/v1/sessions/demo/a",
        true,
        Duration::from_secs(3),
    );
    etcd.wait_key("/ringtunnel/v1/nodes/b", true, Duration::from_secs(3));
    let keys = etcd.keys();
    let value = |k: &str| -> serde_json::Value {
        let v = &keys.iter().find(|(key, _)| key == k).unwrap().1;
        serde_json::from_str(v).unwrap_or_else(|e| panic!("{k}: {v:?} is not JSON: {e}"))
    };
    let na = value("/ringtunnel/v1/nodes/a");
    assert_eq!(na["state"], "ready", "{na}");
    assert_eq!(na["cores"], 2, "{na}");
    assert_eq!(na["tunnel"], a.field("tunnel"), "{na}");
    let peer: SocketAddr = na["peer"].as_str().unwrap().parse().unwrap();
    assert_eq!(peer.ip().to_string(), "127.0.0.1");
    let hold = value("/ringtunnel/v1/sessions/demo/a");
    assert!(hold["agent_id"].as_u64().is_some(), "{hold}");
    assert_eq!(hold.as_object().unwrap().len(), 1, "only agent_id: {hold}");
    // No other keys: B holds no session.
    assert_eq!(keys.len(), 3, "{keys:?}");

    // B's view, pushed to its cores, shows A's session and both nodes.
    let badmin = b.addr("admin");
    wait_for(
        "B's view shows demo held by a",
        Duration::from_secs(3),
        || holders(badmin, "demo") == ["a"],
    );
    let c = cluster_json(badmin);
    assert_eq!(c["node"], "b");
    assert_eq!(c["state"], "ready");
    assert_eq!(c["etcd_up"], true);
    assert_eq!(node_names(badmin), ["a", "b"]);
    assert_eq!(metric(badmin, "ringtunnel_cluster_nodes"), 2.0);
    assert_eq!(metric(badmin, "ringtunnel_cluster_sessions"), 1.0);
    assert_eq!(metric(badmin, "ringtunnel_cluster_etcd_up"), 1.0);
    assert_eq!(metric(badmin, "ringtunnel_cluster_etcd_errors_total"), 0.0);
    let rev = metric(badmin, "ringtunnel_cluster_view_revision");
    assert!(rev >= 4.0, "revision {rev}: at least the 3 puts");
}

#[test]
fn a_killed_node_vanishes_within_its_lease() {
    let etcd = Etcd::start();
    let mut a = node(&etcd, "a", &[]);
    let b = node(&etcd, "b", &[]);
    let echo = echo(D, 0);
    let _agent = agent(D, &a, "demo", echo.addr("listen"), &["--nodes", "1"]);
    wait_routable(a.addr("public"), "demo");
    let badmin = b.addr("admin");
    wait_for("B sees a and demo", Duration::from_secs(3), || {
        holders(badmin, "demo") == ["a"]
    });

    a.kill(); // SIGKILL: no revoke, the lease must run out.
    let limit = Duration::from_secs(TTL + 1);
    let gone = etcd.wait_key("/ringtunnel/v1/nodes/a", false, limit);
    assert!(!etcd.has_key("/ringtunnel/v1/sessions/demo/a"));
    // Not at once: the keys outlived the node until its lease expired.
    assert!(
        gone > Duration::from_millis(500),
        "keys went after {gone:?}: too soon for a lease expiry"
    );
    // The agent lost its node and moved its uplinks to the next-ranked
    // one, b, which now holds the session alone.
    wait_for("B's view drops a", Duration::from_secs(1), || {
        node_names(badmin) == ["b"] && holders(badmin, "demo") == ["b"]
    });
    assert_eq!(metric(badmin, "ringtunnel_cluster_sessions"), 1.0);
}

#[test]
fn graceful_stop_revokes_the_lease_at_once() {
    let etcd = Etcd::start();
    // A long lease: keys that go within a second were revoked, not expired.
    let mut a = node(&etcd, "a", &["--cluster-lease-ttl", "30"]);
    let b = node(&etcd, "b", &[]);
    // The agent learns the nodes from A's ACCEPT: A must know B first, or
    // the REHOME at A's drain leaves the agent nowhere to move, and A then
    // waits its whole --shutdown-grace (10 s) for the uplink to go.
    wait_for("A sees b", Duration::from_secs(3), || {
        node_names(a.addr("admin")) == ["a", "b"]
    });
    let echo = echo(D, 0);
    let _agent = agent(D, &a, "demo", echo.addr("listen"), &["--nodes", "1"]);
    wait_routable(a.addr("public"), "demo");
    etcd.wait_key(
        "/ringtunnel/v1/sessions/demo/a",
        true,
        Duration::from_secs(3),
    );
    let badmin = b.addr("admin");
    wait_for("B sees a", Duration::from_secs(3), || {
        node_names(badmin) == ["a", "b"]
    });

    let t = Instant::now();
    assert!(a.terminate(Duration::from_secs(10)), "A did not exit");
    let exited = t.elapsed();
    etcd.wait_key("/ringtunnel/v1/nodes/a", false, Duration::from_secs(1));
    assert!(!etcd.has_key("/ringtunnel/v1/sessions/demo/a"));
    wait_for("B's view drops a", Duration::from_secs(1), || {
        node_names(badmin) == ["b"]
    });
    assert!(exited < Duration::from_secs(10), "{exited:?}");
}

#[test]
fn drain_marks_the_node_key_draining_before_the_node_goes() {
    let etcd = Etcd::start();
    let echo = echo(D, 0);
    // A long grace and a request in flight keep A draining for a while.
    let mut a = node(
        &etcd,
        "a",
        &["--shutdown-grace", "5", "--cluster-lease-ttl", "30"],
    );
    let _agent = agent(D, &a, "demo", echo.addr("listen"), &["--nodes", "1"]);
    let public = a.addr("public");
    wait_routable(public, "demo");
    etcd.wait_key("/ringtunnel/v1/nodes/a", true, Duration::from_secs(3));
    // A request that takes 2 s holds the shutdown open.
    let inflight = std::thread::spawn(move || curl(public, "demo", "/delay/2000", &["-m", "10"]).0);
    std::thread::sleep(Duration::from_millis(200));
    unsafe {
        libc::kill(a.pid() as i32, libc::SIGTERM);
    }
    wait_for("node key says draining", Duration::from_secs(1), || {
        etcd.keys()
            .iter()
            .any(|(k, v)| k == "/ringtunnel/v1/nodes/a" && v.contains("\"state\":\"draining\""))
    });
    assert_eq!(
        inflight.join().unwrap(),
        200,
        "the in-flight request finishes"
    );
    // No second SIGTERM (that one would mean "exit now"): it exits on its
    // own once the request is done, revoking its lease.
    wait_for("A exits after its drain", Duration::from_secs(10), || {
        matches!(a.child.try_wait(), Ok(Some(_)))
    });
    etcd.wait_key("/ringtunnel/v1/nodes/a", false, Duration::from_secs(1));
}

#[test]
fn a_session_held_on_another_node_is_refused_to_another_agent() {
    let etcd = Etcd::start();
    let a = node(&etcd, "a", &[]);
    let b = node(&etcd, "b", &[]);
    let echo = echo(D, 0);
    let _first = agent(
        D,
        &a,
        "demo",
        echo.addr("listen"),
        &["--nodes", "1", "--agent-id", "1"],
    );
    wait_routable(a.addr("public"), "demo");
    let badmin = b.addr("admin");
    wait_for("B sees demo on a", Duration::from_secs(3), || {
        holders(badmin, "demo") == ["a"]
    });

    // Another agent claims the name on B.
    let args = agent_args(
        D,
        &b,
        "demo",
        echo.addr("listen"),
        &["--nodes", "1", "--agent-id", "2"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut second = spawn_nowait("agent-2", &args);
    assert!(
        second.wait_stderr("held by another agent on node 'a'", Duration::from_secs(5)),
        "agent 2 must be refused naming node a: {}",
        second.stderr()
    );
    assert!(
        second.stderr().contains("gateway refused the uplink"),
        "{}",
        second.stderr()
    );
    assert!(!second.stdout().contains("ringtunnel agent ready"));
    // B registered nothing for it; A's hold is intact and still serves.
    assert_eq!(holders(badmin, "demo"), ["a"]);
    assert!(!etcd.has_key("/ringtunnel/v1/sessions/demo/b"));
    assert_eq!(get(a.addr("public"), "demo"), 200);
    let refused = metric_sum(
        &metrics(badmin),
        "ringtunnel_errors_total",
        "handshake_refused",
    );
    assert!(refused >= 1, "B counted no refusal");
    second.proc.kill();

    // The same agent (its id) on a second node is welcome: that is how an
    // agent keeps uplinks on K nodes.
    let same = agent(
        D,
        &b,
        "demo",
        echo.addr("listen"),
        &["--nodes", "1", "--agent-id", "1"],
    );
    wait_routable(b.addr("public"), "demo");
    etcd.wait_key(
        "/ringtunnel/v1/sessions/demo/b",
        true,
        Duration::from_secs(3),
    );
    wait_for("both nodes hold demo", Duration::from_secs(3), || {
        holders(badmin, "demo") == ["a", "b"]
    });
    drop(same);
}

/// Shared by the outage tests: A serves "demo" from its own agent; the
/// outage is `outage(&mut etcd)`; during it requests keep working and
/// A's metrics say etcd is down; after it, keys and metrics come back.
/// Returns A's lease before and after.
/// `outage` also gets B's admin address.
fn outage_keeps_serving(outage: impl FnOnce(&mut Etcd, &dyn Fn(), SocketAddr)) -> (String, String) {
    let mut etcd = Etcd::start();
    let a = node(&etcd, "a", &[]);
    let b = node(&etcd, "b", &[]);
    let echo = echo(D, 0);
    let _agent = agent(D, &a, "demo", echo.addr("listen"), &["--nodes", "1"]);
    let (public, admin, badmin) = (a.addr("public"), a.addr("admin"), b.addr("admin"));
    wait_routable(public, "demo");
    etcd.wait_key(
        "/ringtunnel/v1/sessions/demo/a",
        true,
        Duration::from_secs(3),
    );
    wait_for("B sees demo", Duration::from_secs(3), || {
        holders(badmin, "demo") == ["a"]
    });
    let base = baseline(&a, admin);
    let lease_before = cluster_json(admin)["lease"].as_str().unwrap().to_string();

    let during = || {
        // Down within a renewal period plus one call's timeout.
        let down = wait_for("A reports etcd down", Duration::from_secs(TTL + 2), || {
            metric(admin, "ringtunnel_cluster_etcd_up") == 0.0
        });
        eprintln!("etcd down noticed after {down:?}");
        assert!(metric(admin, "ringtunnel_cluster_etcd_errors_total") >= 1.0);
        // Everything that worked still works, and the views are kept.
        for _ in 0..20 {
            assert_eq!(
                get(public, "demo"),
                200,
                "a request failed during the outage"
            );
        }
        assert_eq!(holders(admin, "demo"), ["a"]);
        assert_eq!(holders(badmin, "demo"), ["a"], "B keeps its last view");
        assert_eq!(node_names(badmin), ["a", "b"]);
    };
    outage(&mut etcd, &during, badmin);

    let up = wait_for("A reports etcd up again", Duration::from_secs(10), || {
        metric(admin, "ringtunnel_cluster_etcd_up") == 1.0
    });
    eprintln!("etcd up again noticed after {up:?}");
    // Converged: both nodes' keys and A's session are back, under a new
    // lease if the old one expired.
    etcd.wait_key("/ringtunnel/v1/nodes/a", true, Duration::from_secs(5));
    etcd.wait_key("/ringtunnel/v1/nodes/b", true, Duration::from_secs(5));
    etcd.wait_key(
        "/ringtunnel/v1/sessions/demo/a",
        true,
        Duration::from_secs(5),
    );
    wait_for("B sees demo on a again", Duration::from_secs(5), || {
        holders(badmin, "demo") == ["a"] && metric(badmin, "ringtunnel_cluster_etcd_up") == 1.0
    });
    assert_eq!(get(public, "demo"), 200);
    // The keys stay: the lease is renewed again (2 TTLs later still there).
    std::thread::sleep(Duration::from_secs(TTL * 2));
    assert!(etcd.has_key("/ringtunnel/v1/sessions/demo/a"));
    assert!(etcd.has_key("/ringtunnel/v1/nodes/a"));
    let lease_after = cluster_json(admin)["lease"].as_str().unwrap().to_string();
    // No connection to the dead etcd left behind.
    wait_baseline(&a, admin, base, Duration::from_secs(5));
    (lease_before, lease_after)
}

#[test]
fn etcd_paused_longer_than_the_lease_changes_nothing_that_works_and_converges() {
    let (before, after) = outage_keeps_serving(|etcd, during, badmin| {
        etcd.signal(libc::SIGSTOP);
        let t = Instant::now();
        during();
        // Longer than the TTL: the lease expires while etcd is paused.
        let pause = Duration::from_secs(TTL * 2 + 1);
        std::thread::sleep(pause.saturating_sub(t.elapsed()));
        etcd.signal(libc::SIGCONT);
        // On resume etcd revokes the expired lease; A's keys are missing
        // from B's view until A has re-put them. The bound stated in
        // cluster/registry.rs: one backoff step (1 s) plus the writes.
        let (mut gap, mut since) = (Duration::ZERO, None::<Instant>);
        let watch = Instant::now();
        while watch.elapsed() < Duration::from_secs(4) {
            let held = holders(badmin, "demo") == ["a"];
            match (held, since) {
                (false, None) => since = Some(Instant::now()),
                (true, Some(t0)) => {
                    gap = gap.max(t0.elapsed());
                    since = None;
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(since.is_none(), "demo never came back to B's view");
        eprintln!("B's view missed demo on a for {gap:?} after etcd resumed");
        assert!(gap <= Duration::from_millis(1500), "gap {gap:?}");
    });
    // The old lease expired while etcd was paused: the keys came back
    // under a new one.
    assert_ne!(before, after, "the lease must have been granted again");
}

#[test]
fn etcd_killed_and_restarted_on_its_data_changes_nothing_that_works_and_converges() {
    outage_keeps_serving(|etcd, during, _| {
        etcd.kill();
        let t = Instant::now();
        during();
        let down = Duration::from_secs(TTL * 2 + 1);
        std::thread::sleep(down.saturating_sub(t.elapsed()));
        etcd.run();
    });
}

#[test]
fn strangers_keys_are_ignored_and_a_dead_first_endpoint_is_skipped() {
    let etcd = Etcd::start();
    // The first endpoint refuses connections: every call moves on to the
    // second.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let both = format!("{dead},{}", etcd.url());
    let a = node_at(&both, "a", &[]);
    let admin = a.addr("admin");
    etcd.wait_key("/ringtunnel/v1/nodes/a", true, Duration::from_secs(5));

    // Lies and garbage under the prefix: not JSON, JSON of another
    // shape, bad names, a key outside the layout, binary.
    let mut c = etcd.client();
    for (k, v) in [
        ("/ringtunnel/v1/nodes/evil", &b"not json"[..]),
        (
            "/ringtunnel/v1/nodes/Bad_Name",
            br#"{"cores":1,"peer":"1.2.3.4:5","state":"ready","tunnel":"1.2.3.4:6"}"#,
        ),
        (
            "/ringtunnel/v1/nodes/liar",
            br#"{"cores":1,"peer":"1.2.3.4:5","state":"asleep","tunnel":"1.2.3.4:6"}"#,
        ),
        (
            "/ringtunnel/v1/nodes/braggart",
            br#"{"cores":"many","peer":"1.2.3.4:5","state":"ready","tunnel":"1.2.3.4:6"}"#,
        ),
        (
            "/ringtunnel/v1/sessions/demo/evil",
            br#"{"agent_id":"seven"}"#,
        ),
        ("/ringtunnel/v1/sessions/no-node-part", br#"{"agent_id":7}"#),
        ("/ringtunnel/v1/elsewhere", b"\xff\x00"),
    ] {
        c.put(k, v, 0).unwrap();
    }
    // A well-formed key of a node that never registered is shown as is.
    c.put("/ringtunnel/v1/sessions/ghost/z", br#"{"agent_id":7}"#, 0)
        .unwrap();
    wait_for(
        "A's view has the ghost session",
        Duration::from_secs(3),
        || holders(admin, "ghost") == ["z"],
    );
    assert_eq!(node_names(admin), ["a"], "no stranger among the nodes");
    assert!(holders(admin, "demo").is_empty());
    assert_eq!(metric(admin, "ringtunnel_cluster_sessions"), 1.0);
    assert_eq!(metric(admin, "ringtunnel_cluster_etcd_up"), 1.0);
    // Still alive and answering on its public port (no session: not 200).
    let st = get(a.addr("public"), "nobody");
    assert!(st == 404 || st == 502, "status {st}");
}

/// A fake etcd on loopback that answers every request the same bad way,
/// until dropped.
struct LyingEtcd {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone, Copy)]
enum Lie {
    /// Bytes that are not HTTP.
    Garbage,
    /// HTTP 200 whose body is not etcd's JSON.
    BadJson,
    /// Accepts, reads, never answers.
    Stall,
}

impl LyingEtcd {
    fn start(lie: Lie) -> LyingEtcd {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !st.load(Ordering::SeqCst) {
                let Ok((mut s, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let answer: &[u8] = match lie {
                    Lie::Garbage => b"\x16\x03\x01 this is not HTTP at all\r\n\r\n",
                    Lie::BadJson => b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{\"ID\":[1]",
                    Lie::Stall => b"",
                };
                let _ = s.write_all(answer);
                // Stalled connections stay open (bounded: the test is short).
                held.push(s);
                if !matches!(lie, Lie::Stall) {
                    held.clear();
                }
            }
        });
        LyingEtcd {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for LyingEtcd {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn an_etcd_that_lies_or_stalls_costs_nothing_but_its_counter() {
    for lie in [Lie::Garbage, Lie::BadJson, Lie::Stall] {
        let fake = LyingEtcd::start(lie);
        let url = format!("http://{}", fake.addr);
        let a = node_at(&url, "a", &[]);
        let admin = a.addr("admin");
        let echo = echo(D, 0);
        let _agent = agent(D, &a, "demo", echo.addr("listen"), &["--nodes", "1"]);
        // The node serves as a single node would.
        wait_routable(a.addr("public"), "demo");
        wait_for("errors counted", Duration::from_secs(5), || {
            metric(admin, "ringtunnel_cluster_etcd_errors_total") >= 2.0
        });
        let fds = a.fd_count();
        let errors = metric(admin, "ringtunnel_cluster_etcd_errors_total");
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(metric(admin, "ringtunnel_cluster_etcd_up"), 0.0);
        let more = metric(admin, "ringtunnel_cluster_etcd_errors_total");
        assert!(more > errors, "it keeps retrying");
        // Capped backoff: 2 threads, 100 ms doubling to 1 s: about 10 calls
        // in 3 s (a fast retry loop would make hundreds).
        assert!(more - errors <= 30.0, "{} errors in 3 s", more - errors);
        // Retries do not leak connections.
        assert!(a.fd_count() <= fds + 2, "fds {} -> {}", fds, a.fd_count());
        for _ in 0..10 {
            assert_eq!(get(a.addr("public"), "demo"), 200);
        }
        assert_eq!(cluster_json(admin)["revision"], 0, "no view was made up");
    }
}

#[test]
fn quorum_loss_keeps_serving_and_converges_when_it_returns() {
    let mut members = Etcd::cluster(3);
    let urls: Vec<String> = members.iter().map(Etcd::url).collect();
    let all = urls.join(",");
    let start = |name: &str| node_at(&all, name, &[]);
    let a = start("a");
    let b = start("b");
    let echo = echo(D, 0);
    let _agent = agent(D, &a, "demo", echo.addr("listen"), &["--nodes", "1"]);
    let (public, admin, badmin) = (a.addr("public"), a.addr("admin"), b.addr("admin"));
    wait_routable(public, "demo");
    members[0].wait_key(
        "/ringtunnel/v1/sessions/demo/a",
        true,
        Duration::from_secs(3),
    );
    wait_for("B sees demo", Duration::from_secs(3), || {
        holders(badmin, "demo") == ["a"]
    });

    // Two of three members go: the survivor has no leader. The gateways
    // watch the first member, which ends their watches ("no leader").
    members[1].kill();
    members[2].kill();
    let down = wait_for(
        "both nodes report etcd down",
        Duration::from_secs(TTL + 3),
        || {
            metric(admin, "ringtunnel_cluster_etcd_up") == 0.0
                && metric(badmin, "ringtunnel_cluster_etcd_up") == 0.0
        },
    );
    eprintln!("quorum loss noticed after {down:?}");
    for _ in 0..20 {
        assert_eq!(get(public, "demo"), 200, "a request failed without quorum");
    }
    assert_eq!(holders(badmin, "demo"), ["a"], "B keeps its last view");
    // Longer than the TTL without quorum.
    std::thread::sleep(Duration::from_secs(TTL + 1));
    assert_eq!(get(public, "demo"), 200);

    members[1].spawn();
    members[2].spawn();
    for m in &members {
        m.wait_ready();
    }
    let up = wait_for("both nodes report etcd up", Duration::from_secs(10), || {
        metric(admin, "ringtunnel_cluster_etcd_up") == 1.0
            && metric(badmin, "ringtunnel_cluster_etcd_up") == 1.0
    });
    eprintln!("quorum back noticed after {up:?}");
    members[0].wait_key("/ringtunnel/v1/nodes/a", true, Duration::from_secs(5));
    members[0].wait_key(
        "/ringtunnel/v1/sessions/demo/a",
        true,
        Duration::from_secs(5),
    );
    wait_for("B sees demo on a", Duration::from_secs(5), || {
        holders(badmin, "demo") == ["a"] && node_names(badmin) == ["a", "b"]
    });
    // Kept alive from now on.
    std::thread::sleep(Duration::from_secs(TTL * 2));
    assert!(members[0].has_key("/ringtunnel/v1/sessions/demo/a"));
    assert_eq!(get(public, "demo"), 200);
}

#[test]
fn an_unusable_etcd_url_stops_start_up_with_the_flag_named() {
    let peer = format!("127.0.0.1:{}", free_port());
    let mut g = spawn_nowait(
        "gateway",
        &[
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--tunnel-listen",
            "127.0.0.1:0",
            "--cores",
            "1",
            "--no-pin",
            "--cluster-etcd",
            "http://",
            "--node-name",
            "a",
            "--peer-listen",
            &peer,
            "--cluster-secret",
            SECRET,
        ],
    );
    let code = g.wait_exit(Duration::from_secs(5));
    assert!(matches!(code, Some(c) if c != 0), "exit {code:?}");
    assert!(
        g.wait_stderr("--cluster-etcd: http://: no host", Duration::from_secs(2)),
        "{}",
        g.stderr()
    );
    assert!(!g.stdout().contains("ready"));
}

/// What the registry relies on, asked of a real etcd through our client:
/// leased writes in one transaction, keys gone with their lease, and
/// how a lost lease shows (keepalive TTL 0, a put "lease not found").
#[test]
fn the_etcd_client_against_a_real_member() {
    use ringtunnel::cluster::etcd::{Write, MAX_TXN_OPS};
    let etcd = Etcd::start();
    let mut c = etcd.client();
    let lease = c.grant(30).unwrap();
    assert!(c.keepalive(lease).unwrap() > 0);
    let puts: Vec<Write> = (0..MAX_TXN_OPS)
        .map(|i| Write::Put {
            key: format!("/ringtunnel/v1/sessions/s{i}/a"),
            value: br#"{"agent_id":1}"#.to_vec(),
            lease,
        })
        .collect();
    let rev = c.write_batch(&puts).unwrap();
    let page = c.range_prefix("/ringtunnel/v1/sessions/").unwrap();
    assert_eq!(page.kvs.len(), MAX_TXN_OPS);
    assert_eq!(page.revision, rev, "one transaction, one revision");
    // Deletes and puts mixed; one key never twice.
    let mixed = vec![
        Write::Delete {
            key: "/ringtunnel/v1/sessions/s0/a".into(),
        },
        Write::Put {
            key: "/ringtunnel/v1/nodes/a".into(),
            value: b"{}".to_vec(),
            lease: 0,
        },
    ];
    assert_eq!(c.write_batch(&mixed).unwrap(), rev + 1);
    assert_eq!(etcd.keys().len(), MAX_TXN_OPS);
    // Binary-safe values, and a range of more keys than one page
    // (RANGE_PAGE) read whole at one revision.
    let pages = ringtunnel::cluster::etcd::RANGE_PAGE as usize / MAX_TXN_OPS + 2;
    for b in 0..pages {
        let batch: Vec<Write> = (0..MAX_TXN_OPS)
            .map(|i| Write::Put {
                key: format!("/x/{:06}", b * MAX_TXN_OPS + i),
                value: vec![0, 0xff, i as u8],
                lease: 0,
            })
            .collect();
        c.write_batch(&batch).unwrap();
    }
    let x = c.range_prefix("/x/").unwrap();
    assert_eq!(x.kvs.len(), pages * MAX_TXN_OPS, "every page read");
    assert!(x.kvs.len() > ringtunnel::cluster::etcd::RANGE_PAGE as usize);
    assert!(
        x.kvs.windows(2).all(|w| w[0].key < w[1].key),
        "in order, none twice"
    );
    assert_eq!(x.kvs[3].value, [0, 0xff, 3]);
    // Revoked: its keys go at once; the lease is then reported gone.
    c.revoke(lease).unwrap();
    assert_eq!(etcd.keys().len(), 1, "only the unleased node key stays");
    assert_eq!(c.keepalive(lease).unwrap(), 0);
    let e = c
        .put("/ringtunnel/v1/sessions/late/a", b"{}", lease)
        .unwrap_err();
    assert!(e.lease_not_found(), "{e}");
    let e = c.write_batch(&puts[..1]).unwrap_err();
    assert!(e.lease_not_found(), "{e}");
}

/// A cluster node on `host` (its public, tunnel and peer listeners) with
/// TCP tunnel ports `port`: two nodes on one machine need two loopback
/// addresses to both listen on the same tunnel port.
fn tcp_node(etcd: &Etcd, name: &str, host: &str, port: u16) -> Proc {
    let listen = format!("{host}:0");
    let peer = format!("{host}:{}", free_port());
    let range = format!("{port}-{port}");
    let flags = node_flags(&etcd.url(), name, &peer, &[]);
    let mut args = vec![
        "gateway",
        "--listen",
        &listen,
        "--tunnel-listen",
        &listen,
        "--admin-listen",
        "127.0.0.1:0",
        "--no-pin",
        "--driver",
        D,
        "--cores",
        "2",
        "--tcp-ports",
        &range,
    ];
    args.extend(flags.iter().map(String::as_str));
    spawn("gateway", &args, "ringtunnel gateway ready")
}

#[test]
fn a_tcp_tunnel_port_is_registered_and_served_by_every_node() {
    use std::io::{Read, Write};
    let etcd = Etcd::start();
    // Free on both loopback addresses.
    let port = loop {
        let p = free_port();
        if TcpListener::bind(("127.0.0.2", p)).is_ok() {
            break p;
        }
    };
    let a = tcp_node(&etcd, "a", "127.0.0.1", port);
    let b = tcp_node(&etcd, "b", "127.0.0.2", port);
    let svc = TcpListener::bind("127.0.0.1:0").unwrap();
    let svc_addr = svc.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in svc.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let spec = format!("{svc_addr}={port}");
    let tunnel = a.field("tunnel");
    let mut agent = spawn_nowait(
        "agent",
        &[
            "agent",
            "--gateway",
            &tunnel,
            "--session",
            "db",
            "--no-pin",
            "--cores",
            "1",
            "--nodes",
            "1",
            "--tcp",
            &spec,
        ],
    );
    etcd.wait_key(
        "/ringtunnel/v1/sessions/db/a",
        true,
        Duration::from_secs(10),
    );
    let v = etcd
        .keys()
        .into_iter()
        .find(|(k, _)| k == "/ringtunnel/v1/sessions/db/a")
        .unwrap()
        .1;
    let hold: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(hold["tcp"], serde_json::json!([port]), "{v}");

    // B learns the port from etcd and serves it over a peer link.
    let at_b: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    wait_for("B serves the port", Duration::from_secs(10), || {
        let Ok(mut s) = TcpStream::connect_timeout(&at_b, Duration::from_secs(1)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = [0u8; 4];
        s.write_all(b"ping").is_ok() && s.read_exact(&mut got).is_ok() && &got == b"ping"
    });
    let badmin = b.addr("admin");
    assert!(metric(badmin, "ringtunnel_tcp_forwarded_total") >= 1.0);

    // The agent goes: A withdraws the hold, B closes its copy of the port.
    agent.proc.kill();
    etcd.wait_key(
        "/ringtunnel/v1/sessions/db/a",
        false,
        Duration::from_secs(10),
    );
    wait_for("B closes the port", Duration::from_secs(5), || {
        matches!(
            TcpStream::connect_timeout(&at_b, Duration::from_secs(1)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    });
    drop(a);
}

/// A node whose tunnel listener is a wildcard registers the host agents
/// can dial (the `--peer-listen` host), never 0.0.0.0: agents on K nodes
/// connect to the addresses from the node keys.
#[test]
fn a_wildcard_tunnel_listener_registers_a_dialable_address() {
    let etcd = Etcd::start();
    let url = etcd.url();
    let peer = format!("127.0.0.1:{}", free_port());
    let flags = node_flags(&url, "w", &peer, &[]);
    let mut args = vec![
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--tunnel-listen",
        "0.0.0.0:0",
        "--insecure-plaintext",
        "--admin-listen",
        "127.0.0.1:0",
        "--no-pin",
        "--cores",
        "1",
    ];
    args.extend(flags.iter().map(String::as_str));
    let n = spawn("gateway", &args, "ringtunnel gateway ready");
    etcd.wait_key("/ringtunnel/v1/nodes/w", true, Duration::from_secs(3));
    let keys = etcd.keys();
    let v = &keys
        .iter()
        .find(|(k, _)| k == "/ringtunnel/v1/nodes/w")
        .unwrap()
        .1;
    let node: serde_json::Value = serde_json::from_str(v).unwrap();
    let tunnel: SocketAddr = node["tunnel"].as_str().unwrap().parse().unwrap();
    let bound: SocketAddr = n.field("tunnel").parse().unwrap();
    assert_eq!(tunnel.ip().to_string(), "127.0.0.1", "{node}");
    assert_eq!(tunnel.port(), bound.port(), "{node}");
}
