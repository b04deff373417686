//! Body decoders: strip the framing (length, chunked, close-delimited) from
//! the bytes after a head and hand out the body data zero-copy, in pieces,
//! so no body is ever buffered whole.
//!
//! Framing bytes are only consumed once complete, so the caller's buffer is
//! the only state besides the small `State` enum: a decoder fed one byte at a
//! time produces the same body as one fed everything at once. Bytes after
//! the end of the body (a pipelined request) are never touched.

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};

use super::head::BodyKind;

/// Longest chunk-size line (size plus ignored extensions) we wait for.
pub const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Bound on the trailer section of a chunked body.
pub const MAX_TRAILERS: usize = 64 * 1024;

/// Why a body could not be decoded. Each ends the connection it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Empty, non-hex, longer than 16 hex digits, or a size line over
    /// `MAX_CHUNK_LINE` / with bytes not allowed in extensions.
    BadChunkSize,
    /// Chunk data not followed by CRLF, or a trailer line not ending in CRLF.
    BadChunkTerminator,
    /// The trailer section exceeds `MAX_TRAILERS`.
    ChunkTooLarge,
    /// The peer closed before the body ended.
    UnexpectedEof,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BodyError::BadChunkSize => "bad chunk size line",
            BodyError::BadChunkTerminator => "chunk data not followed by CRLF",
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
    ChunkSize,
    ChunkData {
        remaining: u64,
    },
    ChunkDataEnd,
    /// `seen` counts trailer bytes so far, to bound the section.
    Trailers {
        seen: usize,
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
            BodyKind::Chunked => State::ChunkSize,
            BodyKind::Eof => State::Eof,
        };
        BodyDecoder { state }
    }

    /// Consume framing from the front of `buf` and return the next piece of
    /// body data (at most `max` bytes, split off `buf` without copying), or
    /// `Ok(None)` when more input is needed or the body is done (tell them
    /// apart with [`is_done`](Self::is_done)). Never returns an empty piece.
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
                State::ChunkSize => {
                    let Some(line_len) = line_end(buf, MAX_CHUNK_LINE, BodyError::BadChunkSize)?
                    else {
                        return Ok(None);
                    };
                    let size = parse_chunk_size(&buf[..line_len])?;
                    buf.advance(line_len);
                    self.state = if size == 0 {
                        State::Trailers { seen: 0 }
                    } else {
                        State::ChunkData { remaining: size }
                    };
                }
                State::ChunkDataEnd => {
                    match &buf[..buf.len().min(2)] {
                        b"\r\n" => buf.advance(2),
                        b"" | b"\r" => return Ok(None),
                        _ => return Err(BodyError::BadChunkTerminator),
                    }
                    self.state = State::ChunkSize;
                }
                State::Trailers { seen } => {
                    let limit = MAX_TRAILERS - seen;
                    let Some(line_len) = line_end(buf, limit, BodyError::ChunkTooLarge)? else {
                        return Ok(None);
                    };
                    if line_len < 2 || buf[line_len - 2] != b'\r' {
                        return Err(BodyError::BadChunkTerminator);
                    }
                    buf.advance(line_len);
                    self.state = if line_len == 2 {
                        State::Done
                    } else {
                        State::Trailers {
                            seen: seen + line_len,
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

/// Length of the first line of `buf` including its LF, `None` when no LF
/// yet, `too_long` once `limit` bytes hold no LF.
fn line_end(buf: &[u8], limit: usize, too_long: BodyError) -> Result<Option<usize>, BodyError> {
    let window = &buf[..buf.len().min(limit)];
    match window.iter().position(|&b| b == b'\n') {
        Some(lf) => Ok(Some(lf + 1)),
        None if buf.len() >= limit => Err(too_long),
        None => Ok(None),
    }
}

/// `chunk-size [ chunk-ext ] CRLF` (RFC 9112 7.1). Extensions are ignored
/// but must not hide control bytes a backend might read as line ends.
fn parse_chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let Some(line) = line.strip_suffix(b"\r\n") else {
        return Err(BodyError::BadChunkSize);
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(BodyError::BadChunkSize);
    }
    let mut size = 0u64;
    for &d in &line[..digits] {
        let v = char::from(d).to_digit(16).ok_or(BodyError::BadChunkSize)?;
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(v)))
            .ok_or(BodyError::BadChunkSize)?;
    }
    let rest = &line[digits..];
    let ext = rest.trim_ascii_start();
    if !(ext.is_empty() || ext.starts_with(b";")) {
        return Err(BodyError::BadChunkSize);
    }
    if ext.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(BodyError::BadChunkSize);
    }
    Ok(size)
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
        assert_eq!(run(kind, &[input], usize::MAX), want, "whole");
        assert_eq!(bytewise(kind, input, usize::MAX), want, "byte by byte");
        assert_eq!(bytewise(kind, input, 1), want, "byte by byte, max 1");
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            assert_eq!(run(kind, &[a, b], usize::MAX), want, "split at {at}");
            assert_eq!(run(kind, &[a, b], 3), want, "split at {at}, max 3");
        }
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
    fn chunked_extensions_trailers_and_case() {
        let input = b"A;name=value;x\r\n0123456789\r\n1 ; ext=\"q\"\r\n!\r\n00\r\nTrailer-A: 1\r\nTrailer-B: 2\r\n\r\n";
        check_all_splits(BodyKind::Chunked, input, Ok((b"0123456789!", true, b"")));
        let input = b"a\r\n0123456789\r\nF\r\n0123456789abcde\r\n0\r\n\r\n";
        check_all_splits(
            BodyKind::Chunked,
            input,
            Ok((b"01234567890123456789abcde", true, b"")),
        );
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
    fn chunked_bad_sizes() {
        for bad in [
            &b"\r\n"[..],
            b"x\r\n",
            b"-1\r\n",
            b"+1\r\n",
            b"0x5\r\n",
            b"10000000000000000\r\n",
            b"5 5\r\n",
            b"5\n",
            b"5\rx\n",
            b";ext\r\n",
            b"5;a\0b\r\n",
            b"5;a\rb\r\n",
        ] {
            let r = bytewise(BodyKind::Chunked, bad, usize::MAX);
            assert_eq!(
                r,
                Err(BodyError::BadChunkSize),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn chunk_size_line_is_bounded() {
        let mut line = b"5;".to_vec();
        line.resize(MAX_CHUNK_LINE, b'a');
        assert_eq!(
            run(BodyKind::Chunked, &[&line], usize::MAX),
            Err(BodyError::BadChunkSize)
        );
        assert_eq!(
            run(
                BodyKind::Chunked,
                &[&line[..MAX_CHUNK_LINE - 1]],
                usize::MAX
            ),
            Ok((vec![], false, line[..MAX_CHUNK_LINE - 1].to_vec()))
        );
        let mut ok_line = b"1;".to_vec();
        ok_line.resize(MAX_CHUNK_LINE - 2, b'a');
        ok_line.extend_from_slice(b"\r\nz\r\n0\r\n\r\n");
        assert_eq!(
            run(BodyKind::Chunked, &[&ok_line], usize::MAX),
            Ok((b"z".to_vec(), true, vec![]))
        );
    }

    #[test]
    fn chunk_terminator_is_mandatory() {
        for bad in [
            &b"3\r\nabcX\r\n0\r\n\r\n"[..],
            b"3\r\nabc\n0\r\n\r\n",
            b"3\r\nabc\rX0\r\n\r\n",
            b"3\r\nabc0\r\n\r\n",
        ] {
            let r = bytewise(BodyKind::Chunked, bad, usize::MAX);
            assert_eq!(
                r,
                Err(BodyError::BadChunkTerminator),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let r = bytewise(BodyKind::Chunked, b"0\r\nX-T: 1\n\r\n", usize::MAX);
        assert_eq!(r, Err(BodyError::BadChunkTerminator));
        let r = bytewise(BodyKind::Chunked, b"0\r\n\n", usize::MAX);
        assert_eq!(r, Err(BodyError::BadChunkTerminator));
    }

    #[test]
    fn trailers_are_bounded() {
        let mut input = b"0\r\n".to_vec();
        while input.len() < MAX_TRAILERS + 100 {
            input.extend_from_slice(
                b"X-Trailer: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        input.extend_from_slice(b"\r\n");
        assert_eq!(
            run(BodyKind::Chunked, &[&input], usize::MAX),
            Err(BodyError::ChunkTooLarge)
        );
        let pieces: Vec<&[u8]> = input.chunks(1000).collect();
        assert_eq!(
            run(BodyKind::Chunked, &pieces, usize::MAX),
            Err(BodyError::ChunkTooLarge)
        );
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

    #[test]
    fn chunked_pseudo_random_round_trip() {
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            seed >> 16
        };
        for _ in 0..50 {
            let mut want = Vec::new();
            let mut wire = Vec::new();
            for _ in 0..(next() % 6) {
                let len = (next() % 40 + 1) as usize;
                let chunk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                wire.extend_from_slice(format!("{len:x}\r\n").as_bytes());
                wire.extend_from_slice(&chunk);
                wire.extend_from_slice(b"\r\n");
                want.extend_from_slice(&chunk);
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let max = (next() % 7 + 1) as usize;
            assert_eq!(
                bytewise(BodyKind::Chunked, &wire, max),
                Ok((want.clone(), true, vec![]))
            );
            let step = (next() % 9 + 1) as usize;
            let pieces: Vec<&[u8]> = wire.chunks(step).collect();
            assert_eq!(
                run(BodyKind::Chunked, &pieces, max),
                Ok((want, true, vec![]))
            );
        }
    }
}
