//! The plain limit and timing types of an uplink, with the one set of
//! defaults that clap, `Default` and the gateway's ACCEPT all use.
//!
//! Every memory bound of an uplink derives from these numbers; see
//! docs/ARCHITECTURE.md ("Memory bounds") for the arithmetic.

use std::time::Duration;

/// Default initial credit per stream, in each direction.
///
/// Sized with the uplink window: a stream whose reader stalls ties up at
/// most this much of the uplink's credit, so `conn / stream` (64 with the
/// defaults) streams can stall at once before the uplink stops flowing
/// (stalled ones are closed after `--write-stall-timeout`).
pub const DEFAULT_STREAM_WINDOW: u32 = 256 * 1024;
/// Default initial credit per uplink, in each direction.
pub const DEFAULT_CONN_WINDOW: u32 = 16 * 1024 * 1024;
/// Default limit on concurrent streams per uplink. Sized so that one
/// uplink alone carries 10000 concurrent requests of a session (a public
/// request is served on the core that accepted it, over that core's
/// uplink, and the kernel may put most connections on one core), with
/// room to spare; the memory behind streams is bounded by the uplink's
/// credit (`DEFAULT_CONN_WINDOW`), not by this count. Shedding (503) is
/// then for a backend that cannot keep up, not for the default.
pub const DEFAULT_MAX_STREAMS: u32 = 16384;
/// Default largest frame payload (must cover the 64 KiB head limit).
pub const DEFAULT_MAX_FRAME: u32 = 256 * 1024;

/// How often each side pings its peer.
pub const PING_INTERVAL: Duration = Duration::from_secs(15);
/// An uplink that delivered no frame at all for this long is dead; an
/// uplink whose writer made no progress for this long is dead too.
pub const DEAD_AFTER: Duration = Duration::from_secs(45);

/// Largest DATA payload we produce: big enough to amortise headers, small
/// enough to interleave streams finely.
pub const DATA_CHUNK: usize = 64 * 1024;

/// Informational (1xx, not 101) heads accepted per stream before the final
/// one; more is a stream protocol error.
pub const MAX_INFORMATIONAL: u8 = 8;

/// PINGs that may arrive while the PONG for an earlier one is still
/// unsent. A peer past this is flooding PINGs without reading our answers.
pub const MAX_UNANSWERED_PINGS: u32 = 64;

/// Negotiated limits of one uplink (the gateway's ACCEPT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_frame: u32,
    pub stream_window: u32,
    pub conn_window: u32,
    pub max_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: DEFAULT_MAX_FRAME,
            stream_window: DEFAULT_STREAM_WINDOW,
            conn_window: DEFAULT_CONN_WINDOW,
            max_streams: DEFAULT_MAX_STREAMS,
        }
    }
}

impl Limits {
    /// Control frames (WINDOW, RESET, PING, GOAWAY) that may wait unsent
    /// before the peer counts as not reading: two per stream (a WINDOW and
    /// a RESET) plus slack for the connection's own.
    pub fn control_queue_max(&self) -> usize {
        2 * self.max_streams as usize + 64
    }
}

/// Heartbeat timing; tests shorten it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub interval: Duration,
    pub dead_after: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            interval: PING_INTERVAL,
            dead_after: DEAD_AFTER,
        }
    }
}

impl Heartbeat {
    /// The timing for a ping interval: dead after three missed ones.
    pub fn from_interval(interval: Duration) -> Self {
        Heartbeat {
            interval,
            dead_after: interval * 3,
        }
    }
}
