//! The public HTTP edge of one gateway core.
//!
//! One task per public connection. Requests on a connection are served in
//! order: read a head (bounded size, bounded time), route it by Host, then
//! either serve it here over a local uplink of the session, or hand the
//! whole connection (socket + unread bytes) to a core that has one.
//!
//! Serving a request runs two pumps side by side: client body -> DATA
//! frames, and frames -> client response. They share nothing but the
//! stream handle, so a backend that answers before reading the whole body
//! works, and neither direction waits for the other.

use std::cell::Cell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use monoio::io::{AsyncWriteRent, Splitable};
use monoio::net::tcp::{TcpOwnedReadHalf, TcpOwnedWriteHalf};
use monoio::net::{TcpListener, TcpStream};

use super::{Core, CoreMsg};
use crate::http::{self, BodyDecoder, BodyKind, HeadError, RequestHead, ResponseHead};
use crate::io::batch::{write_parts, Parts};
use crate::io::stats::{CoreStats, ErrorKind};
use crate::io::uplink::{Inbound, Stream, DATA_CHUNK};
use crate::io::watchdog::Watchdog;
use crate::io::{read_append, shutdown_fd};
use crate::proto::ErrorCode;
use crate::runtime::notify::Notify;

/// A connection moves between cores at most this often per request, so a
/// session flapping between cores cannot bounce a client forever.
const MAX_HOPS: u8 = 2;
/// How much response body we gather before one write to the client.
const COALESCE: usize = 256 * 1024;

pub(super) async fn accept_loop(core: Rc<Core>, listener: TcpListener, stop: Rc<Cell<bool>>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if stop.get() {
                    return;
                }
                let _ = stream.set_nodelay(true);
                let c = core.clone();
                crate::runtime::spawn_isolated("public-conn", async move {
                    serve(c, stream, crate::io::carve(8192), peer, 0).await;
                });
            }
            Err(e) => {
                if stop.get() {
                    return;
                }
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "public accept failed");
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Serves a connection handed over by another core.
pub(super) fn adopt(core: Rc<Core>, fd: RawFd, buf: Bytes, peer: SocketAddr, hops: u8) {
    // SAFETY: the sending core gave up this fd when it sent it.
    let std_stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let _ = std_stream.set_nonblocking(true);
    match TcpStream::from_std(std_stream) {
        Ok(stream) => {
            crate::runtime::spawn_isolated("public-conn", async move {
                serve(core, stream, BytesMut::from(&buf[..]), peer, hops).await;
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot adopt public connection"),
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

async fn serve(core: Rc<Core>, stream: TcpStream, buf: BytesMut, peer: SocketAddr, hops: u8) {
    let mut hops = hops;
    CoreStats::inc(&core.stats.public_conns);
    CoreStats::inc(&core.stats.public_conns_total);
    let _guard = ConnGuard(core.clone());
    let fd = stream.as_raw_fd();
    let (mut rh, mut wh) = stream.into_split();
    let wd = Watchdog::start(fd, libc::SHUT_RD);
    let mut buf = buf;
    let mut first = true;
    let max_head = core.cfg().max_head;
    // Formatted once per connection, used in every X-Forwarded-For.
    let peer_ip = peer.ip().to_string();
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
            HeadRead::Bad(e) => {
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
        let session = crate::route::route(
            head.host.as_deref(),
            cfg.domain.as_deref(),
            cfg.default_session.as_deref(),
            |n| core.is_present(n),
        );
        let host_txt = head.host.clone().unwrap_or_default();
        let Some(session) = session else {
            CoreStats::inc(&core.stats.requests);
            core.stats.error(ErrorKind::NoSession);
            buf.advance(head.head_len);
            let msg = format!("no tunnel for host '{host_txt}'\n");
            if refuse_request(&mut wh, &head, 502, &msg, &[]).await {
                continue;
            }
            break;
        };
        let up = core.pick_uplink(&session);
        if up.is_none() && !core.has_local(&session) {
            if hops < MAX_HOPS {
                if let Some(target) = core.remote_core_for(&session, peer.port() as usize) {
                    // The head stays in `buf`: the target core re-reads it.
                    wd.stop();
                    match rh.reunite(wh) {
                        Ok(stream) => {
                            let fd = stream.into_raw_fd();
                            let msg = CoreMsg::Public {
                                fd,
                                buf: buf.freeze(),
                                peer,
                                hops: hops + 1,
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
            CoreStats::inc(&core.stats.requests);
            core.stats.error(ErrorKind::NoSession);
            buf.advance(head.head_len);
            let msg = format!("no agent connected for host '{host_txt}' (session '{session}')\n");
            if refuse_request(&mut wh, &head, 502, &msg, &[]).await {
                continue;
            }
            break;
        }
        CoreStats::inc(&core.stats.requests);
        buf.advance(head.head_len);
        // Present here but every local uplink is at its stream limit.
        let Some(stream) = up.and_then(|u| u.open_stream(forward_head(&head, &peer_ip))) else {
            core.stats.error(ErrorKind::Overloaded);
            let msg = format!("session '{session}' is at its stream limit, retry shortly\n");
            if refuse_request(&mut wh, &head, 503, &msg, &[("Retry-After", "1")]).await {
                continue;
            }
            break;
        };
        core.inflight.set(core.inflight.get() + 1);
        let keep = exchange(&core, &mut rh, &mut wh, &mut buf, fd, &head, stream).await;
        // The hop limit is per request: the next one may move again.
        hops = 0;
        core.inflight.set(core.inflight.get() - 1);
        if core.inflight.get() == 0 {
            core.idle.notify();
        }
        if !keep || core.shared.shutting_down.load(Ordering::Relaxed) {
            break;
        }
    }
    wd.stop();
    let _ = wh.shutdown().await;
}

/// The head as the backend gets it: hop-by-hop headers dropped by the
/// encoder, X-Forwarded-* set by us (the client's own X-Forwarded-For is
/// kept and extended, as proxies chain it).
fn forward_head(head: &RequestHead, peer_ip: &str) -> Bytes {
    const REPLACED: [&str; 3] = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"];
    let mut xff = String::new();
    let mut host_raw = None;
    for (name, value) in &head.headers {
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            if let Ok(v) = std::str::from_utf8(value) {
                if !xff.is_empty() {
                    xff.push_str(", ");
                }
                xff.push_str(v.trim());
            }
        } else if host_raw.is_none() && name.eq_ignore_ascii_case("host") {
            host_raw = Some(value.clone());
        }
    }
    if !xff.is_empty() {
        xff.push_str(", ");
    }
    xff.push_str(peer_ip);
    let host_raw = host_raw.unwrap_or_else(|| Bytes::from(head.host.clone().unwrap_or_default()));
    let mut dst = BytesMut::with_capacity(head.head_len + 128);
    http::encode_request_forward_except(
        head,
        &REPLACED,
        &[
            ("X-Forwarded-For", xff.as_bytes()),
            ("X-Forwarded-Proto", b"http"),
            ("X-Forwarded-Host", &host_raw),
        ],
        &mut dst,
    );
    dst.freeze()
}

/// What the response side decided about an `Upgrade` request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum UpgradeDecision {
    Pending,
    Upgraded,
    Refused,
}

/// Serves one request over `stream`. Returns whether the connection may
/// carry another request.
async fn exchange(
    core: &Core,
    rh: &mut TcpOwnedReadHalf,
    wh: &mut TcpOwnedWriteHalf,
    buf: &mut BytesMut,
    fd: RawFd,
    req: &RequestHead,
    stream: Stream,
) -> bool {
    let req_done = Cell::new(false);
    let upgrade = Cell::new(UpgradeDecision::Pending);
    let decided = Notify::new();
    let pump_req = async {
        let ok = if req.upgrade.is_some() {
            while upgrade.get() == UpgradeDecision::Pending {
                decided.notified().await;
            }
            if upgrade.get() == UpgradeDecision::Upgraded {
                raw_to_stream(rh, buf, &stream).await
            } else {
                stream.send_end();
                true
            }
        } else {
            body_to_stream(rh, buf, &stream, req.body).await
        };
        req_done.set(true);
        ok
    };
    let pump_resp = async {
        let keep = stream_to_client(core, wh, &stream, req, &upgrade, &decided).await;
        if upgrade.get() == UpgradeDecision::Pending {
            upgrade.set(UpgradeDecision::Refused);
            decided.notify();
        }
        // The response is complete (or failed) while the client is still
        // sending: stop reading it; the connection cannot be reused. A
        // request without a body has nothing left to read, even if its
        // pump (which only sends END) has not run yet: on epoll the
        // response write can finish before join! polls it again.
        if !req_done.get() && req.body != BodyKind::Empty {
            shutdown_fd(fd, libc::SHUT_RD);
            return false;
        }
        keep
    };
    let (req_ok, keep) = monoio::join!(pump_req, pump_resp);
    keep && req_ok
}

/// Client request body -> DATA frames, de-framed (length or chunked).
async fn body_to_stream(
    rh: &mut TcpOwnedReadHalf,
    buf: &mut BytesMut,
    stream: &Stream,
    kind: BodyKind,
) -> bool {
    let mut dec = BodyDecoder::new(kind);
    loop {
        match dec.decode(buf, DATA_CHUNK) {
            Ok(Some(piece)) => {
                if stream.send_data(piece).await.is_err() {
                    return false;
                }
            }
            Ok(None) if dec.is_done() => {
                stream.send_end();
                return true;
            }
            Ok(None) => {
                let (res, b) = read_append(rh, std::mem::take(buf), 16 * 1024, 64 * 1024).await;
                *buf = b;
                if !matches!(res, Ok(n) if n > 0) {
                    stream.reset(ErrorCode::Cancel);
                    return false;
                }
            }
            Err(e) => {
                tracing::debug!(error = ?e, "bad request body");
                stream.reset(ErrorCode::Cancel);
                return false;
            }
        }
    }
}

/// After a 101: raw client bytes -> DATA until the client half-closes.
async fn raw_to_stream(rh: &mut TcpOwnedReadHalf, buf: &mut BytesMut, stream: &Stream) -> bool {
    loop {
        if !buf.is_empty() {
            let data = buf.split().freeze();
            if stream.send_data(data).await.is_err() {
                return false;
            }
        }
        let (res, b) = read_append(rh, std::mem::take(buf), 16 * 1024, 64 * 1024).await;
        *buf = b;
        if !matches!(res, Ok(n) if n > 0) {
            stream.send_end();
            return false;
        }
    }
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
        _ => (502, ErrorKind::AgentGone, "the agent aborted the request"),
    }
}

/// Frames -> client: 1xx heads, the final head, then the body in the
/// backend's framing (close-delimited bodies become chunked for 1.1
/// clients so the connection survives). Returns keep-alive.
async fn stream_to_client(
    core: &Core,
    wh: &mut TcpOwnedWriteHalf,
    stream: &Stream,
    req: &RequestHead,
    upgrade: &Cell<UpgradeDecision>,
    decided: &Notify,
) -> bool {
    let resp: ResponseHead = loop {
        match stream.recv().await {
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
                            return false;
                        }
                    }
                }
                Ok(Some(h)) => break h,
                _ => {
                    core.stats.error(ErrorKind::BackendReset);
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
                let (status, kind, why) = error_status(code);
                core.stats.error(kind);
                let extra: &[(&str, &str)] = if status == 503 {
                    &[("Retry-After", "1")]
                } else {
                    &[]
                };
                let msg = format!("{why} (host '{}')\n", req.host.as_deref().unwrap_or(""));
                return send_simple(wh, status, &msg, !req.keep_alive, extra).await
                    && req.keep_alive;
            }
            Inbound::Gone | Inbound::End | Inbound::Data(_) => {
                core.stats.error(ErrorKind::AgentGone);
                let msg = format!(
                    "the agent for host '{}' disconnected before answering\n",
                    req.host.as_deref().unwrap_or("")
                );
                send_simple(wh, 502, &msg, true, &[]).await;
                return false;
            }
        }
    };

    if resp.status == 101 && req.upgrade.is_some() {
        let mut d = BytesMut::new();
        http::encode_response_forward(&resp, BodyKind::Empty, false, req.version, true, &mut d);
        if crate::io::write_all(wh, d.freeze()).await.is_err() {
            return false;
        }
        upgrade.set(UpgradeDecision::Upgraded);
        decided.notify();
        stream_to_raw(wh, stream).await;
        return false;
    }
    if req.upgrade.is_some() {
        upgrade.set(UpgradeDecision::Refused);
        decided.notify();
    }

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
    let chunked = framing == BodyKind::Chunked;

    let mut pending = Some(head.freeze());
    let mut body_bytes = 0u64;
    loop {
        let mut parts = Parts::new();
        if let Some(h) = pending.take() {
            parts.push(h);
        }
        let mut consumed = 0usize;
        let mut finished = false;
        let mut failed = false;
        // Gather what has already arrived (at least one event) into one
        // write: fewer syscalls when the tunnel runs ahead of the client.
        let mut first_ev = true;
        while parts.bytes() < COALESCE {
            let ev = if first_ev {
                first_ev = false;
                stream.recv().await
            } else {
                match stream.try_recv() {
                    Some(ev) => ev,
                    None => break,
                }
            };
            match ev {
                Inbound::Data(d) => {
                    consumed += d.len();
                    body_bytes += d.len() as u64;
                    if chunked {
                        parts.push_chunk(d);
                    } else {
                        parts.push(d);
                    }
                }
                Inbound::End => {
                    if chunked {
                        parts.push(Bytes::from_static(http::LAST_CHUNK));
                    }
                    finished = true;
                    break;
                }
                Inbound::Head(_) | Inbound::Reset(_) | Inbound::Gone => {
                    failed = true;
                    break;
                }
            }
        }
        if !parts.is_empty() {
            let (res, _) = write_parts(wh, parts).await;
            if res.is_err() {
                core.stats.error(ErrorKind::ClientIo);
                stream.reset(ErrorCode::Cancel);
                return false;
            }
        }
        stream.consumed(consumed);
        if failed {
            // Headers are out: the only honest signal left is to close.
            core.stats.error(ErrorKind::AgentGone);
            return false;
        }
        if finished {
            if let BodyKind::Length(n) = framing {
                if n != body_bytes {
                    return false;
                }
            }
            return keep_alive;
        }
    }
}

/// After a 101: DATA -> raw client bytes until END (then half-close).
async fn stream_to_raw(wh: &mut TcpOwnedWriteHalf, stream: &Stream) {
    loop {
        match stream.recv().await {
            Inbound::Data(d) => {
                let n = d.len();
                if crate::io::write_all(wh, d).await.is_err() {
                    stream.reset(ErrorCode::Cancel);
                    return;
                }
                stream.consumed(n);
            }
            Inbound::End => {
                let _ = wh.shutdown().await;
                return;
            }
            _ => return,
        }
    }
}
