//! Request and response heads: find the end of the head, parse it with
//! httparse, then decide framing, persistence and routing facts once so the
//! rest of the crate never re-reads raw header text.
//!
//! Requests come from the public internet and are validated strictly: every
//! ambiguity a proxy and a backend could resolve differently (the classic
//! request-smuggling vectors) is an error here. Responses come from backends
//! we forward for, so they are parsed leniently where the result is still
//! unambiguous, but never panic.

use std::fmt;

/// Size of the fixed httparse header array; more headers is an error.
pub const MAX_HEADERS: usize = 100;
/// Default cap on the size of a request or response head.
pub const DEFAULT_MAX_HEAD: usize = 64 * 1024;

/// How the body after a head is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// No body at all.
    Empty,
    /// Exactly this many bytes (`Content-Length`). `Length(0)` is kept
    /// distinct from `Empty` so that forwarding preserves an explicit
    /// `Content-Length: 0`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the peer closes (responses only).
    Eof,
}

/// A validated request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// Minor version: 0 = HTTP/1.0, 1 = HTTP/1.1.
    pub version: u8,
    /// As received, in order, with the original name case.
    pub headers: Headers,
    /// `Empty`, `Length(n)` or `Chunked`; never `Eof` for a request.
    pub body: BodyKind,
    /// HTTP/1.1: on unless `Connection: close`; HTTP/1.0: off unless
    /// `Connection: keep-alive`.
    pub keep_alive: bool,
    /// `Expect: 100-continue` on an HTTP/1.1 request.
    pub expect_continue: bool,
    /// The `Upgrade` header value when `Connection` carries the `upgrade`
    /// token (HTTP/1.1 only).
    pub upgrade: Option<String>,
    /// Authority of an absolute-form target, else the `Host` header; port
    /// removed, lowercased; `None` when absent or empty.
    pub host: Option<String>,
    /// Bytes of the head including the final empty line.
    pub head_len: usize,
}

impl RequestHead {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.get(name)
    }

    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

/// A parsed response head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    /// Minor version: 0 = HTTP/1.0, 1 = HTTP/1.1.
    pub version: u8,
    pub status: u16,
    pub reason: String,
    /// As received, in order, with the original name case.
    pub headers: Headers,
    pub body: BodyKind,
    /// Whether the backend connection may carry another request after this
    /// response. Always false for `Eof` bodies.
    pub keep_alive: bool,
    /// Bytes of the head including the final empty line.
    pub head_len: usize,
}

impl ResponseHead {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.get(name)
    }
}

/// Why a head was rejected. Each maps to one status via [`HeadError::status`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// No end of head within the limit: 431.
    TooLarge,
    /// Not HTTP/1.x syntax, or a field we must understand is invalid: 400.
    Malformed(&'static str),
    /// More than [`MAX_HEADERS`] fields: 431.
    TooManyHeaders,
    /// Framing two parsers could read differently (CL with TE, conflicting
    /// CLs, a TE whose final coding is not chunked, ...): 400.
    Smuggling(&'static str),
    /// A request TE ending in chunked with another coding before it, which
    /// we do not implement (RFC 9112 6.1): 501. The body length is still
    /// unambiguous, so this is not a framing error.
    UnsupportedTransferEncoding,
    /// A well-formed HTTP version other than 1.0 and 1.1: 505.
    VersionNotSupported,
}

impl HeadError {
    /// The status to answer a client with.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => 431,
            HeadError::UnsupportedTransferEncoding => 501,
            HeadError::VersionNotSupported => 505,
            HeadError::Malformed(_) | HeadError::Smuggling(_) => 400,
        }
    }
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::TooLarge => f.write_str("head too large"),
            HeadError::Malformed(why) => write!(f, "malformed head: {why}"),
            HeadError::TooManyHeaders => f.write_str("too many headers"),
            HeadError::Smuggling(why) => write!(f, "ambiguous framing: {why}"),
            HeadError::UnsupportedTransferEncoding => f.write_str("unsupported transfer-encoding"),
            HeadError::VersionNotSupported => f.write_str("HTTP version not supported"),
        }
    }
}

impl std::error::Error for HeadError {}

/// Parse a request head from the front of `buf`.
///
/// `Ok(None)` means the head is incomplete; call again with more bytes.
/// `Err(TooLarge)` once `max_head` bytes hold no end of head.
pub fn parse_request(buf: &[u8], max_head: usize) -> Result<Option<RequestHead>, HeadError> {
    // Judged first, so a head decides the same whether it is complete, cut
    // short or too large.
    if bad_method_prefix(buf) {
        return Err(HeadError::Malformed("not an HTTP request (bad method)"));
    }
    let Some(end) = find_head_end(buf, max_head)? else {
        return Ok(None);
    };
    let raw = &buf[..end];
    // httparse accepts a bare LF as a line end; a proxy that does while the
    // backend does not (or the reverse) is a smuggling vector.
    if has_bare_lf(raw) {
        return Err(HeadError::Malformed("bare LF in head"));
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(raw) {
        Ok(httparse::Status::Complete(n)) if n == end => {}
        Ok(_) => return Err(HeadError::Malformed("incomplete head")),
        Err(httparse::Error::Version) => return Err(version_error(raw, true)),
        Err(e) => return Err(map_httparse(e)),
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed("incomplete request line"));
    };
    let headers = collect_headers(raw.len(), req.headers);
    let facts = HeaderFacts::scan(&headers)?;

    // RFC 9112 6.1: HTTP/1.0 has no chunked coding, so a TE on a 1.0
    // request means the sender and we may disagree about the body.
    if facts.has_te && version == 0 {
        return Err(HeadError::Smuggling("transfer-encoding on HTTP/1.0"));
    }
    if facts.has_te && facts.content_length.is_some() {
        return Err(HeadError::Smuggling(
            "content-length with transfer-encoding",
        ));
    }
    let body = if facts.has_te {
        // Framing errors (400) before the 501: RFC 9112 6.3 says a request
        // whose final coding is not chunked has no reliable length at all.
        match facts.te_final {
            TeFinal::Empty => return Err(HeadError::Malformed("empty transfer-encoding")),
            TeFinal::Other => {
                return Err(HeadError::Smuggling(
                    "transfer-encoding does not end in chunked",
                ))
            }
            TeFinal::Chunked if facts.te_chunked_count > 1 => {
                return Err(HeadError::Smuggling("chunked applied more than once"));
            }
            TeFinal::Chunked if !facts.te_only_chunked => {
                return Err(HeadError::UnsupportedTransferEncoding)
            }
            TeFinal::Chunked => BodyKind::Chunked,
        }
    } else {
        match facts.content_length {
            Some(n) => BodyKind::Length(n),
            None => BodyKind::Empty,
        }
    };

    if facts.host_count > 1 {
        return Err(HeadError::Malformed("several Host headers"));
    }
    if version == 1 && facts.host_count == 0 {
        return Err(HeadError::Malformed("missing Host"));
    }
    let host_header = match facts.host {
        Some(i) => host_of_authority(headers.field(i).1)?,
        None => None,
    };
    let host = match authority_of(target) {
        Some(auth) => {
            let auth_host = host_of_authority(auth.as_bytes())?;
            // RFC 9112 3.2.2 lets the target's authority win over Host, but
            // a backend or a cache behind us may read Host instead: two
            // names for one request is how routing gets bypassed. Port and
            // case are not part of the comparison (neither is in `host`).
            if facts.host.is_some() && auth_host != host_header {
                return Err(HeadError::Malformed(
                    "absolute-form target and Host name different hosts",
                ));
            }
            auth_host
        }
        None => host_header,
    };

    let keep_alive = if version == 1 {
        !facts.conn_close
    } else {
        facts.conn_keep_alive && !facts.conn_close
    };
    let expect_continue = version == 1 && facts.expect_continue;
    let upgrade = match facts.upgrade {
        Some(i) if version == 1 && facts.conn_upgrade => {
            let v = trim_ows(headers.field(i).1);
            if v.is_empty() {
                None
            } else {
                let s = std::str::from_utf8(v)
                    .map_err(|_| HeadError::Malformed("non-ASCII Upgrade"))?;
                Some(s.to_owned())
            }
        }
        _ => None,
    };

    Ok(Some(RequestHead {
        method: method.to_owned(),
        target: target.to_owned(),
        version,
        headers,
        body,
        keep_alive,
        expect_continue,
        upgrade,
        host,
        head_len: end,
    }))
}

/// Parse a response head from the front of `buf`.
///
/// `req_method_head`: the request was HEAD, so the body is `Empty` whatever
/// the headers say. 1xx, 204 and 304 are `Empty` too. Otherwise chunked
/// (which wins over `Content-Length`, RFC 9112 6.3), then `Content-Length`,
/// then read-until-close.
pub fn parse_response(
    buf: &[u8],
    max_head: usize,
    req_method_head: bool,
) -> Result<Option<ResponseHead>, HeadError> {
    let Some(end) = find_head_end(buf, max_head)? else {
        return Ok(None);
    };
    let raw = &buf[..end];
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) if n == end => {}
        Ok(_) => return Err(HeadError::Malformed("incomplete head")),
        Err(httparse::Error::Version) => return Err(version_error(raw, false)),
        Err(e) => return Err(map_httparse(e)),
    }
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(HeadError::Malformed("incomplete status line"));
    };
    let reason = resp.reason.unwrap_or("").to_owned();
    let headers = collect_headers(raw.len(), resp.headers);
    let facts = HeaderFacts::scan(&headers)?;

    let body = if req_method_head || (100..200).contains(&status) || status == 204 || status == 304
    {
        BodyKind::Empty
    } else if facts.has_te {
        // A response whose final coding is not chunked can only end at EOF.
        match facts.te_final {
            TeFinal::Chunked => BodyKind::Chunked,
            _ => BodyKind::Eof,
        }
    } else {
        match facts.content_length {
            Some(n) => BodyKind::Length(n),
            None => BodyKind::Eof,
        }
    };
    let keep_alive = body != BodyKind::Eof
        && if version == 1 {
            !facts.conn_close
        } else {
            facts.conn_keep_alive && !facts.conn_close
        };

    Ok(Some(ResponseHead {
        version,
        status,
        reason,
        headers,
        body,
        keep_alive,
        head_len: end,
    }))
}

/// Offset just past the empty line ending the head, looking no further than
/// `max_head` bytes. Leading empty lines (stray CRLF after a previous body,
/// which RFC 9112 2.2 says to ignore) are part of the head.
fn find_head_end(buf: &[u8], max_head: usize) -> Result<Option<usize>, HeadError> {
    let window = &buf[..buf.len().min(max_head)];
    let mut start = 0;
    loop {
        if window[start..].starts_with(b"\r\n") {
            start += 2;
        } else if window[start..].starts_with(b"\n") {
            start += 1;
        } else {
            break;
        }
    }
    let mut from = start;
    while let Some(off) = window[from..].iter().position(|&b| b == b'\n') {
        let lf = from + off;
        let rest = &window[lf + 1..];
        if rest.starts_with(b"\r\n") {
            return Ok(Some(lf + 3));
        }
        if rest.starts_with(b"\n") {
            return Ok(Some(lf + 2));
        }
        if rest.is_empty() || rest == b"\r" {
            break;
        }
        from = lf + 1;
    }
    if buf.len() >= max_head {
        Err(HeadError::TooLarge)
    } else {
        Ok(None)
    }
}

fn has_bare_lf(raw: &[u8]) -> bool {
    raw.iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || raw[i - 1] != b'\r'))
}

fn map_httparse(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        httparse::Error::HeaderName => HeadError::Malformed("invalid header name"),
        httparse::Error::HeaderValue => HeadError::Malformed("invalid header value"),
        httparse::Error::NewLine => HeadError::Malformed("invalid line ending"),
        httparse::Error::Status => HeadError::Malformed("invalid status"),
        httparse::Error::Token => HeadError::Malformed("invalid token"),
        httparse::Error::Version => HeadError::Malformed("invalid version"),
    }
}

/// httparse reports any version other than 1.0/1.1 as `Version`; tell a
/// well-formed line with an unsupported version (505) from garbage (400).
fn version_error(raw: &[u8], request: bool) -> HeadError {
    let start = raw
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(0);
    let line = &raw[start..];
    let line = &line[..line
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(line.len())];
    let mut parts = line.split(|&b| b == b' ');
    let version = if request {
        // Exactly `method SP target SP version`, else it is not a version
        // problem but a malformed request line.
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(_), Some(_), Some(v), None) => v,
            _ => b"",
        }
    } else {
        parts.next().unwrap_or(b"")
    };
    if looks_like_http_version(version) {
        HeadError::VersionNotSupported
    } else {
        HeadError::Malformed("invalid version")
    }
}

fn looks_like_http_version(tok: &[u8]) -> bool {
    match tok.strip_prefix(b"HTTP/") {
        Some([major]) => major.is_ascii_digit(),
        Some([major, b'.', minor]) => major.is_ascii_digit() && minor.is_ascii_digit(),
        _ => false,
    }
}

/// The header fields of a parsed head, in order, with the original name
/// case: their names and values copied once into one buffer, each field
/// kept as offsets into it.
///
/// Heads are parsed on every hop of every request (the gateway parses the
/// client's request and the agent's response, the agent the forwarded
/// request and the backend's response), so this is a hot path: one
/// allocation for all the fields' bytes and one for the offsets, where a
/// `String` per name and a shared `Bytes` slice per value cost an
/// allocation and two atomic counts per field (issue 9's profile).
#[derive(Clone, Default)]
pub struct Headers {
    buf: Vec<u8>,
    fields: Vec<Field>,
}

/// Offsets of one field in `Headers::buf`: the name is
/// `buf[start..mid]`, the value `buf[mid..end]`.
#[derive(Clone, Copy)]
struct Field {
    start: u32,
    mid: u32,
    end: u32,
}

impl Headers {
    /// Fields from names and values; the parser's and tests' constructor.
    pub fn from_pairs<'a, I, V>(pairs: I) -> Headers
    where
        I: IntoIterator<Item = (&'a str, V)>,
        V: AsRef<[u8]>,
    {
        let pairs = pairs.into_iter();
        let mut h = Headers {
            buf: Vec::new(),
            fields: Vec::with_capacity(pairs.size_hint().0),
        };
        for (name, value) in pairs {
            h.push(name, value.as_ref());
        }
        h
    }

    fn push(&mut self, name: &str, value: &[u8]) {
        // Heads are capped far below 4 GiB (`max_head`), so the offsets fit.
        let start = self.buf.len() as u32;
        self.buf.extend_from_slice(name.as_bytes());
        let mid = self.buf.len() as u32;
        self.buf.extend_from_slice(value);
        let end = self.buf.len() as u32;
        self.fields.push(Field { start, mid, end });
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Name and value of field `i` (in the order received).
    pub fn field(&self, i: usize) -> (&str, &[u8]) {
        let f = self.fields[i];
        let name = &self.buf[f.start as usize..f.mid as usize];
        // SAFETY: `push` is the only writer of `buf` and `fields`: it copies
        // every name from a `&str`, and nothing mutates `buf` afterwards, so
        // `buf[start..mid]` is exactly the bytes of a `str`.
        let name = unsafe { std::str::from_utf8_unchecked(name) };
        (name, &self.buf[f.mid as usize..f.end as usize])
    }

    pub fn iter(&self) -> HeaderIter<'_> {
        HeaderIter {
            headers: self,
            next: 0,
        }
    }

    /// Value of the first field with this name (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

/// The fields of a [`Headers`], in order.
#[derive(Clone)]
pub struct HeaderIter<'a> {
    headers: &'a Headers,
    next: usize,
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a str, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.headers.len() {
            return None;
        }
        self.next += 1;
        Some(self.headers.field(self.next - 1))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.headers.len() - self.next;
        (left, Some(left))
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a str, &'a [u8]);
    type IntoIter = HeaderIter<'a>;

    fn into_iter(self) -> HeaderIter<'a> {
        self.iter()
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Headers) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Headers {}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.iter()
                    .map(|(n, v)| (n, String::from_utf8_lossy(v).into_owned())),
            )
            .finish()
    }
}

fn collect_headers(head_len: usize, raw: &[httparse::Header<'_>]) -> Headers {
    let mut h = Headers {
        buf: Vec::with_capacity(head_len),
        fields: Vec::with_capacity(raw.len()),
    };
    for f in raw {
        h.push(f.name, f.value);
    }
    h
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TeFinal {
    Empty,
    Chunked,
    Other,
}

/// Everything framing, persistence and routing need, from one pass over
/// the headers.
struct HeaderFacts {
    content_length: Option<u64>,
    has_te: bool,
    te_final: TeFinal,
    te_only_chunked: bool,
    te_chunked_count: u32,
    host_count: u32,
    host: Option<usize>,
    conn_close: bool,
    conn_keep_alive: bool,
    conn_upgrade: bool,
    upgrade: Option<usize>,
    expect_continue: bool,
}

impl HeaderFacts {
    fn scan(headers: &Headers) -> Result<Self, HeadError> {
        let mut f = HeaderFacts {
            content_length: None,
            has_te: false,
            te_final: TeFinal::Empty,
            te_only_chunked: true,
            te_chunked_count: 0,
            host_count: 0,
            host: None,
            conn_close: false,
            conn_keep_alive: false,
            conn_upgrade: false,
            upgrade: None,
            expect_continue: false,
        };
        for (i, (name, value)) in headers.iter().enumerate() {
            if name.eq_ignore_ascii_case("content-length") {
                for item in list_items(value) {
                    let n = parse_content_length(item)?;
                    match f.content_length {
                        Some(prev) if prev != n => {
                            return Err(HeadError::Smuggling("conflicting content-length"));
                        }
                        _ => f.content_length = Some(n),
                    }
                }
                if f.content_length.is_none() {
                    return Err(HeadError::Malformed("empty content-length"));
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                f.has_te = true;
                for coding in list_items(value) {
                    if coding.eq_ignore_ascii_case(b"chunked") {
                        f.te_final = TeFinal::Chunked;
                        f.te_chunked_count += 1;
                    } else {
                        f.te_final = TeFinal::Other;
                        f.te_only_chunked = false;
                    }
                }
            } else if name.eq_ignore_ascii_case("host") {
                f.host_count += 1;
                f.host.get_or_insert(i);
            } else if name.eq_ignore_ascii_case("connection") {
                for token in list_items(value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        f.conn_close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        f.conn_keep_alive = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        f.conn_upgrade = true;
                    }
                }
            } else if name.eq_ignore_ascii_case("upgrade") {
                f.upgrade.get_or_insert(i);
            } else if name.eq_ignore_ascii_case("expect") {
                f.expect_continue |= trim_ows(value).eq_ignore_ascii_case(b"100-continue");
            }
        }
        Ok(f)
    }
}

fn parse_content_length(item: &[u8]) -> Result<u64, HeadError> {
    if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
        return Err(HeadError::Malformed("invalid content-length"));
    }
    item.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(d - b'0')))
            .ok_or(HeadError::Malformed("content-length overflow"))
    })
}

/// Non-empty elements of a comma-separated header list, OWS trimmed
/// (RFC 9110 5.6.1: recipients ignore empty elements).
pub(crate) fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|s| !s.is_empty())
}

pub(crate) fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// The authority of an absolute-form target (`http://host:port/path`).
fn authority_of(target: &str) -> Option<&str> {
    let scheme_end = target.find("://")?;
    let scheme = &target[..scheme_end];
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return None;
    }
    let rest = &target[scheme_end + 3..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Lowercased host of an authority (`[userinfo@]host[:port]`), without the
/// port. Rejects bytes that cannot appear in a host so that routing never
/// sees a name the backend would read differently.
fn host_of_authority(auth: &[u8]) -> Result<Option<String>, HeadError> {
    const BAD: HeadError = HeadError::Malformed("invalid host");
    let auth = trim_ows(auth);
    let auth = match auth.iter().rposition(|&b| b == b'@') {
        Some(at) => &auth[at + 1..],
        None => auth,
    };
    let (host, port) = if let Some(inner) = auth.strip_prefix(b"[") {
        let close = inner.iter().position(|&b| b == b']').ok_or(BAD)?;
        let literal = &inner[..close];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(BAD);
        }
        (&auth[..close + 2], &inner[close + 1..])
    } else {
        match auth.iter().position(|&b| b == b':') {
            Some(colon) => (&auth[..colon], &auth[colon..]),
            None => (auth, &b""[..]),
        }
    };
    if let Some(digits) = port.strip_prefix(b":") {
        if !digits.iter().all(u8::is_ascii_digit) {
            return Err(BAD);
        }
    } else if !port.is_empty() {
        return Err(BAD);
    }
    if !host.starts_with(b"[") && !host.iter().all(|&b| is_reg_name_byte(b)) {
        return Err(BAD);
    }
    if host.is_empty() {
        return Ok(None);
    }
    let mut s = String::with_capacity(host.len());
    s.extend(host.iter().map(|&b| char::from(b.to_ascii_lowercase())));
    Ok(Some(s))
}

/// RFC 3986 reg-name: unreserved / pct-encoded / sub-delims.
fn is_reg_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b)
}

/// Longest method judged by [`bad_method_prefix`]; real ones are far
/// shorter.
const MAX_METHOD: usize = 32;

/// Whether the start of an incomplete head already cannot be a request: the
/// method is a token (RFC 9110 §9), so a first byte outside it (a TLS
/// ClientHello on a plain port, binary noise) is refused at once instead of
/// after `--header-timeout`. Empty lines before the request line are
/// allowed (RFC 9112 §2.2).
fn bad_method_prefix(buf: &[u8]) -> bool {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let rest = &buf[start..];
    let method_end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
    method_end > MAX_METHOD
        || !rest[..method_end]
            .iter()
            .all(|&b| crate::http::body::is_tchar(b))
}

#[cfg(test)]
mod tests {
    use bytes::{Buf, BytesMut};

    use super::*;
    use crate::http::body::{BodyDecoder, BodyError};

    fn req(s: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request(s.as_bytes(), DEFAULT_MAX_HEAD)
    }

    fn ok(s: &str) -> RequestHead {
        req(s).expect("parse error").expect("incomplete")
    }

    fn err(s: &str) -> HeadError {
        req(s).expect_err("expected an error")
    }

    #[test]
    fn a_non_request_is_refused_before_its_head_ends() {
        // A TLS ClientHello's first bytes, binary noise, a too-long method.
        for bad in [
            &b"\x16\x03\x01\x02\x00\x01"[..],
            b"\x00\x01garbage",
            b"GE\x7fT / HTTP/1.1",
            &[b'A'; 40][..],
        ] {
            assert_eq!(
                parse_request(bad, DEFAULT_MAX_HEAD),
                Err(HeadError::Malformed("not an HTTP request (bad method)")),
                "{bad:?}"
            );
        }
        // Prefixes of real requests, with the empty lines RFC 9112 allows.
        for fine in [
            &b"GE"[..],
            b"GET",
            b"GET /x HTTP/1.1\r\nHo",
            b"\r\nPOST ",
            b"",
        ] {
            assert_eq!(parse_request(fine, DEFAULT_MAX_HEAD), Ok(None), "{fine:?}");
        }
    }

    #[test]
    fn simple_get() {
        let h = ok("GET /a?b=c HTTP/1.1\r\nHost: Example.COM:8080\r\nX-A: 1\r\n\r\nrest");
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, "/a?b=c");
        assert_eq!(h.version, 1);
        assert_eq!(h.body, BodyKind::Empty);
        assert!(h.keep_alive);
        assert!(!h.expect_continue);
        assert_eq!(h.upgrade, None);
        assert_eq!(h.host.as_deref(), Some("example.com"));
        assert_eq!(
            h.head_len,
            "GET /a?b=c HTTP/1.1\r\nHost: Example.COM:8080\r\nX-A: 1\r\n\r\n".len()
        );
        assert_eq!(h.header("x-a"), Some(&b"1"[..]));
        assert_eq!(h.header("X-B"), None);
        assert_eq!(h.headers.len(), 2);
        assert_eq!(h.headers.field(0).0, "Host");
        assert!(!h.is_head());
    }

    #[test]
    fn incomplete_at_every_prefix() {
        let full = "POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n";
        for i in 0..full.len() {
            assert_eq!(
                req(&full[..i]).unwrap().map(|h| h.head_len),
                None,
                "prefix {i}"
            );
        }
        assert_eq!(ok(full).body, BodyKind::Length(3));
    }

    #[test]
    fn too_large() {
        let mut s = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
        while s.len() < 200 {
            s.push_str("X-Pad: aaaaaaaaaa\r\n");
        }
        assert_eq!(
            parse_request(s.as_bytes(), 100).unwrap_err(),
            HeadError::TooLarge
        );
        assert!(matches!(parse_request(&s.as_bytes()[..99], 100), Ok(None)));
        s.push_str("\r\n");
        assert!(parse_request(s.as_bytes(), s.len()).unwrap().is_some());
        assert_eq!(
            parse_request(s.as_bytes(), s.len() - 1).unwrap_err(),
            HeadError::TooLarge
        );
        assert_eq!(HeadError::TooLarge.status(), 431);
    }

    #[test]
    fn headers_keep_order_case_and_raw_values() {
        // obs-text (0x80-0xff) in a value is legal and must pass unchanged;
        // an empty value and a repeated name are kept as they came.
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Bin: caf\xe9\r\nX-Empty:\r\nx-bin: 2\r\n\r\n";
        let h = parse_request(raw, DEFAULT_MAX_HEAD).unwrap().unwrap();
        let got: Vec<(&str, &[u8])> = h.headers.iter().collect();
        let want: Vec<(&str, &[u8])> = vec![
            ("Host", b"a"),
            ("X-Bin", b"caf\xe9"),
            ("X-Empty", b""),
            ("x-bin", b"2"),
        ];
        assert_eq!(got, want);
        assert_eq!(h.headers.len(), 4);
        assert_eq!(h.header("X-BIN"), Some(&b"caf\xe9"[..]));
        assert_eq!(h.header("x-missing"), None);
        assert_eq!(h.headers, Headers::from_pairs(want.iter().copied()));
        assert_ne!(h.headers, Headers::from_pairs(want[..3].iter().copied()));
        let mut it = h.headers.iter();
        it.next();
        assert_eq!(it.size_hint(), (3, Some(3)));
        assert!(Headers::default().is_empty());
    }

    #[test]
    fn too_many_headers() {
        let mut s = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
        for i in 0..MAX_HEADERS {
            s.push_str(&format!("X-{i}: v\r\n"));
        }
        s.push_str("\r\n");
        assert_eq!(err(&s), HeadError::TooManyHeaders);
        assert_eq!(err(&s).status(), 431);
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let s = "\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n";
        assert_eq!(ok(s).head_len, s.len());
        assert_eq!(req("\r\n\r\n").unwrap().map(|h| h.head_len), None);
    }

    #[test]
    fn keep_alive_rules() {
        assert!(ok("GET / HTTP/1.1\r\nHost: h\r\n\r\n").keep_alive);
        assert!(!ok("GET / HTTP/1.1\r\nHost: h\r\nConnection: Close\r\n\r\n").keep_alive);
        assert!(!ok("GET / HTTP/1.1\r\nHost: h\r\nConnection: foo, close\r\n\r\n").keep_alive);
        assert!(!ok("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(ok("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
    }

    #[test]
    fn expect_continue() {
        let h =
            ok("PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n");
        assert!(h.expect_continue);
        let h = ok("PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
        assert!(!h.expect_continue, "RFC 9110 10.1.1: ignored for 1.0");
    }

    #[test]
    fn upgrade() {
        let h = ok("GET /ws HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert_eq!(h.upgrade.as_deref(), Some("websocket"));
        let h = ok("GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n");
        assert_eq!(h.upgrade, None, "needs the Connection token");
        let h = ok("GET /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\n\r\n");
        assert_eq!(h.upgrade, None, "needs the Upgrade header");
    }

    #[test]
    fn host_forms() {
        assert_eq!(
            ok("GET http://User@A.Example:81/p HTTP/1.1\r\nHost: a.example\r\n\r\n")
                .host
                .as_deref(),
            Some("a.example")
        );
        assert_eq!(
            ok("GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n")
                .host
                .as_deref(),
            Some("[::1]")
        );
        assert_eq!(
            ok("GET / HTTP/1.1\r\nHost: demo\r\n\r\n").host.as_deref(),
            Some("demo")
        );
        assert_eq!(ok("GET / HTTP/1.1\r\nHost:\r\n\r\n").host, None);
        assert_eq!(ok("GET / HTTP/1.0\r\n\r\n").host, None);
        assert_eq!(
            ok("CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n")
                .host
                .as_deref(),
            Some("h")
        );
        assert_eq!(
            err("GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
            HeadError::Malformed("invalid host")
        );
        assert_eq!(
            err("GET / HTTP/1.1\r\nHost: a:8x\r\n\r\n"),
            HeadError::Malformed("invalid host")
        );
        assert_eq!(
            err("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"),
            HeadError::Malformed("invalid host")
        );
    }

    #[test]
    fn absolute_form_must_agree_with_host() {
        const WHY: HeadError =
            HeadError::Malformed("absolute-form target and Host name different hosts");
        // Same host: case and port do not matter, userinfo is not the host.
        for fine in [
            "GET http://demo/p HTTP/1.1\r\nHost: demo\r\n\r\n",
            "GET http://DEMO:80/p HTTP/1.1\r\nHost: demo:8080\r\n\r\n",
            "GET https://u:p@demo.example/ HTTP/1.1\r\nHost: Demo.Example\r\n\r\n",
            "GET http://[::1]:81/ HTTP/1.1\r\nHost: [::1]\r\n\r\n",
            "OPTIONS http://demo HTTP/1.1\r\nHost: demo\r\n\r\n",
            // HTTP/1.0 may leave Host out: the authority alone decides.
            "GET http://demo/ HTTP/1.0\r\n\r\n",
        ] {
            assert!(ok(fine).host.is_some(), "{fine}");
        }
        assert_eq!(
            ok("GET http://demo/ HTTP/1.0\r\n\r\n").host.as_deref(),
            Some("demo")
        );
        for bad in [
            "GET http://demo/p HTTP/1.1\r\nHost: other\r\n\r\n",
            "GET http://demo/p HTTP/1.1\r\nHost: demo.other\r\n\r\n",
            "GET http://other@demo/p HTTP/1.1\r\nHost: other\r\n\r\n",
            "GET http://demo/p HTTP/1.1\r\nHost:\r\n\r\n",
            "GET http:///p HTTP/1.1\r\nHost: demo\r\n\r\n",
            "GET http://[::1]/ HTTP/1.1\r\nHost: [::2]\r\n\r\n",
            "POST http://demo/p HTTP/1.0\r\nHost: other:80\r\nContent-Length: 1\r\n\r\n",
        ] {
            assert_eq!(err(bad), WHY, "{bad}");
            assert_eq!(err(bad).status(), 400);
        }
        // Host is still validated when the target names the authority.
        assert_eq!(
            err("GET http://demo/ HTTP/1.1\r\nHost: de mo\r\n\r\n"),
            HeadError::Malformed("invalid host")
        );
    }

    #[test]
    fn missing_or_repeated_host() {
        assert_eq!(
            err("GET / HTTP/1.1\r\n\r\n"),
            HeadError::Malformed("missing Host")
        );
        assert_eq!(
            err("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"),
            HeadError::Malformed("several Host headers")
        );
    }

    #[test]
    fn smuggling_cl_and_te() {
        let e = err(
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert!(matches!(e, HeadError::Smuggling(_)), "{e:?}");
        assert_eq!(e.status(), 400);
        let e = err(
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        );
        assert!(matches!(e, HeadError::Smuggling(_)), "{e:?}");
    }

    #[test]
    fn smuggling_conflicting_content_length() {
        let e = err("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n");
        assert!(matches!(e, HeadError::Smuggling(_)), "{e:?}");
        let e = err("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 6\r\n\r\n");
        assert!(matches!(e, HeadError::Smuggling(_)), "{e:?}");
        let h =
            ok("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5, 5\r\n\r\n");
        assert_eq!(h.body, BodyKind::Length(5));
        assert_eq!(
            ok("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n").body,
            BodyKind::Length(0)
        );
    }

    #[test]
    fn malformed_content_length() {
        for v in [
            "+5",
            "-1",
            "5a",
            "0x5",
            "5 5",
            "",
            " ",
            "1.0",
            "18446744073709551616",
            "99999999999999999999999",
        ] {
            let s = format!("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: {v}\r\n\r\n");
            assert!(matches!(err(&s), HeadError::Malformed(_)), "{v:?}");
        }
        let h = ok("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 18446744073709551615\r\n\r\n");
        assert_eq!(h.body, BodyKind::Length(u64::MAX));
    }

    #[test]
    fn transfer_encoding_codings() {
        let ok_te = |v: &str| {
            ok(&format!(
                "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: {v}\r\n\r\n"
            ))
            .body
        };
        let err_te = |v: &str| {
            err(&format!(
                "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: {v}\r\n\r\n"
            ))
        };
        assert_eq!(ok_te("chunked"), BodyKind::Chunked);
        assert_eq!(ok_te("Chunked"), BodyKind::Chunked);
        assert_eq!(ok_te(", chunked ,"), BodyKind::Chunked);
        // RFC 9112 6.3: the final coding is not chunked, so no length: 400.
        let not_final = HeadError::Smuggling("transfer-encoding does not end in chunked");
        for v in [
            "gzip",
            "chunked, gzip",
            "chunked;x=1",
            "xchunked",
            "identity",
        ] {
            assert_eq!(err_te(v), not_final, "{v:?}");
            assert_eq!(err_te(v).status(), 400, "{v:?}");
        }
        // RFC 9112 6.1: ends in chunked, but with a coding we lack: 501.
        assert_eq!(
            err_te("gzip, chunked"),
            HeadError::UnsupportedTransferEncoding
        );
        assert_eq!(err_te("gzip, chunked").status(), 501);
        let e = err("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(e, HeadError::UnsupportedTransferEncoding);
        // Chunked twice is a framing error even with another coding.
        for v in ["chunked, chunked", "chunked, gzip, chunked"] {
            assert!(matches!(err_te(v), HeadError::Smuggling(_)), "{v:?}");
        }
        assert!(matches!(err_te(""), HeadError::Malformed(_)));
        assert_eq!(err_te("").status(), 400);
    }

    /// What the edge makes of one request: its head refused with a status,
    /// its body refused, or exactly one body with the rest left alone.
    #[derive(Debug, PartialEq, Eq)]
    enum Framed {
        Refused(u16),
        BadBody(BodyError),
        Body(Vec<u8>, Vec<u8>),
    }

    /// Parse a head, then decode its body, feeding `input` in `step`-byte
    /// reads the way the gateway does.
    fn frame(input: &[u8], step: usize) -> Framed {
        let mut reads = input.chunks(step);
        let mut buf = BytesMut::new();
        let head = loop {
            match parse_request(&buf, DEFAULT_MAX_HEAD) {
                Ok(Some(h)) => break h,
                Err(e) => return Framed::Refused(e.status()),
                Ok(None) => match reads.next() {
                    Some(r) => buf.extend_from_slice(r),
                    None => panic!("head never complete"),
                },
            }
        };
        buf.advance(head.head_len);
        let mut dec = BodyDecoder::new(head.body);
        let mut body = Vec::new();
        loop {
            match dec.decode(&mut buf, 7) {
                Ok(Some(piece)) => body.extend_from_slice(&piece),
                Ok(None) if dec.is_done() => break,
                Ok(None) => match reads.next() {
                    Some(r) => buf.extend_from_slice(r),
                    None => panic!("body never complete"),
                },
                Err(e) => return Framed::BadBody(e),
            }
        }
        buf.extend(reads.flatten());
        Framed::Body(body, buf.to_vec())
    }

    #[test]
    fn smuggling_payloads() {
        use Framed::*;
        const NEXT: &str = "GET /admin HTTP/1.1\r\nHost: h\r\n\r\n";
        let body = |b: &str, rest: &str| Body(b.into(), rest.into());
        let cases: Vec<(String, Framed)> = vec![
            // CL.TE and TE.CL: both framings present.
            (
                "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG".into(),
                Refused(400),
            ),
            (
                "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n"
                    .into(),
                Refused(400),
            ),
            (
                "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
                Refused(400),
            ),
            (
                "Transfer-Encoding: xchunked\r\nContent-Length: 4\r\n\r\n".into(),
                Refused(400),
            ),
            // TE only: exactly one chunked body; what follows is untouched.
            (
                format!("Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{NEXT}"),
                body("", NEXT),
            ),
            (
                format!("Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{NEXT}"),
                body("hello", NEXT),
            ),
            // CL only: exactly Content-Length bytes, even if they look like chunks.
            (
                format!("Content-Length: 4\r\n\r\n5c\r\n{NEXT}"),
                body("5c\r\n", NEXT),
            ),
            // TE.TE: obfuscated Transfer-Encoding.
            ("Transfer-Encoding: xchunked\r\n\r\n".into(), Refused(400)),
            ("Transfer-Encoding : chunked\r\n\r\n".into(), Refused(400)),
            ("Transfer-Encoding\t: chunked\r\n\r\n".into(), Refused(400)),
            (
                "Transfer-Encoding: chunked, identity\r\n\r\n".into(),
                Refused(400),
            ),
            (
                "Transfer-Encoding: identity, chunked\r\n\r\n".into(),
                Refused(501),
            ),
            (
                "Transfer-Encoding: gzip, chunked\r\n\r\n".into(),
                Refused(501),
            ),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n".into(),
                Refused(400),
            ),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
                Refused(400),
            ),
            (
                "Transfer-Encoding: chunked, chunked\r\n\r\n".into(),
                Refused(400),
            ),
            (
                "Transfer-Encoding: \"chunked\"\r\n\r\n".into(),
                Refused(400),
            ),
            ("Transfer-Encoding: chunk\r\n\r\n".into(), Refused(400)),
            (
                "Transfer-Encoding: chunked;q=1\r\n\r\n".into(),
                Refused(400),
            ),
            (
                "Transfer-Encoding: \x0bchunked\r\n\r\n".into(),
                Refused(400),
            ),
            ("Transfer-Encoding: chunked\0\r\n\r\n".into(), Refused(400)),
            ("Transfer-Encoding:\r\n\r\n".into(), Refused(400)),
            (" Transfer-Encoding: chunked\r\n\r\n".into(), Refused(400)),
            (
                "X: y\r\n Transfer-Encoding: chunked\r\n\r\n".into(),
                Refused(400),
            ),
            (
                "Transfer-Encoding:\r\n chunked\r\n\r\n".into(),
                Refused(400),
            ),
            (
                "Transfer-Encoding: chunked\nX: y\r\n\r\n".into(),
                Refused(400),
            ),
            // Tabs and case are legal OWS / case-insensitive: one reading.
            (
                "Transfer-Encoding:\tchunked\t\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into(),
                body("abc", ""),
            ),
            (
                "transfer-encoding: CHUNKED\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into(),
                body("abc", ""),
            ),
            // Content-Length obfuscations.
            ("Content-Length: +5\r\n\r\nhello".into(), Refused(400)),
            ("Content-Length: -5\r\n\r\nhello".into(), Refused(400)),
            ("Content-Length: 5, 6\r\n\r\nhello!".into(), Refused(400)),
            (
                "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".into(),
                Refused(400),
            ),
            ("Content-Length: 0x5\r\n\r\nhello".into(), Refused(400)),
            ("Content-Length: 5 5\r\n\r\nhello".into(), Refused(400)),
            ("Content-Length: 5e0\r\n\r\nhello".into(), Refused(400)),
            ("Content-Length : 5\r\n\r\nhello".into(), Refused(400)),
            (
                "Content-Length: 99999999999999999999\r\n\r\n".into(),
                Refused(400),
            ),
            ("Content-Length:\r\n\r\n".into(), Refused(400)),
            ("Content-Length: 5\rX: y\r\n\r\nhello".into(), Refused(400)),
            (
                format!("Content-Length: 5, 5\r\n\r\nhello{NEXT}"),
                body("hello", NEXT),
            ),
            (
                format!("Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello{NEXT}"),
                body("hello", NEXT),
            ),
            (
                format!("Content-Length:\t5\t\r\n\r\nhello{NEXT}"),
                body("hello", NEXT),
            ),
            // Chunked bodies that two parsers could cut differently.
            (
                format!("Transfer-Encoding: chunked\r\n\r\n0\r\n{NEXT}"),
                BadBody(BodyError::BadTrailer),
            ),
            (
                "Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n".into(),
                BadBody(BodyError::BadChunkSize),
            ),
            (
                "Transfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n".into(),
                BadBody(BodyError::BadChunkSize),
            ),
            (
                "Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n".into(),
                BadBody(BodyError::BadChunkSize),
            ),
            (
                "Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n".into(),
                BadBody(BodyError::BadChunkSize),
            ),
            (
                "Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n".into(),
                BadBody(BodyError::BadChunkSize),
            ),
            (
                "Transfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n".into(),
                BadBody(BodyError::BadChunkSize),
            ),
            (
                "Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n".into(),
                BadBody(BodyError::BadChunkTerminator),
            ),
            (
                "Transfer-Encoding: chunked\r\n\r\n5;a=\"\r\n\"\r\nhello\r\n0\r\n\r\n".into(),
                BadBody(BodyError::BadChunkExtension),
            ),
        ];
        for (rest, want) in &cases {
            let req = format!("POST / HTTP/1.1\r\nHost: h\r\n{rest}");
            for step in [req.len(), 1, 2, 5] {
                assert_eq!(
                    frame(req.as_bytes(), step),
                    *want,
                    "{rest:?} in {step}-byte reads"
                );
            }
            if let BadBody(e) = want {
                assert_eq!(e.status(), Some(400));
            }
        }
        assert!(cases.len() >= 30);
        // TE on HTTP/1.0 is refused whatever follows (RFC 9112 6.1).
        let req = "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(frame(req.as_bytes(), 1), Refused(400));
    }

    #[test]
    fn smuggling_te_on_http10() {
        let e = err("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(e, HeadError::Smuggling(_)), "{e:?}");
    }

    #[test]
    fn bad_header_bytes() {
        let cases = [
            "GET / HTTP/1.1\r\nHost: h\r\nX-A: a\0b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nX-A: a\nX-B: b\r\n\r\n",
            "GET / HTTP/1.1\nHost: h\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nX-A : a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nX A: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\n: a\r\n\r\n",
            "GET / HTTP/1.1\r\n Host: h\r\n\r\n",
            "G\0T / HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
        ];
        for c in cases {
            let e = err(c);
            assert!(matches!(e, HeadError::Malformed(_)), "{c:?}: {e:?}");
        }
        // Bare-LF-only heads are found (not waited on forever) and refused.
        assert!(matches!(
            err("GET / HTTP/1.1\nHost: h\n\n"),
            HeadError::Malformed(_)
        ));
    }

    #[test]
    fn versions() {
        assert_eq!(
            err("GET / HTTP/2.0\r\nHost: h\r\n\r\n"),
            HeadError::VersionNotSupported
        );
        assert_eq!(
            err("GET / HTTP/1.2\r\nHost: h\r\n\r\n"),
            HeadError::VersionNotSupported
        );
        assert_eq!(
            err("GET / HTTP/3\r\nHost: h\r\n\r\n"),
            HeadError::VersionNotSupported
        );
        assert_eq!(err("GET / HTTP/2.0\r\nHost: h\r\n\r\n").status(), 505);
        assert!(matches!(
            err("GET / FOO/1.1\r\nHost: h\r\n\r\n"),
            HeadError::Malformed(_)
        ));
        assert!(matches!(err("GET /\r\n\r\n"), HeadError::Malformed(_)));
        assert!(matches!(err("garbage\r\n\r\n"), HeadError::Malformed(_)));
        assert_eq!(ok("GET / HTTP/1.0\r\n\r\n").version, 0);
    }

    #[test]
    fn never_panics_on_junk() {
        let mut seed = 0x1234_5678_u32;
        let alphabet = b"GET /HTTP1.0\r\n:; ,chunkedContent-Length\0\x7f\xffHost";
        for _ in 0..5000 {
            let len = (seed % 80) as usize;
            let mut v = Vec::with_capacity(len + 4);
            for _ in 0..len {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                v.push(alphabet[(seed >> 16) as usize % alphabet.len()]);
            }
            v.extend_from_slice(b"\r\n\r\n");
            let _ = parse_request(&v, 64);
            let _ = parse_response(&v, 64, false);
        }
    }

    fn resp(s: &str, head: bool) -> ResponseHead {
        parse_response(s.as_bytes(), DEFAULT_MAX_HEAD, head)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn response_framing() {
        let r = resp("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", false);
        assert_eq!(
            (r.status, r.reason.as_str(), r.body, r.keep_alive),
            (200, "OK", BodyKind::Length(12), true)
        );
        assert_eq!(
            resp("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", true).body,
            BodyKind::Empty
        );
        assert_eq!(
            resp(
                "HTTP/1.1 204 No Content\r\nContent-Length: 12\r\n\r\n",
                false
            )
            .body,
            BodyKind::Empty
        );
        assert_eq!(
            resp("HTTP/1.1 304 Not Modified\r\n\r\n", false).body,
            BodyKind::Empty
        );
        assert_eq!(
            resp(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
                false
            )
            .body,
            BodyKind::Empty
        );
        assert_eq!(
            resp("HTTP/1.1 100 Continue\r\n\r\n", false).body,
            BodyKind::Empty
        );
        let r = resp(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            false,
        );
        assert_eq!((r.body, r.keep_alive), (BodyKind::Chunked, true));
        let r = resp("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((r.body, r.keep_alive), (BodyKind::Eof, false));
        let r = resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false);
        assert_eq!((r.body, r.keep_alive), (BodyKind::Eof, false));
        assert_eq!(
            resp(
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
                false
            )
            .body,
            BodyKind::Length(3)
        );
        let e = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            1024,
            false,
        );
        assert!(matches!(e, Err(HeadError::Smuggling(_))));
        let r = resp("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false);
        assert_eq!((r.version, r.keep_alive), (0, false));
        let r = resp(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
            false,
        );
        assert!(r.keep_alive);
        assert!(
            !resp(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                false
            )
            .keep_alive
        );
    }

    #[test]
    fn response_lenient_and_errors() {
        let r = resp("HTTP/1.1 200 OK\nContent-Length: 2\n\n", false);
        assert_eq!(
            (r.body, r.head_len),
            (
                BodyKind::Length(2),
                "HTTP/1.1 200 OK\nContent-Length: 2\n\n".len()
            )
        );
        let r = resp("HTTP/1.1 599 \r\n\r\n", false);
        assert_eq!((r.status, r.reason.as_str()), (599, ""));
        assert_eq!(
            parse_response(b"HTTP/2 200 OK\r\n\r\n", 1024, false).unwrap_err(),
            HeadError::VersionNotSupported
        );
        assert!(matches!(
            parse_response(b"HTTP/1.1 2x0 OK\r\n\r\n", 1024, false),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\n", 1024, false),
            Ok(None)
        ));
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nX: aaaaaaaaaa", 16, false).unwrap_err(),
            HeadError::TooLarge
        );
    }
}
