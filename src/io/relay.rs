//! The pumps between an HTTP/1 socket and a stream, shared by both edges:
//! the gateway runs them between a public client and its stream, the agent
//! between the stream and a backend connection. They mirror each other:
//!
//! - [`body_to_stream`]: a body read from the socket, de-framed (length,
//!   chunked, close-delimited) -> DATA, then END;
//! - [`stream_to_writer`]: DATA -> the socket, re-framed for the reader and
//!   with the declared framing enforced (no byte past a Content-Length, no
//!   body on a bodyless message, empty DATA ignored);
//! - [`raw_to_stream`] / [`stream_to_raw`]: the byte relay after a 101;
//! - [`tcp_relay`]: a raw TCP tunnel connection and its stream, both ways,
//!   with a half-close crossing in each direction;
//! - [`UpgradeGate`]: where the response side tells the request side
//!   whether the upgrade happened;
//! - [`watch_for_close`]: reads a client socket while a request is served
//!   without a body to read, so a client that goes away cancels its stream.
//!
//! Every socket wait is bounded by the connection's [`Watchdog`]: an idle
//! deadline around each read and a stall deadline around each write, each
//! enforced by shutting the socket down (never by dropping a read). DATA
//! taken from the stream is held as [`Chunk`]s until written, then dropped,
//! which returns its credit; a failed write drops them too, so credit comes
//! back whatever happens.

use std::cell::Cell;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, CancelHandle, CancelableAsyncReadRent};

use super::batch::{write_parts, Parts};
use super::read_append;
use super::uplink::{Chunk, Inbound, Stream, DATA_CHUNK};
use super::watchdog::{Fired, Watchdog};
use crate::http::{self, BodyDecoder, BodyError, BodyKind};
use crate::proto::{ErrorCode, StreamError};
use crate::runtime::notify::Notify;

/// How much body we gather before one write to the socket.
const COALESCE: usize = 256 * 1024;

/// Why a pump stopped before its body ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PumpError {
    /// The socket reached EOF or failed.
    Closed,
    /// A deadline of the socket's watchdog fired.
    TimedOut(Fired),
    /// The body on the socket broke HTTP framing.
    BadBody(BodyError),
    /// The stream was reset (by either side).
    Reset(ErrorCode),
    /// The uplink closed under the stream.
    Gone,
    /// The far side's DATA broke the framing its head declared.
    Framing(&'static str),
}

impl From<StreamError> for PumpError {
    fn from(e: StreamError) -> Self {
        match e {
            StreamError::Reset(c) => PumpError::Reset(c),
            StreamError::Finished => PumpError::Framing("stream already ended"),
            StreamError::Unknown | StreamError::Gone => PumpError::Gone,
        }
    }
}

impl std::fmt::Display for PumpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PumpError::Closed => f.write_str("connection closed"),
            PumpError::TimedOut(Fired::Read) => f.write_str("read timed out"),
            PumpError::TimedOut(Fired::Write) => f.write_str("peer stopped reading"),
            PumpError::BadBody(e) => write!(f, "bad body: {e}"),
            PumpError::Reset(c) => write!(f, "stream reset ({c})"),
            PumpError::Gone => f.write_str("uplink closed"),
            PumpError::Framing(why) => f.write_str(why),
        }
    }
}

/// The deadlines a pump applies to its socket.
#[derive(Clone, Copy)]
pub struct Deadlines<'a> {
    pub wd: &'a Watchdog,
    /// Longest wait for the next byte from the socket.
    pub read_idle: Option<Duration>,
    /// Longest a write may make no progress.
    pub write_stall: Option<Duration>,
}

impl Deadlines<'_> {
    fn io_error(&self) -> PumpError {
        match self.wd.which() {
            Some(w) => PumpError::TimedOut(w),
            None => PumpError::Closed,
        }
    }

    async fn read<R: AsyncReadRent>(&self, r: &mut R, buf: &mut BytesMut) -> bool {
        if let Some(t) = self.read_idle {
            self.wd.arm(t);
        }
        let (res, b) = read_append(r, std::mem::take(buf), 16 * 1024, 64 * 1024).await;
        *buf = b;
        if self.read_idle.is_some() {
            self.wd.disarm();
        }
        matches!(res, Ok(n) if n > 0)
    }

    /// Writes all of `parts`; gives them back (emptied or not) for reuse.
    async fn write<W: AsyncWriteRent>(&self, w: &mut W, parts: Parts) -> (bool, Parts) {
        if let Some(t) = self.write_stall {
            self.wd.arm_write(t);
        }
        let (res, parts) = write_parts(w, parts).await;
        if self.write_stall.is_some() {
            self.wd.disarm_write();
        }
        (res.is_ok(), parts)
    }
}

/// Sees every body byte a pump moves, de-framed, in order (the agent's
/// request inspector keeps the first ones). `None` costs nothing.
pub type Tap<'a> = Option<&'a dyn Fn(&[u8])>;

/// A body read from the socket -> DATA frames, then END. `buf` holds bytes
/// already read; bytes after the body stay in it (pipelining).
pub async fn body_to_stream<R: AsyncReadRent>(
    r: &mut R,
    buf: &mut BytesMut,
    stream: &Stream,
    kind: BodyKind,
    t: Deadlines<'_>,
) -> Result<u64, PumpError> {
    body_to_stream_tapped(r, buf, stream, kind, t, None).await
}

/// [`body_to_stream`], showing each piece of the body to `tap`.
pub async fn body_to_stream_tapped<R: AsyncReadRent>(
    r: &mut R,
    buf: &mut BytesMut,
    stream: &Stream,
    kind: BodyKind,
    t: Deadlines<'_>,
    tap: Tap<'_>,
) -> Result<u64, PumpError> {
    let mut dec = BodyDecoder::new(kind);
    let mut total = 0u64;
    loop {
        match dec.decode(buf, DATA_CHUNK) {
            Ok(Some(piece)) => {
                total += piece.len() as u64;
                if let Some(tap) = tap {
                    tap(&piece);
                }
                stream.send_data(piece).await?;
            }
            Ok(None) if dec.is_done() => {
                stream.send_end();
                return Ok(total);
            }
            Ok(None) => {
                if !t.read(r, buf).await {
                    if t.wd.fired() {
                        return Err(t.io_error());
                    }
                    // Close-delimited bodies end here; others are cut short.
                    return match dec.on_eof() {
                        Ok(()) => {
                            stream.send_end();
                            Ok(total)
                        }
                        Err(_) => Err(PumpError::Closed),
                    };
                }
            }
            Err(e) => return Err(PumpError::BadBody(e)),
        }
    }
}

/// How DATA is framed on the way out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutFraming {
    /// No body may follow (HEAD, 204, 304, body-less requests).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// HTTP/1.1 chunked coding.
    Chunked,
    /// Raw bytes, ended by closing the connection.
    Eof,
}

impl OutFraming {
    pub fn of(kind: BodyKind) -> OutFraming {
        match kind {
            BodyKind::Empty => OutFraming::Empty,
            BodyKind::Length(n) => OutFraming::Length(n),
            BodyKind::Chunked => OutFraming::Chunked,
            BodyKind::Eof => OutFraming::Eof,
        }
    }
}

/// DATA -> the socket in `framing`, until END. `prefix` (a head) goes out
/// in the first write. Returns the body bytes written. Bytes the framing
/// does not allow are never written: the pump stops with `Framing`.
pub async fn stream_to_writer<W: AsyncWriteRent>(
    w: &mut W,
    stream: &Stream,
    framing: OutFraming,
    prefix: Option<Bytes>,
    t: Deadlines<'_>,
) -> Result<u64, PumpError> {
    stream_to_writer_tapped(w, stream, framing, prefix, t, None).await
}

/// [`stream_to_writer`], showing each accepted DATA payload to `tap`.
pub async fn stream_to_writer_tapped<W: AsyncWriteRent>(
    w: &mut W,
    stream: &Stream,
    framing: OutFraming,
    prefix: Option<Bytes>,
    t: Deadlines<'_>,
    tap: Tap<'_>,
) -> Result<u64, PumpError> {
    let mut total = 0u64;
    let mut prefix = prefix;
    let mut parts = Parts::new();
    // Held until written: dropping a chunk returns its credit.
    let mut held: Vec<Chunk> = Vec::new();
    loop {
        if let Some(h) = prefix.take() {
            parts.push(h);
        }
        let mut finished = false;
        let mut fail = None;
        let mut yielded = false;
        while parts.bytes() < COALESCE {
            // Wait for the first event only when there is nothing to write;
            // then gather what has already arrived into the same write.
            let ev = if parts.is_empty() {
                stream.recv().await
            } else {
                match stream.try_recv() {
                    Some(ev) => ev,
                    None if !yielded => {
                        // The rest of a response usually sits in the same
                        // or the next uplink read: one turn of the other
                        // tasks lets it join this write, without holding a
                        // head back when the body really comes later.
                        yielded = true;
                        crate::runtime::notify::yield_now().await;
                        continue;
                    }
                    None => break,
                }
            };
            match ev {
                Inbound::Data(c) => {
                    let n = c.len() as u64;
                    let over = match framing {
                        OutFraming::Empty => Some("body data on a message without a body"),
                        OutFraming::Length(l) if total + n > l => {
                            Some("body longer than its Content-Length")
                        }
                        _ => None,
                    };
                    if let Some(why) = over {
                        fail = Some(PumpError::Framing(why));
                        break;
                    }
                    total += n;
                    if let Some(tap) = tap {
                        tap(c.bytes());
                    }
                    if framing == OutFraming::Chunked {
                        parts.push_chunk(c.bytes().clone());
                    } else {
                        parts.push(c.bytes().clone());
                    }
                    held.push(c);
                }
                Inbound::End => {
                    match framing {
                        OutFraming::Length(l) if total != l => {
                            fail = Some(PumpError::Framing("body shorter than its Content-Length"));
                        }
                        OutFraming::Chunked => {
                            parts.push(Bytes::from_static(http::LAST_CHUNK));
                            finished = true;
                        }
                        _ => finished = true,
                    }
                    break;
                }
                Inbound::Head(_) => {
                    fail = Some(PumpError::Framing("a second head inside a body"));
                    break;
                }
                Inbound::Reset(c) => {
                    fail = Some(PumpError::Reset(c));
                    break;
                }
                Inbound::Gone => {
                    fail = Some(PumpError::Gone);
                    break;
                }
            }
        }
        if !parts.is_empty() {
            let (ok, p) = t.write(w, parts).await;
            parts = p;
            parts.clear();
            if !ok {
                return Err(t.io_error());
            }
        }
        held.clear();
        if let Some(f) = fail {
            return Err(f);
        }
        if finished {
            return Ok(total);
        }
    }
}

/// How [`raw_pump`] stopped.
enum RawEnd {
    /// The socket's EOF.
    Eof,
    /// A socket read failed.
    ReadFailed,
    /// The stream refused DATA.
    Stream(PumpError),
}

/// Raw bytes from the socket (after what `buf` already holds) -> DATA,
/// until the socket ends or the stream refuses; the bytes sent, and why
/// it stopped. Sends no END: the callers differ there.
async fn raw_pump<R: AsyncReadRent>(
    r: &mut R,
    buf: &mut BytesMut,
    stream: &Stream,
) -> (u64, RawEnd) {
    let mut sent = 0u64;
    loop {
        if !buf.is_empty() {
            let n = buf.len() as u64;
            if let Err(e) = stream.send_data(buf.split().freeze()).await {
                return (sent, RawEnd::Stream(e.into()));
            }
            sent += n;
        }
        let (res, b) = read_append(r, std::mem::take(buf), 16 * 1024, 64 * 1024).await;
        *buf = b;
        match res {
            Ok(0) => return (sent, RawEnd::Eof),
            Ok(_) => {}
            Err(_) => return (sent, RawEnd::ReadFailed),
        }
    }
}

/// After a 101: raw bytes from the socket -> DATA until the socket ends
/// (EOF or a failed read), which becomes END (a half-close crosses the
/// tunnel).
pub async fn raw_to_stream<R: AsyncReadRent>(
    r: &mut R,
    buf: &mut BytesMut,
    stream: &Stream,
) -> Result<(), PumpError> {
    match raw_pump(r, buf, stream).await.1 {
        RawEnd::Stream(e) => Err(e),
        RawEnd::Eof | RawEnd::ReadFailed => {
            stream.send_end();
            Ok(())
        }
    }
}

/// After a 101 (and for TCP tunnels): DATA -> raw socket bytes until END,
/// which half-closes the socket's write side; the bytes written.
pub async fn stream_to_raw<W: AsyncWriteRent>(
    w: &mut W,
    stream: &Stream,
    t: Deadlines<'_>,
) -> Result<u64, PumpError> {
    let n = stream_to_writer(w, stream, OutFraming::Eof, None, t).await?;
    let _ = w.shutdown().await;
    Ok(n)
}

/// What the response side decided about an `Upgrade` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upgrade {
    Pending,
    Accepted,
    Refused,
}

/// The response side decides, the request side waits: after a 101 the
/// request side relays raw bytes, otherwise it just ends its direction.
pub struct UpgradeGate {
    state: Cell<Upgrade>,
    decided: Notify,
}

impl Default for UpgradeGate {
    fn default() -> Self {
        UpgradeGate {
            state: Cell::new(Upgrade::Pending),
            decided: Notify::new(),
        }
    }
}

impl UpgradeGate {
    pub fn decide(&self, d: Upgrade) {
        if self.state.get() == Upgrade::Pending {
            self.state.set(d);
            self.decided.notify();
        }
    }

    pub fn get(&self) -> Upgrade {
        self.state.get()
    }

    pub async fn wait(&self) -> Upgrade {
        while self.state.get() == Upgrade::Pending {
            self.decided.notified().await;
        }
        self.state.get()
    }
}

/// What [`watch_for_close`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watched {
    /// The client closed (or reset) its connection.
    Closed,
    /// The watch was cancelled: the exchange finished first.
    Cancelled,
    /// `max` bytes of pipelined requests are buffered: stop reading.
    Full,
}

/// Reads from the client while its request is being answered and there is
/// no body left to read, so that a client that goes away is noticed at
/// once. Pipelined bytes are appended to `buf` (never lost): the read is
/// cancelled through `cancel`, never dropped.
pub async fn watch_for_close<R: CancelableAsyncReadRent>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
    cancel: CancelHandle,
) -> Watched {
    loop {
        if buf.len() >= max {
            return Watched::Full;
        }
        if buf.capacity() - buf.len() < 2048 {
            buf.reserve(8192);
        }
        let b = std::mem::take(buf);
        let len = b.len();
        let cap = b.capacity();
        let (res, slice) = r
            .cancelable_read(
                monoio::buf::IoBufMut::slice_mut(b, len..cap),
                cancel.clone(),
            )
            .await;
        *buf = slice.into_inner();
        match res {
            Ok(0) => return Watched::Closed,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => return Watched::Cancelled,
            Err(_) => return Watched::Closed,
        }
    }
}

/// How a [`tcp_relay`] ended, and the bytes it moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TcpRelayed {
    /// Socket -> stream.
    pub sent: u64,
    /// Stream -> socket.
    pub received: u64,
    /// Both directions ended with END (half-closes), not by an abort.
    pub clean: bool,
}

/// A raw TCP tunnel connection <-> its stream until both directions end.
///
/// The socket's EOF becomes END (the peer's write side is shut down in
/// turn); END from the stream shuts the socket's write side, while bytes
/// still flow the other way. A socket error, a reset stream, the uplink
/// closing or a write stalled past `write_stall` aborts both ways: the
/// stream is reset (`CANCEL`) and the socket shut down, so neither pump
/// waits on the other. With `expect_connected` (the gateway side) the
/// stream's first event must be the agent's "connected" head, within that
/// time: an agent that never answers must not hold the connection.
pub async fn tcp_relay(
    sock: monoio::net::TcpStream,
    stream: &Stream,
    expect_connected: Option<Duration>,
    write_stall: Duration,
) -> TcpRelayed {
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    let wd = Watchdog::start(fd, libc::SHUT_RDWR);
    let (mut rh, mut wh) = monoio::io::Splitable::into_split(sock);
    let abort = || {
        stream.reset(ErrorCode::Cancel);
        super::shutdown_fd(fd, libc::SHUT_RDWR);
    };
    let up = async {
        // Unlike after a 101, a failed read is no half-close: abort.
        match raw_pump(&mut rh, &mut BytesMut::new(), stream).await {
            (sent, RawEnd::Eof) => {
                stream.send_end();
                (sent, true)
            }
            (sent, _) => {
                abort();
                (sent, false)
            }
        }
    };
    let down = async {
        if let Some(limit) = expect_connected {
            // Dropping a pending `recv` is safe: it only waits on the
            // stream's queue, no socket.
            match monoio::time::timeout(limit, stream.recv()).await {
                Ok(Inbound::Head(h)) if h.as_ref() == crate::proto::tcp::TCP_CONNECTED => {}
                _ => {
                    abort();
                    return (0, false);
                }
            }
        }
        let t = Deadlines {
            wd: &wd,
            read_idle: None,
            write_stall: Some(write_stall),
        };
        match stream_to_raw(&mut wh, stream, t).await {
            Ok(n) => (n, true),
            Err(_) => {
                abort();
                (0, false)
            }
        }
    };
    let ((sent, up_ok), (received, down_ok)) = crate::runtime::join2(up, down).await;
    wd.stop();
    TcpRelayed {
        sent,
        received,
        clean: up_ok && down_ok,
    }
}
