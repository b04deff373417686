//! One benchmark connection over a monoio socket: connect, send the
//! prepared request, read until the response ends (framing from
//! [`super::response`]), keep the socket when the response allows it.
//!
//! This is the only bench module that touches `monoio::net`. Timeouts are
//! enforced by the caller dropping the whole exchange and then calling
//! [`Client::reset`]: an in-flight read is never raced on a socket that
//! stays in use (on io_uring it could lose bytes).

use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::response::{parse_head, BodyReader, ResponseError};

/// Read buffer per connection at first: small, since 10 000 connections
/// each hold one.
const READ_BUF: usize = 4 * 1024;
/// A connection whose reads keep filling its buffer (large bodies) grows
/// it up to this size, to take fewer reads per body.
const READ_BUF_MAX: usize = 64 * 1024;

/// Why one request failed.
#[derive(Debug)]
pub enum Failure {
    /// The TCP connection could not be opened.
    Connect(io::Error),
    /// Reset, unexpected close, or a response that could not be framed.
    Other(String),
}

/// One socket plus its read buffer: `buf[pos..]` holds unread bytes.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    /// Has already carried a response: a failure before any reply byte
    /// may be the server closing an idle keep-alive connection.
    reused: bool,
}

/// A client that reuses one connection while the server allows it.
pub struct Client {
    addr: SocketAddr,
    keepalive: bool,
    conn: Option<Conn>,
    /// Read buffer kept across reconnects.
    spare: Vec<u8>,
}

/// How reading a response ended.
enum ReadError {
    /// The connection closed or reset before the first response byte.
    Stale(String),
    Fatal(String),
}

impl Client {
    pub fn new(addr: SocketAddr, keepalive: bool) -> Self {
        Client {
            addr,
            keepalive,
            conn: None,
            spare: Vec::with_capacity(READ_BUF),
        }
    }

    /// Drops the connection (after a timeout or an error).
    pub fn reset(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.spare = conn.buf;
        }
    }

    /// Sends `req` and reads its response; returns the final status.
    /// A keep-alive connection that turns out to be closed by the server
    /// is replaced once, transparently.
    pub async fn request(&mut self, req: &Bytes, head_request: bool) -> Result<u16, Failure> {
        for attempt in 0..2 {
            let mut conn = match self.conn.take() {
                Some(c) => c,
                None => self.connect().await?,
            };
            let reused = conn.reused;
            let (res, _) = conn.stream.write_all(req.clone()).await;
            let outcome = match res {
                Ok(_) => conn.read_response(head_request).await,
                Err(e) => Err(ReadError::Stale(format!("write: {e}"))),
            };
            match outcome {
                Ok((status, keep_alive)) => {
                    if keep_alive && self.keepalive {
                        conn.reused = true;
                        self.conn = Some(conn);
                    } else {
                        self.spare = conn.buf;
                    }
                    return Ok(status);
                }
                Err(ReadError::Stale(_)) if reused && attempt == 0 => continue,
                Err(ReadError::Stale(e) | ReadError::Fatal(e)) => return Err(Failure::Other(e)),
            }
        }
        unreachable!("the second attempt always returns")
    }

    async fn connect(&mut self) -> Result<Conn, Failure> {
        let stream = TcpStream::connect_addr(self.addr)
            .await
            .map_err(Failure::Connect)?;
        // Requests are small and latency is what we measure.
        let _ = stream.set_nodelay(true);
        let mut buf = std::mem::take(&mut self.spare);
        buf.clear();
        buf.reserve(READ_BUF);
        Ok(Conn {
            stream,
            buf,
            pos: 0,
            reused: false,
        })
    }
}

impl Conn {
    /// Reads one response (skipping interim 1xx ones). Returns the status
    /// and whether the connection may be reused.
    async fn read_response(&mut self, head_request: bool) -> Result<(u16, bool), ReadError> {
        let mut got_any = false;
        let head = loop {
            match parse_head(&self.buf[self.pos..], head_request) {
                Ok(Some(h)) if h.is_interim() => self.pos += h.len,
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(e) => return Err(ReadError::Fatal(e.to_string())),
            }
            // parse_head fails once MAX_HEAD bytes hold no complete head,
            // so this loop reads a bounded amount.
            match self.fill().await {
                Ok(0) if !got_any => return Err(ReadError::Stale("closed before reply".into())),
                Ok(0) => return Err(ReadError::Fatal(ResponseError::Truncated.to_string())),
                Ok(_) => got_any = true,
                Err(e) if !got_any && is_stale(&e) => return Err(ReadError::Stale(e.to_string())),
                Err(e) => return Err(ReadError::Fatal(format!("read: {e}"))),
            }
        };
        self.pos += head.len;
        let mut body = BodyReader::new(head.framing);
        loop {
            let used = body
                .feed(&self.buf[self.pos..])
                .map_err(|e| ReadError::Fatal(e.to_string()))?;
            self.pos += used;
            if body.is_done() {
                break;
            }
            match self.fill().await {
                Ok(0) => {
                    body.on_eof().map_err(|e| ReadError::Fatal(e.to_string()))?;
                    break;
                }
                Ok(_) => {}
                Err(e) => return Err(ReadError::Fatal(format!("read: {e}"))),
            }
        }
        Ok((head.status, head.keep_alive))
    }

    /// Appends what the socket has to `buf[len..]`, first dropping the
    /// consumed prefix (or growing the buffer for a large head).
    async fn fill(&mut self) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.len() == self.buf.capacity() {
            self.buf.reserve(READ_BUF);
        }
        let len = self.buf.len();
        let room = self.buf.capacity() - len;
        let buf = std::mem::take(&mut self.buf);
        let (res, slice) = self.stream.read(buf.slice_mut(len..)).await;
        self.buf = slice.into_inner();
        if matches!(res, Ok(n) if n == room) && self.buf.capacity() < READ_BUF_MAX {
            self.buf.reserve(self.buf.capacity());
        }
        res
    }
}

fn is_stale(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}
