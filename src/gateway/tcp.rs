//! Raw TCP tunnels, gateway side: the public ports a session holds, their
//! listeners, and one stream per public connection.
//!
//! **Ownership.** A port belongs to a session's claim (`claims.rs`): it is
//! planned and checked at the uplink handshake (range, token scope,
//! taken), bound here, and stays the session's while the claim lives,
//! lease included, so a restarting agent gets its ports back and nobody
//! else can take them meanwhile. When the claim goes (last uplink gone
//! with no lease, or the lease expired: core 0 looks once a second) the
//! listener is shut down and closed.
//!
//! **Listeners and cores.** Each port has ONE listening socket, bound
//! without SO_REUSEPORT (so a port used by any other process on the host
//! is refused at the handshake, not silently shared). Every core accepts
//! on a `dup` of it: the kernel hands each connection to one of the
//! waiting accepts. A core that holds an uplink of the session serves the
//! connection itself; one that does not hands the socket to a core that
//! does (`CoreMsg::TcpConn`, like an HTTP handoff) or, when no core holds
//! one (the agent is away during its lease), closes it at once. With the
//! default `--uplinks` = gateway cores every core holds one and nothing
//! moves. `shutdown(2)` on the one socket ends every core's pending accept
//! when the port is released.
//!
//! **Connections.** One public connection = one stream, opened with a TCP
//! OPEN (`proto::tcp`), relayed by `io::relay::tcp_relay` under the same
//! per-stream credit as HTTP, half-closes crossing as END. The agent's
//! "connected" answer must come within `--response-timeout`. At most
//! `--tcp-max-conns-per-port` connections per port at once; one more is
//! accepted and closed at once, and counted.
//!
//! **Clusters.** A session hold in the registry lists the session's ports
//! (`SessionHold::tcp`). Every node listens on each port another node
//! holds (`Shared::sync_cluster_tcp`, core 0 on each view) and forwards a
//! connection that no local uplink takes over a peer link to a holder
//! (`forward`: the same TCP OPEN behind the peer prefix, NOT_HERE -> next
//! holder). Such a listener closes when no hold lists the port. In a
//! cluster a `--tcp` spec must name its port: nodes picking ports for an
//! agent's simultaneous uplinks could pick different ones.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use monoio::net::TcpStream;

use super::claims::{Claimant, Claims, Refusal};
use super::{Core, CoreMsg, Shared};
use crate::io::stats::CoreStats;
use crate::io::uplink::Inbound;
use crate::proto::tcp::TcpOpen;
use crate::proto::{ErrorCode, Hello};

/// Gateway-wide TCP tunnel counters (the per-connection ones are per core
/// in `CoreStats`).
#[derive(Default)]
pub(crate) struct TcpCounters {
    /// Connections accepted and closed at once: over the port's limit.
    pub(crate) over_limit: AtomicU64,
    /// Connections closed at once: no uplink of the session on any core.
    pub(crate) no_agent: AtomicU64,
    /// Handshakes refused with PORT_REFUSED.
    pub(crate) port_refused: AtomicU64,
    /// Connections served over a peer link by another node (cluster).
    pub(crate) forwarded: AtomicU64,
}

/// One public TCP port of a session.
pub(crate) struct PortListener {
    pub(crate) port: u16,
    pub(crate) session: String,
    listener: std::net::TcpListener,
    closed: AtomicBool,
    /// Connections open on this port, all cores together.
    active: AtomicUsize,
}

impl PortListener {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // Ends every core's pending accept on this socket.
        crate::io::shutdown_fd(self.listener.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// A connection's place under its port's limit; released on drop, on
/// whichever core the connection ends.
pub(crate) struct TcpSlot(Arc<PortListener>);

impl Drop for TcpSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Binds `port` on the public listener's address. No SO_REUSEPORT: a port
/// another process listens on must fail here.
fn bind(public: SocketAddr, port: u16) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(SocketAddr::new(public.ip(), port))?;
    l.set_nonblocking(true)?;
    // std listens with a backlog of 128; a burst of connections to a
    // tunnel port deserves what the public listener gets.
    // SAFETY: a valid listening socket; listen(2) again only resizes the
    // backlog.
    unsafe { libc::listen(l.as_raw_fd(), 4096) };
    Ok(l)
}

impl Shared {
    /// Claims one more uplink of `session` (see `claims.rs` for who may)
    /// with the TCP ports of the HELLO: plans the ports
    /// (`Claims::plan_ports`), binds the new ones, claims, and records the
    /// grant, all under the claims lock so two agents cannot both get a
    /// port. Returns the core the uplink goes to and the granted ports.
    pub(super) fn claim_with_ports(
        &self,
        hello: &Hello,
        who: &Claimant,
        here: usize,
        movable: bool,
    ) -> Result<(usize, Vec<u16>), Refusal> {
        if self.cfg.cluster.is_some() && hello.tcp.contains(&0) {
            // Every node must grant the same public port to the same
            // tunnel (the ports of a session are one address across the
            // cluster), and an agent's K uplinks handshake at the same
            // time, before any node sees another's grant: only a port the
            // agent names is the same everywhere.
            return Err(Refusal {
                code: ErrorCode::PortRefused,
                reason: "in a cluster every --tcp tunnel needs an explicit public port \
                         (--tcp LOCAL=PORT), the same on every node"
                    .into(),
            });
        }
        let now = Instant::now();
        let mut claims = self.claims();
        let before = claims.reservation(&hello.session, now);
        claims.expire(now);
        // A port whose lease just expired may be granted below: its old
        // listener (which routes to the old session) must go first.
        self.sync_tcp(&claims);
        let plan = claims.plan_ports(&hello.session, who, &hello.tcp, &self.cfg.tcp_ports, now)?;
        let mut fresh = Vec::new();
        {
            let open = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
            for &p in &plan {
                // Open already: the session's own port, local or held by
                // another node (`sync_tcp` left no other session's that
                // this node holds) ...
                if let Some(pl) = open.get(&p) {
                    if pl.session == hello.session {
                        continue;
                    }
                    // ... or another session's on another node.
                    return Err(Refusal {
                        code: ErrorCode::PortRefused,
                        reason: format!("TCP port {p} is taken by another session on another node"),
                    });
                }
                // On the public listener's address (the HTTPS one when
                // `--listen off`): TCP tunnels face the same network.
                let Some(public) = self.public_addr.or(self.https_addr) else {
                    return Err(Refusal {
                        code: ErrorCode::PortRefused,
                        reason: "this gateway has no public address for TCP tunnels".into(),
                    });
                };
                match bind(public, p) {
                    Ok(l) => fresh.push(Arc::new(PortListener {
                        port: p,
                        session: hello.session.clone(),
                        listener: l,
                        closed: AtomicBool::new(false),
                        active: AtomicUsize::new(0),
                    })),
                    Err(e) => {
                        return Err(Refusal {
                            code: ErrorCode::PortRefused,
                            reason: format!("TCP port {p} cannot be opened on the gateway: {e}"),
                        })
                    }
                }
            }
        }
        // A refused claim drops `fresh`, which closes the sockets.
        let target = claims.claim(&hello.session, who, here, movable, now)?;
        if !plan.is_empty() {
            claims.set_ports(&hello.session, plan.clone());
        }
        // The cores' lease replicas learn that the name is held now.
        self.announce(&claims, &hello.session, before, now);
        self.register_hold(&claims, &hello.session);
        let mut open = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        for pl in fresh {
            tracing::info!(port = pl.port, session = %pl.session, "TCP tunnel port opened");
            open.insert(pl.port, pl.clone());
            self.broadcast(|| CoreMsg::TcpListen(pl.clone()));
        }
        Ok((target, plan))
    }

    /// Closes the listeners of ports neither a claim here nor (in a
    /// cluster) another node's hold in the last view holds for their
    /// session any more. Called with the claims lock held, after every
    /// change that can drop a claim or a remote hold.
    pub(super) fn sync_tcp(&self, claims: &Claims) {
        let mut open = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        if open.is_empty() {
            return;
        }
        let held = claims.tcp_ports(Instant::now());
        let remote = self.remote_tcp.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|port, pl| {
            let keep = held.get(port) == Some(&pl.session) || remote.get(port) == Some(&pl.session);
            if !keep {
                tracing::info!(port, session = %pl.session, "TCP tunnel port closed");
                pl.close();
            }
            keep
        });
    }

    /// Takes a new cluster view (core 0, on every view): every TCP port
    /// that another node's hold lists gets a listener here too, unless a
    /// session of this node holds it (that one keeps it: the view's other
    /// holder conflicts, and connections here go to the local session),
    /// the port is outside this node's `--tcp-ports`, or it cannot be
    /// bound (logged; tried again with the next view). Its connections
    /// are served by a local uplink of the session if one appears, else
    /// forwarded to a holder (`serve`). Listeners of ports the view no
    /// longer shows held elsewhere, and not held here, are closed.
    /// Two sessions listing the same port on other nodes: the first by
    /// name gets it.
    pub(super) fn sync_cluster_tcp(&self, view: &crate::cluster::ClusterView) {
        let Some(me) = self.cfg.cluster.as_ref().map(|c| c.node.as_str()) else {
            return;
        };
        if self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        // Only holds that list ports, sorted so that every view gives a
        // port to the same session: a cluster without TCP tunnels costs a
        // walk over the view, never the claims lock.
        let mut listed: Vec<(&String, u16)> = Vec::new();
        for (s, holds) in &view.sessions {
            for (node, hold) in holds {
                if node != me && view.nodes.contains_key(node) {
                    listed.extend(hold.tcp.iter().map(|&p| (s, p)));
                }
            }
        }
        listed.sort_unstable();
        let mut remote: HashMap<u16, String> = HashMap::new();
        for (s, p) in listed {
            remote.entry(p).or_insert_with(|| s.clone());
        }
        if remote.is_empty()
            && self
                .remote_tcp
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
        {
            return;
        }
        let claims = self.claims();
        let changed = {
            let mut r = self.remote_tcp.lock().unwrap_or_else(|e| e.into_inner());
            let changed = *r != remote;
            *r = remote.clone();
            changed
        };
        if changed {
            self.sync_tcp(&claims);
        }
        let local = claims.tcp_ports(Instant::now());
        let Some(public) = self.public_addr.or(self.https_addr) else {
            return;
        };
        let mut ports: Vec<(u16, String)> = remote.into_iter().collect();
        ports.sort();
        let mut open = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        for (p, session) in ports {
            if open.contains_key(&p) {
                continue;
            }
            // Said once per change of the view's ports, not per view.
            if let Some(other) = local.get(&p) {
                if changed {
                    tracing::warn!(port = p, %session, local = %other, "TCP port held by a session here and by another on another node; this node keeps its own");
                }
                continue;
            }
            if !self.cfg.tcp_ports.contains(p) {
                if changed {
                    tracing::warn!(port = p, %session, "TCP port held on another node is outside --tcp-ports here; not opened");
                }
                continue;
            }
            match bind(public, p) {
                Ok(l) => {
                    let pl = Arc::new(PortListener {
                        port: p,
                        session,
                        listener: l,
                        closed: AtomicBool::new(false),
                        active: AtomicUsize::new(0),
                    });
                    tracing::info!(port = p, session = %pl.session, "TCP tunnel port opened for a session on another node");
                    open.insert(p, pl.clone());
                    self.broadcast(|| CoreMsg::TcpListen(pl.clone()));
                }
                Err(e) if changed => {
                    tracing::warn!(port = p, %session, error = %e, "cannot open the TCP port of a session on another node");
                }
                Err(e) => {
                    tracing::debug!(port = p, %session, error = %e, "cannot open the TCP port of a session on another node");
                }
            }
        }
    }

    /// Drops expired leases and closes their ports (core 0, once a second,
    /// while any TCP port is open).
    pub(super) fn expire_tcp(&self) {
        if self.tcp.lock().map(|m| m.is_empty()).unwrap_or(true) {
            return;
        }
        let mut claims = self.claims();
        claims.expire(Instant::now());
        self.sync_tcp(&claims);
    }

    /// Closes every TCP tunnel listener (gateway shutdown).
    pub(super) fn close_tcp(&self) {
        let mut open = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        for pl in open.values() {
            pl.close();
        }
        open.clear();
    }

    /// Prometheus lines for TCP tunnels.
    pub(super) fn tcp_metrics(&self) -> String {
        let (ports, conns) = {
            let open = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
            let conns: usize = open
                .values()
                .map(|p| p.active.load(Ordering::Relaxed))
                .sum();
            (open.len(), conns)
        };
        let sum = |f: fn(&CoreStats) -> &AtomicU64| -> u64 {
            self.stats.iter().map(|c| CoreStats::get(f(c))).sum()
        };
        format!(
            "# HELP ringtunnel_tcp_ports Open TCP tunnel ports.\n\
             # TYPE ringtunnel_tcp_ports gauge\nringtunnel_tcp_ports {ports}\n\
             # HELP ringtunnel_tcp_connections Public TCP tunnel connections open.\n\
             # TYPE ringtunnel_tcp_connections gauge\nringtunnel_tcp_connections {conns}\n\
             # HELP ringtunnel_tcp_connections_total Public TCP tunnel connections served.\n\
             # TYPE ringtunnel_tcp_connections_total counter\n\
             ringtunnel_tcp_connections_total {}\n\
             # HELP ringtunnel_tcp_bytes_total TCP tunnel bytes, by direction.\n\
             # TYPE ringtunnel_tcp_bytes_total counter\n\
             ringtunnel_tcp_bytes_total{{direction=\"in\"}} {}\n\
             ringtunnel_tcp_bytes_total{{direction=\"out\"}} {}\n\
             # HELP ringtunnel_tcp_refused_total TCP tunnel connections closed at accept.\n\
             # TYPE ringtunnel_tcp_refused_total counter\n\
             ringtunnel_tcp_refused_total{{reason=\"over_limit\"}} {}\n\
             ringtunnel_tcp_refused_total{{reason=\"no_agent\"}} {}\n\
             # HELP ringtunnel_tcp_forwarded_total TCP tunnel connections served by another node over a peer link.\n\
             # TYPE ringtunnel_tcp_forwarded_total counter\nringtunnel_tcp_forwarded_total {}\n\
             # HELP ringtunnel_tcp_port_refusals_total Agent handshakes refused for a TCP port.\n\
             # TYPE ringtunnel_tcp_port_refusals_total counter\n\
             ringtunnel_tcp_port_refusals_total {}\n",
            sum(|c| &c.tcp_conns_total),
            sum(|c| &c.tcp_bytes_in),
            sum(|c| &c.tcp_bytes_out),
            self.tcp_counters.over_limit.load(Ordering::Relaxed),
            self.tcp_counters.no_agent.load(Ordering::Relaxed),
            self.tcp_counters.forwarded.load(Ordering::Relaxed),
            self.tcp_counters.port_refused.load(Ordering::Relaxed),
        )
    }

    /// `"tcp":{...}` for /stats.
    pub(super) fn tcp_json(&self) -> String {
        let open = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        let mut ports: Vec<String> = open
            .values()
            .map(|p| {
                format!(
                    "{{\"port\":{},\"session\":\"{}\",\"connections\":{}}}",
                    p.port,
                    p.session,
                    p.active.load(Ordering::Relaxed)
                )
            })
            .collect();
        ports.sort();
        format!(
            "\"tcp\":{{\"ports\":[{}],\"refused_over_limit\":{},\"refused_no_agent\":{},\"forwarded\":{}}}",
            ports.join(","),
            self.tcp_counters.over_limit.load(Ordering::Relaxed),
            self.tcp_counters.no_agent.load(Ordering::Relaxed),
            self.tcp_counters.forwarded.load(Ordering::Relaxed)
        )
    }
}

/// Starts this core's accept loop on a new port.
pub(super) fn listen(core: &Rc<Core>, pl: Arc<PortListener>) {
    if pl.closed.load(Ordering::SeqCst) {
        return;
    }
    let l = match pl.listener.try_clone() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(port = pl.port, error = %e, "cannot share a TCP tunnel listener");
            return;
        }
    };
    let l = match monoio::net::TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(port = pl.port, error = %e, "cannot listen on a TCP tunnel port");
            return;
        }
    };
    let c = core.clone();
    crate::runtime::spawn_isolated("tcp-accept", async move {
        accept_loop(c, pl, l).await;
    });
}

async fn accept_loop(core: Rc<Core>, pl: Arc<PortListener>, l: monoio::net::TcpListener) {
    let closed = || pl.closed.load(Ordering::SeqCst);
    super::guard::accept_until_stopped(l, "tcp tunnel", closed, |sock, peer| {
        let max = core.cfg().tcp_max_conns_per_port;
        if pl.active.fetch_add(1, Ordering::SeqCst) >= max {
            pl.active.fetch_sub(1, Ordering::SeqCst);
            core.shared
                .tcp_counters
                .over_limit
                .fetch_add(1, Ordering::Relaxed);
            return; // dropped: closed at once
        }
        let slot = TcpSlot(pl.clone());
        let c = core.clone();
        crate::runtime::spawn_isolated("tcp-conn", async move {
            serve(c, sock, peer, slot, 0).await;
        });
    })
    .await;
}

/// Takes over a TCP tunnel connection handed to this core.
pub(super) fn adopt(core: Rc<Core>, fd: OwnedFd, peer: SocketAddr, slot: TcpSlot) {
    let std_stream = std::net::TcpStream::from(fd);
    let _ = std_stream.set_nonblocking(true);
    let Ok(sock) = TcpStream::from_std(std_stream) else {
        return;
    };
    crate::runtime::spawn_isolated("tcp-conn", async move {
        serve(core, sock, peer, slot, 1).await;
    });
}

/// Counts a connection on this core's gauges while it lives.
struct ConnGauge(Arc<CoreStats>);

impl Drop for ConnGauge {
    fn drop(&mut self) {
        CoreStats::dec(&self.0.tcp_conns);
    }
}

async fn serve(core: Rc<Core>, sock: TcpStream, peer: SocketAddr, slot: TcpSlot, hops: u8) {
    let session = slot.0.session.clone();
    let Some(up) = core.pick_uplink(&session) else {
        // No uplink here: the core that has one serves it.
        if hops == 0 {
            if let Some(k) = core.remote_core_for(&session, usize::from(peer.port())) {
                // dup, then let monoio close its own fd: never
                // `into_raw_fd` (docs/ARCHITECTURE.md, handoffs).
                let fd = sock.as_raw_fd();
                // SAFETY: `fd` is a valid open socket for this call.
                let dup = unsafe { libc::dup(fd) };
                drop(sock);
                if dup >= 0 {
                    // SAFETY: `dup` is a new descriptor we own.
                    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
                    CoreStats::inc(&core.stats.handoffs_out);
                    let _ = core.shared.mailboxes[k].send(CoreMsg::TcpConn { fd, peer, slot });
                }
                return;
            }
        }
        // No core of this node has one: a node of the cluster that does
        // serves it over a peer link.
        let links = crate::cluster::peer::links_for(&core, &session);
        if !links.is_empty() {
            let client = peer;
            if forward(&core, sock, client, &slot, links).await {
                return;
            }
            tracing::debug!(port = slot.0.port, %session, "TCP connection closed: every holder said NOT_HERE");
        }
        core.shared
            .tcp_counters
            .no_agent
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(port = slot.0.port, %session, "TCP connection closed: no agent");
        return;
    };
    let open = TcpOpen {
        port: slot.0.port,
        client: peer,
    };
    let Some(stream) = up.open_stream(open.encode()) else {
        core.shared
            .tcp_counters
            .no_agent
            .fetch_add(1, Ordering::Relaxed);
        return;
    };
    let connected = Some(core.cfg().response_timeout);
    relay_counted(&core, sock, &stream, connected, &slot, peer, "local").await;
}

/// Relays an opened TCP tunnel stream (local or forwarded, `via`) to its
/// socket and counts it: the connection gauges while it lasts, its bytes
/// when it ends. `expect_connected`: the agent's "connected" is still to
/// come (a local stream; a forwarded one was answered already).
async fn relay_counted(
    core: &Core,
    sock: TcpStream,
    stream: &crate::io::uplink::Stream,
    expect_connected: Option<std::time::Duration>,
    slot: &TcpSlot,
    client: SocketAddr,
    via: &'static str,
) {
    let _ = sock.set_nodelay(true);
    CoreStats::inc(&core.stats.tcp_conns);
    CoreStats::inc(&core.stats.tcp_conns_total);
    let _gauge = ConnGauge(core.stats.clone());
    let stall = core.cfg().write_stall_timeout;
    let r = crate::io::relay::tcp_relay(sock, stream, expect_connected, stall).await;
    core.stats.tcp_bytes_in.fetch_add(r.sent, Ordering::Relaxed);
    core.stats
        .tcp_bytes_out
        .fetch_add(r.received, Ordering::Relaxed);
    tracing::debug!(
        port = slot.0.port,
        session = %slot.0.session,
        %client,
        via,
        sent = r.sent,
        received = r.received,
        clean = r.clean,
        "TCP tunnel connection closed"
    );
}

/// Serves a TCP tunnel connection over a peer link to a node holding its
/// session, trying `links` in order. The OPEN is the one this node would
/// send its own agent (same port, the client's address) behind the peer
/// prefix; the holder opens it on its uplink unchanged. This side waits
/// for the agent's "connected" head (within `--response-timeout`) before
/// relaying, so a holder that answers RESET NOT_HERE sends the connection
/// to the next holder with nothing of it lost (the client's first bytes
/// wait in the socket). Anything else before "connected" closes the
/// connection. `false`: every holder said NOT_HERE or took no stream;
/// the socket was not touched.
async fn forward(
    core: &Rc<Core>,
    sock: TcpStream,
    client: SocketAddr,
    slot: &TcpSlot,
    links: Vec<Rc<crate::io::uplink::Uplink>>,
) -> bool {
    let session = &slot.0.session;
    let open = TcpOpen {
        port: slot.0.port,
        client,
    };
    let payload = crate::cluster::prefix::encode(1, session, &open.encode());
    let cfg = core.cfg();
    for link in links {
        let Some(stream) = link.open_stream(payload.clone()) else {
            continue;
        };
        CoreStats::inc(&core.stats.forwarded_out);
        match monoio::time::timeout(cfg.response_timeout, stream.recv()).await {
            Ok(Inbound::Head(h)) if h.as_ref() == crate::proto::tcp::TCP_CONNECTED => {}
            Ok(Inbound::Reset(ErrorCode::NotHere)) => {
                CoreStats::inc(&core.stats.forward_retries);
                continue;
            }
            other => {
                // The agent refused or never answered: the client's
                // connection ends here, as for a local agent.
                tracing::debug!(port = slot.0.port, %session, answer = ?other.map(|i| inbound_kind(&i)), "forwarded TCP connection not connected");
                stream.reset(ErrorCode::Cancel);
                return true;
            }
        }
        core.shared
            .tcp_counters
            .forwarded
            .fetch_add(1, Ordering::Relaxed);
        relay_counted(core, sock, &stream, None, slot, client, "forwarded").await;
        return true;
    }
    false
}

fn inbound_kind(i: &Inbound) -> &'static str {
    match i {
        Inbound::Head(_) => "head",
        Inbound::Data(_) => "data",
        Inbound::End => "end",
        Inbound::Reset(_) => "reset",
        Inbound::Gone => "gone",
    }
}
