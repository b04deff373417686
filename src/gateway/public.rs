//! The public HTTP edge of one gateway core.
//!
//! One task per public connection. Requests on a connection are served in
//! order: read a head (bounded size, bounded time), route it by Host, then
//! either serve it here over a local uplink of the session, or hand the
//! whole connection (socket + unread bytes) to a core that has one.
//!
//! Who the client is gets settled once per connection, before the first
//! head: the socket peer, or under `--proxy-protocol` the source in the
//! PROXY header (read and consumed first; a connection without a valid one
//! is closed unanswered). That address, and whether it is a trusted proxy,
//! decide the forwarding headers of every request (`http::forwarded`); a
//! handoff carries the address, never the PROXY header.
//!
//! HTTPS connections arrive here too, decrypted: `https.rs` terminates
//! TLS and hands the plaintext end of a socketpair to [`adopt`] with the
//! client it settled and the scheme `https`.
//!
//! Serving a request runs two pumps side by side: client body -> DATA
//! frames, and frames -> client response. They share nothing but the
//! stream handle, so a backend that answers before reading the whole body
//! works, and neither direction waits for the other.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use monoio::io::{AsyncReadRent, Canceller, Splitable};
use monoio::net::tcp::{TcpOwnedReadHalf, TcpOwnedWriteHalf};
use monoio::net::{TcpListener, TcpStream};

use super::{guard, Core, CoreMsg, Held};
use crate::cluster::peer;
use crate::http::proxy::{self, ProxyError};
use crate::http::{self, BodyKind, HeadError, Origin, RequestHead, ResponseHead, Scheme};
use crate::io::relay::{
    body_to_stream, raw_to_stream, stream_to_raw, stream_to_writer, watch_for_close, Deadlines,
    OutFraming, PumpError, Upgrade, UpgradeGate, Watched,
};
use crate::io::stats::{CoreStats, ErrorKind};
use crate::io::uplink::{Inbound, Stream};
use crate::io::watchdog::Watchdog;
use crate::io::{read_append, shutdown_fd};
use crate::limits::ConnPermit;
use crate::proto::ErrorCode;
use crate::runtime::notify::Notify;

/// How long an answer may take before the gateway starts watching the
/// client for a close (see `exchange`): short enough that an abandoned
/// request frees its stream almost at once, long enough that fast answers
/// never pay for the watch.
const WATCH_AFTER: Duration = Duration::from_millis(50);

/// A connection moves between cores at most this often per request, so a
/// session flapping between cores cannot bounce a client forever.
const MAX_HOPS: u8 = 2;

/// The plain HTTP listener (`--listen`); HTTPS connections reach `serve`
/// through `adopt` (`https.rs`).
pub(super) async fn accept_loop(core: Rc<Core>, listener: TcpListener, stop: Rc<Cell<bool>>) {
    guard::accept_until_stopped(
        listener,
        "public",
        || stop.get(),
        |stream, peer| {
            // Over a limit: refused here, before any task or buffer.
            let Some(permit) = guard::admit_public(&core, &stream, peer, true) else {
                return;
            };
            // TCP_NODELAY comes from the listener (`runtime::bind_reuseport`).
            let c = core.clone();
            crate::runtime::spawn_isolated("public-conn", async move {
                let conn = Conn {
                    peer,
                    scheme: Scheme::Http,
                    proxy_due: c.cfg().proxy_protocol,
                    hops: 0,
                    permit,
                };
                serve(c, stream, crate::io::carve(8192), conn).await;
            });
        },
    )
    .await;
}

/// Serves a connection handed over by another core.
pub(super) fn adopt(
    core: Rc<Core>,
    fd: RawFd,
    buf: Bytes,
    client: SocketAddr,
    scheme: Scheme,
    hops: u8,
    permit: ConnPermit,
) {
    // SAFETY: the sending core gave up this fd when it sent it.
    let std_stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let _ = std_stream.set_nonblocking(true);
    match TcpStream::from_std(std_stream) {
        Ok(stream) => {
            crate::runtime::spawn_isolated("public-conn", async move {
                // The first core read the PROXY header, if any.
                let conn = Conn {
                    peer: client,
                    scheme,
                    proxy_due: false,
                    hops,
                    permit,
                };
                serve(core, stream, BytesMut::from(&buf[..]), conn).await;
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot adopt public connection"),
    }
}

/// How a public connection reached `serve`.
struct Conn {
    /// The socket's peer, or the client a previous core settled on.
    peer: SocketAddr,
    scheme: Scheme,
    /// A PROXY header comes before the first head.
    proxy_due: bool,
    hops: u8,
    /// Its slot under --max-conns / --max-conns-per-ip; moves with a
    /// handoff, released when the connection ends.
    permit: ConnPermit,
}

enum ProxyRead {
    /// The client (`None`: the header named none; the peer stands for it).
    Client(Option<SocketAddr>),
    Closed,
    Timeout,
    Bad(ProxyError),
}

/// Reads and consumes the PROXY header at the front of the connection.
async fn read_proxy_header<R: AsyncReadRent>(
    rh: &mut R,
    buf: &mut BytesMut,
    wd: &Watchdog,
) -> ProxyRead {
    loop {
        match proxy::parse(buf) {
            Ok(Some((source, n))) => {
                buf.advance(n);
                return ProxyRead::Client(source.client());
            }
            Ok(None) => {}
            Err(e) => return ProxyRead::Bad(e),
        }
        let (res, b) = read_append(rh, std::mem::take(buf), 512, 2048).await;
        *buf = b;
        match res {
            Ok(0) | Err(_) if wd.fired() => return ProxyRead::Timeout,
            Ok(0) | Err(_) => return ProxyRead::Closed,
            Ok(_) => {}
        }
    }
}

/// Settles who the client is under `--proxy-protocol`. `None`: the
/// connection must be closed without an answer (HAProxy's behaviour: an
/// HTTP answer would be read by the load balancer, not the client).
/// Also the HTTPS edge's first step (`https.rs`), on the raw socket: the
/// header comes before the TLS ClientHello, and bytes read past it stay
/// in `buf`.
pub(super) async fn settle_proxy_client<R: AsyncReadRent>(
    core: &Core,
    rh: &mut R,
    buf: &mut BytesMut,
    wd: &Watchdog,
    peer: SocketAddr,
) -> Option<SocketAddr> {
    let trusted = &core.cfg().trusted_proxies;
    if !trusted.is_empty() && !trusted.contains(peer.ip()) {
        // Anyone else could name any client they like.
        tracing::debug!(%peer, "PROXY header expected from a trusted proxy only: closed");
        core.stats.error(ErrorKind::ProxyProtocol);
        return None;
    }
    wd.arm(core.cfg().header_timeout);
    let read = read_proxy_header(rh, buf, wd).await;
    wd.disarm();
    match read {
        ProxyRead::Client(client) => Some(client.unwrap_or(peer)),
        ProxyRead::Bad(e) => {
            tracing::debug!(%peer, error = %e, "closed");
            core.stats.error(ErrorKind::ProxyProtocol);
            None
        }
        ProxyRead::Timeout => {
            tracing::debug!(%peer, "no PROXY header in time: closed");
            core.stats.error(ErrorKind::HeaderTimeout);
            None
        }
        ProxyRead::Closed => {
            if !buf.is_empty() {
                core.stats.error(ErrorKind::ProxyProtocol);
            }
            None
        }
    }
}

enum HeadRead {
    Head(RequestHead),
    Closed,
    Timeout,
    Bad(HeadError),
}

async fn read_head(
    rh: &mut TcpOwnedReadHalf,
    buf: &mut BytesMut,
    max_head: usize,
    wd: &Watchdog,
) -> HeadRead {
    loop {
        if !buf.is_empty() {
            match http::parse_request(buf, max_head) {
                Ok(Some(h)) => return HeadRead::Head(h),
                Ok(None) => {}
                Err(e) => return HeadRead::Bad(e),
            }
        }
        let (res, b) = read_append(rh, std::mem::take(buf), 2048, 8192).await;
        *buf = b;
        match res {
            Ok(0) | Err(_) if wd.fired() => return HeadRead::Timeout,
            Ok(0) | Err(_) => return HeadRead::Closed,
            Ok(_) => {}
        }
    }
}

/// The 502 body for a Host that names no session: how hosts map to
/// sessions here, and nothing else (no list of sessions).
fn no_tunnel_text(host: &str, domain: Option<&str>) -> String {
    let hosts = match domain {
        Some(d) => format!("NAME.{d} (or NAME)"),
        None => "NAME".to_string(),
    };
    format!(
        "no tunnel for host '{host}'\nThis gateway serves Host {hosts} for an agent connected \
         with session NAME (ringtunnel http PORT --name NAME).\n"
    )
}

thread_local! {
    static TLS_ON_PUBLIC: std::cell::RefCell<crate::limits::LogLimiter> =
        std::cell::RefCell::new(crate::limits::LogLimiter::new(Duration::from_secs(60)));
}

async fn send_simple(
    wh: &mut TcpOwnedWriteHalf,
    status: u16,
    body: &str,
    close: bool,
    extra: &[(&str, &str)],
) -> bool {
    let resp = http::simple_response(status, body, close, extra);
    crate::io::write_all(wh, resp).await.is_ok()
}

/// Answers a request the gateway itself refuses (no agent, stream limit).
/// Its body, if any, was not read, so the connection can only continue
/// for a bodyless keep-alive request. Returns whether it continues.
async fn refuse_request(
    wh: &mut TcpOwnedWriteHalf,
    head: &RequestHead,
    status: u16,
    body: &str,
    extra: &[(&str, &str)],
) -> bool {
    let close = head.body != BodyKind::Empty || !head.keep_alive;
    send_simple(wh, status, body, close, extra).await && !close
}

struct ConnGuard(Rc<Core>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        CoreStats::dec(&self.0.stats.public_conns);
    }
}

async fn serve(core: Rc<Core>, stream: TcpStream, buf: BytesMut, conn: Conn) {
    let mut hops = conn.hops;
    // The current request already waited for its session once.
    let mut held = false;
    let mut permit = Some(conn.permit);
    CoreStats::inc(&core.stats.public_conns);
    CoreStats::inc(&core.stats.public_conns_total);
    let _guard = ConnGuard(core.clone());
    let fd = stream.as_raw_fd();
    let (mut rh, mut wh) = stream.into_split();
    let wd = Watchdog::start(fd, libc::SHUT_RD);
    let mut buf = buf;
    let mut first = true;
    let max_head = core.cfg().max_head;
    let client = if conn.proxy_due {
        match settle_proxy_client(&core, &mut rh, &mut buf, &wd, conn.peer).await {
            Some(c) => c,
            None => {
                wd.stop();
                return;
            }
        }
    } else {
        conn.peer
    };
    // Formatted once per connection, used in every request's forwarding
    // headers.
    let origin = Origin::new(
        client.ip(),
        core.cfg().trusted_proxies.contains(client.ip()),
        conn.scheme,
    );
    loop {
        wd.arm(if first || !buf.is_empty() {
            core.cfg().header_timeout
        } else {
            core.cfg().idle_timeout
        });
        let head = read_head(&mut rh, &mut buf, max_head, &wd).await;
        wd.disarm();
        let head = match head {
            HeadRead::Head(h) => h,
            HeadRead::Closed => break,
            HeadRead::Timeout => {
                if !buf.is_empty() || first {
                    core.stats.error(ErrorKind::HeaderTimeout);
                    send_simple(
                        &mut wh,
                        408,
                        "request head not received in time\n",
                        true,
                        &[],
                    )
                    .await;
                }
                break;
            }
            HeadRead::Bad(_) if first && buf.starts_with(&[0x16, 0x03]) => {
                // A TLS ClientHello: an HTTP answer would be garbage to it.
                core.stats.error(ErrorKind::BadRequest);
                super::tunnel::log_once_a_minute(
                    &TLS_ON_PUBLIC,
                    "a TLS client (https://) connected to the plain HTTP listener; it serves \
                     http:// only (put a TLS terminator in front of it)",
                );
                break;
            }
            HeadRead::Bad(e) => {
                tracing::debug!(%client, error = %e, "bad request head");
                core.stats.error(if e.status() == 431 {
                    ErrorKind::HeadTooLarge
                } else {
                    ErrorKind::BadRequest
                });
                let msg = format!("{e}\n");
                send_simple(&mut wh, e.status(), &msg, true, &[]).await;
                break;
            }
        };
        first = false;
        let cfg = core.cfg();
        if head.upgrade.is_some() && head.body != BodyKind::Empty {
            // A body on an upgrade request would be smuggled into a pooled
            // backend connection if the upgrade is refused.
            core.stats.error(ErrorKind::BadRequest);
            send_simple(
                &mut wh,
                400,
                "an Upgrade request must not carry a body\n",
                true,
                &[],
            )
            .await;
            break;
        }
        let session = crate::route::route(
            head.host.as_deref(),
            cfg.domain.as_deref(),
            cfg.default_session.as_deref(),
            // A reserved session (its agent restarting) keeps its Host, and
            // so does one another node of the cluster holds.
            |n| core.is_present(n) || core.is_reserved(n) || peer::held_elsewhere(&core, n),
        );
        let host_txt = head.host.as_deref().unwrap_or("");
        let Some(session) = session else {
            CoreStats::inc(&core.stats.requests);
            core.stats.error(ErrorKind::NoSession);
            buf.advance(head.head_len);
            let msg = no_tunnel_text(host_txt, cfg.domain.as_deref());
            if refuse_request(&mut wh, &head, 502, &msg, &[]).await {
                continue;
            }
            break;
        };
        let up = core.pick_uplink(&session);
        if up.is_none() && !core.has_local(&session) {
            if hops < MAX_HOPS {
                if let Some(target) = core.remote_core_for(&session, client.port() as usize) {
                    // The head stays in `buf`: the target core re-reads it.
                    wd.stop();
                    match rh.reunite(wh) {
                        Ok(stream) => {
                            let fd = stream.into_raw_fd();
                            let msg = CoreMsg::Public {
                                fd,
                                buf: buf.freeze(),
                                client,
                                scheme: conn.scheme,
                                hops: hops + 1,
                                permit: permit.take().expect("one handoff per connection"),
                            };
                            CoreStats::inc(&core.stats.handoffs_out);
                            if let Err(CoreMsg::Public { fd, .. }) =
                                core.shared.mailboxes[target].send(msg)
                            {
                                // SAFETY: the send failed, the fd is ours.
                                drop(unsafe { std::net::TcpStream::from_raw_fd(fd) });
                            }
                        }
                        Err(_) => tracing::error!("cannot reunite public socket halves"),
                    }
                    return;
                }
            }
            // No core of this node holds it: a node of the cluster that
            // does serves it over a peer link, rather than a wait here.
            let links = peer::links_for(&core, &session);
            if !links.is_empty() {
                let started_at = Instant::now();
                // This node's rates apply (the holder checks none for a
                // forwarded stream): charged once, here.
                if let Err((msg, secs)) = guard::check_rate(&core, &session, client) {
                    CoreStats::inc(&core.stats.requests);
                    core.count_request(&session, None, true);
                    buf.advance(head.head_len);
                    if refuse_request(&mut wh, &head, 429, &msg, &[("Retry-After", &secs)]).await {
                        continue;
                    }
                    break;
                }
                let fwd = Forward {
                    session: &session,
                    origin: &origin,
                    fd,
                    wd: &wd,
                };
                // None: every holder said NOT_HERE; on as if none were
                // listed.
                if let Some((keep, failed)) =
                    forward(&core, fwd, &mut rh, &mut wh, &mut buf, &head, links).await
                {
                    let timed = head.upgrade.is_none().then_some(started_at);
                    core.count_request(&session, timed, failed);
                    hops = 0;
                    held = false;
                    if !keep || core.shared.shutting_down.load(Ordering::Relaxed) {
                        break;
                    }
                    continue;
                }
            }
            if !held && core.is_reserved(&session) {
                // Its agent is restarting: wait for it instead of failing.
                held = true;
                match core.hold(&session).await {
                    // The head is still in `buf`: route it again.
                    Held::Back => continue,
                    Held::Full => {
                        held = false;
                        CoreStats::inc(&core.stats.requests);
                        core.stats.error(ErrorKind::Overloaded);
                        core.count_request(&session, None, true);
                        buf.advance(head.head_len);
                        let msg = format!(
                            "too many requests waiting for session '{session}', retry shortly\n"
                        );
                        if refuse_request(&mut wh, &head, 503, &msg, &[("Retry-After", "1")]).await
                        {
                            continue;
                        }
                        break;
                    }
                    Held::ShuttingDown => {
                        CoreStats::inc(&core.stats.requests);
                        core.stats.error(ErrorKind::AgentGone);
                        let msg = format!(
                            "the gateway is shutting down; session '{session}' had no agent \
                             connected, retry shortly\n"
                        );
                        let retry = [("Retry-After", "1")];
                        send_simple(&mut wh, 503, &msg, true, &retry).await;
                        break;
                    }
                    Held::TimedOut => {}
                }
            }
            // A name someone holds (its agent is away) is a site that is
            // down: 502. A name nobody holds is no site at all: 404, as
            // ngrok and frp answer.
            let known = std::mem::take(&mut held) || peer::held_elsewhere(&core, &session);
            CoreStats::inc(&core.stats.requests);
            core.stats.error(ErrorKind::NoSession);
            core.count_request(&session, None, true);
            buf.advance(head.head_len);
            let (status, msg) = if known {
                (
                    502,
                    format!(
                        "no agent connected for host '{host_txt}' (session '{session}')\n\
                         An agent serves it once connected: ringtunnel http PORT --name {session}\n"
                    ),
                )
            } else {
                (
                    404,
                    format!(
                        "no tunnel for host '{host_txt}' (session '{session}')\n\
                         An agent creates it: ringtunnel http PORT --name {session}\n"
                    ),
                )
            };
            if refuse_request(&mut wh, &head, status, &msg, &[]).await {
                continue;
            }
            break;
        }
        CoreStats::inc(&core.stats.requests);
        buf.advance(head.head_len);
        let started = Instant::now();
        // Counted only for a session that is here (its cell is shared by
        // all cores), so handoffs are not charged twice.
        if let Err((msg, secs)) = guard::check_rate(&core, &session, client) {
            core.count_request(&session, None, true);
            if refuse_request(&mut wh, &head, 429, &msg, &[("Retry-After", &secs)]).await {
                continue;
            }
            break;
        }
        // Present here but every local uplink is at its stream limit.
        let Some(stream) = up.and_then(|u| u.open_stream(forward_head(&head, &origin))) else {
            core.stats.error(ErrorKind::Overloaded);
            core.count_request(&session, None, true);
            let msg = format!("session '{session}' is at its stream limit, retry shortly\n");
            if refuse_request(&mut wh, &head, 503, &msg, &[("Retry-After", "1")]).await {
                continue;
            }
            break;
        };
        let inflight = super::InFlight::enter(&*core);
        let ex = exchange(
            &core, &mut rh, &mut wh, &mut buf, fd, &wd, &head, stream, false,
        )
        .await;
        let (keep, failed) = (ex.keep, ex.failed);
        // An upgraded exchange lasts as long as its connection: counted,
        // not timed.
        let timed = head.upgrade.is_none().then_some(started);
        core.count_request(&session, timed, failed);
        // The hop limit is per request: the next one may move again.
        hops = 0;
        held = false;
        drop(inflight);
        if !keep || core.shared.shutting_down.load(Ordering::Relaxed) {
            break;
        }
    }
    wd.stop();
    // Closing the socket sends the FIN. Dropped apart, monoio's write half
    // would first call shutdown(2) (and an explicit shutdown is one more):
    // syscalls per connection for nothing, as close shuts both ways anyway.
    // Reunited, the socket ends with an io_uring close op alone (issue 9,
    // docs/BENCHMARKS.md).
    if let Ok(stream) = rh.reunite(wh) {
        drop(stream);
    }
}

/// The head as the backend gets it: hop-by-hop headers dropped by the
/// encoder, forwarding headers by `http::forwarded`'s trust rules.
fn forward_head(head: &RequestHead, origin: &Origin) -> Bytes {
    let mut dst = BytesMut::with_capacity(head.head_len + 160);
    http::encode_request_forwarded(head, origin, &mut dst);
    dst.freeze()
}

/// What one request of a forwarded exchange needs besides the sockets.
struct Forward<'a> {
    session: &'a str,
    origin: &'a Origin,
    fd: RawFd,
    wd: &'a Watchdog,
}

/// Serves a request over a peer link to a node holding its session, trying
/// `links` in order: a holder that answers RESET NOT_HERE before the
/// request sent any body byte (a request without a body) makes it try the
/// next one. `None`: every holder said NOT_HERE and nothing was written
/// to the client; the head is back at the front of `buf`, as it was.
/// Otherwise the exchange's (keep-alive, failed).
///
/// The head is the one the backend gets (`forward_head`: forwarding
/// headers by this node's trust rules), behind the peer prefix; the
/// holder relays it unchanged.
#[allow(clippy::too_many_arguments)]
async fn forward(
    core: &Core,
    f: Forward<'_>,
    rh: &mut TcpOwnedReadHalf,
    wh: &mut TcpOwnedWriteHalf,
    buf: &mut BytesMut,
    head: &RequestHead,
    links: Vec<Rc<crate::io::uplink::Uplink>>,
) -> Option<(bool, bool)> {
    CoreStats::inc(&core.stats.requests);
    let raw_head = buf.split_to(head.head_len);
    let open = crate::cluster::prefix::encode(1, f.session, &forward_head(head, f.origin));
    // Retrying is safe only while nothing of the request went out but its
    // head: a request with a body sends its first bytes at once.
    let retryable = head.body == BodyKind::Empty;
    let inflight = super::InFlight::enter(core);
    let mut out = None;
    for link in links {
        let Some(stream) = link.open_stream(open.clone()) else {
            continue;
        };
        CoreStats::inc(&core.stats.forwarded_out);
        let ex = exchange(core, rh, wh, buf, f.fd, f.wd, head, stream, retryable).await;
        if !ex.not_here {
            out = Some((ex.keep, ex.failed));
            break;
        }
        CoreStats::inc(&core.stats.forward_retries);
        tracing::debug!(
            core = core.index,
            session = f.session,
            "NOT_HERE from a holder: next one"
        );
    }
    drop(inflight);
    if out.is_none() {
        // Put the head back for the caller's own answer (or a re-route
        // after a hold): rare, so a copy is fine.
        CoreStats::dec(&core.stats.requests);
        let mut b = BytesMut::with_capacity(raw_head.len() + buf.len());
        b.extend_from_slice(&raw_head);
        b.extend_from_slice(buf);
        *buf = b;
    }
    out
}

/// How an exchange ended.
struct Exchanged {
    /// The connection may carry another request.
    keep: bool,
    /// An error was counted for the request.
    failed: bool,
    /// The peer answered RESET NOT_HERE to a retryable forwarded request:
    /// nothing was written to the client; try another holder.
    not_here: bool,
}

/// Serves one request over `stream`: the request side (body, then a watch
/// for the client going away) and the response side run side by side.
/// `retryable`: a forwarded request that may go to another holder after
/// NOT_HERE (see `forward`).
#[allow(clippy::too_many_arguments)]
async fn exchange(
    core: &Core,
    rh: &mut TcpOwnedReadHalf,
    wh: &mut TcpOwnedWriteHalf,
    buf: &mut BytesMut,
    fd: RawFd,
    wd: &Watchdog,
    req: &RequestHead,
    stream: Stream,
    retryable: bool,
) -> Exchanged {
    let cfg = core.cfg();
    let gate = UpgradeGate::default();
    let side = ReqSide {
        retryable,
        ..ReqSide::default()
    };
    // Created only if a watch starts (most answers come first).
    let canceller: RefCell<Option<Canceller>> = RefCell::new(None);
    let max_watch = cfg.max_head;
    let pump_req = async {
        if req.upgrade.is_some() {
            // Upgrade requests carry no body (one with a body got 400).
            if gate.wait().await == Upgrade::Accepted {
                let _ = raw_to_stream(rh, buf, &stream).await;
                return false;
            }
            stream.send_end();
            side.done(Instant::now());
            return true;
        }
        let t = Deadlines {
            wd,
            read_idle: Some(cfg.body_idle_timeout),
            write_stall: None,
        };
        if let Err(e) = body_to_stream(rh, buf, &stream, req.body, t).await {
            tracing::debug!(error = %e, "request body failed");
            *side.failed.borrow_mut() = Some(e);
            stream.reset(ErrorCode::Cancel);
            return false;
        }
        side.done(Instant::now());
        // Nothing left to read for this request: watch the client, so one
        // that goes away cancels its stream. Most answers come quickly, and
        // a watch costs a read plus its cancellation; so the response side
        // starts it only once the head has taken WATCH_AFTER.
        if side.wait_slow().await {
            let c = Canceller::new();
            let h = c.handle();
            *canceller.borrow_mut() = Some(c);
            if watch_for_close(rh, buf, max_watch, h).await == Watched::Closed {
                *side.failed.borrow_mut() = Some(PumpError::Closed);
                stream.reset(ErrorCode::Cancel);
                return false;
            }
        }
        true
    };
    let pump_resp = async {
        let keep = respond(core, wh, wd, &stream, req, &gate, &side).await;
        side.set_watch(Watch::Finished);
        gate.decide(Upgrade::Refused);
        if let Some(c) = canceller.borrow_mut().take() {
            c.cancel();
        }
        // The response is complete (or failed) while the client is still
        // sending its body: stop reading it; the connection cannot be
        // reused.
        if side.done_at.get().is_none() && req.body != BodyKind::Empty {
            shutdown_fd(fd, libc::SHUT_RD);
            return false;
        }
        keep
    };
    let (req_ok, keep) = crate::runtime::join2(pump_req, pump_resp).await;
    Exchanged {
        keep: keep && req_ok,
        failed: side.error.get(),
        not_here: side.not_here.get(),
    }
}

/// Whether the request side should watch the client for a close.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
enum Watch {
    #[default]
    NotYet,
    /// The head is slow: watch.
    Start,
    /// The response is over: do not.
    Finished,
}

/// What the two sides of an exchange tell each other.
#[derive(Default)]
struct ReqSide {
    /// When the request (head and body) was fully sent on the stream: the
    /// response-head timeout counts from here.
    done_at: Cell<Option<Instant>>,
    /// Why the request side failed, which decides the answer (400, 408 or
    /// none for a client that left).
    failed: RefCell<Option<PumpError>>,
    watch: Cell<Watch>,
    watch_wake: Notify,
    /// An error was counted for this request (its session's window).
    error: Cell<bool>,
    /// A forwarded request that NOT_HERE may send to another holder.
    retryable: bool,
    /// It got NOT_HERE and nothing was answered.
    not_here: Cell<bool>,
}

impl ReqSide {
    /// Counts an error of this request's answer.
    fn count(&self, core: &Core, kind: ErrorKind) {
        core.stats.error(kind);
        self.error.set(true);
    }

    fn done(&self, now: Instant) {
        self.done_at.set(Some(now));
    }

    fn set_watch(&self, w: Watch) {
        if self.watch.get() != Watch::Finished {
            self.watch.set(w);
            self.watch_wake.notify();
        }
    }

    /// Waits until the response side says the head is slow (`true`) or the
    /// response is over (`false`).
    async fn wait_slow(&self) -> bool {
        loop {
            match self.watch.get() {
                Watch::NotYet => self.watch_wake.notified().await,
                Watch::Start => return true,
                Watch::Finished => return false,
            }
        }
    }
}

/// Counts a failed request side once, by its cause: a malformed body, a
/// body that stopped arriving, or a client that went away.
fn count_request_failure(core: &Core, side: &ReqSide, e: &PumpError) {
    let kind = match e {
        PumpError::BadBody(_) => ErrorKind::BadRequest,
        PumpError::TimedOut(_) => ErrorKind::BodyTimeout,
        _ => ErrorKind::ClientIo,
    };
    side.count(core, kind);
}

fn error_status(code: ErrorCode) -> (u16, ErrorKind, &'static str) {
    match code {
        ErrorCode::BackendConnect => (
            502,
            ErrorKind::BackendConnect,
            "the agent could not connect to its backend",
        ),
        ErrorCode::BackendTimeout => (
            504,
            ErrorKind::BackendTimeout,
            "the backend did not answer in time",
        ),
        ErrorCode::BackendReset => (
            502,
            ErrorKind::BackendReset,
            "the backend closed the connection or sent an invalid response",
        ),
        ErrorCode::RefusedStream | ErrorCode::Overloaded => (
            503,
            ErrorKind::Overloaded,
            "the agent is at its concurrency limit, retry shortly",
        ),
        ErrorCode::Shutdown => (503, ErrorKind::AgentGone, "the agent is shutting down"),
        ErrorCode::NotHere => (
            502,
            ErrorKind::NoSession,
            "the node this request was forwarded to has no agent of the session",
        ),
        _ => (502, ErrorKind::AgentGone, "the agent aborted the request"),
    }
}

/// Waits for the next event of a stream whose response head has not come,
/// up to `--response-timeout` after the request was fully sent. `None`:
/// timed out. After `WATCH_AFTER` without an event it tells the request
/// side to watch the client (one timer per request either way). Racing
/// `recv` against a timer loses nothing: an event not taken stays queued in
/// the connection.
async fn recv_head_event(stream: &Stream, timeout: Duration, side: &ReqSide) -> Option<Inbound> {
    if side.watch.get() == Watch::NotYet {
        monoio::select! {
            ev = stream.recv() => return Some(ev),
            _ = monoio::time::sleep(WATCH_AFTER) => side.set_watch(Watch::Start),
        }
    }
    loop {
        let wait = match side.done_at.get() {
            Some(t0) => {
                let left = (t0 + timeout).saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                left
            }
            // The body is still on its way; its own idle deadline bounds it.
            None => timeout,
        };
        monoio::select! {
            ev = stream.recv() => return Some(ev),
            _ = monoio::time::sleep(wait) => {}
        }
    }
}

/// Frames -> client: 1xx heads, the final head, then the body in the
/// backend's framing (close-delimited bodies become chunked for 1.1
/// clients so the connection survives), with the agent's framing enforced.
/// Returns keep-alive.
async fn respond(
    core: &Core,
    wh: &mut TcpOwnedWriteHalf,
    wd: &Watchdog,
    stream: &Stream,
    req: &RequestHead,
    gate: &UpgradeGate,
    side: &ReqSide,
) -> bool {
    let cfg = core.cfg();
    let host = req.host.as_deref().unwrap_or("");
    let resp: ResponseHead = loop {
        let Some(ev) = recv_head_event(stream, cfg.response_timeout, side).await else {
            stream.reset(ErrorCode::Cancel);
            side.count(core, ErrorKind::BackendTimeout);
            let msg = format!(
                "the agent for host '{host}' did not answer within {} s\n",
                cfg.response_timeout.as_secs_f64()
            );
            send_simple(wh, 504, &msg, true, &[]).await;
            return false;
        };
        match ev {
            Inbound::Head(raw) => match http::parse_response(&raw, raw.len(), req.is_head()) {
                Ok(Some(h)) if (100..200).contains(&h.status) && h.status != 101 => {
                    if req.version >= 1 {
                        let mut d = BytesMut::new();
                        http::encode_response_forward(
                            &h,
                            BodyKind::Empty,
                            false,
                            req.version,
                            true,
                            &mut d,
                        );
                        if crate::io::write_all(wh, d.freeze()).await.is_err() {
                            stream.reset(ErrorCode::Cancel);
                            return false;
                        }
                    }
                }
                Ok(Some(h)) => break h,
                _ => {
                    stream.reset(ErrorCode::ProtocolError);
                    side.count(core, ErrorKind::BackendReset);
                    send_simple(
                        wh,
                        502,
                        "the backend sent an invalid response head\n",
                        true,
                        &[],
                    )
                    .await;
                    return false;
                }
            },
            Inbound::Reset(code) => {
                // Our own reset after a failed request body decides the
                // answer: the agent never saw a valid request.
                let failed = side.failed.borrow().clone();
                return match failed {
                    Some(PumpError::BadBody(e)) => {
                        count_request_failure(core, side, &PumpError::BadBody(e.clone()));
                        let msg = format!("bad request body: {e}\n");
                        send_simple(wh, 400, &msg, true, &[]).await;
                        false
                    }
                    Some(e @ PumpError::TimedOut(_)) => {
                        count_request_failure(core, side, &e);
                        send_simple(wh, 408, "request body not received in time\n", true, &[])
                            .await;
                        false
                    }
                    Some(e) => {
                        count_request_failure(core, side, &e);
                        false
                    }
                    None if code == ErrorCode::NotHere && side.retryable => {
                        side.not_here.set(true);
                        false
                    }
                    None => {
                        let (status, kind, why) = error_status(code);
                        side.count(core, kind);
                        let extra: &[(&str, &str)] = if status == 503 {
                            &[("Retry-After", "1")]
                        } else {
                            &[]
                        };
                        let msg = format!("{why} (host '{host}')\n");
                        send_simple(wh, status, &msg, !req.keep_alive, extra).await
                            && req.keep_alive
                    }
                };
            }
            Inbound::Gone | Inbound::End | Inbound::Data(_) => {
                if side.failed.borrow().is_some() {
                    return false;
                }
                side.count(core, ErrorKind::AgentGone);
                let msg = format!("the agent for host '{host}' disconnected before answering\n");
                send_simple(wh, 502, &msg, true, &[]).await;
                return false;
            }
        }
    };

    let t = Deadlines {
        wd,
        read_idle: None,
        write_stall: Some(cfg.write_stall_timeout),
    };
    if resp.status == 101 {
        if req.upgrade.is_none() {
            // A switch nobody asked for would hand the client a raw byte
            // stream it cannot frame.
            stream.reset(ErrorCode::ProtocolError);
            side.count(core, ErrorKind::BackendReset);
            let msg = format!("the backend for host '{host}' switched protocols unasked\n");
            send_simple(wh, 502, &msg, true, &[]).await;
            return false;
        }
        let mut d = BytesMut::new();
        http::encode_response_forward(&resp, BodyKind::Empty, false, req.version, true, &mut d);
        if crate::io::write_all(wh, d.freeze()).await.is_err() {
            stream.reset(ErrorCode::Cancel);
            return false;
        }
        gate.decide(Upgrade::Accepted);
        if stream_to_raw(wh, stream, t).await.is_err() {
            stream.reset(ErrorCode::Cancel);
        }
        return false;
    }
    gate.decide(Upgrade::Refused);

    let (framing, keep_cl) = match resp.body {
        BodyKind::Empty => (BodyKind::Empty, true),
        BodyKind::Eof if req.version >= 1 => (BodyKind::Chunked, false),
        // HTTP/1.0 has no chunked coding: end the body by closing.
        BodyKind::Chunked if req.version == 0 => (BodyKind::Eof, false),
        other => (other, false),
    };
    let keep_alive = req.keep_alive
        && framing != BodyKind::Eof
        && !core.shared.shutting_down.load(Ordering::Relaxed);
    let mut head = BytesMut::with_capacity(resp.head_len + 64);
    http::encode_response_forward(&resp, framing, keep_cl, req.version, keep_alive, &mut head);
    // The agent's DATA must fit what its head declared: a Content-Length
    // is a ceiling and a floor, HEAD/204/304 carry nothing.
    let out = match resp.body {
        BodyKind::Length(n) => OutFraming::Length(n),
        BodyKind::Empty => OutFraming::Empty,
        _ => OutFraming::of(framing),
    };
    match stream_to_writer(wh, stream, out, Some(head.freeze()), t).await {
        Ok(_) => keep_alive,
        Err(PumpError::Framing(why)) => {
            // Headers are out: the only honest signal left is to close.
            tracing::debug!(host, why, "agent broke the response framing");
            side.count(core, ErrorKind::Protocol);
            stream.reset(ErrorCode::ProtocolError);
            false
        }
        Err(e @ (PumpError::Closed | PumpError::TimedOut(_))) => {
            tracing::debug!(host, error = %e, "client write failed");
            side.count(
                core,
                if matches!(e, PumpError::TimedOut(_)) {
                    ErrorKind::WriteStall
                } else {
                    ErrorKind::ClientIo
                },
            );
            stream.reset(ErrorCode::Cancel);
            false
        }
        Err(_) => {
            // Our own reset after the request side failed (a client that
            // left mid-upload) is the client's doing, not the agent's.
            match side.failed.borrow().as_ref() {
                Some(e) => count_request_failure(core, side, e),
                None => side.count(core, ErrorKind::AgentGone),
            }
            false
        }
    }
}
