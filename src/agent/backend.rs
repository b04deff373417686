//! The backend side of a stream: one HTTP/1.1 exchange with the private
//! backend per OPEN, over a per-core keep-alive pool.
//!
//! Concurrency is limited per core (`--backend-concurrency`); requests
//! beyond it wait in a bounded queue, and beyond that are refused with
//! OVERLOADED (the gateway answers 503 + Retry-After). Backend failures
//! end only their stream: connect errors and resets become BACKEND_*
//! RESETs (502), a missing response head within `--backend-timeout`
//! becomes BACKEND_TIMEOUT (504).

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use bytes::Bytes;
use monoio::io::Splitable;
use monoio::net::tcp::{TcpOwnedReadHalf, TcpOwnedWriteHalf};
use monoio::net::TcpStream;

use super::AgentCore;
use crate::http::{self, BodyDecoder, BodyKind, RequestHead};
use crate::io::batch::{write_parts, Parts};
use crate::io::read_append;
use crate::io::shutdown_fd;
use crate::io::stats::{CoreStats, ErrorKind};
use crate::io::uplink::{Inbound, Stream, DATA_CHUNK};
use crate::io::watchdog::Watchdog;
use crate::proto::ErrorCode;
use crate::runtime::notify::{wait_until, Notify};

/// Idle backend connections kept per core.
const POOL_MAX: usize = 512;

/// A backend connection with its deadline watchdog.
pub(crate) struct BackendConn {
    stream: TcpStream,
    wd: Watchdog,
}

struct SlotGuard<'a>(&'a AgentCore);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.0.running.set(self.0.running.get() - 1);
        self.0.slot_free.wake_all();
    }
}

pub(super) async fn serve_stream(core: Rc<AgentCore>, stream: Stream, head: Bytes) {
    CoreStats::inc(&core.stats.requests);
    let req = match http::parse_request(&head, head.len()) {
        Ok(Some(r)) => r,
        _ => {
            core.stats.error(ErrorKind::Protocol);
            stream.reset(ErrorCode::ProtocolError);
            return;
        }
    };
    let limit = core.cfg().backend_concurrency;
    if core.running.get() >= limit {
        if core.waiting.get() >= core.cfg().backend_queue {
            core.stats.error(ErrorKind::Overloaded);
            stream.reset(ErrorCode::Overloaded);
            return;
        }
        core.waiting.set(core.waiting.get() + 1);
        wait_until(&core.slot_free, || core.running.get() < limit).await;
        core.waiting.set(core.waiting.get() - 1);
    }
    core.running.set(core.running.get() + 1);
    let _slot = SlotGuard(&core);

    // A pooled connection may have been closed by the backend meanwhile;
    // a request without a body is safe to send again on a fresh one.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let pooled = core.pool.borrow_mut().pop();
        let (conn, was_pooled) = match pooled {
            Some(c) => (c, true),
            None => match connect(&core).await {
                Ok(c) => (c, false),
                Err(e) => {
                    tracing::debug!(error = %e, "backend connect failed");
                    core.stats.error(ErrorKind::BackendConnect);
                    stream.reset(ErrorCode::BackendConnect);
                    return;
                }
            },
        };
        let retry_ok =
            was_pooled && attempts == 1 && req.body == BodyKind::Empty && req.upgrade.is_none();
        match exchange(&core, conn, &stream, &head, &req, retry_ok).await {
            Outcome::Done(Some(conn)) => {
                let mut pool = core.pool.borrow_mut();
                if pool.len() < POOL_MAX {
                    pool.push(conn);
                }
                return;
            }
            Outcome::Done(None) => return,
            Outcome::RetryFresh => continue,
        }
    }
}

async fn connect(core: &AgentCore) -> std::io::Result<BackendConn> {
    let addr = core.shared.backend;
    let stream = match monoio::time::timeout(
        core.cfg().connect_timeout,
        TcpStream::connect_addr(addr),
    )
    .await
    {
        Ok(r) => r?,
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        }
    };
    let _ = stream.set_nodelay(true);
    let wd = Watchdog::start(stream.as_raw_fd(), libc::SHUT_RDWR);
    Ok(BackendConn { stream, wd })
}

enum Outcome {
    /// Finished; the connection if it can serve another request.
    Done(Option<BackendConn>),
    /// A stale pooled connection failed before any response byte.
    RetryFresh,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    Pending,
    Yes,
    No,
}

async fn exchange(
    core: &AgentCore,
    conn: BackendConn,
    stream: &Stream,
    head: &Bytes,
    req: &RequestHead,
    retry_ok: bool,
) -> Outcome {
    let BackendConn { stream: bs, wd } = conn;
    let fd = bs.as_raw_fd();
    let (mut rh, mut wh) = bs.into_split();
    if crate::io::write_all(&mut wh, head.clone()).await.is_err() {
        wd.stop();
        if retry_ok {
            return Outcome::RetryFresh;
        }
        core.stats.error(ErrorKind::BackendReset);
        stream.reset(ErrorCode::BackendReset);
        return Outcome::Done(None);
    }
    wd.arm(core.cfg().backend_timeout);
    let req_done = Cell::new(false);
    let upgrade = Cell::new(Upgrade::Pending);
    let decided = Notify::new();
    let aborted = Cell::new(false);
    let pump_req = async {
        if req.upgrade.is_some() {
            while upgrade.get() == Upgrade::Pending {
                decided.notified().await;
            }
        }
        let ok = stream_to_backend(
            &mut wh,
            stream,
            req.body == BodyKind::Chunked && upgrade.get() != Upgrade::Yes,
        )
        .await;
        if !ok {
            aborted.set(true);
            shutdown_fd(fd, libc::SHUT_RDWR);
        } else if upgrade.get() == Upgrade::Yes {
            // END on an upgraded stream is the client's half-close.
            shutdown_fd(fd, libc::SHUT_WR);
        }
        req_done.set(ok);
        ok
    };
    let pump_resp = async {
        let r = backend_to_stream(
            core, &mut rh, stream, req, &wd, retry_ok, &aborted, &upgrade, &decided,
        )
        .await;
        if upgrade.get() == Upgrade::Pending {
            upgrade.set(Upgrade::No);
            decided.notify();
        }
        r
    };
    let (req_ok, resp) = monoio::join!(pump_req, pump_resp);
    wd.disarm();
    match resp {
        Resp::Reusable if req_ok && upgrade.get() != Upgrade::Yes => match rh.reunite(wh) {
            Ok(stream) => Outcome::Done(Some(BackendConn { stream, wd })),
            Err(_) => Outcome::Done(None),
        },
        Resp::Stale => {
            wd.stop();
            Outcome::RetryFresh
        }
        _ => {
            wd.stop();
            Outcome::Done(None)
        }
    }
}

/// DATA frames -> backend, re-framed as chunks when the request was
/// chunked. Credit goes back to the gateway only once the backend took
/// the bytes. Returns false if the stream was aborted.
async fn stream_to_backend(wh: &mut TcpOwnedWriteHalf, stream: &Stream, chunked: bool) -> bool {
    loop {
        match stream.recv().await {
            Inbound::Data(d) => {
                let n = d.len();
                let res = if chunked {
                    let mut parts = Parts::new();
                    parts.push_chunk(d);
                    write_parts(wh, parts).await.0.map(|_| ())
                } else {
                    crate::io::write_all(wh, d).await.map(|_| ())
                };
                if res.is_err() {
                    return false;
                }
                stream.consumed(n);
            }
            Inbound::End => {
                if chunked
                    && crate::io::write_all(wh, Bytes::from_static(http::LAST_CHUNK))
                        .await
                        .is_err()
                {
                    return false;
                }
                return true;
            }
            Inbound::Head(_) | Inbound::Reset(_) | Inbound::Gone => return false,
        }
    }
}

enum Resp {
    Reusable,
    Closed,
    Stale,
}

#[allow(clippy::too_many_arguments)]
async fn backend_to_stream(
    core: &AgentCore,
    rh: &mut TcpOwnedReadHalf,
    stream: &Stream,
    req: &RequestHead,
    wd: &Watchdog,
    retry_ok: bool,
    aborted: &Cell<bool>,
    upgrade: &Cell<Upgrade>,
    decided: &Notify,
) -> Resp {
    let mut buf = crate::io::carve(16 * 1024);
    let max_head = crate::http::DEFAULT_MAX_HEAD;
    let resp = loop {
        match http::parse_response(&buf, max_head, req.is_head()) {
            Ok(Some(h)) => {
                let raw = buf.split_to(h.head_len).freeze();
                if (100..200).contains(&h.status) && h.status != 101 {
                    stream.send_head(raw);
                    continue;
                }
                stream.send_head(raw);
                break h;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, "bad backend response head");
                core.stats.error(ErrorKind::BackendReset);
                stream.reset(ErrorCode::BackendReset);
                return Resp::Closed;
            }
        }
        let (res, b) = read_append(rh, buf, 4096, 16 * 1024).await;
        buf = b;
        if !matches!(res, Ok(n) if n > 0) {
            if aborted.get() {
                return Resp::Closed;
            }
            if wd.fired() {
                core.stats.error(ErrorKind::BackendTimeout);
                stream.reset(ErrorCode::BackendTimeout);
                return Resp::Closed;
            }
            if retry_ok && buf.is_empty() {
                return Resp::Stale;
            }
            core.stats.error(ErrorKind::BackendReset);
            stream.reset(ErrorCode::BackendReset);
            return Resp::Closed;
        }
    };
    wd.disarm();
    if resp.status == 101 && req.upgrade.is_some() {
        upgrade.set(Upgrade::Yes);
        decided.notify();
        // Raw relay: backend bytes -> DATA until EOF, then END.
        loop {
            if !buf.is_empty() && stream.send_data(buf.split().freeze()).await.is_err() {
                return Resp::Closed;
            }
            let (res, b) = read_append(rh, buf, 16 * 1024, 64 * 1024).await;
            buf = b;
            if !matches!(res, Ok(n) if n > 0) {
                stream.send_end();
                return Resp::Closed;
            }
        }
    }
    if req.upgrade.is_some() {
        upgrade.set(Upgrade::No);
        decided.notify();
    }
    let mut dec = BodyDecoder::new(resp.body);
    loop {
        match dec.decode(&mut buf, DATA_CHUNK) {
            Ok(Some(piece)) => {
                if stream.send_data(piece).await.is_err() {
                    return Resp::Closed;
                }
            }
            Ok(None) if dec.is_done() => {
                stream.send_end();
                return if resp.keep_alive && resp.body != BodyKind::Eof {
                    Resp::Reusable
                } else {
                    Resp::Closed
                };
            }
            Ok(None) => {
                let (res, b) = read_append(rh, buf, 16 * 1024, 64 * 1024).await;
                buf = b;
                if !matches!(res, Ok(n) if n > 0) {
                    if dec.on_eof().is_ok() && !aborted.get() {
                        stream.send_end();
                    } else if !aborted.get() {
                        core.stats.error(ErrorKind::BackendReset);
                        stream.reset(ErrorCode::BackendReset);
                    }
                    return Resp::Closed;
                }
            }
            Err(_) => {
                core.stats.error(ErrorKind::BackendReset);
                stream.reset(ErrorCode::BackendReset);
                return Resp::Closed;
            }
        }
    }
}
