//! The gateway: public HTTP listener, uplink listener, per-core session
//! tables and the session directory.
//!
//! Every core runs the same `core_main`: its own SO_REUSEPORT listeners
//! (public and tunnel), its mailbox, and the uplinks placed on it. A
//! session's uplinks on this core live in `Core::sessions` (plain
//! `RefCell`); which *other* cores hold the session is a per-core replica
//! (`Core::replica`) updated by directory messages, read once per new
//! public request and never per frame.
//!
//! The only lock is `Shared::claims`, taken when an uplink connects or
//! goes away: it keeps a session name owned by one token and counts
//! uplinks per core for placement.

mod guard;
mod public;
mod tunnel;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::config::GatewayConfig;
use crate::http::Scheme;
use crate::io::stats::CoreStats;
use crate::io::uplink::Uplink;
use crate::proto::Hello;
use crate::runtime::mailbox::{mailbox, MailboxReceiver, MailboxSender};
use crate::runtime::notify::Notify;

/// Messages between gateway cores.
pub(crate) enum CoreMsg {
    /// A public connection to serve here: its socket and the bytes already
    /// read from it (at least one request head).
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
    },
    /// Directory replica update: `core` now does / no longer holds `session`.
    Directory {
        session: String,
        core: usize,
        present: bool,
    },
    Shutdown,
}

struct Claim {
    token: String,
    per_core: Vec<u32>,
}

/// State shared by all cores of one gateway (Send + Sync).
pub(crate) struct Shared {
    pub(crate) cfg: GatewayConfig,
    pub(crate) mailboxes: Vec<MailboxSender<CoreMsg>>,
    claims: Mutex<HashMap<String, Claim>>,
    pub(crate) stats: Vec<Arc<CoreStats>>,
    next_uplink: AtomicU64,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) public_addr: SocketAddr,
    pub(crate) tunnel_addr: SocketAddr,
    /// TLS on the tunnel listener; `None` = plaintext uplinks.
    pub(crate) tls: Option<monoio_rustls::TlsAcceptor>,
    pub(crate) limits: crate::limits::GatewayLimits,
}

impl Shared {
    /// Claims one more uplink of `session` for `token`; picks the core
    /// holding the fewest uplinks of that session (ties: `here`). An
    /// uplink that cannot move (TLS) is counted where it is.
    fn claim(
        &self,
        session: &str,
        token: &str,
        here: usize,
        movable: bool,
    ) -> Result<usize, String> {
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        let cores = self.mailboxes.len();
        let c = claims.entry(session.to_string()).or_insert_with(|| Claim {
            token: token.to_string(),
            per_core: vec![0; cores],
        });
        if c.token != token {
            return Err(format!(
                "session '{session}' is held by an agent with another token"
            ));
        }
        let min = *c.per_core.iter().min().unwrap_or(&0);
        let target = if !movable || c.per_core[here] == min {
            here
        } else {
            (0..cores).find(|&i| c.per_core[i] == min).unwrap_or(here)
        };
        c.per_core[target] += 1;
        Ok(target)
    }

    fn release(&self, session: &str, core: usize) {
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = claims.get_mut(session) {
            c.per_core[core] = c.per_core[core].saturating_sub(1);
            if c.per_core.iter().all(|n| *n == 0) {
                claims.remove(session);
            }
        }
    }

    /// Uplinks per core of every session (for /stats).
    pub(crate) fn placement(&self) -> Vec<(String, Vec<u32>)> {
        let claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = claims
            .iter()
            .map(|(k, c)| (k.clone(), c.per_core.clone()))
            .collect();
        v.sort();
        v
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
}

/// One gateway core's state; never leaves its thread.
pub(crate) struct Core {
    pub(crate) index: usize,
    pub(crate) shared: Arc<Shared>,
    pub(crate) stats: Arc<CoreStats>,
    sessions: RefCell<HashMap<String, LocalSession>>,
    /// session -> bitmask of cores holding it (replica of the directory).
    replica: RefCell<HashMap<String, u64>>,
    pub(crate) inflight: Cell<usize>,
    pub(crate) idle: Notify,
    pub(crate) limits: crate::limits::gate::CoreLimits,
}

impl Core {
    pub(crate) fn cfg(&self) -> &GatewayConfig {
        &self.shared.cfg
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

    pub(crate) fn has_local(&self, session: &str) -> bool {
        self.sessions
            .borrow()
            .get(session)
            .is_some_and(|s| s.uplinks.iter().any(|u| u.is_open()))
    }

    /// Whether any core holds the session (per the local replica).
    pub(crate) fn is_present(&self, session: &str) -> bool {
        self.has_local(session) || self.replica.borrow().get(session).is_some_and(|m| *m != 0)
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
        let first = {
            let mut sessions = self.sessions.borrow_mut();
            let s = sessions.entry(session.clone()).or_default();
            s.uplinks.push(up.clone());
            s.uplinks.len() == 1
        };
        if first {
            let core = self.index;
            let name = session.clone();
            self.shared.broadcast(|| CoreMsg::Directory {
                session: name.clone(),
                core,
                present: true,
            });
        }
        let me = Rc::downgrade(self);
        let id = up.id;
        up.set_close_handler(move || {
            if let Some(core) = me.upgrade() {
                core.remove_uplink(&session, id);
            }
        });
    }

    fn remove_uplink(&self, session: &str, id: u64) {
        let now_empty = {
            let mut sessions = self.sessions.borrow_mut();
            let Some(s) = sessions.get_mut(session) else {
                return;
            };
            s.uplinks.retain(|u| u.id != id);
            let empty = s.uplinks.is_empty();
            if empty {
                sessions.remove(session);
            }
            empty
        };
        self.shared.release(session, self.index);
        tracing::info!(core = self.index, session, uplink = id, "uplink removed");
        if now_empty {
            let core = self.index;
            self.shared.broadcast(|| CoreMsg::Directory {
                session: session.to_string(),
                core,
                present: false,
            });
        }
    }

    fn apply_directory(&self, session: String, core: usize, present: bool) {
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
}

impl Gateway {
    pub fn public_addr(&self) -> SocketAddr {
        self.shared.public_addr
    }

    pub fn tunnel_addr(&self) -> SocketAddr {
        self.shared.tunnel_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    pub fn stats(&self) -> &[Arc<CoreStats>] {
        &self.shared.stats
    }

    /// Stops accepting, lets in-flight requests finish (up to the grace
    /// period), sends GOAWAY to agents, then returns.
    pub fn shutdown(mut self) {
        self.begin_shutdown();
        if let Some(w) = self.workers.take() {
            w.join();
        }
    }

    pub fn begin_shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        self.shared.broadcast(|| CoreMsg::Shutdown);
    }

    /// Blocks until the workers end (after `begin_shutdown`).
    pub fn join(mut self) {
        if let Some(w) = self.workers.take() {
            w.join();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(w) = self.workers.take() {
            self.begin_shutdown();
            w.join();
        }
    }
}

/// Starts the gateway's workers; returns once listeners are bound.
pub fn start(cfg: GatewayConfig) -> std::io::Result<Gateway> {
    cfg.validate()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let nofile = crate::runtime::raise_nofile_limit();
    // Certificates first: a bad file must stop start-up before any bind.
    let tls = match &cfg.tunnel_tls {
        Some(files) => Some(monoio_rustls::TlsAcceptor::from(
            crate::tls::server_config(files)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
        )),
        None => None,
    };
    let public_addr = crate::runtime::reserve_listen_addr(&cfg.listen)?;
    let tunnel_addr = crate::runtime::reserve_listen_addr(&cfg.tunnel_listen)?;
    let n = cfg.cores.cores;
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
        claims: Mutex::new(HashMap::new()),
        stats: (0..n).map(|_| Arc::new(CoreStats::default())).collect(),
        next_uplink: AtomicU64::new(1),
        shutting_down: AtomicBool::new(false),
        public_addr,
        tunnel_addr,
        tls,
        limits: crate::limits::GatewayLimits::new(cfg.edge_limits.clone(), nofile, n),
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
    tracing::info!(%public_addr, %tunnel_addr, cores = n, "gateway listening");
    if cfg.proxy_protocol || !cfg.trusted_proxies.is_empty() {
        tracing::info!(
            proxy_protocol = cfg.proxy_protocol,
            trusted_proxies = %cfg.trusted_proxies,
            "public edge: client addresses from PROXY headers / trusted proxies"
        );
    }
    Ok(Gateway {
        shared,
        workers: Some(workers),
        admin,
    })
}

async fn core_main(
    index: usize,
    shared: Arc<Shared>,
    rx: MailboxReceiver<CoreMsg>,
    ready: crossbeam_channel::Sender<Result<(), String>>,
) {
    let listeners = crate::runtime::bind_reuseport(shared.public_addr)
        .and_then(|p| crate::runtime::bind_reuseport(shared.tunnel_addr).map(|t| (p, t)));
    let (public_l, tunnel_l) = match listeners {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("core {index}: cannot bind listeners: {e}")));
            return;
        }
    };
    let core = Rc::new(Core {
        index,
        stats: shared.stats[index].clone(),
        shared: shared.clone(),
        sessions: RefCell::new(HashMap::new()),
        replica: RefCell::new(HashMap::new()),
        inflight: Cell::new(0),
        idle: Notify::new(),
        limits: Default::default(),
    });
    let public_fd = std::os::fd::AsRawFd::as_raw_fd(&public_l);
    let tunnel_fd = std::os::fd::AsRawFd::as_raw_fd(&tunnel_l);
    let _ = ready.send(Ok(()));
    drop(ready);

    let stop = Rc::new(Cell::new(false));
    let c = core.clone();
    let s = stop.clone();
    crate::runtime::spawn_isolated("public-accept", async move {
        // Plain HTTP: a TLS listener would pass Scheme::Https.
        public::accept_loop(c, public_l, Scheme::Http, s).await;
    });
    let c = core.clone();
    let s = stop.clone();
    crate::runtime::spawn_isolated("tunnel-accept", async move {
        tunnel::accept_loop(c, tunnel_l, s).await;
    });

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
            } => tunnel::adopt(core.clone(), fd, leftover, hello, id),
            CoreMsg::Directory {
                session,
                core: c,
                present,
            } => core.apply_directory(session, c, present),
            CoreMsg::Shutdown => {}
        });
    }
    stop.set(true);
    // shutdown(2) on a listening socket fails its pending accept, so the
    // accept loops end and drop (close) their listeners.
    crate::io::shutdown_fd(public_fd, libc::SHUT_RDWR);
    crate::io::shutdown_fd(tunnel_fd, libc::SHUT_RDWR);
    // GOAWAY first: agents learn at once that no new streams will come,
    // while the streams in flight on these uplinks finish within the grace
    // period.
    for up in core.all_uplinks() {
        up.go_away(crate::proto::ErrorCode::Shutdown, "gateway shutting down");
    }
    let grace = shared.cfg.shutdown_grace;
    let deadline = std::time::Instant::now() + grace;
    while core.inflight.get() > 0 && std::time::Instant::now() < deadline {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let _ = monoio::time::timeout(
            left.min(std::time::Duration::from_millis(50)),
            core.idle.notified(),
        )
        .await;
    }
    // Give writers a moment to flush the last frames before the core ends.
    monoio::time::sleep(std::time::Duration::from_millis(50)).await;
    for up in core.all_uplinks() {
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
        self.limit_metrics()
    }

    fn extra_json(&self) -> String {
        let sessions: Vec<String> = self
            .placement()
            .into_iter()
            .map(|(name, per_core)| {
                let v: Vec<String> = per_core.iter().map(|n| n.to_string()).collect();
                format!("\"{name}\":{{\"uplinks_per_core\":[{}]}}", v.join(","))
            })
            .collect();
        format!("\"sessions\":{{{}}}", sessions.join(","))
    }
}
