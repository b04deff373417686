//! Model-based tests of [`Connection`], after quinn-proto's connection
//! tests: a gateway and an agent back to back over two in-memory wires
//! (optionally through the real encoder and [`Decoder`]), a virtual clock,
//! and a small app layer on each side that owns its streams by id and
//! remembers what it sent, received and held.
//!
//! The directed tests pin one rule each. The random test
//! ([`random_benign_sequences`], [`random_hostile_sequences`]) checks after
//! every step:
//! - `check_invariants()` on both sides;
//! - global credit conservation per direction: the sender's credit, its
//!   queued DATA, DATA on the wire, what the receiver holds, and uplink
//!   WINDOW increments queued at the receiver or on the wire back add up
//!   to `conn_window` exactly;
//! - the control queue stays within `control_queue_max() + 1`;
//! - the app's streams are exactly the connection's stream table, bodies
//!   arrive byte-exact and END comes after exactly the bytes the peer sent.
//!
//! Some checks read private fields (the control queue, `last_rx`, the
//! stream table): this module is a child of `conn` for that reason.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::*;
use crate::proto::frame::{encode, Decoder, StreamRule};
use crate::proto::test_rng::XorShift;

// ---- the harness ----------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Gw,
    Ag,
}

impl Side {
    fn peer(self) -> Side {
        match self {
            Side::Gw => Side::Ag,
            Side::Ag => Side::Gw,
        }
    }
}

/// One direction of the link: frames in order, with running totals of what
/// the credit equation needs.
#[derive(Default)]
struct Wire {
    frames: VecDeque<Frame>,
    /// DATA payload bytes on the wire.
    data: u64,
    /// Uplink WINDOW increments on the wire.
    grants: u64,
    /// Stream WINDOW frames that ever went through.
    stream_windows: usize,
    /// Per stream: credit on the wire (DATA bytes one way, WINDOW
    /// increments the other).
    stream_credit: BTreeMap<(u32, bool), u64>,
}

fn data_len(f: &Frame) -> u64 {
    if f.kind == FrameType::Data {
        f.payload.len() as u64
    } else {
        0
    }
}

fn conn_grant(f: &Frame) -> u64 {
    if f.kind == FrameType::Window && f.stream == 0 {
        f.window_increment().map_or(0, u64::from)
    } else {
        0
    }
}

impl Wire {
    fn push(&mut self, f: Frame) {
        self.data += data_len(&f);
        self.grants += conn_grant(&f);
        if f.kind == FrameType::Window && f.stream != 0 {
            self.stream_windows += 1;
        }
        let n = stream_credit(&f);
        if n > 0 {
            let key = (f.stream, f.kind == FrameType::Window);
            *self.stream_credit.entry(key).or_default() += n;
        }
        self.frames.push_back(f);
    }

    fn pop(&mut self) -> Option<Frame> {
        let f = self.frames.pop_front()?;
        self.data -= data_len(&f);
        self.grants -= conn_grant(&f);
        let n = stream_credit(&f);
        if n > 0 {
            let key = (f.stream, f.kind == FrameType::Window);
            let left = self.stream_credit.get_mut(&key).expect("counted");
            *left -= n;
            if *left == 0 {
                self.stream_credit.remove(&key);
            }
        }
        Some(f)
    }

    /// DATA bytes (`grants` false) or stream WINDOW increments on the
    /// wire for `id`.
    fn stream_credit(&self, id: u32, grants: bool) -> i64 {
        self.stream_credit.get(&(id, grants)).copied().unwrap_or(0) as i64
    }
}

/// Stream credit a frame carries: DATA bytes, or a stream WINDOW.
fn stream_credit(f: &Frame) -> u64 {
    match f.kind {
        FrameType::Window if f.stream != 0 => f.window_increment().map_or(0, u64::from),
        _ => data_len(f),
    }
}

/// Stream WINDOW increments for `id` queued at `c`.
fn queued_stream_grants(c: &Connection, id: u32) -> i64 {
    c.control
        .iter()
        .filter(|f| f.stream == id && f.kind == FrameType::Window)
        .map(stream_credit)
        .sum::<u64>() as i64
}

/// Stream credit of one direction of `id`, while that direction is live at
/// both ends: the sender's credit, its queued DATA, DATA on the wire and
/// grants queued or on the wire back add up to the receiver's window.
fn check_stream_credit(id: u32, tx: &Connection, fwd: &Wire, rx: &Connection, back: &Wire) {
    let (Some(s), Some(r)) = (tx.streams.get(&id), rx.streams.get(&id)) else {
        return;
    };
    if !(s.state.can_send() && r.state.can_recv()) {
        return;
    }
    let total = s.send_credit
        + s.queued as i64
        + fwd.stream_credit(id, false)
        + queued_stream_grants(rx, id)
        + back.stream_credit(id, true);
    assert_eq!(
        total,
        r.recv_window,
        "stream {id} credit: send {} + queued {} + wire {} + grants queued {} + wire {}",
        s.send_credit,
        s.queued,
        fwd.stream_credit(id, false),
        queued_stream_grants(rx, id),
        back.stream_credit(id, true)
    );
}

/// What one side's application knows about one of its streams.
#[derive(Default, Debug)]
struct AppStream {
    /// Body bytes `send_data` took.
    sent: u64,
    finished: bool,
    /// Agent: heads sent. Gateway: heads received.
    info_heads: u8,
    final_head: bool,
    received: u64,
    ended: bool,
    /// Saw `Reset`/`Gone`, got a send error, or reset it.
    aborted: bool,
    /// Lengths of DATA taken with `recv` and not yet `consumed`.
    held: VecDeque<usize>,
    /// The consumer does not read (a slow client).
    stalled: bool,
    /// `send_data` took less than offered: the app waits for `Writable`
    /// and then sends again.
    waiting: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Released in this terminal state.
    Ended(StreamState),
    /// Released while live: `release` reset it.
    ResetByRelease,
}

#[derive(Default)]
struct App {
    streams: BTreeMap<u32, AppStream>,
    /// Gateway: the request head of every stream it opened.
    heads: BTreeMap<u32, Bytes>,
    /// Final length of every body direction we finished, by id.
    finished_len: BTreeMap<u32, u64>,
    outcomes: BTreeMap<u32, Outcome>,
    /// Every id this side ever had (opened or accepted).
    ever: Vec<u32>,
    /// DATA held past its stream's release (a chunk outliving its handle).
    loose: Vec<(u32, usize)>,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
const OK: &[u8] = b"HTTP/1.1 200 OK\r\n\r\n";

/// The body byte at `offset` of stream `id` sent by `from`: every byte is
/// checked on arrival, so a lost, duplicated or reordered chunk shows.
fn body_byte(id: u32, from: Side, offset: u64) -> u8 {
    let salt = ((id as u64) << 33) ^ (((from == Side::Ag) as u64) << 63);
    ((offset ^ salt).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

fn body(id: u32, from: Side, offset: u64, len: usize) -> Bytes {
    (0..len as u64)
        .map(|i| body_byte(id, from, offset + i))
        .collect::<Vec<u8>>()
        .into()
}

struct Pair {
    limits: Limits,
    heartbeat: Heartbeat,
    base: Instant,
    ms: u64,
    gw: Connection,
    ag: Connection,
    to_ag: Wire,
    to_gw: Wire,
    gw_app: App,
    ag_app: App,
    /// Frames go through `encode` and `Decoder` on their way.
    codec: bool,
    /// Benign peers: every model assertion must hold. Otherwise (hostile
    /// frames injected) only the connection's own invariants.
    strict: bool,
    requests: u32,
    /// Body bytes delivered to either app.
    body_bytes: u64,
    /// `send_data` calls cut short by credit.
    blocked_sends: usize,
}

impl Pair {
    fn new(limits: Limits, heartbeat: Heartbeat, codec: bool, strict: bool) -> Self {
        let base = Instant::now();
        Pair {
            limits,
            heartbeat,
            base,
            ms: 0,
            gw: Connection::new(Role::Gateway, limits, heartbeat, base),
            ag: Connection::new(Role::Agent, limits, heartbeat, base),
            to_ag: Wire::default(),
            to_gw: Wire::default(),
            gw_app: App::default(),
            ag_app: App::default(),
            codec,
            strict,
            requests: 0,
            body_bytes: 0,
            blocked_sends: 0,
        }
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.ms)
    }

    fn conn(&mut self, side: Side) -> &mut Connection {
        match side {
            Side::Gw => &mut self.gw,
            Side::Ag => &mut self.ag,
        }
    }

    fn app(&mut self, side: Side) -> &mut App {
        match side {
            Side::Gw => &mut self.gw_app,
            Side::Ag => &mut self.ag_app,
        }
    }

    /// The connection and app of `side`, and the wire it sends on.
    fn parts(&mut self, side: Side) -> (&mut Connection, &mut App, &mut Wire) {
        match side {
            Side::Gw => (&mut self.gw, &mut self.gw_app, &mut self.to_ag),
            Side::Ag => (&mut self.ag, &mut self.ag_app, &mut self.to_gw),
        }
    }

    /// Everything `side` has queued goes onto its wire (the writer keeps
    /// up: `on_written(true)`).
    fn transmit(&mut self, side: Side) {
        let now = self.now();
        let codec = self.codec;
        let max_frame = self.limits.max_frame;
        let (c, _, wire) = self.parts(side);
        let mut out = Vec::new();
        let n = c.poll_transmit(&mut out, now);
        assert_eq!(n, out.len());
        c.on_written(true, now);
        if codec {
            out = round_trip(out, max_frame);
        }
        for f in out {
            wire.push(f);
        }
    }

    /// Up to `k` frames from the peer's wire into `to`.
    fn deliver(&mut self, to: Side, k: usize) {
        let now = self.now();
        for _ in 0..k {
            let f = match to {
                Side::Gw => self.to_gw.pop(),
                Side::Ag => self.to_ag.pop(),
            };
            let Some(f) = f else { break };
            self.conn(to).handle_frame(f, now);
        }
        self.events(to);
    }

    fn events(&mut self, side: Side) {
        while let Some(ev) = self.conn(side).poll_event() {
            match ev {
                Event::Opened { id, head } => {
                    assert_eq!(side, Side::Ag, "Opened on the gateway");
                    if self.strict {
                        assert_eq!(self.gw_app.heads.get(&id), Some(&head), "stream {id} head");
                    }
                    let app = self.app(side);
                    let fresh = app.streams.insert(id, AppStream::default()).is_none();
                    assert!(fresh, "Opened twice for stream {id}");
                    app.ever.push(id);
                }
                Event::Closed => {
                    assert!(
                        !self.strict,
                        "{side:?} closed: {:?}",
                        self.conn(side).close_reason()
                    );
                }
                Event::Writable(id) => {
                    let waiting = self
                        .app(side)
                        .streams
                        .get_mut(&id)
                        .filter(|st| !st.finished && !st.aborted)
                        .map(|st| std::mem::take(&mut st.waiting));
                    if waiting == Some(true) {
                        // What a stream's driver does: it had more to send.
                        self.send(side, id, 700);
                    }
                }
                Event::Readable(_) => {}
            }
        }
    }

    /// After `pump`: a stream still waiting for `Writable` really has no
    /// credit (a wake-up was not lost).
    fn check_no_lost_wakeups(&self) {
        for (c, app) in [(&self.gw, &self.gw_app), (&self.ag, &self.ag_app)] {
            for (id, st) in &app.streams {
                let s = &c.streams[id];
                if st.waiting && s.state.can_send() {
                    let credit = s.send_credit.min(c.send_credit);
                    assert!(
                        credit <= 0,
                        "{:?} stream {id} waits with credit {credit}",
                        c.role
                    );
                }
            }
        }
    }

    /// Transmits and delivers both ways until nothing moves. Time stands
    /// still.
    fn pump(&mut self) {
        for _ in 0..10_000 {
            self.transmit(Side::Gw);
            self.transmit(Side::Ag);
            if self.to_ag.frames.is_empty() && self.to_gw.frames.is_empty() {
                return;
            }
            self.deliver(Side::Ag, usize::MAX);
            self.deliver(Side::Gw, usize::MAX);
        }
        panic!("wires never drained");
    }

    fn advance(&mut self, ms: u64) {
        self.ms += ms;
        let now = self.now();
        self.gw.handle_timeout(now);
        self.ag.handle_timeout(now);
        self.events(Side::Gw);
        self.events(Side::Ag);
    }

    // ---- app operations ---------------------------------------------------

    fn open(&mut self) -> Option<u32> {
        self.requests += 1;
        let head = Bytes::from(format!("GET /{} HTTP/1.1\r\n\r\n", self.requests));
        match self.gw.open(head.clone()) {
            Ok(id) => {
                assert!(!self.gw_app.streams.contains_key(&id), "id {id} reused");
                self.gw_app.streams.insert(id, AppStream::default());
                self.gw_app.heads.insert(id, head);
                self.gw_app.ever.push(id);
                Some(id)
            }
            Err(e) => {
                if self.strict {
                    let cap = self.gw.active_streams() >= self.limits.max_streams as usize;
                    assert!(
                        cap || !self.gw.is_open(),
                        "open refused without reason: {e:?}"
                    );
                }
                None
            }
        }
    }

    /// Sends up to `len` body bytes; returns how many were taken.
    fn send(&mut self, side: Side, id: u32, len: usize) -> usize {
        let taken = self.send_inner(side, id, len);
        if taken.is_some_and(|n| n < len) {
            self.blocked_sends += 1;
            self.app(side).streams.get_mut(&id).unwrap().waiting = true;
        }
        taken.unwrap_or(0)
    }

    /// `None`: the stream cannot send any more.
    fn send_inner(&mut self, side: Side, id: u32, len: usize) -> Option<usize> {
        let strict = self.strict;
        let (c, app, _) = self.parts(side);
        let st = app.streams.get_mut(&id).expect("app owns the stream");
        let mut data = body(id, side, st.sent, len);
        match c.send_data(id, &mut data) {
            Ok(n) => {
                assert_eq!(n + data.len(), len, "taken bytes come off the front");
                st.sent += n as u64;
                if strict && n < len {
                    // It stopped only for lack of credit.
                    let s = &c.streams[&id];
                    assert!(s.send_credit.min(c.send_credit) <= 0, "stopped with credit");
                    assert!(
                        s.blocked_stream || s.blocked_conn,
                        "not registered for a wake-up"
                    );
                }
                Some(n)
            }
            Err(e) => {
                if strict {
                    assert!(
                        matches!(c.stream_state(id), Some(StreamState::Reset(..))),
                        "send_data failed on a live stream: {e}"
                    );
                }
                st.aborted = true;
                None
            }
        }
    }

    fn send_head(&mut self, id: u32, head: &'static [u8]) {
        let strict = self.strict;
        let st = self.ag_app.streams.get_mut(&id).expect("app owns it");
        match self.ag.send_head(id, Bytes::from_static(head)) {
            Ok(()) => {
                if head == OK {
                    st.final_head = true;
                } else {
                    st.info_heads += 1;
                }
            }
            Err(e) => {
                if strict {
                    assert!(
                        matches!(self.ag.stream_state(id), Some(StreamState::Reset(..))),
                        "send_head failed on a live stream: {e}"
                    );
                }
                st.aborted = true;
            }
        }
    }

    fn finish(&mut self, side: Side, id: u32) {
        let strict = self.strict;
        let (c, app, _) = self.parts(side);
        let st = app.streams.get_mut(&id).expect("app owns it");
        match c.finish(id) {
            Ok(()) => {
                st.finished = true;
                app.finished_len.insert(id, st.sent);
            }
            Err(e) => {
                if strict {
                    assert!(
                        matches!(c.stream_state(id), Some(StreamState::Reset(..))),
                        "finish failed on a live stream: {e}"
                    );
                }
                st.aborted = true;
            }
        }
    }

    fn reset(&mut self, side: Side, id: u32, code: ErrorCode) {
        let (c, app, _) = self.parts(side);
        c.reset(id, code);
        app.streams.get_mut(&id).expect("app owns it").aborted = true;
    }

    /// Reads up to `max` items from the stream; DATA is consumed at once or
    /// held, as `hold` says.
    fn read(&mut self, side: Side, id: u32, max: usize, hold: bool) {
        let strict = self.strict;
        let peer_finished = self.app(side.peer()).finished_len.get(&id).copied();
        let (c, app, _) = self.parts(side);
        let st = app.streams.get_mut(&id).expect("app owns it");
        let mut bytes = 0;
        for _ in 0..max {
            match c.recv(id) {
                None => break,
                Some(Inbound::Head(h)) => {
                    assert_eq!(side, Side::Gw, "a head reached the agent");
                    assert!(!st.final_head, "a head after the final one");
                    if is_informational(&h) {
                        st.info_heads += 1;
                    } else {
                        st.final_head = true;
                    }
                    if strict {
                        assert!(h == CONTINUE || h == OK, "head mangled");
                    }
                }
                Some(Inbound::Data(d)) => {
                    assert!(!d.is_empty(), "empty DATA delivered");
                    assert!(!st.ended, "DATA after END");
                    if strict {
                        assert!(side == Side::Ag || st.final_head, "DATA before the head");
                        for (i, b) in d.iter().enumerate() {
                            let want = body_byte(id, side.peer(), st.received + i as u64);
                            assert_eq!(*b, want, "stream {id} byte {}", st.received + i as u64);
                        }
                    }
                    st.received += d.len() as u64;
                    bytes += d.len() as u64;
                    if hold {
                        st.held.push_back(d.len());
                    } else {
                        c.consumed(id, d.len());
                    }
                }
                Some(Inbound::End) => {
                    assert!(!st.ended, "END twice");
                    st.ended = true;
                    if strict {
                        assert_eq!(Some(st.received), peer_finished, "stream {id}: END early");
                    }
                }
                Some(Inbound::Reset(_)) | Some(Inbound::Gone) => {
                    st.aborted = true;
                    break;
                }
            }
        }
        self.body_bytes += bytes;
    }

    fn consume_held(&mut self, side: Side, id: u32, chunks: usize) {
        let (c, app, _) = self.parts(side);
        let st = app.streams.get_mut(&id).expect("app owns it");
        for _ in 0..chunks {
            let Some(n) = st.held.pop_front() else { break };
            c.consumed(id, n);
        }
    }

    /// Drops the app's handle; held DATA is consumed now or later (`loose`).
    fn release(&mut self, side: Side, id: u32, keep_held: bool) {
        let (c, app, _) = self.parts(side);
        let mut st = app.streams.remove(&id).expect("app owns it");
        let state = c
            .stream_state(id)
            .expect("the app's streams are in the table");
        let outcome = if state.is_terminal() {
            Outcome::Ended(state)
        } else {
            Outcome::ResetByRelease
        };
        c.release(id);
        assert_eq!(c.stream_state(id), None, "release left stream {id}");
        if outcome == Outcome::ResetByRelease
            && matches!(c.state, ConnState::Open | ConnState::Draining)
        {
            let reset = Frame::reset(id, ErrorCode::Cancel);
            assert!(
                c.control.contains(&reset),
                "release of live stream {id} sent no RESET"
            );
        }
        let again = app.outcomes.insert(id, outcome).is_some();
        // (A hostile peer may re-OPEN a released id.)
        assert!(!again || c.role == Role::Agent, "released {id} twice");
        for n in st.held.drain(..) {
            if keep_held {
                app.loose.push((id, n));
            } else {
                c.consumed(id, n);
            }
        }
    }

    fn consume_loose(&mut self, side: Side) {
        let (c, app, _) = self.parts(side);
        for (id, n) in app.loose.drain(..) {
            c.consumed(id, n);
        }
    }

    // ---- checks -------------------------------------------------------------

    fn check(&self) {
        for (side, c) in [(Side::Gw, &self.gw), (Side::Ag, &self.ag)] {
            if let Err(e) = c.check_invariants() {
                panic!("{side:?}: {e}");
            }
            assert!(
                c.control_queued() <= c.limits().control_queue_max() + 1,
                "{side:?}: control queue at {}",
                c.control_queued()
            );
        }
        if !self.strict {
            return;
        }
        for (side, c) in [(Side::Gw, &self.gw), (Side::Ag, &self.ag)] {
            assert!(
                c.close_reason().is_none() && !c.is_closed() && !c.is_failing(),
                "{side:?} failed between benign peers: {:?}",
                c.close_reason()
            );
        }
        let w = self.limits.conn_window as i64;
        assert_eq!(
            credit(&self.gw, &self.to_ag, &self.ag, &self.to_gw),
            w,
            "credit gateway -> agent: {}",
            credit_parts(&self.gw, &self.to_ag, &self.ag, &self.to_gw)
        );
        assert_eq!(
            credit(&self.ag, &self.to_gw, &self.gw, &self.to_ag),
            w,
            "credit agent -> gateway: {}",
            credit_parts(&self.ag, &self.to_gw, &self.gw, &self.to_ag)
        );
        for id in self.gw.streams.keys() {
            check_stream_credit(*id, &self.gw, &self.to_ag, &self.ag, &self.to_gw);
            check_stream_credit(*id, &self.ag, &self.to_gw, &self.gw, &self.to_ag);
        }
        let table = |c: &Connection| {
            let mut ids: Vec<u32> = c.streams.keys().copied().collect();
            ids.sort_unstable();
            ids
        };
        let app = |a: &App| a.streams.keys().copied().collect::<Vec<u32>>();
        assert_eq!(table(&self.gw), app(&self.gw_app), "gateway table vs app");
        assert_eq!(table(&self.ag), app(&self.ag_app), "agent table vs app");
    }

    /// After `pump`: nothing is in flight, so the two ends of every stream
    /// both still in a table must agree.
    fn check_quiescent_states(&self) {
        use StreamState::*;
        for (id, g) in &self.gw.streams {
            let Some(a) = self.ag.streams.get(id) else {
                continue;
            };
            let ok = matches!(
                (g.state, a.state),
                (Open, Open)
                    | (LocalEnded, RemoteEnded)
                    | (RemoteEnded, LocalEnded)
                    | (Closed, Closed)
                    | (Reset(..), Reset(..))
                    // A RESET that crossed the last END: the side that saw
                    // both ENDs first keeps its complete exchange.
                    | (Closed, Reset(_, ResetBy::Local))
                    | (Reset(_, ResetBy::Local), Closed)
            );
            assert!(
                ok,
                "stream {id}: gateway {:?}, agent {:?}",
                g.state, a.state
            );
        }
    }
}

/// Credit of one direction, wherever it is; `conn_window` when conserved.
fn credit(sender: &Connection, fwd: &Wire, receiver: &Connection, back: &Wire) -> i64 {
    sender.send_credit()
        + sender.queued_data() as i64
        + fwd.data as i64
        + receiver.recv_outstanding() as i64
        + queued_grants(receiver) as i64
        + back.grants as i64
}

fn credit_parts(sender: &Connection, fwd: &Wire, receiver: &Connection, back: &Wire) -> String {
    format!(
        "send_credit {} + queued {} (orphans {}) + on wire {} + outstanding {} + grants queued {} + on wire {}",
        sender.send_credit(),
        sender.queued_data(),
        sender.orphans.values().map(|s| s.queued).sum::<u64>(),
        fwd.data,
        receiver.recv_outstanding(),
        queued_grants(receiver),
        back.grants
    )
}

/// Uplink WINDOW increments queued at `c` and not yet transmitted.
fn queued_grants(c: &Connection) -> u64 {
    c.control.iter().map(conn_grant).sum()
}

/// Frames through the real encoder and decoder, as on a socket.
fn round_trip(frames: Vec<Frame>, max_frame: u32) -> Vec<Frame> {
    let mut buf = BytesMut::new();
    for f in &frames {
        encode(f, &mut buf);
    }
    let mut dec = Decoder::new(max_frame);
    let mut out = Vec::with_capacity(frames.len());
    while let Some(f) = dec.decode(&mut buf).expect("our own frames decode") {
        out.push(f);
    }
    assert!(buf.is_empty(), "trailing bytes");
    assert_eq!(out, frames, "codec round trip");
    out
}

fn small_limits() -> Limits {
    Limits {
        max_frame: 1500,
        stream_window: 4096,
        // Less than the streams' windows together, and not a multiple of
        // anything, so uplink credit runs out and batching leaves rests.
        conn_window: 10_007,
        max_streams: 8,
    }
}

fn fast_heartbeat() -> Heartbeat {
    Heartbeat::from_interval(Duration::from_millis(1000))
}

// ---- directed tests ------------------------------------------------------

fn directed_limits() -> Limits {
    Limits {
        max_frame: 16 * 1024,
        stream_window: 32 * 1024,
        conn_window: 100 * 1024,
        max_streams: 16,
    }
}

fn directed_pair() -> Pair {
    Pair::new(directed_limits(), fast_heartbeat(), true, true)
}

/// Sends what credit allows of a body of `total` bytes; finishes once all
/// of it went.
fn push_body(p: &mut Pair, side: Side, id: u32, total: u64) {
    let sent = p.app(side).streams[&id].sent;
    if sent < total {
        p.send(side, id, (total - sent).min(40_000) as usize);
    }
    let st = &p.app(side).streams[&id];
    if st.sent == total && !st.finished {
        p.finish(side, id);
    }
}

#[test]
fn round_trip_bodies_larger_than_the_window() {
    let mut p = directed_pair();
    let req_len = 5 * p.limits.stream_window as u64 + 123;
    let resp_len = 7 * p.limits.stream_window as u64 + 7;
    let id = p.open().unwrap();
    for _ in 0..1000 {
        push_body(&mut p, Side::Gw, id, req_len);
        if let Some(st) = p.ag_app.streams.get(&id) {
            if !st.final_head {
                p.send_head(id, CONTINUE);
                p.send_head(id, OK);
            }
            push_body(&mut p, Side::Ag, id, resp_len);
            p.read(Side::Ag, id, 100, false);
        }
        p.read(Side::Gw, id, 100, false);
        p.pump();
        p.check();
        let (g, a) = (&p.gw_app.streams[&id], &p.ag_app.streams[&id]);
        if g.ended && a.ended {
            break;
        }
    }
    let (g, a) = (&p.gw_app.streams[&id], &p.ag_app.streams[&id]);
    assert!(g.ended && a.ended, "exchange did not complete");
    // Every byte was checked against its pattern on arrival.
    assert_eq!((a.received, g.received), (req_len, resp_len));
    assert_eq!((g.info_heads, g.final_head), (1, true));
    assert_eq!(p.gw.stream_state(id), Some(StreamState::Closed));
    assert!(p.to_ag.stream_windows > 0 && p.to_gw.stream_windows > 0);
    p.release(Side::Gw, id, false);
    p.release(Side::Ag, id, false);
    p.pump();
    assert_full_windows(&p);
}

fn assert_full_windows(p: &Pair) {
    let w = p.limits.conn_window as i64;
    for (side, c) in [(Side::Gw, &p.gw), (Side::Ag, &p.ag)] {
        assert_eq!(c.active_streams(), 0, "{side:?}");
        assert!(c.is_idle(), "{side:?}");
        assert_eq!(c.send_credit(), w, "{side:?} send credit");
        assert_eq!(c.recv_window(), w, "{side:?} receive window");
        assert_eq!(c.recv_outstanding(), 0, "{side:?}");
    }
}

#[test]
fn credit_returns_after_a_cancelled_download() {
    for hold_then_release in [false, true] {
        let mut p = directed_pair();
        let id = p.open().unwrap();
        p.finish(Side::Gw, id);
        p.pump();
        p.send_head(id, OK);
        let mut got = 0;
        // The agent pushes a body far larger than any window; the gateway
        // reads a bit, holds some, and gives up mid-body.
        for round in 0..10_000 {
            p.send(Side::Ag, id, 10_000);
            p.transmit(Side::Ag);
            got = p.gw_app.streams[&id].received;
            let mid_body = p.to_gw.data > 0 && p.gw.buffered > 0;
            if got > 2 * p.limits.stream_window as u64 && mid_body {
                break;
            }
            p.deliver(Side::Gw, 3);
            // It holds the first chunk (the window has room for that) and
            // reads slower than DATA arrives.
            p.read(Side::Gw, id, 1, round == 0);
            p.transmit(Side::Gw);
            p.deliver(Side::Ag, 3);
            p.check();
        }
        assert!(got > 2 * p.limits.stream_window as u64);
        // DATA on the wire and unread in the stream queue.
        assert!(p.to_gw.data > 0 && p.gw.buffered > 0);
        if hold_then_release {
            p.release(Side::Gw, id, true);
        } else {
            p.reset(Side::Gw, id, ErrorCode::Cancel);
            p.read(Side::Gw, id, 1, false);
            p.release(Side::Gw, id, false);
        }
        p.check();
        // The agent keeps writing until it learns of the RESET.
        for _ in 0..100 {
            if p.send(Side::Ag, id, 1000) == 0 && p.ag_app.streams[&id].aborted {
                break;
            }
            p.pump();
            p.check();
        }
        assert_eq!(
            p.ag.stream_state(id),
            Some(StreamState::Reset(ErrorCode::Cancel, ResetBy::Peer))
        );
        p.read(Side::Ag, id, 10, false);
        p.release(Side::Ag, id, false);
        p.consume_loose(Side::Gw);
        p.pump();
        p.check();
        assert_full_windows(&p);
    }
}

#[test]
fn a_stalled_consumer_does_not_stop_another_stream() {
    let mut p = directed_pair();
    let stuck = p.open().unwrap();
    let live = p.open().unwrap();
    let len = 6 * p.limits.stream_window as u64;
    p.pump();
    p.send_head(stuck, OK);
    p.send_head(live, OK);
    for _ in 0..1000 {
        push_body(&mut p, Side::Ag, stuck, len);
        push_body(&mut p, Side::Ag, live, len);
        p.read(Side::Gw, live, 100, false);
        p.pump();
        p.check();
        if p.gw_app.streams[&live].ended {
            break;
        }
    }
    assert!(p.gw_app.streams[&live].ended, "the live stream starved");
    assert_eq!(p.gw_app.streams[&live].received, len);
    // The stuck stream took its window and no more.
    assert_eq!(p.gw_app.streams[&stuck].received, 0);
    assert_eq!(p.ag_app.streams[&stuck].sent, p.limits.stream_window as u64);
    assert_eq!(p.send(Side::Ag, stuck, 1), 0);
}

#[test]
fn heartbeat_timeout_at_exactly_dead_after() {
    let mut p = directed_pair();
    let dead = p.base + p.heartbeat.dead_after;
    // The gateway transmits (pings) but hears nothing.
    while let Some(t) = p.gw.poll_timeout() {
        assert!(t <= dead, "deadline past dead_after");
        if t == dead {
            break;
        }
        p.ms = (t - p.base).as_millis() as u64;
        p.gw.handle_timeout(t);
        p.transmit(Side::Gw);
    }
    assert!(p.to_ag.frames.iter().all(|f| f.kind == FrameType::Ping));
    assert_eq!(p.to_ag.frames.len(), 2);
    p.gw.handle_timeout(dead - Duration::from_millis(1));
    assert!(p.gw.is_open());
    p.gw.handle_timeout(dead);
    assert!(p.gw.is_closed());
    assert_eq!(p.gw.close_reason(), Some(&CloseReason::HeartbeatTimeout));
    assert_eq!(p.gw.poll_event(), Some(Event::Closed));
    assert_eq!(p.gw.poll_timeout(), None);
}

#[test]
fn any_frame_keeps_the_uplink_alive() {
    let mut p = directed_pair();
    // Both sides ping, the wires deliver, for ten times dead_after.
    for _ in 0..(30 * 4) {
        p.advance(250);
        p.pump();
        p.check();
    }
    assert!(p.gw.is_open() && p.ag.is_open());
}

#[test]
fn ping_flood_fails_the_uplink() {
    let mut p = directed_pair();
    let t = p.now();
    // One PONG pending plus MAX_UNANSWERED_PINGS coalesced into it: fine.
    for _ in 0..=MAX_UNANSWERED_PINGS {
        p.gw.handle_frame(Frame::ping([7; 8]), t);
    }
    assert!(p.gw.is_open());
    assert_eq!(p.gw.control_queued(), 1);
    p.transmit(Side::Gw);
    assert_eq!(p.to_ag.pop(), Some(Frame::pong([7; 8])));
    // Answered: the count starts again.
    for _ in 0..=MAX_UNANSWERED_PINGS {
        p.gw.handle_frame(Frame::ping([8; 8]), t);
    }
    assert!(p.gw.is_open());
    p.gw.handle_frame(Frame::ping([9; 8]), t);
    assert!(p.gw.is_failing());
    let mut out = Vec::new();
    p.gw.poll_transmit(&mut out, t);
    assert_eq!(out.len(), 1, "only the GOAWAY: {out:?}");
    assert_eq!(out[0].parse_goaway().unwrap().0, ErrorCode::ProtocolError);
}

#[test]
fn window_above_the_window_is_a_flow_control_error() {
    let mut p = directed_pair();
    let id = p.open().unwrap();
    p.send(Side::Gw, id, 1000);
    p.transmit(Side::Gw);
    let t = p.now();
    // Back to exactly full once the DATA left is fine, both levels.
    p.gw.handle_frame(Frame::window(0, 1000), t);
    p.gw.handle_frame(Frame::window(id, 1000), t);
    assert!(p.gw.is_open());
    assert_eq!(p.gw.send_credit(), p.limits.conn_window as i64);
    // One byte over; or credit for DATA still queued here, which a reset
    // would refund on top of it.
    for (queued, f) in [
        (0, Frame::window(0, 1)),
        (0, Frame::window(id, 1)),
        (1000, Frame::window(0, 1000)),
    ] {
        let mut p = directed_pair();
        assert_eq!(p.open(), Some(id));
        p.send(Side::Gw, id, queued);
        p.gw.handle_frame(f, t);
        assert!(p.gw.is_failing());
        let mut out = Vec::new();
        p.gw.poll_transmit(&mut out, t);
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].parse_goaway().unwrap().0,
            ErrorCode::FlowControlError
        );
        assert_eq!(
            p.gw.stream_state(id),
            Some(StreamState::Reset(ErrorCode::Cancel, ResetBy::Connection))
        );
        assert_eq!(p.gw.send_credit(), p.limits.conn_window as i64);
    }
}

/// A gateway with two open streams, their OPENs sent.
fn two_streams() -> (Pair, u32, u32) {
    let mut p = directed_pair();
    let a = p.open().unwrap();
    let b = p.open().unwrap();
    p.pump();
    (p, a, b)
}

/// `id` was reset with PROTOCOL_ERROR; `other` and the uplink live on.
fn assert_only_reset(p: &mut Pair, id: u32, other: u32) {
    assert_eq!(
        p.gw.stream_state(id),
        Some(StreamState::Reset(ErrorCode::ProtocolError, ResetBy::Local))
    );
    assert_eq!(p.gw.stream_state(other), Some(StreamState::Open));
    assert!(p.gw.is_open());
    p.transmit(Side::Gw);
    assert!(p
        .to_ag
        .frames
        .contains(&Frame::reset(id, ErrorCode::ProtocolError)));
    p.pump();
    p.check();
    assert_eq!(
        p.ag.stream_state(id),
        Some(StreamState::Reset(ErrorCode::ProtocolError, ResetBy::Peer))
    );
}

fn inject(p: &mut Pair, to: Side, f: Frame) {
    let t = p.now();
    p.conn(to).handle_frame(f, t);
    p.events(to);
}

#[test]
fn second_final_response_resets_only_that_stream() {
    let (mut p, a, b) = two_streams();
    p.send_head(a, OK);
    p.send_head(b, OK);
    p.pump();
    inject(&mut p, Side::Gw, Frame::response(a, Bytes::from_static(OK)));
    assert_only_reset(&mut p, a, b);
    p.read(Side::Gw, a, 10, false);
    assert_eq!(p.gw.recv(a), Some(Inbound::Reset(ErrorCode::ProtocolError)));
}

#[test]
fn too_many_informational_heads_reset_the_stream() {
    let (mut p, a, b) = two_streams();
    for _ in 0..MAX_INFORMATIONAL {
        p.send_head(a, CONTINUE);
        p.send_head(b, CONTINUE);
    }
    p.send_head(b, OK);
    p.pump();
    assert_eq!(p.gw.stream_state(a), Some(StreamState::Open));
    p.read(Side::Gw, b, 100, false);
    assert_eq!(p.gw_app.streams[&b].info_heads, MAX_INFORMATIONAL);
    assert!(p.gw_app.streams[&b].final_head);
    // One more 1xx is too many.
    p.send_head(a, CONTINUE);
    p.transmit(Side::Ag);
    p.deliver(Side::Gw, usize::MAX);
    assert_only_reset(&mut p, a, b);
}

#[test]
fn data_before_the_final_response_resets_the_stream() {
    for info_first in [false, true] {
        let (mut p, a, b) = two_streams();
        if info_first {
            p.send_head(a, CONTINUE);
            p.pump();
        }
        // The agent's app skips the head (send_data does not police that).
        p.send(Side::Ag, a, 100);
        p.transmit(Side::Ag);
        p.deliver(Side::Gw, usize::MAX);
        // Discarded, not buffered: its credit is on its way back.
        assert_eq!(p.gw.buffered + p.gw.held, 0);
        p.check();
        assert_only_reset(&mut p, a, b);
    }
}

#[test]
fn empty_data_is_ignored() {
    let (mut p, a, b) = two_streams();
    p.send_head(a, OK);
    p.pump();
    p.read(Side::Gw, a, 10, false);
    let events = p.gw.events.len();
    inject(&mut p, Side::Gw, Frame::data(a, Bytes::new()));
    inject(&mut p, Side::Ag, Frame::data(a, Bytes::new()));
    assert_eq!(p.gw.recv(a), None);
    assert_eq!(p.gw.events.len(), events);
    assert_eq!(p.ag.recv(a), None);
    assert_eq!(p.gw.stream_state(a), Some(StreamState::Open));
    assert_eq!(p.gw.stream_state(b), Some(StreamState::Open));
    assert!(p.gw.is_open() && p.ag.is_open());
    assert_eq!(p.gw.recv_window(), p.limits.conn_window as i64);
    p.check();
}

#[test]
fn stream_ids_wrap_around_and_skip_ids_in_use() {
    let mut p = directed_pair();
    let one = p.open().unwrap();
    let two = p.open().unwrap();
    assert_eq!((one, two), (1, 2));
    p.gw.set_next_stream_id(u32::MAX - 1);
    assert_eq!(p.open(), Some(u32::MAX - 1));
    assert_eq!(p.open(), Some(u32::MAX));
    // 1 and 2 are live: skipped.
    assert_eq!(p.open(), Some(3));
    p.pump();
    p.check();
    for id in [1, 2, u32::MAX - 1, u32::MAX, 3] {
        assert_eq!(p.ag.stream_state(id), Some(StreamState::Open), "{id}");
    }
    // After the wrap, an id above the next one may have been opened before:
    // DATA for it is a late frame, not a protocol violation.
    inject(
        &mut p,
        Side::Gw,
        Frame::data(1000, Bytes::from_static(b"late")),
    );
    assert!(p.gw.is_open(), "{:?}", p.gw.close_reason());
    assert_eq!(p.gw.buffered, 0, "discarded");
    // (Not `p.check()`: the injected bytes were never the agent's credit.)
    assert_eq!(p.gw.check_invariants(), Ok(()));

    // Before any wrap it is.
    let mut q = directed_pair();
    q.open().unwrap();
    inject(
        &mut q,
        Side::Gw,
        Frame::data(1000, Bytes::from_static(b"x")),
    );
    assert!(q.gw.is_failing());
    inject(&mut q, Side::Gw, Frame::data(1, Bytes::from_static(b"x")));
    assert!(q.gw.check_invariants().is_ok());
}

// ---- the random model test -----------------------------------------------

const BENIGN_SEEDS: u64 = 400;
const STEPS_PER_SEQUENCE: usize = 500;

/// 400 seeds x 500 steps = 200,000 random steps between benign peers, with
/// every invariant of the module docs checked after each one, then a full
/// drain in which both windows must come back whole.
#[test]
fn random_benign_sequences() {
    let mut steps = 0;
    let mut total = Stats::default();
    for seed in 1..=BENIGN_SEEDS {
        let (n, stats) = run_sequence(seed, true, STEPS_PER_SEQUENCE);
        steps += n;
        total.add(&stats);
    }
    eprintln!("conn model: {steps} benign steps over {BENIGN_SEEDS} seeds; {total:?}");
    // The sequences must reach the states worth checking.
    assert!(total.closed_clean > 300 && total.reset_by_release > 500);
    assert!(total.body_bytes > 2 * 1024 * 1024 && total.blocked_sends > 1000);
}

/// 2000 seeds with hostile frames injected into either side, each until a
/// few steps after the uplink failed (137,351 steps): no panic, and
/// the invariants hold throughout.
#[test]
fn random_hostile_sequences() {
    let mut steps = 0;
    for seed in 1..=2000 {
        steps += run_sequence(seed, false, STEPS_PER_SEQUENCE).0;
    }
    eprintln!("conn model: {steps} hostile steps over 2000 seeds");
}

/// What a benign sequence got through, so the test can insist it explored.
#[derive(Default, Debug)]
struct Stats {
    opened: usize,
    closed_clean: usize,
    reset_by_release: usize,
    body_bytes: u64,
    blocked_sends: usize,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.opened += o.opened;
        self.closed_clean += o.closed_clean;
        self.reset_by_release += o.reset_by_release;
        self.body_bytes += o.body_bytes;
        self.blocked_sends += o.blocked_sends;
    }
}

fn run_sequence(seed: u64, strict: bool, max_steps: usize) -> (usize, Stats) {
    let mut rng = XorShift::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let codec = rng.chance(2);
    let mut p = Pair::new(small_limits(), fast_heartbeat(), codec, strict);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut steps = 0;
        let mut after_failure = 0;
        while steps < max_steps {
            step(&mut p, &mut rng);
            steps += 1;
            p.check();
            let broken = !(p.gw.is_open() && p.ag.is_open());
            if !strict && broken {
                // A few more steps on the broken uplink, then stop.
                after_failure += 1;
                if after_failure > 20 {
                    break;
                }
            }
        }
        finish_sequence(&mut p, &mut rng);
        steps
    }));
    match result {
        Ok(steps) => {
            let stats = Stats {
                opened: p.gw_app.ever.len(),
                closed_clean: p
                    .gw_app
                    .outcomes
                    .values()
                    .filter(|o| **o == Outcome::Ended(StreamState::Closed))
                    .count(),
                reset_by_release: p
                    .gw_app
                    .outcomes
                    .values()
                    .filter(|o| **o == Outcome::ResetByRelease)
                    .count(),
                body_bytes: p.body_bytes,
                blocked_sends: p.blocked_sends,
            };
            (steps, stats)
        }
        Err(e) => {
            eprintln!("conn model: seed {seed} (strict {strict}, codec {codec}) failed");
            std::panic::resume_unwind(e)
        }
    }
}

fn pick_stream(p: &Pair, side: Side, rng: &mut XorShift) -> Option<u32> {
    let app = match side {
        Side::Gw => &p.gw_app,
        Side::Ag => &p.ag_app,
    };
    if app.streams.is_empty() {
        return None;
    }
    app.streams
        .keys()
        .nth(rng.below(app.streams.len()))
        .copied()
}

fn data_len_for(rng: &mut XorShift) -> usize {
    match rng.below(10) {
        0 => 0,
        1..=6 => 1 + rng.below(400),
        7 | 8 => 1 + rng.below(3000),
        _ => 1 + rng.below(10_000),
    }
}

fn step(p: &mut Pair, rng: &mut XorShift) {
    let side = if rng.chance(2) { Side::Gw } else { Side::Ag };
    match rng.below(100) {
        0..=4 => {
            p.open();
        }
        5..=24 => {
            if let Some(id) = pick_stream(p, side, rng) {
                let strict = p.strict;
                let st = &p.app(side).streams[&id];
                let ready = side == Side::Gw || st.final_head || !strict;
                if ready && !st.finished && !st.aborted {
                    let len = data_len_for(rng);
                    p.send(side, id, len);
                }
            }
        }
        25..=29 => {
            if let Some(id) = pick_stream(p, Side::Ag, rng) {
                let st = &p.ag_app.streams[&id];
                if !st.final_head && !st.finished && !st.aborted {
                    let info = st.info_heads < 3 && rng.chance(3);
                    p.send_head(id, if info { CONTINUE } else { OK });
                }
            }
        }
        30..=33 => {
            if let Some(id) = pick_stream(p, side, rng) {
                let strict = p.strict;
                let st = &p.app(side).streams[&id];
                let ready = side == Side::Gw || st.final_head || !strict;
                if ready && !st.finished && !st.aborted {
                    p.finish(side, id);
                }
            }
        }
        34 => {
            if let Some(id) = pick_stream(p, side, rng) {
                let code = *rng.pick(&[
                    ErrorCode::Cancel,
                    ErrorCode::BackendReset,
                    ErrorCode::InternalError,
                ]);
                p.reset(side, id, code);
            }
        }
        35..=38 => {
            // Release: mostly streams that are done both ways, sometimes any.
            if let Some(id) = pick_stream(p, side, rng) {
                let st = &p.app(side).streams[&id];
                let done = st.aborted || (st.finished && st.ended);
                if done || rng.chance(8) {
                    let keep = rng.chance(3);
                    p.release(side, id, keep);
                }
            }
        }
        39..=54 => {
            if let Some(id) = pick_stream(p, side, rng) {
                if !p.app(side).streams[&id].stalled {
                    let max = 1 + rng.below(6);
                    let hold = rng.chance(4);
                    p.read(side, id, max, hold);
                }
            }
        }
        55..=58 => {
            if let Some(id) = pick_stream(p, side, rng) {
                let n = 1 + rng.below(3);
                p.consume_held(side, id, n);
            }
            if rng.chance(4) {
                p.consume_loose(side);
            }
        }
        59..=60 => {
            if let Some(id) = pick_stream(p, side, rng) {
                let st = p.app(side).streams.get_mut(&id).unwrap();
                st.stalled = !st.stalled;
            }
        }
        61..=72 => p.transmit(side),
        73..=88 => {
            let k = 1 + rng.below(8);
            p.deliver(side, k);
        }
        89..=94 => {
            let ms = rng.below(400) as u64;
            p.advance(ms);
            // Benign peers are never silent for dead_after: a side that
            // has heard nothing for half of it gets what is waiting.
            for side in [Side::Gw, Side::Ag] {
                let half = p.heartbeat.dead_after / 2;
                if p.strict && p.conn(side).last_rx + half <= p.now() {
                    p.transmit(side.peer());
                    p.deliver(side, usize::MAX);
                }
            }
        }
        95 => {
            if rng.chance(40) {
                p.conn(side).go_away(ErrorCode::NoError, "draining");
            }
        }
        _ => {
            if !p.strict {
                hostile(p, side, rng);
            }
        }
    }
    p.events(Side::Gw);
    p.events(Side::Ag);
}

/// A random but well-formed frame (rarely not even that) injected into
/// `to` as if its peer sent it, or a local failure.
fn hostile(p: &mut Pair, to: Side, rng: &mut XorShift) {
    match rng.below(40) {
        0 => {
            p.conn(to).fail(ErrorCode::InternalError, "hostile");
            return;
        }
        1 => {
            p.conn(to).close(CloseReason::Local("hostile".into()));
            return;
        }
        2 => {
            let t = p.now();
            p.conn(to).on_written(false, t);
            return;
        }
        _ => {}
    }
    let kinds = [
        FrameType::Hello,
        FrameType::Accept,
        FrameType::Refuse,
        FrameType::Open,
        FrameType::Response,
        FrameType::Data,
        FrameType::End,
        FrameType::Reset,
        FrameType::Window,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::GoAway,
    ];
    let kind = *rng.pick(&kinds);
    let known = pick_stream(p, to, rng).unwrap_or(1);
    let mut stream = match rng.below(4) {
        0 => known,
        1 => 1 + rng.below(20) as u32,
        2 => rng.next_u32(),
        _ => 0,
    };
    match kind.stream_rule() {
        StreamRule::Zero if !rng.chance(20) => stream = 0,
        StreamRule::NonZero if stream == 0 && !rng.chance(20) => stream = known,
        _ => {}
    }
    let payload: Bytes = match kind {
        FrameType::Data => {
            let max = if rng.chance(4) { 6000 } else { 600 };
            rng.noise(max).into()
        }
        FrameType::Window => {
            // The nastiest grant fits exactly under the window as `to`
            // counts its credit.
            let room = p.limits.conn_window as i64 - p.conn(to).send_credit();
            let inc = match rng.below(5) {
                0 => u32::MAX,
                1 => rng.next_u32(),
                2 => 0,
                3 if stream == 0 => room.max(1) as u32,
                _ => 1 + rng.below(5000) as u32,
            };
            Bytes::copy_from_slice(&inc.to_be_bytes())
        }
        FrameType::Reset => Bytes::copy_from_slice(&(rng.below(20) as u32).to_be_bytes()),
        FrameType::Ping | FrameType::Pong => rng.bytes(8).into(),
        FrameType::GoAway => {
            let mut b = (rng.below(17) as u32).to_be_bytes().to_vec();
            b.extend_from_slice(b"hostile");
            b.into()
        }
        FrameType::Open | FrameType::Response => {
            let heads: [&[u8]; 5] = [
                CONTINUE,
                OK,
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                b"GET / HTTP/1.1\r\n\r\n",
                b"HTTP/1.1 1",
            ];
            Bytes::from_static(heads[rng.below(heads.len())])
        }
        FrameType::End => Bytes::new(),
        FrameType::Hello | FrameType::Accept | FrameType::Refuse => rng.noise(40).into(),
    };
    let payload = if rng.chance(30) {
        rng.noise(12).into()
    } else {
        payload
    };
    let f = Frame::new(kind, stream, payload);
    if f.validate(p.limits.max_frame).is_err() {
        // The decoder stops these before they reach a Connection.
        return;
    }
    let t = p.now();
    p.conn(to).handle_frame(f, t);
    p.events(to);
}

/// Quiesces, checks that both ends of every stream agree, releases
/// everything and checks that both windows came back whole.
fn finish_sequence(p: &mut Pair, rng: &mut XorShift) {
    if p.strict {
        p.pump();
        p.check();
        p.check_quiescent_states();
        p.check_no_lost_wakeups();
    }
    for side in [Side::Gw, Side::Ag] {
        let ids: Vec<u32> = p.app(side).streams.keys().copied().collect();
        for id in ids {
            let keep = rng.chance(3);
            p.release(side, id, keep);
            p.check();
        }
        p.consume_loose(side);
        p.check();
    }
    if !p.strict {
        p.pump();
        p.check();
        return;
    }
    p.pump();
    p.check();
    assert_full_windows(p);
    // Every stream either side ever had ended or was reset by its release.
    for (side, app) in [(Side::Gw, &p.gw_app), (Side::Ag, &p.ag_app)] {
        assert!(app.streams.is_empty());
        for id in &app.ever {
            let outcome = app.outcomes.get(id);
            assert!(outcome.is_some(), "{side:?} stream {id} never released");
            if let Some(Outcome::Ended(s)) = outcome {
                assert!(s.is_terminal());
            }
        }
    }
}
