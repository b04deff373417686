//! Peer links: how a request reaches the node holding its session.
//!
//! Owns, per gateway core: the links this core dialed to every other node
//! of its current [`ClusterView`] (`Peers`), the links other nodes dialed
//! to it, the peer listener's handshake, and the splice that serves a
//! forwarded stream over a local uplink.
//!
//! A peer link is an ordinary uplink (`io::uplink::Uplink`: the same
//! frames, credit, heartbeats and batched writer). The dialing core is
//! its `Role::Gateway` side (it opens streams); the accepting core is its
//! `Role::Agent` side. The handshake is HELLO with `CAP_PEER`, `session` =
//! the dialing node's name and `token` = the cluster secret (compared in
//! constant time; anything else: REFUSE AUTH_FAILED), then ACCEPT; the
//! whole handshake is bounded by [`HANDSHAKE_TIMEOUT`].
//!
//! Dialing: each core keeps one long-lived link per other node in its
//! view. A node that appears gets a link; while it stays, a link that
//! fails is redialed with backoff ([`BACKOFF_MIN`] doubling to
//! [`BACKOFF_MAX`], jittered); a node that leaves the view has its link
//! closed. A link that drops, or that got GOAWAY, makes its node
//! unreachable on this core at that moment (routing only takes open
//! links), not when the node's etcd lease runs out.
//!
//! Peer links are plain TCP: the cluster secret and the forwarded
//! requests cross them unencrypted, so `--peer-listen` belongs on a
//! private network between the nodes.
//!
//! Liveness: peer links ping every `min(--heartbeat, 1 s)` and are dead
//! after three intervals without a frame, so a blackholed node is skipped
//! within 3 s (plus at most one timer tick, ~1 ms) of its last frame.
//!
//! Serving a forwarded stream (the accepting side): the OPEN carries the
//! peer prefix (`prefix.rs`); hops must be 1, or the stream is reset
//! PROTOCOL_ERROR (one hop at most, so a stream never loops). The session
//! must have an uplink on this core taking streams (`Core::pick_uplink`),
//! else RESET NOT_HERE: the forwarding node may try another holder. Then
//! the original payload is opened on that uplink unchanged (the
//! forwarding node already wrote the forwarding headers) and the two
//! streams are spliced: heads, DATA, END and RESET pass through each way,
//! and each received chunk is held until it was queued on the other
//! stream under that stream's credit. So credit flows end to end: a
//! client that stops reading stops the agent, and a spliced stream holds
//! at most one stream window (256 KiB by default) per direction on each of
//! its two links, and all of a peer link's streams together at most its
//! connection window (16 MiB by default) per direction, as on any uplink.
//! Either side ending, resetting or vanishing ends the other.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::net::{TcpListener, TcpStream};
use subtle::ConstantTimeEq;

use super::prefix;
use super::ClusterView;
use crate::gateway::Core;
use crate::io::stats::{CoreStats, ErrorKind};
use crate::io::transport::{Transport, UplinkParams};
use crate::io::uplink::{Inbound, Stream, Uplink};
use crate::io::watchdog::Watchdog;
use crate::proto::{
    Accept, ErrorCode, Frame, FrameType, Heartbeat, Hello, Limits, Role, CAP_PEER, MIN_MAX_FRAME,
    PROTOCOL_VERSION,
};
use crate::runtime::notify::Notify;

/// Bound on a peer handshake (connect, HELLO, ACCEPT), either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Peer links ping at least this often.
pub const PING_MAX: Duration = Duration::from_secs(1);
/// First wait before redialing a node; doubles per failure up to
/// [`BACKOFF_MAX`], each wait jittered to 50-150 %.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The heartbeat of a peer link: the gateway's, but pinging at least
/// every [`PING_MAX`], dead after three intervals without a frame.
pub fn heartbeat(base: Heartbeat) -> Heartbeat {
    if base.interval <= PING_MAX {
        base
    } else {
        Heartbeat::from_interval(PING_MAX)
    }
}

/// One node this core keeps a link to.
struct Slot {
    node: String,
    addr: Cell<SocketAddr>,
    link: RefCell<Option<Rc<Uplink>>>,
    /// Still in the view; the dialer ends once this is false.
    wanted: Cell<bool>,
    /// Wakes the dialer: the link drained or closed, the address changed,
    /// or the node left the view.
    wake: Notify,
}

/// One core's peer links.
#[derive(Default)]
pub(crate) struct Peers {
    /// Links this core dialed, by node name.
    dialed: RefCell<HashMap<String, Rc<Slot>>>,
    /// Links other nodes dialed to this core.
    accepted: RefCell<Vec<Rc<Uplink>>>,
    /// Round robin over a session's ready holders.
    next: Cell<usize>,
}

impl Peers {
    /// This core's link to `node` if it takes new streams now.
    fn open_link(&self, node: &str) -> Option<Rc<Uplink>> {
        let d = self.dialed.borrow();
        let l = d.get(node)?.link.borrow().clone()?;
        (l.is_open() && l.has_capacity()).then_some(l)
    }

    /// Every peer link of this core, both directions (shutdown).
    pub(crate) fn all_links(&self) -> Vec<Rc<Uplink>> {
        let mut v: Vec<Rc<Uplink>> = self
            .dialed
            .borrow()
            .values()
            .filter_map(|s| s.link.borrow().clone())
            .collect();
        v.extend(self.accepted.borrow().iter().cloned());
        v
    }

    /// Links other nodes dialed to this core (they forward to us on them).
    pub(crate) fn accepted_links(&self) -> Vec<Rc<Uplink>> {
        self.accepted.borrow().clone()
    }

    /// Stops every dialer (shutdown): none redials.
    pub(crate) fn stop_dialing(&self) {
        for s in self.dialed.borrow().values() {
            s.wanted.set(false);
            s.wake.notify();
        }
    }
}

fn me(core: &Core) -> Option<&str> {
    core.shared.cfg.cluster.as_ref().map(|c| c.node.as_str())
}

/// Whether the view has a node other than this one holding `session`
/// (reachable or not): the name is a site of this cluster.
pub(crate) fn held_elsewhere(core: &Core, session: &str) -> bool {
    let Some(me) = me(core) else { return false };
    let view = core.cluster.borrow();
    view.sessions
        .get(session)
        .is_some_and(|h| h.keys().any(|n| n != me && view.nodes.contains_key(n)))
}

/// Open links of this core to the nodes holding `session`, in the order
/// to try them: ready holders first, rotated round robin (per core) so
/// that requests spread over them, then draining ones. Nodes whose link
/// is down are left out.
pub(crate) fn links_for(core: &Core, session: &str) -> Vec<Rc<Uplink>> {
    let Some(me) = me(core) else {
        return Vec::new();
    };
    let view = core.cluster.borrow().clone();
    let holders = view.holders(session, me);
    let ready = holders
        .iter()
        .take_while(|n| n.state == super::NodeState::Ready)
        .count();
    let mut order: Vec<&str> = holders.iter().map(|n| n.name.as_str()).collect();
    if ready > 1 {
        let n = core.peers.next.get();
        core.peers.next.set(n.wrapping_add(1));
        order[..ready].rotate_left(n % ready);
    }
    order
        .into_iter()
        .filter_map(|n| core.peers.open_link(n))
        .collect()
}

/// Takes a new view: dials nodes that appeared, redirects links whose
/// node moved, closes links to nodes that left.
pub(crate) fn sync(core: &Rc<Core>, view: &ClusterView) {
    let Some(me) = me(core).map(str::to_string) else {
        return;
    };
    if core.shared.shutting_down.load(Ordering::Relaxed) {
        return;
    }
    let mut gone = Vec::new();
    let mut moved = Vec::new();
    {
        let mut d = core.peers.dialed.borrow_mut();
        d.retain(|name, slot| {
            let keep = view.nodes.contains_key(name);
            if !keep {
                gone.push(slot.clone());
            }
            keep
        });
        for n in view.nodes.values().filter(|n| n.name != me) {
            match d.get(&n.name) {
                Some(s) if s.addr.get() != n.peer => {
                    s.addr.set(n.peer);
                    moved.push(s.clone());
                }
                Some(_) => {}
                None => {
                    let s = Rc::new(Slot {
                        node: n.name.clone(),
                        addr: Cell::new(n.peer),
                        link: RefCell::new(None),
                        wanted: Cell::new(true),
                        wake: Notify::new(),
                    });
                    d.insert(n.name.clone(), s.clone());
                    let c = core.clone();
                    crate::runtime::spawn_isolated("peer-dialer", async move {
                        keep_link(c, s).await;
                    });
                }
            }
        }
    }
    // Outside the borrow: closing runs handlers that may look at `dialed`.
    for s in gone {
        s.wanted.set(false);
        s.wake.notify();
        let link = s.link.borrow_mut().take();
        if let Some(l) = link {
            l.close_now("node left the cluster view");
        }
    }
    for s in moved {
        let link = s.link.borrow().clone();
        if let Some(l) = link {
            // New streams go to the new address; these finish.
            l.go_away(ErrorCode::Shutdown, "peer address changed");
        }
        s.wake.notify();
    }
}

/// Keeps `slot`'s link up while its node is in the view.
async fn keep_link(core: Rc<Core>, slot: Rc<Slot>) {
    let stopping = |c: &Core| c.shared.shutting_down.load(Ordering::Relaxed);
    let mut backoff = BACKOFF_MIN;
    // One WARN per outage, the retries at DEBUG.
    let mut warned = false;
    let mut seed = (core.index as u64 + 1)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(std::process::id() as u64)
        | 1;
    while slot.wanted.get() && !stopping(&core) {
        let addr = slot.addr.get();
        match dial(&core, &slot.node, addr).await {
            Ok(up) => {
                backoff = BACKOFF_MIN;
                warned = false;
                tracing::info!(core = core.index, node = %slot.node, %addr, "peer link up");
                *slot.link.borrow_mut() = Some(up.clone());
                let w = Rc::downgrade(&slot);
                // Runs on GOAWAY either way and on close.
                up.set_drain_handler(move || {
                    if let Some(s) = w.upgrade() {
                        s.wake.notify();
                    }
                });
                while up.is_open() && slot.wanted.get() && slot.addr.get() == addr {
                    slot.wake.notified().await;
                }
                if !slot.wanted.get() || stopping(&core) {
                    // Left in place: a node that left the view had it
                    // closed by `sync`, a stopping core closes it last.
                    return;
                }
                let current = slot
                    .link
                    .borrow()
                    .as_ref()
                    .is_some_and(|l| Rc::ptr_eq(l, &up));
                if current {
                    slot.link.borrow_mut().take();
                }
                let why = up.close_reason().unwrap_or_else(|| "draining".into());
                tracing::info!(core = core.index, node = %slot.node, reason = %why, "peer link down");
                // A drained link finishes its streams and is closed by
                // its peer; a new one takes new streams meanwhile.
            }
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(core = core.index, node = %slot.node, %addr, error = %e, "cannot link to peer node; retrying");
            }
            Err(e) => {
                tracing::debug!(core = core.index, node = %slot.node, %addr, error = %e, "peer dial failed");
            }
        }
        if !slot.wanted.get() || stopping(&core) {
            return;
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let wait = backoff.mul_f64(0.5 + (seed % 1000) as f64 / 1000.0);
        monoio::select! {
            _ = monoio::time::sleep(wait) => {}
            _ = slot.wake.notified() => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Connects to `node` at `addr` and runs the dialing side's handshake.
async fn dial(core: &Rc<Core>, node: &str, addr: SocketAddr) -> Result<Rc<Uplink>, String> {
    let cluster = core.shared.cfg.cluster.as_ref().ok_or("not in a cluster")?;
    let stream = match monoio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect_addr(addr)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("connect timed out".into()),
    };
    let wd = Watchdog::start(stream.as_raw_fd(), libc::SHUT_RDWR);
    wd.arm(HANDSHAKE_TIMEOUT);
    wd.arm_write(HANDSHAKE_TIMEOUT);
    let cores = core.shared.mailboxes.len();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        capabilities: CAP_PEER,
        agent_id: 0,
        uplink_index: core.index as u16,
        uplinks_total: cores as u16,
        token: cluster.secret.clone(),
        session: cluster.node.clone(),
        tcp: Vec::new(),
    };
    let mut conn = Transport::plain(stream);
    let (res, leftover) = match conn.write_frame(&Frame::hello(&hello)).await {
        Ok(()) => {
            conn.read_frame(BytesMut::with_capacity(1024), MIN_MAX_FRAME)
                .await
        }
        Err(e) => (Err(e), BytesMut::new()),
    };
    let fired = wd.fired();
    drop(wd);
    if fired {
        return Err("no handshake answer in time".into());
    }
    let f = res.map_err(|e| e.to_string())?;
    match f.kind {
        FrameType::Accept => {}
        FrameType::Refuse => {
            let (code, reason) = f.parse_refuse().map_err(|e| e.to_string())?;
            tracing::warn!(core = core.index, node, %addr, %code, reason = ?crate::limits::log_safe(&reason), "peer refused our link");
            return Err(format!("refused: {reason} ({code})"));
        }
        other => return Err(format!("unexpected {other:?} in the handshake")),
    }
    let acc = f.parse_accept().map_err(|e| e.to_string())?;
    if acc.capabilities & CAP_PEER == 0 {
        return Err("the peer does not take peer links".into());
    }
    let limits = Limits {
        max_frame: acc.max_frame,
        stream_window: acc.stream_window,
        conn_window: acc.conn_window,
        max_streams: acc.max_streams,
    };
    Ok(start_link(
        core,
        conn,
        leftover,
        node,
        Role::Gateway,
        limits,
    ))
}

/// Starts a peer link's tasks and counts it (`peer_links`, and
/// `uplinks`, whose driver it shares).
fn start_link(
    core: &Rc<Core>,
    conn: Transport,
    leftover: BytesMut,
    node: &str,
    role: Role,
    limits: Limits,
) -> Rc<Uplink> {
    let up = conn.start_uplink(
        leftover,
        UplinkParams {
            id: core.shared.next_uplink_id(),
            core: core.index,
            session: format!("peer:{node}"),
            role,
            limits,
            heartbeat: heartbeat(core.cfg().heartbeat),
            stats: core.stats.clone(),
        },
    );
    CoreStats::inc(&core.stats.peer_links);
    let stats = core.stats.clone();
    let me = Rc::downgrade(core);
    let id = up.id;
    up.set_close_handler(move || {
        CoreStats::dec(&stats.peer_links);
        if let Some(core) = me.upgrade() {
            core.peers.accepted.borrow_mut().retain(|u| u.id != id);
        }
    });
    up
}

/// The peer listener of one core (`--peer-listen`).
pub(crate) async fn accept_loop(core: Rc<Core>, listener: TcpListener, stop: Rc<Cell<bool>>) {
    crate::gateway::guard::accept_until_stopped(
        listener,
        "peer",
        || stop.get(),
        |stream, peer| {
            // The tunnel port's admission: handshake slots and bans.
            let Some(slot) = crate::gateway::guard::admit_tunnel(&core, peer) else {
                return;
            };
            let c = core.clone();
            crate::runtime::spawn_isolated("peer-handshake", async move {
                handshake(c, stream, peer).await;
                drop(slot);
            });
        },
    )
    .await;
}

async fn refuse(conn: &mut Transport, core: &Core, peer: SocketAddr, code: ErrorCode, why: &str) {
    core.stats.error(ErrorKind::HandshakeRefused);
    tracing::warn!(core = core.index, %peer, reason = ?crate::limits::log_safe(why), "peer link refused");
    if code != ErrorCode::Shutdown {
        core.shared.limits.handshake_failed(peer.ip());
    }
    let _ = conn.write_frame(&Frame::refuse(code, why)).await;
}

/// The accepting side's handshake.
async fn handshake(core: Rc<Core>, stream: TcpStream, peer: SocketAddr) {
    let Some(cluster) = core.shared.cfg.cluster.clone() else {
        return;
    };
    let wd = Watchdog::start(stream.as_raw_fd(), libc::SHUT_RDWR);
    wd.arm(HANDSHAKE_TIMEOUT);
    wd.arm_write(HANDSHAKE_TIMEOUT);
    let mut conn = Transport::plain(stream);
    let (res, leftover) = conn
        .read_frame(BytesMut::with_capacity(1024), MIN_MAX_FRAME)
        .await;
    let frame = match res {
        Ok(f) => f,
        Err(e) => {
            core.stats.error(ErrorKind::Protocol);
            tracing::debug!(core = core.index, %peer, error = %e, timed_out = wd.fired(), "peer handshake failed");
            return;
        }
    };
    if frame.kind != FrameType::Hello {
        return refuse(
            &mut conn,
            &core,
            peer,
            ErrorCode::ProtocolError,
            "expected HELLO",
        )
        .await;
    }
    let hello = match frame.parse_hello() {
        Ok(h) => h,
        Err(e) => return refuse(&mut conn, &core, peer, e.code(), &e.to_string()).await,
    };
    if hello.capabilities & CAP_PEER == 0 {
        let why = "this is a peer port: agents connect to the tunnel port";
        return refuse(&mut conn, &core, peer, ErrorCode::ProtocolError, why).await;
    }
    let ok: bool = hello
        .token
        .as_bytes()
        .ct_eq(cluster.secret.as_bytes())
        .into();
    if !ok {
        return refuse(
            &mut conn,
            &core,
            peer,
            ErrorCode::AuthFailed,
            "bad cluster secret",
        )
        .await;
    }
    if core.shared.shutting_down.load(Ordering::Relaxed) {
        let why = "node is shutting down";
        return refuse(&mut conn, &core, peer, ErrorCode::Shutdown, why).await;
    }
    let limits = core.cfg().limits;
    let accept = Accept {
        capabilities: CAP_PEER,
        ..core.accept_base(&limits)
    };
    if conn.write_frame(&Frame::accept(&accept)).await.is_err() {
        return;
    }
    // Stopped before the link's own deadlines take over.
    drop(wd);
    tracing::info!(core = core.index, node = %hello.session, %peer, "peer link accepted");
    let up = start_link(&core, conn, leftover, &hello.session, Role::Agent, limits);
    core.peers.accepted.borrow_mut().push(up.clone());
    let c = Rc::downgrade(&core);
    up.set_open_handler(move |stream, payload| {
        let Some(core) = c.upgrade() else { return };
        crate::runtime::spawn_isolated("peer-stream", async move {
            serve_forwarded(core, stream, payload).await;
        });
    });
}

/// Serves one forwarded stream: over a local uplink of its session, or
/// reset NOT_HERE.
async fn serve_forwarded(core: Rc<Core>, peer: Stream, payload: Bytes) {
    CoreStats::inc(&core.stats.forwarded_in);
    let fwd = match prefix::parse(&payload) {
        Ok(f) => f,
        Err(e) => {
            core.stats.error(ErrorKind::Protocol);
            tracing::debug!(core = core.index, error = %e, "bad forwarded OPEN");
            peer.reset(ErrorCode::ProtocolError);
            return;
        }
    };
    let Some(up) = core.pick_uplink(&fwd.session) else {
        peer.reset(ErrorCode::NotHere);
        return;
    };
    let Some(local) = up.open_stream(fwd.open) else {
        peer.reset(ErrorCode::Overloaded);
        return;
    };
    let _inflight = crate::gateway::InFlight::enter(&*core);
    crate::runtime::join2(pipe(&local, &peer, true), pipe(&peer, &local, false)).await;
}

/// One direction of a splice: everything `from` receives goes to `to`.
/// `heads`: response heads may come this way (agent -> forwarding node).
async fn pipe(from: &Stream, to: &Stream, heads: bool) {
    loop {
        match from.recv().await {
            Inbound::Head(h) if heads => to.send_head(h),
            Inbound::Head(_) => {
                from.reset(ErrorCode::ProtocolError);
                to.reset(ErrorCode::ProtocolError);
                return;
            }
            Inbound::Data(chunk) => {
                // The chunk's credit returns once `to` took the bytes
                // under its own credit: end-to-end flow control.
                if to.send_data(chunk.bytes().clone()).await.is_err() {
                    from.reset(ErrorCode::Cancel);
                    return;
                }
                drop(chunk);
            }
            Inbound::End => {
                to.send_end();
                return;
            }
            Inbound::Reset(code) => {
                to.reset(code);
                return;
            }
            Inbound::Gone => {
                // Its link closed: the other side hears CANCEL (a stream
                // of the forwarding node answers 502).
                to.reset(ErrorCode::Cancel);
                return;
            }
        }
    }
}
