//! Sans-IO framing of HTTP/1.x responses, as the load generator needs it.
//!
//! The bench client only has to know where a response ends (and whether the
//! connection may carry another request); body bytes are skipped, never
//! copied. [`parse_head`] reads a status line and headers, [`BodyReader`]
//! consumes a body framed by length, by chunks or by connection close.
//! Nothing here touches a socket or a clock, so every edge is tested by
//! feeding bytes.
//!
//! Why not `crate::http`'s decoders: those build owned heads and hand out
//! body pieces for forwarding. The load generator shares the machine with
//! the system it measures, so its per-response cost is kept at zero
//! allocations: status, framing and keep-alive are all it keeps.

use std::fmt;

/// Largest response head accepted; a larger one is a protocol error.
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest chunk-size line or trailer line accepted.
const MAX_LINE: usize = 4096;
const MAX_HEADERS: usize = 64;

/// Why a response could not be framed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseError {
    /// httparse rejected the head.
    Head(httparse::Error),
    /// No end of head within [`MAX_HEAD`] bytes.
    HeadTooLarge,
    /// Missing, malformed or conflicting Content-Length.
    BadContentLength,
    /// Malformed chunked body.
    BadChunk(&'static str),
    /// The connection closed before the body was complete.
    Truncated,
}

impl fmt::Display for ResponseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResponseError::Head(e) => write!(f, "malformed response head: {e}"),
            ResponseError::HeadTooLarge => write!(f, "response head larger than {MAX_HEAD} bytes"),
            ResponseError::BadContentLength => write!(f, "bad Content-Length"),
            ResponseError::BadChunk(why) => write!(f, "bad chunked body: {why}"),
            ResponseError::Truncated => write!(f, "connection closed inside a response"),
        }
    }
}

impl std::error::Error for ResponseError {}

/// How the body after a head is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body: HEAD request, 1xx, 204, 304.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the server closes the connection.
    UntilClose,
}

/// A parsed response head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// Bytes of the head, including the blank line.
    pub len: usize,
    pub framing: Framing,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
}

impl Head {
    /// An interim response (100 Continue, 103 Early Hints) that precedes
    /// the final one on the same request. 101 is final: it ends HTTP.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

/// Parses a response head at the start of `buf`: `Ok(None)` means read
/// more. `head_request` tells whether the request was HEAD (no body).
pub fn parse_head(buf: &[u8], head_request: bool) -> Result<Option<Head>, ResponseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(ResponseError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ResponseError::Head(e)),
    };
    let status = resp.code.unwrap_or(0);
    let http11 = resp.version == Some(1);

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut other_coding = false;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = parse_content_length(h.value)?;
            if content_length.is_some_and(|old| old != v) {
                return Err(ResponseError::BadContentLength);
            }
            content_length = Some(v);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding decides: chunked must be last to frame.
            for coding in tokens(h.value) {
                chunked = coding.eq_ignore_ascii_case(b"chunked");
                other_coding = !chunked;
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            for t in tokens(h.value) {
                conn_close |= t.eq_ignore_ascii_case(b"close");
                conn_keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }

    let framing = if head_request || (100..200).contains(&status) || status == 204 || status == 304
    {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if other_coding {
        Framing::UntilClose
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let keep_alive = framing != Framing::UntilClose
        && status != 101
        && !conn_close
        && (http11 || conn_keep_alive);
    Ok(Some(Head {
        status,
        len,
        framing,
        keep_alive,
    }))
}

fn parse_content_length(v: &[u8]) -> Result<u64, ResponseError> {
    let v = trim(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return Err(ResponseError::BadContentLength);
    }
    Ok(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Comma-separated header tokens, trimmed, empty ones skipped.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(trim).filter(|t| !t.is_empty())
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &v[start..end]
}

/// Skips one response body; feed it bytes until it reports done.
#[derive(Clone, Debug)]
pub enum BodyReader {
    /// Bytes still expected.
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

impl BodyReader {
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty | Framing::Length(0) => BodyReader::Done,
            Framing::Length(n) => BodyReader::Length(n),
            Framing::Chunked => BodyReader::Chunked(Chunked::default()),
            Framing::UntilClose => BodyReader::UntilClose,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, BodyReader::Done)
    }

    /// Consumes body bytes from the start of `input`; returns how many
    /// belonged to this body. Bytes after the end are left for the caller.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, ResponseError> {
        match self {
            BodyReader::Done => Ok(0),
            BodyReader::UntilClose => Ok(input.len()),
            BodyReader::Length(left) => {
                let take = (*left).min(input.len() as u64);
                *left -= take;
                if *left == 0 {
                    *self = BodyReader::Done;
                }
                Ok(take as usize)
            }
            BodyReader::Chunked(c) => {
                let used = c.feed(input)?;
                if c.is_done() {
                    *self = BodyReader::Done;
                }
                Ok(used)
            }
        }
    }

    /// The peer closed the connection: fine only for a close-delimited body.
    pub fn on_eof(&mut self) -> Result<(), ResponseError> {
        match self {
            BodyReader::Done => Ok(()),
            BodyReader::UntilClose => {
                *self = BodyReader::Done;
                Ok(())
            }
            _ => Err(ResponseError::Truncated),
        }
    }
}

/// Where a chunked body decoder stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    /// Reading hex digits of a chunk size.
    Size,
    /// Skipping chunk extensions up to the end of the size line.
    Extension,
    /// Saw CR after the size line; LF must follow.
    SizeLf,
    /// Skipping chunk data.
    Data,
    /// After chunk data: CR LF (or a bare LF) must follow.
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final blank line).
    TrailerStart,
    /// Inside a trailer field line.
    Trailer,
    /// Saw CR on the final blank line; LF must follow.
    FinalLf,
    Done,
}

/// Chunked body decoder that skips the data.
#[derive(Clone, Debug)]
pub struct Chunked {
    state: ChunkState,
    /// Chunk size being read, then data bytes left in the chunk.
    size: u64,
    size_digits: u8,
    line_len: usize,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: ChunkState::Size,
            size: 0,
            size_digits: 0,
            line_len: 0,
        }
    }
}

impl Chunked {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consumes bytes up to the end of the body; returns how many.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, ResponseError> {
        let mut i = 0;
        while i < input.len() && self.state != ChunkState::Done {
            if self.state == ChunkState::Data {
                let take = self.size.min((input.len() - i) as u64);
                self.size -= take;
                i += take as usize;
                if self.size == 0 {
                    self.state = ChunkState::DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.state = self.step(b)?;
        }
        Ok(i)
    }

    fn step(&mut self, b: u8) -> Result<ChunkState, ResponseError> {
        use ChunkState::*;
        self.line_len += 1;
        if self.line_len > MAX_LINE {
            return Err(ResponseError::BadChunk("line too long"));
        }
        Ok(match (self.state, b) {
            (Size, b) if b.is_ascii_hexdigit() => {
                if self.size_digits == 16 {
                    return Err(ResponseError::BadChunk("chunk size overflows"));
                }
                self.size_digits += 1;
                self.size = (self.size << 4) | u64::from(hex_value(b));
                Size
            }
            (Size, _) if self.size_digits == 0 => {
                return Err(ResponseError::BadChunk("missing chunk size"))
            }
            (Size, b';' | b' ' | b'\t') => Extension,
            (Size | Extension, b'\r') => SizeLf,
            (Size | Extension | SizeLf, b'\n') => self.end_size_line(),
            (Size | SizeLf, _) => return Err(ResponseError::BadChunk("bad chunk size line")),
            (Extension, _) => Extension,
            (DataCr, b'\r') => DataLf,
            (DataCr | DataLf, b'\n') => self.start_line(Size),
            (DataCr | DataLf, _) => return Err(ResponseError::BadChunk("missing CRLF after data")),
            (TrailerStart, b'\r') => FinalLf,
            (TrailerStart | FinalLf, b'\n') => Done,
            (FinalLf, _) => return Err(ResponseError::BadChunk("bad final line")),
            (Trailer, b'\n') => self.start_line(TrailerStart),
            (TrailerStart | Trailer, _) => Trailer,
            (Data | Done, _) => unreachable!("handled by feed"),
        })
    }

    fn end_size_line(&mut self) -> ChunkState {
        let size = self.size;
        self.size_digits = 0;
        if size == 0 {
            self.start_line(ChunkState::TrailerStart)
        } else {
            self.line_len = 0;
            ChunkState::Data
        }
    }

    fn start_line(&mut self, next: ChunkState) -> ChunkState {
        self.line_len = 0;
        self.size = 0;
        next
    }
}

fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Head {
        parse_head(s.as_bytes(), false).unwrap().unwrap()
    }

    #[test]
    fn head_framing() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(
            (h.status, h.framing, h.keep_alive),
            (200, Framing::Length(5), true)
        );
        assert_eq!(h.len, 38);

        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);

        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));

        let h = head("HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Empty, true));

        let h = head("HTTP/1.1 304 Not Modified\r\n\r\n");
        assert_eq!(h.framing, Framing::Empty);

        let h = head("HTTP/1.1 100 Continue\r\n\r\n");
        assert!(h.is_interim());

        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n");
        assert!(!h.keep_alive);

        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(h.keep_alive);

        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Empty);
    }

    #[test]
    fn head_partial_and_errors() {
        let full = b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse_head(&full[..cut], false), Ok(None), "cut at {cut}");
        }
        assert_eq!(head(std::str::from_utf8(full).unwrap()).status, 500);

        assert_eq!(
            parse_head(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                false
            ),
            Err(ResponseError::BadContentLength)
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false),
            Err(ResponseError::BadContentLength)
        );
        assert!(matches!(
            parse_head(b"HTTP/1.1 abc OK\r\n\r\n", false),
            Err(ResponseError::Head(_))
        ));
        let mut big = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        big.resize(MAX_HEAD, b'a');
        assert_eq!(parse_head(&big, false), Err(ResponseError::HeadTooLarge));
    }

    /// Feeds `body` in pieces of `step` bytes; returns bytes consumed.
    fn feed_all(reader: &mut BodyReader, body: &[u8], step: usize) -> Result<usize, ResponseError> {
        let mut used = 0;
        while used < body.len() && !reader.is_done() {
            let end = (used + step).min(body.len());
            let n = reader.feed(&body[used..end])?;
            assert!(n == end - used || reader.is_done(), "stopped early");
            used += n;
        }
        Ok(used)
    }

    #[test]
    fn chunked_byte_by_byte_and_whole() {
        let body = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        let end = body.len() - 4;
        for step in [1, 2, 3, 7, body.len()] {
            let mut r = BodyReader::new(Framing::Chunked);
            assert_eq!(feed_all(&mut r, body, step), Ok(end), "step {step}");
            assert!(r.is_done());
        }
        // Bare LFs are tolerated.
        let mut r = BodyReader::new(Framing::Chunked);
        assert_eq!(feed_all(&mut r, b"3\nabc\n0\n\n", 1), Ok(9));
        assert!(r.is_done());
    }

    #[test]
    fn chunked_errors() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"3\r\nabcX",
            b"11111111111111111\r\n",
            b"0\r\n\rX",
        ] {
            let mut r = BodyReader::new(Framing::Chunked);
            assert!(
                matches!(r.feed(bad), Err(ResponseError::BadChunk(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut r = BodyReader::new(Framing::Chunked);
        r.feed(b"5\r\nhel").unwrap();
        assert_eq!(r.on_eof(), Err(ResponseError::Truncated));
    }

    #[test]
    fn length_and_close_bodies() {
        let mut r = BodyReader::new(Framing::Length(5));
        assert_eq!(r.feed(b"he"), Ok(2));
        assert_eq!(r.feed(b"lloEXTRA"), Ok(3));
        assert!(r.is_done());

        assert!(BodyReader::new(Framing::Length(0)).is_done());
        assert!(BodyReader::new(Framing::Empty).is_done());

        let mut r = BodyReader::new(Framing::UntilClose);
        assert_eq!(r.feed(b"anything"), Ok(8));
        assert!(!r.is_done());
        assert_eq!(r.on_eof(), Ok(()));
        assert!(r.is_done());

        let mut r = BodyReader::new(Framing::Length(5));
        r.feed(b"ab").unwrap();
        assert_eq!(r.on_eof(), Err(ResponseError::Truncated));
    }
}
