//! A small etcd v3 client over etcd's own JSON API (the gRPC gateway that
//! every etcd 3.4+ serves on its client URL): `POST /v3/kv/put`,
//! `/v3/kv/range`, `/v3/kv/deleterange`, `/v3/lease/grant`,
//! `/v3/lease/keepalive`, `/v3/lease/revoke` and the streaming
//! `/v3/watch`. Keys and values travel base64-encoded, int64s as JSON
//! strings.
//!
//! Blocking by design: it runs on the cluster control-plane threads
//! (`registry.rs`), never on a core. Every connect, read and write is
//! bounded by a timeout; a failed call drops its connection and the next
//! call tries the configured endpoints in order starting with the one
//! that failed, so a dead member costs one connect timeout per call.
//!
//! What it owns: the HTTP/1.1 exchange (one keep-alive connection per
//! [`Client`]), response bodies by Content-Length or chunked, bounded in
//! size ([`MAX_BODY`]); the watch stream's chunked framing and its
//! newline-separated JSON messages ([`WatchStream`], [`parse_watch_message`]);
//! and base64 ([`b64_encode`], [`b64_decode`]).

use std::io::{self, Read, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

/// Largest response body (or single watch message) taken from etcd: a
/// range is paged ([`RANGE_PAGE`] keys) so this is never reached by a
/// sane member; a lying one is cut off here.
pub const MAX_BODY: usize = 16 << 20;
/// Keys per range request.
pub const RANGE_PAGE: i64 = 2000;

/// Bounds of one call.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    /// Each read and write of a unary call.
    pub io: Duration,
}

impl Timeouts {
    /// For a node whose lease lives `ttl`: each call bounded by a third
    /// of it (the renewal period; 0.5 to 2 s), so an etcd that stopped
    /// answering is noticed before the lease could expire.
    pub fn for_lease(ttl: Duration) -> Timeouts {
        let io = (ttl / 3).clamp(Duration::from_millis(500), Duration::from_secs(2));
        Timeouts {
            connect: io.min(Duration::from_secs(1)),
            io,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(1),
            io: Duration::from_secs(2),
        }
    }
}

/// Why a call failed.
#[derive(Debug)]
pub enum EtcdError {
    /// No endpoint answered (connect, write or read failed or timed out).
    Io(io::Error),
    /// etcd answered with an error (gRPC `code`; 5 = not found,
    /// 14 = unavailable, e.g. no quorum).
    Status {
        http: u16,
        code: i64,
        message: String,
    },
    /// The answer was not what etcd sends.
    Malformed(String),
}

impl std::fmt::Display for EtcdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EtcdError::Io(e) => write!(f, "etcd unreachable: {e}"),
            EtcdError::Status {
                http,
                code,
                message,
            } => write!(f, "etcd error (HTTP {http}, code {code}): {message}"),
            EtcdError::Malformed(m) => write!(f, "etcd answer malformed: {m}"),
        }
    }
}

impl EtcdError {
    /// The lease named in the call no longer exists (expired or revoked).
    pub fn lease_not_found(&self) -> bool {
        matches!(self, EtcdError::Status { message, .. } if message.contains("lease not found"))
    }
}

impl From<io::Error> for EtcdError {
    fn from(e: io::Error) -> Self {
        EtcdError::Io(e)
    }
}

/// Most writes in one [`Client::write_batch`]: below etcd's default
/// `--max-txn-ops` (128).
pub const MAX_TXN_OPS: usize = 64;

/// One write of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// `lease` 0: no lease.
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    Delete {
        key: String,
    },
}

/// One key-value pair as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// One page of a range.
#[derive(Debug)]
pub struct RangePage {
    /// The store's revision the page was read at.
    pub revision: i64,
    pub kvs: Vec<KeyValue>,
    /// More keys follow the last one.
    pub more: bool,
}

/// A change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    Delete { key: Vec<u8>, mod_revision: i64 },
}

/// One message of a watch stream.
#[derive(Debug, PartialEq, Eq)]
pub enum WatchMessage {
    /// The watch exists (first message).
    Created { revision: i64 },
    /// Changes, in revision order; `revision` is the store's revision when
    /// sent (a progress notice has no events).
    Events { revision: i64, events: Vec<Event> },
    /// The watch ended: `compact_revision` > 0 means the start revision
    /// was compacted away (re-read everything).
    Canceled {
        compact_revision: i64,
        reason: String,
    },
    /// An error object instead of a result.
    Error(String),
}

/// An etcd endpoint: `http://host:port` resolved once per connect.
#[derive(Clone, Debug)]
struct Endpoint {
    /// `host:port`, also the Host header.
    authority: String,
}

fn parse_endpoint(url: &str) -> Result<Endpoint, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: an http:// URL"))?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        return Err(format!("{url}: no host"));
    }
    let authority = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:2379")
    };
    Ok(Endpoint { authority })
}

fn connect(ep: &Endpoint, t: Timeouts) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in ep.authority.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, t.connect) {
            Ok(s) => {
                s.set_read_timeout(Some(t.io))?;
                s.set_write_timeout(Some(t.io))?;
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The client: endpoints in order and one keep-alive connection.
pub struct Client {
    endpoints: Vec<Endpoint>,
    /// Index of the endpoint to use first.
    current: usize,
    conn: Option<Conn>,
    timeouts: Timeouts,
}

/// A connection with the bytes read past the last response.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn new(urls: &[String], timeouts: Timeouts) -> Result<Client, String> {
        let endpoints = urls
            .iter()
            .map(|u| parse_endpoint(u))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err("no etcd endpoint".into());
        }
        Ok(Client {
            endpoints,
            current: 0,
            conn: None,
            timeouts,
        })
    }

    /// POSTs `body` to `path`, returning the JSON answer. Tries each
    /// endpoint once, starting with the current one; a connection that
    /// fails is dropped, never reused.
    fn call(&mut self, path: &str, body: &serde_json::Value) -> Result<Vec<u8>, EtcdError> {
        let body = body.to_string();
        let mut last: Option<EtcdError> = None;
        for attempt in 0..self.endpoints.len() {
            // A kept connection may have been closed by etcd meanwhile
            // (idle timeout): one retry on a fresh one before moving on.
            let reused = self.conn.is_some();
            match self.call_once(path, &body) {
                Ok(b) => return Ok(b),
                Err(EtcdError::Io(e)) => {
                    self.conn = None;
                    // Not after a timeout: that member is slow or stopped,
                    // and a second wait on it would double the time to
                    // notice.
                    let timed_out = matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    );
                    if reused && !timed_out {
                        match self.call_once(path, &body) {
                            Ok(b) => return Ok(b),
                            Err(EtcdError::Io(e)) => last = Some(EtcdError::Io(e)),
                            Err(e) => return Err(e),
                        }
                    } else {
                        last = Some(EtcdError::Io(e));
                    }
                    self.conn = None;
                    if attempt + 1 < self.endpoints.len() {
                        self.current = (self.current + 1) % self.endpoints.len();
                    }
                }
                Err(e) => {
                    // An answer that is not an etcd error object leaves
                    // the connection in an unknown state.
                    if matches!(e, EtcdError::Malformed(_)) {
                        self.conn = None;
                    }
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| EtcdError::Io(io::Error::other("no endpoint"))))
    }

    fn call_once(&mut self, path: &str, body: &str) -> Result<Vec<u8>, EtcdError> {
        if self.conn.is_none() {
            let ep = &self.endpoints[self.current];
            self.conn = Some(Conn {
                stream: connect(ep, self.timeouts)?,
                buf: Vec::new(),
            });
        }
        let ep = &self.endpoints[self.current];
        let conn = self.conn.as_mut().expect("connected above");
        let req = request(&ep.authority, path, body, true);
        conn.stream.write_all(req.as_bytes())?;
        let head = read_head(&mut conn.stream, &mut conn.buf)?;
        let body = match head.framing {
            Framing::Length(n) => read_length(&mut conn.stream, &mut conn.buf, n)?,
            Framing::Chunked => {
                let mut d = ChunkDecoder::default();
                let mut out = Vec::new();
                loop {
                    let done = d
                        .feed(&mut conn.buf, &mut out)
                        .map_err(EtcdError::Malformed)?;
                    if done {
                        break;
                    }
                    if out.len() > MAX_BODY {
                        return Err(EtcdError::Malformed("body too large".into()));
                    }
                    fill(&mut conn.stream, &mut conn.buf)?;
                }
                out
            }
            Framing::Close => {
                let mut out = std::mem::take(&mut conn.buf);
                conn.stream
                    .try_clone()?
                    .take(MAX_BODY as u64 + 1)
                    .read_to_end(&mut out)?;
                self.conn = None;
                out
            }
        };
        if head.close {
            self.conn = None;
        }
        if head.status != 200 {
            return Err(status_error(head.status, &body));
        }
        Ok(body)
    }

    /// Puts `key` = `value`, under `lease` if non-zero. Returns the
    /// revision of the write.
    pub fn put(&mut self, key: &str, value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let mut req = json!({"key": b64_encode(key.as_bytes()), "value": b64_encode(value)});
        if lease != 0 {
            req["lease"] = json!(lease.to_string());
        }
        let r: HeaderOnly = parse(&self.call("/v3/kv/put", &req)?)?;
        Ok(r.header.revision)
    }

    /// Applies `writes` in one transaction (all or none; no conditions).
    /// At most [`MAX_TXN_OPS`] writes, each key at most once (etcd
    /// refuses a transaction that names a key twice). Returns the
    /// revision of the write.
    pub fn write_batch(&mut self, writes: &[Write]) -> Result<i64, EtcdError> {
        assert!(writes.len() <= MAX_TXN_OPS, "{} writes", writes.len());
        let ops: Vec<serde_json::Value> = writes
            .iter()
            .map(|w| match w {
                Write::Put { key, value, lease } => {
                    let mut p =
                        json!({"key": b64_encode(key.as_bytes()), "value": b64_encode(value)});
                    if *lease != 0 {
                        p["lease"] = json!(lease.to_string());
                    }
                    json!({ "request_put": p })
                }
                Write::Delete { key } => {
                    json!({"request_delete_range": {"key": b64_encode(key.as_bytes())}})
                }
            })
            .collect();
        let r: HeaderOnly = parse(&self.call("/v3/kv/txn", &json!({ "success": ops }))?)?;
        Ok(r.header.revision)
    }

    /// Deletes `key`; returns how many keys went (0 or 1).
    pub fn delete(&mut self, key: &str) -> Result<i64, EtcdError> {
        let req = json!({"key": b64_encode(key.as_bytes())});
        let r: Deleted = parse(&self.call("/v3/kv/deleterange", &req)?)?;
        Ok(r.deleted)
    }

    /// One page of the keys under `prefix` from `start` (inclusive; the
    /// prefix itself for the first page), read at `revision` (0: the
    /// newest; later pages pass the first page's revision so that all
    /// pages show one snapshot).
    pub fn range_page(
        &mut self,
        prefix: &str,
        start: &[u8],
        revision: i64,
    ) -> Result<RangePage, EtcdError> {
        let mut req = json!({
            "key": b64_encode(start),
            "range_end": b64_encode(&prefix_end(prefix.as_bytes())),
            "limit": RANGE_PAGE.to_string(),
        });
        if revision > 0 {
            req["revision"] = json!(revision.to_string());
        }
        let r: RangeJson = parse(&self.call("/v3/kv/range", &req)?)?;
        Ok(RangePage {
            revision: r.header.revision,
            kvs: r
                .kvs
                .into_iter()
                .map(KvJson::decode)
                .collect::<Result<_, _>>()?,
            more: r.more,
        })
    }

    /// Every key under `prefix` at one revision, paged.
    pub fn range_prefix(&mut self, prefix: &str) -> Result<RangePage, EtcdError> {
        let mut page = self.range_page(prefix, prefix.as_bytes(), 0)?;
        let mut all = RangePage {
            revision: page.revision,
            kvs: Vec::new(),
            more: false,
        };
        loop {
            let more = page.more;
            let next = page.kvs.last().map(|kv| {
                let mut k = kv.key.clone();
                k.push(0);
                k
            });
            all.kvs.append(&mut page.kvs);
            match (more, next) {
                (true, Some(start)) => page = self.range_page(prefix, &start, all.revision)?,
                _ => return Ok(all),
            }
        }
    }

    /// A new lease of `ttl` seconds; returns its id.
    pub fn grant(&mut self, ttl: i64) -> Result<i64, EtcdError> {
        let r: Grant = parse(&self.call("/v3/lease/grant", &json!({"TTL": ttl.to_string()}))?)?;
        if r.id == 0 {
            return Err(EtcdError::Malformed(
                r.error.unwrap_or_else(|| "grant without an ID".into()),
            ));
        }
        Ok(r.id)
    }

    /// Renews `lease`; returns its remaining TTL in seconds, 0 if it no
    /// longer exists (expired or revoked).
    pub fn keepalive(&mut self, lease: i64) -> Result<i64, EtcdError> {
        let body = self.call("/v3/lease/keepalive", &json!({"ID": lease.to_string()}))?;
        let r: KeepAlive = parse(&body)?;
        match (r.result, r.error) {
            (Some(res), _) => Ok(res.ttl),
            (None, Some(e)) => Err(EtcdError::Status {
                http: 200,
                code: 0,
                message: e.message,
            }),
            (None, None) => Err(EtcdError::Malformed("keepalive without result".into())),
        }
    }

    /// Revokes `lease`: its keys vanish at once.
    pub fn revoke(&mut self, lease: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({"ID": lease.to_string()}))?;
        Ok(())
    }

    /// Opens a watch of every key under `prefix` from `start_revision`
    /// on its own connection (endpoints in order). `read_timeout` bounds
    /// each read of the stream: [`WatchStream::next_message`] returns `Ok(None)`
    /// when it passes without a message, so the caller can look around.
    pub fn watch(
        &mut self,
        prefix: &str,
        start_revision: i64,
        read_timeout: Duration,
    ) -> Result<WatchStream, EtcdError> {
        let req = json!({"create_request": {
            "key": b64_encode(prefix.as_bytes()),
            "range_end": b64_encode(&prefix_end(prefix.as_bytes())),
            "start_revision": start_revision.to_string(),
        }})
        .to_string();
        let mut last = None;
        for _ in 0..self.endpoints.len() {
            let ep = self.endpoints[self.current].clone();
            match open_watch(&ep, self.timeouts, &req, read_timeout) {
                Ok(w) => return Ok(w),
                Err(e @ EtcdError::Io(_)) => {
                    last = Some(e);
                    self.current = (self.current + 1) % self.endpoints.len();
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| EtcdError::Io(io::Error::other("no endpoint"))))
    }
}

fn open_watch(
    ep: &Endpoint,
    t: Timeouts,
    req: &str,
    read_timeout: Duration,
) -> Result<WatchStream, EtcdError> {
    let mut stream = connect(ep, t)?;
    // The request body is sent whole: the gateway creates the watch from
    // its first message and keeps the response open.
    stream.write_all(request(&ep.authority, "/v3/watch", req, false).as_bytes())?;
    let mut buf = Vec::new();
    let head = read_head(&mut stream, &mut buf)?;
    if head.status != 200 {
        let body = match head.framing {
            Framing::Length(n) => read_length(&mut stream, &mut buf, n).unwrap_or_default(),
            _ => Vec::new(),
        };
        return Err(status_error(head.status, &body));
    }
    if head.framing != Framing::Chunked {
        return Err(EtcdError::Malformed("watch answer is not chunked".into()));
    }
    stream.set_read_timeout(Some(read_timeout))?;
    keepalive_probes(&stream);
    Ok(WatchStream {
        stream,
        raw: buf,
        chunks: ChunkDecoder::default(),
        body: Vec::new(),
    })
}

/// TCP keepalive on a watch connection (idle 2 s, then a probe every
/// second, 3 unanswered: about 5 s), so a path to etcd that went dark
/// (host gone, blackhole) ends the watch instead of leaving it silent.
/// A member that is merely paused still ACKs at the kernel level; its
/// watch resumes when it does.
fn keepalive_probes(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    for (level, opt, val) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 2),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ] {
        // SAFETY: a valid socket fd and a c_int option of its size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// A watch's response stream.
pub struct WatchStream {
    stream: TcpStream,
    /// Bytes read, not yet de-chunked.
    raw: Vec<u8>,
    chunks: ChunkDecoder,
    /// De-chunked bytes not yet split into messages.
    body: Vec<u8>,
}

impl WatchStream {
    /// The next message: `Ok(None)` when the read timeout passed with no
    /// whole message (the stream stays usable; bytes read are kept).
    pub fn next_message(&mut self) -> Result<Option<WatchMessage>, EtcdError> {
        loop {
            if let Some(msg) = take_message(&mut self.body)? {
                return Ok(Some(msg));
            }
            let done = self
                .chunks
                .feed(&mut self.raw, &mut self.body)
                .map_err(EtcdError::Malformed)?;
            if let Some(msg) = take_message(&mut self.body)? {
                return Ok(Some(msg));
            }
            if done {
                return Err(EtcdError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "watch stream ended",
                )));
            }
            if self.body.len() > MAX_BODY {
                return Err(EtcdError::Malformed("watch message too large".into()));
            }
            match fill(&mut self.stream, &mut self.raw) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next message among the bytes already read, without reading
    /// the socket: `Ok(None)` when none is whole yet.
    pub fn next_buffered(&mut self) -> Result<Option<WatchMessage>, EtcdError> {
        if let Some(msg) = take_message(&mut self.body)? {
            return Ok(Some(msg));
        }
        self.chunks
            .feed(&mut self.raw, &mut self.body)
            .map_err(EtcdError::Malformed)?;
        take_message(&mut self.body)
    }
}

/// Splits one newline-terminated JSON message off `body`.
fn take_message(body: &mut Vec<u8>) -> Result<Option<WatchMessage>, EtcdError> {
    loop {
        let Some(nl) = body.iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let line: Vec<u8> = body.drain(..=nl).collect();
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        return parse_watch_message(line).map(Some);
    }
}

/// Parses one message of the watch stream.
pub fn parse_watch_message(line: &[u8]) -> Result<WatchMessage, EtcdError> {
    let m: WatchJson = parse(line)?;
    if let Some(e) = m.error {
        return Ok(WatchMessage::Error(e.message));
    }
    let r = m
        .result
        .ok_or_else(|| EtcdError::Malformed("watch message without result".into()))?;
    if r.canceled {
        return Ok(WatchMessage::Canceled {
            compact_revision: r.compact_revision,
            reason: r.cancel_reason,
        });
    }
    if r.created {
        return Ok(WatchMessage::Created {
            revision: r.header.revision,
        });
    }
    let events = r
        .events
        .into_iter()
        .map(|e| {
            let kv = e.kv.decode()?;
            Ok(match e.kind.as_deref() {
                None | Some("PUT") => Event::Put(kv),
                Some("DELETE") => Event::Delete {
                    key: kv.key,
                    mod_revision: kv.mod_revision,
                },
                Some(k) => return Err(EtcdError::Malformed(format!("event type {k}"))),
            })
        })
        .collect::<Result<Vec<_>, EtcdError>>()?;
    Ok(WatchMessage::Events {
        revision: r.header.revision,
        events,
    })
}

fn request(authority: &str, path: &str, body: &str, keep_alive: bool) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: {}\r\n{}\r\n{body}",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" },
        // gRPC metadata `hasleader` (etcd's WithRequireLeader): a member
        // that loses its leader ends the watch with "no leader" instead
        // of keeping it open and silent while the majority moves on.
        if path == "/v3/watch" {
            "Grpc-Metadata-Hasleader: true\r\n"
        } else {
            ""
        }
    )
}

#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    Close,
}

struct Head {
    status: u16,
    framing: Framing,
    close: bool,
}

const MAX_HEAD: usize = 16 * 1024;

fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut tmp = [0u8; 16 * 1024];
    let n = s.read(&mut tmp)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "etcd closed the connection",
        ));
    }
    buf.extend_from_slice(&tmp[..n]);
    Ok(())
}

fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Head, EtcdError> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = parse_head(&buf[..end + 4])?;
            buf.drain(..end + 4);
            return Ok(head);
        }
        if buf.len() > MAX_HEAD {
            return Err(EtcdError::Malformed("response head too large".into()));
        }
        fill(s, buf)?;
    }
}

fn parse_head(b: &[u8]) -> Result<Head, EtcdError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    match r.parse(b) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(EtcdError::Malformed("bad response head".into())),
    }
    let status = r.code.unwrap_or(0);
    let mut framing = Framing::Close;
    let mut close = r.version == Some(0);
    for h in r.headers.iter() {
        let v = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = v
                .parse()
                .map_err(|_| EtcdError::Malformed("bad Content-Length".into()))?;
            if n > MAX_BODY {
                return Err(EtcdError::Malformed("body too large".into()));
            }
            framing = Framing::Length(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
            && v.eq_ignore_ascii_case("chunked")
        {
            framing = Framing::Chunked;
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = v.eq_ignore_ascii_case("close");
        }
    }
    if framing == Framing::Close {
        close = true;
    }
    Ok(Head {
        status,
        framing,
        close,
    })
}

fn read_length(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Result<Vec<u8>, EtcdError> {
    while buf.len() < n {
        fill(s, buf)?;
    }
    Ok(buf.drain(..n).collect())
}

/// Incremental decoder of a chunked body: moves the data of whole
/// chunks (and of partial ones as far as read) from `raw` to `out`, then
/// consumes the trailer section (etcd's gateway sends one on errors:
/// `Grpc-Trailer-Content-Type`), so a kept connection starts its next
/// response exactly after this one.
#[derive(Default, Debug)]
struct ChunkDecoder {
    state: ChunkState,
}

#[derive(Default, Debug, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// In a chunk's data, this many bytes left.
    Data(usize),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one (bytes of
    /// trailers seen so far, bounded).
    Trailers(usize),
    Done,
}

/// Longest chunk-size line, and the most trailer bytes taken.
const MAX_CHUNK_LINE: usize = 1024;
const MAX_TRAILERS: usize = 8 * 1024;

impl ChunkDecoder {
    /// Consumes what it can of `raw`; `Ok(true)` once the body and its
    /// trailers are complete.
    fn feed(&mut self, raw: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<bool, String> {
        let mut pos = 0;
        let res = self.step(raw, &mut pos, out);
        raw.drain(..pos);
        res
    }

    fn step(&mut self, raw: &[u8], pos: &mut usize, out: &mut Vec<u8>) -> Result<bool, String> {
        let line = |pos: usize| raw[pos..].windows(2).position(|w| w == b"\r\n");
        loop {
            match self.state {
                ChunkState::Done => return Ok(true),
                ChunkState::Data(left) => {
                    let take = left.min(raw.len() - *pos);
                    out.extend_from_slice(&raw[*pos..*pos + take]);
                    *pos += take;
                    if take < left {
                        self.state = ChunkState::Data(left - take);
                        return Ok(false);
                    }
                    self.state = ChunkState::DataEnd;
                }
                ChunkState::DataEnd => {
                    if raw.len() - *pos < 2 {
                        return Ok(false);
                    }
                    if &raw[*pos..*pos + 2] != b"\r\n" {
                        return Err("chunk not followed by CRLF".into());
                    }
                    *pos += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Size => {
                    let Some(nl) = line(*pos) else {
                        if raw.len() - *pos > MAX_CHUNK_LINE {
                            return Err("chunk size line too long".into());
                        }
                        return Ok(false);
                    };
                    let text =
                        std::str::from_utf8(&raw[*pos..*pos + nl]).map_err(|e| e.to_string())?;
                    let size = text.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(size, 16)
                        .map_err(|_| format!("bad chunk size {size:?}"))?;
                    if size > MAX_BODY {
                        return Err("chunk too large".into());
                    }
                    *pos += nl + 2;
                    self.state = if size == 0 {
                        ChunkState::Trailers(0)
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Trailers(seen) => {
                    let Some(nl) = line(*pos) else {
                        if seen + raw.len() - *pos > MAX_TRAILERS {
                            return Err("trailers too long".into());
                        }
                        return Ok(false);
                    };
                    *pos += nl + 2;
                    self.state = if nl == 0 {
                        ChunkState::Done
                    } else if seen + nl + 2 > MAX_TRAILERS {
                        return Err("trailers too long".into());
                    } else {
                        ChunkState::Trailers(seen + nl + 2)
                    };
                }
            }
        }
    }
}

fn status_error(http: u16, body: &[u8]) -> EtcdError {
    match serde_json::from_slice::<ErrorJson>(body) {
        Ok(e) => EtcdError::Status {
            http,
            code: e.code,
            message: e.message,
        },
        Err(_) => EtcdError::Status {
            http,
            code: 0,
            message: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        },
    }
}

fn parse<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, EtcdError> {
    serde_json::from_slice(b).map_err(|e| EtcdError::Malformed(e.to_string()))
}

/// The end of a prefix range: the prefix with its last byte below 0xff
/// incremented (bytes after it dropped).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): every key from the prefix on.
    vec![0]
}

/// An int64 as etcd's gateway writes it: a JSON string (or a number).
fn de_i64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        I(i64),
    }
    match N::deserialize(d)? {
        N::I(i) => Ok(i),
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Deserialize, Default)]
struct HeaderJson {
    #[serde(default, deserialize_with = "de_i64")]
    revision: i64,
}

#[derive(Deserialize)]
struct HeaderOnly {
    #[serde(default)]
    header: HeaderJson,
}

#[derive(Deserialize)]
struct Deleted {
    #[serde(default, deserialize_with = "de_i64")]
    deleted: i64,
}

#[derive(Deserialize)]
struct KvJson {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "de_i64")]
    mod_revision: i64,
}

impl KvJson {
    fn decode(self) -> Result<KeyValue, EtcdError> {
        let bad = |what: &str| EtcdError::Malformed(format!("{what} is not base64"));
        Ok(KeyValue {
            key: b64_decode(&self.key).ok_or_else(|| bad("key"))?,
            value: b64_decode(&self.value).ok_or_else(|| bad("value"))?,
            mod_revision: self.mod_revision,
        })
    }
}

#[derive(Deserialize)]
struct RangeJson {
    #[serde(default)]
    header: HeaderJson,
    #[serde(default)]
    kvs: Vec<KvJson>,
    #[serde(default)]
    more: bool,
}

#[derive(Deserialize)]
struct Grant {
    #[serde(rename = "ID", default, deserialize_with = "de_i64")]
    id: i64,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct KeepAlive {
    result: Option<KeepAliveResult>,
    error: Option<ErrorJson>,
}

#[derive(Deserialize)]
struct KeepAliveResult {
    /// Absent when the lease no longer exists.
    #[serde(rename = "TTL", default, deserialize_with = "de_i64")]
    ttl: i64,
}

#[derive(Deserialize)]
struct ErrorJson {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct WatchJson {
    result: Option<WatchResultJson>,
    error: Option<ErrorJson>,
}

#[derive(Deserialize)]
struct WatchResultJson {
    #[serde(default)]
    header: HeaderJson,
    #[serde(default)]
    created: bool,
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "de_i64")]
    compact_revision: i64,
    #[serde(default)]
    cancel_reason: String,
    #[serde(default)]
    events: Vec<EventJson>,
}

#[derive(Deserialize)]
struct EventJson {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    kv: KvJson,
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (what etcd's gateway reads and writes
/// for `bytes` fields).
pub fn b64_encode(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional); `None` on any other byte.
pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=').as_bytes();
    if s.len() % 4 == 1 {
        return None;
    }
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for c in s.chunks(4) {
        let mut n = 0u32;
        for (i, &b) in c.iter().enumerate() {
            n |= val(b)? << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if c.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if c.len() > 3 {
            out.push(n as u8);
        }
    }
    Some(out)
}

/// The address an endpoint URL names (for logs and tests).
pub fn endpoint_addr(url: &str) -> Option<SocketAddr> {
    parse_endpoint(url)
        .ok()?
        .authority
        .to_socket_addrs()
        .ok()?
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_known_vectors() {
        // RFC 4648 test vectors.
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(b64_encode(plain.as_bytes()), enc);
            assert_eq!(b64_decode(enc).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        for n in 0..all.len() {
            assert_eq!(b64_decode(&b64_encode(&all[..n])).unwrap(), &all[..n]);
        }
        assert_eq!(b64_decode("Zm9v!"), None);
        assert_eq!(b64_decode("Z"), None);
        assert_eq!(b64_decode("Zm-v"), None);
    }

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[test]
    fn endpoints_parse_with_a_default_port() {
        assert_eq!(
            parse_endpoint("http://127.0.0.1:2379").unwrap().authority,
            "127.0.0.1:2379"
        );
        assert_eq!(
            parse_endpoint("http://etcd/").unwrap().authority,
            "etcd:2379"
        );
        assert!(parse_endpoint("https://x").is_err());
        assert!(parse_endpoint("http://").is_err());
    }

    // Messages as etcd 3.4's gateway writes them (captured from a real
    // member).
    const CREATED: &str = r#"{"result":{"header":{"cluster_id":"1","member_id":"2","revision":"2","raft_term":"2"},"created":true}}"#;
    const PUT: &str = r#"{"result":{"header":{"revision":"3"},"events":[{"kv":{"key":"Zm9v","create_revision":"2","mod_revision":"3","version":"2","value":"YmF6"}}]}}"#;
    const DEL: &str = r#"{"result":{"header":{"revision":"4"},"events":[{"type":"DELETE","kv":{"key":"Zm9v","mod_revision":"4"}}]}}"#;

    #[test]
    fn watch_messages_parse() {
        assert_eq!(
            parse_watch_message(CREATED.as_bytes()).unwrap(),
            WatchMessage::Created { revision: 2 }
        );
        assert_eq!(
            parse_watch_message(PUT.as_bytes()).unwrap(),
            WatchMessage::Events {
                revision: 3,
                events: vec![Event::Put(KeyValue {
                    key: b"foo".to_vec(),
                    value: b"baz".to_vec(),
                    mod_revision: 3
                })]
            }
        );
        assert_eq!(
            parse_watch_message(DEL.as_bytes()).unwrap(),
            WatchMessage::Events {
                revision: 4,
                events: vec![Event::Delete {
                    key: b"foo".to_vec(),
                    mod_revision: 4
                }]
            }
        );
        let compacted = r#"{"result":{"header":{"revision":"9"},"canceled":true,"compact_revision":"7","cancel_reason":"mvcc: required revision has been compacted"}}"#;
        assert_eq!(
            parse_watch_message(compacted.as_bytes()).unwrap(),
            WatchMessage::Canceled {
                compact_revision: 7,
                reason: "mvcc: required revision has been compacted".into()
            }
        );
        let err = r#"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Service Unavailable"}}"#;
        assert_eq!(
            parse_watch_message(err.as_bytes()).unwrap(),
            WatchMessage::Error("etcdserver: no leader".into())
        );
        // Garbage and lies: an error, never a panic.
        for bad in [
            &b"not json"[..],
            b"{}",
            br#"{"result":{"events":[{"kv":{"key":"!!"}}]}}"#,
            br#"{"result":{"events":[{"type":"EXPLODE","kv":{}}]}}"#,
            br#"{"result":{"header":{"revision":"x"}}}"#,
        ] {
            assert!(parse_watch_message(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chunked_watch_stream_splits_messages_at_any_byte_boundary() {
        // Two messages in one chunk, one split over two chunks, then the
        // last chunk.
        let mut wire = Vec::new();
        let one = format!("{CREATED}\n{PUT}\n");
        wire.extend_from_slice(format!("{:x}\r\n{one}\r\n", one.len()).as_bytes());
        let (a, b) = DEL.split_at(10);
        wire.extend_from_slice(format!("{:x}\r\n{a}\r\n", a.len()).as_bytes());
        let b = format!("{b}\n");
        wire.extend_from_slice(format!("{:x}\r\n{b}\r\n0\r\n\r\n", b.len()).as_bytes());
        for step in [1, 2, 3, 7, 64, wire.len()] {
            let mut d = ChunkDecoder::default();
            let (mut raw, mut body, mut msgs) = (Vec::new(), Vec::new(), Vec::new());
            let mut done = false;
            for piece in wire.chunks(step) {
                raw.extend_from_slice(piece);
                done = d.feed(&mut raw, &mut body).unwrap();
                while let Some(m) = take_message(&mut body).unwrap() {
                    msgs.push(m);
                }
            }
            assert!(done, "step {step}");
            assert_eq!(msgs.len(), 3, "step {step}");
            assert!(matches!(msgs[2], WatchMessage::Events { revision: 4, .. }));
        }
        let mut d = ChunkDecoder::default();
        assert!(d.feed(&mut b"zz\r\n".to_vec(), &mut Vec::new()).is_err());
        // Trailers (etcd sends one with an error answer) are consumed, and
        // nothing after them: the next response on the connection stays.
        let wire =
            b"5\r\nhello\r\n0\r\nGrpc-Trailer-Content-Type: application/grpc\r\n\r\nHTTP/1.1";
        for step in [1, 3, wire.len()] {
            let mut d = ChunkDecoder::default();
            let (mut raw, mut out, mut done) = (Vec::new(), Vec::new(), false);
            for piece in wire.chunks(step) {
                raw.extend_from_slice(piece);
                done = d.feed(&mut raw, &mut out).unwrap();
                if done {
                    break;
                }
            }
            assert!(done, "step {step}");
            assert_eq!(out, b"hello");
            let rest_start = wire.len() - b"HTTP/1.1".len();
            let consumed_all_before = raw.is_empty() || wire[rest_start..].starts_with(&raw);
            assert!(consumed_all_before, "step {step}: left {raw:?}");
        }
        let mut d = ChunkDecoder::default();
        let mut endless = b"0\r\n".to_vec();
        endless.extend(std::iter::repeat_n(b'x', MAX_TRAILERS + 10));
        assert!(d.feed(&mut endless, &mut Vec::new()).is_err());
        let mut d = ChunkDecoder::default();
        assert!(d
            .feed(&mut b"3\r\nabcXY".to_vec(), &mut Vec::new())
            .is_err());
    }

    #[test]
    fn response_heads_say_how_the_body_ends() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert_eq!(
            (h.status, h.framing, h.close),
            (200, Framing::Length(5), false)
        );
        let h = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        let h = parse_head(b"HTTP/1.1 404 Not Found\r\n\r\n").unwrap();
        assert_eq!((h.framing, h.close), (Framing::Close, true));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
        let e = status_error(
            404,
            br#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#,
        );
        assert!(e.lease_not_found(), "{e}");
    }
}
