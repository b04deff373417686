//! The gateway: public HTTP listener, uplink listener, per-core session
//! tables and the session directory.
//!
//! Every core runs the same `core_main`: its own SO_REUSEPORT listeners
//! (public, HTTPS if configured, and tunnel), its mailbox, and the uplinks placed on it. A
//! session's uplinks on this core live in `Core::sessions` (plain
//! `RefCell`); which *other* cores hold the session is a per-core replica
//! (`Core::replica`) updated by directory messages, read once per new
//! public request and never per frame.
//!
//! The only lock is `Shared::claims` (`claims.rs`), taken when an uplink
//! connects, starts draining or goes away: it keeps a session name owned
//! by one token and agent, counts uplinks per core for placement, and
//! keeps the name leased to its owner for a while after the last uplink
//! went. Whether a name is reserved reaches every core as a `Lease`
//! message (sent under that lock, so in its order) and lives in the
//! per-core `Core::leases` replica: a request whose session no core holds
//! decides there, without a lock, whether it waits for the owner
//! (`Core::hold`) or gets 502.
//!
//! A core announces a session as present while it holds an uplink of it
//! that takes new streams: an uplink that got or sent GOAWAY is withdrawn
//! from routing at once, even though its streams in flight go on.
//!
//! What a SIGHUP reload may change (tokens with their scopes and limits,
//! the tunnel's TLS configuration, the HTTPS edge's certificates, and the
//! edge limits and timeouts of
//! `config::RELOADABLE`) is `Shared::live`: an `Arc<Live>` swapped whole
//! under a `RwLock`, read once per uplink handshake and once per session
//! per core (its rates), never on the frame or request path. Each core
//! keeps its own copy of the effective configuration (`Core::cfg`, an
//! `Rc` replaced by the `Reloaded` message), read once per connection or
//! request; connection limits are atomics in `crate::limits`. Everything
//! else in `Shared::cfg` is fixed at start-up.

mod claims;
pub(crate) mod guard;
mod https;
mod public;
mod tcp;
mod tunnel;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;

use crate::config::GatewayConfig;
use crate::http::Scheme;
use crate::io::stats::{CoreStats, SessionWindows, WindowWriter};
use crate::io::uplink::Uplink;
use crate::proto::Hello;
use crate::runtime::mailbox::{mailbox, MailboxReceiver, MailboxSender};
use crate::runtime::notify::{Notify, WaitList};
use claims::{Claims, LeaseReplica, Reservation};

/// Messages between gateway cores.
pub(crate) enum CoreMsg {
    /// A public connection to serve here: its socket and the bytes already
    /// read from it (at least one request head). The socket is TCP, or
    /// for an HTTPS connection the plaintext end of the `socketpair`
    /// through which its TLS core relays it (`https.rs`): either is a
    /// stream socket served the same way.
    ///
    /// `client` is the client as the first core saw it: the PROXY header's
    /// source under `--proxy-protocol` (consumed there, not in `buf`),
    /// else the socket peer.
    Public {
        fd: RawFd,
        buf: Bytes,
        client: SocketAddr,
        scheme: Scheme,
        hops: u8,
        /// Its slot in the connection limits, released wherever it closes.
        permit: crate::limits::ConnPermit,
    },
    /// An uplink placed on this core after its handshake elsewhere.
    Uplink {
        fd: RawFd,
        leftover: Bytes,
        hello: Hello,
        id: u64,
        /// TCP tunnel ports granted to the session (for ACCEPT).
        tcp: Vec<u16>,
    },
    /// Directory replica update: `core` now does / no longer holds `session`.
    Directory {
        session: String,
        core: usize,
        present: bool,
    },
    /// Lease replica update: whether `session` is reserved now changed.
    Lease {
        session: String,
        state: Reservation,
    },
    /// The configuration was reloaded: take the new effective settings,
    /// forget cached rates, and close this core's uplinks whose claim's
    /// token no longer covers their session; then say so on the channel.
    Reloaded(crossbeam_channel::Sender<()>),
    /// A TCP tunnel port was opened: accept on it here too.
    TcpListen(Arc<tcp::PortListener>),
    /// A TCP tunnel connection to serve here (no uplink of its session on
    /// the core that accepted it).
    TcpConn {
        fd: std::os::fd::OwnedFd,
        peer: SocketAddr,
        slot: tcp::TcpSlot,
    },
    /// The cluster view changed (control plane, `cluster::registry`): the
    /// core swaps its snapshot.
    Cluster(Arc<crate::cluster::ClusterView>),
    Shutdown,
}

/// The part of the configuration a reload replaces (`Gateway::reload`).
pub(crate) struct Live {
    /// Accepted agent tokens and their scopes; empty = open gateway.
    pub(crate) tokens: Vec<crate::scope::TokenRule>,
    /// TLS on the tunnel listener; `None` = plaintext uplinks. A new
    /// acceptor only affects handshakes that start after the swap.
    pub(crate) tls: Option<monoio_rustls::TlsAcceptor>,
    /// The effective configuration: the start-up one with the reloadable
    /// settings of the last reload (`GatewayConfig::with_reloaded`).
    pub(crate) cfg: GatewayConfig,
    /// TLS of the public HTTPS listener (certificates by SNI); `None`
    /// without `--https-listen`. Same swap rule as `tls`.
    pub(crate) https: Option<monoio_rustls::TlsAcceptor>,
}

impl Live {
    /// `cfg`: the effective configuration (already merged).
    fn from_cfg(cfg: &GatewayConfig) -> Result<Live, String> {
        // Certificates are loaded before anything is swapped, so a bad
        // file leaves the running configuration untouched.
        let tls = match &cfg.tunnel_tls {
            Some(files) => Some(monoio_rustls::TlsAcceptor::from(crate::tls::server_config(
                files,
            )?)),
            None => None,
        };
        let https = match &cfg.https_listen {
            Some(_) => Some(monoio_rustls::TlsAcceptor::from(
                crate::sni::edge_server_config(&cfg.https_certs)?,
            )),
            None => None,
        };
        Ok(Live {
            tokens: cfg.tokens.clone(),
            tls,
            cfg: cfg.clone(),
            https,
        })
    }
}

/// State shared by all cores of one gateway (Send + Sync).
pub(crate) struct Shared {
    pub(crate) cfg: GatewayConfig,
    pub(crate) mailboxes: Vec<MailboxSender<CoreMsg>>,
    claims: Mutex<Claims>,
    /// Times `claims` was locked: a diagnostic that lets a test show the
    /// request path never takes it.
    claims_locked: AtomicU64,
    pub(crate) stats: Vec<Arc<CoreStats>>,
    next_uplink: AtomicU64,
    pub(crate) shutting_down: AtomicBool,
    /// `None`: `--listen off` (HTTPS only).
    pub(crate) public_addr: Option<SocketAddr>,
    pub(crate) https_addr: Option<SocketAddr>,
    pub(crate) tunnel_addr: SocketAddr,
    /// In a cluster: where agents reach this node's tunnel listener
    /// (`tunnel::advertised_tunnel`), listed in ACCEPT.
    pub(crate) advertised_tunnel: Option<SocketAddr>,
    /// The peer listener (`--peer-listen`), in a cluster only.
    pub(crate) peer_addr: Option<SocketAddr>,
    /// Tokens and TLS, replaced by reloads. Read with [`Shared::live`].
    live: RwLock<Arc<Live>>,
    pub(crate) limits: crate::limits::GatewayLimits,
    /// Open TCP tunnel ports (`tcp.rs`); locked after `claims`, never
    /// before.
    tcp: Mutex<HashMap<u16, Arc<tcp::PortListener>>>,
    tcp_counters: tcp::TcpCounters,
    /// TCP ports the last cluster view shows held by other nodes, with
    /// their session (`tcp::Shared::sync_cluster_tcp`); empty outside a
    /// cluster.
    remote_tcp: Mutex<HashMap<u16, String>>,
    /// Per core: the sessions' last-minute windows (dashboard, /stats).
    pub(crate) windows: Vec<Arc<SessionWindows>>,
    /// The cluster registry (`--cluster-etcd`); `None`: a single node.
    pub(crate) cluster: Option<crate::cluster::registry::RegistryHandle>,
}

impl Shared {
    /// A fresh uplink id (agents' uplinks and peer links share them).
    pub(crate) fn next_uplink_id(&self) -> u64 {
        self.next_uplink.fetch_add(1, Ordering::Relaxed)
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.claims_locked.fetch_add(1, Ordering::Relaxed);
        self.claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A live uplink of `session` on `core` stopped taking new streams.
    fn drain(&self, session: &str, core: usize) {
        self.claims().drain(session, core);
    }

    /// An uplink of `session` on `core` closed (`drained`: after `drain`).
    fn release(&self, session: &str, core: usize, drained: bool) {
        self.update_claims(session, |c, now| {
            c.release(session, core, drained, now);
            // Without a lease the claim, and its TCP ports, end now.
            self.sync_tcp(c);
            self.register_hold(c, session);
        });
    }

    /// Tells the cluster registry whether this node holds `session`:
    /// registered while at least one uplink of it is connected here (live
    /// or draining), withdrawn when the last one goes. Called under the
    /// claims lock after every change of the count, so the registry gets
    /// the holds and releases in the claims' order; it only queues them
    /// (`RegistryHandle` never blocks).
    ///
    /// Not during the local lease (`--session-lease`, no uplink left):
    /// other nodes read a session key as "forward requests here", and a
    /// node with no uplink could only hold them or answer 502, while a node
    /// the agent has reconnected to can serve them. The lease keeps the
    /// name for its owner on this node only.
    fn register_hold(&self, c: &Claims, session: &str) {
        let Some(reg) = &self.cluster else {
            return;
        };
        match c.uplinks_of(session) {
            Some((n, agent)) if n > 0 => reg.hold(session, agent, c.ports_of(session)),
            _ => reg.release(session),
        }
    }

    /// Runs `f` on the registry and, still under its lock (so every core
    /// sees the changes in the registry's order), tells the cores if the
    /// reservation of `session` changed.
    fn update_claims<T>(&self, session: &str, f: impl FnOnce(&mut Claims, Instant) -> T) -> T {
        let now = Instant::now();
        let mut c = self.claims();
        let before = c.reservation(session, now);
        let out = f(&mut c, now);
        self.announce(&c, session, before, now);
        out
    }

    /// Tells the cores the reservation of `session` if it is no longer
    /// `before`. Called with the claims lock held (`c` is its guard).
    fn announce(&self, c: &Claims, session: &str, before: Reservation, now: Instant) {
        let after = c.reservation(session, now);
        if after != before {
            self.broadcast(|| CoreMsg::Lease {
                session: session.to_string(),
                state: after,
            });
        }
    }

    /// Uplinks per core of every session (for /stats).
    pub(crate) fn placement(&self) -> Vec<(String, Vec<u32>)> {
        self.claims().placement()
    }

    /// The current reloadable configuration. Take it once per handshake
    /// and keep the `Arc` for its duration.
    pub(crate) fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Tells every core that `live()` changed: each takes the new
    /// settings (`Core::reloaded`), forgets its cached rates, and closes
    /// (GOAWAY AUTH_FAILED) the uplinks whose claim's token no longer
    /// covers their session under the new tokens. Cores act on it from
    /// their mailbox, between other work; an uplink that connects
    /// meanwhile was already checked against the new tokens.
    ///
    /// Waits (up to a second) until every core has confirmed, so that once
    /// a reload is reported, every request that starts is judged by the
    /// new settings. Called by `Gateway::reload` on the caller's thread,
    /// never from a core (it would wait for itself).
    pub(crate) fn reload_cores(&self) {
        let (tx, rx) = crossbeam_channel::bounded(self.mailboxes.len());
        self.broadcast(|| CoreMsg::Reloaded(tx.clone()));
        drop(tx);
        let deadline = Instant::now() + std::time::Duration::from_secs(1);
        for _ in 0..self.mailboxes.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if rx.recv_timeout(left).is_err() {
                tracing::warn!("a core did not confirm the reload within 1 s; it applies it later");
                return;
            }
        }
    }

    /// Whether the uplinks of `session` (as claimed now) may stay under
    /// `tokens`. A session with no claim has nothing to revoke.
    fn claim_allowed(&self, session: &str, tokens: &[crate::scope::TokenRule]) -> bool {
        match self.claims().holder(session) {
            None => true,
            Some(claims::Holder::Rule(owner)) => {
                crate::scope::rule_still_allows(tokens, &owner, session)
            }
            // Claimed while the gateway was open: allowed while it still
            // is, or if the token now has a rule covering the session.
            Some(claims::Holder::Open(token)) => matches!(
                crate::scope::authorize(tokens, &token, session),
                crate::scope::Verdict::Open | crate::scope::Verdict::Rule(_)
            ),
        }
    }

    /// The hook for the cluster's control plane when this node starts
    /// draining (once, from `begin_shutdown`): `cluster::registry` marks
    /// the node `draining` in etcd from here, so peers and ACCEPTs stop
    /// listing it. The cores tell their agents REHOME themselves
    /// (`core_main`'s shutdown path).
    fn cluster_drain_begins(&self) {
        if let Some(c) = &self.cfg.cluster {
            tracing::info!(node = %c.node, "cluster node draining: agents are told to move (REHOME)");
        }
        if let Some(reg) = &self.cluster {
            reg.set_state(crate::cluster::NodeState::Draining);
        }
    }

    /// Forwarding counters per core (`cluster::peer`); nothing on a
    /// single node.
    fn cluster_metrics(&self) -> String {
        use std::fmt::Write;
        if self.cfg.cluster.is_none() {
            return String::new();
        }
        let mut out = String::new();
        type Series = (
            &'static str,
            &'static str,
            &'static str,
            fn(&CoreStats) -> &AtomicU64,
        );
        let series: [Series; 4] = [
            (
                "ringtunnel_forwarded_out_total",
                "Requests sent over a peer link to a node holding their session (each attempt).",
                "counter",
                |c| &c.forwarded_out,
            ),
            (
                "ringtunnel_forwarded_in_total",
                "Forwarded streams received from peer nodes.",
                "counter",
                |c| &c.forwarded_in,
            ),
            (
                "ringtunnel_forward_retries_total",
                "NOT_HERE answers after which a request went on to the next holder.",
                "counter",
                |c| &c.forward_retries,
            ),
            (
                "ringtunnel_peer_links",
                "Open peer links (dialed and accepted).",
                "gauge",
                |c| &c.peer_links,
            ),
        ];
        for (name, help, kind, f) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (i, c) in self.stats.iter().enumerate() {
                let _ = writeln!(out, "{name}{{core=\"{i}\"}} {}", CoreStats::get(f(c)));
            }
        }
        out
    }

    fn broadcast(&self, msg: impl Fn() -> CoreMsg) {
        for m in &self.mailboxes {
            let _ = m.send(msg());
        }
    }
}

#[derive(Default)]
struct LocalSession {
    uplinks: Vec<Rc<Uplink>>,
    next: Cell<usize>,
    /// What this core last told the directory: it holds an uplink of the
    /// session that takes new streams.
    announced: bool,
}

/// Requests of one session waiting on this core for an uplink.
#[derive(Default)]
struct HoldQueue {
    waiting: Cell<usize>,
    wake: WaitList,
}

/// Counts a request (served, held, forwarded or spliced) in its core's
/// `inflight` while it lives, so a stopping core waits for it; the last
/// one to end wakes the core's `idle`. Borrowed (`&Core`) inside a
/// request's task, owned (`Rc<Core>`) where the guard outlives a borrow.
pub(crate) struct InFlight<C: std::ops::Deref<Target = Core>>(C);

impl<C: std::ops::Deref<Target = Core>> InFlight<C> {
    pub(crate) fn enter(core: C) -> Self {
        core.inflight.set(core.inflight.get() + 1);
        InFlight(core)
    }
}

impl<C: std::ops::Deref<Target = Core>> Drop for InFlight<C> {
    fn drop(&mut self) {
        let core = &*self.0;
        core.inflight.set(core.inflight.get() - 1);
        if core.inflight.get() == 0 {
            core.idle.notify();
        }
    }
}

/// How a held request ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Held {
    /// Some core holds the session again: route as usual.
    Back,
    TimedOut,
    /// The queue of this session on this core is full.
    Full,
    /// The gateway is shutting down: answer at once rather than be
    /// dropped with the core.
    ShuttingDown,
}

/// One gateway core's state; never leaves its thread.
pub(crate) struct Core {
    pub(crate) index: usize,
    pub(crate) shared: Arc<Shared>,
    /// This core's copy of the effective configuration (see the module
    /// doc); replaced on reload, so callers take it once per connection
    /// or request and keep it.
    cfg: RefCell<Rc<GatewayConfig>>,
    pub(crate) stats: Arc<CoreStats>,
    sessions: RefCell<HashMap<String, LocalSession>>,
    /// session -> bitmask of cores holding it (replica of the directory).
    replica: RefCell<HashMap<String, u64>>,
    /// Which names are reserved (replica of the claim registry's leases).
    leases: RefCell<LeaseReplica>,
    /// Requests waiting for a reserved session to come back, per session.
    holds: RefCell<HashMap<String, Rc<HoldQueue>>>,
    /// Requests being served or held on this core: a stopping core waits
    /// for them (up to `--shutdown-grace`).
    pub(crate) inflight: Cell<usize>,
    pub(crate) idle: Notify,
    pub(crate) limits: crate::limits::gate::CoreLimits,
    /// This core's writer of the sessions' windows.
    pub(crate) windows: WindowWriter,
    /// The latest cluster view (empty on a single node), read once per
    /// request that has no uplink on this node.
    pub(crate) cluster: RefCell<Arc<crate::cluster::ClusterView>>,
    /// This core's peer links (`cluster::peer`); empty on a single node.
    pub(crate) peers: crate::cluster::peer::Peers,
}

impl Core {
    /// The effective configuration now (a non-atomic `Rc` clone).
    pub(crate) fn cfg(&self) -> Rc<GatewayConfig> {
        self.cfg.borrow().clone()
    }

    /// The ACCEPT this core answers a handshake with, before what depends
    /// on the peer (capabilities, TCP ports, public URL, node list): agent
    /// uplinks (`tunnel.rs`) and peer links (`cluster::peer`) alike.
    /// `limits`: the ones the link will run with (read once by the caller).
    pub(crate) fn accept_base(&self, limits: &crate::proto::Limits) -> crate::proto::Accept {
        crate::proto::Accept {
            version: crate::proto::PROTOCOL_VERSION,
            gateway_cores: self.shared.mailboxes.len() as u16,
            core: self.index as u16,
            max_frame: limits.max_frame,
            stream_window: limits.stream_window,
            conn_window: limits.conn_window,
            max_streams: limits.max_streams,
            capabilities: 0,
            tcp: Vec::new(),
            public: None,
            nodes: Vec::new(),
        }
    }

    /// A reload reached this core: new settings for what starts from now
    /// on, rates re-read, revoked uplinks closed.
    fn reloaded(&self) {
        let live = self.shared.live();
        *self.cfg.borrow_mut() = Rc::new(live.cfg.clone());
        self.limits.forget_all();
        self.revoke_not_allowed(&live);
    }

    /// Picks a local uplink of `session` with room for a stream, round
    /// robin so streams spread over the session's uplinks on this core.
    pub(crate) fn pick_uplink(&self, session: &str) -> Option<Rc<Uplink>> {
        let sessions = self.sessions.borrow();
        let s = sessions.get(session)?;
        let n = s.uplinks.len();
        for k in 0..n {
            let i = (s.next.get() + k) % n;
            if s.uplinks[i].has_capacity() {
                s.next.set(i + 1);
                return Some(s.uplinks[i].clone());
            }
        }
        None
    }

    /// Counts a request of `session` in its window, now: timed from
    /// `started` when it reached the agent, and whether it failed.
    pub(crate) fn count_request(&self, session: &str, started: Option<Instant>, error: bool) {
        let end = Instant::now();
        let latency = started.map(|t| end.saturating_duration_since(t).as_micros() as u64);
        let now = crate::io::stats::window_second(end);
        self.windows.record(session, now, latency, error);
    }

    pub(crate) fn has_local(&self, session: &str) -> bool {
        self.sessions
            .borrow()
            .get(session)
            .is_some_and(|s| s.uplinks.iter().any(|u| u.is_open()))
    }

    /// Whether any core holds the session (per the local replica).
    /// This core's own bit in the replica is not consulted: it lags behind
    /// `has_local` until this core's own directory message comes back
    /// through its mailbox, and a held request woken by a stale bit would
    /// find no uplink.
    pub(crate) fn is_present(&self, session: &str) -> bool {
        let others = !(1u64 << self.index);
        self.has_local(session)
            || self
                .replica
                .borrow()
                .get(session)
                .is_some_and(|m| *m & others != 0)
    }

    /// Whether `session` has an owner now (uplinks, perhaps all draining,
    /// or a lease running), per this core's replica: a request for it may
    /// wait for an uplink. No lock.
    pub(crate) fn is_reserved(&self, session: &str) -> bool {
        self.leases.borrow().reserved(session, Instant::now)
    }

    /// Another core holding `session`, spreading by a hint (e.g. the
    /// client port) so handoffs do not all land on one core.
    pub(crate) fn remote_core_for(&self, session: &str, hint: usize) -> Option<usize> {
        let mask = *self.replica.borrow().get(session)? & !(1u64 << self.index);
        if mask == 0 {
            return None;
        }
        let cores: Vec<usize> = (0..64).filter(|i| mask & (1 << i) != 0).collect();
        Some(cores[hint % cores.len()])
    }

    fn add_uplink(self: &Rc<Self>, up: Rc<Uplink>) {
        let session = up.session.clone();
        self.sessions
            .borrow_mut()
            .entry(session.clone())
            .or_default()
            .uplinks
            .push(up.clone());
        self.windows.open(&session);
        self.refresh_presence(&session);
        // Whether the registry counts this uplink as draining; set by
        // whichever handler runs first (a close may come without a drain).
        let drained = Rc::new(Cell::new(false));
        let closed = Rc::new(Cell::new(false));
        let me = Rc::downgrade(self);
        let name = session.clone();
        let (d, c) = (drained.clone(), closed.clone());
        up.set_drain_handler(move || {
            if let Some(core) = me.upgrade() {
                if !c.get() {
                    d.set(true);
                    core.shared.drain(&name, core.index);
                }
                core.refresh_presence(&name);
            }
        });
        let me = Rc::downgrade(self);
        let id = up.id;
        up.set_close_handler(move || {
            closed.set(true);
            if let Some(core) = me.upgrade() {
                core.remove_uplink(&session, id, drained.get());
            }
        });
    }

    /// Tells every core (this one included) when this core starts or stops
    /// holding an uplink of `session` that takes new streams.
    fn refresh_presence(&self, session: &str) {
        let change = {
            let mut sessions = self.sessions.borrow_mut();
            match sessions.get_mut(session) {
                Some(s) => {
                    let open = s.uplinks.iter().any(|u| u.is_open());
                    let changed = open != s.announced;
                    s.announced = open;
                    changed.then_some(open)
                }
                None => None,
            }
        };
        if let Some(present) = change {
            let core = self.index;
            self.shared.broadcast(|| CoreMsg::Directory {
                session: session.to_string(),
                core,
                present,
            });
        }
    }

    fn remove_uplink(&self, session: &str, id: u64, drained: bool) {
        let withdraw = {
            let mut sessions = self.sessions.borrow_mut();
            let Some(s) = sessions.get_mut(session) else {
                return;
            };
            s.uplinks.retain(|u| u.id != id);
            if s.uplinks.is_empty() {
                let announced = s.announced;
                sessions.remove(session);
                let now = crate::io::stats::window_second(Instant::now());
                self.windows.close(session, now);
                announced
            } else {
                false
            }
        };
        self.shared.release(session, self.index, drained);
        tracing::info!(core = self.index, session, uplink = id, "uplink removed");
        if withdraw {
            let core = self.index;
            self.shared.broadcast(|| CoreMsg::Directory {
                session: session.to_string(),
                core,
                present: false,
            });
        } else {
            self.refresh_presence(session);
        }
    }

    fn apply_directory(&self, session: String, core: usize, present: bool) {
        {
            let mut r = self.replica.borrow_mut();
            let m = r.entry(session.clone()).or_insert(0);
            if present {
                *m |= 1 << core;
            } else {
                // The name may come back under another token's rate.
                self.limits.forget(&session);
                *m &= !(1 << core);
                if *m == 0 {
                    r.remove(&session);
                }
            }
        }
        if present {
            if let Some(q) = self.holds.borrow().get(&session) {
                q.wake.wake_all();
            }
        }
    }

    /// Waits (up to `--hold-timeout`) until some core holds `session`
    /// again, for a request whose session is reserved but has no uplink
    /// taking streams: its agent is restarting. Woken by the directory
    /// message that says the session is back.
    ///
    /// A held request counts as in flight, so a stopping core waits for
    /// it; the shutdown wakes it (`wake_held`) and it ends `ShuttingDown`.
    pub(crate) async fn hold(&self, session: &str) -> Held {
        let cfg = self.cfg();
        if self.stopping() {
            return Held::ShuttingDown;
        }
        let q = self
            .holds
            .borrow_mut()
            .entry(session.to_string())
            .or_default()
            .clone();
        if q.waiting.get() >= cfg.hold_queue {
            return Held::Full;
        }
        q.waiting.set(q.waiting.get() + 1);
        let _inflight = InFlight::enter(self);
        // Leaves the queue however the wait ends (the task may be dropped).
        struct Leave<'a>(&'a Core, &'a str, Rc<HoldQueue>);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                let n = self.2.waiting.get() - 1;
                self.2.waiting.set(n);
                if n == 0 {
                    self.0.holds.borrow_mut().remove(self.1);
                }
            }
        }
        let _leave = Leave(self, session, q.clone());
        let back = crate::runtime::notify::wait_until(&q.wake, || {
            self.is_present(session) || self.stopping()
        });
        match monoio::time::timeout(cfg.hold_timeout, back).await {
            Ok(()) if self.is_present(session) => Held::Back,
            Ok(()) => Held::ShuttingDown,
            Err(_) => Held::TimedOut,
        }
    }

    fn stopping(&self) -> bool {
        self.shared.shutting_down.load(Ordering::Relaxed)
    }

    /// Wakes every held request of this core (shutdown: they see
    /// `stopping` and are answered).
    fn wake_held(&self) {
        for q in self.holds.borrow().values() {
            q.wake.wake_all();
        }
    }

    /// Closes this core's uplinks whose token was revoked (see
    /// [`Shared::reload_cores`]).
    fn revoke_not_allowed(&self, live: &Live) {
        let revoked: Vec<Rc<Uplink>> = self
            .sessions
            .borrow()
            .iter()
            .filter(|(name, _)| !self.shared.claim_allowed(name, &live.tokens))
            .flat_map(|(_, s)| s.uplinks.iter().cloned())
            .collect();
        // Outside the borrow: closing runs the close handler, which
        // removes the uplink from `sessions`.
        for up in revoked {
            up.fail(
                crate::proto::ErrorCode::AuthFailed,
                "token revoked by a configuration reload",
            );
        }
    }

    /// Uplinks of this core, for shutdown.
    fn all_uplinks(&self) -> Vec<Rc<Uplink>> {
        self.sessions
            .borrow()
            .values()
            .flat_map(|s| s.uplinks.iter().cloned())
            .collect()
    }
}

/// A running gateway (in-process handle).
pub struct Gateway {
    shared: Arc<Shared>,
    workers: Option<crate::runtime::Workers>,
    admin: Option<SocketAddr>,
    /// The cluster control plane, stopped (lease revoked) once the
    /// workers have ended.
    registry: Option<crate::cluster::registry::Registry>,
}

impl Gateway {
    /// The plain HTTP listener's address (panics with `--listen off`; see
    /// [`Gateway::listen_addr`]).
    pub fn public_addr(&self) -> SocketAddr {
        self.listen_addr()
            .expect("--listen off: the gateway has no plain HTTP listener")
    }

    /// The plain HTTP listener's address, `None` with `--listen off`.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.shared.public_addr
    }

    /// The HTTPS listener's address (`--https-listen`).
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.shared.https_addr
    }

    pub fn tunnel_addr(&self) -> SocketAddr {
        self.shared.tunnel_addr
    }

    /// The peer listener's address (`--peer-listen`), in a cluster.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.shared.peer_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    pub fn stats(&self) -> &[Arc<CoreStats>] {
        &self.shared.stats
    }

    /// How many times the claim registry's lock was taken (uplinks
    /// connecting, draining, closing; a session's rate looked up once per
    /// core; /stats). Diagnostic: requests for hosts without a local
    /// uplink must not move it.
    pub fn claims_lock_count(&self) -> u64 {
        self.shared.claims_locked.load(Ordering::Relaxed)
    }

    /// Stops accepting, lets in-flight requests finish (up to the grace
    /// period), sends GOAWAY to agents, then returns.
    pub fn shutdown(mut self) {
        self.begin_shutdown();
        if let Some(w) = self.workers.take() {
            w.join();
        }
        self.stop_registry();
    }

    /// Revokes the node's etcd lease (its keys vanish at once) and ends
    /// the control plane. After the workers ended: until then the node
    /// still serves, registered as draining.
    fn stop_registry(&mut self) {
        if let Some(r) = self.registry.take() {
            r.stop();
        }
    }

    /// The cluster registry's handle (`None` on a single node).
    pub fn cluster(&self) -> Option<&crate::cluster::registry::RegistryHandle> {
        self.shared.cluster.as_ref()
    }

    /// Applies a reloaded configuration: tokens (with their scopes and
    /// limits), the tunnel's TLS certificates, the HTTPS edge's
    /// certificates (new handshakes only) and the settings of
    /// `config::RELOADABLE` (connection limits, rates, hold and client
    /// timeouts), then closes uplinks whose token no longer covers their
    /// session. Connections are not dropped otherwise: established TLS
    /// uplinks keep their session, new handshakes use the new certificate;
    /// connections over a lowered limit stay, new ones are refused; a
    /// timeout applies from the next connection, request or wait that
    /// starts. On error nothing changed.
    ///
    /// Other settings (addresses, cores, driver, windows, fd reserve,
    /// handshake limits…) are fixed at start-up; changing them needs a
    /// restart.
    pub fn reload(&self, cfg: &GatewayConfig) -> Result<(), String> {
        cfg.validate()?;
        let live = Live::from_cfg(&self.shared.cfg.with_reloaded(cfg))?;
        let (tokens, tls) = (live.tokens.len(), live.tls.is_some());
        let https_certs = cfg.https_certs.len();
        self.shared.limits.apply(&live.cfg.edge_limits);
        *self.shared.live.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(live);
        self.shared.reload_cores();
        tracing::info!(tokens, tls, https_certs, "configuration reloaded");
        Ok(())
    }

    /// Hands every core a cluster view, as the control plane does when
    /// etcd changes (`cluster::registry`). Public for tests that drive
    /// routing without etcd; a running cluster node's registry overwrites
    /// it at its next change.
    #[doc(hidden)]
    pub fn set_cluster_view(&self, view: crate::cluster::ClusterView) {
        let view = Arc::new(view);
        self.shared.broadcast(|| CoreMsg::Cluster(view.clone()));
    }

    /// Starts the drain: `/health` says draining, listeners close, agents
    /// get GOAWAY (REHOME in a cluster), in-flight requests finish. In a
    /// cluster the node key says "draining" first, so peers and agents
    /// move away while in-flight requests finish.
    pub fn begin_shutdown(&self) {
        if !self.shared.shutting_down.swap(true, Ordering::SeqCst) {
            self.shared.cluster_drain_begins();
        }
        self.shared.broadcast(|| CoreMsg::Shutdown);
    }

    /// Blocks until the workers end (after `begin_shutdown`).
    pub fn join(mut self) {
        if let Some(w) = self.workers.take() {
            w.join();
        }
        self.stop_registry();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(w) = self.workers.take() {
            self.begin_shutdown();
            w.join();
        }
        self.stop_registry();
    }
}

/// `addr` as other nodes and agents reach it: its port, and the host of
/// `--advertise` if given (resolved once, here).
fn advertised(advertise: Option<&str>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let Some(host) = advertise else {
        return Ok(addr);
    };
    use std::net::ToSocketAddrs;
    (host.trim_matches(['[', ']']), addr.port())
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("--advertise {host}: no address"),
            )
        })
}

/// This node as it registers itself in etcd.
fn node_info(
    c: &crate::cluster::ClusterConfig,
    tunnel: SocketAddr,
    peer: SocketAddr,
    cores: usize,
) -> std::io::Result<crate::cluster::NodeInfo> {
    // `peer` is the peer listener's bound address (cluster::peer), so a
    // port 0 in --peer-listen is registered as the port it got.
    Ok(crate::cluster::NodeInfo {
        name: c.node.clone(),
        // Without --advertise the peer listener's own host is the one to
        // dial (validated: not unspecified); the tunnel address takes the
        // same host (`tunnel::advertised_tunnel`), never the bound
        // 0.0.0.0 of --tunnel-listen.
        peer: advertised(c.advertise.as_deref(), peer)?,
        tunnel,
        cores: cores.min(usize::from(u16::MAX)) as u16,
        state: crate::cluster::NodeState::Ready,
    })
}

/// Starts the gateway's workers; returns once listeners are bound.
pub fn start(cfg: GatewayConfig) -> std::io::Result<Gateway> {
    cfg.validate()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let nofile = crate::runtime::raise_nofile_limit();
    // Certificates first: a bad file must stop start-up before any bind.
    let live = Live::from_cfg(&cfg)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let public_addr = match cfg.listen.as_str() {
        "off" => None,
        a => Some(crate::runtime::reserve_listen_addr(a)?),
    };
    let https_addr = match &cfg.https_listen {
        Some(a) => Some(crate::runtime::reserve_listen_addr(a)?),
        None => None,
    };
    let tunnel_addr = crate::runtime::reserve_listen_addr(&cfg.tunnel_listen)?;
    let advertised_tunnel = match &cfg.cluster {
        Some(c) => Some(tunnel::advertised_tunnel(c, tunnel_addr)?),
        None => None,
    };
    let peer_addr = match &cfg.cluster {
        Some(c) => Some(crate::runtime::reserve_listen_addr(&c.peer_listen)?),
        None => None,
    };
    let n = cfg.cores.cores;
    // Before the cores: their claims tell it what to register from the
    // first uplink on (queued until it starts below).
    let mut registry = match &cfg.cluster {
        Some(c) => Some((
            crate::cluster::registry::Registry::new(c.clone())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            node_info(
                c,
                advertised_tunnel.expect("a cluster has an advertised tunnel address"),
                peer_addr.expect("a cluster has a peer listener"),
                n,
            )?,
        )),
        None => None,
    };
    let mut senders = Vec::with_capacity(n);
    let mut receivers = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = mailbox();
        senders.push(tx);
        receivers.push(Some(rx));
    }
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        mailboxes: senders,
        claims: Mutex::new(Claims::new(n, cfg.session_lease)),
        claims_locked: AtomicU64::new(0),
        stats: (0..n).map(|_| Arc::new(CoreStats::default())).collect(),
        next_uplink: AtomicU64::new(1),
        shutting_down: AtomicBool::new(false),
        public_addr,
        https_addr,
        tunnel_addr,
        advertised_tunnel,
        peer_addr,
        live: RwLock::new(Arc::new(live)),
        limits: crate::limits::GatewayLimits::new(cfg.edge_limits.clone(), nofile, n),
        tcp: Mutex::new(HashMap::new()),
        tcp_counters: Default::default(),
        remote_tcp: Mutex::new(HashMap::new()),
        windows: (0..n)
            .map(|_| Arc::new(SessionWindows::new(crate::io::stats::MAX_WINDOW_SESSIONS)))
            .collect(),
        cluster: registry.as_ref().map(|(r, _)| r.handle()),
    });
    let admin = match &cfg.admin_listen {
        Some(a) => Some(crate::admin::start_with(
            a,
            shared.clone() as Arc<dyn crate::admin::StatsSource>,
            crate::admin::AdminOptions {
                token: cfg.admin_token.clone(),
            },
        )?),
        None => None,
    };
    let receivers = Arc::new(Mutex::new(receivers));
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<(), String>>(n);
    let sh = shared.clone();
    let workers = crate::runtime::spawn_workers(&cfg.cores.spec("gw"), move |i| {
        let rx = receivers.lock().unwrap_or_else(|e| e.into_inner())[i]
            .take()
            .expect("one receiver per core");
        core_main(i, sh.clone(), rx, ready_tx.clone())
    })?;
    for _ in 0..n {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                shared.broadcast(|| CoreMsg::Shutdown);
                return Err(std::io::Error::other(e));
            }
            Err(_) => {
                return Err(std::io::Error::other(
                    "a gateway worker died during start-up",
                ))
            }
        }
    }
    tracing::info!(public_addr = ?public_addr, https_addr = ?https_addr, %tunnel_addr, cores = n, "gateway listening");
    if cfg.proxy_protocol || !cfg.trusted_proxies.is_empty() {
        tracing::info!(
            proxy_protocol = cfg.proxy_protocol,
            trusted_proxies = %cfg.trusted_proxies,
            "public edge: client addresses from PROXY headers / trusted proxies"
        );
    }
    let registry = match registry.take() {
        Some((mut r, me)) => {
            let sh = shared.clone();
            tracing::info!(node = %me.name, peer = %me.peer, tunnel = %me.tunnel, etcd = ?sh.cfg.cluster.as_ref().map(|c| &c.etcd), "cluster: joining");
            let started = r.start(me, move |view| {
                sh.broadcast(|| CoreMsg::Cluster(view.clone()))
            });
            if let Err(e) = started {
                // The workers are up: stop them before failing start-up.
                shared.broadcast(|| CoreMsg::Shutdown);
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cluster: cannot start the registry: {e}"),
                ));
            }
            Some(r)
        }
        None => None,
    };
    Ok(Gateway {
        shared,
        workers: Some(workers),
        admin,
        registry,
    })
}

async fn core_main(
    index: usize,
    shared: Arc<Shared>,
    rx: MailboxReceiver<CoreMsg>,
    ready: crossbeam_channel::Sender<Result<(), String>>,
) {
    let bind = |a: Option<SocketAddr>| a.map(crate::runtime::bind_reuseport).transpose();
    let listeners = bind(shared.public_addr).and_then(|p| {
        let h = bind(shared.https_addr)?;
        crate::runtime::bind_reuseport(shared.tunnel_addr).map(|t| (p, h, t))
    });
    let listeners = listeners.and_then(|l| Ok((l, bind(shared.peer_addr)?)));
    let ((public_l, https_l, tunnel_l), peer_l) = match listeners {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("core {index}: cannot bind listeners: {e}")));
            return;
        }
    };
    let core = Rc::new(Core {
        index,
        cfg: RefCell::new(Rc::new(shared.live().cfg.clone())),
        stats: shared.stats[index].clone(),
        shared: shared.clone(),
        sessions: RefCell::new(HashMap::new()),
        replica: RefCell::new(HashMap::new()),
        leases: RefCell::new(LeaseReplica::default()),
        holds: RefCell::new(HashMap::new()),
        inflight: Cell::new(0),
        idle: Notify::new(),
        limits: Default::default(),
        windows: WindowWriter::new(shared.windows[index].clone()),
        cluster: RefCell::new(Arc::default()),
        peers: Default::default(),
    });
    let public_fd = public_l.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    let https_fd = https_l.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    let tunnel_fd = std::os::fd::AsRawFd::as_raw_fd(&tunnel_l);
    let peer_fd = peer_l.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    let _ = ready.send(Ok(()));
    drop(ready);

    let stop = Rc::new(Cell::new(false));
    if let Some(l) = public_l {
        let c = core.clone();
        let s = stop.clone();
        crate::runtime::spawn_isolated("public-accept", async move {
            public::accept_loop(c, l, s).await;
        });
    }
    if let Some(l) = https_l {
        let c = core.clone();
        let s = stop.clone();
        crate::runtime::spawn_isolated("https-accept", async move {
            https::accept_loop(c, l, s).await;
        });
    }
    let c = core.clone();
    let s = stop.clone();
    crate::runtime::spawn_isolated("tunnel-accept", async move {
        tunnel::accept_loop(c, tunnel_l, s).await;
    });
    if let Some(l) = peer_l {
        let c = core.clone();
        let s = stop.clone();
        crate::runtime::spawn_isolated("peer-accept", async move {
            crate::cluster::peer::accept_loop(c, l, s).await;
        });
    }
    if index == 0 && !shared.cfg.tcp_ports.is_empty() {
        // Leases expire lazily (at the next claim); TCP ports must close
        // when theirs does, so core 0 looks once a second.
        let sh = shared.clone();
        let s = stop.clone();
        crate::runtime::spawn_isolated("tcp-lease-expiry", async move {
            while !s.get() {
                monoio::time::sleep(std::time::Duration::from_secs(1)).await;
                sh.expire_tcp();
            }
        });
    }

    // The worker's main future is the mailbox loop: it owns the lifetime
    // of every task on this core (block_on drops unfinished tasks).
    while let Some(msg) = rx.recv().await {
        if matches!(msg, CoreMsg::Shutdown) {
            break;
        }
        let core = &core;
        crate::runtime::run_isolated("mailbox", move || match msg {
            CoreMsg::Public {
                fd,
                buf,
                client,
                scheme,
                hops,
                permit,
            } => {
                CoreStats::inc(&core.stats.handoffs_in);
                public::adopt(core.clone(), fd, buf, client, scheme, hops, permit);
            }
            CoreMsg::Uplink {
                fd,
                leftover,
                hello,
                id,
                tcp,
            } => tunnel::adopt(core.clone(), fd, leftover, hello, id, tcp),
            CoreMsg::Directory {
                session,
                core: c,
                present,
            } => core.apply_directory(session, c, present),
            CoreMsg::Lease { session, state } => {
                core.leases
                    .borrow_mut()
                    .apply(session, state, Instant::now())
            }
            CoreMsg::Reloaded(done) => {
                core.reloaded();
                let _ = done.send(());
            }
            CoreMsg::TcpListen(pl) => tcp::listen(core, pl),
            CoreMsg::TcpConn { fd, peer, slot } => {
                CoreStats::inc(&core.stats.handoffs_in);
                tcp::adopt(core.clone(), fd, peer, slot);
            }
            CoreMsg::Cluster(view) => {
                *core.cluster.borrow_mut() = view.clone();
                crate::cluster::peer::sync(core, &view);
                // Node-wide, so one core does it.
                if core.index == 0 {
                    core.shared.sync_cluster_tcp(&view);
                }
            }
            CoreMsg::Shutdown => {}
        });
    }
    stop.set(true);
    // shutdown(2) on a listening socket fails its pending accept, so the
    // accept loops end and drop (close) their listeners.
    for fd in [public_fd, https_fd, peer_fd].into_iter().flatten() {
        crate::io::shutdown_fd(fd, libc::SHUT_RDWR);
    }
    crate::io::shutdown_fd(tunnel_fd, libc::SHUT_RDWR);
    shared.close_tcp();
    // GOAWAY first: agents learn at once that no new streams will come,
    // while the streams in flight on these uplinks finish within the grace
    // period. In a cluster an agent that can hold uplinks on other nodes
    // is told REHOME: it opens its replacement elsewhere, then finishes
    // its streams here and closes the uplink itself.
    let clustered = shared.cfg.cluster.is_some();
    let rehomes = |up: &Uplink| clustered && up.capabilities() & crate::proto::CAP_CLUSTER != 0;
    for up in core.all_uplinks() {
        if rehomes(&up) {
            up.go_away(
                crate::proto::ErrorCode::Rehome,
                "node draining: reconnect elsewhere",
            );
        } else {
            up.go_away(crate::proto::ErrorCode::Shutdown, "gateway shutting down");
        }
    }
    // Peers stop forwarding here at once (GOAWAY on the links they
    // dialed); forwarded streams in flight finish within the grace period
    // like the others. The links this core dialed stay usable until the
    // end: a request still reaching this draining node on a kept-alive
    // connection is forwarded to a node that holds its session, now that
    // the local uplinks were told to move.
    core.peers.stop_dialing();
    for link in core.peers.accepted_links() {
        link.go_away(crate::proto::ErrorCode::Shutdown, "node shutting down");
    }
    // Requests waiting for an agent to come back get their answer now
    // (503) instead of being dropped with the core; they count in
    // `inflight`, so the loop below waits for that answer.
    core.wake_held();
    let grace = shared.cfg.shutdown_grace;
    let deadline = std::time::Instant::now() + grace;
    // In a cluster the node also waits (same grace) for its uplinks:
    // REHOME'd ones until their agents close them (after their
    // replacements are accepted elsewhere), others until idle, so that
    // streams forwarded here by peers finish too.
    let uplinks_busy = || {
        clustered
            && core
                .all_uplinks()
                .iter()
                .any(|up| !up.is_closed() && (rehomes(up) || !up.is_idle()))
    };
    while (core.inflight.get() > 0 || uplinks_busy()) && std::time::Instant::now() < deadline {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let _ = monoio::time::timeout(
            left.min(std::time::Duration::from_millis(50)),
            core.idle.notified(),
        )
        .await;
    }
    // Give writers a moment to flush the last frames before the core ends.
    monoio::time::sleep(std::time::Duration::from_millis(50)).await;
    for up in core.all_uplinks().into_iter().chain(core.peers.all_links()) {
        up.close_now("gateway shut down");
    }
    tracing::info!(core = index, "gateway core stopped");
}

impl crate::admin::StatsSource for Shared {
    fn role(&self) -> &'static str {
        "gateway"
    }

    fn cores(&self) -> &[Arc<CoreStats>] {
        &self.stats
    }

    fn extra_metrics(&self) -> String {
        let cluster = self.cluster.as_ref().map(|c| c.metrics());
        self.limit_metrics()
            + &self.tcp_metrics()
            + &self.cluster_metrics()
            + cluster.as_deref().unwrap_or("")
    }

    fn extra_json(&self) -> String {
        match &self.cluster {
            Some(c) => format!("{},{}", self.tcp_json(), c.json()),
            None => self.tcp_json(),
        }
    }

    /// Draining from the first SIGTERM on: a load balancer stops sending
    /// new connections while the in-flight ones finish.
    fn health(&self) -> (&'static str, &'static str) {
        if self.shutting_down.load(Ordering::Relaxed) {
            ("503 Service Unavailable", "draining")
        } else {
            ("200 OK", "ready")
        }
    }

    fn sessions(&self) -> Option<Vec<(String, Vec<u32>)>> {
        Some(self.placement())
    }

    fn windows(&self) -> &[Arc<SessionWindows>] {
        &self.windows
    }
}
