//! The node's control plane: its registration in etcd and its view of
//! the cluster, on two plain threads of its own (never on a core).
//!
//! - **`cluster-lease`** owns the node's etcd lease and every key written
//!   under it. It grants the lease (`ClusterConfig::lease_ttl`), puts the
//!   node key (`/ringtunnel/v1/nodes/{node}`: [`NodeInfo`] as JSON), renews
//!   the lease every TTL/3, and puts or deletes (in transactions of up to
//!   [`MAX_TXN_OPS`] writes) the session keys
//!   (`/ringtunnel/v1/sessions/{session}/{node}`: `{"agent_id": N}`) that
//!   the cores ask for through [`RegistryHandle::hold`] and
//!   [`RegistryHandle::release`]. Those calls only send on a channel: a
//!   core never waits for etcd. The thread keeps the *desired* state (node
//!   info, sessions held) and a set of keys that may differ from it in
//!   etcd; whatever etcd refuses stays in that set and is written again
//!   when etcd answers (capped exponential backoff, 100 ms to 1 s). When
//!   the lease is found gone (expired while etcd or this node was
//!   unreachable), a new one is granted and the node key and every session
//!   key are written again: the node converges to what it holds.
//! - **`cluster-watch`** reads the whole prefix (paged, one revision), then
//!   watches it from that revision + 1, and rebuilds the [`ClusterView`]:
//!   all the messages already received are applied before one new view is
//!   pushed to every core (`publish`, the gateway's mailboxes). A watch
//!   that ends, errs, is cancelled (compaction), is on a member that lost
//!   its leader (asked with `hasleader`: the member ends it), or whose
//!   connection stops answering TCP keepalive (about 5 s) is replaced by
//!   a fresh read of the prefix on the next endpoint; one silent for
//!   [`idle_restart`] too, as a backstop.
//!
//! etcd unreachable or without quorum: both threads keep the last view
//! (the cores keep routing with it), count each failed call
//! (`ringtunnel_cluster_etcd_errors_total`), log at most one line per 10 s
//! per thread, and retry. [`RegistryStatus::etcd_up`] is false from the
//! first failed call until both threads have succeeded again.
//!
//! After an outage longer than the TTL the lease may be gone: a single
//! member that was paused revokes expired leases when it resumes (a new
//! leader after a quorum loss, or a restarted member, extends them
//! instead). The node's keys are then absent from every view from that
//! revoke until this node has granted a new lease and written them again:
//! at most one backoff step (1 s) plus a few writes. Views are not the
//! only liveness signal (peer links are), but during that gap other nodes
//! do not forward to this one.
//!
//! A graceful [`Registry::stop`] revokes the lease, so the node's keys
//! vanish at once; a node that dies leaves them until the TTL passes.
//!
//! Memory: the view holds at most [`MAX_NODES`] nodes and
//! [`MAX_SESSION_KEYS`] session keys (more are ignored and logged); the
//! lease thread holds one entry per session this node has uplinks of.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::Deserialize;

use super::etcd::{Client, EtcdError, Event, KeyValue, Timeouts, WatchMessage, Write, MAX_TXN_OPS};
use super::{ClusterConfig, ClusterView, NodeInfo, NodeState, SessionHold};
use super::{NODES_PREFIX, PREFIX, SESSIONS_PREFIX};

/// Most nodes a view holds.
pub const MAX_NODES: usize = 1024;
/// Most session keys (session, node) a view holds.
pub const MAX_SESSION_KEYS: usize = 1_000_000;
/// Backoff between failed etcd calls: doubles from the first to the cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Low: after an outage longer than the TTL, etcd may revoke the expired
/// lease as soon as it answers again, and the node's keys are missing from
/// every view until this thread has written them again.
const BACKOFF_CAP: Duration = Duration::from_secs(1);
/// How often the watch thread looks up from a silent stream (stop flag,
/// idle bound).
const WATCH_POLL: Duration = Duration::from_millis(500);

/// A silent watch is replaced (prefix re-read) after this long. A backstop
/// only: a member that loses its leader ends the watch itself
/// (`hasleader`), and TCP keepalive ends one whose path went dark within
/// about 5 s (`etcd::keepalive_probes`).
pub fn idle_restart(ttl: Duration) -> Duration {
    (ttl * 12).max(Duration::from_secs(60))
}

/// The node key of `node`.
pub fn node_key(node: &str) -> String {
    format!("{NODES_PREFIX}{node}")
}

/// The key of `node`'s hold on `session`.
pub fn session_key(session: &str, node: &str) -> String {
    format!("{SESSIONS_PREFIX}{session}/{node}")
}

/// The JSON value of a node key.
pub fn node_json(n: &NodeInfo) -> String {
    serde_json::json!({
        "peer": n.peer.to_string(),
        "tunnel": n.tunnel.to_string(),
        "cores": n.cores,
        "state": n.state.as_str(),
    })
    .to_string()
}

/// The JSON value of a session key.
pub fn hold_json(h: &SessionHold) -> String {
    if h.tcp.is_empty() {
        serde_json::json!({ "agent_id": h.agent_id }).to_string()
    } else {
        serde_json::json!({ "agent_id": h.agent_id, "tcp": h.tcp }).to_string()
    }
}

/// Unknown fields are allowed: a newer node may register more, and an
/// older one must still read it during a rolling upgrade.
#[derive(Deserialize)]
struct NodeJson {
    peer: SocketAddr,
    tunnel: SocketAddr,
    cores: u16,
    state: String,
}

/// Reads a node key's value; `None` if it is not one.
pub fn parse_node(name: &str, value: &[u8]) -> Option<NodeInfo> {
    let j: NodeJson = serde_json::from_slice(value).ok()?;
    Some(NodeInfo {
        name: name.to_string(),
        peer: j.peer,
        tunnel: j.tunnel,
        cores: j.cores,
        state: NodeState::parse(&j.state)?,
    })
}

#[derive(Deserialize)]
struct HoldJson {
    agent_id: u64,
    #[serde(default)]
    tcp: Vec<u16>,
}

/// Reads a session key's value; `None` if it is not one.
pub fn parse_hold(value: &[u8]) -> Option<SessionHold> {
    let j: HoldJson = serde_json::from_slice(value).ok()?;
    Some(SessionHold {
        agent_id: j.agent_id,
        tcp: j.tcp,
    })
}

/// What the admin endpoint shows; shared with the threads.
#[derive(Default)]
pub struct RegistryStatus {
    /// The lease thread's last call succeeded.
    lease_ok: AtomicBool,
    /// The watch thread holds a watch that started from a successful read.
    watch_ok: AtomicBool,
    errors: AtomicU64,
    /// 0 ready, 1 draining.
    state: AtomicU8,
    lease: AtomicI64,
    view: Mutex<Arc<ClusterView>>,
}

impl RegistryStatus {
    /// etcd answers both threads now.
    pub fn etcd_up(&self) -> bool {
        self.lease_ok.load(Ordering::Relaxed) && self.watch_ok.load(Ordering::Relaxed)
    }

    /// Failed etcd calls since start.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn state(&self) -> NodeState {
        match self.state.load(Ordering::Relaxed) {
            0 => NodeState::Ready,
            _ => NodeState::Draining,
        }
    }

    /// The current lease id (0: none).
    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::Relaxed)
    }

    /// The view last pushed to the cores.
    pub fn view(&self) -> Arc<ClusterView> {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

enum Cmd {
    Hold { session: String, hold: SessionHold },
    Release { session: String },
    State(NodeState),
}

/// What cores and the gateway use: cheap to clone, every call returns at
/// once.
#[derive(Clone)]
pub struct RegistryHandle {
    tx: Sender<Cmd>,
    status: Arc<RegistryStatus>,
    node: Arc<str>,
}

impl RegistryHandle {
    /// This node holds an uplink of `session` now (its agent: `agent_id`,
    /// its granted TCP ports here: `tcp`).
    pub fn hold(&self, session: &str, agent_id: u64, tcp: Vec<u16>) {
        let _ = self.tx.send(Cmd::Hold {
            session: session.to_string(),
            hold: SessionHold { agent_id, tcp },
        });
    }

    /// This node no longer holds any uplink of `session`.
    pub fn release(&self, session: &str) {
        let _ = self.tx.send(Cmd::Release {
            session: session.to_string(),
        });
    }

    /// Changes the node key's state (drain).
    pub fn set_state(&self, state: NodeState) {
        self.status
            .state
            .store(u8::from(state == NodeState::Draining), Ordering::Relaxed);
        let _ = self.tx.send(Cmd::State(state));
    }

    pub fn status(&self) -> &RegistryStatus {
        &self.status
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The cluster's Prometheus metrics (`/metrics`).
    pub fn metrics(&self) -> String {
        let s = &self.status;
        let v = s.view();
        format!(
            "# HELP ringtunnel_cluster_etcd_up Whether etcd answers this node's control plane (1) or not (0).\n\
             # TYPE ringtunnel_cluster_etcd_up gauge\nringtunnel_cluster_etcd_up {}\n\
             # HELP ringtunnel_cluster_etcd_errors_total Failed etcd calls (unreachable, no quorum, refused).\n\
             # TYPE ringtunnel_cluster_etcd_errors_total counter\nringtunnel_cluster_etcd_errors_total {}\n\
             # HELP ringtunnel_cluster_nodes Nodes registered in the view.\n\
             # TYPE ringtunnel_cluster_nodes gauge\nringtunnel_cluster_nodes {}\n\
             # HELP ringtunnel_cluster_sessions Sessions held by some node, per the view.\n\
             # TYPE ringtunnel_cluster_sessions gauge\nringtunnel_cluster_sessions {}\n\
             # HELP ringtunnel_cluster_view_revision etcd revision of the view the cores have.\n\
             # TYPE ringtunnel_cluster_view_revision gauge\nringtunnel_cluster_view_revision {}\n",
            u8::from(s.etcd_up()),
            s.errors(),
            v.nodes.len(),
            v.sessions.len(),
            v.revision,
        )
    }

    /// The `cluster` member of `/stats` (`"cluster":{...}`): this node,
    /// its state, etcd's health, the nodes with their state, and each
    /// session's holders (node names, in order).
    pub fn json(&self) -> String {
        let s = &self.status;
        let v = s.view();
        let nodes: Vec<serde_json::Value> = v
            .nodes
            .values()
            .map(|n| {
                serde_json::json!({
                    "name": n.name,
                    "state": n.state.as_str(),
                    "peer": n.peer.to_string(),
                    "tunnel": n.tunnel.to_string(),
                    "cores": n.cores,
                })
            })
            .collect();
        let sessions: serde_json::Map<String, serde_json::Value> = v
            .sessions
            .iter()
            .map(|(name, h)| {
                (
                    name.clone(),
                    serde_json::json!(h.keys().collect::<Vec<_>>()),
                )
            })
            .collect();
        let j = serde_json::json!({
            "node": &*self.node,
            "state": s.state().as_str(),
            "etcd_up": s.etcd_up(),
            "etcd_errors": s.errors(),
            "lease": s.lease().to_string(),
            "revision": v.revision,
            "nodes": nodes,
            "sessions": sessions,
        });
        format!("\"cluster\":{j}")
    }
}

/// The control plane of one node: [`Registry::new`], then
/// [`Registry::start`] once the node's addresses are known, then
/// [`Registry::stop`]. Dropping it stops it too.
pub struct Registry {
    cfg: ClusterConfig,
    handle: RegistryHandle,
    rx: Option<Receiver<Cmd>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Registry {
    /// The handle works at once: what it is told before `start` is
    /// written when the lease thread starts. Fails on an etcd URL the
    /// client cannot use.
    pub fn new(cfg: ClusterConfig) -> Result<Registry, String> {
        Client::new(&cfg.etcd, Timeouts::default()).map_err(|e| format!("--cluster-etcd: {e}"))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let handle = RegistryHandle {
            tx,
            status: Arc::default(),
            node: Arc::from(cfg.node.as_str()),
        };
        Ok(Registry {
            cfg,
            handle,
            rx: Some(rx),
            stop: Arc::default(),
            threads: Vec::new(),
        })
    }

    pub fn handle(&self) -> RegistryHandle {
        self.handle.clone()
    }

    /// Starts the two threads. `me`: this node as it registers itself;
    /// `publish`: hands a new view to every core.
    pub fn start(
        &mut self,
        me: NodeInfo,
        publish: impl Fn(Arc<ClusterView>) + Send + 'static,
    ) -> std::io::Result<()> {
        let rx = self.rx.take().expect("Registry::start called once");
        let mk = || Client::new(&self.cfg.etcd, Timeouts::for_lease(self.cfg.lease_ttl));
        let lease_client = mk().map_err(std::io::Error::other)?;
        let watch_client = mk().map_err(std::io::Error::other)?;
        let lease = LeaseKeeper {
            client: lease_client,
            ttl: self.cfg.lease_ttl,
            me,
            status: self.handle.status.clone(),
            lease: 0,
            next_keepalive: Instant::now(),
            desired: HashMap::new(),
            dirty: HashSet::new(),
            node_dirty: true,
            backoff: Backoff::default(),
            log: crate::limits::LogLimiter::new(Duration::from_secs(10)),
        };
        let stop = self.stop.clone();
        self.threads.push(
            std::thread::Builder::new()
                .name("cluster-lease".into())
                .spawn(move || lease.run(rx, stop))?,
        );
        let watch = Watcher {
            client: watch_client,
            ttl: self.cfg.lease_ttl,
            status: self.handle.status.clone(),
            publish: Box::new(publish),
            log: crate::limits::LogLimiter::new(Duration::from_secs(10)),
            model: Model::default(),
        };
        let stop = self.stop.clone();
        self.threads.push(
            std::thread::Builder::new()
                .name("cluster-watch".into())
                .spawn(move || watch.run(stop))?,
        );
        Ok(())
    }

    /// Revokes the lease (the node's keys vanish at once if etcd answers;
    /// otherwise they go when the TTL passes) and ends both threads.
    /// Bounded: one etcd call per endpoint plus the watch's poll interval.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop_now();
    }
}

#[derive(Default)]
struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    /// The wait after one more failure.
    fn fail(&mut self) -> Duration {
        let d = self.next.unwrap_or(BACKOFF_FIRST);
        self.next = Some((d * 2).min(BACKOFF_CAP));
        d
    }

    fn reset(&mut self) {
        self.next = None;
    }
}

fn log_failure(log: &mut crate::limits::LogLimiter, what: &str, e: &EtcdError) {
    if let Some(n) = log.allow(Instant::now()) {
        if n > 0 {
            tracing::warn!(error = %e, "cluster: {what} failed ({n} more since the last such line); keeping the last view");
        } else {
            tracing::warn!(error = %e, "cluster: {what} failed; keeping the last view");
        }
    }
}

/// The lease thread's state.
struct LeaseKeeper {
    client: Client,
    ttl: Duration,
    me: NodeInfo,
    status: Arc<RegistryStatus>,
    /// 0: none (not granted yet, or found gone).
    lease: i64,
    next_keepalive: Instant,
    /// Sessions this node holds, with their agent and TCP ports.
    desired: HashMap<String, SessionHold>,
    /// Sessions whose key in etcd may differ from `desired`.
    dirty: HashSet<String>,
    node_dirty: bool,
    backoff: Backoff,
    log: crate::limits::LogLimiter,
}

impl LeaseKeeper {
    fn run(mut self, rx: Receiver<Cmd>, stop: Arc<AtomicBool>) {
        // When the next etcd attempt is due (now: start at once).
        let mut due = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            // Wake for a command, the next attempt, or (at most every
            // 200 ms) to look at the stop flag.
            let wait = due
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200));
            match rx.recv_timeout(wait) {
                Ok(cmd) => {
                    self.apply(cmd);
                    // Everything queued meanwhile, before talking to etcd.
                    while let Ok(cmd) = rx.try_recv() {
                        self.apply(cmd);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Only once the handle is gone, i.e. while stopping.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
            }
            let now = Instant::now();
            let pending = self.node_dirty || !self.dirty.is_empty() || self.lease == 0;
            let in_backoff = self.backoff.next.is_some() && now < due;
            if in_backoff || (!pending && now < self.next_keepalive) {
                if !in_backoff {
                    due = self.next_keepalive;
                }
                continue;
            }
            match self.sync(now) {
                Ok(()) => {
                    self.backoff.reset();
                    self.status.lease_ok.store(true, Ordering::Relaxed);
                    due = self.next_keepalive;
                }
                Err(e) => {
                    self.status.errors.fetch_add(1, Ordering::Relaxed);
                    self.status.lease_ok.store(false, Ordering::Relaxed);
                    log_failure(&mut self.log, "lease/registration", &e);
                    due = Instant::now() + self.backoff.fail();
                }
            }
        }
        if self.lease != 0 {
            match self.client.revoke(self.lease) {
                Ok(()) => tracing::info!(lease = self.lease, "cluster: lease revoked"),
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: lease not revoked; keys go when its TTL passes")
                }
            }
        }
    }

    fn apply(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Hold { session, hold } => {
                if self.desired.get(&session) != Some(&hold) {
                    self.desired.insert(session.clone(), hold);
                    self.dirty.insert(session);
                }
            }
            Cmd::Release { session } => {
                if self.desired.remove(&session).is_some() {
                    self.dirty.insert(session);
                }
            }
            Cmd::State(s) => {
                if self.me.state != s {
                    self.me.state = s;
                    self.node_dirty = true;
                }
            }
        }
    }

    /// Brings etcd to the desired state: lease, renewal if due, node key,
    /// dirty session keys. Stops at the first failure (the rest stays
    /// dirty).
    fn sync(&mut self, now: Instant) -> Result<(), EtcdError> {
        for _ in 0..2 {
            match self.sync_once(now) {
                Err(e) if e.lease_not_found() => self.lease_lost(),
                r => return r,
            }
        }
        self.sync_once(now)
    }

    fn lease_lost(&mut self) {
        if self.lease != 0 {
            tracing::warn!(
                lease = self.lease,
                "cluster: lease expired; granting a new one and writing this node's keys again"
            );
        }
        self.lease = 0;
        self.status.lease.store(0, Ordering::Relaxed);
    }

    fn sync_once(&mut self, now: Instant) -> Result<(), EtcdError> {
        if self.lease != 0 && now >= self.next_keepalive {
            if self.client.keepalive(self.lease)? <= 0 {
                self.lease_lost();
            } else {
                self.next_keepalive = Instant::now() + self.ttl / 3;
            }
        }
        if self.lease == 0 {
            let ttl = self.ttl.as_secs().max(1) as i64;
            self.lease = self.client.grant(ttl)?;
            self.status.lease.store(self.lease, Ordering::Relaxed);
            self.next_keepalive = Instant::now() + self.ttl / 3;
            // A new lease owns nothing yet: everything is written again.
            self.node_dirty = true;
            self.dirty.extend(self.desired.keys().cloned());
            tracing::info!(lease = self.lease, ttl, "cluster: lease granted");
        }
        if self.node_dirty {
            let key = node_key(&self.me.name);
            self.client
                .put(&key, node_json(&self.me).as_bytes(), self.lease)?;
            self.node_dirty = false;
        }
        // In transactions of up to MAX_TXN_OPS writes (a reconnect storm
        // of a thousand sessions is ~16 round trips, not a thousand
        // fsyncs); sorted so the order is the same on every retry.
        let mut dirty: Vec<String> = self.dirty.iter().cloned().collect();
        dirty.sort();
        for batch in dirty.chunks(MAX_TXN_OPS) {
            let writes: Vec<Write> = batch
                .iter()
                .map(|session| {
                    let key = session_key(session, &self.me.name);
                    match self.desired.get(session) {
                        Some(hold) => Write::Put {
                            key,
                            value: hold_json(hold).into_bytes(),
                            lease: self.lease,
                        },
                        None => Write::Delete { key },
                    }
                })
                .collect();
            self.client.write_batch(&writes)?;
            for session in batch {
                self.dirty.remove(session);
            }
        }
        Ok(())
    }
}

/// The registered cluster as the watch has seen it.
#[derive(Default)]
struct Model {
    revision: i64,
    nodes: BTreeMap<String, NodeInfo>,
    sessions: HashMap<String, BTreeMap<String, SessionHold>>,
    session_keys: usize,
    /// Keys under the prefix that are not ours or not well formed, seen
    /// since the last log line.
    ignored: u64,
}

impl Model {
    fn reset(&mut self, revision: i64, kvs: &[KeyValue]) {
        *self = Model {
            ignored: self.ignored,
            ..Model::default()
        };
        self.revision = revision;
        for kv in kvs {
            self.put(kv);
        }
    }

    fn put(&mut self, kv: &KeyValue) {
        let Ok(key) = std::str::from_utf8(&kv.key) else {
            self.ignored += 1;
            return;
        };
        if let Some(name) = key.strip_prefix(NODES_PREFIX) {
            let info = crate::proto::valid_session_name(name)
                .then(|| parse_node(name, &kv.value))
                .flatten();
            match info {
                Some(n) if self.nodes.len() < MAX_NODES || self.nodes.contains_key(name) => {
                    self.nodes.insert(name.to_string(), n);
                }
                _ => {
                    // A value we cannot read replaces what the key held.
                    self.nodes.remove(name);
                    self.ignored += 1;
                }
            }
        } else if let Some((session, node)) = session_parts(key) {
            let hold = parse_hold(&kv.value);
            let holders = self.sessions.entry(session.to_string()).or_default();
            let had = holders.contains_key(node);
            match hold {
                Some(h) if had || self.session_keys < MAX_SESSION_KEYS => {
                    if !had {
                        self.session_keys += 1;
                    }
                    holders.insert(node.to_string(), h);
                }
                _ => {
                    if holders.remove(node).is_some() {
                        self.session_keys -= 1;
                    }
                    if holders.is_empty() {
                        self.sessions.remove(session);
                    }
                    self.ignored += 1;
                }
            }
        } else {
            self.ignored += 1;
        }
    }

    fn delete(&mut self, key: &[u8]) {
        let Ok(key) = std::str::from_utf8(key) else {
            return;
        };
        if let Some(name) = key.strip_prefix(NODES_PREFIX) {
            self.nodes.remove(name);
        } else if let Some((session, node)) = session_parts(key) {
            if let Some(h) = self.sessions.get_mut(session) {
                if h.remove(node).is_some() {
                    self.session_keys -= 1;
                }
                if h.is_empty() {
                    self.sessions.remove(session);
                }
            }
        }
    }

    fn apply(&mut self, revision: i64, events: &[Event]) {
        for e in events {
            match e {
                Event::Put(kv) => self.put(kv),
                Event::Delete { key, .. } => self.delete(key),
            }
        }
        self.revision = self.revision.max(revision);
    }

    fn view(&self) -> ClusterView {
        ClusterView {
            revision: self.revision,
            nodes: self.nodes.clone(),
            sessions: self.sessions.clone(),
        }
    }
}

/// `{session}/{node}` under the sessions prefix, both valid names.
fn session_parts(key: &str) -> Option<(&str, &str)> {
    let (s, n) = key.strip_prefix(SESSIONS_PREFIX)?.split_once('/')?;
    (crate::proto::valid_session_name(s) && crate::proto::valid_session_name(n)).then_some((s, n))
}

type Publish = Box<dyn Fn(Arc<ClusterView>) + Send>;

/// The watch thread's state.
struct Watcher {
    client: Client,
    ttl: Duration,
    status: Arc<RegistryStatus>,
    publish: Publish,
    log: crate::limits::LogLimiter,
    model: Model,
}

impl Watcher {
    fn push(&mut self) {
        let view = Arc::new(self.model.view());
        *self.status.view.lock().unwrap_or_else(|e| e.into_inner()) = view.clone();
        (self.publish)(view);
        if self.model.ignored > 0 {
            tracing::warn!(
                keys = self.model.ignored,
                "cluster: keys under {PREFIX} that are not ringtunnel's (or over the view's bounds) ignored"
            );
            self.model.ignored = 0;
        }
    }

    fn fail(&mut self, what: &str, e: &EtcdError, backoff: &mut Backoff, stop: &AtomicBool) {
        self.status.errors.fetch_add(1, Ordering::Relaxed);
        self.status.watch_ok.store(false, Ordering::Relaxed);
        log_failure(&mut self.log, what, e);
        sleep_unless(stop, backoff.fail());
    }

    fn run(mut self, stop: Arc<AtomicBool>) {
        let mut backoff = Backoff::default();
        while !stop.load(Ordering::SeqCst) {
            let page = match self.client.range_prefix(PREFIX) {
                Ok(p) => p,
                Err(e) => {
                    self.fail("reading the cluster", &e, &mut backoff, &stop);
                    continue;
                }
            };
            self.model.reset(page.revision, &page.kvs);
            self.push();
            let mut w = match self.client.watch(PREFIX, page.revision + 1, WATCH_POLL) {
                Ok(w) => w,
                Err(e) => {
                    self.fail("watching the cluster", &e, &mut backoff, &stop);
                    continue;
                }
            };
            self.status.watch_ok.store(true, Ordering::Relaxed);
            backoff.reset();
            if let Err(e) = self.follow(&mut w, &stop) {
                self.fail("watching the cluster", &e, &mut backoff, &stop);
            }
        }
    }

    /// Applies the watch's messages until it ends, errs, stays silent too
    /// long, or `stop`. `Ok` when a re-read is all that is needed.
    fn follow(
        &mut self,
        w: &mut super::etcd::WatchStream,
        stop: &AtomicBool,
    ) -> Result<(), EtcdError> {
        let idle = idle_restart(self.ttl);
        let mut last = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let Some(mut msg) = w.next_message()? else {
                if last.elapsed() >= idle {
                    tracing::debug!("cluster: watch silent for {idle:?}; reading the prefix again");
                    return Ok(());
                }
                continue;
            };
            last = Instant::now();
            let mut changed = false;
            // Every message already received, then one push.
            loop {
                match msg {
                    WatchMessage::Created { .. } => {}
                    WatchMessage::Events { revision, events } => {
                        changed |= !events.is_empty() || revision > self.model.revision;
                        self.model.apply(revision, &events);
                    }
                    WatchMessage::Canceled {
                        compact_revision,
                        reason,
                    } => {
                        if changed {
                            self.push();
                        }
                        tracing::info!(compact_revision, %reason, "cluster: watch cancelled; reading the prefix again");
                        return Ok(());
                    }
                    WatchMessage::Error(m) => {
                        if changed {
                            self.push();
                        }
                        return Err(EtcdError::Status {
                            http: 200,
                            code: 0,
                            message: m,
                        });
                    }
                }
                match w.next_buffered()? {
                    Some(m) => msg = m,
                    None => break,
                }
            }
            if changed {
                self.push();
            }
        }
        Ok(())
    }
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            mod_revision: 1,
        }
    }

    #[test]
    fn node_and_hold_values_round_trip() {
        let n = NodeInfo {
            name: "gw-a".into(),
            peer: "10.0.0.1:7100".parse().unwrap(),
            tunnel: "10.0.0.1:7000".parse().unwrap(),
            cores: 4,
            state: NodeState::Draining,
        };
        let j = node_json(&n);
        assert_eq!(
            j,
            r#"{"cores":4,"peer":"10.0.0.1:7100","state":"draining","tunnel":"10.0.0.1:7000"}"#
        );
        assert_eq!(parse_node("gw-a", j.as_bytes()).unwrap(), n);
        assert_eq!(parse_node("x", br#"{"peer":"nope"}"#), None);
        assert_eq!(
            parse_node(
                "x",
                br#"{"cores":4,"peer":"1.1.1.1:1","state":"sleepy","tunnel":"1.1.1.1:2"}"#
            ),
            None
        );
        // A field a newer node adds does not hide the node.
        let newer = r#"{"cores":4,"peer":"10.0.0.1:7100","state":"draining","tunnel":"10.0.0.1:7000","zone":"b"}"#;
        assert_eq!(parse_node("gw-a", newer.as_bytes()).unwrap(), n);
        let h = SessionHold {
            agent_id: 42,
            tcp: Vec::new(),
        };
        assert_eq!(hold_json(&h), r#"{"agent_id":42}"#);
        assert_eq!(parse_hold(hold_json(&h).as_bytes()), Some(h));
        // TCP ports ride along; an older reader ignores the field, an
        // older writer's hold reads as none.
        let t = SessionHold {
            agent_id: 42,
            tcp: vec![20001, 20000],
        };
        assert_eq!(hold_json(&t), r#"{"agent_id":42,"tcp":[20001,20000]}"#);
        assert_eq!(parse_hold(hold_json(&t).as_bytes()), Some(t));
        assert_eq!(parse_hold(br#"{"agent_id":42,"tcp":"x"}"#), None);
        assert_eq!(parse_hold(b"{}"), None);
    }

    #[test]
    fn the_model_follows_puts_and_deletes_and_ignores_strangers() {
        let node = r#"{"cores":2,"peer":"127.0.0.1:1","state":"ready","tunnel":"127.0.0.1:2"}"#;
        let mut m = Model::default();
        m.reset(
            5,
            &[
                kv("/ringtunnel/v1/nodes/a", node),
                kv("/ringtunnel/v1/nodes/b", node),
                kv("/ringtunnel/v1/sessions/demo/a", r#"{"agent_id":1}"#),
                kv("/ringtunnel/v1/sessions/demo/b", r#"{"agent_id":1}"#),
                kv("/ringtunnel/v1/sessions/bad/a", "garbage"),
                kv("/ringtunnel/v1/sessions/no-node", r#"{"agent_id":1}"#),
                kv("/ringtunnel/v1/nodes/UPPER", node),
                kv("/ringtunnel/v1/other", "x"),
            ],
        );
        let v = m.view();
        assert_eq!(v.revision, 5);
        assert_eq!(v.nodes.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(v.sessions.len(), 1);
        assert_eq!(v.sessions["demo"].len(), 2);
        assert_eq!(m.ignored, 4);
        assert_eq!(m.session_keys, 2);

        m.apply(
            7,
            &[
                Event::Delete {
                    key: b"/ringtunnel/v1/nodes/a".to_vec(),
                    mod_revision: 6,
                },
                Event::Delete {
                    key: b"/ringtunnel/v1/sessions/demo/a".to_vec(),
                    mod_revision: 7,
                },
                // A session key whose value turns bad is dropped.
                Event::Put(kv("/ringtunnel/v1/sessions/demo/b", "{}")),
            ],
        );
        let v = m.view();
        assert_eq!(v.revision, 7);
        assert_eq!(v.nodes.keys().collect::<Vec<_>>(), ["b"]);
        assert!(v.sessions.is_empty(), "{:?}", v.sessions);
        assert_eq!(m.session_keys, 0);
    }

    /// A fake etcd watch endpoint: answers the watch request with `body`
    /// (chunked, written in `pieces` with pauses), then keeps the stream
    /// open until the test ends.
    fn fake_watch(pieces: Vec<Vec<u8>>) -> (String, std::thread::JoinHandle<()>) {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap();
            for p in pieces {
                s.write_all(&p).unwrap();
                std::thread::sleep(Duration::from_millis(30));
            }
            // Open, silent, until the client goes.
            let _ = s.read(&mut buf);
        });
        (url, t)
    }

    fn chunk(msg: &str) -> Vec<u8> {
        format!("{:x}\r\n{msg}\n\r\n", msg.len() + 1).into_bytes()
    }

    fn put_event(rev: i64, key: &str, value: &str) -> String {
        use super::super::etcd::b64_encode;
        format!(
            r#"{{"result":{{"header":{{"revision":"{rev}"}},"events":[{{"kv":{{"key":"{}","mod_revision":"{rev}","value":"{}"}}}}]}}}}"#,
            b64_encode(key.as_bytes()),
            b64_encode(value.as_bytes())
        )
    }

    /// Runs a watcher on `url` until `until` holds for the published
    /// views (or 5 s); returns every view published.
    fn watch_views(
        url: &str,
        until: impl Fn(&[Arc<ClusterView>]) -> bool,
    ) -> Vec<Arc<ClusterView>> {
        let views = Arc::new(Mutex::new(Vec::new()));
        let v = views.clone();
        let mut w = Watcher {
            client: Client::new(&[url.to_string()], Timeouts::default()).unwrap(),
            ttl: Duration::from_secs(5),
            status: Arc::default(),
            publish: Box::new(move |view| v.lock().unwrap().push(view)),
            log: crate::limits::LogLimiter::new(Duration::from_secs(10)),
            model: Model::default(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let runner = std::thread::spawn(move || {
            let mut s = w.client.watch(PREFIX, 1, WATCH_POLL).unwrap();
            let _ = w.follow(&mut s, &st);
        });
        let t = Instant::now();
        while !until(&views.lock().unwrap()) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::SeqCst);
        runner.join().unwrap();
        let out = views.lock().unwrap().clone();
        out
    }

    #[test]
    fn messages_read_together_make_one_push() {
        let node = r#"{"cores":2,"peer":"127.0.0.1:1","state":"ready","tunnel":"127.0.0.1:2"}"#;
        // Created, then three events in ONE chunk (one read), then later
        // a fourth on its own.
        let three = [
            put_event(2, "/ringtunnel/v1/nodes/a", node),
            put_event(3, "/ringtunnel/v1/nodes/b", node),
            put_event(4, "/ringtunnel/v1/sessions/demo/a", r#"{"agent_id":1}"#),
        ]
        .join("\n");
        let created = r#"{"result":{"header":{"revision":"1"},"created":true}}"#;
        let mut first = chunk(created);
        first.extend(chunk(&three));
        let (url, server) = fake_watch(vec![
            first,
            chunk(&put_event(
                5,
                "/ringtunnel/v1/sessions/x/b",
                r#"{"agent_id":2}"#,
            )),
        ]);
        let views = watch_views(&url, |v| v.last().is_some_and(|v| v.revision == 5));
        server.join().unwrap();
        let revs: Vec<i64> = views.iter().map(|v| v.revision).collect();
        assert_eq!(revs, [4, 5], "one push per batch read");
        assert_eq!(views[0].nodes.len(), 2);
        assert_eq!(views[1].sessions.len(), 2);
    }

    #[test]
    fn a_watch_split_at_odd_bytes_still_reads_whole_messages() {
        let node = r#"{"cores":2,"peer":"127.0.0.1:1","state":"ready","tunnel":"127.0.0.1:2"}"#;
        let wire = chunk(&put_event(7, "/ringtunnel/v1/nodes/a", node));
        // 1 byte, then 5, then the rest: each a separate write.
        let pieces = vec![wire[..1].to_vec(), wire[1..6].to_vec(), wire[6..].to_vec()];
        let (url, server) = fake_watch(pieces);
        let views = watch_views(&url, |v| !v.is_empty());
        server.join().unwrap();
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].revision, 7);
        assert!(views[0].nodes.contains_key("a"));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..7).map(|_| b.fail()).collect();
        assert_eq!(waits[0], BACKOFF_FIRST);
        assert_eq!(waits[1], BACKOFF_FIRST * 2);
        assert_eq!(*waits.last().unwrap(), BACKOFF_CAP);
        b.reset();
        assert_eq!(b.fail(), BACKOFF_FIRST);
    }

    #[test]
    fn the_handle_queues_commands_before_start() {
        let r = Registry::new(ClusterConfig {
            etcd: vec!["http://127.0.0.1:1".into()],
            node: "n".into(),
            peer_listen: "127.0.0.1:7100".into(),
            advertise: None,
            secret: "0123456789abcdef".into(),
            lease_ttl: Duration::from_secs(3),
        })
        .unwrap();
        let h = r.handle();
        h.hold("demo", 7, vec![20000]);
        h.release("demo");
        h.set_state(NodeState::Draining);
        assert_eq!(h.status().state(), NodeState::Draining);
        assert_eq!(r.rx.as_ref().unwrap().len(), 3);
        assert!(!h.status().etcd_up());
    }
}
