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
use crate::proto::{Accept, ErrorCode, Frame, FrameType, Hello, PROTOCOL_VERSION};
use crate::scope::{self, Verdict};

const HANDSHAKE_MAX: u32 = 64 * 1024;

pub(super) async fn accept_loop(core: Rc<Core>, listener: TcpListener, stop: Rc<Cell<bool>>) {
    super::guard::accept_until_stopped(listener, "tunnel", &stop, |stream, peer| {
        // Banned IP or too many handshakes here: closed unread.
        let Some(slot) = super::guard::admit_tunnel(&core, peer) else {
            return;
        };
        let c = core.clone();
        crate::runtime::spawn_isolated("uplink-handshake", async move {
            handshake(c, stream).await;
            drop(slot);
        });
    })
    .await;
}

async fn refuse(conn: &mut Transport, core: &Core, code: ErrorCode, reason: &str) {
    core.stats.error(ErrorKind::HandshakeRefused);
    // Reasons can carry agent-supplied text (a session name): escaped and
    // truncated. A refusal counts toward the peer's handshake ban.
    let peer = super::guard::peer_of(conn.fd());
    tracing::warn!(
        core = core.index,
        peer = ?peer,
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
            // The agent cannot tell this case from a dropped connection
            // (it retries), so the hint is here.
            if !conn.is_tls() && leftover.starts_with(&[0x16, 0x03]) {
                tracing::warn!(
                    core = core.index,
                    "a TLS client connected to the plaintext tunnel listener: give the \
                     gateway --tunnel-tls-cert/--tunnel-tls-key, or run the agent without TLS"
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
    let movable = !conn.is_tls();
    let claimed = core.shared.claim(&hello.session, &who, core.index, movable);
    let target = match claimed {
        Ok(t) => t,
        Err(r) => {
            refuse(&mut conn, &core, r.code, &r.reason).await;
            return;
        }
    };
    let id = core.shared.next_uplink.fetch_add(1, Ordering::Relaxed);
    let stream = match conn.into_plain() {
        Ok(s) if target != core.index => s,
        Ok(s) => return finish(core, Transport::plain(s), leftover, hello, id).await,
        // The claim kept a TLS uplink here (target == core.index).
        Err(tls) => return finish(core, tls, leftover, hello, id).await,
    };
    // Move the socket to the chosen core. No op holds the fd now.
    let fd = stream.into_raw_fd();
    let msg = CoreMsg::Uplink {
        fd,
        leftover: leftover.freeze(),
        hello,
        id,
    };
    if let Err(CoreMsg::Uplink { fd, hello, .. }) = core.shared.mailboxes[target].send(msg) {
        // The target core is gone (shutdown): give the claim back, close.
        core.shared.release(&hello.session, target, false);
        // SAFETY: we own the fd again since the send failed.
        drop(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    }
}

/// Takes over an uplink handed to this core.
pub(super) fn adopt(
    core: Rc<Core>,
    fd: std::os::fd::RawFd,
    leftover: Bytes,
    hello: Hello,
    id: u64,
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
        finish(core, conn, BytesMut::from(&leftover[..]), hello, id).await;
    });
}

async fn finish(core: Rc<Core>, mut conn: Transport, leftover: BytesMut, hello: Hello, id: u64) {
    let limits = core.cfg().limits;
    let accept = Accept {
        version: PROTOCOL_VERSION,
        gateway_cores: core.shared.mailboxes.len() as u16,
        core: core.index as u16,
        max_frame: limits.max_frame,
        stream_window: limits.stream_window,
        conn_window: limits.conn_window,
        max_streams: limits.max_streams,
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
    core.add_uplink(up);
}
