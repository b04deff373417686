//! Uplink side of the gateway: accept, handshake, placement.
//!
//! An agent's uplink lands on whichever core the kernel's SO_REUSEPORT
//! hash picks. With TLS configured, the TLS handshake runs there first.
//! After HELLO, the token is checked against the rules (`scope.rs`: its
//! secret, and whether its scope covers the name), then the claim registry
//! (`claims.rs`) decides whether this agent may hold the name and chooses the core holding the fewest
//! uplinks of that session; if that is another core, the socket (and any
//! bytes read past HELLO) moves there through its mailbox, and that core
//! sends ACCEPT. So a session with K >= cores uplinks ends up with one on
//! every core and public requests rarely need a handoff.
//!
//! A TLS uplink never moves: its session state (keys, sequence numbers,
//! buffered records) lives in this core's memory and cannot follow the fd.
//! It is served by the core that accepted it, and counted there, so the
//! registry still balances the plaintext uplinks around it
//! (docs/ARCHITECTURE.md, "Uplink placement", has the trade-off).
//!
//! The header timeout bounds the whole handshake (TLS, then HELLO): one
//! watchdog shuts the socket down when it passes.

use std::cell::Cell;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use monoio::net::{TcpListener, TcpStream};

use super::claims::{Claimant, Holder};
use super::{Core, CoreMsg};
use crate::io::stats::ErrorKind;
use crate::io::transport::{Transport, UplinkParams};
use crate::io::watchdog::Watchdog;
use crate::proto::{
    Accept, AcceptNode, ErrorCode, Frame, FrameType, Hello, PublicEndpoint, CAP_CLUSTER,
    CAP_PUBLIC_URL,
};
use crate::scope::{self, Verdict};

const HANDSHAKE_MAX: u32 = 64 * 1024;

thread_local! {
    static TLS_ON_PLAIN: std::cell::RefCell<crate::limits::LogLimiter> =
        std::cell::RefCell::new(crate::limits::LogLimiter::new(std::time::Duration::from_secs(60)));
}

/// A WARN at most once a minute per core, counting the ones left out.
pub(crate) fn log_once_a_minute(
    limiter: &'static std::thread::LocalKey<std::cell::RefCell<crate::limits::LogLimiter>>,
    what: &str,
) {
    limiter.with(|l| {
        if let Some(n) = l.borrow_mut().allow(std::time::Instant::now()) {
            if n > 0 {
                tracing::warn!("{what} ({n} more since the last such line)");
            } else {
                tracing::warn!("{what}");
            }
        }
    });
}

/// The start of an HTTP request line (`GET / HTTP/1.1`): a method token
/// then a space, where a HELLO starts with its length. Read as a frame
/// header, "GET " is a 1.2 GB payload length.
pub(crate) fn looks_like_http_request(b: &[u8]) -> bool {
    let Some(sp) = b.iter().take(16).position(|&c| c == b' ') else {
        return false;
    };
    sp > 0 && b[..sp].iter().all(u8::is_ascii_uppercase)
}

pub(super) async fn accept_loop(core: Rc<Core>, listener: TcpListener, stop: Rc<Cell<bool>>) {
    super::guard::accept_until_stopped(
        listener,
        "tunnel",
        || stop.get(),
        |stream, peer| {
            // Banned IP or too many handshakes here: closed unread.
            let Some(slot) = super::guard::admit_tunnel(&core, peer) else {
                return;
            };
            let c = core.clone();
            crate::runtime::spawn_isolated("uplink-handshake", async move {
                handshake(c, stream).await;
                drop(slot);
            });
        },
    )
    .await;
}

async fn refuse(conn: &mut Transport, core: &Core, code: ErrorCode, reason: &str) {
    core.stats.error(ErrorKind::HandshakeRefused);
    if code == ErrorCode::PortRefused {
        core.shared
            .tcp_counters
            .port_refused
            .fetch_add(1, Ordering::Relaxed);
    }
    // Reasons can carry agent-supplied text (a session name): escaped and
    // truncated. A refusal counts toward the peer's handshake ban.
    let peer = super::guard::peer_of(conn.fd());
    tracing::warn!(
        core = core.index,
        peer = %peer.map_or("unknown".to_string(), |p| p.to_string()),
        reason = ?crate::limits::log_safe(reason),
        "uplink refused"
    );
    if let (Some(p), false) = (peer, code == ErrorCode::Shutdown) {
        core.shared.limits.handshake_failed(p.ip());
    }
    let _ = conn.write_frame(&Frame::refuse(code, reason)).await;
}

/// Who the agent is as a claimant of its session, or why it is refused:
/// an unknown token, or a name outside the token's scope. Checked against
/// the tokens current at this handshake (reloads swap them;
/// `Shared::live`).
fn claimant(live: &super::Live, hello: &Hello) -> Result<Claimant, (ErrorCode, String)> {
    let rules = &live.tokens;
    let (holder, rule) = match scope::authorize(rules, &hello.token, &hello.session) {
        Verdict::Open => (Holder::Open(hello.token.clone()), None),
        Verdict::Rule(i) => (Holder::Rule(rules[i].secret.sha256()), Some(&rules[i])),
        Verdict::BadToken => return Err((ErrorCode::AuthFailed, "bad token".into())),
        Verdict::OutOfScope => {
            return Err((
                ErrorCode::BadSession,
                format!("token not allowed to claim '{}'", hello.session),
            ))
        }
    };
    Ok(Claimant {
        holder,
        agent: hello.agent_id,
        pool: rule.is_some_and(|r| r.pool),
        max_sessions: rule.and_then(|r| r.max_sessions),
        max_uplinks: rule.and_then(|r| r.max_uplinks),
        tcp_ports: rule.and_then(|r| r.tcp_ports.clone()),
    })
}

async fn handshake(core: Rc<Core>, stream: TcpStream) {
    // A silent peer must not hold a task forever: the watchdog shuts the
    // socket down, which ends the TLS handshake or the read below.
    let wd = Watchdog::start(stream.as_raw_fd(), libc::SHUT_RDWR);
    wd.arm(core.cfg().header_timeout);
    // One read of the reloadable configuration for the whole handshake.
    let live = core.shared.live();
    let mut conn = match &live.tls {
        None => Transport::plain(stream),
        Some(acceptor) => match Transport::accept_tls(stream, acceptor).await {
            Ok(t) => t,
            Err(e) => {
                // A plaintext agent, an untrusted or missing client
                // certificate, a scanner: this connection only.
                core.stats.error(ErrorKind::TlsHandshake);
                let why = if wd.fired() {
                    "timed out".to_string()
                } else {
                    e.to_string()
                };
                tracing::info!(core = core.index, error = %why, "uplink TLS handshake failed");
                return;
            }
        },
    };
    let (res, leftover) = conn
        .read_frame(BytesMut::with_capacity(4096), HANDSHAKE_MAX)
        .await;
    // Stopped before the socket may move to another core.
    drop(wd);
    let frame = match res {
        Ok(f) => f,
        Err(e) => {
            core.stats.error(ErrorKind::Protocol);
            if !conn.is_tls() && looks_like_http_request(&leftover) {
                // A browser or curl on the tunnel port: tell it where to go.
                let public = match (core.shared.public_addr, core.shared.https_addr) {
                    (Some(a), _) => format!("HTTP port ({a})"),
                    (None, Some(a)) => format!("HTTPS port ({a})"),
                    (None, None) => "public port".into(),
                };
                let msg =
                    format!("this is the ringtunnel tunnel port (for agents); use the {public}\n");
                if let Ok(mut s) = conn.into_plain() {
                    let resp = crate::http::simple_response(400, &msg, true, &[]);
                    let _ = crate::io::write_all(&mut s, resp).await;
                }
                return;
            }
            // The agent cannot tell this case from a dropped connection
            // (it retries), so the hint is here, once per minute per core.
            if !conn.is_tls() && leftover.starts_with(&[0x16, 0x03]) {
                log_once_a_minute(
                    &TLS_ON_PLAIN,
                    "a TLS client connected to the plaintext tunnel listener: give the gateway \
                     --tunnel-tls-cert/--tunnel-tls-key, or run the agent without TLS",
                );
            } else {
                tracing::debug!(error = %e, "uplink handshake failed");
            }
            return;
        }
    };
    if frame.kind != FrameType::Hello {
        refuse(&mut conn, &core, ErrorCode::ProtocolError, "expected HELLO").await;
        return;
    }
    let hello = match frame.parse_hello() {
        Ok(h) => h,
        Err(e) => {
            refuse(&mut conn, &core, e.code(), &e.to_string()).await;
            return;
        }
    };
    let who = match claimant(&live, &hello) {
        Ok(w) => w,
        Err((code, reason)) => {
            refuse(&mut conn, &core, code, &reason).await;
            return;
        }
    };
    if core.shared.shutting_down.load(Ordering::Relaxed) {
        refuse(
            &mut conn,
            &core,
            ErrorCode::Shutdown,
            "gateway is shutting down",
        )
        .await;
        return;
    }
    if let Some(reason) = held_elsewhere(&core, &hello, &who) {
        refuse(&mut conn, &core, ErrorCode::SessionTaken, &reason).await;
        return;
    }
    let movable = !conn.is_tls();
    let claimed = core
        .shared
        .claim_with_ports(&hello, &who, core.index, movable);
    let (target, tcp) = match claimed {
        Ok(t) => t,
        Err(r) => {
            refuse(&mut conn, &core, r.code, &r.reason).await;
            return;
        }
    };
    let id = core.shared.next_uplink.fetch_add(1, Ordering::Relaxed);
    let stream = match conn.into_plain() {
        Ok(s) if target != core.index => s,
        Ok(s) => return finish(core, Transport::plain(s), leftover, hello, id, tcp).await,
        // The claim kept a TLS uplink here (target == core.index).
        Err(tls) => return finish(core, tls, leftover, hello, id, tcp).await,
    };
    // Move the socket to the chosen core. No op holds the fd now.
    let fd = stream.into_raw_fd();
    let msg = CoreMsg::Uplink {
        fd,
        leftover: leftover.freeze(),
        hello,
        id,
        tcp,
    };
    if let Err(CoreMsg::Uplink { fd, hello, .. }) = core.shared.mailboxes[target].send(msg) {
        // The target core is gone (shutdown): give the claim back, close.
        core.shared.release(&hello.session, target, false);
        // SAFETY: we own the fd again since the send failed.
        drop(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    }
}

/// In a cluster: why this HELLO must be refused because another node
/// holds its session for a different agent (per this core's view), so a
/// stranger cannot take a name held elsewhere. A token whose rule says
/// `pool = true` may serve a session with several agents, so its HELLO
/// is not checked (the token's scope is the guard there, on every node).
///
/// The window left: two agents saying HELLO for one free name on two
/// nodes before either node's session key has reached the other's view
/// (one etcd write, then the watch: milliseconds; longer while etcd is
/// unreachable, when no view changes) are both accepted; each node then
/// serves its own agent until one of them goes.
fn held_elsewhere(core: &Core, hello: &Hello, who: &Claimant) -> Option<String> {
    let me = core.shared.cluster.as_ref()?.node();
    if who.pool {
        return None;
    }
    let view = core.cluster.borrow();
    let holders = view.sessions.get(&hello.session)?;
    let (node, _) = holders
        .iter()
        .find(|(node, h)| node.as_str() != me && h.agent_id != hello.agent_id)?;
    Some(format!(
        "session '{}' is held by another agent on node '{node}'",
        hello.session
    ))
}

/// Takes over an uplink handed to this core.
pub(super) fn adopt(
    core: Rc<Core>,
    fd: std::os::fd::RawFd,
    leftover: Bytes,
    hello: Hello,
    id: u64,
    tcp: Vec<u16>,
) {
    // SAFETY: the fd was handed over by the sending core, which no longer
    // uses it.
    let std_stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let _ = std_stream.set_nonblocking(true);
    let stream = match TcpStream::from_std(std_stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot adopt uplink socket");
            core.shared.release(&hello.session, core.index, false);
            return;
        }
    };
    crate::runtime::spawn_isolated("uplink-adopt", async move {
        let conn = Transport::plain(stream);
        finish(core, conn, BytesMut::from(&leftover[..]), hello, id, tcp).await;
    });
}

/// What ACCEPT tells the agent about the public side, so it can print
/// the URL its session is served at: the public listener's port and
/// scheme (HTTPS when `--https-listen` is set), and `--domain`.
fn public_endpoint(shared: &super::Shared) -> PublicEndpoint {
    // A DNS name is at most 253 bytes; anything longer is not sent.
    let domain = shared
        .cfg
        .domain
        .as_deref()
        .filter(|d| d.len() <= 255)
        .unwrap_or("");
    // HTTPS when the gateway terminates it: the URL to hand out.
    let (scheme, port) = match (shared.https_addr, shared.public_addr) {
        (Some(a), _) => ("https", a.port()),
        (None, Some(a)) => ("http", a.port()),
        (None, None) => ("http", 0),
    };
    PublicEndpoint {
        scheme: scheme.into(),
        domain: domain.trim_end_matches('.').to_ascii_lowercase(),
        port,
    }
}

/// Where agents reach this node's tunnel listener, for ACCEPT's node
/// list: `--advertise` (else the `--peer-listen` host) with the bound
/// tunnel port, resolved once at start-up (agents get an `ip:port`).
pub(super) fn advertised_tunnel(
    c: &crate::cluster::ClusterConfig,
    tunnel: std::net::SocketAddr,
) -> std::io::Result<std::net::SocketAddr> {
    let host = match &c.advertise {
        Some(h) => h.as_str(),
        None => c.peer_listen.rsplit_once(':').map_or("", |(h, _)| h),
    };
    super::advertised(Some(host), tunnel)
}

/// ACCEPT's node list: this node first (so the agent knows where it
/// landed, whether it came through a load balancer or not), then the
/// view's other ready nodes by name, at most `MAX_ACCEPT_NODES` in all.
/// This node's address is the view's entry for it when there is one
/// (what the registry published), else `advertised`.
fn accept_nodes(
    view: &crate::cluster::ClusterView,
    me: &str,
    advertised: std::net::SocketAddr,
) -> Vec<AcceptNode> {
    let mine = view.nodes.get(me).map_or(advertised, |n| n.tunnel);
    std::iter::once(AcceptNode {
        name: me.to_string(),
        tunnel: mine.to_string(),
    })
    .chain(
        view.ready_nodes()
            .filter(|n| n.name != me)
            .map(|n| AcceptNode {
                name: n.name.clone(),
                tunnel: n.tunnel.to_string(),
            }),
    )
    .take(crate::proto::control::MAX_ACCEPT_NODES)
    .collect()
}

async fn finish(
    core: Rc<Core>,
    mut conn: Transport,
    leftover: BytesMut,
    hello: Hello,
    id: u64,
    tcp: Vec<u16>,
) {
    let limits = core.cfg().limits;
    // A clustered node tells an agent that can use it the node list.
    let cluster = match (&core.shared.cfg.cluster, core.shared.advertised_tunnel) {
        (Some(c), Some(addr)) if hello.capabilities & CAP_CLUSTER != 0 => {
            Some(accept_nodes(&core.cluster.borrow(), &c.node, addr))
        }
        _ => None,
    };
    let cluster_cap = if cluster.is_some() { CAP_CLUSTER } else { 0 };
    let accept = Accept {
        // Only what the agent asked for and this gateway does.
        capabilities: hello.capabilities & (crate::proto::tcp::KNOWN_CAPS | CAP_PUBLIC_URL)
            | cluster_cap,
        tcp,
        public: (hello.capabilities & CAP_PUBLIC_URL != 0).then(|| public_endpoint(&core.shared)),
        nodes: cluster.unwrap_or_default(),
        ..core.accept_base(&limits)
    };
    if let Err(e) = conn.write_frame(&Frame::accept(&accept)).await {
        tracing::debug!(error = %e, "ACCEPT write failed");
        core.shared.release(&hello.session, core.index, false);
        return;
    }
    tracing::info!(
        core = core.index,
        session = %hello.session,
        uplink = id,
        index = hello.uplink_index,
        tls = conn.is_tls(),
        "uplink accepted"
    );
    let up = conn.start_uplink(
        leftover,
        UplinkParams {
            id,
            core: core.index,
            session: hello.session.clone(),
            role: crate::proto::Role::Gateway,
            limits,
            heartbeat: core.cfg().heartbeat,
            stats: core.stats.clone(),
        },
    );
    // Drain tells a CAP_CLUSTER agent REHOME, others SHUTDOWN.
    up.set_capabilities(accept.capabilities);
    core.add_uplink(up);
}
