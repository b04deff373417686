//! Body decoders: strip the framing (length, chunked, close-delimited) from
//! the bytes after a head and hand out the body data zero-copy, in pieces,
//! so no body is ever buffered whole.
//!
//! Framing bytes are only consumed once complete, so the caller's buffer
//! plus the small `State` enum is all the state there is; the enum also
//! remembers how far into an incomplete framing line it has looked, so each
//! byte is examined once however the input is split. A decoder fed one byte
//! at a time produces the same body and the same verdict, at the same byte,
//! as one fed everything at once. Bytes after the end of the body (a
//! pipelined request) are never touched.
//!
//! # Chunked framing: what is accepted
//!
//! Bad framing is an error as soon as the byte that makes it bad arrives,
//! never an endless "read more". Every [`BodyError`] but `UnexpectedEof` is
//! the client's fault and answered with 400 ([`BodyError::status`]).
//!
//! - Size line: `1*16HEXDIG [ chunk-ext ] CRLF` (RFC 9112 7.1). No sign, no
//!   `0x`, no leading whitespace, no empty size. Sixteen digits (leading
//!   zeros included) is all a `u64` holds; more is an error at the 17th.
//! - Whitespace after the size is allowed only as the BWS before a `;`: the
//!   grammar has BWS inside `chunk-ext` and nowhere else, so `5 \r\n` is
//!   rejected. Parsers disagree about such lines (trim, stop, reject); we
//!   re-frame every body we accept, so refusing costs a conforming client
//!   nothing.
//! - Extensions are checked against the full grammar (token names, token
//!   or quoted-string values, BWS around `;` and `=`) and then dropped: they
//!   are never forwarded. Checked rather than skipped because a quoted
//!   string is where two parsers could disagree about where the line ends.
//! - Line ends are CRLF only: a bare LF, or a CR followed by anything but
//!   LF, is an error on the size line, after chunk data and in trailers.
//! - A size line longer than [`MAX_CHUNK_LINE`] is an error as soon as that
//!   many bytes hold no line end.
//! - Trailers: each line `field-name ":" field-value CRLF`, no whitespace
//!   before the colon, no obs-fold, no control bytes; the section is bounded
//!   by [`MAX_TRAILERS`] and dropped. The colon matters: without it, a
//!   pipelined request after `0\r\n` would be read as trailer lines.

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};

use super::head::BodyKind;

/// Longest chunk-size line (size, extensions and CRLF) we accept.
pub const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Bound on the trailer section of a chunked body, final CRLF included.
pub const MAX_TRAILERS: usize = 64 * 1024;
/// Most hex digits in a chunk size: 16 is a full `u64`.
const MAX_SIZE_DIGITS: u8 = 16;

/// Why a body could not be decoded. Each ends the connection it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Chunk size not `1*16HEXDIG`, followed by something other than BWS
    /// `;` or CRLF (trailing whitespace, sign, `0x`, bare LF, lone CR).
    BadChunkSize,
    /// Bytes after the `;` of a size line that are not a chunk-ext.
    BadChunkExtension,
    /// `MAX_CHUNK_LINE` bytes of a size line without its CRLF.
    ChunkLineTooLong,
    /// Chunk data not followed by CRLF.
    BadChunkTerminator,
    /// A trailer line that is not `name: value CRLF`, or a final empty
    /// line that is not CRLF.
    BadTrailer,
    /// The trailer section exceeds `MAX_TRAILERS`.
    ChunkTooLarge,
    /// The peer closed before the body ended.
    UnexpectedEof,
}

impl BodyError {
    /// The status to answer the sender with: 400 for broken framing; `None`
    /// for `UnexpectedEof`, where there is nobody left to answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            BodyError::UnexpectedEof => None,
            _ => Some(400),
        }
    }
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BodyError::BadChunkSize => "bad chunk size line",
            BodyError::BadChunkExtension => "bad chunk extension",
            BodyError::ChunkLineTooLong => "chunk size line too long",
            BodyError::BadChunkTerminator => "chunk data not followed by CRLF",
            BodyError::BadTrailer => "bad chunk trailer line",
            BodyError::ChunkTooLarge => "chunk trailers too large",
            BodyError::UnexpectedEof => "connection closed before the end of the body",
        })
    }
}

impl std::error::Error for BodyError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Length {
        remaining: u64,
    },
    /// A size line, left in the buffer until its CRLF arrives.
    ChunkSize(SizeLine),
    ChunkData {
        remaining: u64,
    },
    ChunkDataEnd,
    /// `seen` counts the bytes of complete trailer lines, to bound the
    /// section; `line` scans the current one, left in the buffer until its
    /// CRLF arrives.
    Trailers {
        seen: usize,
        line: TrailerLine,
    },
    Eof,
    Done,
}

/// Decoder for one message body; see the module docs.
#[derive(Clone, Debug)]
pub struct BodyDecoder {
    state: State,
}

impl BodyDecoder {
    pub fn new(kind: BodyKind) -> Self {
        let state = match kind {
            BodyKind::Empty | BodyKind::Length(0) => State::Done,
            BodyKind::Length(n) => State::Length { remaining: n },
            BodyKind::Chunked => State::ChunkSize(SizeLine::START),
            BodyKind::Eof => State::Eof,
        };
        BodyDecoder { state }
    }

    /// Consume framing from the front of `buf` and return the next piece of
    /// body data (at most `max` bytes, split off `buf` without copying), or
    /// `Ok(None)` when more input is needed or the body is done (tell them
    /// apart with [`is_done`](Self::is_done)). Never returns an empty piece.
    ///
    /// `buf` must be the same buffer on every call, with new bytes only
    /// appended: the decoder remembers how much of an incomplete framing
    /// line it has already checked.
    pub fn decode(&mut self, buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, BodyError> {
        if max == 0 {
            return Ok(None);
        }
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Eof => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = buf.len().min(max);
                    return Ok(Some(buf.split_to(n).freeze()));
                }
                State::Length { remaining } => {
                    let Some(piece) = take(buf, remaining, max) else {
                        return Ok(None);
                    };
                    let left = remaining - piece.len() as u64;
                    self.state = if left == 0 {
                        State::Done
                    } else {
                        State::Length { remaining: left }
                    };
                    return Ok(Some(piece));
                }
                State::ChunkData { remaining } => {
                    let Some(piece) = take(buf, remaining, max) else {
                        return Ok(None);
                    };
                    let left = remaining - piece.len() as u64;
                    self.state = if left == 0 {
                        State::ChunkDataEnd
                    } else {
                        State::ChunkData { remaining: left }
                    };
                    return Ok(Some(piece));
                }
                State::ChunkSize(mut line) => {
                    let Some(len) = line.scan(buf)? else {
                        self.state = State::ChunkSize(line);
                        return Ok(None);
                    };
                    buf.advance(len);
                    self.state = if line.size == 0 {
                        State::Trailers {
                            seen: 0,
                            line: TrailerLine::START,
                        }
                    } else {
                        State::ChunkData {
                            remaining: line.size,
                        }
                    };
                }
                State::ChunkDataEnd => {
                    // Checked byte by byte so that `3\r\nabcX` fails at X.
                    match &buf[..buf.len().min(2)] {
                        b"\r\n" => buf.advance(2),
                        b"" | b"\r" => return Ok(None),
                        _ => return Err(BodyError::BadChunkTerminator),
                    }
                    self.state = State::ChunkSize(SizeLine::START);
                }
                State::Trailers { seen, mut line } => {
                    let Some((len, last)) = line.scan(buf, MAX_TRAILERS - seen)? else {
                        self.state = State::Trailers { seen, line };
                        return Ok(None);
                    };
                    buf.advance(len);
                    self.state = if last {
                        State::Done
                    } else {
                        State::Trailers {
                            seen: seen + len,
                            line: TrailerLine::START,
                        }
                    };
                }
            }
        }
    }

    /// Empty: at once; Length: after n bytes; Chunked: after the last chunk,
    /// trailers and final CRLF; Eof: after [`on_eof`](Self::on_eof).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The peer closed its side: fine for a close-delimited or finished
    /// body, a truncated message otherwise.
    pub fn on_eof(&mut self) -> Result<(), BodyError> {
        match self.state {
            State::Done => Ok(()),
            State::Eof => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(BodyError::UnexpectedEof),
        }
    }

    /// Body bytes still expected when that is known: the rest of a
    /// `Content-Length` body, 0 once done, `None` for chunked and EOF bodies.
    pub fn remaining_hint(&self) -> Option<u64> {
        match self.state {
            State::Length { remaining } => Some(remaining),
            State::Done => Some(0),
            _ => None,
        }
    }
}

fn take(buf: &mut BytesMut, remaining: u64, max: usize) -> Option<Bytes> {
    if buf.is_empty() {
        return None;
    }
    let n = usize::try_from(remaining)
        .unwrap_or(usize::MAX)
        .min(buf.len())
        .min(max);
    Some(buf.split_to(n).freeze())
}

/// Where a chunk-size line scan stands: `scanned` bytes from the front of
/// the buffer checked, the size they spell, and what the next byte may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SizeLine {
    scanned: usize,
    size: u64,
    digits: u8,
    at: SizeLex,
}

/// Positions in `chunk-size *( BWS ";" BWS name [ BWS "=" BWS value ] ) CRLF`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SizeLex {
    Digits,
    /// Whitespace after the size: only more of it or `;` may follow.
    SizeBws,
    /// After `;` (and BWS): an extension name must start.
    BeforeName,
    Name,
    /// Whitespace after a name: `=`, `;` or more whitespace.
    AfterName,
    /// After `=` (and BWS): a token or a quoted string must start.
    BeforeValue,
    Token,
    Quoted,
    /// After a backslash inside a quoted string.
    Escape,
    /// Right after the closing quote.
    AfterQuoted,
    /// Whitespace after a value: only more of it or `;` may follow.
    ExtBws,
    Cr,
}

impl SizeLine {
    const START: SizeLine = SizeLine {
        scanned: 0,
        size: 0,
        digits: 0,
        at: SizeLex::Digits,
    };

    /// Check the bytes of `buf` not looked at yet. `Some(len)` once the
    /// line, `len` bytes with its CRLF, is complete; `None` for more input.
    fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, BodyError> {
        while let Some(&b) = buf.get(self.scanned) {
            self.scanned += 1;
            if self.step(b)? {
                return Ok(Some(self.scanned));
            }
            if self.scanned >= MAX_CHUNK_LINE {
                return Err(BodyError::ChunkLineTooLong);
            }
        }
        Ok(None)
    }

    /// Take one byte; true when it was the LF ending the line.
    fn step(&mut self, b: u8) -> Result<bool, BodyError> {
        use SizeLex::*;
        const SIZE: BodyError = BodyError::BadChunkSize;
        const EXT: BodyError = BodyError::BadChunkExtension;
        let ws = b == b' ' || b == b'\t';
        self.at = match self.at {
            Cr if b == b'\n' => return Ok(true),
            // A bare LF anywhere, or a CR not followed by LF.
            Cr => return Err(SIZE),
            _ if b == b'\n' => return Err(SIZE),
            Digits => match char::from(b).to_digit(16) {
                Some(v) => {
                    if self.digits == MAX_SIZE_DIGITS {
                        return Err(SIZE);
                    }
                    self.digits += 1;
                    // Cannot overflow: at most 16 digits.
                    self.size = self.size << 4 | u64::from(v);
                    Digits
                }
                None if self.digits == 0 => return Err(SIZE),
                None if ws => SizeBws,
                None if b == b';' => BeforeName,
                None if b == b'\r' => Cr,
                None => return Err(SIZE),
            },
            SizeBws if ws => SizeBws,
            SizeBws if b == b';' => BeforeName,
            // Covers `5 \r\n`: whitespace with no extension after it.
            SizeBws => return Err(SIZE),
            BeforeName if ws => BeforeName,
            BeforeName if is_tchar(b) => Name,
            Name if is_tchar(b) => Name,
            Name if ws => AfterName,
            Name | AfterName if b == b'=' => BeforeValue,
            Name | AfterName if b == b';' => BeforeName,
            Name if b == b'\r' => Cr,
            AfterName if ws => AfterName,
            BeforeValue if ws => BeforeValue,
            BeforeValue if is_tchar(b) => Token,
            BeforeValue if b == b'"' => Quoted,
            Token if is_tchar(b) => Token,
            Quoted if b == b'"' => AfterQuoted,
            Quoted if b == b'\\' => Escape,
            Quoted if is_qdtext(b) => Quoted,
            Escape if ws || is_vchar_or_obs(b) => Quoted,
            Token | AfterQuoted | ExtBws if ws => ExtBws,
            Token | AfterQuoted | ExtBws if b == b';' => BeforeName,
            Token | AfterQuoted if b == b'\r' => Cr,
            _ => return Err(EXT),
        };
        Ok(false)
    }
}

/// Where a trailer line scan stands; like [`SizeLine`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TrailerLine {
    scanned: usize,
    at: TrailerLex,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TrailerLex {
    LineStart,
    Name,
    Value,
    Cr,
    /// The CR of the empty line that ends the section.
    FinalCr,
}

impl TrailerLine {
    const START: TrailerLine = TrailerLine {
        scanned: 0,
        at: TrailerLex::LineStart,
    };

    /// Check the bytes of `buf` not looked at yet, at most `limit` in all.
    /// `Some((len, last))` once a line of `len` bytes is complete, `last`
    /// when it was the empty line ending the section.
    fn scan(&mut self, buf: &[u8], limit: usize) -> Result<Option<(usize, bool)>, BodyError> {
        use TrailerLex::*;
        while let Some(&b) = buf.get(self.scanned) {
            self.scanned += 1;
            self.at = match self.at {
                LineStart if b == b'\r' => FinalCr,
                // No obs-fold, no empty name, no whitespace before `:`.
                LineStart | Name if is_tchar(b) => Name,
                Name if b == b':' => Value,
                Value if b == b' ' || b == b'\t' || is_vchar_or_obs(b) => Value,
                Value if b == b'\r' => Cr,
                Cr if b == b'\n' => return Ok(Some((self.scanned, false))),
                FinalCr if b == b'\n' => return Ok(Some((self.scanned, true))),
                _ => return Err(BodyError::BadTrailer),
            };
            if self.scanned >= limit {
                return Err(BodyError::ChunkTooLarge);
            }
        }
        Ok(None)
    }
}

/// RFC 9110 5.6.2 `tchar`.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 9110 5.6.4 `qdtext`.
fn is_qdtext(b: u8) -> bool {
    matches!(b, b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff)
}

fn is_vchar_or_obs(b: u8) -> bool {
    matches!(b, 0x21..=0x7e | 0x80..=0xff)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode `input` fed in the given pieces; returns (body, done, leftover).
    fn run(
        kind: BodyKind,
        pieces: &[&[u8]],
        max: usize,
    ) -> Result<(Vec<u8>, bool, Vec<u8>), BodyError> {
        let mut dec = BodyDecoder::new(kind);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for p in pieces {
            buf.extend_from_slice(p);
            while let Some(data) = dec.decode(&mut buf, max)? {
                assert!(!data.is_empty());
                assert!(data.len() <= max);
                body.extend_from_slice(&data);
            }
        }
        Ok((body, dec.is_done(), buf.to_vec()))
    }

    fn bytewise(
        kind: BodyKind,
        input: &[u8],
        max: usize,
    ) -> Result<(Vec<u8>, bool, Vec<u8>), BodyError> {
        let pieces: Vec<&[u8]> = input.chunks(1).collect();
        run(kind, &pieces, max)
    }

    /// Every way of splitting `input` in two, and byte by byte, must give
    /// the same result as feeding it whole.
    fn check_all_splits(
        kind: BodyKind,
        input: &[u8],
        want: Result<(&[u8], bool, &[u8]), BodyError>,
    ) {
        let want = want.map(|(b, d, l)| (b.to_vec(), d, l.to_vec()));
        let show = String::from_utf8_lossy(&input[..input.len().min(60)]);
        assert_eq!(run(kind, &[input], usize::MAX), want, "whole: {show:?}");
        assert_eq!(
            bytewise(kind, input, usize::MAX),
            want,
            "bytewise: {show:?}"
        );
        assert_eq!(bytewise(kind, input, 1), want, "bytewise, max 1: {show:?}");
        // Every split point of short inputs; a sample of long ones.
        let step = (input.len() / 64).max(1);
        for at in (0..=input.len()).step_by(step).chain([input.len()]) {
            let (a, b) = input.split_at(at);
            assert_eq!(run(kind, &[a, b], usize::MAX), want, "at {at}: {show:?}");
            assert_eq!(run(kind, &[a, b], 3), want, "at {at}, max 3: {show:?}");
        }
    }

    /// `input` is rejected with `want` exactly when its last byte arrives:
    /// one byte less still decodes (or waits), whole or byte by byte, and
    /// bytes after the bad one change nothing.
    fn rejected_at_last_byte(input: &[u8], want: BodyError) {
        let show = String::from_utf8_lossy(&input[..input.len().min(60)]);
        check_all_splits(BodyKind::Chunked, input, Err(want.clone()));
        let before = &input[..input.len() - 1];
        assert!(
            bytewise(BodyKind::Chunked, before, usize::MAX).is_ok(),
            "{show:?} failed before its last byte"
        );
        let mut more = input.to_vec();
        more.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(
            run(BodyKind::Chunked, &[&more], usize::MAX),
            Err(want),
            "{show:?} + more"
        );
    }

    #[test]
    fn empty_is_done_at_once() {
        let mut d = BodyDecoder::new(BodyKind::Empty);
        assert!(d.is_done());
        let mut buf = BytesMut::from(&b"next request"[..]);
        assert_eq!(d.decode(&mut buf, 100), Ok(None));
        assert_eq!(&buf[..], b"next request");
        assert_eq!(d.on_eof(), Ok(()));
        assert_eq!(d.remaining_hint(), Some(0));
        assert!(BodyDecoder::new(BodyKind::Length(0)).is_done());
    }

    #[test]
    fn length() {
        check_all_splits(BodyKind::Length(5), b"hello", Ok((b"hello", true, b"")));
        check_all_splits(
            BodyKind::Length(5),
            b"helloGET /",
            Ok((b"hello", true, b"GET /")),
        );
        check_all_splits(BodyKind::Length(5), b"hel", Ok((b"hel", false, b"")));
        let mut d = BodyDecoder::new(BodyKind::Length(5));
        let mut buf = BytesMut::from(&b"hel"[..]);
        assert_eq!(d.remaining_hint(), Some(5));
        assert_eq!(d.decode(&mut buf, 2).unwrap().as_deref(), Some(&b"he"[..]));
        assert_eq!(d.remaining_hint(), Some(3));
        assert_eq!(d.decode(&mut buf, 0), Ok(None));
        assert_eq!(d.decode(&mut buf, 2).unwrap().as_deref(), Some(&b"l"[..]));
        assert_eq!(d.decode(&mut buf, 2), Ok(None));
        assert!(!d.is_done());
        assert_eq!(d.on_eof(), Err(BodyError::UnexpectedEof));
    }

    #[test]
    fn eof_body() {
        check_all_splits(
            BodyKind::Eof,
            b"anything at all",
            Ok((b"anything at all", false, b"")),
        );
        let mut d = BodyDecoder::new(BodyKind::Eof);
        assert_eq!(d.remaining_hint(), None);
        assert_eq!(d.on_eof(), Ok(()));
        assert!(d.is_done());
    }

    #[test]
    fn chunked_basic() {
        let input = b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\nNEXT";
        check_all_splits(
            BodyKind::Chunked,
            input,
            Ok((b"hello, world", true, b"NEXT")),
        );
    }

    #[test]
    fn chunked_valid_forms() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"A;name=value;x\r\n0123456789\r\n1 ; ext=\"q\"\r\n!\r\n00\r\nTrailer-A: 1\r\nTrailer-B: 2\r\n\r\n", b"0123456789!"),
            (b"a\r\n0123456789\r\nF\r\n0123456789abcde\r\n0\r\n\r\n", b"01234567890123456789abcde"),
            (b"0000000000000005\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5\t;a\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5 ;a = b ;c;d=\"x\\\"y;\" \t;e\r\nhello\r\n0;last\r\n\r\n", b"hello"),
            (b"5;a=\"\"\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5;!#$%&'*+-.^_`|~=~\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5;q=\"tab\there \x80\xff\\\x80\"\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"0\r\nX-A: 1\r\nX-B:\r\nX-C: \t v \x80 w\t\r\n\r\n", b""),
            (b"0\r\n\r\n", b""),
        ];
        for (input, body) in cases {
            check_all_splits(BodyKind::Chunked, input, Ok((body, true, b"")));
            // Pipelined bytes after the body stay where they are.
            let mut more = input.to_vec();
            more.extend_from_slice(b"GET / HTTP/1.1\r\n");
            check_all_splits(
                BodyKind::Chunked,
                &more,
                Ok((body, true, b"GET / HTTP/1.1\r\n")),
            );
        }
    }

    #[test]
    fn chunked_large_sizes() {
        let mut d = BodyDecoder::new(BodyKind::Chunked);
        let mut buf = BytesMut::from(&b"ffffffffffffffff\r\nab"[..]);
        assert_eq!(d.decode(&mut buf, 10).unwrap().as_deref(), Some(&b"ab"[..]));
        assert!(!d.is_done());
        assert_eq!(d.on_eof(), Err(BodyError::UnexpectedEof));
        let mut buf = BytesMut::from(&b"0000000000000001\r\na\r\n0\r\n\r\n"[..]);
        let mut d = BodyDecoder::new(BodyKind::Chunked);
        assert_eq!(d.decode(&mut buf, 10).unwrap().as_deref(), Some(&b"a"[..]));
        assert_eq!(d.decode(&mut buf, 10), Ok(None));
        assert!(d.is_done());
    }

    #[test]
    fn bad_size_lines_fail_at_the_bad_byte() {
        use BodyError::BadChunkSize as E;
        // Each input ends with the byte that makes it invalid.
        let cases: &[&[u8]] = &[
            b"\r",
            b"\n",
            b" ",
            b"\t",
            b";",
            b"-",
            b"+",
            b"x",
            b"0x",
            b"5g",
            b"5.",
            b"5,",
            b"5\0",
            b"5\x7f",
            b"5\n",
            b"5\r5",
            b"5\r\r",
            b"5 \r",
            b"5 \t\r",
            b"5 5",
            b"5\t\n",
            b"5;a\n",
            b"5;a=\"b\n",
            b"00000000000000000",
            b"10000000000000000",
            b"ffffffffffffffff0",
            b"3\r\nabc\r\n\r",
            b"3\r\nabc\r\n-",
        ];
        for input in cases {
            rejected_at_last_byte(input, E);
        }
    }

    #[test]
    fn bad_extensions_fail_at_the_bad_byte() {
        use BodyError::BadChunkExtension as E;
        let cases: &[&[u8]] = &[
            b"5;\r",
            b"5; \r",
            b"5;;",
            b"5;=",
            b"5;\"",
            b"5;a=\r",
            b"5;a= \r",
            b"5;a=;",
            b"5;a b",
            b"5;a=b c",
            b"5;a=b \r",
            b"5;a=b\t\r",
            b"5;a==",
            b"5;a=b=",
            b"5;a=b\"",
            b"5;a=\"b\r",
            b"5;a=\"b\"c",
            b"5;a=\"b\" \r",
            b"5;a=\"\\\r",
            b"5;a=\"\0",
            b"5;a\0",
            b"5;a=b\x7f",
            b"5;a@",
            b"5;\x80",
        ];
        for input in cases {
            rejected_at_last_byte(input, E);
        }
    }

    #[test]
    fn chunk_terminator_is_mandatory() {
        use BodyError::BadChunkTerminator as E;
        check_all_splits(BodyKind::Chunked, b"3\r\nabcXY", Err(E));
        for input in [
            &b"3\r\nabcX"[..],
            b"3\r\nabc\n",
            b"3\r\nabc\rX",
            b"3\r\nabc\r\r",
            b"3\r\nabc0",
            b"1\r\na\r\n2\r\nbc\n",
        ] {
            rejected_at_last_byte(input, E);
        }
    }

    #[test]
    fn bad_trailers_fail_at_the_bad_byte() {
        use BodyError::BadTrailer as E;
        let cases: &[&[u8]] = &[
            // No colon: a pipelined request must not pass as trailers.
            b"0\r\nGET ",
            b"0\r\nX-Trailer\r",
            b"0\r\nX\n",
            b"0\r\n\n",
            b"0\r\n\rX",
            b"0\r\n:",
            b"0\r\n ",
            b"0\r\n\t",
            b"0\r\nX ",
            b"0\r\nX\t",
            b"0\r\nX@",
            b"0\r\nX: y\n",
            b"0\r\nX: y\rZ",
            b"0\r\nX: y\r\r",
            b"0\r\nX: a\0",
            b"0\r\nX: a\x7f",
            b"0\r\nX: a\r\n ",
            b"0\r\nX: a\r\n\n",
            b"0\r\nX: a\r\n\r\r",
        ];
        for input in cases {
            rejected_at_last_byte(input, E);
        }
    }

    #[test]
    fn chunk_size_line_is_bounded() {
        let mut line = b"5;".to_vec();
        line.resize(MAX_CHUNK_LINE, b'a');
        rejected_at_last_byte(&line, BodyError::ChunkLineTooLong);
        let mut ok_line = b"1;".to_vec();
        ok_line.resize(MAX_CHUNK_LINE - 2, b'a');
        ok_line.extend_from_slice(b"\r\nz\r\n0\r\n\r\n");
        assert_eq!(
            run(BodyKind::Chunked, &[&ok_line], usize::MAX),
            Ok((b"z".to_vec(), true, vec![]))
        );
        assert_eq!(
            bytewise(BodyKind::Chunked, &ok_line, usize::MAX),
            Ok((b"z".to_vec(), true, vec![]))
        );
        // A bad byte inside the limit is reported as itself.
        let mut bad = line[..MAX_CHUNK_LINE - 1].to_vec();
        bad.push(b'\0');
        assert_eq!(
            run(BodyKind::Chunked, &[&bad], usize::MAX),
            Err(BodyError::BadChunkExtension)
        );
    }

    #[test]
    fn trailers_are_bounded() {
        let line = b"X-Trailer: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
        let mut input = b"0\r\n".to_vec();
        let mut lines = 0;
        while input.len() - 3 + line.len() <= MAX_TRAILERS - 2 {
            input.extend_from_slice(line);
            lines += 1;
        }
        // Pad the last line so the section, final CRLF included, is exactly
        // MAX_TRAILERS bytes: still fine.
        let pad = MAX_TRAILERS - 2 - (input.len() - 3) - b"X:\r\n".len();
        input.extend_from_slice(b"X:");
        input.resize(input.len() + pad, b'b');
        input.extend_from_slice(b"\r\n\r\n");
        assert!(lines > 100);
        assert_eq!(input.len() - 3, MAX_TRAILERS);
        assert_eq!(
            bytewise(BodyKind::Chunked, &input, usize::MAX),
            Ok((vec![], true, vec![]))
        );
        // One byte more is too much, noticed at the byte past the limit
        // (the CR of the final line).
        input.insert(input.len() - 4, b'b');
        let past_limit = input.len() - 1;
        rejected_at_last_byte(&input[..past_limit], BodyError::ChunkTooLarge);
    }

    #[test]
    fn errors_map_to_400() {
        for e in [
            BodyError::BadChunkSize,
            BodyError::BadChunkExtension,
            BodyError::ChunkLineTooLong,
            BodyError::BadChunkTerminator,
            BodyError::BadTrailer,
            BodyError::ChunkTooLarge,
        ] {
            assert_eq!(e.status(), Some(400), "{e}");
        }
        assert_eq!(BodyError::UnexpectedEof.status(), None);
    }

    #[test]
    fn chunked_eof_midway() {
        let mut d = BodyDecoder::new(BodyKind::Chunked);
        let mut buf = BytesMut::from(&b"3\r\nab"[..]);
        assert_eq!(
            d.decode(&mut buf, 100).unwrap().as_deref(),
            Some(&b"ab"[..])
        );
        assert_eq!(d.decode(&mut buf, 100), Ok(None));
        assert_eq!(d.remaining_hint(), None);
        assert_eq!(d.on_eof(), Err(BodyError::UnexpectedEof));
    }
}
