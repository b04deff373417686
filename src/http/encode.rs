//! Encoders: heads as they should be forwarded (hop-by-hop headers removed,
//! framing re-declared by us), chunk framing, and small complete responses
//! for errors. Everything writes into a `BytesMut`; nothing touches a socket.
//!
//! Framing headers from the other side are never copied: whoever forwards a
//! body states how it frames it, so a message can never carry two
//! conflicting descriptions of its length.

use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};

use super::head::{list_items, BodyKind, Headers, RequestHead, ResponseHead};

/// Ends the data of one chunk.
pub const CHUNK_TRAILER: &[u8] = b"\r\n";
/// The last chunk of a chunked body, with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Headers that describe one connection, not the message (RFC 9110 7.6.1),
/// plus the proxy ones that must not leak to the next hop.
pub fn is_hop_by_hop(name: &str) -> bool {
    const HOP: [&str; 9] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    ];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Request head as the backend should get it: request line (always
/// HTTP/1.1); every header except hop-by-hop ones, ones the `Connection`
/// header names, and `Content-Length`; then the framing header for
/// `head.body`; then `Connection: upgrade` + `Upgrade` when `head.upgrade`
/// is set; then each of `extra`; then the empty line.
///
/// `Host` is kept even when `Connection` names it, and added (from
/// `head.host`, possibly empty) when an HTTP/1.0 request had none: the
/// forwarded request is HTTP/1.1, which must carry one (RFC 9112 3.2).
pub fn encode_request_forward(head: &RequestHead, extra: &[(&str, &[u8])], dst: &mut BytesMut) {
    encode_request_forward_except(head, &[], extra, dst);
}

/// [`encode_request_forward`], also leaving out the headers named in
/// `drop` (case-insensitive): a proxy replaces some headers (e.g.
/// `X-Forwarded-Proto`) instead of passing the client's on, without
/// cloning the head to do so.
pub fn encode_request_forward_except(
    head: &RequestHead,
    drop: &[&str],
    extra: &[(&str, &[u8])],
    dst: &mut BytesMut,
) {
    dst.reserve(head.head_len + 64);
    dst.put_slice(head.method.as_bytes());
    dst.put_u8(b' ');
    dst.put_slice(head.target.as_bytes());
    dst.put_slice(b" HTTP/1.1\r\n");
    if head.header("host").is_none() {
        put_header(dst, "Host", head.host.as_deref().unwrap_or("").as_bytes());
    }
    let listed = ConnectionOptions::of(&head.headers);
    for (name, value) in &head.headers {
        let keep = name.eq_ignore_ascii_case("host")
            || !(is_hop_by_hop(name)
                || name.eq_ignore_ascii_case("content-length")
                || drop.iter().any(|d| name.eq_ignore_ascii_case(d))
                || listed.names(name));
        if keep {
            put_header(dst, name, value);
        }
    }
    put_framing(dst, head.body);
    if let Some(proto) = &head.upgrade {
        dst.put_slice(b"Connection: upgrade\r\n");
        put_header(dst, "Upgrade", proto.as_bytes());
    }
    for (name, value) in extra {
        put_header(dst, name, value);
    }
    dst.put_slice(b"\r\n");
}

/// Response head toward a client: `HTTP/1.1 <status> <reason>` (HTTP/1.0
/// for a 1.0 client); every header except hop-by-hop ones, ones the
/// `Connection` header names, and `Content-Length`; then framing per
/// `framing`; then the connection decision.
///
/// - `keep_content_length`: keep the backend's `Content-Length` when
///   `framing` is `Empty` or `Eof` (HEAD and 304 responses, whose length
///   describes the entity, not this message).
/// - status 101 keeps `Upgrade` and sends `Connection: upgrade`.
/// - otherwise `Connection: close` when `!keep_alive`, or
///   `Connection: keep-alive` for a 1.0 client that keeps alive.
///
/// A 1.0 client cannot take chunked framing: the caller passes `Eof` (and
/// closes) for it instead.
pub fn encode_response_forward(
    head: &ResponseHead,
    framing: BodyKind,
    keep_content_length: bool,
    client_version: u8,
    keep_alive: bool,
    dst: &mut BytesMut,
) {
    dst.reserve(head.head_len + 64);
    let reason = if head.reason.is_empty() {
        reason_phrase(head.status)
    } else {
        head.reason.as_str()
    };
    put_status_line(dst, client_version, head.status, reason);
    let switching = head.status == 101;
    let own_length = matches!(framing, BodyKind::Length(_));
    let mut kept_length = false;
    let listed = ConnectionOptions::of(&head.headers);
    for (name, value) in &head.headers {
        if name.eq_ignore_ascii_case("content-length") {
            // Several identical values are legal but one says it all.
            if keep_content_length && !own_length && !kept_length {
                put_header(dst, name, value);
                kept_length = true;
            }
            continue;
        }
        let upgrade_kept = switching && name.eq_ignore_ascii_case("upgrade");
        if upgrade_kept || !(is_hop_by_hop(name) || listed.names(name)) {
            put_header(dst, name, value);
        }
    }
    put_framing(dst, framing);
    put_connection(dst, switching, keep_alive, client_version);
    dst.put_slice(b"\r\n");
}

/// A response head we originate (echo server, errors): status line, the
/// given headers, framing per `framing`, connection decision as in
/// [`encode_response_forward`], empty line.
pub fn encode_response_head(
    status: u16,
    version: u8,
    framing: BodyKind,
    keep_alive: bool,
    headers: &[(&str, &[u8])],
    dst: &mut BytesMut,
) {
    put_status_line(dst, version, status, reason_phrase(status));
    for (name, value) in headers {
        put_header(dst, name, value);
    }
    put_framing(dst, framing);
    put_connection(dst, status == 101, keep_alive, version);
    dst.put_slice(b"\r\n");
}

/// `{len:x}\r\n`: the line before `len` bytes of chunk data.
pub fn encode_chunk_header(len: usize, dst: &mut BytesMut) {
    dst.reserve(18);
    let _ = write!(dst, "{len:x}\r\n");
}

/// A complete small plain-text response, for errors and the echo server.
/// `close` adds `Connection: close`. 1xx, 204 and 304 get no body.
pub fn simple_response(status: u16, body: &str, close: bool, extra: &[(&str, &str)]) -> Bytes {
    let mut dst = BytesMut::with_capacity(128 + body.len());
    let bodyless = (100..200).contains(&status) || status == 204 || status == 304;
    put_status_line(&mut dst, 1, status, reason_phrase(status));
    if !bodyless {
        dst.put_slice(b"Content-Type: text/plain; charset=utf-8\r\n");
    }
    for (name, value) in extra {
        put_header(&mut dst, name, value.as_bytes());
    }
    if !bodyless {
        put_framing(&mut dst, BodyKind::Length(body.len() as u64));
    }
    if close {
        dst.put_slice(b"Connection: close\r\n");
    }
    dst.put_slice(b"\r\n");
    if !bodyless {
        dst.put_slice(body.as_bytes());
    }
    dst.freeze()
}

/// The standard reason phrase, or "" for codes without one (the status
/// line stays valid: the phrase is optional).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        102 => "Processing",
        103 => "Early Hints",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        207 => "Multi-Status",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        418 => "I'm a teapot",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        425 => "Too Early",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        451 => "Unavailable For Legal Reasons",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

fn put_status_line(dst: &mut BytesMut, version: u8, status: u16, reason: &str) {
    dst.put_slice(if version == 0 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    // Status codes are three digits by construction of the parsers; keep
    // the line well-formed even if a caller passes something odd.
    let _ = write!(dst, "{:03} ", status.min(999));
    dst.put_slice(reason.as_bytes());
    dst.put_slice(b"\r\n");
}

fn put_header(dst: &mut BytesMut, name: &str, value: &[u8]) {
    dst.reserve(name.len() + value.len() + 4);
    dst.put_slice(name.as_bytes());
    dst.put_slice(b": ");
    dst.put_slice(value);
    dst.put_slice(b"\r\n");
}

fn put_framing(dst: &mut BytesMut, framing: BodyKind) {
    match framing {
        BodyKind::Length(n) => {
            let _ = write!(dst, "Content-Length: {n}\r\n");
        }
        BodyKind::Chunked => dst.put_slice(b"Transfer-Encoding: chunked\r\n"),
        BodyKind::Empty | BodyKind::Eof => {}
    }
}

fn put_connection(dst: &mut BytesMut, switching: bool, keep_alive: bool, version: u8) {
    if switching {
        dst.put_slice(b"Connection: upgrade\r\n");
    } else if !keep_alive {
        dst.put_slice(b"Connection: close\r\n");
    } else if version == 0 {
        dst.put_slice(b"Connection: keep-alive\r\n");
    }
}

/// The `Connection` headers of a head, for "does it list this name as a
/// connection option". Most heads have none, and then no field is looked
/// at again per forwarded header.
struct ConnectionOptions<'a> {
    headers: Option<&'a Headers>,
}

impl<'a> ConnectionOptions<'a> {
    fn of(headers: &'a Headers) -> Self {
        let any = headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("connection"));
        ConnectionOptions {
            headers: any.then_some(headers),
        }
    }

    /// Whether a `Connection` header lists `name`.
    fn names(&self, name: &str) -> bool {
        let Some(headers) = self.headers else {
            return false;
        };
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .any(|(_, v)| list_items(v).any(|token| token.eq_ignore_ascii_case(name.as_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::super::head::{parse_request, parse_response, DEFAULT_MAX_HEAD};
    use super::*;

    #[test]
    fn forward_except_drops_named_headers_only() {
        let raw = b"GET /a HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\nX-Keep: 1\r\nx-forwarded-host: evil\r\n\r\n";
        let head = crate::http::parse_request(raw, 4096).unwrap().unwrap();
        let mut dst = BytesMut::new();
        encode_request_forward_except(
            &head,
            &["X-Forwarded-Proto", "x-forwarded-host"],
            &[("X-Forwarded-Proto", b"http")],
            &mut dst,
        );
        let text = String::from_utf8(dst.to_vec()).unwrap();
        assert!(text.contains("X-Keep: 1\r\n"), "{text}");
        assert!(text.contains("X-Forwarded-Proto: http\r\n"), "{text}");
        assert!(!text.contains("https") && !text.contains("evil"), "{text}");
        assert!(text.starts_with("GET /a HTTP/1.1\r\nHost: h\r\n"), "{text}");
    }

    fn req(s: &str) -> RequestHead {
        parse_request(s.as_bytes(), DEFAULT_MAX_HEAD)
            .unwrap()
            .unwrap()
    }

    fn forward(s: &str, extra: &[(&str, &[u8])]) -> String {
        let mut dst = BytesMut::new();
        encode_request_forward(&req(s), extra, &mut dst);
        String::from_utf8(dst.to_vec()).unwrap()
    }

    #[test]
    fn hop_by_hop_names() {
        for n in [
            "Connection",
            "KEEP-ALIVE",
            "proxy-connection",
            "TE",
            "Trailer",
            "transfer-encoding",
            "Upgrade",
            "Proxy-Authenticate",
            "proxy-authorization",
        ] {
            assert!(is_hop_by_hop(n), "{n}");
        }
        for n in [
            "Host",
            "Content-Length",
            "X-Forwarded-For",
            "Trailers",
            "Tea",
        ] {
            assert!(!is_hop_by_hop(n), "{n}");
        }
    }

    #[test]
    fn request_forward_strips_and_reframes() {
        let out = forward(
            "POST /p?q HTTP/1.0\r\nHost: h\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nContent-Length: 3\r\nTE: trailers\r\nProxy-Authorization: x\r\nX-Keep: k\r\n\r\n",
            &[("X-Forwarded-For", b"1.2.3.4")],
        );
        assert_eq!(
            out,
            "POST /p?q HTTP/1.1\r\nHost: h\r\nX-Keep: k\r\nContent-Length: 3\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n"
        );
        let out = forward(
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
            &[],
        );
        assert_eq!(
            out,
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let out = forward(
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: close, host\r\n\r\n",
            &[],
        );
        assert_eq!(out, "GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    }

    #[test]
    fn request_forward_adds_host_for_http10() {
        let out = forward("GET / HTTP/1.0\r\nX: y\r\n\r\n", &[]);
        assert_eq!(out, "GET / HTTP/1.1\r\nHost: \r\nX: y\r\n\r\n");
        let back = parse_request(out.as_bytes(), DEFAULT_MAX_HEAD)
            .unwrap()
            .unwrap();
        assert_eq!(back.host, None);
        let out = forward("GET http://A.example:81/x HTTP/1.0\r\n\r\n", &[]);
        assert_eq!(
            out,
            "GET http://A.example:81/x HTTP/1.1\r\nHost: a.example\r\n\r\n"
        );
        assert!(parse_request(out.as_bytes(), DEFAULT_MAX_HEAD)
            .unwrap()
            .is_some());
    }

    #[test]
    fn request_forward_upgrade() {
        let out = forward("GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n", &[]);
        assert_eq!(out, "GET /ws HTTP/1.1\r\nHost: h\r\nSec-WebSocket-Key: k\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n");
    }

    #[test]
    fn request_forward_round_trip() {
        let src = "PUT http://Demo.Example/x HTTP/1.1\r\nhost: demo.example\r\nX-A: 1\r\nConnection: X-A, keep-alive\r\nX-B: two words\r\nX-B: again\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n";
        let orig = req(src);
        let mut dst = BytesMut::new();
        encode_request_forward(&orig, &[("X-Forwarded-Proto", b"http")], &mut dst);
        let back = parse_request(&dst, DEFAULT_MAX_HEAD).unwrap().unwrap();
        assert_eq!(back.head_len, dst.len());
        assert_eq!(
            (back.method.as_str(), back.target.as_str(), back.version),
            ("PUT", orig.target.as_str(), 1)
        );
        assert_eq!(back.body, orig.body);
        assert_eq!(back.host, orig.host);
        assert!(back.expect_continue);
        let want: Vec<(&str, &[u8])> = orig
            .headers
            .iter()
            .filter(|(n, _)| {
                !is_hop_by_hop(n)
                    && !n.eq_ignore_ascii_case("x-a")
                    && !n.eq_ignore_ascii_case("content-length")
            })
            .chain([
                ("Content-Length", &b"10"[..]),
                ("X-Forwarded-Proto", &b"http"[..]),
            ])
            .collect();
        assert_eq!(back.headers.iter().collect::<Vec<_>>(), want);
    }

    fn resp(s: &str, head: bool) -> ResponseHead {
        parse_response(s.as_bytes(), DEFAULT_MAX_HEAD, head)
            .unwrap()
            .unwrap()
    }

    fn rforward(s: &str, framing: BodyKind, keep_cl: bool, v: u8, ka: bool) -> String {
        let mut dst = BytesMut::new();
        encode_response_forward(&resp(s, false), framing, keep_cl, v, ka, &mut dst);
        String::from_utf8(dst.to_vec()).unwrap()
    }

    #[test]
    fn response_forward_framing() {
        let src = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\r\n";
        assert_eq!(
            rforward(src, BodyKind::Chunked, false, 1, true),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        assert_eq!(
            rforward(src, BodyKind::Eof, false, 0, false),
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
        );
        let src = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(
            rforward(src, BodyKind::Length(5), false, 1, true),
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        );
        assert_eq!(
            rforward(src, BodyKind::Length(5), true, 0, true),
            "HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n"
        );
        // HEAD / 304: the entity length survives though no body follows.
        assert_eq!(
            rforward(src, BodyKind::Empty, true, 1, true),
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        );
        assert_eq!(
            rforward(src, BodyKind::Empty, false, 1, true),
            "HTTP/1.1 200 OK\r\n\r\n"
        );
        assert_eq!(
            rforward("HTTP/1.1 599 \r\n\r\n", BodyKind::Empty, false, 1, true),
            "HTTP/1.1 599 \r\n\r\n"
        );
        assert_eq!(
            rforward("HTTP/1.1 404 \r\n\r\n", BodyKind::Empty, false, 1, true),
            "HTTP/1.1 404 Not Found\r\n\r\n"
        );
    }

    #[test]
    fn response_forward_switching_protocols() {
        let src = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: abc\r\n\r\n";
        let out = rforward(src, BodyKind::Empty, false, 1, true);
        assert_eq!(out, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: abc\r\nConnection: upgrade\r\n\r\n");
        let back = resp(&out, false);
        assert_eq!((back.status, back.body), (101, BodyKind::Empty));
    }

    #[test]
    fn response_forward_round_trip() {
        let src = "HTTP/1.1 201 Created\r\nLocation: /x\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 7\r\n\r\n";
        let orig = resp(src, false);
        let mut dst = BytesMut::new();
        encode_response_forward(&orig, orig.body, false, 1, orig.keep_alive, &mut dst);
        let back = parse_response(&dst, DEFAULT_MAX_HEAD, false)
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                back.status,
                back.reason.as_str(),
                back.body,
                back.keep_alive
            ),
            (201, "Created", BodyKind::Length(7), true)
        );
        assert_eq!(back.headers, orig.headers);
    }

    #[test]
    fn chunk_framing() {
        let mut dst = BytesMut::new();
        encode_chunk_header(0x1a2b, &mut dst);
        dst.put_slice(&[7; 0x1a2b]);
        dst.put_slice(CHUNK_TRAILER);
        encode_chunk_header(1, &mut dst);
        dst.put_slice(b"x");
        dst.put_slice(CHUNK_TRAILER);
        dst.put_slice(LAST_CHUNK);
        assert!(dst.starts_with(b"1a2b\r\n"));
        let mut dec = super::super::body::BodyDecoder::new(BodyKind::Chunked);
        let mut got = Vec::new();
        while let Some(b) = dec.decode(&mut dst, usize::MAX).unwrap() {
            got.extend_from_slice(&b);
        }
        assert!(dec.is_done() && dst.is_empty());
        assert_eq!(got.len(), 0x1a2b + 1);
        assert_eq!(got.last(), Some(&b'x'));
    }

    #[test]
    fn simple_responses() {
        let r = simple_response(
            502,
            "no agent connected for host demo.example\n",
            true,
            &[("Retry-After", "1")],
        );
        let s = std::str::from_utf8(&r).unwrap();
        assert_eq!(
            s,
            "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\nContent-Length: 41\r\nConnection: close\r\n\r\nno agent connected for host demo.example\n"
        );
        let head = parse_response(&r, DEFAULT_MAX_HEAD, false)
            .unwrap()
            .unwrap();
        assert_eq!(
            (head.status, head.body, head.keep_alive),
            (502, BodyKind::Length(41), false)
        );
        assert_eq!(
            &r[head.head_len..],
            b"no agent connected for host demo.example\n"
        );
        let r = simple_response(204, "ignored", false, &[]);
        assert_eq!(&r[..], b"HTTP/1.1 204 No Content\r\n\r\n");
    }

    #[test]
    fn own_response_heads() {
        let mut dst = BytesMut::new();
        encode_response_head(
            200,
            1,
            BodyKind::Length(3),
            true,
            &[("Content-Type", b"a/b")],
            &mut dst,
        );
        assert_eq!(
            &dst[..],
            b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nContent-Length: 3\r\n\r\n"
        );
        dst.clear();
        encode_response_head(200, 0, BodyKind::Eof, false, &[], &mut dst);
        assert_eq!(&dst[..], b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\n");
        dst.clear();
        encode_response_head(
            101,
            1,
            BodyKind::Empty,
            true,
            &[("Upgrade", b"websocket")],
            &mut dst,
        );
        assert_eq!(&dst[..], b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n");
    }

    #[test]
    fn reason_phrases() {
        assert_eq!(reason_phrase(200), "OK");
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
        assert_eq!(reason_phrase(299), "");
    }
}
