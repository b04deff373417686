//! The uplink frame protocol as a sans-IO codec: bytes in, frames out;
//! frames in, bytes out. The wire format is specified in docs/PROTOCOL.md;
//! this module is its reference implementation.
//!
//! Owns:
//! - `kind`: `FrameType` and its header rules (a leaf: `error` and `frame`
//!   both use it, so the modules form no import circle);
//! - `frame`: the 12-byte header, `Frame`, `Decoder`, `encode`;
//! - `control`: typed payloads of the handshake (HELLO, ACCEPT, REFUSE) and
//!   of GOAWAY, plus the protocol's constants and defaults;
//! - `error`: `ErrorCode` (on the wire) and `ProtoError` (why a frame was
//!   rejected);
//! - `limits`: `Limits`, `Heartbeat` and the one set of defaults;
//! - `conn`: the uplink connection as a state machine (stream table, stream
//!   states, credit both ways, out-queue scheduling, deadlines, limits),
//!   driven by frames in, stream operations and `now`.
//!
//! No sockets, clocks or runtime here. The connection that owns a read
//! buffer calls `Decoder::decode` until it returns `Ok(None)`; the uplink
//! writer takes `Frame::header_bytes` plus the payload `Bytes` as two iovecs.
//!
//! Invariants, each pinned by a test:
//! - `decode` either consumes exactly one whole frame or leaves the buffer
//!   untouched, however the bytes were split across reads;
//! - a decoded frame re-encodes to exactly the bytes it was decoded from;
//! - a header announcing more than the limit is rejected as soon as its 12
//!   bytes arrive, so a peer cannot make us buffer an oversized frame;
//! - no input makes the decoder or a typed payload parser panic.

pub mod conn;
#[doc(hidden)]
pub mod conn_fuzz;
pub mod control;
pub mod error;
pub mod frame;
#[doc(hidden)]
pub mod invariants;
pub mod kind;
pub mod limits;
pub mod tcp;

pub use conn::{Connection, Event, Inbound, OpenError, Role, StreamError, StreamState};
pub use control::{
    valid_session_name, Accept, AcceptNode, Hello, PublicEndpoint, CAP_CLUSTER, CAP_PEER,
    CAP_PUBLIC_URL, MAGIC, MAX_ACCEPT_NODES, MAX_REASON_LEN, MAX_SESSION_NAME, MIN_MAX_FRAME,
    PROTOCOL_VERSION,
};
pub use error::{ErrorCode, ProtoError};
pub use frame::{
    encode, Decoder, Frame, FrameType, Header, StreamRule, DEFAULT_MAX_FRAME, FLAG_NONE,
    HEADER_LEN, MAX_FRAME_CEILING,
};
pub use limits::{
    Heartbeat, Limits, DATA_CHUNK, DEAD_AFTER, DEFAULT_CONN_WINDOW, DEFAULT_MAX_STREAMS,
    DEFAULT_STREAM_WINDOW, PING_INTERVAL,
};

/// A tiny deterministic PRNG for the randomised tests, so they need no extra
/// crate and every failure reproduces from its seed.
#[cfg(test)]
pub(crate) mod test_rng {
    pub struct XorShift(u64);

    impl XorShift {
        pub fn new(seed: u64) -> Self {
            // xorshift has a fixed point at 0.
            Self(seed | 1)
        }

        pub fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        pub fn next_u32(&mut self) -> u32 {
            (self.next_u64() >> 32) as u32
        }

        /// Uniform enough in `0..n` for tests; `n` must be non-zero.
        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }

        pub fn chance(&mut self, one_in: usize) -> bool {
            self.below(one_in) == 0
        }

        pub fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next_u64() as u8).collect()
        }

        /// Random bytes, fewer than `max`.
        pub fn noise(&mut self, max: usize) -> Vec<u8> {
            let len = self.below(max);
            self.bytes(len)
        }

        pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }
}
