//! One uplink: a TCP connection between gateway and agent carrying many
//! streams as frames.
//!
//! Owned by exactly one core. Three tasks share it through `Rc`: the
//! frame reader (the only reader of the socket), the writer (the only
//! writer: it drains the outbound queue into one vectored write per
//! syscall) and a heartbeat ticker. Streams never touch the socket: they
//! push frames into `OutQueue` and wake the writer.
//!
//! Flow control (docs/PROTOCOL.md): a DATA frame needs credit on its
//! stream and on the uplink; credit comes back as WINDOW frames when the
//! consumer on the far side has taken the bytes. So per uplink, inbound
//! memory is bounded by `conn_window` and outbound by the credit the peer
//! granted, however fast either side produces.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncWriteRent, Splitable};
use monoio::net::TcpStream;

use super::batch::Batch;
use super::stats::{CoreStats, ErrorKind};
use crate::proto::{Decoder, ErrorCode, Frame, FrameType, ProtoError};
use crate::runtime::notify::{Notify, WaitList};

/// Negotiated limits of one uplink (the gateway's ACCEPT).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_frame: u32,
    pub stream_window: u32,
    pub conn_window: u32,
    pub max_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: crate::proto::DEFAULT_MAX_FRAME,
            stream_window: 512 * 1024,
            conn_window: 16 * 1024 * 1024,
            max_streams: 4096,
        }
    }
}

/// Heartbeat timing; tests shorten it.
#[derive(Clone, Copy, Debug)]
pub struct Heartbeat {
    pub interval: Duration,
    pub dead_after: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            interval: Duration::from_secs(15),
            dead_after: Duration::from_secs(45),
        }
    }
}

/// Largest DATA payload we produce: big enough to amortise headers,
/// small enough to interleave streams finely.
pub const DATA_CHUNK: usize = 64 * 1024;

/// What a stream receives from the far side.
#[derive(Debug)]
pub enum Inbound {
    Head(Bytes),
    Data(Bytes),
    End,
    Reset(ErrorCode),
    /// The uplink closed under the stream.
    Gone,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    /// GOAWAY sent or received: no new streams; existing ones finish.
    Draining,
    /// A fatal error was queued as GOAWAY; close once it is written.
    Failing,
    Closed,
}

struct StreamShared {
    id: u32,
    inbound: RefCell<VecDeque<Inbound>>,
    readable: Notify,
    send_credit: Cell<i64>,
    writable: Notify,
    recv_window: Cell<i64>,
    recv_unacked: Cell<u32>,
    sent_end: Cell<bool>,
    got_end: Cell<bool>,
    reset: Cell<bool>,
}

#[derive(Default)]
struct OutQueue {
    control: VecDeque<Frame>,
    per_stream: IdMap<VecDeque<Frame>>,
    ready: VecDeque<u32>,
    frames: usize,
}

impl OutQueue {
    fn push(&mut self, f: Frame) {
        self.frames += 1;
        if f.kind.is_control() {
            self.control.push_back(f);
            return;
        }
        let q = self.per_stream.entry(f.stream).or_default();
        if q.is_empty() {
            self.ready.push_back(f.stream);
        }
        q.push_back(f);
    }

    /// Removes frames not yet written for a stream that was reset; returns
    /// the DATA bytes dropped so their uplink credit can be refunded.
    fn purge(&mut self, stream: u32) -> usize {
        let Some(q) = self.per_stream.remove(&stream) else {
            return 0;
        };
        self.ready.retain(|s| *s != stream);
        self.frames -= q.len();
        q.iter()
            .filter(|f| f.kind == FrameType::Data)
            .map(|f| f.payload.len())
            .sum()
    }

    /// Control frames first, then one frame per stream in turn, so a bulk
    /// body never delays a heartbeat or another stream's small response.
    fn fill(&mut self, batch: &mut Batch) {
        while let Some(f) = self.control.front() {
            if !batch.has_room(f.payload.len()) {
                return;
            }
            batch.push(f);
            self.control.pop_front();
            self.frames -= 1;
        }
        while let Some(id) = self.ready.pop_front() {
            let q = self
                .per_stream
                .get_mut(&id)
                .expect("ready stream has a queue");
            let f = q.front().expect("ready queue is non-empty");
            if !batch.has_room(f.payload.len()) {
                self.ready.push_front(id);
                return;
            }
            batch.push(f);
            q.pop_front();
            self.frames -= 1;
            if q.is_empty() {
                self.per_stream.remove(&id);
            } else {
                self.ready.push_back(id);
            }
        }
    }
}

/// Stream ids are small sequential integers chosen by us (or checked by
/// us), so SipHash's DoS resistance buys nothing on this per-frame path.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | *b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        // Fibonacci hashing spreads sequential ids over the table.
        self.0 = (v as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap<V> = HashMap<u32, V, std::hash::BuildHasherDefault<IdHasher>>;

type OpenHandler = Box<dyn Fn(Stream, Bytes)>;
type CloseHandler = Box<dyn FnOnce()>;

/// A live uplink. Cheap to share on its core via `Rc`.
pub struct Uplink {
    pub id: u64,
    pub core: usize,
    pub session: String,
    fd: RawFd,
    limits: Limits,
    stats: Arc<CoreStats>,
    state: Cell<State>,
    out: RefCell<OutQueue>,
    writer_wake: Notify,
    streams: RefCell<IdMap<Rc<StreamShared>>>,
    next_id: Cell<u32>,
    conn_credit: Cell<i64>,
    conn_waiters: WaitList,
    conn_recv_window: Cell<i64>,
    conn_unacked: Cell<u32>,
    last_rx: Cell<Instant>,
    on_open: RefCell<Option<OpenHandler>>,
    on_close: RefCell<Option<CloseHandler>>,
    closed: Notify,
    close_reason: RefCell<Option<String>>,
}

impl Uplink {
    /// Starts reader, writer and heartbeat tasks on the current core.
    /// `leftover` holds bytes read past the handshake.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        stream: TcpStream,
        leftover: BytesMut,
        id: u64,
        core: usize,
        session: String,
        limits: Limits,
        heartbeat: Heartbeat,
        stats: Arc<CoreStats>,
    ) -> Rc<Uplink> {
        let _ = stream.set_nodelay(true);
        let fd = stream.as_raw_fd();
        let up = Rc::new(Uplink {
            id,
            core,
            session,
            fd,
            limits,
            stats: stats.clone(),
            state: Cell::new(State::Open),
            out: RefCell::new(OutQueue::default()),
            writer_wake: Notify::new(),
            streams: RefCell::new(IdMap::default()),
            next_id: Cell::new(1),
            conn_credit: Cell::new(limits.conn_window as i64),
            conn_waiters: WaitList::new(),
            conn_recv_window: Cell::new(limits.conn_window as i64),
            conn_unacked: Cell::new(0),
            last_rx: Cell::new(Instant::now()),
            on_open: RefCell::new(None),
            on_close: RefCell::new(None),
            closed: Notify::new(),
            close_reason: RefCell::new(None),
        });
        CoreStats::inc(&stats.uplinks);
        let (rh, wh) = stream.into_split();
        let u = up.clone();
        crate::runtime::spawn_isolated("uplink-reader", async move {
            u.clone().read_loop(rh, leftover).await;
            if u.state.get() == State::Failing {
                // Let the writer put GOAWAY(reason) on the wire first, but
                // do not wait forever on a peer that stopped reading.
                let _ =
                    monoio::time::timeout(std::time::Duration::from_secs(1), u.wait_closed()).await;
            }
            u.close_now("connection closed");
        });
        let u = up.clone();
        crate::runtime::spawn_isolated("uplink-writer", async move {
            u.clone().write_loop(wh).await;
            u.close_now("write failed");
        });
        let u = up.clone();
        crate::runtime::spawn_isolated("uplink-heartbeat", async move {
            u.heartbeat(heartbeat).await;
        });
        up
    }

    /// Called for each OPEN from the peer (agent side).
    pub fn set_open_handler(&self, f: impl Fn(Stream, Bytes) + 'static) {
        *self.on_open.borrow_mut() = Some(Box::new(f));
    }

    /// Called once when the uplink has closed.
    pub fn set_close_handler(&self, f: impl FnOnce() + 'static) {
        if self.state.get() == State::Closed {
            f();
            return;
        }
        *self.on_close.borrow_mut() = Some(Box::new(f));
    }

    pub fn is_open(&self) -> bool {
        self.state.get() == State::Open
    }

    pub fn is_closed(&self) -> bool {
        self.state.get() == State::Closed
    }

    pub fn active_streams(&self) -> usize {
        self.streams.borrow().len()
    }

    pub fn has_capacity(&self) -> bool {
        self.is_open() && self.streams.borrow().len() < self.limits.max_streams as usize
    }

    pub fn close_reason(&self) -> Option<String> {
        self.close_reason.borrow().clone()
    }

    /// Resolves once the uplink has closed.
    pub async fn wait_closed(&self) {
        while self.state.get() != State::Closed {
            self.closed.notified().await;
        }
    }

    fn enqueue(&self, f: Frame) {
        // After a fatal GOAWAY nothing else may follow it on the wire.
        if matches!(self.state.get(), State::Closed | State::Failing) {
            return;
        }
        self.out.borrow_mut().push(f);
        self.stats.queue_add(1);
        self.writer_wake.notify();
    }

    /// Opens a new stream carrying `head` (gateway side). `None` when the
    /// uplink is draining, closed or at its stream limit.
    pub fn open_stream(self: &Rc<Self>, head: Bytes) -> Option<Stream> {
        if !self.has_capacity() {
            return None;
        }
        let mut id = self.next_id.get();
        {
            let streams = self.streams.borrow();
            while id == 0 || streams.contains_key(&id) {
                id = id.wrapping_add(1);
            }
        }
        self.next_id.set(id.wrapping_add(1));
        let s = self.new_stream(id);
        self.enqueue(Frame::open(id, head));
        Some(s)
    }

    fn new_stream(self: &Rc<Self>, id: u32) -> Stream {
        let sh = Rc::new(StreamShared {
            id,
            inbound: RefCell::new(VecDeque::new()),
            readable: Notify::new(),
            send_credit: Cell::new(self.limits.stream_window as i64),
            writable: Notify::new(),
            recv_window: Cell::new(self.limits.stream_window as i64),
            recv_unacked: Cell::new(0),
            sent_end: Cell::new(false),
            got_end: Cell::new(false),
            reset: Cell::new(false),
        });
        self.streams.borrow_mut().insert(id, sh.clone());
        CoreStats::inc(&self.stats.active_streams);
        Stream {
            up: self.clone(),
            sh,
            released: Cell::new(false),
        }
    }

    /// Sends GOAWAY(reason) and stops taking new streams; in-flight
    /// streams finish. Used on graceful shutdown.
    pub fn go_away(&self, code: ErrorCode, reason: &str) {
        if self.state.get() == State::Open {
            self.state.set(State::Draining);
            self.enqueue(Frame::goaway(code, reason));
        }
    }

    /// Queues GOAWAY(code, reason); the writer closes the uplink once it
    /// is on the wire. Only this uplink is affected.
    pub fn fail(&self, code: ErrorCode, reason: &str) {
        if matches!(self.state.get(), State::Failing | State::Closed) {
            return;
        }
        tracing::warn!(uplink = self.id, session = %self.session, %reason, "closing uplink");
        *self.close_reason.borrow_mut() = Some(reason.to_string());
        self.enqueue(Frame::goaway(code, reason));
        self.state.set(State::Failing);
        self.writer_wake.notify();
    }

    /// Closes at once: every stream sees `Gone`, the socket is shut down
    /// (which ends a read pending in the reader task).
    pub fn close_now(&self, why: &str) {
        if self.state.get() == State::Closed {
            return;
        }
        self.state.set(State::Closed);
        if self.close_reason.borrow().is_none() {
            *self.close_reason.borrow_mut() = Some(why.to_string());
        }
        tracing::debug!(uplink = self.id, session = %self.session, %why, "uplink closed");
        crate::io::shutdown_fd(self.fd, libc::SHUT_RDWR);
        let streams: Vec<_> = self.streams.borrow_mut().drain().map(|(_, s)| s).collect();
        for s in streams {
            s.reset.set(true);
            s.inbound.borrow_mut().push_back(Inbound::Gone);
            s.readable.notify();
            s.writable.notify();
        }
        let dropped = {
            let mut out = self.out.borrow_mut();
            let n = out.frames;
            *out = OutQueue::default();
            n
        };
        self.stats.queue_sub(dropped as u64);
        self.conn_waiters.wake_all();
        self.writer_wake.notify();
        self.closed.notify();
        CoreStats::dec(&self.stats.uplinks);
        if let Some(f) = self.on_close.borrow_mut().take() {
            f();
        }
    }

    async fn read_loop(
        self: Rc<Self>,
        mut rh: monoio::net::tcp::TcpOwnedReadHalf,
        leftover: BytesMut,
    ) {
        let mut dec = Decoder::new(self.limits.max_frame);
        let mut buf = leftover;
        loop {
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(f)) => {
                        CoreStats::inc(&self.stats.frames_in);
                        if let Err((code, why)) = self.dispatch(f) {
                            self.stats.error(ErrorKind::Protocol);
                            self.fail(code, &why);
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.stats.error(ErrorKind::Protocol);
                        self.fail(e.code(), &format!("malformed frame: {e}"));
                        return;
                    }
                }
            }
            if self.state.get() == State::Closed {
                return;
            }
            let (res, b) = super::read_append(&mut rh, buf, 16 * 1024, 256 * 1024).await;
            buf = b;
            match res {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    // Liveness is per read, not per frame: one clock read
                    // for a whole batch.
                    self.last_rx.set(Instant::now());
                    self.stats
                        .bytes_in
                        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    fn stream_of(&self, id: u32) -> Option<Rc<StreamShared>> {
        self.streams.borrow().get(&id).cloned()
    }

    fn dispatch(self: &Rc<Self>, f: Frame) -> Result<(), (ErrorCode, String)> {
        match f.kind {
            FrameType::Data => {
                let n = f.payload.len() as i64;
                let cw = self.conn_recv_window.get() - n;
                if cw < 0 {
                    return Err(flow("DATA beyond uplink credit"));
                }
                self.conn_recv_window.set(cw);
                match self.stream_of(f.stream) {
                    Some(s) if !s.got_end.get() => {
                        let sw = s.recv_window.get() - n;
                        if sw < 0 {
                            return Err(flow("DATA beyond stream credit"));
                        }
                        s.recv_window.set(sw);
                        s.inbound.borrow_mut().push_back(Inbound::Data(f.payload));
                        s.readable.notify();
                    }
                    // Gateway side: ids are allocated in order, so an id we
                    // never handed out is the peer inventing streams.
                    None if self.on_open.borrow().is_none() && f.stream >= self.next_id.get() => {
                        return Err(proto_err(&format!(
                            "DATA for stream {} that was never opened",
                            f.stream
                        )));
                    }
                    // A stream we already reset: nobody will consume it,
                    // but the uplink credit must come back.
                    _ => self.grant_conn(n as u32),
                }
            }
            FrameType::Open => {
                if self.stream_of(f.stream).is_some() {
                    return Err(proto_err("OPEN for a stream id in use"));
                }
                if self.state.get() != State::Open
                    || self.streams.borrow().len() >= self.limits.max_streams as usize
                {
                    self.enqueue(Frame::reset(f.stream, ErrorCode::RefusedStream));
                    return Ok(());
                }
                let handler = self.on_open.borrow();
                let Some(h) = handler.as_ref() else {
                    return Err(proto_err("OPEN sent to the gateway"));
                };
                let s = self.new_stream(f.stream);
                h(s, f.payload);
            }
            FrameType::Response => {
                if let Some(s) = self.stream_of(f.stream) {
                    s.inbound.borrow_mut().push_back(Inbound::Head(f.payload));
                    s.readable.notify();
                }
            }
            FrameType::End => {
                if let Some(s) = self.stream_of(f.stream) {
                    s.got_end.set(true);
                    s.inbound.borrow_mut().push_back(Inbound::End);
                    s.readable.notify();
                    self.maybe_retire(&s);
                }
            }
            FrameType::Reset => {
                let code = f.reset_code().map_err(pe)?;
                if let Some(s) = self.streams.borrow_mut().remove(&f.stream) {
                    s.reset.set(true);
                    s.inbound.borrow_mut().push_back(Inbound::Reset(code));
                    s.readable.notify();
                    s.writable.notify();
                    let refund = self.out.borrow_mut().purge(f.stream);
                    self.refund_send(refund);
                }
            }
            FrameType::Window => {
                let inc = f.window_increment().map_err(pe)? as i64;
                if f.stream == 0 {
                    let c = self.conn_credit.get() + inc;
                    if c > u32::MAX as i64 {
                        return Err(flow("uplink window above 2^32-1"));
                    }
                    self.conn_credit.set(c);
                    self.conn_waiters.wake_all();
                } else if let Some(s) = self.stream_of(f.stream) {
                    let c = s.send_credit.get() + inc;
                    if c > u32::MAX as i64 {
                        return Err(flow("stream window above 2^32-1"));
                    }
                    s.send_credit.set(c);
                    s.writable.notify();
                }
            }
            FrameType::Ping => self.enqueue(Frame::pong(f.ping_payload().map_err(pe)?)),
            FrameType::Pong => {}
            FrameType::GoAway => {
                let (code, reason) = f.parse_goaway().map_err(pe)?;
                tracing::info!(uplink = self.id, ?code, %reason, "peer sent GOAWAY");
                if code == ErrorCode::NoError || code == ErrorCode::Shutdown {
                    if self.state.get() == State::Open {
                        self.state.set(State::Draining);
                    }
                } else {
                    *self.close_reason.borrow_mut() = Some(format!("peer: {reason}"));
                    self.close_now("peer sent GOAWAY with an error");
                }
            }
            FrameType::Hello | FrameType::Accept | FrameType::Refuse => {
                return Err(proto_err("handshake frame after the handshake"));
            }
        }
        Ok(())
    }

    fn refund_send(&self, n: usize) {
        if n > 0 {
            self.conn_credit.set(self.conn_credit.get() + n as i64);
            self.conn_waiters.wake_all();
        }
    }

    fn grant_conn(&self, n: u32) {
        let u = self.conn_unacked.get() + n;
        if u >= self.limits.conn_window / 4 {
            self.conn_unacked.set(0);
            self.conn_recv_window
                .set(self.conn_recv_window.get() + u as i64);
            self.enqueue(Frame::window(0, u));
        } else {
            self.conn_unacked.set(u);
        }
    }

    fn maybe_retire(&self, s: &StreamShared) {
        if s.sent_end.get() && s.got_end.get() {
            self.streams.borrow_mut().remove(&s.id);
        }
    }

    async fn write_loop(self: Rc<Self>, mut wh: monoio::net::tcp::TcpOwnedWriteHalf) {
        let mut batch = Batch::new();
        loop {
            self.out.borrow_mut().fill(&mut batch);
            if batch.is_empty() {
                match self.state.get() {
                    State::Closed => return,
                    State::Failing => {
                        let _ = wh.shutdown().await;
                        self.close_now("protocol error");
                        return;
                    }
                    _ => {}
                }
                self.writer_wake.notified().await;
                // Let the other tasks woken in this tick enqueue their
                // frames first: one more poll buys a bigger writev.
                crate::runtime::notify::yield_now().await;
                continue;
            }
            let frames = batch.frames();
            self.stats.queue_sub(frames as u64);
            batch.seal();
            let bytes = batch.bytes();
            let mut calls = 0usize;
            while !batch.is_written() {
                let (res, b) = wh.writev(batch).await;
                batch = b;
                calls += 1;
                match res {
                    Ok(0) | Err(_) => return,
                    Ok(n) => batch.advance(n),
                }
            }
            // Short writes make a batch take several syscalls; count each
            // so that frames-per-writev is per syscall.
            self.stats.record_writev(frames.div_ceil(calls), bytes);
            for _ in 1..calls {
                crate::io::stats::CoreStats::inc(&self.stats.writevs);
            }
            batch.clear();
        }
    }

    async fn heartbeat(self: Rc<Self>, hb: Heartbeat) {
        loop {
            monoio::time::sleep(hb.interval).await;
            if self.state.get() == State::Closed {
                return;
            }
            if self.last_rx.get().elapsed() > hb.dead_after {
                *self.close_reason.borrow_mut() = Some("peer silent (heartbeat timeout)".into());
                self.close_now("heartbeat timeout");
                return;
            }
            self.enqueue(Frame::ping([0; 8]));
        }
    }
}

fn pe(e: ProtoError) -> (ErrorCode, String) {
    (e.code(), e.to_string())
}

fn proto_err(why: &str) -> (ErrorCode, String) {
    (ErrorCode::ProtocolError, why.to_string())
}

fn flow(why: &str) -> (ErrorCode, String) {
    (ErrorCode::FlowControlError, why.to_string())
}

/// One stream's handle. Dropping it before both directions ended resets
/// the stream (CANCEL) so the far side stops working for nobody.
pub struct Stream {
    up: Rc<Uplink>,
    sh: Rc<StreamShared>,
    released: Cell<bool>,
}

impl Stream {
    pub fn id(&self) -> u32 {
        self.sh.id
    }

    pub fn uplink(&self) -> &Rc<Uplink> {
        &self.up
    }

    /// Next event from the far side.
    pub async fn recv(&self) -> Inbound {
        loop {
            if let Some(ev) = self.sh.inbound.borrow_mut().pop_front() {
                return ev;
            }
            if self.up.is_closed() {
                return Inbound::Gone;
            }
            self.sh.readable.notified().await;
        }
    }

    /// An event that has already arrived, without waiting.
    pub fn try_recv(&self) -> Option<Inbound> {
        self.sh.inbound.borrow_mut().pop_front()
    }

    /// Response or 1xx head (agent side).
    pub fn send_head(&self, head: Bytes) {
        if !self.sh.reset.get() {
            self.up.enqueue(Frame::response(self.sh.id, head));
        }
    }

    /// Sends body bytes, waiting for stream and uplink credit. Fails when
    /// the stream was reset or the uplink closed.
    pub async fn send_data(&self, mut data: Bytes) -> Result<(), ()> {
        let max = (self.up.limits.max_frame as usize).min(DATA_CHUNK);
        while !data.is_empty() {
            let n = std::future::poll_fn(|cx| {
                if self.sh.reset.get() || self.sh.sent_end.get() || self.up.is_closed() {
                    return Poll::Ready(None);
                }
                let avail = self.sh.send_credit.get().min(self.up.conn_credit.get());
                if avail > 0 {
                    return Poll::Ready(Some((avail as usize).min(max).min(data.len())));
                }
                // Register with both: whichever credit is short wakes us.
                self.up.conn_waiters.register(cx.waker());
                match std::pin::pin!(self.sh.writable.notified()).poll(cx) {
                    Poll::Ready(()) => {
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
            .ok_or(())?;
            let piece = data.split_to(n);
            self.sh
                .send_credit
                .set(self.sh.send_credit.get() - n as i64);
            self.up
                .conn_credit
                .set(self.up.conn_credit.get() - n as i64);
            self.up.enqueue(Frame::data(self.sh.id, piece));
        }
        Ok(())
    }

    /// Half-closes our direction.
    pub fn send_end(&self) {
        if self.sh.sent_end.replace(true) || self.sh.reset.get() {
            return;
        }
        self.up.enqueue(Frame::end(self.sh.id));
        self.up.maybe_retire(&self.sh);
    }

    /// Aborts the stream both ways.
    pub fn reset(&self, code: ErrorCode) {
        if self.sh.reset.replace(true) {
            return;
        }
        self.sh.sent_end.set(true);
        if self.up.streams.borrow_mut().remove(&self.sh.id).is_some() || !self.sh.got_end.get() {
            let refund = self.up.out.borrow_mut().purge(self.sh.id);
            self.up.refund_send(refund);
            self.up.enqueue(Frame::reset(self.sh.id, code));
        }
        self.give_back_buffered();
    }

    /// The consumer took `n` body bytes: return credit to the sender.
    pub fn consumed(&self, n: usize) {
        if n == 0 {
            return;
        }
        let n = n as u32;
        self.up.grant_conn(n);
        if self.sh.got_end.get() || self.sh.reset.get() {
            return;
        }
        let u = self.sh.recv_unacked.get() + n;
        if u >= self.up.limits.stream_window / 2 {
            self.sh.recv_unacked.set(0);
            self.sh
                .recv_window
                .set(self.sh.recv_window.get() + u as i64);
            self.up.enqueue(Frame::window(self.sh.id, u));
        } else {
            self.sh.recv_unacked.set(u);
        }
    }

    /// Whether the peer ended or reset its direction.
    pub fn remote_done(&self) -> bool {
        self.sh.got_end.get() || self.sh.reset.get()
    }

    fn give_back_buffered(&self) {
        let n: usize = self
            .sh
            .inbound
            .borrow_mut()
            .drain(..)
            .map(|e| match e {
                Inbound::Data(b) => b.len(),
                _ => 0,
            })
            .sum();
        if n > 0 && !self.up.is_closed() {
            self.up.grant_conn(n as u32);
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.released.replace(true) {
            return;
        }
        CoreStats::dec(&self.up.stats.active_streams);
        if self.up.is_closed() {
            return;
        }
        if !(self.sh.reset.get() || self.sh.sent_end.get() && self.sh.got_end.get()) {
            self.reset(ErrorCode::Cancel);
        } else {
            self.up.streams.borrow_mut().remove(&self.sh.id);
            self.give_back_buffered();
        }
    }
}

use std::future::Future;

/// Reads one frame during the handshake, before the uplink tasks exist.
pub async fn read_handshake_frame(
    s: &mut TcpStream,
    buf: BytesMut,
    max: u32,
) -> (Result<Frame, String>, BytesMut) {
    let mut dec = Decoder::new(max);
    let mut buf = buf;
    loop {
        match dec.decode(&mut buf) {
            Ok(Some(f)) => return (Ok(f), buf),
            Ok(None) => {}
            Err(e) => return (Err(format!("malformed handshake: {e}")), buf),
        }
        let (res, b) = super::read_append(s, buf, 4096, 4096).await;
        buf = b;
        match res {
            Ok(0) => return (Err("connection closed during handshake".into()), buf),
            Err(e) => return (Err(format!("handshake read failed: {e}")), buf),
            Ok(_) => {}
        }
    }
}

/// Writes one frame during the handshake.
pub async fn write_frame(s: &mut TcpStream, f: &Frame) -> std::io::Result<()> {
    let mut b = BytesMut::with_capacity(f.encoded_len());
    crate::proto::encode(f, &mut b);
    super::write_all(s, b.freeze()).await.map(|_| ())
}
