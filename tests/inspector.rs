//! The agent's request inspector (`--inspect`), over real sockets: a real
//! gateway, agent and echo backend; requests through the tunnel; the
//! inspector's JSON API read with raw HTTP. Masking, caps and the memory
//! bound, filters, replay (straight to the backend), and clients of the
//! inspector that misbehave.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

struct Inspected {
    _echo: Proc,
    gw: Proc,
    agent: Proc,
}

impl Inspected {
    fn start(extra: &[&str]) -> Inspected {
        let echo = echo("uring", 0);
        let gw = gateway("uring", &[]);
        let mut args = vec!["--inspect", "127.0.0.1:0", "--cores", "1"];
        args.extend_from_slice(extra);
        let agent = agent("uring", &gw, "demo", echo.addr("listen"), &args);
        wait_routable(gw.addr("public"), "demo");
        Inspected {
            _echo: echo,
            gw,
            agent,
        }
    }

    fn inspector(&self) -> SocketAddr {
        self.agent.addr("inspect")
    }

    fn public(&self) -> SocketAddr {
        self.gw.addr("public")
    }

    /// `GET` on the inspector; the body as text.
    fn get(&self, path: &str) -> (u16, String) {
        let r = request(
            self.inspector(),
            &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
        );
        (r.status, r.text())
    }

    fn post(&self, path: &str) -> (u16, String) {
        let r = request(
            self.inspector(),
            &format!(
                "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                 Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            ),
        );
        (r.status, r.text())
    }

    fn clear(&self) {
        let r = request(
            self.inspector(),
            "DELETE /api/requests HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// Waits until the list (with `query`) holds `n` records; their ids,
    /// newest first.
    fn wait_ids(&self, query: &str, n: usize) -> Vec<u64> {
        let t = Instant::now();
        loop {
            let (s, body) = self.get(&format!("/api/requests{query}"));
            assert_eq!(s, 200, "{body}");
            let ids = json_numbers(&body, "id");
            if ids.len() == n {
                return ids;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "wanted {n} records for {query:?}, have {}: {body}",
                ids.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn post_echo(public: SocketAddr, path: &str, body: &[u8], extra_headers: &str) -> Resp {
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: demo\r\n{extra_headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    request_bytes(public, &raw)
}

#[test]
fn secrets_are_masked_and_bodies_capped() {
    let s = Inspected::start(&["--inspect-body-bytes", "64", "--inspect-mask", "X-Api-Key"]);
    s.clear();
    let body = pattern(200);
    let r = post_echo(
        s.public(),
        "/echo?q=1",
        &body,
        "Authorization: Bearer tok-SECRET-1\r\nCookie: sid=SECRET-2\r\nX-Api-Key: SECRET-3\r\nX-Visible: shown-value\r\n",
    );
    assert_eq!(r.status, 200);
    let ids = s.wait_ids("?path=/echo", 1);
    let (st, d) = s.get(&format!("/api/requests/{}", ids[0]));
    assert_eq!(st, 200, "{d}");
    assert!(!d.contains("SECRET"), "a secret is shown: {d}");
    assert!(d.contains("[\"Authorization\",\"********\"]"), "{d}");
    assert!(d.contains("[\"X-Api-Key\",\"********\"]"), "{d}");
    assert!(d.contains("[\"X-Visible\",\"shown-value\"]"), "{d}");
    assert!(d.contains("\"path\":\"/echo?q=1\""), "{d}");
    assert!(d.contains("\"status\":200"), "{d}");
    // Both bodies: 200 bytes long, 64 kept.
    assert_eq!(json_numbers(&d, "body_len"), vec![200, 200], "{d}");
    assert_eq!(d.matches("\"body_truncated\":true").count(), 2, "{d}");
    assert!(d.contains("\"replayable\":false"), "{d}");
    // A cut body cannot be replayed exactly: refused, not faked.
    let (st, e) = s.post(&format!("/api/requests/{}/replay", ids[0]));
    assert_eq!(st, 409, "{e}");
    assert!(e.contains("--inspect-body-bytes"), "{e}");
}

#[test]
fn memory_stays_bounded_by_max_and_body_cap() {
    // Bound: --inspect-max records, each body at most --inspect-body-bytes.
    let s = Inspected::start(&["--inspect-max", "5", "--inspect-body-bytes", "100"]);
    // ASCII, so each kept byte is one character of the JSON string.
    let big = vec![b'a'; 100 * 1024];
    for i in 0..50 {
        let r = post_echo(s.public(), &format!("/echo?i={i}"), &big, "");
        assert_eq!(r.status, 200);
    }
    let t = Instant::now();
    let ids = loop {
        let ids = s.wait_ids("?path=/echo", 5);
        // The newest record is the last request's.
        let (_, l) = s.get("/api/requests");
        if l.contains("\"path\":\"/echo?i=49\"") {
            // Records are handed over as requests end, which can be a
            // moment after their client had the response: let the last
            // ones land.
            std::thread::sleep(Duration::from_millis(300));
            let _ = ids;
            break s.wait_ids("?path=/echo", 5);
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{l}");
        std::thread::sleep(Duration::from_millis(20));
    };
    for id in ids {
        let (_, d) = s.get(&format!("/api/requests/{id}"));
        assert_eq!(json_numbers(&d, "body_len"), vec![100 * 1024; 2], "{d}");
        // Each body string holds at most 100 bytes of the pattern (ASCII).
        for part in d.split("\"body\":\"").skip(1) {
            let body = &part[..part.find('"').unwrap()];
            assert!(body.len() <= 100, "{} bytes kept", body.len());
        }
    }
    let (_, l) = s.get("/api/requests");
    assert!(l.contains("\"max\":5"), "{l}");
}

#[test]
fn filters_by_status_and_path() {
    let s = Inspected::start(&[]);
    s.clear();
    for path in ["/status/404", "/status/503", "/bytes/10", "/status/201"] {
        let r = request(
            s.public(),
            &format!("GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"),
        );
        assert!(r.status > 0);
    }
    s.wait_ids("?path=/status/", 3);
    s.wait_ids("?path=/bytes/", 1);
    let (_, l) = s.get("/api/requests?status=4xx");
    assert_eq!(json_numbers(&l, "status"), vec![404], "{l}");
    let (_, l) = s.get("/api/requests?status=2xx");
    let st = json_numbers(&l, "status");
    assert!(st.starts_with(&[201, 200]), "{l}");
    assert!(st.iter().all(|&c| (200..300).contains(&c)), "{l}");
    let (_, l) = s.get("/api/requests?path=%2Fstatus%2F5");
    assert_eq!(json_numbers(&l, "status"), vec![503], "{l}");
    let (_, l) = s.get("/api/requests?status=503&path=/bytes");
    assert!(json_numbers(&l, "id").is_empty(), "{l}");
}

#[test]
fn replay_of_a_post_returns_the_backends_response() {
    let s = Inspected::start(&[]);
    s.clear();
    let r = post_echo(
        s.public(),
        "/echo",
        b"replay me",
        "Content-Type: text/plain\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"replay me");
    let ids = s.wait_ids("?path=/echo", 1);
    let (st, out) = s.post(&format!("/api/requests/{}/replay", ids[0]));
    assert_eq!(st, 200, "{out}");
    assert!(out.starts_with("{\"status\":200"), "{out}");
    assert!(out.contains("\"body\":\"replay me\""), "{out}");
    // Straight to the backend: the gateway saw one request, the tunnel
    // did not carry the replay (the inspector lists only the original).
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(s.wait_ids("?path=/echo", 1), ids);
    assert_eq!(s.post("/api/requests/999999/replay").0, 404);
}

#[test]
fn replay_with_the_backend_gone_says_so() {
    let mut s = Inspected::start(&[]);
    s.clear();
    let r = request(
        s.public(),
        "GET /headers HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let ids = s.wait_ids("?path=/headers", 1);
    let backend = s._echo.addr("listen");
    s._echo.kill();
    // An io_uring process's listener can outlive it by a moment (the ring
    // is torn down after exit): wait until connecting is refused.
    let t = Instant::now();
    while std::net::TcpStream::connect(backend).is_ok() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "backend still listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (st, out) = s.post(&format!("/api/requests/{}/replay", ids[0]));
    assert_eq!(st, 502, "{out}");
    assert!(out.contains("cannot connect to the backend"), "{out}");
    // The failed request through the tunnel is recorded with its reason.
    let r = request(
        s.public(),
        "GET /after HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 502);
    s.wait_ids("?path=/after", 1);
    let (_, l) = s.get("/api/requests?path=/after");
    assert!(l.contains("\"status\":502"), "{l}");
    assert!(l.contains("backend refused or unreachable"), "{l}");
}

#[test]
fn page_and_guards() {
    let s = Inspected::start(&[]);
    let (st, page) = s.get("/");
    assert_eq!(st, 200);
    assert!(page.contains("ringtunnel inspector"), "{page}");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no CDN"
    );
    // Another site's name (DNS rebinding) is refused.
    let r = request(
        s.inspector(),
        "GET /api/requests HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 403, "{}", r.text());
    // A form post (no JSON content type) cannot replay.
    let r = request(
        s.inspector(),
        "POST /api/requests/1/replay HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n",
    );
    assert_eq!(r.status, 415, "{}", r.text());
}

#[test]
fn misbehaving_inspector_clients_do_not_block_it() {
    let s = Inspected::start(&[]);
    let fds = s.agent.fd_count();
    // Garbage, then a client that connects and says nothing, then one
    // that sends a request and never reads: each is answered or dropped
    // within the per-connection deadline, and the next one is served.
    let r = request_bytes(s.inspector(), b"\x16\x03\x01garbage\r\n\r\n");
    assert_eq!(r.status, 400);
    let silent = connect(s.inspector());
    let mut deaf = connect(s.inspector());
    deaf.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let t = Instant::now();
    let (st, _) = s.get("/api/requests");
    assert_eq!(st, 200);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    drop((silent, deaf));
    // The agent holds no socket of theirs afterwards.
    wait_fds_at_most(&s.agent, fds);
    // Requests through the tunnel never waited on the inspector.
    let r = request(
        s.public(),
        "GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
}
