//! The gateway's side of `crate::limits`: which limit applies to a
//! session, admission at the public and tunnel accept loops, and the
//! limit series of `/metrics`.

use std::fmt::Write as _;
use std::mem::ManuallyDrop;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use std::time::Instant;

use monoio::net::{TcpListener, TcpStream};

use super::{Core, Shared};
use crate::io::stats::ErrorKind;
use crate::limits::gate::{rate_with_burst, HandshakeSlot};
use crate::limits::{AcceptBackoff, ConnPermit, RateScope, SessionRates};

/// Sent, best effort and without waiting, to a public connection refused
/// at accept: one non-blocking send on a fresh socket always fits its
/// buffer, and no task is spent on a connection we are shedding.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
Content-Length: 37\r\nRetry-After: 1\r\nConnection: close\r\n\r\n\
too many connections, retry shortly\r\n";

impl Shared {
    /// The request rates of `session`, each from its `[[sessions]]` table
    /// if one sets it, else from the token rule that claimed it if the rule
    /// sets it, else from the gateway's flags:
    /// `rate`/`burst` or `--session-rate`/`--session-burst`, and
    /// `rate_per_ip`/`burst_per_ip` or `--rate-per-ip`/`--burst-per-ip`.
    /// Called once per session per core (then cached), so the claims lock
    /// stays off the request path.
    pub(crate) fn rates_for(&self, session: &str) -> SessionRates {
        // The claim names its rule by the SHA-256 of the rule's secret;
        // the rules are the ones in force now (reloads swap them).
        let owner = match self.claims().holder(session) {
            Some(super::claims::Holder::Rule(h)) => Some(h),
            _ => None,
        };
        let live = self.live();
        let rule = owner.and_then(|h| {
            live.tokens
                .iter()
                .find(|r| r.secret.sha256() == h && r.allows(session))
        });
        let lim = &live.cfg.edge_limits;
        // A `[[sessions]]` table for this name wins over the rule.
        let table = live.cfg.sessions.iter().find(|t| t.name == session);
        let session_rate = match table
            .and_then(|t| t.rate.map(|rate| (rate, t.burst)))
            .or_else(|| rule.and_then(|r| r.rate.map(|rate| (rate, r.burst))))
        {
            Some((rate, burst)) => Some(rate_with_burst(rate, burst)),
            None => lim
                .session_rate
                .map(|r| rate_with_burst(r, lim.session_burst)),
        };
        let per_ip = match table
            .and_then(|t| t.rate_per_ip.map(|rate| (rate, t.burst_per_ip)))
            .or_else(|| rule.and_then(|r| r.rate_per_ip.map(|rate| (rate, r.burst_per_ip))))
        {
            Some((rate, burst)) => Some(rate_with_burst(rate, burst)),
            None => lim
                .rate_per_ip
                .map(|r| rate_with_burst(r, lim.burst_per_ip)),
        };
        SessionRates {
            session: session_rate,
            per_ip,
        }
    }

    /// `ringtunnel_rate_limited_total{session,scope}`: only sessions that
    /// exist ever get a 429, and at most `MAX_RATE_SESSIONS` names per
    /// core are kept, so the label set stays bounded. `scope="session"`:
    /// the session's rate refused; `scope="ip"`: a client IP's rate within
    /// the session did.
    pub(crate) fn limit_metrics(&self) -> String {
        let mut out = String::new();
        let name = "ringtunnel_rate_limited_total";
        let _ = writeln!(
            out,
            "# HELP {name} Requests refused with 429 (session rate, or a client IP's rate \
             within the session).\n# TYPE {name} counter"
        );
        for (session, n) in self.limits.refused_by_session() {
            for scope in [RateScope::Session, RateScope::Ip] {
                let (label, v) = (scope.label(), n[scope as usize]);
                let _ = writeln!(out, "{name}{{session={session:?},scope=\"{label}\"}} {v}");
            }
        }
        let ip = &self.limits.ip_cells;
        let _ = writeln!(
            out,
            "# HELP ringtunnel_rate_ip_cells Per-(session, client IP) rate cells kept.\n\
             # TYPE ringtunnel_rate_ip_cells gauge\n\
             ringtunnel_rate_ip_cells {}\n\
             # HELP ringtunnel_rate_ip_cells_max --rate-ip-table.\n\
             # TYPE ringtunnel_rate_ip_cells_max gauge\n\
             ringtunnel_rate_ip_cells_max {}\n\
             # HELP ringtunnel_rate_ip_untracked_total Requests served under the session \
             rate only: the per-IP table was full of active clients.\n\
             # TYPE ringtunnel_rate_ip_untracked_total counter\n\
             ringtunnel_rate_ip_untracked_total {}",
            ip.len(),
            ip.cap(),
            ip.untracked()
        );
        let l = &self.limits;
        let _ = writeln!(
            out,
            "# HELP ringtunnel_gateway_conn_limit Public connection limits in force.\n\
             # TYPE ringtunnel_gateway_conn_limit gauge\n\
             ringtunnel_gateway_conn_limit{{limit=\"max_conns\"}} {}\n\
             ringtunnel_gateway_conn_limit{{limit=\"max_conns_per_ip\"}} {}\n\
             ringtunnel_gateway_conn_limit{{limit=\"fd_ceiling\"}} {}\n\
             # HELP ringtunnel_gateway_admitted_connections Public connections holding a slot (all cores).\n\
             # TYPE ringtunnel_gateway_admitted_connections gauge\n\
             ringtunnel_gateway_admitted_connections {}\n\
             # HELP ringtunnel_gateway_banned_peers_tracked IPs in the failed-handshake table.\n\
             # TYPE ringtunnel_gateway_banned_peers_tracked gauge\n\
             ringtunnel_gateway_banned_peers_tracked {}",
            l.max_conns(),
            l.max_conns_per_ip(),
            l.fd_ceiling,
            l.conns.total(),
            l.strikes.len()
        );
        out
    }
}

/// Admits an accepted public connection, or refuses it (counted; a 503
/// sent best effort when `answer`) and the caller drops the socket. The
/// HTTPS listener does not answer: a cleartext 503 is garbage to a TLS
/// client, and a handshake is not worth spending on a refused peer.
pub(super) fn admit_public(
    core: &Core,
    stream: &TcpStream,
    peer: SocketAddr,
    answer: bool,
) -> Option<ConnPermit> {
    let trusted = core.cfg().trusted_proxies.contains(peer.ip());
    match core
        .shared
        .limits
        .admit_public(stream.as_raw_fd(), peer.ip(), trusted)
    {
        Ok(p) => Some(p),
        Err(kind) => {
            core.stats.error(kind);
            if !answer {
                return None;
            }
            // SAFETY: a send on a socket we own; MSG_DONTWAIT never blocks
            // the core, MSG_NOSIGNAL keeps a reset peer from raising SIGPIPE.
            unsafe {
                libc::send(
                    stream.as_raw_fd(),
                    BUSY.as_ptr().cast(),
                    BUSY.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                );
            }
            None
        }
    }
}

/// Accepts connections until `stop()` says so, handing each to `each`. An
/// accept error (EMFILE and friends leave the pending connection queued,
/// so retrying at once would spin) waits with back-off and logs at most
/// once per 10 s (`AcceptBackoff`). `what` names the listener in logs.
pub(crate) async fn accept_until_stopped(
    listener: TcpListener,
    what: &'static str,
    stop: impl Fn() -> bool,
    mut each: impl FnMut(TcpStream, SocketAddr),
) {
    let mut backoff = AcceptBackoff::new(what);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if stop() {
                    return;
                }
                backoff.succeeded();
                each(stream, peer);
            }
            Err(e) => {
                if stop() {
                    return;
                }
                let wait = backoff.failed(&e, Instant::now());
                monoio::time::sleep(wait).await;
            }
        }
    }
}

/// Admits a tunnel connection into its handshake, or refuses it (counted;
/// the caller drops the socket without reading a byte).
pub(crate) fn admit_tunnel(core: &Core, peer: SocketAddr) -> Option<HandshakeSlot> {
    match core.shared.limits.admit_handshake(&core.limits, peer.ip()) {
        Ok(slot) => Some(slot),
        Err(kind) => {
            core.stats.error(kind);
            tracing::debug!(core = core.index, %peer, "tunnel connection closed at accept");
            None
        }
    }
}

/// The peer of a socket we hold by fd (a `Transport` mid-handshake).
pub(super) fn peer_of(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: borrowed only for the call; ManuallyDrop never closes it.
    let s = ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    s.peer_addr().ok()
}

/// Admits one request of `session` from `client` under the session's
/// rates, or counts the refusal and returns the 429's body and
/// `Retry-After` (the wait rounded up to whole seconds). A client that is a
/// trusted proxy is exempt from the per-IP rate: it carries many clients.
pub(super) fn check_rate(
    core: &Core,
    session: &str,
    client: SocketAddr,
) -> Result<(), (String, String)> {
    let ip = client.ip().to_canonical();
    let ip = (!core.cfg().trusted_proxies.contains(ip)).then_some(ip);
    let verdict = core
        .limits
        .check_rate(&core.shared.limits, session, ip, || {
            core.shared.rates_for(session)
        });
    let Err((scope, wait)) = verdict else {
        return Ok(());
    };
    core.stats.error(ErrorKind::RateLimited);
    core.shared.limits.count_refused(core.index, session, scope);
    let secs = crate::limits::rate::retry_after_secs(wait);
    let whose = match scope {
        RateScope::Session => format!("session '{session}' is over its request rate"),
        RateScope::Ip => format!("your address is over its request rate for session '{session}'"),
    };
    Err((format!("{whose}, retry in {secs} s\n"), secs.to_string()))
}
