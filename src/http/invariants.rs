//! Invariants of the request-head parser and the body decoder, shared by
//! the randomised unit tests below and the cargo-fuzz targets
//! `http_request` and `body_decode` (`fuzz/`), so both check exactly the
//! same thing:
//!
//! - parsing or decoding never panics, and never waits forever: an
//!   incomplete head is shorter than its limit, an incomplete chunked body
//!   holds back fewer than `MAX_TRAILERS` bytes;
//! - how the input is split into reads changes nothing: not the head, not
//!   the body bytes, not the verdict, not where the body ends;
//! - a body never yields more than its `Content-Length`, and never takes a
//!   byte past its own end: the bytes it consumed, alone, decode the same;
//! - a PROXY header ([`check_proxy`], fuzz target `proxy_header`) is judged
//!   the same whatever read it arrives in: every read short of it waits,
//!   the header alone parses the same, an error once found stays the same
//!   error, and waiting is bounded.

use bytes::BytesMut;

use super::body::{BodyDecoder, BodyError, MAX_TRAILERS};
use super::head::{parse_request, BodyKind, HeadError, RequestHead};
use super::proxy::{self, ProxyError, ProxySource, V2_MAX_BODY};

/// How feeding an input to a body decoder ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Done,
    NeedMore,
    Failed(BodyError),
}

/// What a fresh decoder made of one input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub body: Vec<u8>,
    pub verdict: Verdict,
    /// Input bytes taken off the front of the buffer.
    pub consumed: usize,
}

/// Feed `input` to a fresh decoder for `kind` in reads ending at each of
/// `cuts` (any order; past the end means the end), draining the decoder
/// after each read with pieces of at most `max` (>= 1) bytes. Stops at the
/// first error, or once the body is done.
pub fn decode_in_reads(kind: BodyKind, input: &[u8], cuts: &[usize], max: usize) -> Decoded {
    assert!(max >= 1, "max 0 never yields anything");
    let mut ends: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    ends.push(input.len());
    ends.sort_unstable();
    ends.dedup();
    let mut dec = BodyDecoder::new(kind);
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    let mut fed = 0;
    for end in ends {
        if dec.is_done() {
            break;
        }
        buf.extend_from_slice(&input[fed..end]);
        fed = end;
        loop {
            match dec.decode(&mut buf, max) {
                Ok(Some(piece)) => {
                    assert!(!piece.is_empty() && piece.len() <= max);
                    body.extend_from_slice(&piece);
                }
                Ok(None) => break,
                Err(e) => {
                    return Decoded {
                        body,
                        verdict: Verdict::Failed(e),
                        consumed: fed - buf.len(),
                    }
                }
            }
        }
    }
    let verdict = if dec.is_done() {
        // Done is final and leaves the rest of the buffer alone.
        let before = buf.clone();
        assert_eq!(dec.decode(&mut buf, max), Ok(None));
        assert_eq!(buf, before);
        Verdict::Done
    } else {
        Verdict::NeedMore
    };
    Decoded {
        body,
        verdict,
        consumed: fed - buf.len(),
    }
}

/// Panics unless decoding `input` as a `kind` body in the reads `cuts`
/// with pieces of `max` agrees with decoding it whole, and the result obeys
/// the module's invariants. Returns the result.
pub fn check_body(kind: BodyKind, input: &[u8], cuts: &[usize], max: usize) -> Decoded {
    let whole = decode_in_reads(kind, input, &[], usize::MAX);
    let split = decode_in_reads(kind, input, cuts, max);
    assert_eq!(split, whole, "{kind:?} split at {cuts:?}, max {max}");
    let Decoded {
        body,
        verdict,
        consumed,
    } = &whole;
    assert!(*consumed <= input.len());
    let held = input.len() - consumed;
    match kind {
        BodyKind::Empty => assert_eq!((body.len(), verdict, consumed), (0, &Verdict::Done, &0)),
        BodyKind::Length(n) => {
            let len = body.len() as u64;
            assert!(len <= n, "{len} bytes of a {n}-byte body");
            assert_eq!(*consumed, body.len());
            match verdict {
                Verdict::Done => assert_eq!(len, n),
                Verdict::NeedMore => assert_eq!(held, 0),
                Verdict::Failed(e) => panic!("length body failed: {e:?}"),
            }
        }
        BodyKind::Eof => {
            assert_eq!((&body[..], verdict), (input, &Verdict::NeedMore));
        }
        BodyKind::Chunked => {
            assert!(body.len() <= *consumed);
            if *verdict == Verdict::NeedMore {
                assert!(held < MAX_TRAILERS, "waiting on {held} bytes");
            }
            if let Verdict::Failed(e) = verdict {
                assert_eq!(e.status(), Some(400), "{e:?}");
            }
        }
    }
    if *verdict == Verdict::Done {
        // Nothing after the end of the body was needed to find it.
        let alone = decode_in_reads(kind, &input[..*consumed], &[], usize::MAX);
        assert_eq!(alone, whole, "the body ended past its consumed bytes");
    }
    whole
}

/// Panics unless `parse_request` on `input` obeys the module's invariants:
/// a read ending at `split` sees nothing or the same result; a complete
/// head lies within the input and the limit; an incomplete one is shorter
/// than the limit; every error has a 4xx/5xx status. The body after a head
/// is checked with [`check_body`] (`cuts` relative to the body).
pub fn check_request(
    input: &[u8],
    max_head: usize,
    split: usize,
    cuts: &[usize],
    max: usize,
) -> Result<Option<RequestHead>, HeadError> {
    let whole = parse_request(input, max_head);
    let early = parse_request(&input[..split.min(input.len())], max_head);
    if !matches!(early, Ok(None)) {
        assert_eq!(early, whole, "a read ending at {split} decided otherwise");
    }
    match &whole {
        Ok(None) => assert!(input.len() < max_head, "waits forever"),
        Ok(Some(h)) => {
            assert!(h.head_len > 0 && h.head_len <= input.len().min(max_head));
            assert_ne!(h.body, BodyKind::Eof, "requests never read to EOF");
            check_body(h.body, &input[h.head_len..], cuts, max);
        }
        Err(e) => assert!(matches!(e.status(), 400 | 431 | 501 | 505), "{e:?}"),
    }
    whole
}

/// Panics unless [`proxy::parse`] on `input` and on each of its prefixes
/// obeys the module's invariants (quadratic in the input: keep it short).
pub fn check_proxy(input: &[u8]) -> Result<Option<(ProxySource, usize)>, ProxyError> {
    let whole = proxy::parse(input);
    let decided = match &whole {
        Ok(Some((_, n))) => {
            assert!(*n <= input.len() && *n <= 16 + V2_MAX_BODY, "{n}");
            assert_eq!(proxy::parse(&input[..*n]), whole, "the header alone");
            *n
        }
        Ok(None) => {
            assert!(input.len() < 16 + V2_MAX_BODY, "waits forever");
            input.len() + 1
        }
        Err(_) => input.len() + 1,
    };
    let mut failed = None;
    for i in 0..decided.min(input.len() + 1) {
        match (proxy::parse(&input[..i]), failed) {
            (Ok(None), None) => {}
            (Err(e), _) if Err(e) == whole => failed = Some(i),
            (other, _) => panic!("prefix {i}: {other:?}, whole input: {whole:?}"),
        }
    }
    whole
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::http::DEFAULT_MAX_HEAD;
    use crate::proto::test_rng::XorShift;

    const EXTS: &[&[u8]] = &[b"", b";a", b";a=b", b" ;a = \"q \\\" ;\"", b"\t;x;y=z"];
    const TRAILERS: &[&[u8]] = &[b"X-A: 1\r\n", b"X-B:\r\n", b"Digest: \t sha=\x80\r\n"];
    /// Bytes that matter to framing, for mutations.
    const SPICE: &[u8] = b"\r\n\r\n ;=\":\t0aF-x\0,";

    /// A valid chunked encoding of a random body: (wire, body).
    fn chunked(rng: &mut XorShift) -> (Vec<u8>, Vec<u8>) {
        let mut wire = Vec::new();
        let mut body = Vec::new();
        for _ in 0..rng.below(5) {
            let len = 1 + rng.below(20);
            let data = rng.bytes(len);
            let size = if rng.chance(2) {
                format!("{:x}", data.len())
            } else {
                format!("{:03X}", data.len())
            };
            wire.extend_from_slice(size.as_bytes());
            let ext = *rng.pick(EXTS);
            wire.extend_from_slice(ext);
            wire.extend_from_slice(b"\r\n");
            wire.extend_from_slice(&data);
            wire.extend_from_slice(b"\r\n");
            body.extend_from_slice(&data);
        }
        wire.extend_from_slice(b"0");
        let ext = *rng.pick(EXTS);
        wire.extend_from_slice(ext);
        wire.extend_from_slice(b"\r\n");
        for _ in 0..rng.below(3) {
            let trailer = *rng.pick(TRAILERS);
            wire.extend_from_slice(trailer);
        }
        wire.extend_from_slice(b"\r\n");
        (wire, body)
    }

    /// Overwrite, insert or drop a few bytes, mostly framing bytes.
    fn mutate(rng: &mut XorShift, wire: &mut Vec<u8>) {
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(wire.len() + 1);
            let b = if rng.chance(2) {
                *rng.pick(SPICE)
            } else {
                rng.next_u32() as u8
            };
            match rng.below(3) {
                0 if at < wire.len() => wire[at] = b,
                1 if at < wire.len() => {
                    wire.remove(at);
                }
                _ => wire.insert(at, b),
            }
        }
    }

    fn random_cuts(rng: &mut XorShift, len: usize) -> Vec<usize> {
        if rng.chance(8) {
            return (0..len).collect();
        }
        (0..rng.below(4)).map(|_| rng.below(len + 1)).collect()
    }

    fn random_max(rng: &mut XorShift) -> usize {
        *rng.pick(&[1, 2, 3, 7, 64, usize::MAX])
    }

    #[test]
    fn twenty_thousand_random_bodies() {
        let mut rng = XorShift::new(0xb0d1_e5ed);
        let mut verdicts = HashSet::new();
        let mut round_trips = 0;
        for _ in 0..20_000 {
            let kind = match rng.below(8) {
                0 => BodyKind::Empty,
                1 => BodyKind::Length(rng.below(64) as u64),
                2 => BodyKind::Length(u64::MAX),
                3 => BodyKind::Eof,
                _ => BodyKind::Chunked,
            };
            let (mut input, want) = if kind == BodyKind::Chunked && !rng.chance(8) {
                chunked(&mut rng)
            } else {
                (rng.noise(64), Vec::new())
            };
            let intact = kind == BodyKind::Chunked && !want.is_empty() && rng.chance(3);
            let framing = input.len();
            if !intact {
                mutate(&mut rng, &mut input);
            }
            // Whatever follows the body: a pipelined request, or junk.
            input.extend_from_slice(&rng.noise(12));
            let cuts = random_cuts(&mut rng, input.len());
            let got = check_body(kind, &input, &cuts, random_max(&mut rng));
            if intact {
                let expect = Decoded {
                    body: want,
                    verdict: Verdict::Done,
                    consumed: framing,
                };
                assert_eq!(got, expect);
                round_trips += 1;
            }
            verdicts.insert(format!("{:?}", got.verdict));
        }
        // The generator reaches every outcome, so the checks were exercised.
        assert!(round_trips > 1500, "{round_trips}");
        for v in [
            "Done",
            "NeedMore",
            "Failed(BadChunkSize)",
            "Failed(BadChunkExtension)",
            "Failed(BadChunkTerminator)",
            "Failed(BadTrailer)",
        ] {
            assert!(verdicts.contains(v), "{v} never seen in {verdicts:?}");
        }
    }

    const LINES: &[&str] = &[
        "GET / HTTP/1.1",
        "POST /upload HTTP/1.1",
        "POST / HTTP/1.0",
        "GET / HTTP/2.0",
        "GET /a b HTTP/1.1",
        "GARBAGE",
    ];
    const FIELDS: &[&str] = &[
        "Host: h",
        "Host: h",
        "Content-Length: 5",
        "Content-Length: 0",
        "Content-Length: 5, 5",
        "Content-Length: 5, 6",
        "Content-Length: +5",
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: xchunked",
        "Transfer-Encoding : chunked",
        "Transfer-Encoding: chunked, identity",
        "Transfer-Encoding: gzip, chunked",
        "Transfer-Encoding:\tchunked",
        " Transfer-Encoding: chunked",
        "Connection: close",
        "Expect: 100-continue",
        "X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ];

    fn random_request(rng: &mut XorShift) -> Vec<u8> {
        let eol: &[u8] = if rng.chance(16) { b"\n" } else { b"\r\n" };
        let mut req = rng.pick(LINES).as_bytes().to_vec();
        req.extend_from_slice(eol);
        for _ in 0..rng.below(5) {
            req.extend_from_slice(rng.pick(FIELDS).as_bytes());
            req.extend_from_slice(eol);
        }
        req.extend_from_slice(eol);
        match rng.below(3) {
            0 => req.extend_from_slice(&chunked(rng).0),
            1 => req.extend_from_slice(b"hello"),
            _ => req.extend_from_slice(&rng.noise(16)),
        }
        if rng.chance(3) {
            mutate(rng, &mut req);
        }
        if rng.chance(4) {
            req.truncate(rng.below(req.len() + 1));
        }
        if rng.chance(2) {
            req.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n");
        }
        req
    }

    #[test]
    fn twenty_thousand_random_requests() {
        let mut rng = XorShift::new(0x5eed_4e4d);
        let mut outcomes = HashSet::new();
        for _ in 0..20_000 {
            let input = random_request(&mut rng);
            let max_head = *rng.pick(&[32, 128, DEFAULT_MAX_HEAD]);
            let split = rng.below(input.len() + 1);
            let cuts = random_cuts(&mut rng, input.len());
            let max = random_max(&mut rng);
            let outcome = match check_request(&input, max_head, split, &cuts, max) {
                Ok(Some(h)) => format!("{:?}", h.body).replace(|c: char| c.is_ascii_digit(), ""),
                Ok(None) => "incomplete".to_owned(),
                Err(e) => e.status().to_string(),
            };
            outcomes.insert(outcome);
        }
        for o in [
            "Empty",
            "Length()",
            "Chunked",
            "incomplete",
            "400",
            "431",
            "501",
            "505",
        ] {
            assert!(outcomes.contains(o), "{o} never seen in {outcomes:?}");
        }
    }

    /// A valid PROXY header of some kind, then HTTP bytes.
    fn random_proxy(rng: &mut XorShift) -> Vec<u8> {
        let mut v = match rng.below(6) {
            0 => b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n".to_vec(),
            1 => b"PROXY TCP6 2001:db8::7 ::1 1 65535\r\n".to_vec(),
            2 => b"PROXY UNKNOWN\r\n".to_vec(),
            3 => proxy::v2_tcp(
                "10.1.2.3:4".parse().unwrap(),
                "10.0.0.1:80".parse().unwrap(),
                &rng.noise(40),
            ),
            4 => proxy::v2_tcp(
                "[2001:db8::1]:4".parse().unwrap(),
                "[::1]:80".parse().unwrap(),
                &[],
            ),
            _ => proxy::v2_header(0x20, rng.next_u32() as u8, &rng.noise(20)),
        };
        // Mutations: a flipped byte, a changed v2 length, a cut.
        if rng.chance(2) {
            let i = rng.below(v.len());
            v[i] = *rng.pick(&[b' ', b'\r', b'\n', b'0', b'9', b':', 0x00, 0x11, 0x21, 0xff]);
        }
        if v.len() >= 16 && v[0] == b'\r' && rng.chance(4) {
            v[14] = rng.next_u32() as u8 & 0x0f;
            v[15] = rng.next_u32() as u8;
        }
        if rng.chance(4) {
            v.truncate(rng.below(v.len() + 1));
        }
        v.extend_from_slice(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
        v
    }

    #[test]
    fn twenty_thousand_random_proxy_headers() {
        let mut rng = XorShift::new(0x9e0c_7a11);
        let mut outcomes = HashSet::new();
        for _ in 0..20_000 {
            let input = random_proxy(&mut rng);
            let outcome = match check_proxy(&input) {
                Ok(Some((ProxySource::Client { .. }, _))) => "client",
                Ok(Some((ProxySource::Local, _))) => "local",
                Ok(None) => "incomplete",
                Err(_) => "error",
            };
            outcomes.insert(outcome);
        }
        for o in ["client", "local", "incomplete", "error"] {
            assert!(outcomes.contains(o), "{o} never seen in {outcomes:?}");
        }
    }
}
