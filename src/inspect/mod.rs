//! The agent's request inspector (`--inspect ADDR`), off by default: the
//! last `--inspect-max` requests with their heads and the first
//! `--inspect-body-bytes` of each body, a page to browse them, and replay
//! of a chosen request to the local backend.
//!
//! Two halves that share nothing but a bounded channel:
//! - on the data path, each request served by an agent core fills a
//!   [`Capture`] (plain `Cell`/`RefCell` state of that core) and, when the
//!   request ends, hands one [`Record`] to [`Recorder::finish`], a
//!   `try_send` on a bounded crossbeam channel: no lock, no wait; when the
//!   channel is full the record is dropped and counted;
//! - off the data path, a service thread drains the channel into the
//!   [`Store`] (a ring of the last N records behind a mutex only the
//!   inspector threads touch), and another serves the page and the JSON
//!   API (`server.rs`).
//!
//! Memory bound: every record holds at most [`HEAD_CAP`] of each head and
//! `--inspect-body-bytes` of each body, plus [`PATH_CAP`] of path; the
//! store keeps `--inspect-max` records and the channel [`CHANNEL_CAP`], so
//! the inspector holds at most (max + 256) × (2 × 16 KiB + 2 × body cap +
//! 2 KiB) bytes of request data. Secrets are kept (replay needs them) but
//! never shown: the API masks `Authorization`, `Proxy-Authorization`,
//! `Cookie`, `Set-Cookie` and the `--inspect-mask` headers.

mod server;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::Bytes;

pub use server::start;

/// Each head (request, response) is kept up to this many bytes; a request
/// whose head was cut cannot be replayed.
pub const HEAD_CAP: usize = 16 * 1024;
/// The path shown in lists is cut here.
pub const PATH_CAP: usize = 2 * 1024;
/// Largest `--inspect-max`.
pub const MAX_RECORDS: usize = 100_000;
/// Records on their way from the cores to the store.
pub const CHANNEL_CAP: usize = 256;
/// Header values never shown, whatever `--inspect-mask` adds.
pub const ALWAYS_MASKED: [&str; 4] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

/// `--inspect ADDR` and its companions.
#[derive(Clone, Debug)]
pub struct InspectConfig {
    pub listen: String,
    /// Records kept (`--inspect-max`).
    pub max: usize,
    /// Bytes kept of each body (`--inspect-body-bytes`).
    pub body_bytes: usize,
    /// Extra header names whose values are masked (`--inspect-mask`).
    pub mask: Vec<String>,
}

impl InspectConfig {
    pub fn new(listen: &str) -> Self {
        InspectConfig {
            listen: listen.to_string(),
            max: 100,
            body_bytes: 1024,
            mask: Vec::new(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_RECORDS).contains(&self.max) {
            return Err(format!("--inspect-max must be 1 to {MAX_RECORDS}"));
        }
        if self.body_bytes > 1024 * 1024 {
            return Err("--inspect-body-bytes is at most 1048576".into());
        }
        Ok(())
    }
}

/// The first bytes of a body, and how long it was.
#[derive(Clone, Debug, Default)]
pub struct BodyPrefix {
    pub bytes: Vec<u8>,
    pub total: u64,
}

impl BodyPrefix {
    fn take(&mut self, piece: &[u8], cap: usize) {
        self.total += piece.len() as u64;
        let room = cap.saturating_sub(self.bytes.len());
        self.bytes
            .extend_from_slice(&piece[..room.min(piece.len())]);
    }

    pub fn truncated(&self) -> bool {
        (self.bytes.len() as u64) < self.total
    }
}

/// One finished request, as the inspector keeps it.
#[derive(Clone, Debug)]
pub struct Record {
    /// Given by the store, in arrival order (0 until stored).
    pub id: u64,
    pub at: SystemTime,
    pub method: String,
    pub path: String,
    /// The backend's status, if its head came.
    pub status: Option<u16>,
    /// What went wrong, if anything ("backend refused the connection").
    pub error: Option<String>,
    pub ms: f64,
    pub req_head: Bytes,
    pub req_head_truncated: bool,
    pub req_body: BodyPrefix,
    pub resp_head: Bytes,
    pub resp_body: BodyPrefix,
}

impl Record {
    /// The status the public client saw: the backend's, or the one the
    /// gateway answers for the failure.
    pub fn shown_status(&self) -> u16 {
        self.status
            .unwrap_or(if self.error.is_some() { 502 } else { 0 })
    }
}

/// A request being served, on one agent core.
pub struct Capture {
    body_cap: usize,
    at: SystemTime,
    start: Instant,
    method: String,
    path: String,
    req_head: Bytes,
    req_head_truncated: bool,
    req_body: RefCell<BodyPrefix>,
    resp_head: RefCell<Bytes>,
    resp_body: RefCell<BodyPrefix>,
    status: Cell<Option<u16>>,
}

impl Capture {
    pub fn new(rec: &Recorder, method: &str, path: &str, head: &Bytes) -> Self {
        let cut = head.len() > HEAD_CAP;
        Capture {
            body_cap: rec.body_cap,
            at: SystemTime::now(),
            start: Instant::now(),
            method: method.to_string(),
            path: cut_str(path, PATH_CAP).to_string(),
            req_head: copy_head(head),
            req_head_truncated: cut,
            req_body: RefCell::default(),
            resp_head: RefCell::default(),
            resp_body: RefCell::default(),
            status: Cell::new(None),
        }
    }

    pub fn request_body(&self, piece: &[u8]) {
        self.req_body.borrow_mut().take(piece, self.body_cap);
    }

    pub fn response_body(&self, piece: &[u8]) {
        self.resp_body.borrow_mut().take(piece, self.body_cap);
    }

    pub fn response_head(&self, status: u16, head: &Bytes) {
        self.status.set(Some(status));
        *self.resp_head.borrow_mut() = copy_head(head);
    }

    fn into_record(self, error: Option<String>) -> Record {
        Record {
            id: 0,
            at: self.at,
            method: self.method,
            path: self.path,
            status: self.status.get(),
            error,
            ms: self.start.elapsed().as_secs_f64() * 1e3,
            req_head: self.req_head,
            req_head_truncated: self.req_head_truncated,
            req_body: self.req_body.into_inner(),
            resp_head: self.resp_head.into_inner(),
            resp_body: self.resp_body.into_inner(),
        }
    }
}

/// At most `HEAD_CAP` of a head, copied: a slice would pin the buffer it
/// came from (an uplink's read buffer), outside the inspector's bound.
fn copy_head(head: &Bytes) -> Bytes {
    Bytes::copy_from_slice(&head[..head.len().min(HEAD_CAP)])
}

/// The data path's end of the inspector: one per agent, shared by its
/// cores (the channel's sender is lock-free for a bounded channel).
pub struct Recorder {
    tx: crossbeam_channel::Sender<Record>,
    body_cap: usize,
    dropped: Arc<AtomicU64>,
}

impl Recorder {
    /// Hands a finished request to the inspector; never waits.
    pub fn finish(&self, cap: Capture, error: Option<String>) {
        if self.tx.try_send(cap.into_record(error)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The last N records, newest last.
pub struct Store {
    pub cfg: InspectConfig,
    records: Mutex<VecDeque<Arc<Record>>>,
    next_id: AtomicU64,
    /// Records the cores could not hand over (channel full).
    pub dropped: Arc<AtomicU64>,
    /// Where replays go: the agent's `--to`.
    pub backend: std::net::SocketAddr,
}

impl Store {
    fn push(&self, mut r: Record) {
        r.id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut g = self.records.lock().unwrap_or_else(|e| e.into_inner());
        while g.len() >= self.cfg.max {
            g.pop_front();
        }
        g.push_back(Arc::new(r));
    }

    /// Newest first.
    pub fn list(&self) -> Vec<Arc<Record>> {
        let g = self.records.lock().unwrap_or_else(|e| e.into_inner());
        g.iter().rev().cloned().collect()
    }

    pub fn get(&self, id: u64) -> Option<Arc<Record>> {
        let g = self.records.lock().unwrap_or_else(|e| e.into_inner());
        g.iter().find(|r| r.id == id).cloned()
    }

    pub fn clear(&self) {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Whether header `name`'s value must not be shown.
    pub fn masked(&self, name: &str) -> bool {
        ALWAYS_MASKED.iter().any(|m| m.eq_ignore_ascii_case(name))
            || self.cfg.mask.iter().any(|m| m.eq_ignore_ascii_case(name))
    }
}

/// Makes the recorder for the cores and the store for the inspector
/// threads, and starts the thread that moves records between them.
pub fn channel(
    cfg: InspectConfig,
    backend: std::net::SocketAddr,
) -> std::io::Result<(Recorder, Arc<Store>)> {
    let (tx, rx) = crossbeam_channel::bounded(CHANNEL_CAP);
    let dropped = Arc::new(AtomicU64::new(0));
    let store = Arc::new(Store {
        records: Mutex::new(VecDeque::with_capacity(cfg.max.min(4096))),
        next_id: AtomicU64::new(0),
        dropped: dropped.clone(),
        backend,
        cfg: cfg.clone(),
    });
    let s = store.clone();
    crate::runtime::spawn_service_thread("inspect-drain", move || {
        // Ends when every sender (the agent) is gone.
        while let Ok(r) = rx.recv() {
            s.push(r);
        }
    })?;
    let rec = Recorder {
        tx,
        body_cap: cfg.body_bytes,
        dropped,
    };
    Ok((rec, store))
}

pub use crate::proto::control::truncate_at_char as cut_str;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_prefix_keeps_at_most_the_cap() {
        let mut b = BodyPrefix::default();
        b.take(&[1; 600], 1024);
        b.take(&[2; 600], 1024);
        b.take(&[3; 10], 1024);
        assert_eq!(b.bytes.len(), 1024);
        assert_eq!(b.total, 1210);
        assert!(b.truncated());
        assert_eq!(b.bytes[599], 1);
        assert_eq!(b.bytes[600], 2);
    }

    #[test]
    fn heads_are_cut_and_copied() {
        let (rec, _store) = channel(
            InspectConfig::new("127.0.0.1:0"),
            "127.0.0.1:1".parse().unwrap(),
        )
        .unwrap();
        let big = Bytes::from(vec![b'h'; HEAD_CAP + 4096]);
        let cap = Capture::new(&rec, "GET", &"/p".repeat(PATH_CAP), &big);
        cap.response_head(200, &big);
        let r = cap.into_record(None);
        assert_eq!(r.req_head.len(), HEAD_CAP);
        assert!(r.req_head_truncated);
        assert_eq!(r.resp_head.len(), HEAD_CAP);
        assert_eq!(r.path.len(), PATH_CAP);
        // Copies, not slices of the 20 KiB buffer.
        assert_ne!(r.req_head.as_ptr(), big.as_ptr());
        assert_ne!(r.resp_head.as_ptr(), big.as_ptr());
    }

    #[test]
    fn store_keeps_the_last_n() {
        let cfg = InspectConfig {
            max: 3,
            ..InspectConfig::new("127.0.0.1:0")
        };
        let (rec, store) = channel(cfg, "127.0.0.1:1".parse().unwrap()).unwrap();
        for i in 0..10 {
            let cap = Capture::new(&rec, "GET", &format!("/{i}"), &Bytes::from_static(b"x"));
            store.push(cap.into_record(None));
        }
        let l = store.list();
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].path, "/9");
        assert_eq!(l[2].path, "/7");
        assert!(store.get(l[1].id).is_some());
        assert!(store.get(1).is_none());
        assert!(store.masked("COOKIE"));
        assert!(!store.masked("x-api-key"));
    }
}
