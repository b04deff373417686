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
}
