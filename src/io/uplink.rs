//! The driver of one uplink: moves bytes between its socket and the
//! sans-IO [`Connection`] (proto/conn.rs), and wakes exactly the streams
//! the connection names in its events.
//!
//! Owned by one core. Three tasks share it through `Rc`: the reader (the
//! only reader of the socket: decode, `handle_frame`), the writer (the only
//! writer: `poll_transmit` into one vectored write per syscall) and a timer
//! (heartbeat and writer-stall deadlines through `handle_timeout`). Every
//! task closes the uplink when it ends for any reason, a panic included,
//! so a broken uplink is always unregistered at once.
//!
//! Streams never touch the socket: a [`Stream`] handle calls the connection
//! by id and sleeps on its own waker until an event names it. Received
//! DATA comes out as a [`Chunk`] that returns its credit when dropped, so
//! every byte is credited back whether it was delivered or discarded.

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent};

use super::batch::Batch;
use super::stats::{CoreStats, ErrorKind};
use crate::proto::conn::{CloseReason, Connection, Event, IdMap, Transmit};
use crate::proto::{Decoder, ErrorCode, Frame, StreamError};

pub use crate::proto::{Heartbeat, Limits, Role, DATA_CHUNK};

/// Read buffers are carved in chunks this big; payloads smaller than a
/// quarter of it are copied out, so a held payload pins at most four times
/// its own size of read buffer (see docs/ARCHITECTURE.md, memory bounds).
const READ_CHUNK: usize = 256 * 1024;
const DETACH_BELOW: usize = READ_CHUNK / 4;

/// How long a failing uplink waits for its GOAWAY to be written.
const FAIL_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

impl Transmit for Batch {
    fn has_room(&self, payload_len: usize) -> bool {
        Batch::has_room(self, payload_len)
    }
    fn push(&mut self, frame: &Frame) {
        Batch::push(self, frame)
    }
}

/// What a stream receives from the far side.
#[derive(Debug)]
pub enum Inbound {
    Head(Bytes),
    Data(Chunk),
    End,
    Reset(ErrorCode),
    /// The uplink closed under the stream.
    Gone,
}

/// Received body bytes. Dropping the chunk returns its credit to the
/// sender: keep it until the bytes were written on, drop it to discard.
pub struct Chunk {
    bytes: Bytes,
    up: Rc<Uplink>,
    id: u32,
}

impl Chunk {
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Chunk({} bytes)", self.bytes.len())
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.up.consumed(self.id, self.bytes.len());
    }
}

#[derive(Default)]
struct Wakers {
    read: Option<Waker>,
    write: Option<Waker>,
}

type OpenHandler = Box<dyn Fn(Stream, Bytes)>;
type CloseHandler = Box<dyn FnOnce()>;

/// A live uplink. Cheap to share on its core via `Rc`.
pub struct Uplink {
    pub id: u64,
    pub core: usize,
    pub session: String,
    fd: RawFd,
    stats: Arc<CoreStats>,
    conn: RefCell<Connection>,
    wakers: RefCell<IdMap<Wakers>>,
    writer_wake: crate::runtime::notify::Notify,
    timer_wake: crate::runtime::notify::Notify,
    closed: crate::runtime::notify::Notify,
    /// Frames counted in the core's queue-depth gauge for this uplink.
    counted_queue: Cell<usize>,
    close_done: Cell<bool>,
    on_open: RefCell<Option<OpenHandler>>,
    on_close: RefCell<Option<CloseHandler>>,
    /// Called once when the uplink stops taking new streams (GOAWAY either
    /// way, or closed).
    on_drain: RefCell<Option<CloseHandler>>,
    /// Capabilities negotiated in the handshake (`set_capabilities`).
    caps: Cell<u32>,
}

/// Closes the uplink when the task holding it ends, however it ends: a
/// panicking task drops its future, and with it this guard. It owns the
/// task's half of the socket (`io`) and closes the uplink *before* that
/// half is dropped: closing shuts the socket down by fd, and once both
/// halves are gone that fd number may already belong to a new connection.
struct CloseOnDrop<T> {
    up: Rc<Uplink>,
    why: &'static str,
    io: Option<T>,
}

impl<T> CloseOnDrop<T> {
    fn new(up: &Rc<Uplink>, why: &'static str, io: T) -> Self {
        CloseOnDrop {
            up: up.clone(),
            why,
            io: Some(io),
        }
    }

    fn io(&mut self) -> &mut T {
        self.io.as_mut().expect("present until drop")
    }
}

impl<T> Drop for CloseOnDrop<T> {
    fn drop(&mut self) {
        let up = &self.up;
        let why = self.why;
        // A panic here would escape the task's isolation: contain it.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| up.close_now(why)));
        if r.is_err() {
            crate::io::shutdown_fd(up.fd, libc::SHUT_RDWR);
        }
    }
}

impl Uplink {
    /// Starts reader, writer and timer tasks on the current core over the
    /// read and write halves of a plain or TLS stream (see
    /// `io/transport.rs`, which calls this). `fd` is the socket under
    /// them, shut down to end the tasks; `leftover` holds bytes read past
    /// the handshake.
    pub(crate) fn start<R, W>(
        (rh, wh): (R, W),
        fd: RawFd,
        leftover: BytesMut,
        p: super::transport::UplinkParams,
    ) -> Rc<Uplink>
    where
        R: AsyncReadRent + 'static,
        W: AsyncWriteRent + 'static,
    {
        let super::transport::UplinkParams {
            id,
            core,
            session,
            role,
            limits,
            heartbeat,
            stats,
        } = p;
        let up = Rc::new(Uplink {
            id,
            core,
            session,
            fd,
            stats: stats.clone(),
            conn: RefCell::new(Connection::new(role, limits, heartbeat, Instant::now())),
            wakers: RefCell::new(IdMap::default()),
            writer_wake: Default::default(),
            timer_wake: Default::default(),
            closed: Default::default(),
            counted_queue: Cell::new(0),
            close_done: Cell::new(false),
            on_open: RefCell::new(None),
            on_close: RefCell::new(None),
            on_drain: RefCell::new(None),
            caps: Cell::new(0),
        });
        CoreStats::inc(&stats.uplinks);
        let mut g = CloseOnDrop::new(&up, "connection closed", rh);
        crate::runtime::spawn_isolated("uplink-reader", async move {
            let up = g.up.clone();
            up.clone().read_loop(g.io(), leftover).await;
            if up.conn.borrow().is_failing() {
                // Let the writer put GOAWAY(reason) on the wire first; the
                // timer task bounds the wait (FAIL_FLUSH).
                up.wait_closed().await;
            }
            drop(g);
        });
        let mut g = CloseOnDrop::new(&up, "write failed", wh);
        crate::runtime::spawn_isolated("uplink-writer", async move {
            let up = g.up.clone();
            up.write_loop(g.io()).await;
            drop(g);
        });
        let g = CloseOnDrop::new(&up, "uplink timer ended", ());
        crate::runtime::spawn_isolated("uplink-timer", async move {
            g.up.clone().timer_loop().await;
            drop(g);
        });
        up
    }

    /// Called for each OPEN from the peer (agent side).
    pub fn set_open_handler(&self, f: impl Fn(Stream, Bytes) + 'static) {
        *self.on_open.borrow_mut() = Some(Box::new(f));
    }

    /// Called once when the uplink has closed.
    pub fn set_close_handler(&self, f: impl FnOnce() + 'static) {
        if self.close_done.get() {
            f();
            return;
        }
        *self.on_close.borrow_mut() = Some(Box::new(f));
    }

    /// Called once when the uplink stops taking new streams: the gateway
    /// withdraws it from routing at once, not only when it has closed.
    pub fn set_drain_handler(&self, f: impl FnOnce() + 'static) {
        if !self.is_open() {
            f();
            return;
        }
        *self.on_drain.borrow_mut() = Some(Box::new(f));
    }

    pub fn is_open(&self) -> bool {
        self.conn.borrow().is_open()
    }

    pub fn is_closed(&self) -> bool {
        self.conn.borrow().is_closed()
    }

    pub fn active_streams(&self) -> usize {
        self.conn.borrow().active_streams()
    }

    pub fn has_capacity(&self) -> bool {
        self.conn.borrow().has_capacity()
    }

    /// Draining and no stream left.
    pub fn is_idle(&self) -> bool {
        self.conn.borrow().is_idle()
    }

    /// The code of the first graceful GOAWAY the peer sent (NO_ERROR,
    /// SHUTDOWN, REHOME), if any.
    pub fn peer_goaway(&self) -> Option<crate::proto::ErrorCode> {
        self.conn.borrow().peer_goaway()
    }

    /// Capability bits negotiated in the handshake (set by the side that
    /// ran it; 0 until then).
    pub fn capabilities(&self) -> u32 {
        self.caps.get()
    }

    pub fn set_capabilities(&self, caps: u32) {
        self.caps.set(caps);
    }

    pub fn close_reason(&self) -> Option<String> {
        self.conn.borrow().close_reason().map(|r| r.to_string())
    }

    /// Resolves once the uplink has closed.
    pub async fn wait_closed(&self) {
        while !self.close_done.get() {
            self.closed.notified().await;
        }
    }

    /// Applies what the connection decided: wakes the streams its events
    /// name, hands new streams to the open handler, and wakes the writer
    /// when frames wait. Called after every change to the connection.
    fn pump(self: &Rc<Self>) {
        loop {
            let ev = self.conn.borrow_mut().poll_event();
            let Some(ev) = ev else { break };
            match ev {
                Event::Readable(id) => self.wake(id, true),
                Event::Writable(id) => self.wake(id, false),
                Event::Opened { id, head } => {
                    let s = Stream::new(self.clone(), id);
                    let handler = self.on_open.borrow();
                    match handler.as_ref() {
                        Some(h) => h(s, head),
                        None => drop(s),
                    }
                }
                Event::Closed => self.finish_close(),
            }
        }
        if !self.is_open() {
            let handler = self.on_drain.borrow_mut().take();
            if let Some(f) = handler {
                f();
            }
        }
        let (queued, wants) = {
            let c = self.conn.borrow();
            (c.queued_frames(), c.wants_transmit() || c.is_failing())
        };
        let before = self.counted_queue.replace(queued);
        if queued > before {
            self.stats.queue_add((queued - before) as u64);
        } else if before > queued {
            self.stats.queue_sub((before - queued) as u64);
        }
        if wants {
            self.writer_wake.notify();
        }
        if self.conn.borrow().is_failing() {
            // The timer bounds how long the GOAWAY may take to go out.
            self.timer_wake.notify();
        }
    }

    fn wake(&self, id: u32, read: bool) {
        let w = {
            let mut wakers = self.wakers.borrow_mut();
            wakers
                .get_mut(&id)
                .and_then(|w| if read { w.read.take() } else { w.write.take() })
        };
        if let Some(w) = w {
            w.wake();
        }
    }

    fn finish_close(self: &Rc<Self>) {
        if self.close_done.replace(true) {
            return;
        }
        crate::io::shutdown_fd(self.fd, libc::SHUT_RDWR);
        let reason = self.close_reason().unwrap_or_default();
        tracing::debug!(uplink = self.id, session = %self.session, %reason, "uplink closed");
        // Every stream was reset by the connection; their wakers run now.
        let wakers: Vec<Wakers> = self.wakers.borrow_mut().drain().map(|(_, w)| w).collect();
        for w in wakers {
            w.read.into_iter().chain(w.write).for_each(Waker::wake);
        }
        let counted = self.counted_queue.replace(0);
        self.stats.queue_sub(counted as u64);
        self.writer_wake.notify();
        self.timer_wake.notify();
        self.closed.notify();
        CoreStats::dec(&self.stats.uplinks);
        let handler = self.on_close.borrow_mut().take();
        if let Some(f) = handler {
            f();
        }
    }

    /// Opens a new stream carrying `head` (gateway side). `None` when the
    /// uplink is draining, closed or at its stream limit.
    pub fn open_stream(self: &Rc<Self>, head: Bytes) -> Option<Stream> {
        let id = self.conn.borrow_mut().open(head).ok()?;
        let s = Stream::new(self.clone(), id);
        self.pump();
        Some(s)
    }

    /// Sends GOAWAY(reason) and stops taking new streams; in-flight
    /// streams finish. Used on graceful shutdown.
    pub fn go_away(self: &Rc<Self>, code: ErrorCode, reason: &str) {
        self.conn.borrow_mut().go_away(code, reason);
        self.pump();
    }

    /// Queues GOAWAY(code, reason); the writer closes the uplink once it
    /// is on the wire. Only this uplink is affected.
    pub fn fail(self: &Rc<Self>, code: ErrorCode, reason: &str) {
        tracing::warn!(uplink = self.id, session = %self.session, %reason, "closing uplink");
        self.conn.borrow_mut().fail(code, reason);
        self.pump();
    }

    /// Closes at once: every stream sees `Gone`, the socket is shut down
    /// (which ends a read pending in the reader task).
    pub fn close_now(self: &Rc<Self>, why: &str) {
        self.conn
            .borrow_mut()
            .close(CloseReason::Local(why.to_string()));
        self.pump();
    }

    fn consumed(self: &Rc<Self>, id: u32, n: usize) {
        if n == 0 {
            return;
        }
        self.conn.borrow_mut().consumed(id, n);
        self.pump();
    }

    async fn read_loop<R: AsyncReadRent>(self: Rc<Self>, rh: &mut R, leftover: BytesMut) {
        let max_frame = self.conn.borrow().limits().max_frame;
        let mut dec = Decoder::new(max_frame);
        let mut buf = leftover;
        loop {
            let now = Instant::now();
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(f)) => {
                        CoreStats::inc(&self.stats.frames_in);
                        #[cfg(debug_assertions)]
                        fault::maybe_panic(self.id, &f);
                        let f = detach(f);
                        self.conn.borrow_mut().handle_frame(f, now);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.stats.error(ErrorKind::Protocol);
                        self.fail(e.code(), &format!("malformed frame: {e}"));
                        return;
                    }
                }
            }
            self.pump();
            {
                let c = self.conn.borrow();
                if c.is_failing() {
                    drop(c);
                    self.stats.error(ErrorKind::Protocol);
                    let why = self.close_reason().unwrap_or_default();
                    tracing::warn!(uplink = self.id, session = %self.session, reason = %why, "closing uplink");
                    return;
                }
                if c.is_closed() {
                    return;
                }
            }
            let (res, b) = super::read_append(rh, buf, 16 * 1024, READ_CHUNK).await;
            buf = b;
            match res {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    self.stats
                        .bytes_in
                        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    async fn write_loop<W: AsyncWriteRent>(self: Rc<Self>, wh: &mut W) {
        let mut batch = Batch::new();
        loop {
            let frames = self
                .conn
                .borrow_mut()
                .poll_transmit(&mut batch, Instant::now());
            if frames == 0 {
                let (closed, failing) = {
                    let c = self.conn.borrow();
                    (c.is_closed(), c.is_failing())
                };
                if closed {
                    return;
                }
                if failing {
                    // The GOAWAY is on the wire: close.
                    let _ = wh.shutdown().await;
                    return;
                }
                self.writer_wake.notified().await;
                // Let the other tasks woken in this tick queue their frames
                // first: one more poll buys a bigger writev.
                crate::runtime::notify::yield_now().await;
                continue;
            }
            self.pump();
            batch.seal();
            let bytes = batch.bytes();
            let mut calls = 0usize;
            while !batch.is_written() {
                let (res, b) = wh.writev(batch).await;
                batch = b;
                calls += 1;
                match res {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        batch.advance(n);
                        self.conn
                            .borrow_mut()
                            .on_written(batch.is_written(), Instant::now());
                    }
                }
            }
            // Short writes make a batch take several syscalls; count each
            // so that frames-per-writev is per syscall.
            self.stats.record_writev(frames.div_ceil(calls), bytes);
            for _ in 1..calls {
                CoreStats::inc(&self.stats.writevs);
            }
            batch.clear();
        }
    }

    async fn timer_loop(self: Rc<Self>) {
        loop {
            if self.conn.borrow().is_failing() {
                // A fatal GOAWAY is queued, wherever the error was found:
                // give the writer a second to put it on the wire, not the
                // 45 s stall deadline a peer that stopped reading would get.
                monoio::time::sleep(FAIL_FLUSH).await;
                self.close_now("GOAWAY not written in time");
                return;
            }
            let next = self.conn.borrow().poll_timeout();
            let Some(next) = next else { return };
            let now = Instant::now();
            if now >= next {
                self.conn.borrow_mut().handle_timeout(now);
                self.pump();
                continue;
            }
            // Racing a timer is fine here: no socket operation is dropped.
            monoio::select! {
                _ = monoio::time::sleep(next - now) => {}
                _ = self.timer_wake.notified() => {}
            }
        }
    }
}

/// Copies small payloads out of the read chunk so that a stream holding a
/// few bytes does not pin a whole chunk.
fn detach(mut f: Frame) -> Frame {
    if !f.payload.is_empty() && f.payload.len() < DETACH_BELOW {
        f.payload = Bytes::copy_from_slice(&f.payload);
    }
    f
}

/// One stream's handle. Dropping it releases the stream: reset (CANCEL)
/// unless both directions ended, buffered bytes credited back.
pub struct Stream {
    up: Rc<Uplink>,
    id: u32,
}

impl Stream {
    fn new(up: Rc<Uplink>, id: u32) -> Stream {
        up.wakers.borrow_mut().insert(id, Wakers::default());
        CoreStats::inc(&up.stats.active_streams);
        Stream { up, id }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn uplink(&self) -> &Rc<Uplink> {
        &self.up
    }

    fn wrap(&self, ev: crate::proto::Inbound) -> Inbound {
        match ev {
            crate::proto::Inbound::Head(h) => Inbound::Head(h),
            crate::proto::Inbound::Data(bytes) => Inbound::Data(Chunk {
                bytes,
                up: self.up.clone(),
                id: self.id,
            }),
            crate::proto::Inbound::End => Inbound::End,
            crate::proto::Inbound::Reset(c) => Inbound::Reset(c),
            crate::proto::Inbound::Gone => Inbound::Gone,
        }
    }

    /// Next event from the far side.
    pub async fn recv(&self) -> Inbound {
        std::future::poll_fn(|cx| {
            if let Some(ev) = self.try_recv() {
                return Poll::Ready(ev);
            }
            if let Some(w) = self.up.wakers.borrow_mut().get_mut(&self.id) {
                w.read = Some(cx.waker().clone());
            } else {
                return Poll::Ready(Inbound::Gone);
            }
            Poll::Pending
        })
        .await
    }

    /// An event that has already arrived, without waiting.
    pub fn try_recv(&self) -> Option<Inbound> {
        let ev = self.up.conn.borrow_mut().recv(self.id);
        // recv can grant credit (never here) but keep the habit: pump after
        // every change.
        ev.map(|e| self.wrap(e))
    }

    /// Response or 1xx head (agent side).
    pub fn send_head(&self, head: Bytes) {
        let _ = self.up.conn.borrow_mut().send_head(self.id, head);
        self.up.pump();
    }

    /// Sends body bytes, waiting for stream and uplink credit. Fails when
    /// the stream was reset or the uplink closed.
    pub async fn send_data(&self, data: Bytes) -> Result<(), StreamError> {
        let mut data = data;
        std::future::poll_fn(|cx| {
            let r = self.up.conn.borrow_mut().send_data(self.id, &mut data);
            self.up.pump();
            match r {
                Err(e) => Poll::Ready(Err(e)),
                Ok(_) if data.is_empty() => Poll::Ready(Ok(())),
                Ok(_) => {
                    match self.up.wakers.borrow_mut().get_mut(&self.id) {
                        Some(w) => w.write = Some(cx.waker().clone()),
                        None => return Poll::Ready(Err(StreamError::Gone)),
                    }
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Half-closes our direction.
    pub fn send_end(&self) {
        let _ = self.up.conn.borrow_mut().finish(self.id);
        self.up.pump();
    }

    /// Aborts the stream both ways.
    pub fn reset(&self, code: ErrorCode) {
        self.up.conn.borrow_mut().reset(self.id, code);
        self.up.pump();
    }

    /// Ready once the stream was reset or its uplink closed; registers for
    /// a wake-up otherwise. Only for a stream nobody `recv`s on (it shares
    /// the read waker).
    pub fn poll_aborted(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        use crate::proto::StreamState as S;
        let state = self.up.conn.borrow().stream_state(self.id);
        if matches!(state, None | Some(S::Reset(..))) || self.up.is_closed() {
            return Poll::Ready(());
        }
        if let Some(w) = self.up.wakers.borrow_mut().get_mut(&self.id) {
            w.read = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Whether the peer ended or reset its direction.
    pub fn remote_done(&self) -> bool {
        use crate::proto::StreamState as S;
        matches!(
            self.up.conn.borrow().stream_state(self.id),
            None | Some(S::RemoteEnded | S::Closed | S::Reset(..))
        )
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        CoreStats::dec(&self.up.stats.active_streams);
        self.up.wakers.borrow_mut().remove(&self.id);
        self.up.conn.borrow_mut().release(self.id);
        self.up.pump();
    }
}

/// Fault injection for tests, compiled into debug builds only: the gateway
/// uplink whose id is in `RINGTUNNEL_FAULT_PANIC_UPLINK` panics in its
/// reader task on its first RESPONSE frame.
#[cfg(debug_assertions)]
mod fault {
    use std::sync::OnceLock;

    pub(super) fn maybe_panic(uplink: u64, f: &super::Frame) {
        static TARGET: OnceLock<Option<u64>> = OnceLock::new();
        let target = TARGET.get_or_init(|| {
            std::env::var("RINGTUNNEL_FAULT_PANIC_UPLINK")
                .ok()
                .and_then(|v| v.parse().ok())
        });
        if *target == Some(uplink) && f.kind == crate::proto::FrameType::Response {
            panic!("fault injection: uplink {uplink} panics on RESPONSE");
        }
    }
}

/// Reads one frame during the handshake, before the uplink tasks exist.
/// Errors keep their source (a TLS alert arrives here, for one): callers
/// that must tell a refusal from a network error look inside.
pub async fn read_handshake_frame<S: AsyncReadRent>(
    s: &mut S,
    buf: BytesMut,
    max: u32,
) -> (std::io::Result<Frame>, BytesMut) {
    use std::io::{Error, ErrorKind};
    let mut dec = Decoder::new(max);
    let mut buf = buf;
    loop {
        match dec.decode(&mut buf) {
            Ok(Some(f)) => return (Ok(f), buf),
            Ok(None) => {}
            Err(e) => {
                let e = Error::new(ErrorKind::InvalidData, format!("malformed handshake: {e}"));
                return (Err(e), buf);
            }
        }
        let (res, b) = super::read_append(s, buf, 4096, 4096).await;
        buf = b;
        match res {
            Ok(0) => {
                let e = Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed during handshake",
                );
                return (Err(e), buf);
            }
            Err(e) => return (Err(e), buf),
            Ok(_) => {}
        }
    }
}

/// Writes one frame during the handshake.
pub async fn write_frame<S: AsyncWriteRent>(s: &mut S, f: &Frame) -> std::io::Result<()> {
    let mut b = BytesMut::with_capacity(f.encoded_len());
    crate::proto::encode(f, &mut b);
    super::write_all(s, b.freeze()).await.map(|_| ())
}
