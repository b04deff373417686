//! Micro benchmarks of the sans-IO hot path: frame encode/decode, batch
//! building for one writev, HTTP head parsing and chunked body decoding.
//!
//! Run: `cargo bench --bench codec` (add a name filter, or `-- --quick`).
//! Rows marked "baseline" time only the setup copy that the row below them
//! repeats per op (refilling a read buffer), so it can be subtracted.

// benches/harness/mod.rs: a directory module, so cargo does not take it
// for a bench target of its own (benches/*.rs are discovered as targets).
mod harness;

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use harness::{Bench, Unit};
use ringtunnel::http::{
    encode_request_forwarded, encode_response_forward, parse_request, parse_response, BodyDecoder,
    BodyKind, Origin, Scheme, DEFAULT_MAX_HEAD,
};
use ringtunnel::io::batch::Batch;
use ringtunnel::proto::{encode, Decoder, Frame, HEADER_LEN};

/// A typical backend response head, about 200 bytes.
const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\n\
Date: Wed, 02 Dec 2026 18:00:00 GMT\r\n\
Content-Type: application/json\r\n\
Content-Length: 1234\r\n\
Cache-Control: no-store\r\n\
ETag: \"5f2b-17c\"\r\n\
Vary: Accept-Encoding\r\n\
Connection: keep-alive\r\n\r\n";

/// A typical browser-ish request head, about 200 bytes.
const REQUEST_HEAD: &[u8] = b"GET /api/v1/items?page=2 HTTP/1.1\r\n\
Host: demo.example.com\r\n\
User-Agent: curl/8.5.0\r\n\
Accept: application/json\r\n\
Accept-Encoding: gzip\r\n\
X-Request-Id: 4f1c2a9e\r\n\
Connection: keep-alive\r\n\r\n";

/// Lets the other tasks of the runtime run once (monoio 0.2.4 has no
/// `yield_now`): wakes itself, so it is queued behind them.
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

fn payload(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

fn main() {
    let mut b = Bench::from_args();
    b.print_header();

    // --- frame encode ----------------------------------------------------
    let f = Frame::data(7, payload(64, 1));
    let mut out = BytesMut::with_capacity(HEADER_LEN + 64);
    b.run(
        "encode DATA 64 B (header + payload copy)",
        Unit::Bytes(HEADER_LEN as u64 + 64),
        || {
            out.clear();
            encode(black_box(&f), &mut out);
            out.len()
        },
    );
    // A 16 KiB copy is sensitive to where the destination sits relative to
    // the source modulo 4 KiB: on some CPUs (seen on AMD EPYC with glibc's
    // `rep movsb` memcpy) a destination a few bytes after the source, mod
    // 4 KiB, is ~20x slower. Both placements are pinned so the rows are
    // reproducible instead of depending on where malloc put the buffers.
    let len = 16 * 1024;
    let f = Frame::data(7, payload(len, 1));
    for (dist, what) in [
        (1024usize, "dst 1 KiB after src mod 4 KiB"),
        (28, "dst 28 B after src mod 4 KiB"),
    ] {
        let mut out = out_at(&f.payload, HEADER_LEN + len, dist);
        let start = out.as_ptr();
        let name = format!("encode DATA 16 KiB ({what})");
        b.run(&name, Unit::Bytes((HEADER_LEN + len) as u64), || {
            out.clear();
            encode(black_box(&f), &mut out);
            out.len()
        });
        assert_eq!(out.as_ptr(), start, "the output buffer must not move");
    }
    let f = Frame::data(7, payload(64, 1));
    b.run(
        "encode header only (Frame::header_bytes)",
        Unit::Items(1, "frames"),
        || black_box(&f).header_bytes(),
    );

    // --- frame decode ----------------------------------------------------
    let mut wire = BytesMut::new();
    for i in 0..64u32 {
        encode(&Frame::data(i * 2 + 1, payload(40, i as u8)), &mut wire);
    }
    let wire = wire.freeze();
    let mut buf = BytesMut::with_capacity(wire.len());
    b.run(
        "baseline: refill 64-frame buffer",
        Unit::Bytes(wire.len() as u64),
        || {
            buf.clear();
            buf.extend_from_slice(&wire);
            buf.len()
        },
    );
    let mut dec = Decoder::default();
    let mut buf = BytesMut::with_capacity(wire.len());
    b.run(
        "decode 64 x DATA 40 B (refill + decode)",
        Unit::Items(64, "frames"),
        || {
            buf.clear();
            buf.extend_from_slice(&wire);
            let mut n = 0usize;
            while let Some(fr) = dec.decode(&mut buf).expect("valid frames") {
                n += fr.payload.len();
            }
            assert!(buf.is_empty());
            n
        },
    );

    // --- batch building for one writev ------------------------------------
    let small: Vec<Frame> = (0..64u32)
        .map(|i| Frame::data(i + 1, payload(40, i as u8)))
        .collect();
    let small_bytes: usize = small.iter().map(Frame::encoded_len).sum();
    let mut batch = Batch::new();
    b.run(
        "batch 64 x DATA 40 B copied: push + seal",
        Unit::Bytes(small_bytes as u64),
        || {
            batch.clear();
            for f in &small {
                batch.push(f);
            }
            batch.seal();
            batch.segments()
        },
    );
    let large: Vec<Frame> = (0..64u32)
        .map(|i| Frame::data(i + 1, payload(16 * 1024, i as u8)))
        .collect();
    let large_bytes: usize = large.iter().map(Frame::encoded_len).sum();
    let mut batch = Batch::new();
    b.run(
        "batch 64 x DATA 16 KiB as iovecs: push + seal",
        Unit::Bytes(large_bytes as u64),
        || {
            batch.clear();
            for f in &large {
                batch.push(f);
            }
            batch.seal();
            batch.segments()
        },
    );

    // --- HTTP head parse ----------------------------------------------------
    assert!(
        parse_request(REQUEST_HEAD, DEFAULT_MAX_HEAD)
            .expect("valid head")
            .is_some(),
        "the benchmark head must parse"
    );
    let name = format!("parse_request ({} B head)", REQUEST_HEAD.len());
    b.run(&name, Unit::Items(1, "heads"), || {
        parse_request(black_box(REQUEST_HEAD), DEFAULT_MAX_HEAD)
            .expect("valid head")
            .map(|h| h.head_len)
    });

    // What each hop does with the heads of one request, user space only
    // (issue 9): the gateway parses the client's head, routes it and
    // encodes it with the forwarding headers; the agent parses that; then
    // the agent parses the backend's response head and the gateway parses
    // it again and encodes it for the client.
    let origin = Origin::new("192.0.2.7".parse().unwrap(), false, Scheme::Http);
    let mut fwd = BytesMut::with_capacity(512);
    let mut gateway_request = || {
        let head = parse_request(black_box(REQUEST_HEAD), DEFAULT_MAX_HEAD)
            .expect("valid head")
            .expect("complete head");
        let session = ringtunnel::route::route(head.host.as_deref(), None, None, |_| true);
        fwd.clear();
        encode_request_forwarded(&head, &origin, &mut fwd);
        fwd.len() + session.map_or(0, |s| s.len())
    };
    let name = format!(
        "gateway: request head parse + route + forwarded encode ({} B)",
        REQUEST_HEAD.len()
    );
    b.run(&name, Unit::Items(1, "heads"), &mut gateway_request);
    let forwarded = {
        let head = parse_request(REQUEST_HEAD, DEFAULT_MAX_HEAD)
            .unwrap()
            .unwrap();
        let mut d = BytesMut::new();
        encode_request_forwarded(&head, &origin, &mut d);
        d.freeze()
    };
    let name = format!(
        "agent: forwarded request head parse ({} B)",
        forwarded.len()
    );
    b.run(&name, Unit::Items(1, "heads"), || {
        parse_request(black_box(&forwarded), DEFAULT_MAX_HEAD)
            .expect("valid head")
            .map(|h| h.head_len)
    });
    let mut out = BytesMut::with_capacity(512);
    let name = format!(
        "response head parse x2 + encode for the client ({} B)",
        RESPONSE_HEAD.len()
    );
    b.run(&name, Unit::Items(1, "heads"), || {
        let agent = parse_response(black_box(RESPONSE_HEAD), DEFAULT_MAX_HEAD, false)
            .expect("valid head")
            .expect("complete head");
        let gw = parse_response(black_box(RESPONSE_HEAD), DEFAULT_MAX_HEAD, false)
            .expect("valid head")
            .expect("complete head");
        out.clear();
        encode_response_forward(&gw, gw.body, false, 1, true, &mut out);
        out.len() + agent.head_len
    });

    // --- a task per stream ---------------------------------------------------
    // The agent spawns one task per stream; its future is ~3 KiB (nested
    // exchange state). One op: spawn such a task and let it run to its end.
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .build()
        .expect("runtime");
    let ran = std::rc::Rc::new(std::cell::Cell::new(0u64));
    b.run(
        "spawn_isolated a 3 KiB future and run it",
        Unit::Items(1, "tasks"),
        || {
            let r = ran.clone();
            rt.block_on(async move {
                let state = [7u8; 3072];
                ringtunnel::runtime::spawn_isolated("bench", async move {
                    let state = black_box(state);
                    YieldOnce(false).await;
                    r.set(r.get() + u64::from(state[100]));
                });
                // The spawned task runs before this one is polled again.
                YieldOnce(false).await;
                YieldOnce(false).await;
            });
            ran.get()
        },
    );

    // --- chunked body decode ------------------------------------------------
    let mut chunked = BytesMut::new();
    for i in 0..64u8 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&payload(1024, i));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let chunked = chunked.freeze();
    let mut buf = BytesMut::with_capacity(chunked.len());
    b.run(
        "baseline: refill 64 KiB chunked buffer",
        Unit::Bytes(chunked.len() as u64),
        || {
            buf.clear();
            buf.extend_from_slice(&chunked);
            buf.len()
        },
    );
    let mut buf = BytesMut::with_capacity(chunked.len());
    b.run(
        "chunked decode 64 x 1 KiB (refill + decode)",
        Unit::Bytes(64 * 1024),
        || {
            buf.clear();
            buf.extend_from_slice(&chunked);
            let mut d = BodyDecoder::new(BodyKind::Chunked);
            let mut n = 0usize;
            while let Some(piece) = d.decode(&mut buf, 64 * 1024).expect("valid body") {
                n += piece.len();
            }
            assert!(d.is_done() && n == 64 * 1024);
            n
        },
    );

    b.finish();
}

/// An empty buffer of at least `cap` bytes whose payload position (after a
/// frame header) lies `dist` bytes after `src`, modulo 4 KiB.
fn out_at(src: &[u8], cap: usize, dist: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(cap + 8192);
    let payload_at = b.as_ptr() as usize + HEADER_LEN;
    let now = payload_at.wrapping_sub(src.as_ptr() as usize) % 4096;
    let skip = (dist + 4096 - now) % 4096;
    b.resize(skip, 0);
    drop(b.split_to(skip));
    debug_assert_eq!(
        (b.as_ptr() as usize + HEADER_LEN).wrapping_sub(src.as_ptr() as usize) % 4096,
        dist
    );
    b
}
