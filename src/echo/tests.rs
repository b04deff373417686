//! Real sockets on port 0: the server runs on its own thread and runtime,
//! the tests talk raw HTTP over blocking std sockets and read answers back
//! with the crate's own parser and body decoder.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};

use super::*;
use crate::http::{parse_response, BodyDecoder, BodyKind, ResponseHead};

#[derive(Clone, Copy)]
enum Driver {
    Fusion,
    Legacy,
}

fn start(cfg: EchoConfig, driver: Driver) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("echo-test-server".into())
        .spawn(move || {
            let cfg = Rc::new(cfg);
            let server = async move {
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                serve(listener, cfg).await;
            };
            match driver {
                Driver::Fusion => monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                    .enable_timer()
                    .build()
                    .unwrap()
                    .block_on(server),
                Driver::Legacy => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                    .enable_timer()
                    .build()
                    .unwrap()
                    .block_on(server),
            }
        })
        .unwrap();
    rx.recv().unwrap()
}

/// One server shared by the tests that need no special configuration.
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| start(EchoConfig::default(), Driver::Fusion))
}

struct Client {
    sock: TcpStream,
    buf: BytesMut,
}

impl Client {
    fn new(addr: SocketAddr) -> Self {
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        sock.set_nodelay(true).unwrap();
        Client {
            sock,
            buf: BytesMut::new(),
        }
    }

    fn send(&mut self, data: &[u8]) {
        self.sock.write_all(data).unwrap();
    }

    /// Write `data` from another thread, so that a large upload and its
    /// echo can be in flight at once.
    fn send_in_background(&self, data: Vec<u8>) -> JoinHandle<()> {
        let mut sock = self.sock.try_clone().unwrap();
        std::thread::spawn(move || sock.write_all(&data).unwrap())
    }

    /// Bytes read; 0 at EOF (a reset counts as EOF too).
    fn read_more(&mut self) -> usize {
        let mut tmp = vec![0u8; 64 * 1024];
        match self.sock.read(&mut tmp) {
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                n
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => panic!("read failed: {e}"),
        }
    }

    fn response(&mut self, head_req: bool) -> (ResponseHead, Vec<u8>) {
        let head = loop {
            if let Some(h) = parse_response(&self.buf, 64 * 1024, head_req).unwrap() {
                break h;
            }
            assert!(self.read_more() > 0, "EOF before a response head");
        };
        self.buf.advance(head.head_len);
        let mut dec = BodyDecoder::new(head.body);
        let mut body = Vec::new();
        loop {
            match dec.decode(&mut self.buf, usize::MAX).unwrap() {
                Some(piece) => body.extend_from_slice(&piece),
                None if dec.is_done() => break,
                None => {
                    if self.read_more() == 0 {
                        dec.on_eof().unwrap();
                    }
                }
            }
        }
        (head, body)
    }

    fn request(&mut self, method: &str, path: &str) -> (ResponseHead, Vec<u8>) {
        self.send(format!("{method} {path} HTTP/1.1\r\nHost: echo.test\r\n\r\n").as_bytes());
        self.response(method == "HEAD")
    }

    fn get(&mut self, path: &str) -> (ResponseHead, Vec<u8>) {
        self.request("GET", path)
    }

    fn raw(&mut self, len: usize) -> Vec<u8> {
        while self.buf.len() < len {
            assert!(
                self.read_more() > 0,
                "EOF after {} of {len} raw bytes",
                self.buf.len()
            );
        }
        self.buf.split_to(len).to_vec()
    }

    fn assert_closed(&mut self) {
        assert!(
            self.buf.is_empty(),
            "unexpected bytes: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        assert_eq!(self.read_more(), 0, "connection still open");
    }
}

fn header<'a>(h: &'a ResponseHead, name: &str) -> Option<&'a str> {
    h.header(name).map(|v| std::str::from_utf8(v).unwrap())
}

fn pseudo_random(len: usize, mut seed: u32) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (seed >> 16) as u8
        })
        .collect()
}

#[test]
fn root_with_keep_alive() {
    let mut c = Client::new(server());
    for _ in 0..3 {
        let (h, body) = c.get("/");
        assert_eq!((h.version, h.status, h.keep_alive), (1, 200, true));
        assert_eq!(body, b"ringtunnel echo\n");
        assert_eq!(header(&h, "content-length"), Some("16"));
        assert_eq!(
            header(&h, "content-type"),
            Some("text/plain; charset=utf-8")
        );
    }
}

#[test]
fn connection_close_is_honoured() {
    let mut c = Client::new(server());
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (h, body) = c.response(false);
    assert_eq!((h.status, h.keep_alive), (200, false));
    assert_eq!(header(&h, "connection"), Some("close"));
    assert_eq!(body, b"ringtunnel echo\n");
    c.assert_closed();
}

#[test]
fn http10_clients() {
    let mut c = Client::new(server());
    c.send(b"GET / HTTP/1.0\r\n\r\n");
    let (h, body) = c.response(false);
    assert_eq!((h.version, h.status, h.keep_alive), (0, 200, false));
    assert_eq!(body, b"ringtunnel echo\n");
    c.assert_closed();

    let mut c = Client::new(server());
    for _ in 0..2 {
        c.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let (h, _) = c.response(false);
        assert_eq!((h.version, h.keep_alive), (0, true));
        assert_eq!(header(&h, "connection"), Some("keep-alive"));
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let mut c = Client::new(server());
    c.send(
        b"GET /status/201 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /headers HTTP/1.1\r\nHost: x\r\nX-Tag: 3\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
          POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nzz\r\n0\r\n\r\n\
          GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let (h, body) = c.response(false);
    assert_eq!((h.status, body.len()), (201, 0));
    let (h, body) = c.response(false);
    assert_eq!(h.status, 200);
    assert_eq!(body, (0..10).map(pattern_byte).collect::<Vec<_>>());
    let (h, body) = c.response(false);
    assert_eq!(h.status, 200);
    assert!(String::from_utf8(body).unwrap().contains("X-Tag: 3\n"));
    let (h, body) = c.response(false);
    assert_eq!((h.status, body.as_slice()), (200, &b"abc"[..]));
    let (h, body) = c.response(false);
    assert_eq!(
        (h.status, body.as_slice()),
        (200, &b"ringtunnel echo\n"[..])
    );
    let (h, _) = c.response(false);
    assert_eq!(h.status, 404);
    // Still usable afterwards.
    assert_eq!(c.get("/").0.status, 200);
}

#[test]
fn bytes_follow_the_pattern() {
    let mut c = Client::new(server());
    for n in [0u64, 1, 250, 251, 70_000, 3_000_000] {
        let (h, body) = c.get(&format!("/bytes/{n}"));
        assert_eq!(h.status, 200);
        assert_eq!(h.body, BodyKind::Length(n));
        assert_eq!(header(&h, "content-type"), Some("application/octet-stream"));
        assert_eq!(body.len() as u64, n);
        assert!(
            body.iter()
                .enumerate()
                .all(|(i, &b)| b == pattern_byte(i as u64)),
            "n = {n}"
        );
    }
    assert_eq!(c.get("/bytes/1073741825").0.status, 400);
    assert_eq!(c.get("/bytes/abc").0.status, 400);
}

#[test]
fn echo_with_content_length() {
    let mut c = Client::new(server());
    let body = pseudo_random(3_000_000, 1);
    c.send(
        format!(
            "PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-test\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let writer = c.send_in_background(body.clone());
    let (h, got) = c.response(false);
    writer.join().unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(h.body, BodyKind::Length(body.len() as u64));
    assert_eq!(header(&h, "content-type"), Some("application/x-test"));
    assert!(got == body, "echoed body differs");

    c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\n\r\n");
    let (h, got) = c.response(false);
    assert_eq!((h.status, h.body, got.len()), (200, BodyKind::Length(0), 0));
    assert_eq!(header(&h, "content-type"), None);
}

#[test]
fn echo_chunked() {
    let mut c = Client::new(server());
    let mut wire = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let mut want = Vec::new();
    for (i, len) in [1usize, 10, 70_000, 5, 200_000, 3].into_iter().enumerate() {
        let chunk = pseudo_random(len, i as u32);
        wire.extend_from_slice(format!("{len:x};ext=1\r\n").as_bytes());
        wire.extend_from_slice(&chunk);
        wire.extend_from_slice(b"\r\n");
        want.extend_from_slice(&chunk);
    }
    wire.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
    let writer = c.send_in_background(wire);
    let (h, got) = c.response(false);
    writer.join().unwrap();
    assert_eq!((h.status, h.body), (200, BodyKind::Chunked));
    assert!(got == want, "echoed body differs");
    assert_eq!(c.get("/").0.status, 200);
}

#[test]
fn expect_100_continue() {
    let mut c = Client::new(server());
    c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
    let (h, _) = c.response(false);
    assert_eq!(h.status, 100);
    c.send(b"hello");
    let (h, body) = c.response(false);
    assert_eq!((h.status, body.as_slice()), (200, &b"hello"[..]));

    // Routes that ignore the body still ask for it rather than deadlock.
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n");
    assert_eq!(c.response(false).0.status, 100);
    c.send(b"hi");
    assert_eq!(c.response(false).0.status, 200);
}

#[test]
fn upgrade_becomes_a_raw_echo() {
    let mut c = Client::new(server());
    c.send(
        b"GET /upgrade HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nearly",
    );
    let (h, _) = c.response(false);
    assert_eq!(h.status, 101);
    assert_eq!(header(&h, "upgrade"), Some("websocket"));
    assert_eq!(header(&h, "connection"), Some("upgrade"));
    assert_eq!(
        header(&h, "sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    assert_eq!(c.raw(5), b"early");
    let message = pseudo_random(1 << 20, 9);
    let writer = c.send_in_background(message.clone());
    assert!(c.raw(message.len()) == message, "echoed bytes differ");
    writer.join().unwrap();
    c.sock.shutdown(Shutdown::Write).unwrap();
    c.assert_closed();
}

#[test]
fn upgrade_needs_the_headers() {
    let mut c = Client::new(server());
    let (h, _) = c.get("/upgrade");
    assert_eq!(h.status, 426);
    // Upgrade requests elsewhere are plain requests.
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n");
    assert_eq!(c.response(false).0.status, 200);
}

#[test]
fn head_gets_no_body() {
    let mut c = Client::new(server());
    let (h, body) = c.request("HEAD", "/bytes/100");
    assert_eq!((h.status, body.len()), (200, 0));
    assert_eq!(header(&h, "content-length"), Some("100"));
    let (h, _) = c.request("HEAD", "/stream/3");
    assert_eq!(header(&h, "transfer-encoding"), Some("chunked"));
    let (h, _) = c.request("HEAD", "/");
    assert_eq!(header(&h, "content-length"), Some("16"));
    let (h, _) = c.request("HEAD", "/headers");
    assert!(header(&h, "content-length").is_some());
    // A stray body would show up as garbage in front of this answer.
    let (h, body) = c.get("/");
    assert_eq!(
        (h.status, body.as_slice()),
        (200, &b"ringtunnel echo\n"[..])
    );
}

#[test]
fn status_route() {
    let mut c = Client::new(server());
    let (h, _) = c.get("/status/204");
    assert_eq!((h.status, header(&h, "content-length")), (204, None));
    let (h, _) = c.get("/status/304");
    assert_eq!((h.status, header(&h, "content-length")), (304, None));
    let (h, body) = c.get("/status/418");
    assert_eq!(
        (h.status, header(&h, "content-length"), body.len()),
        (418, Some("0"), 0)
    );
    let (h, _) = c.get("/status/599");
    assert_eq!(h.status, 599);
    assert_eq!(c.get("/status/600").0.status, 400);
    assert_eq!(c.get("/status/x").0.status, 400);
    assert_eq!(c.get("/").0.status, 200);
}

#[test]
fn stream_route() {
    let mut c = Client::new(server());
    let (h, body) = c.get("/stream/5");
    assert_eq!((h.status, h.body), (200, BodyKind::Chunked));
    let want: String = (0..5).map(|i| format!("{{\"id\": {i}}}\n")).collect();
    assert_eq!(String::from_utf8(body).unwrap(), want);
    let (h, body) = c.get("/stream/20000");
    assert_eq!(h.status, 200);
    assert_eq!(body.iter().filter(|&&b| b == b'\n').count(), 20_000);
    assert_eq!(c.get("/stream/100001").0.status, 400);

    let mut c = Client::new(server());
    c.send(b"GET /stream/3 HTTP/1.0\r\n\r\n");
    let (h, body) = c.response(false);
    assert_eq!((h.version, h.body), (0, BodyKind::Eof));
    assert_eq!(body.iter().filter(|&&b| b == b'\n').count(), 3);
}

#[test]
fn headers_route() {
    let mut c = Client::new(server());
    c.send(b"GET /headers HTTP/1.1\r\nHost: demo.example\r\nX-Forwarded-For: 1.2.3.4\r\nx-odd-Case:  v v \r\n\r\n");
    let (h, body) = c.response(false);
    assert_eq!(h.status, 200);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "Host: demo.example\nX-Forwarded-For: 1.2.3.4\nx-odd-Case: v v\n"
    );
}

#[test]
fn not_found() {
    let mut c = Client::new(server());
    let (h, body) = c.get("/nope");
    assert_eq!((h.status, body.as_slice()), (404, &b"not found\n"[..]));
    assert!(h.keep_alive);
}

#[test]
fn delay_route_and_drip() {
    let mut c = Client::new(server());
    let t = Instant::now();
    let (h, _) = c.get("/delay/100");
    assert_eq!(h.status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    let t = Instant::now();
    let (h, body) = c.get("/drip?bytes=3&delay_ms=20");
    assert_eq!((h.status, body.as_slice()), (200, &b"***"[..]));
    assert!(
        t.elapsed() >= Duration::from_millis(40),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn server_wide_delay_applies_to_every_request() {
    let addr = start(
        EchoConfig {
            delay_ms: 50,
            ..EchoConfig::default()
        },
        Driver::Fusion,
    );
    let mut c = Client::new(addr);
    let t = Instant::now();
    assert_eq!(c.get("/").0.status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(50),
        "{:?}",
        t.elapsed()
    );
    let t = Instant::now();
    assert_eq!(c.get("/delay/30").0.status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(80),
        "{:?}",
        t.elapsed()
    );
    // Pipelined requests each wait, and still come back in order.
    let t = Instant::now();
    c.send(
        b"GET /status/201 HTTP/1.1\r\nHost: x\r\n\r\nGET /status/202 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(c.response(false).0.status, 201);
    assert_eq!(c.response(false).0.status, 202);
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn malformed_requests_get_their_status_and_a_close() {
    let cases: [(&[u8], u16); 9] = [
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        // RFC 9112 §6.3: a final coding other than chunked is 400; a coding
        // we cannot decode before a final chunked is 501.
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    ];
    for (request, status) in cases {
        let mut c = Client::new(server());
        c.send(request);
        let (h, _) = c.response(false);
        assert_eq!(h.status, status, "{:?}", String::from_utf8_lossy(request));
        assert_eq!(header(&h, "connection"), Some("close"));
        c.assert_closed();
    }
}

#[test]
fn oversized_head_gets_431() {
    let mut c = Client::new(server());
    let mut head = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    while head.len() < 100 * 1024 {
        head.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let writer = c.send_in_background(head);
    let (h, _) = c.response(false);
    writer.join().unwrap();
    assert_eq!(h.status, 431);
    c.assert_closed();
}

#[test]
fn many_clients_at_once() {
    let addr = server();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Client::new(addr);
                for i in 0..50 {
                    let n = (t * 1000 + i) % 3000;
                    let (h, body) = c.get(&format!("/bytes/{n}"));
                    assert_eq!(h.status, 200);
                    assert_eq!(body.len(), n);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn legacy_driver() {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    let addr = *ADDR.get_or_init(|| start(EchoConfig::default(), Driver::Legacy));
    let mut c = Client::new(addr);
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /bytes/200000 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.response(false).1, b"ringtunnel echo\n");
    let (_, body) = c.response(false);
    assert_eq!(body.len(), 200_000);
    assert!(body
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern_byte(i as u64)));
    let upload = pseudo_random(500_000, 3);
    c.send(
        format!(
            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            upload.len()
        )
        .as_bytes(),
    );
    let writer = c.send_in_background(upload.clone());
    let (h, got) = c.response(false);
    writer.join().unwrap();
    assert_eq!(h.status, 200);
    assert!(got == upload);
}
