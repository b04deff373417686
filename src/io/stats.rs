//! Per-core counters, gauges and bucketed histograms.
//!
//! Each core writes only its own [`CoreStats`] (relaxed atomics on a
//! cache line nobody else writes, so no contention and no lock); the admin
//! endpoint and the bench report read all cores and merge.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Kinds of errors counted per core (the `kind` label of
/// `ringtunnel_errors_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    HeadTooLarge,
    HeaderTimeout,
    NoSession,
    Overloaded,
    BackendConnect,
    BackendTimeout,
    BackendReset,
    AgentGone,
    Protocol,
    HandshakeRefused,
    ClientIo,
    /// A request body paused past `--body-idle-timeout`.
    BodyTimeout,
    /// A client stopped reading past `--write-stall-timeout`.
    WriteStall,
    /// A TLS handshake on the tunnel listener failed (a peer without TLS,
    /// an untrusted or missing client certificate, a timeout).
    TlsHandshake,
    /// `--proxy-protocol`: a connection without a valid PROXY header, or
    /// one from a peer outside `--trusted-proxies`; closed unanswered.
    ProxyProtocol,
    /// A public connection over `--max-conns` or `--max-conns-per-ip`.
    ConnLimit,
    /// A public connection refused to keep the fd reserve for agents.
    FdReserve,
    /// A tunnel connection closed at accept: the core's handshake cap, or
    /// its IP is banned after failed handshakes.
    HandshakeLimit,
    /// A request over its session's rate (429).
    RateLimited,
    /// A TLS handshake on the public HTTPS listener failed (plain HTTP,
    /// garbage, a client that left or stalled); closed unanswered.
    HttpsHandshake,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 21] = [
        ErrorKind::BadRequest,
        ErrorKind::HeadTooLarge,
        ErrorKind::HeaderTimeout,
        ErrorKind::NoSession,
        ErrorKind::Overloaded,
        ErrorKind::BackendConnect,
        ErrorKind::BackendTimeout,
        ErrorKind::BackendReset,
        ErrorKind::AgentGone,
        ErrorKind::Protocol,
        ErrorKind::HandshakeRefused,
        ErrorKind::ClientIo,
        ErrorKind::BodyTimeout,
        ErrorKind::WriteStall,
        ErrorKind::TlsHandshake,
        ErrorKind::ProxyProtocol,
        ErrorKind::ConnLimit,
        ErrorKind::FdReserve,
        ErrorKind::HandshakeLimit,
        ErrorKind::RateLimited,
        ErrorKind::HttpsHandshake,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::HeadTooLarge => "head_too_large",
            ErrorKind::HeaderTimeout => "header_timeout",
            ErrorKind::NoSession => "no_session",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::BackendConnect => "backend_connect",
            ErrorKind::BackendTimeout => "backend_timeout",
            ErrorKind::BackendReset => "backend_reset",
            ErrorKind::AgentGone => "agent_gone",
            ErrorKind::Protocol => "protocol",
            ErrorKind::HandshakeRefused => "handshake_refused",
            ErrorKind::ClientIo => "client_io",
            ErrorKind::BodyTimeout => "body_timeout",
            ErrorKind::WriteStall => "write_stall",
            ErrorKind::TlsHandshake => "tls_handshake",
            ErrorKind::ProxyProtocol => "proxy_protocol",
            ErrorKind::ConnLimit => "conn_limit",
            ErrorKind::FdReserve => "fd_reserve",
            ErrorKind::HandshakeLimit => "handshake_limit",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::HttpsHandshake => "https_handshake",
        }
    }
}

/// Bucket upper bounds (`le`), then +Inf. Fine steps up to 16 because the
/// interesting question ("does the writer batch at least 8 frames?") sits
/// there; coarse above.
pub const HIST_BOUNDS: [u64; 20] = [
    1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024,
];
pub const HIST_BUCKETS: usize = HIST_BOUNDS.len() + 1;

#[derive(Default)]
pub struct Hist {
    buckets: [AtomicU64; HIST_BUCKETS],
    sum: AtomicU64,
    count: AtomicU64,
    max: AtomicU64,
}

impl Hist {
    pub fn bucket_bound(i: usize) -> Option<u64> {
        HIST_BOUNDS.get(i).copied()
    }

    /// Index of the bucket holding `v`.
    pub fn bucket_of(v: u64) -> usize {
        HIST_BOUNDS.partition_point(|b| *b < v)
    }

    pub fn record(&self, v: u64) {
        self.buckets[Self::bucket_of(v)].fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.max.fetch_max(v, Relaxed);
    }

    pub fn snapshot(&self) -> HistSnapshot {
        HistSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Relaxed)),
            sum: self.sum.load(Relaxed),
            count: self.count.load(Relaxed),
            max: self.max.load(Relaxed),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistSnapshot {
    pub buckets: [u64; HIST_BUCKETS],
    pub sum: u64,
    pub count: u64,
    pub max: u64,
}

impl HistSnapshot {
    pub fn merge(&mut self, o: &HistSnapshot) {
        for i in 0..HIST_BUCKETS {
            self.buckets[i] += o.buckets[i];
        }
        self.sum += o.sum;
        self.count += o.count;
        self.max = self.max.max(o.max);
    }

    /// Upper bound of the bucket holding quantile `q` (0..=1), capped by
    /// the observed max: buckets are powers of two, so this is an upper
    /// estimate within a factor of two.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for i in 0..HIST_BUCKETS {
            seen += self.buckets[i];
            if seen >= rank {
                return Hist::bucket_bound(i).unwrap_or(self.max).min(self.max);
            }
        }
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }
}

/// Everything one core counts. Gauges are `current` values.
#[derive(Default)]
pub struct CoreStats {
    pub public_conns: AtomicU64,
    pub public_conns_total: AtomicU64,
    pub requests: AtomicU64,
    pub handoffs_out: AtomicU64,
    pub handoffs_in: AtomicU64,
    pub active_streams: AtomicU64,
    pub uplinks: AtomicU64,
    pub frames: AtomicU64,
    pub writevs: AtomicU64,
    pub bytes_out: AtomicU64,
    pub frames_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub queue_depth: AtomicU64,
    pub queue_depth_max: AtomicU64,
    pub frames_per_writev: Hist,
    pub kib_per_writev: Hist,
    pub errors: [AtomicU64; ErrorKind::ALL.len()],
    /// HTTPS connections whose TLS side is on this core (handshake or
    /// relay); their HTTP side counts in `public_conns` wherever it is.
    pub https_conns: AtomicU64,
    /// Public TCP tunnel connections open now / served (gateway).
    pub tcp_conns: AtomicU64,
    pub tcp_conns_total: AtomicU64,
    /// TCP tunnel bytes from public clients / to public clients (gateway).
    pub tcp_bytes_in: AtomicU64,
    pub tcp_bytes_out: AtomicU64,
    /// Cluster (gateway): requests sent over a peer link to a holder node
    /// (each attempt), forwarded streams received from peers, NOT_HERE
    /// answers that sent a request on to the next holder, and peer links
    /// open now (both directions; they count in `uplinks` too).
    pub forwarded_out: AtomicU64,
    pub forwarded_in: AtomicU64,
    pub forward_retries: AtomicU64,
    pub peer_links: AtomicU64,
}

impl CoreStats {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    pub fn dec(c: &AtomicU64) {
        c.fetch_sub(1, Relaxed);
    }

    pub fn error(&self, kind: ErrorKind) {
        let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.errors[i].fetch_add(1, Relaxed);
    }

    pub fn error_count(&self, kind: ErrorKind) -> u64 {
        let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.errors[i].load(Relaxed)
    }

    pub fn record_writev(&self, frames: usize, bytes: usize) {
        self.writevs.fetch_add(1, Relaxed);
        self.frames.fetch_add(frames as u64, Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Relaxed);
        self.frames_per_writev.record(frames as u64);
        self.kib_per_writev.record(bytes.div_ceil(1024) as u64);
    }

    pub fn queue_add(&self, n: u64) {
        let now = self.queue_depth.fetch_add(n, Relaxed) + n;
        self.queue_depth_max.fetch_max(now, Relaxed);
    }

    pub fn queue_sub(&self, n: u64) {
        self.queue_depth.fetch_sub(n, Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }
}

// ---------------------------------------------------------------------
// Per-session sliding windows (the admin dashboard).
// ---------------------------------------------------------------------

/// One-second buckets in a session's window: the last minute.
pub const WINDOW_SECS: usize = 60;

/// Latency bucket upper bounds in microseconds (1-2-5 steps), then +Inf.
/// Quantiles interpolate inside a bucket and are capped by the window's
/// largest latency.
pub const LATENCY_BOUNDS_US: [u32; 17] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 2_000_000, 5_000_000, 10_000_000,
];
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// Sessions one core keeps a window for. A session that finds every slot
/// held by a live session is not tracked (counted in
/// [`SessionWindows::untracked`]); slots of sessions gone from the core
/// are reused, least recently gone first.
pub const MAX_WINDOW_SESSIONS: usize = 2048;

/// Bytes of one session's window on one core (what the bound says).
pub const WINDOW_BYTES: usize = std::mem::size_of::<Window>();
// The bound the docs state: 60 seconds of 22 four-byte counters.
const _: () = assert!(WINDOW_BYTES == WINDOW_SECS * (4 + LATENCY_BUCKETS) * 4);

/// Seconds since the first call in this process: the windows' clock.
pub fn window_second(at: std::time::Instant) -> u32 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    at.saturating_duration_since(epoch).as_secs() as u32
}

/// Single-writer increment: only the owning core writes, so a plain load
/// and store (no locked read-modify-write) is exact.
fn bump(a: &std::sync::atomic::AtomicU32, n: u32) {
    a.store(a.load(Relaxed).saturating_add(n), Relaxed);
}

/// One second of one session on one core.
#[derive(Default)]
struct Second {
    /// The second it holds plus one; 0 while empty or being reset (a
    /// sequence lock for the reader: see [`Window::read`]).
    stamp: std::sync::atomic::AtomicU32,
    requests: std::sync::atomic::AtomicU32,
    errors: std::sync::atomic::AtomicU32,
    max_us: std::sync::atomic::AtomicU32,
    latency: [std::sync::atomic::AtomicU32; LATENCY_BUCKETS],
}

/// A session's last [`WINDOW_SECS`] seconds on one core: a ring indexed
/// by second. Written by its core only; read by the admin thread.
pub struct Window {
    seconds: [Second; WINDOW_SECS],
}

impl Default for Window {
    fn default() -> Self {
        Window {
            seconds: std::array::from_fn(|_| Second::default()),
        }
    }
}

impl Window {
    /// Counts one request that ended at second `now`: its latency (None
    /// for a request answered without reaching the agent) and whether it
    /// failed.
    fn record(&self, now: u32, latency_us: Option<u64>, error: bool) {
        let s = &self.seconds[now as usize % WINDOW_SECS];
        if s.stamp.load(Relaxed) != now + 1 {
            // A new second takes over this bucket: mark it invalid, zero
            // it, then publish its second (Release: after the zeros).
            s.stamp.store(0, Relaxed);
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            s.requests.store(0, Relaxed);
            s.errors.store(0, Relaxed);
            s.max_us.store(0, Relaxed);
            for b in &s.latency {
                b.store(0, Relaxed);
            }
            s.stamp.store(now + 1, std::sync::atomic::Ordering::Release);
        }
        bump(&s.requests, 1);
        if error {
            bump(&s.errors, 1);
        }
        if let Some(us) = latency_us {
            let us = us.min(u32::MAX as u64) as u32;
            bump(
                &s.latency[LATENCY_BOUNDS_US.partition_point(|b| *b < us)],
                1,
            );
            if us > s.max_us.load(Relaxed) {
                s.max_us.store(us, Relaxed);
            }
        }
    }

    /// Forgets everything (the slot goes to another session).
    fn clear(&self) {
        for s in &self.seconds {
            s.stamp.store(0, Relaxed);
        }
    }

    /// Adds the seconds `now - 59 ..= now` into `into`. A bucket being
    /// reset while read is skipped (its stamp changed); a request being
    /// counted while read may show in one field and not yet another.
    fn read(&self, now: u32, into: &mut WindowSnapshot) {
        use std::sync::atomic::Ordering::Acquire;
        for s in &self.seconds {
            let stamp = s.stamp.load(Acquire);
            let Some(sec) = stamp.checked_sub(1) else {
                continue;
            };
            if sec > now || now - sec >= WINDOW_SECS as u32 {
                continue;
            }
            let requests = s.requests.load(Relaxed);
            let errors = s.errors.load(Relaxed);
            let max_us = s.max_us.load(Relaxed);
            let latency: [u32; LATENCY_BUCKETS] =
                std::array::from_fn(|i| s.latency[i].load(Relaxed));
            std::sync::atomic::fence(Acquire);
            if s.stamp.load(Relaxed) != stamp {
                continue;
            }
            let age = (now - sec) as usize;
            into.per_second[WINDOW_SECS - 1 - age] += requests as u64;
            into.requests += requests as u64;
            into.errors += errors as u64;
            into.max_us = into.max_us.max(max_us);
            for (a, b) in into.latency.iter_mut().zip(latency) {
                *a += b as u64;
            }
        }
    }
}

/// A session's window as read (and merged over cores) by the admin thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowSnapshot {
    /// Requests per second, oldest first; the last entry is the current
    /// (incomplete) second.
    pub per_second: [u64; WINDOW_SECS],
    pub requests: u64,
    pub errors: u64,
    pub latency: [u64; LATENCY_BUCKETS],
    pub max_us: u32,
}

impl Default for WindowSnapshot {
    fn default() -> Self {
        WindowSnapshot {
            per_second: [0; WINDOW_SECS],
            requests: 0,
            errors: 0,
            latency: [0; LATENCY_BUCKETS],
            max_us: 0,
        }
    }
}

impl WindowSnapshot {
    pub fn merge(&mut self, o: &WindowSnapshot) {
        for (a, b) in self.per_second.iter_mut().zip(o.per_second) {
            *a += b;
        }
        for (a, b) in self.latency.iter_mut().zip(o.latency) {
            *a += b;
        }
        self.requests += o.requests;
        self.errors += o.errors;
        self.max_us = self.max_us.max(o.max_us);
    }

    /// Requests per second over the last `secs` complete seconds (the
    /// current second is left out: it is still filling).
    pub fn rate(&self, secs: usize) -> f64 {
        let secs = secs.clamp(1, WINDOW_SECS - 1);
        let done = &self.per_second[..WINDOW_SECS - 1];
        done[done.len() - secs..].iter().sum::<u64>() as f64 / secs as f64
    }

    /// Requests in the window divided by its length: the last minute's
    /// mean rate.
    pub fn rate_1m(&self) -> f64 {
        self.requests as f64 / WINDOW_SECS as f64
    }

    /// Latency quantile `q` (0..=1) in microseconds: linear inside the
    /// bucket that holds it, capped by the largest latency seen. 0 when
    /// nothing was timed.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let count: u64 = self.latency.iter().sum();
        if count == 0 {
            return 0;
        }
        let rank = ((count as f64) * q).ceil().max(1.0);
        let mut seen = 0u64;
        for (i, &n) in self.latency.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (seen + n) as f64 >= rank {
                let lo = if i == 0 { 0 } else { LATENCY_BOUNDS_US[i - 1] } as f64;
                let hi = LATENCY_BOUNDS_US
                    .get(i)
                    .map_or(self.max_us as f64, |b| *b as f64);
                let frac = (rank - seen as f64) / n as f64;
                let v = lo + (hi - lo).max(0.0) * frac;
                return (v as u64).min(self.max_us as u64);
            }
            seen += n;
        }
        self.max_us as u64
    }
}

/// A slot of [`SessionWindows`]: which session it counts for, and its
/// window. `generation` is odd while the core hands the slot to another
/// session, so a reader never merges one session's seconds under
/// another's name.
#[derive(Default)]
struct Slot {
    generation: AtomicU64,
    /// Written by the core when the slot changes hands (not per request);
    /// read by the admin thread.
    name: std::sync::Mutex<Option<std::sync::Arc<str>>>,
    window: std::sync::OnceLock<Box<Window>>,
}

/// One core's per-session windows, shared with the admin thread: the core
/// writes through its [`WindowWriter`], the admin thread reads with
/// [`SessionWindows::read`]. Memory: the slot table is allocated at
/// start-up (a few dozen bytes a slot); a slot's [`Window`]
/// ([`WINDOW_BYTES`], about 5.2 KiB) the first time a session takes it,
/// and kept for reuse.
pub struct SessionWindows {
    slots: Box<[Slot]>,
    untracked: AtomicU64,
}

impl SessionWindows {
    pub fn new(cap: usize) -> Self {
        SessionWindows {
            slots: (0..cap).map(|_| Slot::default()).collect(),
            untracked: AtomicU64::new(0),
        }
    }

    /// How many slots (sessions) this core may track.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Sessions that found no free slot.
    pub fn untracked(&self) -> u64 {
        self.untracked.load(Relaxed)
    }

    /// Adds the window of every named slot at second `now` into `out`,
    /// by session name (several cores merge into one map).
    pub fn read(
        &self,
        now: u32,
        out: &mut std::collections::HashMap<std::sync::Arc<str>, WindowSnapshot>,
    ) {
        use std::sync::atomic::Ordering::Acquire;
        for slot in self.slots.iter() {
            let g = slot.generation.load(Acquire);
            let Some(window) = slot.window.get() else {
                continue;
            };
            if g % 2 == 1 {
                continue;
            }
            let Some(name) = slot.name.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
                continue;
            };
            let mut snap = WindowSnapshot::default();
            window.read(now, &mut snap);
            std::sync::atomic::fence(Acquire);
            if slot.generation.load(Relaxed) != g {
                continue;
            }
            out.entry(name).or_default().merge(&snap);
        }
    }
}

/// The core's side of its [`SessionWindows`]: which slot each session
/// has (live: it has uplinks here; gone: kept until the slot is needed).
pub struct WindowWriter {
    shared: std::sync::Arc<SessionWindows>,
    index: std::cell::RefCell<std::collections::HashMap<String, usize>>,
    /// Per slot: its session, whether it is live, when it went.
    slots: std::cell::RefCell<Vec<(Option<String>, bool, u32)>>,
}

impl WindowWriter {
    pub fn new(shared: std::sync::Arc<SessionWindows>) -> Self {
        let n = shared.capacity();
        WindowWriter {
            shared,
            index: Default::default(),
            slots: std::cell::RefCell::new(vec![(None, false, 0); n]),
        }
    }

    /// `session` has uplinks on this core: gives it a slot (its own from before if still there; else a never used one;
    /// else the one of the session gone the longest). When every slot is
    /// live the session is not tracked.
    pub fn open(&self, session: &str) {
        let mut index = self.index.borrow_mut();
        let mut slots = self.slots.borrow_mut();
        if let Some(&i) = index.get(session) {
            slots[i].1 = true;
            return;
        }
        let free = slots.iter().position(|s| s.0.is_none()).or_else(|| {
            slots
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.1)
                .min_by_key(|(_, s)| s.2)
                .map(|(i, _)| i)
        });
        let Some(i) = free else {
            self.shared.untracked.fetch_add(1, Relaxed);
            return;
        };
        if let Some(old) = slots[i].0.take() {
            index.remove(&old);
        }
        let slot = &self.shared.slots[i];
        slot.generation.fetch_add(1, Relaxed);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        slot.window.get_or_init(Default::default).clear();
        *slot.name.lock().unwrap_or_else(|e| e.into_inner()) = Some(session.into());
        slot.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        slots[i] = (Some(session.to_string()), true, 0);
        index.insert(session.to_string(), i);
    }

    /// `session` has no uplink on this core any more (at second `now`):
    /// its window stays readable until the slot is needed.
    pub fn close(&self, session: &str, now: u32) {
        if let Some(&i) = self.index.borrow().get(session) {
            let mut slots = self.slots.borrow_mut();
            slots[i].1 = false;
            slots[i].2 = now;
        }
    }

    /// Counts one request of `session` that ended at second `now` (see
    /// [`Window::record`]). A session without a slot is not counted.
    pub fn record(&self, session: &str, now: u32, latency_us: Option<u64>, error: bool) {
        if let Some(&i) = self.index.borrow().get(session) {
            if let Some(w) = self.shared.slots[i].window.get() {
                w.record(now, latency_us, error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_has_its_own_counter() {
        let c = CoreStats::default();
        for (i, k) in ErrorKind::ALL.into_iter().enumerate() {
            for _ in 0..=i {
                c.error(k);
            }
        }
        for (i, k) in ErrorKind::ALL.into_iter().enumerate() {
            assert_eq!(c.error_count(k), i as u64 + 1, "{}", k.as_str());
        }
    }

    #[test]
    fn hist_buckets_and_quantiles() {
        let h = Hist::default();
        for v in [1u64, 2, 3, 4, 8, 9, 16, 2000] {
            h.record(v);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 8);
        assert_eq!(s.buckets[Hist::bucket_of(1)], 1);
        assert_eq!(Hist::bucket_of(8), 7);
        assert_eq!(Hist::bucket_of(9), 8); // le=10
        assert_eq!(s.buckets[8], 1);
        assert_eq!(s.buckets[HIST_BUCKETS - 1], 1); // 2000 -> +Inf
        assert_eq!(s.max, 2000);
        assert_eq!(s.quantile(0.5), 4);
        assert_eq!(s.quantile(0.75), 10);
        assert_eq!(s.quantile(1.0), 2000);
    }

    fn read_all(
        w: &SessionWindows,
        now: u32,
    ) -> std::collections::HashMap<std::sync::Arc<str>, WindowSnapshot> {
        let mut m = std::collections::HashMap::new();
        w.read(now, &mut m);
        m
    }

    #[test]
    fn window_slides_with_a_virtual_clock() {
        let shared = std::sync::Arc::new(SessionWindows::new(4));
        let w = WindowWriter::new(shared.clone());
        w.open("a");
        // Seconds 100..=104: 10 requests each, one error per second,
        // latencies 1 ms (9 of them) and 40 ms (1).
        for sec in 100..105 {
            for i in 0..10 {
                let lat = if i == 9 { 40_000 } else { 1_000 };
                w.record("a", sec, Some(lat), i == 0);
            }
        }
        let s = &read_all(&shared, 105)["a"];
        assert_eq!((s.requests, s.errors), (50, 5));
        assert_eq!(&s.per_second[54..], &[10, 10, 10, 10, 10, 0]);
        assert_eq!(s.rate(5), 10.0);
        assert_eq!(s.rate(10), 5.0);
        assert!((s.rate_1m() - 50.0 / 60.0).abs() < 1e-9);
        // p50 in the (500, 1000] µs bucket, p99 in (20, 50] ms capped by
        // the max of 40 ms.
        assert!(
            (500..=1_000).contains(&s.quantile_us(0.5)),
            "{}",
            s.quantile_us(0.5)
        );
        assert_eq!(s.quantile_us(0.99), 40_000);
        assert_eq!(s.max_us, 40_000);
        // 59 s later second 100 is the oldest still in the window; one
        // more and it is gone. A bucket reused by a new second starts at
        // zero.
        assert_eq!(read_all(&shared, 159)["a"].requests, 50);
        assert_eq!(read_all(&shared, 160)["a"].requests, 40);
        w.record("a", 160, Some(5), false);
        let s = &read_all(&shared, 160)["a"];
        assert_eq!((s.requests, s.per_second[WINDOW_SECS - 1]), (41, 1));
        assert_eq!(read_all(&shared, 300)["a"], WindowSnapshot::default());
        // A reader behind the writer (a second not reached yet) ignores
        // newer buckets rather than misplacing them.
        assert_eq!(read_all(&shared, 99)["a"].requests, 0);
        // Unknown sessions are not counted.
        w.record("nobody", 160, None, true);
        assert!(!read_all(&shared, 160).contains_key("nobody"));
    }

    #[test]
    fn windows_of_cores_merge_by_session() {
        let (a, b) = (
            std::sync::Arc::new(SessionWindows::new(2)),
            std::sync::Arc::new(SessionWindows::new(2)),
        );
        let (wa, wb) = (WindowWriter::new(a.clone()), WindowWriter::new(b.clone()));
        wa.open("s");
        wb.open("s");
        wa.record("s", 7, Some(100), false);
        wb.record("s", 7, Some(3_000_000), true);
        wb.record("s", 6, None, true);
        let mut m = std::collections::HashMap::new();
        a.read(7, &mut m);
        b.read(7, &mut m);
        let s = &m["s"];
        assert_eq!((s.requests, s.errors, s.max_us), (3, 2, 3_000_000));
        assert_eq!(s.latency.iter().sum::<u64>(), 2);
        assert_eq!(&s.per_second[58..], &[1, 2]);
    }

    #[test]
    fn window_slots_are_capped_and_reused_oldest_gone_first() {
        let shared = std::sync::Arc::new(SessionWindows::new(3));
        let w = WindowWriter::new(shared.clone());
        for n in ["a", "b", "c"] {
            w.open(n);
            w.record(n, 10, Some(10), false);
        }
        // Every slot is live: "d" is not tracked, and says so.
        w.open("d");
        w.record("d", 10, Some(10), false);
        assert_eq!(shared.untracked(), 1);
        assert_eq!(read_all(&shared, 10).len(), 3);
        // Gone sessions stay readable until their slot is needed; the
        // one gone first is reused first, and starts empty.
        w.close("b", 11);
        w.close("a", 12);
        assert_eq!(read_all(&shared, 12)["b"].requests, 1);
        w.open("d");
        w.record("d", 12, Some(10), false);
        let m = read_all(&shared, 12);
        assert!(!m.contains_key("b"));
        assert_eq!((m["a"].requests, m["d"].requests), (1, 1));
        // A session coming back keeps its own slot and history.
        w.open("a");
        w.record("a", 12, None, false);
        assert_eq!(read_all(&shared, 12)["a"].requests, 2);
        // The bound: 3 slots, each one window.
        assert_eq!(shared.capacity(), 3);
    }
}
