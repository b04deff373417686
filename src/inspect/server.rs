//! The inspector's HTTP side: the page at `/`, the JSON API under
//! `/api/`, and replay. One blocking service thread, one connection at a
//! time, each bounded like the admin endpoint's (a client that never sends
//! or never reads is dropped after [`crate::admin::CONN_DEADLINE`]).
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | the page (HTML + JS embedded in the binary) |
//! | `GET /api/requests?status=5xx&path=/api` | newest first, summaries; `status` is a code (`404`) or a class (`4xx`), `path` a substring |
//! | `GET /api/requests/ID` | one request: heads (secrets masked), body prefixes |
//! | `POST /api/requests/ID/replay` | sends it again to `--to`, answers with the backend's response |
//! | `DELETE /api/requests` | forgets every record |
//!
//! The API is for this machine's browser only: a request whose `Host` is
//! not a loopback name is refused (DNS rebinding), and POST/DELETE need
//! `Content-Type: application/json`, which a cross-site form cannot send
//! without a CORS preflight this server never grants.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::BytesMut;

use super::{BodyPrefix, Record, Store};
use crate::admin::CONN_DEADLINE;
use crate::http::BodyDecoder;

const PAGE: &str = include_str!("page.html");

/// A replayed request's backend gets this long to connect, and this long
/// to answer completely.
const REPLAY_CONNECT: Duration = Duration::from_secs(5);
const REPLAY_DEADLINE: Duration = Duration::from_secs(10);

/// Binds `store.cfg.listen` and serves until the process ends.
pub fn start(store: Arc<Store>) -> std::io::Result<SocketAddr> {
    let addr = store.cfg.listen.clone();
    crate::admin::serve_blocking("inspector", &addr, move |conn| handle(conn, &store))
}

struct Answer {
    status: u16,
    ctype: &'static str,
    body: String,
}

fn json(status: u16, body: String) -> Answer {
    Answer {
        status,
        ctype: "application/json",
        body,
    }
}

fn error(status: u16, why: &str) -> Answer {
    json(status, format!("{{\"error\":{}}}", js(why)))
}

fn handle(mut conn: TcpStream, store: &Store) {
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + CONN_DEADLINE;
    let got = crate::admin::read_head(&mut conn, &mut buf, deadline);
    let head = String::from_utf8_lossy(&buf[..got]);
    let a = answer(&head, store);
    let resp = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n{}",
        a.status,
        crate::http::reason_phrase(a.status),
        a.ctype,
        a.body.len(),
        a.body
    );
    crate::admin::write_until(&mut conn, resp.as_bytes(), Instant::now() + CONN_DEADLINE);
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// `localhost`, `*.localhost`, a loopback IP, with or without a port.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn answer(head: &str, store: &Store) -> Answer {
    let mut parts = head.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return error(400, "bad request");
    };
    if !header(head, "host").is_some_and(loopback_host) {
        return error(
            403,
            "the inspector answers only requests for a loopback Host (localhost, 127.0.0.1)",
        );
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let writes = matches!(method, "POST" | "DELETE");
    if writes
        && !header(head, "content-type")
            .is_some_and(|c| c.to_ascii_lowercase().starts_with("application/json"))
    {
        return error(415, "POST and DELETE need Content-Type: application/json");
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segs.as_slice()) {
        ("GET", [""]) => Answer {
            status: 200,
            ctype: "text/html; charset=utf-8",
            body: PAGE.to_string(),
        },
        ("GET", ["api", "requests"]) => json(200, list_json(store, query)),
        ("DELETE", ["api", "requests"]) => {
            store.clear();
            json(200, "{}".into())
        }
        ("GET", ["api", "requests", id]) => match id.parse().ok().and_then(|i| store.get(i)) {
            Some(r) => json(200, detail_json(store, &r)),
            None => error(
                404,
                "no such request (the inspector keeps the last --inspect-max)",
            ),
        },
        ("POST", ["api", "requests", id, "replay"]) => {
            match id.parse().ok().and_then(|i| store.get(i)) {
                Some(r) => replay(store, &r),
                None => error(404, "no such request"),
            }
        }
        _ => error(404, "not found: try / or /api/requests"),
    }
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v)
        })
        .filter(|v| !v.is_empty())
}

/// `%2F` and `+` as a browser encodes a query value.
fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push(h * 16 + l);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a shown status matches `4xx`, `404`, or `error` (no status).
fn status_matches(filter: &str, status: u16) -> bool {
    let f = filter.to_ascii_lowercase();
    match f.as_bytes() {
        [c, b'x', b'x'] => (status / 100) as u8 == c.wrapping_sub(b'0'),
        _ => f.parse::<u16>().is_ok_and(|s| s == status),
    }
}

fn list_json(store: &Store, query: &str) -> String {
    let status = query_param(query, "status").map(url_decode);
    let path = query_param(query, "path").map(url_decode);
    let mut out = String::from("{\"requests\":[");
    let mut first = true;
    for r in store.list() {
        if status
            .as_deref()
            .is_some_and(|f| !status_matches(f, r.shown_status()))
        {
            continue;
        }
        if path.as_deref().is_some_and(|p| !r.path.contains(p)) {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        summary(&mut out, &r);
        out.push('}');
    }
    let _ = write!(
        out,
        "],\"max\":{},\"body_bytes\":{},\"dropped\":{}}}",
        store.cfg.max,
        store.cfg.body_bytes,
        store.dropped.load(std::sync::atomic::Ordering::Relaxed)
    );
    out
}

/// The fields of a list entry, as an open JSON object.
fn summary(out: &mut String, r: &Record) {
    let at =
        r.at.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
    let _ = write!(
        out,
        "{{\"id\":{},\"at_ms\":{at},\"method\":{},\"path\":{},\"status\":{},\"error\":{},\
         \"ms\":{:.3},\"req_bytes\":{},\"resp_bytes\":{}",
        r.id,
        js(&r.method),
        js(&r.path),
        r.shown_status(),
        r.error.as_deref().map_or("null".into(), js),
        r.ms,
        r.req_body.total,
        r.resp_body.total,
    );
}

fn detail_json(store: &Store, r: &Record) -> String {
    let mut out = String::new();
    summary(&mut out, r);
    let _ = write!(
        out,
        ",\"request\":{},\"response\":{},\"replayable\":{}}}",
        message_json(store, &r.req_head, &r.req_body),
        message_json(store, &r.resp_head, &r.resp_body),
        replay_refusal(r).is_none()
    );
    out
}

/// A head's start line and masked headers, and a body prefix.
fn message_json(store: &Store, head: &[u8], body: &BodyPrefix) -> String {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let start = lines.next().unwrap_or("");
    let mut out = format!("{{\"start\":{},\"headers\":[", js(start));
    let mut first = true;
    for l in lines.filter(|l| !l.is_empty()) {
        let (n, v) = l.split_once(':').unwrap_or((l, ""));
        let v = if store.masked(n.trim()) {
            "********"
        } else {
            v.trim()
        };
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "[{},{}]", js(n.trim()), js(v));
    }
    let _ = write!(
        out,
        "],\"body\":{},\"body_len\":{},\"body_truncated\":{}}}",
        js(&String::from_utf8_lossy(&body.bytes)),
        body.total,
        body.truncated()
    );
    out
}

/// JSON string literal.
fn js(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    crate::bench::report::push_str_json(&mut out, s);
    out
}

/// Why a record cannot be sent again as it was, if so.
fn replay_refusal(r: &Record) -> Option<&'static str> {
    if r.req_head_truncated {
        return Some("its head was longer than the inspector keeps (16 KiB)");
    }
    if r.req_body.truncated() {
        return Some("its body was longer than --inspect-body-bytes");
    }
    None
}

/// The stored request with its framing rewritten for the stored body:
/// `Content-Length` of the body kept, `Connection: close`.
fn replay_bytes(r: &Record) -> Vec<u8> {
    let text = String::from_utf8_lossy(&r.req_head);
    let mut lines = text.split("\r\n");
    let mut out = String::new();
    out.push_str(lines.next().unwrap_or(""));
    out.push_str("\r\n");
    for l in lines.filter(|l| !l.is_empty()) {
        let name = l.split(':').next().unwrap_or("").trim();
        let framing = [
            "content-length",
            "transfer-encoding",
            "connection",
            "keep-alive",
            "expect",
        ];
        if framing.iter().any(|f| f.eq_ignore_ascii_case(name)) {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    if r.req_body.total > 0 || matches!(r.method.as_str(), "POST" | "PUT" | "PATCH") {
        let _ = write!(out, "Content-Length: {}\r\n", r.req_body.bytes.len());
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&r.req_body.bytes);
    bytes
}

/// Sends the request again, straight to the backend (never through the
/// gateway), and shows what came back like a record.
fn replay(store: &Store, r: &Record) -> Answer {
    if let Some(why) = replay_refusal(r) {
        return error(409, &format!("cannot replay this request exactly: {why}"));
    }
    let started = Instant::now();
    let mut conn = match TcpStream::connect_timeout(&store.backend, REPLAY_CONNECT) {
        Ok(c) => c,
        Err(e) => {
            return error(
                502,
                &format!("cannot connect to the backend {}: {e}", store.backend),
            )
        }
    };
    let deadline = started + REPLAY_DEADLINE;
    let _ = conn.set_write_timeout(Some(REPLAY_DEADLINE));
    if let Err(e) = conn.write_all(&replay_bytes(r)) {
        return error(502, &format!("sending to the backend failed: {e}"));
    }
    // Keep the head and the first body bytes; read the rest only to see
    // the end, up to the deadline.
    let keep = super::HEAD_CAP + store.cfg.body_bytes;
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut seen = 0u64;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let _ = conn.set_read_timeout(Some(left));
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                seen += n as u64;
                let room = keep.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let head = match crate::http::parse_response(&buf, super::HEAD_CAP, r.method == "HEAD") {
        Ok(Some(h)) => h,
        _ => {
            return error(
                502,
                &format!("the backend sent no valid response head ({seen} bytes in {ms:.0} ms)"),
            )
        }
    };
    let raw_head = buf.split_to(head.head_len).freeze();
    let mut body = BodyPrefix::default();
    let mut dec = BodyDecoder::new(head.body);
    while let Ok(Some(piece)) = dec.decode(&mut buf, 64 * 1024) {
        body.take(&piece, store.cfg.body_bytes);
    }
    let mut out = format!("{{\"status\":{},\"ms\":{ms:.3},", head.status);
    let _ = write!(
        out,
        "\"response\":{}}}",
        message_json(store, &raw_head, &body)
    );
    json(200, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        assert!(status_matches("5xx", 502));
        assert!(status_matches("5XX", 500));
        assert!(!status_matches("5xx", 404));
        assert!(status_matches("404", 404));
        assert!(!status_matches("404", 405));
        assert!(!status_matches("x", 404));
        assert_eq!(url_decode("%2Fapi+x%zz"), "/api x%zz");
        assert_eq!(query_param("a=1&status=4xx", "status"), Some("4xx"));
        assert_eq!(query_param("status=", "status"), None);
    }

    #[test]
    fn hosts() {
        for h in [
            "localhost:4040",
            "127.0.0.1:4040",
            "[::1]:4040",
            "app.localhost",
            "127.0.0.1",
        ] {
            assert!(loopback_host(h), "{h}");
        }
        for h in ["evil.example:4040", "10.0.0.1:4040", "localhost.evil.com"] {
            assert!(!loopback_host(h), "{h}");
        }
    }

    #[test]
    fn json_strings_cannot_break_out() {
        assert_eq!(
            js("a\"b\\c\n</script>\u{1}"),
            "\"a\\\"b\\\\c\\n\\u003c/script>\\u0001\""
        );
    }
}
