//! One uplink as a sans-IO state machine, in the shape of quinn-proto's
//! `Connection`: a plain struct driven by frames in
//! ([`Connection::handle_frame`]), stream operations by id (`open`,
//! `send_head`, `send_data`, `finish`, `reset`, `recv`, `consumed`,
//! `release`), and time ([`Connection::handle_timeout`] with `now` passed
//! in). It yields frames to transmit ([`Connection::poll_transmit`]) and
//! per-stream events ([`Connection::poll_event`]). No sockets, no clocks,
//! no tasks: `io/uplink.rs` drives it.
//!
//! Owns: the stream table (each stream's [`StreamState`]), credit in both
//! directions, the out-queue and its scheduling (control first, then one
//! frame per stream in turn), heartbeat and writer-stall deadlines, and
//! every limit an agent could otherwise push past.
//!
//! Invariants (checked after every operation in debug builds, and by the
//! model-based random test below):
//! - **receive credit is conserved**: `recv_window + buffered + held +
//!   unacked == conn_window`, where `buffered` is DATA waiting in stream
//!   queues, `held` is DATA handed to a consumer and not yet `consumed`,
//!   and `unacked` is consumed credit not yet granted back. Every byte that
//!   leaves a stream queue, delivered or discarded, comes back as credit.
//! - **send credit never exceeds the window**: a WINDOW that would take it
//!   past the negotiated window is a FLOW_CONTROL_ERROR.
//! - **every queue is bounded**: stream inbound by the stream window (plus
//!   at most `MAX_INFORMATIONAL + 1` heads and one END); control frames by
//!   [`Limits::control_queue_max`] (past it the peer is not reading and the
//!   connection fails); PONGs are coalesced into one pending answer.
//! - **every stream ends**: a stream leaves the table only through
//!   [`Connection::release`], which resets it first unless both directions
//!   ended; a connection that closes resets every stream.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;

use super::error::{ErrorCode, ProtoError};
use super::frame::{Frame, FrameType};
use super::limits::{Heartbeat, Limits, DATA_CHUNK, MAX_INFORMATIONAL, MAX_UNANSWERED_PINGS};

/// Which end of the uplink this is. The gateway opens streams and receives
/// responses; the agent accepts streams and sends responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Gateway,
    Agent,
}

/// A stream's life, as in HTTP/2: each direction ends with END; RESET
/// ends both at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamState {
    /// Both directions open.
    Open,
    /// We sent END; the peer may still send.
    LocalEnded,
    /// The peer sent END; we may still send.
    RemoteEnded,
    /// Both directions ended cleanly.
    Closed,
    /// Aborted, by us, by the peer or by the connection closing.
    Reset(ErrorCode, ResetBy),
}

impl StreamState {
    fn can_send(self) -> bool {
        matches!(self, StreamState::Open | StreamState::RemoteEnded)
    }

    fn can_recv(self) -> bool {
        matches!(self, StreamState::Open | StreamState::LocalEnded)
    }

    /// No more frames will flow either way.
    pub fn is_terminal(self) -> bool {
        matches!(self, StreamState::Closed | StreamState::Reset(..))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetBy {
    Local,
    Peer,
    /// The connection closed under the stream.
    Connection,
}

/// What a stream's consumer receives, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A response head (gateway side; 1xx heads come before the final one).
    Head(Bytes),
    /// Body bytes; hand their count back with [`Connection::consumed`] once
    /// they were delivered or dropped.
    Data(Bytes),
    /// The peer ended its direction.
    End,
    /// The stream was aborted; repeated on every later `recv`.
    Reset(ErrorCode),
    /// The connection closed under the stream; repeated.
    Gone,
}

/// Something the driver must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The peer opened a stream (agent side) with this request head.
    Opened { id: u32, head: Bytes },
    /// The stream has something new to `recv`.
    Readable(u32),
    /// The stream may send again: credit arrived, or it ended.
    Writable(u32),
    /// The connection closed; every stream was reset. Emitted once.
    Closed,
}

/// Why a stream operation could not be done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamError {
    /// No such stream (released, or never opened).
    Unknown,
    /// The stream was reset (with this code).
    Reset(ErrorCode),
    /// Our direction already ended.
    Finished,
    /// The connection closed.
    Gone,
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::Unknown => f.write_str("unknown stream"),
            StreamError::Reset(c) => write!(f, "stream reset ({c})"),
            StreamError::Finished => f.write_str("stream already ended"),
            StreamError::Gone => f.write_str("uplink closed"),
        }
    }
}

impl std::error::Error for StreamError {}

/// Why a stream could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenError {
    /// GOAWAY sent or received: no new streams.
    Draining,
    Closed,
    /// At `max_streams`.
    TooManyStreams,
    /// Only the gateway opens streams.
    WrongRole,
}

/// Why the connection closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer broke the protocol; we sent GOAWAY with this code.
    Protocol { code: ErrorCode, reason: String },
    /// The peer sent GOAWAY with an error code.
    PeerGoAway { code: ErrorCode, reason: String },
    /// Nothing arrived for `dead_after`.
    HeartbeatTimeout,
    /// The writer made no progress for `dead_after`.
    WriteStalled,
    /// The owner closed it (socket error, EOF, shutdown).
    Local(String),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Protocol { code, reason } => write!(f, "{reason} ({code})"),
            CloseReason::PeerGoAway { code, reason } => write!(f, "peer: {reason} ({code})"),
            CloseReason::HeartbeatTimeout => f.write_str("peer silent (heartbeat timeout)"),
            CloseReason::WriteStalled => f.write_str("peer stopped reading (write stalled)"),
            CloseReason::Local(why) => f.write_str(why),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    Open,
    /// GOAWAY sent or received: no new streams; existing ones finish.
    Draining,
    /// A fatal GOAWAY is queued; close once it is written.
    Failing,
    Closed,
}

/// Where the frames of one `poll_transmit` go; `io::batch::Batch` in the
/// driver, a `Vec<Frame>` in tests.
pub trait Transmit {
    /// Whether a frame with this payload length still fits.
    fn has_room(&self, payload_len: usize) -> bool;
    fn push(&mut self, frame: &Frame);
}

impl Transmit for Vec<Frame> {
    fn has_room(&self, _payload_len: usize) -> bool {
        true
    }
    fn push(&mut self, frame: &Frame) {
        self.push(frame.clone());
    }
}

struct Stream {
    state: StreamState,
    inbound: VecDeque<Inbound>,
    /// DATA bytes in `inbound`.
    buffered: u64,
    /// Frames to send, in order (OPEN/RESPONSE, DATA, END).
    outq: VecDeque<Frame>,
    /// DATA bytes in `outq` (already taken from the send credit).
    queued: u64,
    /// In `Connection::ready`.
    scheduled: bool,
    send_credit: i64,
    recv_window: i64,
    recv_unacked: u32,
    /// Informational heads received, and whether the final one came.
    informational: u8,
    got_final: bool,
    /// Blocked on stream credit (woken by the stream's WINDOW) or queued in
    /// `Connection::blocked` (woken by uplink credit).
    blocked_stream: bool,
    blocked_conn: bool,
}

impl Stream {
    fn new(window: u32, role: Role) -> Self {
        Stream {
            state: StreamState::Open,
            inbound: VecDeque::new(),
            buffered: 0,
            outq: VecDeque::new(),
            queued: 0,
            scheduled: false,
            send_credit: window as i64,
            recv_window: window as i64,
            recv_unacked: 0,
            informational: 0,
            // Only the gateway waits for a response head.
            got_final: role == Role::Agent,
            blocked_stream: false,
            blocked_conn: false,
        }
    }
}

/// Stream ids are small integers chosen by the gateway (or checked by it),
/// so SipHash's DoS resistance buys nothing on this per-frame path.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

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

pub type IdMap<V> = HashMap<u32, V, std::hash::BuildHasherDefault<IdHasher>>;

/// The uplink connection state machine. See the module docs.
pub struct Connection {
    role: Role,
    limits: Limits,
    heartbeat: Heartbeat,
    state: ConnState,
    close_reason: Option<CloseReason>,
    /// The code of a graceful GOAWAY the peer sent (NO_ERROR, SHUTDOWN or
    /// REHOME): an agent told REHOME moves the uplink to another node.
    peer_goaway: Option<ErrorCode>,
    streams: IdMap<Stream>,
    /// Released streams that ended cleanly but still have frames to send
    /// (their END): only the scheduler reaches them.
    orphans: IdMap<Stream>,
    /// Gateway: the next id to try. Ids wrap from `u32::MAX` to 1.
    next_id: u32,
    /// Every id was handed out at least once: "never opened" can no longer
    /// be told from "opened and forgotten".
    ids_wrapped: bool,

    // Sending.
    send_credit: i64,
    /// DATA bytes in every stream's out-queue (orphans included).
    queued_total: u64,
    /// Streams waiting for uplink credit, in the order they blocked.
    blocked: VecDeque<u32>,
    control: VecDeque<Frame>,
    pending_pong: Option<[u8; 8]>,
    unanswered_pings: u32,
    /// Streams with frames in `outq`, served round robin.
    ready: VecDeque<u32>,
    /// Frames waiting in every queue (control, pong, streams).
    queued_frames: usize,

    // Receiving.
    recv_window: i64,
    recv_unacked: u64,
    buffered: u64,
    held: u64,

    events: VecDeque<Event>,
    last_rx: Instant,
    next_ping: Instant,
    /// Since when the writer has had bytes in flight without progress.
    tx_stalled_since: Option<Instant>,
}

/// A stream-level protocol violation: the stream is reset, the uplink
/// lives on.
struct StreamFault(u32, &'static str);

/// A connection-level violation: GOAWAY and close.
struct ConnFault(ErrorCode, String);

impl From<ProtoError> for ConnFault {
    fn from(e: ProtoError) -> Self {
        ConnFault(e.code(), e.to_string())
    }
}

fn proto(why: impl Into<String>) -> ConnFault {
    ConnFault(ErrorCode::ProtocolError, why.into())
}

fn flow(why: impl Into<String>) -> ConnFault {
    ConnFault(ErrorCode::FlowControlError, why.into())
}

impl Connection {
    pub fn new(role: Role, limits: Limits, heartbeat: Heartbeat, now: Instant) -> Self {
        Connection {
            role,
            limits,
            heartbeat,
            state: ConnState::Open,
            close_reason: None,
            peer_goaway: None,
            streams: IdMap::default(),
            orphans: IdMap::default(),
            next_id: 1,
            ids_wrapped: false,
            send_credit: limits.conn_window as i64,
            queued_total: 0,
            blocked: VecDeque::new(),
            control: VecDeque::new(),
            pending_pong: None,
            unanswered_pings: 0,
            ready: VecDeque::new(),
            queued_frames: 0,
            recv_window: limits.conn_window as i64,
            recv_unacked: 0,
            buffered: 0,
            held: 0,
            events: VecDeque::new(),
            last_rx: now,
            next_ping: now + heartbeat.interval,
            tx_stalled_since: None,
        }
    }

    /// Starts stream ids at `id` (tests of the wrap-around).
    pub fn set_next_stream_id(&mut self, id: u32) {
        self.next_id = id.max(1);
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn is_open(&self) -> bool {
        self.state == ConnState::Open
    }

    pub fn is_closed(&self) -> bool {
        self.state == ConnState::Closed
    }

    /// The code of the first graceful GOAWAY received, if any.
    pub fn peer_goaway(&self) -> Option<ErrorCode> {
        self.peer_goaway
    }

    /// A fatal GOAWAY is queued or the connection closed: the driver
    /// should flush and then close the socket.
    pub fn is_failing(&self) -> bool {
        self.state == ConnState::Failing
    }

    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.close_reason.as_ref()
    }

    /// Streams in the table (opened and not yet released).
    pub fn active_streams(&self) -> usize {
        self.streams.len()
    }

    pub fn has_capacity(&self) -> bool {
        self.is_open() && self.streams.len() < self.limits.max_streams as usize
    }

    /// Frames waiting to be transmitted.
    pub fn queued_frames(&self) -> usize {
        self.queued_frames
    }

    pub fn stream_state(&self, id: u32) -> Option<StreamState> {
        self.streams.get(&id).map(|s| s.state)
    }

    /// The window the peer may still fill on the uplink (its credit as we
    /// account it: granted minus received).
    pub fn recv_window(&self) -> i64 {
        self.recv_window
    }

    /// Our credit for sending on the uplink.
    pub fn send_credit(&self) -> i64 {
        self.send_credit
    }

    /// DATA bytes queued for sending (credit taken, not yet transmitted),
    /// released streams' leftovers (`orphans`) included.
    pub fn queued_data(&self) -> u64 {
        self.queued_total
    }

    /// DATA bytes received and not yet credited back: buffered in stream
    /// queues, held by consumers, or consumed and not yet granted.
    pub fn recv_outstanding(&self) -> u64 {
        self.buffered + self.held + self.recv_unacked
    }

    /// Control frames waiting (PONG included).
    pub fn control_queued(&self) -> usize {
        self.control.len() + usize::from(self.pending_pong.is_some())
    }

    /// The next event. A stream may be named more than once between two
    /// polls (waking a waker twice is harmless); the queue is drained after
    /// every operation, so it never holds more than one operation's worth.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next instant `handle_timeout` has work at.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == ConnState::Closed {
            return None;
        }
        let mut t = self.next_ping.min(self.last_rx + self.heartbeat.dead_after);
        if let Some(s) = self.tx_stalled_since {
            t = t.min(s + self.heartbeat.dead_after);
        }
        Some(t)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == ConnState::Closed {
            return;
        }
        if now >= self.last_rx + self.heartbeat.dead_after {
            self.close(CloseReason::HeartbeatTimeout);
            return;
        }
        if let Some(s) = self.tx_stalled_since {
            if now >= s + self.heartbeat.dead_after {
                self.close(CloseReason::WriteStalled);
                return;
            }
        }
        if now >= self.next_ping {
            self.next_ping = now + self.heartbeat.interval;
            if self.state != ConnState::Failing {
                self.push_control(Frame::ping(ping_opaque(now)));
            }
        }
    }

    // ---- frames in -------------------------------------------------------

    /// Applies one frame from the peer. A connection-level violation queues
    /// GOAWAY and moves to failing; a stream-level one resets that stream.
    pub fn handle_frame(&mut self, f: Frame, now: Instant) {
        if matches!(self.state, ConnState::Closed | ConnState::Failing) {
            // After a fatal error nothing the peer says matters, but DATA
            // still returns its credit so the accounting stays exact.
            if f.kind == FrameType::Data && self.state == ConnState::Failing {
                self.recv_window -= f.payload.len() as i64;
                self.recv_unacked += f.payload.len() as u64;
            }
            return;
        }
        self.last_rx = now;
        match self.apply(f) {
            Ok(()) => {}
            Err(Fault::Stream(StreamFault(id, why))) => {
                tracing::debug!(stream = id, why, "stream protocol error");
                self.reset(id, ErrorCode::ProtocolError);
            }
            Err(Fault::Conn(ConnFault(code, reason))) => self.fail(code, &reason),
        }
        self.debug_check();
    }

    fn apply(&mut self, f: Frame) -> Result<(), Fault> {
        match f.kind {
            FrameType::Data => self.on_data(f.stream, f.payload),
            FrameType::Open => self.on_open(f.stream, f.payload).map_err(Fault::Conn),
            FrameType::Response => self.on_response(f.stream, f.payload),
            FrameType::End => {
                self.on_end(f.stream);
                Ok(())
            }
            FrameType::Reset => {
                let code = f.reset_code().map_err(|e| Fault::Conn(e.into()))?;
                self.on_reset(f.stream, code);
                Ok(())
            }
            FrameType::Window => {
                let inc = f.window_increment().map_err(|e| Fault::Conn(e.into()))?;
                self.on_window(f.stream, inc).map_err(Fault::Conn)
            }
            FrameType::Ping => {
                let p = f.ping_payload().map_err(|e| Fault::Conn(e.into()))?;
                if self.pending_pong.replace(p).is_some() {
                    self.unanswered_pings += 1;
                    if self.unanswered_pings > MAX_UNANSWERED_PINGS {
                        return Err(Fault::Conn(ConnFault(
                            ErrorCode::ProtocolError,
                            "PING flood while not reading PONGs".into(),
                        )));
                    }
                } else {
                    self.queued_frames += 1;
                }
                Ok(())
            }
            FrameType::Pong => Ok(()),
            FrameType::GoAway => {
                let (code, reason) = f.parse_goaway().map_err(|e| Fault::Conn(e.into()))?;
                // REHOME is a drain too: the node asks the agent to move,
                // and the streams in flight finish where they are.
                if matches!(
                    code,
                    ErrorCode::NoError | ErrorCode::Shutdown | ErrorCode::Rehome
                ) {
                    if self.state == ConnState::Open {
                        self.state = ConnState::Draining;
                    }
                    self.peer_goaway.get_or_insert(code);
                } else {
                    self.close(CloseReason::PeerGoAway { code, reason });
                }
                Ok(())
            }
            FrameType::Hello | FrameType::Accept | FrameType::Refuse => {
                Err(Fault::Conn(proto("handshake frame after the handshake")))
            }
        }
    }

    fn on_data(&mut self, id: u32, payload: Bytes) -> Result<(), Fault> {
        let n = payload.len() as i64;
        if n > self.recv_window {
            return Err(Fault::Conn(flow("DATA beyond uplink credit")));
        }
        self.recv_window -= n;
        let never_opened = self.never_opened(id);
        let Some(s) = self.streams.get_mut(&id) else {
            if never_opened {
                self.discard(n as u64);
                return Err(Fault::Conn(proto(format!(
                    "DATA for stream {id} that was never opened"
                ))));
            }
            // A stream we reset and released: nobody consumes it, but the
            // credit must come back.
            self.discard(n as u64);
            return Ok(());
        };
        if !s.state.can_recv() {
            let state = s.state;
            self.discard(n as u64);
            if matches!(state, StreamState::Reset(..)) {
                return Ok(());
            }
            return Err(Fault::Stream(StreamFault(id, "DATA after END")));
        }
        if !s.got_final {
            self.discard(n as u64);
            return Err(Fault::Stream(StreamFault(
                id,
                "DATA before the response head",
            )));
        }
        if n > s.recv_window {
            self.discard(n as u64);
            return Err(Fault::Conn(flow("DATA beyond stream credit")));
        }
        s.recv_window -= n;
        if n == 0 {
            // Empty DATA is allowed on the wire and means nothing.
            return Ok(());
        }
        s.inbound.push_back(Inbound::Data(payload));
        s.buffered += n as u64;
        self.buffered += n as u64;
        self.readable(id);
        Ok(())
    }

    fn on_open(&mut self, id: u32, head: Bytes) -> Result<(), ConnFault> {
        if self.role == Role::Gateway {
            return Err(proto("OPEN sent to the gateway"));
        }
        if self.streams.contains_key(&id) || self.orphans.contains_key(&id) {
            return Err(proto("OPEN for a stream id in use"));
        }
        // An agent that sent GOAWAY still serves the OPENs that crossed it
        // on the wire: the gateway sent them before it knew, and refusing
        // them would fail requests a graceful restart must not lose. The
        // gateway opens nothing once it has seen the GOAWAY.
        let taking = match self.state {
            ConnState::Open => true,
            ConnState::Draining => self.role == Role::Agent,
            ConnState::Failing | ConnState::Closed => false,
        };
        if !taking || self.streams.len() >= self.limits.max_streams as usize {
            self.push_control(Frame::reset(id, ErrorCode::RefusedStream));
            return Ok(());
        }
        self.streams
            .insert(id, Stream::new(self.limits.stream_window, self.role));
        self.events.push_back(Event::Opened { id, head });
        Ok(())
    }

    fn on_response(&mut self, id: u32, head: Bytes) -> Result<(), Fault> {
        if self.role == Role::Agent {
            return Err(Fault::Conn(proto("RESPONSE sent to the agent")));
        }
        let never_opened = self.never_opened(id);
        let Some(s) = self.streams.get_mut(&id) else {
            if never_opened {
                return Err(Fault::Conn(proto(format!(
                    "RESPONSE for stream {id} that was never opened"
                ))));
            }
            return Ok(());
        };
        if !s.state.can_recv() {
            if matches!(s.state, StreamState::Reset(..)) {
                return Ok(());
            }
            return Err(Fault::Stream(StreamFault(id, "RESPONSE after END")));
        }
        if s.got_final {
            return Err(Fault::Stream(StreamFault(id, "second final RESPONSE")));
        }
        if is_informational(&head) {
            s.informational += 1;
            if s.informational > MAX_INFORMATIONAL {
                return Err(Fault::Stream(StreamFault(id, "too many 1xx heads")));
            }
        } else {
            s.got_final = true;
        }
        s.inbound.push_back(Inbound::Head(head));
        self.readable(id);
        Ok(())
    }

    fn on_end(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.state = match s.state {
            StreamState::Open => StreamState::RemoteEnded,
            StreamState::LocalEnded => StreamState::Closed,
            // A repeated END, or END on a reset stream: nothing to do.
            _ => return,
        };
        s.inbound.push_back(Inbound::End);
        self.readable(id);
    }

    fn on_reset(&mut self, id: u32, code: ErrorCode) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        // After both ENDs the stream is complete: a late RESET must not
        // throw away what was received.
        if s.state.is_terminal() {
            return;
        }
        self.abort(id, code, ResetBy::Peer);
    }

    fn on_window(&mut self, id: u32, inc: u32) -> Result<(), ConnFault> {
        let inc = inc as i64;
        if id == 0 {
            let c = self.send_credit + inc;
            // Credit taken by queued DATA comes back when its stream is
            // reset or the uplink closes, so it counts too: a peer granting
            // credit for bytes it never received would otherwise push that
            // refund past the window.
            if c + self.queued_total as i64 > self.limits.conn_window as i64 {
                return Err(flow("uplink credit above the negotiated window"));
            }
            self.send_credit = c;
            self.wake_blocked();
            return Ok(());
        }
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        if !s.state.can_send() {
            return Ok(());
        }
        let c = s.send_credit + inc;
        if c > self.limits.stream_window as i64 {
            return Err(flow("stream credit above the negotiated window"));
        }
        s.send_credit = c;
        if s.blocked_stream {
            s.blocked_stream = false;
            self.writable(id);
        }
        Ok(())
    }

    /// An id the gateway never handed out (only it can tell, and only
    /// until ids wrap around).
    fn never_opened(&self, id: u32) -> bool {
        self.role == Role::Gateway && !self.ids_wrapped && id >= self.next_id
    }

    /// DATA dropped on arrival: its credit goes straight back.
    fn discard(&mut self, n: u64) {
        self.recv_unacked += n;
        self.maybe_grant_conn();
    }

    // ---- stream operations ----------------------------------------------

    /// Opens a stream carrying `head` (gateway side).
    pub fn open(&mut self, head: Bytes) -> Result<u32, OpenError> {
        if self.role != Role::Gateway {
            return Err(OpenError::WrongRole);
        }
        match self.state {
            ConnState::Open => {}
            ConnState::Draining => return Err(OpenError::Draining),
            _ => return Err(OpenError::Closed),
        }
        if self.streams.len() >= self.limits.max_streams as usize {
            return Err(OpenError::TooManyStreams);
        }
        let mut id = self.next_id;
        while self.streams.contains_key(&id) || self.orphans.contains_key(&id) {
            id = self.bump(id);
        }
        self.next_id = self.bump(id);
        self.streams
            .insert(id, Stream::new(self.limits.stream_window, self.role));
        self.push_stream(id, Frame::open(id, head));
        self.debug_check();
        Ok(id)
    }

    /// The id after `id`, skipping 0; notes the wrap-around.
    fn bump(&mut self, id: u32) -> u32 {
        if id == u32::MAX {
            self.ids_wrapped = true;
            1
        } else {
            id + 1
        }
    }

    fn sendable(&self, id: u32) -> Result<(), StreamError> {
        if self.state == ConnState::Closed {
            return Err(StreamError::Gone);
        }
        let s = self.streams.get(&id).ok_or(StreamError::Unknown)?;
        match s.state {
            StreamState::Reset(_, ResetBy::Connection) => Err(StreamError::Gone),
            StreamState::Reset(c, _) => Err(StreamError::Reset(c)),
            st if st.can_send() => Ok(()),
            _ => Err(StreamError::Finished),
        }
    }

    /// Queues a response or 1xx head (agent side).
    pub fn send_head(&mut self, id: u32, head: Bytes) -> Result<(), StreamError> {
        self.sendable(id)?;
        if self.role != Role::Agent {
            return Err(StreamError::Unknown);
        }
        self.push_stream(id, Frame::response(id, head));
        Ok(())
    }

    /// Queues as much of `data` as stream and uplink credit allow, in
    /// frames of at most `DATA_CHUNK`, and returns how many bytes it took
    /// (split off the front of `data`). Taking 0 of a non-empty `data`
    /// registers the stream for a [`Event::Writable`] when credit returns.
    pub fn send_data(&mut self, id: u32, data: &mut Bytes) -> Result<usize, StreamError> {
        self.sendable(id)?;
        let max = (self.limits.max_frame as usize).min(DATA_CHUNK);
        let mut taken = 0;
        while !data.is_empty() {
            let s = self.streams.get_mut(&id).expect("checked by sendable");
            let avail = s.send_credit.min(self.send_credit);
            if avail <= 0 {
                if s.send_credit <= 0 {
                    s.blocked_stream = true;
                } else if !s.blocked_conn {
                    s.blocked_conn = true;
                    self.blocked.push_back(id);
                }
                break;
            }
            let n = (avail as usize).min(max).min(data.len());
            let piece = data.split_to(n);
            s.send_credit -= n as i64;
            s.queued += n as u64;
            self.queued_total += n as u64;
            self.send_credit -= n as i64;
            taken += n;
            self.push_stream(id, Frame::data(id, piece));
        }
        // Credit left over after this stream took its share goes on to the
        // next stream waiting for it.
        self.wake_blocked();
        self.debug_check();
        Ok(taken)
    }

    /// Ends our direction (END).
    pub fn finish(&mut self, id: u32) -> Result<(), StreamError> {
        self.sendable(id)?;
        let s = self.streams.get_mut(&id).expect("checked by sendable");
        s.state = match s.state {
            StreamState::Open => StreamState::LocalEnded,
            _ => StreamState::Closed,
        };
        self.unblock(id);
        self.push_stream(id, Frame::end(id));
        Ok(())
    }

    /// Aborts a stream both ways: unsent frames are dropped (their credit
    /// refunded), buffered DATA is credited back, RESET goes to the peer.
    pub fn reset(&mut self, id: u32, code: ErrorCode) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if s.state.is_terminal() {
            return;
        }
        self.abort(id, code, ResetBy::Local);
        if !matches!(self.state, ConnState::Closed | ConnState::Failing) {
            self.push_control(Frame::reset(id, code));
        }
        self.debug_check();
    }

    fn abort(&mut self, id: u32, code: ErrorCode, by: ResetBy) {
        let s = self.streams.get_mut(&id).expect("caller checked");
        s.state = StreamState::Reset(code, by);
        let dropped_frames = s.outq.len();
        let refund = s.queued;
        self.queued_total -= refund;
        s.outq.clear();
        s.queued = 0;
        // What already arrived stays readable when the peer (or the uplink
        // closing) ended the stream: a response head and the body bytes
        // before the abort are still worth delivering, and `recv` reports
        // the reset after them. Our own reset means we want none of it: it
        // is dropped and credited back at once (a kept remainder is
        // credited when consumed or at `release`).
        let buffered = if by == ResetBy::Local {
            let b = s.buffered;
            s.buffered = 0;
            s.inbound.clear();
            b
        } else {
            0
        };
        self.queued_frames -= dropped_frames;
        self.send_credit += refund as i64;
        self.buffered -= buffered;
        self.recv_unacked += buffered;
        self.unblock(id);
        self.readable(id);
        self.writable(id);
        self.maybe_grant_conn();
        self.wake_blocked();
    }

    /// The next thing that arrived for the stream, if any. DATA counts as
    /// held until [`Connection::consumed`] gives its length back.
    pub fn recv(&mut self, id: u32) -> Option<Inbound> {
        let closed = self.state == ConnState::Closed;
        let s = self.streams.get_mut(&id)?;
        if let Some(ev) = s.inbound.pop_front() {
            if let Inbound::Data(d) = &ev {
                let n = d.len() as u64;
                s.buffered -= n;
                self.buffered -= n;
                self.held += n;
            }
            return Some(ev);
        }
        match s.state {
            StreamState::Reset(_, ResetBy::Connection) => Some(Inbound::Gone),
            StreamState::Reset(code, _) => Some(Inbound::Reset(code)),
            _ if closed => Some(Inbound::Gone),
            _ => None,
        }
    }

    /// The consumer is done with `n` bytes it took with `recv` (delivered
    /// or dropped): their credit goes back to the peer.
    pub fn consumed(&mut self, id: u32, n: usize) {
        if n == 0 {
            return;
        }
        let n64 = n as u64;
        debug_assert!(self.held >= n64, "consumed more than was received");
        self.held -= n64.min(self.held);
        self.recv_unacked += n64;
        let closing = matches!(self.state, ConnState::Closed | ConnState::Failing);
        if let Some(s) = self.streams.get_mut(&id) {
            if s.state.can_recv() && !closing {
                let u = s.recv_unacked + n as u32;
                if u >= self.limits.stream_window / 2 {
                    s.recv_unacked = 0;
                    s.recv_window += u as i64;
                    self.push_control(Frame::window(id, u));
                } else {
                    s.recv_unacked = u;
                }
            }
        }
        self.maybe_grant_conn();
        self.debug_check();
    }

    /// The stream's owner is gone. Resets the stream (CANCEL) unless both
    /// directions ended, credits back whatever it still buffered, and
    /// removes it from the table.
    pub fn release(&mut self, id: u32) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if !s.state.is_terminal() {
            self.reset(id, ErrorCode::Cancel);
        }
        let mut s = self.streams.remove(&id).expect("present");
        // A cleanly closed stream is not reset above, so DATA its consumer
        // never read is still buffered: credit it back like any discarded
        // DATA (a reset stream already did so in `abort`).
        if s.buffered > 0 {
            self.buffered -= s.buffered;
            self.recv_unacked += s.buffered;
            s.buffered = 0;
            s.inbound.clear();
        }
        // Frames of a cleanly ended stream may still be queued; they go
        // out (the peer needs its END), only the table entry goes.
        if !s.outq.is_empty() {
            self.orphans_push(id, s);
        } else if s.blocked_conn {
            self.blocked.retain(|b| *b != id);
        }
        self.maybe_grant_conn();
        self.wake_blocked();
        self.debug_check();
    }

    /// Keeps the unsent frames of a released, cleanly ended stream.
    fn orphans_push(&mut self, id: u32, mut s: Stream) {
        // A cleanly ended stream has nothing left to receive; keep only what
        // it must still send, under an entry nobody can reach by id any more
        // except the scheduler.
        s.inbound.clear();
        debug_assert_eq!(s.buffered, 0);
        s.state = StreamState::Closed;
        self.orphans.insert(id, s);
    }

    // ---- frames out -----------------------------------------------------

    fn push_control(&mut self, f: Frame) {
        if self.state == ConnState::Failing || self.state == ConnState::Closed {
            return;
        }
        if self.control.len() >= self.limits.control_queue_max() {
            self.fail(
                ErrorCode::ProtocolError,
                "peer is not reading (control queue full)",
            );
            return;
        }
        self.control.push_back(f);
        self.queued_frames += 1;
    }

    fn push_stream(&mut self, id: u32, f: Frame) {
        let s = self.streams.get_mut(&id).expect("caller checked");
        s.outq.push_back(f);
        self.queued_frames += 1;
        if !s.scheduled {
            s.scheduled = true;
            self.ready.push_back(id);
        }
    }

    /// Whether `poll_transmit` has anything to give.
    pub fn wants_transmit(&self) -> bool {
        self.queued_frames > 0
    }

    /// Moves queued frames into `tx`: control frames first (so a bulk
    /// transfer never delays a heartbeat or a WINDOW), then one frame per
    /// stream in turn. Returns the number of frames moved.
    pub fn poll_transmit(&mut self, tx: &mut impl Transmit, now: Instant) -> usize {
        let mut n = 0;
        if let Some(p) = self.pending_pong {
            if !tx.has_room(8) {
                return n;
            }
            tx.push(&Frame::pong(p));
            self.pending_pong = None;
            self.unanswered_pings = 0;
            self.queued_frames -= 1;
            n += 1;
        }
        while let Some(f) = self.control.front() {
            if !tx.has_room(f.payload.len()) {
                return self.sent(n, now);
            }
            tx.push(f);
            self.control.pop_front();
            self.queued_frames -= 1;
            n += 1;
        }
        if self.state == ConnState::Failing {
            // Only the GOAWAY goes out after a fatal error.
            return self.sent(n, now);
        }
        while let Some(id) = self.ready.pop_front() {
            let s = match self.streams.get_mut(&id) {
                Some(s) => s,
                None => match self.orphans.get_mut(&id) {
                    Some(s) => s,
                    None => continue,
                },
            };
            let Some(f) = s.outq.front() else {
                s.scheduled = false;
                continue;
            };
            if !tx.has_room(f.payload.len()) {
                self.ready.push_front(id);
                return self.sent(n, now);
            }
            tx.push(f);
            let f = s.outq.pop_front().expect("front exists");
            if f.kind == FrameType::Data {
                s.queued -= f.payload.len() as u64;
                self.queued_total -= f.payload.len() as u64;
            }
            self.queued_frames -= 1;
            n += 1;
            if s.outq.is_empty() {
                s.scheduled = false;
                self.orphans.remove(&id);
            } else {
                self.ready.push_back(id);
            }
        }
        self.sent(n, now)
    }

    fn sent(&mut self, n: usize, now: Instant) -> usize {
        if n > 0 && self.tx_stalled_since.is_none() {
            self.tx_stalled_since = Some(now);
        }
        n
    }

    /// The driver wrote bytes (`done`: everything handed out so far is on
    /// the wire). Resets the writer-stall deadline.
    pub fn on_written(&mut self, done: bool, now: Instant) {
        self.tx_stalled_since = if done { None } else { Some(now) };
    }

    // ---- connection control -------------------------------------------

    /// GOAWAY(code, reason) and no new streams; in-flight ones finish.
    pub fn go_away(&mut self, code: ErrorCode, reason: &str) {
        if self.state == ConnState::Open {
            self.state = ConnState::Draining;
            self.push_control(Frame::goaway(code, reason));
        }
    }

    /// Whether a draining connection has no streams left.
    pub fn is_idle(&self) -> bool {
        self.streams.is_empty() && self.orphans.is_empty()
    }

    /// Queues a fatal GOAWAY and resets every stream; the driver closes
    /// once the GOAWAY is written (or gives up on a peer that never reads).
    pub fn fail(&mut self, code: ErrorCode, reason: &str) {
        if matches!(self.state, ConnState::Failing | ConnState::Closed) {
            return;
        }
        // Failing first: resetting the streams below must not queue frames
        // (or re-enter here through a full control queue).
        self.state = ConnState::Failing;
        self.close_reason = Some(CloseReason::Protocol {
            code,
            reason: reason.to_string(),
        });
        self.reset_all();
        self.drop_queues();
        self.control.push_back(Frame::goaway(code, reason));
        self.queued_frames += 1;
    }

    /// Closes at once: every stream sees `Gone`.
    pub fn close(&mut self, why: CloseReason) {
        if self.state == ConnState::Closed {
            return;
        }
        if self.close_reason.is_none() {
            self.close_reason = Some(why);
        }
        self.state = ConnState::Closed;
        self.reset_all();
        self.drop_queues();
        self.events.push_back(Event::Closed);
        self.debug_check();
    }

    fn reset_all(&mut self) {
        // Cleanly closed streams keep what they received: it is complete.
        let ids: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.state.is_terminal())
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.abort(id, ErrorCode::Cancel, ResetBy::Connection);
        }
    }

    fn drop_queues(&mut self) {
        for s in self.streams.values_mut() {
            self.send_credit += s.queued as i64;
            s.queued = 0;
            s.outq.clear();
            s.scheduled = false;
        }
        for (_, s) in self.orphans.drain() {
            self.send_credit += s.queued as i64;
        }
        self.ready.clear();
        self.control.clear();
        self.pending_pong = None;
        self.queued_frames = 0;
        self.queued_total = 0;
    }

    // ---- wake-ups and grants -------------------------------------------

    fn readable(&mut self, id: u32) {
        self.events.push_back(Event::Readable(id));
    }

    fn writable(&mut self, id: u32) {
        self.events.push_back(Event::Writable(id));
    }

    fn unblock(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.blocked_stream = false;
            if s.blocked_conn {
                s.blocked_conn = false;
                self.blocked.retain(|b| *b != id);
            }
        }
    }

    /// Wakes streams waiting for uplink credit, one per `DATA_CHUNK` of
    /// credit available: each woken stream that sends passes what is left
    /// on (`send_data` calls this again), so a grant wakes as many streams
    /// as it can feed, not all of them (which would be O(n^2) under
    /// pressure).
    fn wake_blocked(&mut self) {
        let mut budget = self.send_credit;
        while budget > 0 {
            let Some(id) = self.blocked.pop_front() else {
                return;
            };
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            s.blocked_conn = false;
            budget -= DATA_CHUNK as i64;
            self.writable(id);
        }
    }

    /// Grants uplink credit back in batches of a quarter window; at once
    /// while the peer runs low (under a quarter window left, e.g. because
    /// stalled streams hold the rest: batching then would leave the active
    /// streams without credit); and all of it once no stream is open, so an
    /// idle uplink shows the peer its whole window.
    fn maybe_grant_conn(&mut self) {
        if matches!(self.state, ConnState::Closed | ConnState::Failing) || self.recv_unacked == 0 {
            return;
        }
        let quarter = (self.limits.conn_window / 4) as u64;
        let low = self.recv_window <= quarter as i64;
        let idle = self.streams.is_empty();
        if self.recv_unacked >= quarter || low || idle {
            let u = self.recv_unacked.min(u32::MAX as u64) as u32;
            self.recv_unacked -= u as u64;
            self.recv_window += u as i64;
            self.push_control(Frame::window(0, u));
        }
    }

    /// The conservation invariants; cheap enough for every debug-build
    /// operation.
    fn debug_check(&self) {
        #[cfg(debug_assertions)]
        if let Err(e) = self.check_invariants() {
            panic!("uplink invariant broken: {e}");
        }
    }

    /// Checks the invariants of the module docs; `Err` names the first
    /// broken one. Public for the model tests and fuzz targets.
    pub fn check_invariants(&self) -> Result<(), String> {
        let window = self.limits.conn_window as i64;
        let outstanding = (self.buffered + self.held + self.recv_unacked) as i64;
        if self.state != ConnState::Closed && self.recv_window + outstanding != window {
            return Err(format!(
                "receive credit: window {} + buffered {} + held {} + unacked {} != {}",
                self.recv_window, self.buffered, self.held, self.recv_unacked, window
            ));
        }
        if self.send_credit > window {
            return Err(format!(
                "send credit {} above window {window}",
                self.send_credit
            ));
        }
        let queued: u64 = self
            .streams
            .values()
            .chain(self.orphans.values())
            .map(|s| s.queued)
            .sum();
        if queued != self.queued_total {
            return Err(format!(
                "queued DATA total {} != sum over streams {queued}",
                self.queued_total
            ));
        }
        let buffered: u64 = self.streams.values().map(|s| s.buffered).sum();
        if buffered != self.buffered {
            return Err(format!(
                "buffered total {} != sum over streams {buffered}",
                self.buffered
            ));
        }
        let frames: usize = self
            .streams
            .values()
            .chain(self.orphans.values())
            .map(|s| s.outq.len())
            .sum::<usize>()
            + self.control.len()
            + usize::from(self.pending_pong.is_some());
        if frames != self.queued_frames {
            return Err(format!(
                "queued frames {} != counted {frames}",
                self.queued_frames
            ));
        }
        if self.control.len() > self.limits.control_queue_max() + 1 {
            return Err("control queue over its bound".into());
        }
        for (id, s) in &self.streams {
            if s.recv_window < 0 || s.send_credit > self.limits.stream_window as i64 {
                return Err(format!("stream {id}: credit out of range"));
            }
            if s.buffered > self.limits.stream_window as u64 {
                return Err(format!("stream {id}: buffered over the stream window"));
            }
            if s.inbound.len() > (s.buffered as usize) + MAX_INFORMATIONAL as usize + 2 {
                return Err(format!("stream {id}: inbound queue over its bound"));
            }
        }
        Ok(())
    }
}

enum Fault {
    Stream(StreamFault),
    Conn(ConnFault),
}

/// Whether a response head is 1xx other than 101 (which is final: the
/// stream becomes a raw byte stream). Peeks at `HTTP/1.x NNN`; anything
/// else counts as final and is judged by the HTTP layer.
fn is_informational(head: &[u8]) -> bool {
    head.len() >= 12
        && head.starts_with(b"HTTP/1.")
        && head[9] == b'1'
        && head[10..12].iter().all(u8::is_ascii_digit)
        && &head[9..12] != b"101"
}

fn ping_opaque(now: Instant) -> [u8; 8] {
    // Any 8 bytes do; a changing value makes captures easier to read.
    let _ = now;
    [0; 8]
}

/// Model-based random tests: two connections back to back with a virtual
/// clock, driven by random peer frames, local operations and time steps.
#[cfg(test)]
#[path = "conn_model.rs"]
mod model;

#[cfg(test)]
mod tests {
    use super::*;

    fn now0() -> Instant {
        Instant::now()
    }

    #[test]
    fn fail_transmits_only_goaway() {
        let t = now0();
        let mut c = Connection::new(Role::Gateway, Limits::default(), Heartbeat::default(), t);
        let id = c
            .open(Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"))
            .unwrap();
        c.fail(ErrorCode::ProtocolError, "bad");
        assert_eq!(
            c.stream_state(id),
            Some(StreamState::Reset(ErrorCode::Cancel, ResetBy::Connection))
        );
        let mut out = Vec::new();
        assert_eq!(c.poll_transmit(&mut out, t), 1);
        assert_eq!(out[0].kind, FrameType::GoAway);
        assert!(c.is_failing());
    }

    /// A node going into drain tells its agents REHOME: the agent's side
    /// drains (streams in flight go on, OPENs that crossed the GOAWAY are
    /// still served) and remembers the code; an error code still closes.
    #[test]
    fn rehome_drains_and_is_remembered_error_codes_close() {
        let t = now0();
        let mut a = Connection::new(Role::Agent, Limits::default(), Heartbeat::default(), t);
        let open = |id| {
            Frame::new(
                FrameType::Open,
                id,
                Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"),
            )
        };
        a.handle_frame(open(1), t);
        assert_eq!(a.active_streams(), 1);
        a.handle_frame(Frame::goaway(ErrorCode::Rehome, "node draining"), t);
        assert!(!a.is_open() && !a.is_closed());
        assert_eq!(a.peer_goaway(), Some(ErrorCode::Rehome));
        assert_eq!(a.active_streams(), 1, "the stream in flight goes on");
        a.handle_frame(open(3), t);
        assert_eq!(
            a.active_streams(),
            2,
            "an OPEN that crossed the GOAWAY is served"
        );
        // A later SHUTDOWN does not overwrite the first code.
        a.handle_frame(Frame::goaway(ErrorCode::Shutdown, "x"), t);
        assert_eq!(a.peer_goaway(), Some(ErrorCode::Rehome));

        let mut b = Connection::new(Role::Agent, Limits::default(), Heartbeat::default(), t);
        b.handle_frame(Frame::goaway(ErrorCode::ProtocolError, "bad"), t);
        assert!(b.is_closed());
        assert_eq!(b.peer_goaway(), None);
    }
}
