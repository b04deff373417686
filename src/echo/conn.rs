//! One echo connection: read a head, answer it, repeat.
//!
//! Responses are built in `wbuf` and written when the connection is about
//! to wait (before every read and every sleep) or when `wbuf` grows large,
//! so a run of pipelined requests is answered with one write, in order, and
//! a lone request costs one read and one write. Large bodies skip `wbuf`
//! and go out as their own buffers (the static pattern, or the received
//! `Bytes`), never copied.

use std::io;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::route::Route;
use super::{pattern_slice, ws, EchoConfig, PIECE};
use crate::http::{
    encode_chunk_header, encode_response_head, parse_request, simple_response, BodyDecoder,
    BodyError, BodyKind, RequestHead, CHUNK_TRAILER, LAST_CHUNK,
};

/// Room we want free in `rbuf` before a read, and how much to add when not.
const MIN_READ: usize = 4 * 1024;
const READ_SIZE: usize = 64 * 1024;
/// Body pieces up to this size are copied into `wbuf` (one write with the
/// head); larger ones are written as they are.
const COPY_MAX: usize = 16 * 1024;
/// Write `wbuf` out once it holds this much, even mid-response.
const FLUSH_AT: usize = 64 * 1024;
/// After an error response: how long and how much to read and discard
/// before closing, so the client reads our answer instead of a reset.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_MAX: usize = 1024 * 1024;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
const TEXT: &[u8] = b"text/plain; charset=utf-8";
const ROOT_BODY: &[u8] = b"ringtunnel echo\n";
const DELAY_BODY: &[u8] = b"delayed\n";

/// What to do after a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

/// Why a connection ended early; logged at debug level, never answered.
#[derive(Debug)]
pub(super) enum Stop {
    Io(io::Error),
    Body(BodyError),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Io(e) => write!(f, "io: {e}"),
            Stop::Body(e) => write!(f, "request body: {e}"),
        }
    }
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Io(e)
    }
}

impl From<BodyError> for Stop {
    fn from(e: BodyError) -> Self {
        Stop::Body(e)
    }
}

pub(super) struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    cfg: Rc<EchoConfig>,
}

impl Conn {
    pub(super) fn new(stream: TcpStream, cfg: Rc<EchoConfig>) -> Self {
        Conn {
            stream,
            rbuf: BytesMut::with_capacity(8 * 1024),
            wbuf: BytesMut::with_capacity(8 * 1024),
            cfg,
        }
    }

    pub(super) async fn run(&mut self) -> Result<(), Stop> {
        while let Some(head) = self.read_head().await? {
            match self.respond(&head).await? {
                Next::KeepAlive if self.wbuf.len() >= FLUSH_AT => self.flush().await?,
                Next::KeepAlive => {}
                Next::Close => {
                    self.flush().await?;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The next request head, or `None` when the connection should end
    /// (clean EOF, or a bad head that has been answered).
    async fn read_head(&mut self) -> Result<Option<RequestHead>, Stop> {
        loop {
            match parse_request(&self.rbuf, self.cfg.max_head) {
                Ok(Some(head)) => {
                    self.rbuf.advance(head.head_len);
                    return Ok(Some(head));
                }
                Ok(None) => {
                    if self.fill().await? == 0 {
                        return Ok(None);
                    }
                }
                Err(e) => {
                    self.reject(e.status(), &format!("{e}\n")).await;
                    return Ok(None);
                }
            }
        }
    }

    async fn respond(&mut self, head: &RequestHead) -> Result<Next, Stop> {
        let route = Route::parse(&head.target);
        if head.expect_continue && !BodyDecoder::new(head.body).is_done() {
            self.wbuf.put_slice(CONTINUE);
        }
        // Every route but /echo ignores the body; it still has to be read
        // off so that the next head is at the front of the buffer.
        if route != Route::Echo {
            if let Err(stop) = self.drain_body(head).await {
                return self.body_failed(stop).await;
            }
        }
        let route_delay = match route {
            Route::Delay(ms) => ms,
            _ => 0,
        };
        self.pause(self.cfg.delay_ms.saturating_add(route_delay))
            .await?;

        match route {
            Route::Root => self.small(head, 200, ROOT_BODY, None),
            Route::Delay(_) => self.small(head, 200, DELAY_BODY, None),
            Route::Bytes(n) => self.bytes(head, n).await?,
            Route::Status(code) => self.status(head, code),
            Route::Echo => self.echo(head).await?,
            Route::Stream(n) => return self.stream(head, n).await,
            Route::Headers => self.headers(head),
            Route::Drip { bytes, delay_ms } => self.drip(head, bytes, delay_ms).await?,
            Route::Upgrade => match &head.upgrade {
                Some(proto) if !head.is_head() => return self.upgrade(head, proto).await,
                _ => self.small(
                    head,
                    426,
                    b"upgrade required\n",
                    Some(("Upgrade", b"websocket")),
                ),
            },
            Route::NotFound => self.small(head, 404, b"not found\n", None),
            Route::BadRequest(why) => self.small(head, 400, why.as_bytes(), None),
        }
        Ok(if head.keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        })
    }

    /// A response with a small fixed body (none for HEAD).
    fn small(
        &mut self,
        head: &RequestHead,
        status: u16,
        body: &[u8],
        extra: Option<(&str, &[u8])>,
    ) {
        let content_type = ("Content-Type", TEXT);
        let pair;
        let headers: &[(&str, &[u8])] = match extra {
            Some(h) => {
                pair = [content_type, h];
                &pair
            }
            None => std::slice::from_ref(&content_type),
        };
        let framing = BodyKind::Length(body.len() as u64);
        encode_response_head(
            status,
            head.version,
            framing,
            head.keep_alive,
            headers,
            &mut self.wbuf,
        );
        if !head.is_head() {
            self.wbuf.put_slice(body);
        }
    }

    /// `/status/{code}`: no body; 1xx, 204 and 304 not even a length.
    fn status(&mut self, head: &RequestHead, code: u16) {
        let framing = if (100..200).contains(&code) || code == 204 || code == 304 {
            BodyKind::Empty
        } else {
            BodyKind::Length(0)
        };
        encode_response_head(
            code,
            head.version,
            framing,
            head.keep_alive,
            &[],
            &mut self.wbuf,
        );
    }

    /// `/headers`: the request headers, one `name: value` line each, as
    /// received.
    fn headers(&mut self, head: &RequestHead) {
        let len: usize = head
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 3)
            .sum();
        let framing = BodyKind::Length(len as u64);
        encode_response_head(
            200,
            head.version,
            framing,
            head.keep_alive,
            &[("Content-Type", TEXT)],
            &mut self.wbuf,
        );
        if !head.is_head() {
            self.wbuf.reserve(len);
            for (name, value) in &head.headers {
                self.wbuf.put_slice(name.as_bytes());
                self.wbuf.put_slice(b": ");
                self.wbuf.put_slice(value);
                self.wbuf.put_u8(b'\n');
            }
        }
    }

    /// `/bytes/{n}`: n bytes of the pattern, in pieces sliced from the
    /// static table, so memory stays flat whatever n is.
    async fn bytes(&mut self, head: &RequestHead, n: u64) -> io::Result<()> {
        let framing = BodyKind::Length(n);
        let ct: &[u8] = b"application/octet-stream";
        encode_response_head(
            200,
            head.version,
            framing,
            head.keep_alive,
            &[("Content-Type", ct)],
            &mut self.wbuf,
        );
        if head.is_head() {
            return Ok(());
        }
        let mut offset = 0u64;
        while offset < n {
            let len = (n - offset).min(PIECE as u64) as usize;
            self.write_piece(pattern_slice(offset, len)).await?;
            offset += len as u64;
        }
        Ok(())
    }

    /// `/echo`: the body comes back as it arrives, framed like the request.
    async fn echo(&mut self, head: &RequestHead) -> Result<(), Stop> {
        let framing = match head.body {
            BodyKind::Chunked => BodyKind::Chunked,
            BodyKind::Length(n) => BodyKind::Length(n),
            BodyKind::Empty | BodyKind::Eof => BodyKind::Length(0),
        };
        let chunked = framing == BodyKind::Chunked;
        let ct = head.header("content-type");
        let ct_header = [("Content-Type", ct.unwrap_or_default())];
        let headers: &[(&str, &[u8])] = if ct.is_some() { &ct_header } else { &[] };
        encode_response_head(
            200,
            head.version,
            framing,
            head.keep_alive,
            headers,
            &mut self.wbuf,
        );

        let mut dec = BodyDecoder::new(head.body);
        loop {
            match dec.decode(&mut self.rbuf, PIECE)? {
                Some(_) if head.is_head() => {}
                Some(data) => {
                    if chunked {
                        encode_chunk_header(data.len(), &mut self.wbuf);
                    }
                    self.write_piece(data).await?;
                    if chunked {
                        self.wbuf.put_slice(CHUNK_TRAILER);
                    }
                }
                None if dec.is_done() => break,
                None => {
                    if self.fill().await? == 0 {
                        dec.on_eof()?;
                    }
                }
            }
        }
        if chunked && !head.is_head() {
            self.wbuf.put_slice(LAST_CHUNK);
        }
        Ok(())
    }

    /// `/stream/{n}`: n chunks, one JSON line each. An HTTP/1.0 client
    /// cannot take chunks, so it gets the lines delimited by close.
    async fn stream(&mut self, head: &RequestHead, n: u32) -> Result<Next, Stop> {
        let chunked = head.version == 1;
        let (framing, keep_alive) = if chunked {
            (BodyKind::Chunked, head.keep_alive)
        } else {
            (BodyKind::Eof, false)
        };
        let ct: &[u8] = b"application/x-ndjson";
        encode_response_head(
            200,
            head.version,
            framing,
            keep_alive,
            &[("Content-Type", ct)],
            &mut self.wbuf,
        );
        if !head.is_head() {
            for id in 0..n {
                let mut line = [0u8; 32];
                let len = stream_line(id, &mut line);
                if chunked {
                    encode_chunk_header(len, &mut self.wbuf);
                }
                self.wbuf.put_slice(&line[..len]);
                if chunked {
                    self.wbuf.put_slice(CHUNK_TRAILER);
                }
                if self.wbuf.len() >= FLUSH_AT {
                    self.flush().await?;
                }
            }
            if chunked {
                self.wbuf.put_slice(LAST_CHUNK);
            }
        }
        Ok(if keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        })
    }

    /// `/drip`: one byte every `delay_ms`, each written on its own.
    async fn drip(&mut self, head: &RequestHead, bytes: u64, delay_ms: u64) -> io::Result<()> {
        let framing = BodyKind::Length(bytes);
        encode_response_head(
            200,
            head.version,
            framing,
            head.keep_alive,
            &[("Content-Type", TEXT)],
            &mut self.wbuf,
        );
        if head.is_head() {
            return Ok(());
        }
        for i in 0..bytes {
            if i > 0 {
                self.pause(delay_ms).await?;
            }
            self.wbuf.put_u8(b'*');
            if delay_ms > 0 {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// `/upgrade`: 101, then everything read is written back until EOF.
    async fn upgrade(&mut self, head: &RequestHead, proto: &str) -> Result<Next, Stop> {
        let accept = head
            .header("sec-websocket-key")
            .map(|key| ws::websocket_accept(crate::http::head::trim_ows(key)));
        let mut headers: Vec<(&str, &[u8])> = vec![("Upgrade", proto.as_bytes())];
        if let Some(accept) = &accept {
            headers.push(("Sec-WebSocket-Accept", accept.as_bytes()));
        }
        encode_response_head(101, 1, BodyKind::Empty, true, &headers, &mut self.wbuf);
        // Bytes that arrived behind the head already belong to the new
        // protocol.
        let early = self.rbuf.split();
        self.wbuf.put_slice(&early);
        // Ping-pong the two buffers: what was just read becomes what is
        // written, with no copy.
        while self.fill().await? > 0 {
            std::mem::swap(&mut self.rbuf, &mut self.wbuf);
        }
        self.flush().await?;
        self.stream.shutdown().await?;
        Ok(Next::Close)
    }

    async fn drain_body(&mut self, head: &RequestHead) -> Result<(), Stop> {
        let mut dec = BodyDecoder::new(head.body);
        loop {
            match dec.decode(&mut self.rbuf, usize::MAX)? {
                Some(_) => {}
                None if dec.is_done() => return Ok(()),
                None => {
                    if self.fill().await? == 0 {
                        dec.on_eof()?;
                    }
                }
            }
        }
    }

    /// A request body that broke its framing is answered with 400 (nothing
    /// of the response has been written yet); a vanished peer is not.
    async fn body_failed(&mut self, stop: Stop) -> Result<Next, Stop> {
        match stop {
            Stop::Body(e) if e != BodyError::UnexpectedEof => {
                self.reject(400, &format!("{e}\n")).await;
                Ok(Next::Close)
            }
            stop => Err(stop),
        }
    }

    /// Answer with an error and close gracefully.
    async fn reject(&mut self, status: u16, message: &str) {
        self.wbuf
            .put_slice(&simple_response(status, message, true, &[]));
        if self.flush().await.is_ok() {
            self.linger().await;
        }
    }

    /// Half-close, then read and discard for a moment: closing with unread
    /// input makes the kernel send RST, which can destroy the response
    /// before the client reads it.
    async fn linger(&mut self) {
        if self.stream.shutdown().await.is_err() {
            return;
        }
        let stream = &mut self.stream;
        let mut buf = std::mem::take(&mut self.rbuf);
        let drain = async move {
            let mut total = 0;
            while total < LINGER_MAX {
                buf.clear();
                buf.reserve(READ_SIZE);
                let (res, back) = stream.read(buf).await;
                buf = back;
                match res {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        };
        // The read is abandoned on timeout, which is fine only because the
        // socket is closed right after.
        let _ = monoio::time::timeout(LINGER, drain).await;
    }

    async fn pause(&mut self, ms: u64) -> io::Result<()> {
        if ms > 0 {
            self.flush().await?;
            monoio::time::sleep(Duration::from_millis(ms)).await;
        }
        Ok(())
    }

    /// Append a body piece: small ones join `wbuf`, big ones go out whole
    /// after what is queued.
    async fn write_piece<B: IoBuf + std::ops::Deref<Target = [u8]> + 'static>(
        &mut self,
        data: B,
    ) -> io::Result<()> {
        if data.len() <= COPY_MAX {
            self.wbuf.put_slice(&data);
            if self.wbuf.len() >= FLUSH_AT {
                self.flush().await?;
            }
            return Ok(());
        }
        self.flush().await?;
        let (res, _) = self.stream.write_all(data).await;
        res.map(|_| ())
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.wbuf);
        let (res, mut buf) = self.stream.write_all(buf).await;
        buf.clear();
        self.wbuf = buf;
        res.map(|_| ())
    }

    /// Write out what is queued, then read more into `rbuf` (appending).
    /// Returns the bytes read; 0 is EOF.
    async fn fill(&mut self) -> io::Result<usize> {
        self.flush().await?;
        if self.rbuf.capacity() - self.rbuf.len() < MIN_READ {
            self.rbuf.reserve(READ_SIZE);
        }
        let buf = std::mem::take(&mut self.rbuf);
        let (start, end) = (buf.len(), buf.capacity());
        let (res, slice) = self.stream.read(buf.slice_mut(start..end)).await;
        self.rbuf = slice.into_inner();
        res
    }
}

/// `{"id": N}\n` into `out`; returns its length.
fn stream_line(id: u32, out: &mut [u8; 32]) -> usize {
    use std::io::Write as _;
    let mut cursor = &mut out[..];
    // 32 bytes always fit: the longest line is 20 bytes.
    let _ = writeln!(cursor, "{{\"id\": {id}}}");
    32 - cursor.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_lines() {
        let mut buf = [0u8; 32];
        let n = stream_line(0, &mut buf);
        assert_eq!(&buf[..n], b"{\"id\": 0}\n");
        let n = stream_line(u32::MAX, &mut buf);
        assert_eq!(&buf[..n], b"{\"id\": 4294967295}\n");
    }
}
