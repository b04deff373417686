//! The agent: uplinks to the gateway and the backend side of streams.
//!
//! Sharded like the gateway: agent core `i` owns uplinks `i, i+N, ...`,
//! its own backend connection pool and its own concurrency limit. An
//! uplink is kept alive by a loop that reconnects with exponential backoff
//! and jitter; streams in flight when it drops fail cleanly (the gateway
//! answers 502 or closes), new ones go to the other uplinks meanwhile.
//!
//! Stopping (SIGTERM, Ctrl-C) drains: each uplink sends GOAWAY, so the
//! gateway routes no new request to it, and closes once its streams are
//! done or `--shutdown-grace` has passed. With the gateway's session lease
//! a restarted agent (same id: see `agent_id`) takes its name back and
//! the requests held meanwhile go to it.
//!
//! In a cluster (an ACCEPT lists nodes) the uplinks are K node slots of
//! `--uplinks` each; `nodes.rs` says which node each slot uses, and the
//! keepers move an uplink make-before-break: the replacement is accepted
//! before the old one drains (on REHOME from a draining node, on a node
//! that failed, or when a better-ranked node is back).
//!
//! What the user sees: the first ACCEPT carries the gateway's public
//! endpoint, from which [`forwarding_line`] says where the app is
//! reachable; each request ends with one INFO line (target
//! `ringtunnel::request`, off with `--quiet`), and backend failures with a
//! WARN naming the backend (`backend.rs`).

mod backend;
mod nodes;
mod tcp;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use monoio::net::TcpStream;
use rustls::pki_types::ServerName;

use crate::config::AgentConfig;
use crate::io::stats::CoreStats;
use crate::io::transport::{Transport, UplinkParams};
use crate::io::uplink::{Limits, Uplink};
use crate::io::watchdog::Watchdog;
use crate::proto::tcp::CAP_TCP;
use crate::proto::{
    ErrorCode, Frame, FrameType, Hello, PublicEndpoint, CAP_CLUSTER, CAP_PUBLIC_URL,
    PROTOCOL_VERSION,
};
use crate::runtime::mailbox::{mailbox, MailboxReceiver, MailboxSender};
use crate::runtime::notify::WaitList;

pub(crate) struct AgentShared {
    cfg: AgentConfig,
    gateway: std::net::SocketAddr,
    backend: std::net::SocketAddr,
    agent_id: u64,
    /// Total uplinks; 0 until known (from --uplinks or the first ACCEPT).
    total: AtomicUsize,
    stats: Vec<Arc<CoreStats>>,
    stop: AtomicBool,
    connected: AtomicUsize,
    /// Set when the gateway refused us, or TLS verification failed, for a
    /// reason retrying cannot fix.
    fatal: std::sync::Mutex<Option<String>>,
    /// TLS to the gateway, and the name its certificate must carry.
    tls: Option<(monoio_rustls::TlsConnector, ServerName<'static>)>,
    /// `--tcp` tunnels: local targets and the ports granted.
    tcp: tcp::TcpTunnels,
    /// The gateway's public endpoint from the first ACCEPT (`None` inside:
    /// a gateway that does not send it).
    public: OnceLock<Option<PublicEndpoint>>,
    /// The host part of `--gateway`, for hints.
    gateway_host: String,
    /// The request inspector's end on the data path (`--inspect`).
    pub(crate) recorder: Option<crate::inspect::Recorder>,
    inspect_addr: Option<std::net::SocketAddr>,
    /// One per core: wakes the core's lifecycle waits (`AgentCore::events`)
    /// when `stop`, `total` or a slot's node changes, so nothing polls them.
    lifecycle: Vec<MailboxSender<()>>,
    /// Which cluster nodes the uplinks go to (`nodes.rs`); off on a single
    /// gateway. Locked when an uplink connects, ends or re-checks its
    /// target, never on the stream path.
    nodes: std::sync::Mutex<nodes::Nodes>,
}

impl AgentShared {
    /// `stop` or `total` changed: every core re-checks (and the main
    /// thread, which reports them).
    fn changed(&self) {
        for tx in &self.lifecycle {
            let _ = tx.send(());
        }
        crate::signals::nudge();
    }

    fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.changed();
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, nodes::Nodes> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the node placement; wakes every core's keepers when a
    /// slot's target changed.
    fn with_nodes<T>(&self, f: impl FnOnce(&mut nodes::Nodes) -> T) -> T {
        let (out, moved) = {
            let mut n = self.nodes();
            let before = n.epoch();
            let out = f(&mut n);
            (out, n.epoch() != before)
        };
        if moved {
            self.changed();
        }
        out
    }
}

impl crate::admin::StatsSource for AgentShared {
    fn role(&self) -> &'static str {
        "agent"
    }
    /// Ready while at least one uplink is accepted; draining once stopping.
    fn health(&self) -> (&'static str, &'static str) {
        if self.stop.load(Ordering::Relaxed) {
            ("503 Service Unavailable", "draining")
        } else if self.connected.load(Ordering::Relaxed) == 0 {
            ("503 Service Unavailable", "connecting")
        } else {
            ("200 OK", "ready")
        }
    }
    fn cores(&self) -> &[Arc<CoreStats>] {
        &self.stats
    }
    /// In a cluster: `nodes NAME NAME` (the nodes holding its uplinks).
    fn health_detail(&self) -> String {
        let n = self.nodes();
        if !n.is_on() {
            return String::new();
        }
        let on: String = n
            .on_nodes()
            .iter()
            .map(|(name, _)| format!(" {name}"))
            .collect();
        format!("nodes{on}\n")
    }
    fn extra_json(&self) -> String {
        self.nodes().json(std::time::Instant::now())
    }
}

/// One agent core's state.
pub(crate) struct AgentCore {
    pub(crate) index: usize,
    pub(crate) shared: Arc<AgentShared>,
    pub(crate) stats: Arc<CoreStats>,
    pub(crate) pool: RefCell<Vec<backend::BackendConn>>,
    /// Backend requests running now, and those waiting for a slot.
    pub(crate) running: Cell<usize>,
    pub(crate) waiting: Cell<usize>,
    pub(crate) slot_free: WaitList,
    /// Lifecycle waiters (the core's spawn loop, uplink keepers), woken
    /// when `AgentShared::changed` says so or a keeper ends.
    events: Waiters,
}

/// The tasks waiting on a core's lifecycle events, each listed once: a
/// task that waits again (an uplink that reconnects, however often) adds
/// nothing, so the list is bounded by the core's lifecycle tasks (its
/// spawn loop and its uplink keepers).
#[derive(Default)]
struct Waiters(RefCell<Vec<std::task::Waker>>);

impl Waiters {
    fn register(&self, w: &std::task::Waker) {
        let mut v = self.0.borrow_mut();
        if !v.iter().any(|x| x.will_wake(w)) {
            v.push(w.clone());
        }
    }

    fn wake_all(&self) {
        let all = self.0.take();
        for w in all {
            w.wake();
        }
    }
}

impl AgentCore {
    pub(crate) fn cfg(&self) -> &AgentConfig {
        &self.shared.cfg
    }

    /// Resolves once `cond` holds; re-checked at every lifecycle event,
    /// never on a timer.
    async fn until(&self, cond: impl Fn() -> bool) {
        std::future::poll_fn(|cx| {
            if cond() {
                return std::task::Poll::Ready(());
            }
            self.events.register(cx.waker());
            std::task::Poll::Pending
        })
        .await
    }

    async fn stopped(&self) {
        self.until(|| self.shared.stop.load(Ordering::SeqCst)).await
    }
}

/// A running agent (in-process handle).
pub struct Agent {
    shared: Arc<AgentShared>,
    workers: Option<crate::runtime::Workers>,
    admin_addr: Option<std::net::SocketAddr>,
}

impl Agent {
    /// Uplinks currently accepted by the gateway.
    pub fn connected_uplinks(&self) -> usize {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// Why the agent gave up, as a sentence (the gateway refused it: bad
    /// token, bad session name, version; or the gateway failed TLS
    /// verification), if it did.
    pub fn fatal_error(&self) -> Option<String> {
        self.shared.fatal.lock().ok().and_then(|g| g.clone())
    }

    pub fn total_uplinks(&self) -> usize {
        self.shared.total.load(Ordering::SeqCst)
    }

    /// `Forwarding http://NAME.DOMAIN:PORT -> BACKEND` (with a hint when
    /// the gateway has no domain), once the first uplink is accepted.
    pub fn forwarding(&self) -> Option<String> {
        let s = &self.shared;
        if !s.cfg.http {
            return None;
        }
        let public = s.public.get()?;
        Some(forwarding_line(
            public.as_ref(),
            &s.cfg.session,
            &s.gateway_host,
            s.backend,
        ))
    }

    /// Where the admin endpoint listens (`--admin-listen`).
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin_addr
    }

    /// Where the request inspector listens (`--inspect`).
    pub fn inspect_addr(&self) -> Option<std::net::SocketAddr> {
        self.shared.inspect_addr
    }

    pub fn stop(mut self) {
        self.shared.request_stop();
        if let Some(w) = self.workers.take() {
            w.join();
        }
    }

    pub fn join(mut self) {
        if let Some(w) = self.workers.take() {
            w.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shared.request_stop();
        if let Some(w) = self.workers.take() {
            w.join();
        }
    }
}

/// What the agent prints once connected: where the public reaches the
/// session, and where requests go.
pub fn forwarding_line(
    public: Option<&PublicEndpoint>,
    session: &str,
    gateway_host: &str,
    backend: std::net::SocketAddr,
) -> String {
    match public {
        Some(p) => match p.url_for(session) {
            Some(url) => format!("Forwarding {url} -> {backend}"),
            None => format!(
                "Forwarding {scheme}://{session} -> {backend} (the gateway has no --domain: send \
                 'Host: {session}', e.g. curl -H 'Host: {session}' {scheme}://{gateway_host}:{port}/, \
                 or start the gateway with --domain or --default-session {session})",
                scheme = p.scheme,
                port = p.port,
            ),
        },
        None => format!(
            "Forwarding session {session} -> {backend} (this gateway does not announce its public \
             address: requests with Host '{session}' or '{session}.<its --domain>' reach it)"
        ),
    }
}

/// A readable session name for `ringtunnel http`: adjective, animal and 4
/// hex digits (`brave-otter-3f2a`), 16 bits of which come from the
/// kernel's random source, so two one-liners rarely pick the same name.
pub fn generated_name() -> String {
    const ADJ: [&str; 32] = [
        "amber", "brave", "calm", "clever", "cosmic", "crisp", "eager", "fancy", "gentle", "happy",
        "jolly", "keen", "lively", "lucky", "merry", "mighty", "nimble", "proud", "quick", "quiet",
        "rapid", "shiny", "silent", "sunny", "swift", "tidy", "vivid", "warm", "wise", "witty",
        "young", "zesty",
    ];
    const ANIMAL: [&str; 32] = [
        "badger", "beaver", "bison", "camel", "crane", "dingo", "eagle", "falcon", "ferret",
        "gecko", "heron", "ibex", "koala", "lemur", "lynx", "marten", "moose", "newt", "otter",
        "panda", "puffin", "quail", "raven", "salmon", "seal", "stoat", "tapir", "tiger", "viper",
        "walrus", "yak", "zebra",
    ];
    let mut b = [0u8; 8];
    // SAFETY: the buffer and its length are valid for writes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let r = if n == b.len() as isize {
        u64::from_ne_bytes(b)
    } else {
        random_u64()
    };
    format!(
        "{}-{}-{:04x}",
        ADJ[(r & 31) as usize],
        ANIMAL[((r >> 5) & 31) as usize],
        (r >> 16) & 0xffff
    )
}

/// The host of a `--gateway` address, without port or brackets.
fn host_of(addr: &str) -> String {
    match addr.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or("").to_string(),
        None => addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_string(),
    }
}

/// An id that stays the same when the same agent restarts (same host,
/// session and backend), so the gateway gives it its leased name back;
/// two agents of one host for one session but different backends differ.
fn derived_agent_id(cfg: &AgentConfig) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut name = [0u8; 256];
    // SAFETY: the buffer and its length are valid; gethostname
    // NUL-terminates within them (or truncates, which is fine for a hash).
    if unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } == 0 {
        h.update(name);
    }
    for part in [&cfg.session, &cfg.to, &cfg.gateway] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    // Other --tcp tunnels make another owner (the gateway keeps a
    // session's ports for its owner); none keeps the id of before.
    for t in &cfg.tcp {
        h.update(format!("tcp {}={}", t.local, t.remote).as_bytes());
    }
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Seed for reconnect jitter only.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

pub fn start(cfg: AgentConfig) -> std::io::Result<Agent> {
    cfg.validate()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    crate::runtime::raise_nofile_limit();
    let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let gateway_text = crate::config::gateway_addr(&cfg.gateway);
    let gateway = crate::runtime::resolve(&gateway_text)?;
    let backend = crate::runtime::resolve(&crate::config::backend_addr(&cfg.to).map_err(bad)?)?;
    let tls = match &cfg.tls {
        Some(files) => {
            let bad = |e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
            let config = crate::tls::client_config(files).map_err(bad)?;
            let name = crate::tls::server_name(files, &gateway_text).map_err(bad)?;
            Some((monoio_rustls::TlsConnector::from(config), name))
        }
        None => None,
    };
    let tcp_targets = cfg
        .tcp
        .iter()
        .map(|t| crate::runtime::resolve(&t.local))
        .collect::<std::io::Result<Vec<_>>>()?;
    if cfg.http {
        warn_if_nothing_listens(backend, &cfg.to);
    }
    let (recorder, inspect_addr) = match &cfg.inspect {
        Some(i) => {
            let (rec, store) = crate::inspect::channel(i.clone(), backend)?;
            let addr = crate::inspect::start(store)?;
            tracing::info!(%addr, "request inspector listening");
            (Some(rec), Some(addr))
        }
        None => (None, None),
    };
    let n = cfg.cores.cores;
    let (lifecycle, receivers): (Vec<_>, Vec<_>) = (0..n)
        .map(|_| {
            let (tx, rx) = mailbox::<()>();
            (tx, Some(rx))
        })
        .unzip();
    let shared = Arc::new(AgentShared {
        lifecycle,
        public: OnceLock::new(),
        gateway_host: host_of(&gateway_text),
        recorder,
        inspect_addr,
        total: AtomicUsize::new(cfg.uplinks.unwrap_or(0)),
        cfg: cfg.clone(),
        gateway,
        backend,
        agent_id: cfg.agent_id.unwrap_or_else(|| derived_agent_id(&cfg)),
        stats: (0..n).map(|_| Arc::new(CoreStats::default())).collect(),
        stop: AtomicBool::new(false),
        connected: AtomicUsize::new(0),
        fatal: std::sync::Mutex::new(None),
        tls,
        tcp: tcp::TcpTunnels::new(tcp_targets),
        nodes: std::sync::Mutex::new(nodes::Nodes::new(&cfg.session, cfg.nodes)),
    });
    let admin_addr = match &cfg.admin_listen {
        Some(a) => Some(crate::admin::start(
            a,
            shared.clone() as Arc<dyn crate::admin::StatsSource>,
        )?),
        None => None,
    };
    let sh = shared.clone();
    let receivers = std::sync::Mutex::new(receivers);
    let workers = crate::runtime::spawn_workers(&cfg.cores.spec("agent"), move |i| {
        let rx = receivers.lock().unwrap_or_else(|e| e.into_inner())[i]
            .take()
            .expect("one receiver per core");
        core_main(i, sh.clone(), rx)
    })?;
    Ok(Agent {
        shared,
        workers: Some(workers),
        admin_addr,
    })
}

/// `--to` is checked once at start: an app not started yet is normal
/// (requests get 502 until it is), but worth a line.
fn warn_if_nothing_listens(backend: std::net::SocketAddr, to: &str) {
    if let Err(e) = std::net::TcpStream::connect_timeout(&backend, Duration::from_secs(1)) {
        tracing::warn!(
            "nothing answers on {backend} (--to {to}) yet: {e}; requests will get 502 until \
             the app listens there"
        );
    }
}

async fn core_main(index: usize, shared: Arc<AgentShared>, events: MailboxReceiver<()>) {
    let core = Rc::new(AgentCore {
        index,
        stats: shared.stats[index].clone(),
        shared: shared.clone(),
        pool: RefCell::new(Vec::new()),
        running: Cell::new(0),
        waiting: Cell::new(0),
        slot_free: WaitList::new(),
        events: Waiters::default(),
    });
    // Lifecycle messages from other threads wake this core's waiters. The
    // task is dropped with the runtime when this function returns.
    let c = core.clone();
    crate::runtime::spawn_isolated("agent-lifecycle", async move {
        while events.recv().await.is_some() {
            c.events.wake_all();
        }
    });
    let cores = shared.cfg.cores.cores;
    // Until the first ACCEPT says how many cores the gateway has, only
    // uplink 0 connects; then every core opens its share.
    if index != 0 {
        core.until(|| {
            shared.total.load(Ordering::SeqCst) != 0 || shared.stop.load(Ordering::SeqCst)
        })
        .await;
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
    }
    let live = Rc::new(Cell::new(0usize));
    let mut next = index;
    loop {
        let total = shared.total.load(Ordering::SeqCst).max(1);
        while next < total {
            let c = core.clone();
            let l = live.clone();
            let k = next;
            l.set(l.get() + 1);
            crate::runtime::spawn_isolated("uplink-keeper", async move {
                keep_uplink(c.clone(), k).await;
                l.set(l.get() - 1);
                c.events.wake_all();
            });
            next += cores;
        }
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        // Woken when `total` grows (first ACCEPT) or the agent stops.
        let seen = total;
        core.until(|| {
            shared.total.load(Ordering::SeqCst).max(1) != seen || shared.stop.load(Ordering::SeqCst)
        })
        .await;
    }
    // Own the tasks until they end (block_on would drop them otherwise).
    core.until(|| live.get() == 0).await;
}

/// One accepted uplink and the node it is on (its ACCEPT's first node;
/// `None` from a gateway outside any cluster).
struct Held {
    up: Rc<Uplink>,
    node: Option<String>,
}

/// Counts `h` out: it has closed (or is about to, after `drain`).
/// `counted`: it is still in `connected` (an uplink being moved left it
/// when its replacement was accepted, so each uplink index counts once).
fn release(core: &AgentCore, k: usize, h: &Held, counted: bool) {
    if counted {
        core.shared.connected.fetch_sub(1, Ordering::SeqCst);
    }
    if let Some(node) = &h.node {
        core.shared.with_nodes(|n| n.released(k, node));
    }
    crate::signals::nudge();
}

/// One old uplink finishing after a move, counted in its keeper's
/// `moving` until dropped (however its task ends: a panic too).
struct Moving {
    core: Rc<AgentCore>,
    count: Rc<Cell<usize>>,
}

impl Moving {
    fn start(core: &Rc<AgentCore>, count: &Rc<Cell<usize>>) -> Self {
        count.set(count.get() + 1);
        Moving {
            core: core.clone(),
            count: count.clone(),
        }
    }
}

impl Drop for Moving {
    fn drop(&mut self) {
        self.count.set(self.count.get() - 1);
        self.core.events.wake_all();
    }
}

/// Connects, handshakes and serves uplink `k` until stopped; reconnects
/// with exponential backoff (100 ms doubling to `reconnect_max`) and
/// +-50% jitter so that many agents do not reconnect in lockstep.
///
/// In a cluster (`nodes.rs`) the uplink goes to its slot's node. When that
/// target changes (its node failed, was excluded, or a better-ranked node
/// is usable again) or the node it is on says REHOME (draining), the
/// keeper opens the replacement first, and only once that is accepted
/// lets the old uplink finish its streams and close (`drain`): a move
/// loses nothing. A node that cannot be reached, refuses, or whose uplink
/// drops is excluded, and the slot tries its next-ranked node at once.
async fn keep_uplink(core: Rc<AgentCore>, k: usize) {
    let shared = core.shared.clone();
    let mut backoff = Duration::from_millis(100);
    // Not the agent id alone: a restarted agent has the same one, and its
    // uplinks should not retry in the same rhythm as before.
    let mut seed = random_u64() ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut current: Option<Held> = None;
    // Old uplinks still finishing their streams after a move: the keeper
    // outlives them (the core's main future owns only the keepers).
    let moving = Rc::new(Cell::new(0usize));
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            if let Some(h) = current.take() {
                if !h.up.is_closed() {
                    drain(&core, &h.up, "agent stopping").await;
                }
                release(&core, k, &h, true);
                tracing::debug!(uplink = k, "uplink closed: agent stopping");
            }
            core.until(|| moving.get() == 0).await;
            return;
        }
        let mut target = shared.with_nodes(|n| n.target(k, Instant::now()));
        let why = if let Some(h) = current.as_ref().filter(|h| h.up.is_closed()) {
            let reason = h.up.close_reason().unwrap_or_else(|| "closed".into());
            let why = format!("uplink lost ({reason})");
            let on_node = h.node.clone();
            release(&core, k, h, true);
            current = None;
            if let Some(node) = on_node {
                // Its node is suspect: excluded, and the slot's next node
                // is tried at once. Only nodes not excluded are tried so,
                // each at most once per exclusion; --gateway is tried
                // after the usual backoff.
                let next = shared.with_nodes(|n| {
                    n.exclude(&node, &why, Instant::now());
                    n.target(k, Instant::now())
                });
                if let Some(next) = next {
                    tracing::warn!(
                        "{why}; uplink {k}: node {node} excluded, trying {}",
                        next.name
                    );
                    continue;
                }
            }
            // Not excluded below: that is for a node a connect failed to.
            target = None;
            why
        } else {
            if let Some(h) = &current {
                let cluster = shared.nodes().is_on();
                let rehome = cluster && !h.up.is_open() && h.up.peer_goaway().is_some();
                if rehome {
                    if let Some(node) = &h.node {
                        let code = h.up.peer_goaway().map_or(String::new(), |c| c.to_string());
                        target = shared.with_nodes(|n| {
                            n.exclude(
                                node,
                                &format!("node asked to move ({code})"),
                                Instant::now(),
                            );
                            n.target(k, Instant::now())
                        });
                    }
                }
                let misplaced = match (&target, &h.node) {
                    (Some(t), Some(n)) => t.name != *n,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                let refresh = shared.nodes().refresh(k, Instant::now());
                if refresh.is_ok() {
                    tracing::debug!(uplink = k, "re-dialling for a fresh node list");
                }
                if !(rehome || (cluster && misplaced) || refresh.is_ok()) {
                    // Until it closes, the agent stops, the slot's target
                    // changes or the node starts draining (all events),
                    // or an exclusion runs out (no event: a timer), after
                    // which a node back from it may rank first again.
                    let (epoch, expiry) = {
                        let n = shared.nodes();
                        (n.epoch(), n.next_expiry(Instant::now()))
                    };
                    let up = h.up.clone();
                    // Neither an exclusion running nor a refresh due: a
                    // timer that never matters.
                    let next = match (expiry, refresh.err().flatten()) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    let tick =
                        next.map_or(Duration::from_secs(3600), |d| d + Duration::from_millis(1));
                    let sh = shared.clone();
                    monoio::select! {
                        _ = up.wait_closed() => {}
                        _ = core.until(|| {
                            sh.stop.load(Ordering::SeqCst)
                                || (cluster && !up.is_open())
                                || sh.nodes().epoch() != epoch
                        }) => {}
                        _ = monoio::time::sleep(tick) => {}
                    }
                    continue;
                }
            }
            let dest = target.as_ref().map_or(shared.gateway, |t| t.addr);
            match connect_uplink(&core, k, dest).await {
                Ok((up, node)) => {
                    backoff = Duration::from_millis(100);
                    if current.is_none() {
                        shared.connected.fetch_add(1, Ordering::SeqCst);
                    }
                    shared.with_nodes(|n| n.accepted(k, node.as_deref()));
                    crate::signals::nudge();
                    let new = Held { up, node };
                    if let Some(old) = current.replace(new) {
                        // The replacement is accepted: only now does the
                        // old uplink stop taking streams, finish those in
                        // flight and close.
                        let (from, to) = (
                            old.node.as_deref().unwrap_or("?"),
                            current
                                .as_ref()
                                .and_then(|h| h.node.as_deref())
                                .unwrap_or("?"),
                        );
                        if from == to {
                            tracing::debug!(uplink = k, node = from, "uplink re-dialled");
                        } else {
                            tracing::info!(uplink = k, from, to, "uplink moved");
                        }
                        let c = core.clone();
                        let done = Moving::start(&core, &moving);
                        crate::runtime::spawn_isolated("uplink-move", async move {
                            let _done = done;
                            if !old.up.is_closed() {
                                drain(&c, &old.up, "uplink moved to another node").await;
                            }
                            release(&c, k, &old, false);
                        });
                    }
                    continue;
                }
                Err(Refused(e, code)) => {
                    // A wrong token, an invalid name or another protocol
                    // version will not fix itself: stop instead of hammering
                    // the gateway (`main` says why, once). A taken name or a
                    // busy gateway might.
                    let why = format!("gateway refused the uplink: {e}");
                    if matches!(
                        code,
                        ErrorCode::AuthFailed
                            | ErrorCode::BadSession
                            | ErrorCode::UnsupportedVersion
                            | ErrorCode::ProtocolError
                            | ErrorCode::PortRefused
                    ) {
                        give_up(&core, why);
                        continue;
                    }
                    why
                }
                Err(Fatal(e)) => {
                    // A certificate the agent does not trust (or the gateway's
                    // verdict on ours), or a port that is not a tunnel port,
                    // stays so until someone changes files or flags.
                    give_up(&core, e);
                    continue;
                }
                Err(Retry(e)) => format!("cannot reach the gateway: {e}"),
            }
        };
        if shared.stop.load(Ordering::SeqCst) {
            continue;
        }
        // A node that failed is excluded; if that gives the slot another
        // target, try it now rather than after a backoff.
        if let Some(t) = &target {
            let next = shared.with_nodes(|n| {
                n.exclude(&t.name, &why, Instant::now());
                n.target(k, Instant::now())
            });
            if next.as_ref() != Some(t) {
                tracing::warn!(
                    "{why}; uplink {k}: node {} excluded, trying {}",
                    t.name,
                    next.as_ref()
                        .map_or("--gateway".to_string(), |n| n.name.clone())
                );
                continue;
            }
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let jitter = 0.5 + (seed % 1000) as f64 / 1000.0;
        let wait = backoff.mul_f64(jitter);
        tracing::warn!(
            "{why}; uplink {k} reconnects to {} in {:.1} s",
            target.as_ref().map_or(shared.gateway, |t| t.addr),
            wait.as_secs_f64()
        );
        monoio::select! {
            _ = monoio::time::sleep(wait) => {}
            _ = core.stopped() => {}
        }
        backoff = (backoff * 2).min(core.cfg().reconnect_max);
    }
}

/// After GOAWAY, how long an uplink must stay without streams before it
/// closes: OPENs the gateway sent before it saw the GOAWAY may still be on
/// the wire, and are served (see `proto::conn`, `on_open`).
const DRAIN_SETTLE: Duration = Duration::from_millis(250);

/// Graceful stop of one uplink: GOAWAY, then wait until its streams are
/// done (and stay so for `DRAIN_SETTLE`) or the grace period ends, then
/// close.
async fn drain(core: &AgentCore, up: &Rc<Uplink>, why: &str) {
    up.go_away(ErrorCode::Shutdown, why);
    let start = std::time::Instant::now();
    let deadline = start + core.cfg().shutdown_grace;
    let mut idle_since: Option<std::time::Instant> = None;
    while !up.is_closed() {
        let now = std::time::Instant::now();
        if now >= deadline {
            tracing::warn!(
                uplink = up.id,
                streams = up.active_streams(),
                "shutdown grace over: closing with streams in flight"
            );
            break;
        }
        if up.is_idle() {
            let since = *idle_since.get_or_insert(now);
            if now.duration_since(since) >= DRAIN_SETTLE {
                break;
            }
        } else {
            idle_since = None;
        }
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the writer flush the last frames before the socket goes.
    monoio::time::sleep(Duration::from_millis(20)).await;
    up.close_now(why);
}

/// Stops every uplink of this agent; `main` prints `why` and exits.
fn give_up(core: &AgentCore, why: String) {
    if let Ok(mut g) = core.shared.fatal.lock() {
        g.get_or_insert(why);
    }
    core.shared.request_stop();
}

enum ConnectError {
    /// Network trouble or a gateway that did not answer: retry.
    Retry(String),
    /// REFUSE from the gateway; its code decides whether to retry.
    Refused(String, ErrorCode),
    /// A verdict retrying cannot change (TLS verification, either way; a
    /// port that is not a tunnel port), as a whole sentence.
    Fatal(String),
}
use ConnectError::{Fatal, Refused, Retry};

/// An HTTP server's answer: the agent was pointed at a public HTTP port.
/// (Read as a frame header, "HTTP" is a 1.2 GB length.)
fn looks_like_http(b: &[u8]) -> bool {
    b.starts_with(b"HTTP/1.")
}

/// The first bytes of a TLS record (an alert or a handshake message,
/// versions 3.x), as a TLS gateway answers a plaintext HELLO.
fn looks_like_tls(b: &[u8]) -> bool {
    b.len() >= 3 && matches!(b[0], 0x15 | 0x16) && b[1] == 3
}

/// Sorts a failed handshake read: TLS verdicts and a TLS answer to a
/// plaintext agent are fatal, the rest is retried.
fn handshake_error(
    core: &AgentCore,
    conn_is_tls: bool,
    e: std::io::Error,
    got: &[u8],
) -> ConnectError {
    if conn_is_tls {
        if let Some((_, name)) = &core.shared.tls {
            if let Some(why) = crate::tls::agent_fatal(&e, name) {
                return Fatal(format!("TLS with the gateway failed: {why}"));
            }
        }
    } else if looks_like_http(got) {
        return Fatal(format!(
            "{} is an HTTP port, not a tunnel port: point --gateway at the gateway's \
             --tunnel-listen port (7000 by default)",
            core.shared.gateway
        ));
    } else if looks_like_tls(got) {
        return Fatal(
            "TLS with the gateway failed: the gateway answered with TLS; start the agent \
             with --tls (system roots) or --ca FILE"
                .into(),
        );
    }
    Retry(e.to_string())
}

/// Connects uplink `k` to `dest` (`--gateway`, or a cluster node's
/// tunnel address) and runs the handshake. Returns the uplink and the
/// node it landed on (the ACCEPT's first node: a clustered gateway lists
/// itself first).
async fn connect_uplink(
    core: &Rc<AgentCore>,
    k: usize,
    dest: std::net::SocketAddr,
) -> Result<(Rc<Uplink>, Option<String>), ConnectError> {
    let cfg = core.cfg();
    let stream =
        match monoio::time::timeout(cfg.connect_timeout, TcpStream::connect_addr(dest)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(Retry(e.to_string())),
            Err(_) => return Err(Retry("connect timed out".into())),
        };
    // In a cluster each node sees its share: index and total per node.
    let (index, total) = {
        let n = core.shared.nodes();
        if n.is_on() {
            let per = n.per_node();
            (k % per, per)
        } else {
            (k, core.shared.total.load(Ordering::SeqCst))
        }
    };
    let hello = Hello {
        version: PROTOCOL_VERSION,
        // It prints the URL the gateway announces, and keeps uplinks on
        // several nodes when the gateway is part of a cluster.
        capabilities: CAP_PUBLIC_URL | CAP_CLUSTER | if cfg.tcp.is_empty() { 0 } else { CAP_TCP },
        agent_id: core.shared.agent_id,
        uplink_index: index as u16,
        uplinks_total: total.max(index + 1) as u16,
        token: cfg.token.clone(),
        session: cfg.session.clone(),
        tcp: cfg.tcp.iter().map(|t| t.remote).collect(),
    };
    // A gateway that accepts the connection and never answers must not
    // hold this uplink: the watchdog shuts the socket down at the deadline.
    // One deadline covers TLS and HELLO/ACCEPT together.
    let wd = Watchdog::start(std::os::fd::AsRawFd::as_raw_fd(&stream), libc::SHUT_RDWR);
    wd.arm(cfg.handshake_timeout);
    wd.arm_write(cfg.handshake_timeout);
    let timed_out = || {
        Retry(format!(
            "no handshake answer within {} s",
            cfg.handshake_timeout.as_secs_f64()
        ))
    };
    let mut conn = match &core.shared.tls {
        None => Transport::plain(stream),
        Some((connector, name)) => {
            match Transport::connect_tls(stream, connector, name.clone()).await {
                Ok(t) => t,
                Err(_) if wd.fired() => return Err(timed_out()),
                Err(e) => return Err(handshake_error(core, true, e, &[])),
            }
        }
    };
    let sent = conn.write_frame(&Frame::hello(&hello)).await;
    let (res, leftover) = match sent {
        Ok(()) => {
            conn.read_frame(BytesMut::with_capacity(4096), 64 * 1024)
                .await
        }
        Err(e) => (Err(e), BytesMut::new()),
    };
    let fired = wd.fired();
    drop(wd);
    if fired {
        return Err(timed_out());
    }
    let f = match res {
        Ok(f) => f,
        Err(e) => return Err(handshake_error(core, conn.is_tls(), e, &leftover)),
    };
    match f.kind {
        FrameType::Accept => {}
        FrameType::Refuse => {
            let (code, reason) = f.parse_refuse().map_err(|e| Retry(e.to_string()))?;
            return Err(Refused(format!("{reason} ({code})"), code));
        }
        other => return Err(Retry(format!("unexpected {other:?} in handshake"))),
    }
    let acc = f.parse_accept().map_err(|e| Retry(e.to_string()))?;
    if !cfg.tcp.is_empty() {
        if acc.capabilities & CAP_TCP == 0 || acc.tcp.len() != cfg.tcp.len() {
            return Err(Refused(
                "the gateway does not offer TCP tunnels (a version without them)".into(),
                ErrorCode::PortRefused,
            ));
        }
        core.shared
            .tcp
            .accepted(&tcp::gateway_host(&cfg.gateway), &acc.tcp);
    }
    let _ = core.shared.public.set(acc.public.clone());
    let node = acc.nodes.first().map(|n| n.name.clone());
    let per_node = cfg.uplinks.unwrap_or(acc.gateway_cores.max(1) as usize);
    let grown = core
        .shared
        .with_nodes(|n| n.on_accept(&acc.nodes, per_node, Instant::now()));
    if let Some(t) = grown {
        // Cluster mode: K nodes x uplinks per node (only ever grows).
        if core.shared.total.fetch_max(t, Ordering::SeqCst) < t {
            core.shared.changed();
        }
    } else if core.shared.total.load(Ordering::SeqCst) == 0 {
        let t = cfg.uplinks.unwrap_or(acc.gateway_cores.max(1) as usize);
        if core
            .shared
            .total
            .compare_exchange(0, t, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            // The other cores wait for this to open their uplinks.
            core.shared.changed();
        }
    }
    tracing::info!(
        core = core.index,
        uplink = k,
        gateway_core = acc.core,
        node = node.as_deref().unwrap_or("-"),
        session = %cfg.session,
        tls = conn.is_tls(),
        "uplink accepted"
    );
    let limits = Limits {
        max_frame: acc.max_frame,
        stream_window: acc.stream_window,
        conn_window: acc.conn_window,
        max_streams: acc.max_streams,
    };
    let up = conn.start_uplink(
        leftover,
        UplinkParams {
            id: k as u64,
            core: core.index,
            session: cfg.session.clone(),
            role: crate::proto::Role::Agent,
            limits,
            heartbeat: cfg.heartbeat,
            stats: core.stats.clone(),
        },
    );
    let c = core.clone();
    up.set_open_handler(move |stream, head| {
        let c = c.clone();
        if crate::proto::tcp::is_tcp_open(&head) {
            crate::runtime::spawn_isolated("agent-tcp-stream", async move {
                tcp::serve_stream(c, stream, head).await;
            });
            return;
        }
        crate::runtime::spawn_isolated("agent-stream", async move {
            backend::serve_stream(c, stream, head).await;
        });
    });
    // A node that starts draining (REHOME) wakes this uplink's keeper.
    let c = core.clone();
    up.set_drain_handler(move || c.events.wake_all());
    Ok((up, node))
}
