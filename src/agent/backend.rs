//! The backend side of a stream: one HTTP/1.1 exchange with the private
//! backend per OPEN, over a per-core keep-alive pool.
//!
//! Concurrency is limited per core (`--backend-concurrency`); requests
//! beyond it wait in a bounded queue for at most `--slot-timeout`, and
//! beyond that are refused with OVERLOADED (the gateway answers 503 +
//! Retry-After). A request reset while it waits never reaches the backend.
//! Backend failures end only their stream: connect errors and resets become
//! BACKEND_* RESETs (502); `--backend-timeout` counts from the moment the
//! request body was fully written (so slow uploads are not cut) and bounds
//! the response head and every pause inside the response body (504).
//!
//! A backend connection goes back to the pool only when exactly the
//! declared request body was written and the whole response was read, so
//! a connection can never carry half of someone else's exchange. A request
//! is replayed on a fresh connection only when it is idempotent, had no
//! body, and no byte of its response was forwarded.
//!
//! Every request ends with one INFO line on target `ringtunnel::request`
//! (method, path, status, ms; `--quiet` turns it off) and, with
//! `--inspect`, one record for the inspector. A backend failure (refused,
//! timed out, reset) is logged at WARN with the backend's address, at
//! most once per [`WARN_EVERY`] per core (the lines in between are counted
//! in the next one), so a dead backend under load cannot flood the log.

use std::cell::{Cell, RefCell};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::task::Poll;

use bytes::Bytes;
use monoio::io::Splitable;
use monoio::net::tcp::TcpOwnedReadHalf;
use monoio::net::TcpStream;

use super::AgentCore;
use crate::http::{self, BodyKind, RequestHead};
use crate::inspect::Capture;
use crate::io::read_append;
use crate::io::relay::{
    body_to_stream_tapped, raw_to_stream, stream_to_raw, stream_to_writer, stream_to_writer_tapped,
    Deadlines, OutFraming, PumpError, Upgrade, UpgradeGate,
};
use crate::io::shutdown_fd;
use crate::io::stats::{CoreStats, ErrorKind};
use crate::io::uplink::Stream;
use crate::io::watchdog::Watchdog;
use crate::proto::ErrorCode;

/// Idle backend connections kept per core.
const POOL_MAX: usize = 512;

/// At most one backend-failure WARN per core this often.
pub const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

thread_local! {
    static BACKEND_WARN: RefCell<crate::limits::LogLimiter> =
        RefCell::new(crate::limits::LogLimiter::new(WARN_EVERY));
}

/// What became of one request, for its log line and inspector record.
struct Obs {
    start: std::time::Instant,
    status: Cell<Option<u16>>,
    /// The failure that ended it, as the gateway reports it.
    failed: Cell<Option<ErrorCode>>,
    cap: Option<Capture>,
}

impl Obs {
    /// Ends the stream with `code`, counted as `kind`. Backend trouble is
    /// logged at WARN (rate-limited) with the backend's address.
    fn fail(&self, core: &AgentCore, stream: &Stream, code: ErrorCode, kind: ErrorKind, why: &str) {
        core.stats.error(kind);
        stream.reset(code);
        if self.failed.get().is_none() {
            self.failed.set(Some(code));
        }
        if matches!(
            code,
            ErrorCode::BackendConnect | ErrorCode::BackendTimeout | ErrorCode::BackendReset
        ) {
            let backend = core.shared.backend;
            BACKEND_WARN.with(|l| {
                if let Some(n) = l.borrow_mut().allow(std::time::Instant::now()) {
                    let more = if n > 0 {
                        format!(" ({n} more backend failures on this core since the last line)")
                    } else {
                        String::new()
                    };
                    tracing::warn!("backend {backend}: {why}{more}");
                }
            });
        }
    }
}

impl Obs {
    fn backend_reset(&self, core: &AgentCore, stream: &Stream, why: &str) {
        self.fail(
            core,
            stream,
            ErrorCode::BackendReset,
            ErrorKind::BackendReset,
            why,
        );
    }

    fn backend_timeout(&self, core: &AgentCore, stream: &Stream, why: &str) {
        self.fail(
            core,
            stream,
            ErrorCode::BackendTimeout,
            ErrorKind::BackendTimeout,
            why,
        );
    }
}

/// The status the public client gets for a stream reset with `code`
/// (the gateway's mapping), and a few words on why.
fn failure_status(code: ErrorCode) -> (u16, &'static str) {
    match code {
        ErrorCode::BackendConnect => (502, "backend refused or unreachable"),
        ErrorCode::BackendTimeout => (504, "backend timed out"),
        ErrorCode::BackendReset => (502, "backend reset or sent garbage"),
        ErrorCode::Overloaded | ErrorCode::RefusedStream => (503, "agent at its backend limit"),
        ErrorCode::Cancel => (0, "client went away"),
        _ => (502, "aborted"),
    }
}

/// The request's INFO line and inspector record.
fn report(core: &AgentCore, req: &RequestHead, obs: Obs) {
    let ms = obs.start.elapsed().as_secs_f64() * 1e3;
    let failure = obs.failed.get().map(failure_status);
    if !core.cfg().quiet {
        let path = crate::inspect::cut_str(&req.target, 200);
        match (obs.status.get(), failure) {
            (Some(s), None) => {
                tracing::info!(target: "ringtunnel::request", "{} {path} {s} {ms:.1} ms", req.method)
            }
            (_, Some((0, why))) => {
                tracing::info!(target: "ringtunnel::request", "{} {path} - {ms:.1} ms ({why})", req.method)
            }
            (_, Some((s, why))) => {
                tracing::info!(target: "ringtunnel::request", "{} {path} {s} {ms:.1} ms ({why})", req.method)
            }
            (None, None) => {
                tracing::info!(target: "ringtunnel::request", "{} {path} - {ms:.1} ms (stream ended)", req.method)
            }
        }
    }
    if let (Some(rec), Some(cap)) = (&core.shared.recorder, obs.cap) {
        let error = failure.map(|(_, why)| why.to_string());
        rec.finish(cap, error);
    }
}

/// A backend connection with its deadline watchdog.
pub(crate) struct BackendConn {
    stream: TcpStream,
    wd: Watchdog,
}

struct SlotGuard<'a>(&'a AgentCore);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.0.running.set(self.0.running.get() - 1);
        self.0.slot_free.wake_one();
    }
}

/// How waiting for a backend slot ended.
enum SlotWait {
    Got,
    /// The stream was reset (client gone) while queued.
    Aborted,
    TimedOut,
}

async fn wait_slot(core: &AgentCore, stream: &Stream, limit: usize) -> SlotWait {
    let got = std::future::poll_fn(|cx| {
        if stream.poll_aborted(cx).is_ready() {
            return Poll::Ready(SlotWait::Aborted);
        }
        if core.running.get() < limit {
            return Poll::Ready(SlotWait::Got);
        }
        core.slot_free.register(cx.waker());
        Poll::Pending
    });
    monoio::select! {
        r = got => r,
        _ = monoio::time::sleep(core.cfg().slot_timeout) => SlotWait::TimedOut,
    }
}

/// RFC 9110 §9.2.2: methods whose repetition has the same effect.
fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
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
    let obs = Obs {
        start: std::time::Instant::now(),
        status: Cell::new(None),
        failed: Cell::new(None),
        cap: core
            .shared
            .recorder
            .as_ref()
            .map(|r| Capture::new(r, &req.method, &req.target, &head)),
    };
    serve_parsed(&core, &stream, &head, &req, &obs).await;
    report(&core, &req, obs);
}

async fn serve_parsed(
    core: &Rc<AgentCore>,
    stream: &Stream,
    head: &Bytes,
    req: &RequestHead,
    obs: &Obs,
) {
    if req.upgrade.is_some() && req.body != BodyKind::Empty {
        // The gateway refuses these; never let one near a pooled connection.
        obs.fail(
            core,
            stream,
            ErrorCode::ProtocolError,
            ErrorKind::Protocol,
            "",
        );
        return;
    }
    let limit = core.cfg().backend_concurrency;
    if core.running.get() >= limit {
        if core.waiting.get() >= core.cfg().backend_queue {
            obs.fail(
                core,
                stream,
                ErrorCode::Overloaded,
                ErrorKind::Overloaded,
                "",
            );
            return;
        }
        core.waiting.set(core.waiting.get() + 1);
        let r = wait_slot(core, stream, limit).await;
        core.waiting.set(core.waiting.get() - 1);
        match r {
            SlotWait::Got => {}
            SlotWait::Aborted | SlotWait::TimedOut => {
                // A slot freed for us goes to the next waiter instead.
                if core.running.get() < limit {
                    core.slot_free.wake_one();
                }
                match r {
                    SlotWait::TimedOut => obs.fail(
                        core,
                        stream,
                        ErrorCode::Overloaded,
                        ErrorKind::Overloaded,
                        "",
                    ),
                    _ => obs.failed.set(Some(ErrorCode::Cancel)),
                }
                return;
            }
        }
    }
    core.running.set(core.running.get() + 1);
    let _slot = SlotGuard(core);

    // A pooled connection may have been closed by the backend meanwhile.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let pooled = core.pool.borrow_mut().pop();
        let (conn, was_pooled) = match pooled {
            Some(c) => (c, true),
            None => match connect(core).await {
                Ok(c) => (c, false),
                Err(e) => {
                    let why = format!("cannot connect: {e}");
                    obs.fail(
                        core,
                        stream,
                        ErrorCode::BackendConnect,
                        ErrorKind::BackendConnect,
                        &why,
                    );
                    return;
                }
            },
        };
        let retry_ok = was_pooled
            && attempts == 1
            && req.body == BodyKind::Empty
            && req.upgrade.is_none()
            && idempotent(&req.method);
        match exchange(core, conn, stream, head, req, retry_ok, obs).await {
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

async fn exchange(
    core: &AgentCore,
    conn: BackendConn,
    stream: &Stream,
    head: &Bytes,
    req: &RequestHead,
    retry_ok: bool,
    obs: &Obs,
) -> Outcome {
    let BackendConn { stream: bs, wd } = conn;
    let fd = bs.as_raw_fd();
    let (mut rh, mut wh) = bs.into_split();
    let bt = core.cfg().backend_timeout;
    wd.arm_write(bt);
    let head_ok = crate::io::write_all(&mut wh, head.clone()).await.is_ok();
    wd.disarm_write();
    if !head_ok {
        wd.stop();
        if retry_ok {
            return Outcome::RetryFresh;
        }
        let why = "connection closed before the request head was written";
        obs.backend_reset(core, stream, why);
        return Outcome::Done(None);
    }
    let gate = UpgradeGate::default();
    let aborted = Cell::new(false);
    let pump_req = async {
        let t = Deadlines {
            wd: &wd,
            read_idle: None,
            write_stall: Some(bt),
        };
        let r = if req.upgrade.is_some() {
            if gate.wait().await == Upgrade::Accepted {
                // END on an upgraded stream is the client's half-close.
                let r = stream_to_raw(&mut wh, stream, t).await;
                return r.is_ok();
            }
            stream_to_writer(&mut wh, stream, OutFraming::Empty, None, t).await
        } else {
            let tap = |b: &[u8]| {
                if let Some(c) = &obs.cap {
                    c.request_body(b);
                }
            };
            let tap: &dyn Fn(&[u8]) = &tap;
            let tap = obs.cap.as_ref().map(|_| tap);
            stream_to_writer_tapped(&mut wh, stream, OutFraming::of(req.body), None, t, tap).await
        };
        match r {
            Ok(_) => {
                // The backend's time to answer starts now, not while a
                // slow client was still uploading.
                if gate.get() != Upgrade::Accepted {
                    wd.arm(bt);
                }
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "request body to the backend failed");
                if matches!(e, PumpError::Reset(_) | PumpError::Gone) && obs.failed.get().is_none()
                {
                    obs.failed.set(Some(ErrorCode::Cancel));
                }
                aborted.set(true);
                shutdown_fd(fd, libc::SHUT_RDWR);
                false
            }
        }
    };
    let pump_resp = async {
        let r = backend_to_stream(
            core, &mut rh, stream, req, &wd, retry_ok, &aborted, &gate, obs,
        )
        .await;
        gate.decide(Upgrade::Refused);
        r
    };
    let (req_ok, resp) = crate::runtime::join2(pump_req, pump_resp).await;
    wd.disarm();
    match resp {
        Resp::Reusable if req_ok && gate.get() != Upgrade::Accepted => match rh.reunite(wh) {
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
    gate: &UpgradeGate,
    obs: &Obs,
) -> Resp {
    let mut buf = crate::io::carve(16 * 1024);
    let max_head = crate::http::DEFAULT_MAX_HEAD;
    let mut forwarded = false;
    let resp = loop {
        match http::parse_response(&buf, max_head, req.is_head()) {
            Ok(Some(h)) => {
                let raw = buf.split_to(h.head_len).freeze();
                obs.status.set(Some(h.status));
                if let Some(c) = &obs.cap {
                    c.response_head(h.status, &raw);
                }
                stream.send_head(raw);
                forwarded = true;
                if (100..200).contains(&h.status) && h.status != 101 {
                    continue;
                }
                break h;
            }
            Ok(None) => {}
            Err(e) => {
                let why = format!("invalid response head: {e}");
                obs.backend_reset(core, stream, &why);
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
                let why = format!(
                    "no response within --backend-timeout ({} s)",
                    core.cfg().backend_timeout.as_secs_f64()
                );
                obs.backend_timeout(core, stream, &why);
                return Resp::Closed;
            }
            if retry_ok && buf.is_empty() && !forwarded {
                return Resp::Stale;
            }
            let why = "connection closed or reset before a complete response head";
            obs.backend_reset(core, stream, why);
            return Resp::Closed;
        }
    };
    wd.disarm();
    if resp.status == 101 && req.upgrade.is_some() {
        gate.decide(Upgrade::Accepted);
        // Raw relay: backend bytes -> DATA until EOF, then END.
        let _ = raw_to_stream(rh, &mut buf, stream).await;
        return Resp::Closed;
    }
    gate.decide(Upgrade::Refused);
    let t = Deadlines {
        wd,
        read_idle: Some(core.cfg().backend_timeout),
        write_stall: None,
    };
    let tap = |b: &[u8]| {
        if let Some(c) = &obs.cap {
            c.response_body(b);
        }
    };
    let tap: &dyn Fn(&[u8]) = &tap;
    let tap = obs.cap.as_ref().map(|_| tap);
    match body_to_stream_tapped(rh, &mut buf, stream, resp.body, t, tap).await {
        // Bytes after the response are not ours to forward: such a
        // connection is not reused.
        Ok(_) if resp.keep_alive && resp.body != BodyKind::Eof && buf.is_empty() => Resp::Reusable,
        Ok(_) => Resp::Closed,
        Err(PumpError::TimedOut(_)) => {
            let why = "response body paused longer than --backend-timeout";
            obs.backend_timeout(core, stream, why);
            Resp::Closed
        }
        Err(e @ (PumpError::Closed | PumpError::BadBody(_))) if !aborted.get() => {
            let why = format!("response body cut short: {e}");
            obs.backend_reset(core, stream, &why);
            Resp::Closed
        }
        Err(_) => Resp::Closed,
    }
}
