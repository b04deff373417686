//! An interpreter that turns arbitrary bytes into operations on a gateway
//! and an agent [`Connection`] wired back to back, checking the
//! connection's invariants after every operation. Shared by the cargo-fuzz
//! target `fuzz/fuzz_targets/conn.rs` and a unit test over random inputs,
//! so both check exactly the same thing.
//!
//! Checked after every operation, on both sides:
//! - `check_invariants()` is Ok and the control queue is within
//!   `control_queue_max() + 1`;
//! - while no frame was injected and both sides are open, uplink credit is
//!   conserved per direction whenever the receiver has no control frame
//!   queued (so no grant is hidden in its queue): send credit + queued DATA
//!   + DATA on the wire + what the receiver holds + grants on the wire back
//!   == `conn_window`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::conn::{CloseReason, Connection, Event, Inbound, Role};
use super::error::ErrorCode;
use super::frame::{Frame, FrameType};
use super::limits::{Heartbeat, Limits};

const LIMITS: Limits = Limits {
    max_frame: 1024,
    stream_window: 2048,
    conn_window: 5000,
    max_streams: 4,
};

/// Reads the input a byte at a time; `None` once it is used up.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

struct Side {
    conn: Connection,
    /// Frames this side sent, not yet delivered.
    wire: VecDeque<Frame>,
    /// Streams the app owns.
    ids: Vec<u32>,
    /// DATA received and not yet consumed: (stream, bytes).
    held: Vec<(u32, usize)>,
}

/// Runs the operations `data` encodes; panics when an invariant breaks.
#[doc(hidden)]
pub fn run(data: &[u8]) {
    let t0 = Instant::now();
    let hb = Heartbeat::from_interval(Duration::from_millis(100));
    let mut ms = 0u64;
    let mut sides = [
        Side {
            conn: Connection::new(Role::Gateway, LIMITS, hb, t0),
            wire: VecDeque::new(),
            ids: Vec::new(),
            held: Vec::new(),
        },
        Side {
            conn: Connection::new(Role::Agent, LIMITS, hb, t0),
            wire: VecDeque::new(),
            ids: Vec::new(),
            held: Vec::new(),
        },
    ];
    let mut benign = true;
    let mut input = Input(data);
    while let Some(op) = input.byte() {
        let now = t0 + Duration::from_millis(ms);
        let s = usize::from(op >> 7);
        let arg = input.byte().unwrap_or(0);
        let id = {
            let ids = &sides[s].ids;
            if ids.is_empty() {
                u32::from(arg % 8)
            } else {
                ids[usize::from(arg) % ids.len()]
            }
        };
        match op & 0x0f {
            0 => {
                let head = Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n");
                if let Ok(id) = sides[0].conn.open(head) {
                    sides[0].ids.push(id);
                }
            }
            1 | 2 => {
                let len = usize::from(arg) * 24;
                let mut body = Bytes::from(vec![op; len]);
                let _ = sides[s].conn.send_data(id, &mut body);
            }
            3 => {
                let head: &'static [u8] = if arg & 1 == 0 {
                    b"HTTP/1.1 100 Continue\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\n\r\n"
                };
                let _ = sides[1].conn.send_head(id, Bytes::from_static(head));
            }
            4 => {
                let _ = sides[s].conn.finish(id);
            }
            5 => sides[s]
                .conn
                .reset(id, ErrorCode::from_u32(u32::from(arg % 12))),
            6 => {
                sides[s].conn.release(id);
                sides[s].ids.retain(|i| *i != id);
            }
            7 => {
                let side = &mut sides[s];
                for _ in 0..=arg % 4 {
                    match side.conn.recv(id) {
                        Some(Inbound::Data(d)) if arg & 0x80 != 0 => side.held.push((id, d.len())),
                        Some(Inbound::Data(d)) => side.conn.consumed(id, d.len()),
                        Some(_) => {}
                        None => break,
                    }
                }
            }
            8 => {
                let side = &mut sides[s];
                for (id, n) in side.held.drain(..) {
                    side.conn.consumed(id, n);
                }
            }
            9 => {
                let side = &mut sides[s];
                let mut out = Vec::new();
                side.conn.poll_transmit(&mut out, now);
                side.conn.on_written(arg & 1 == 0, now);
                side.wire.extend(out);
            }
            10 | 11 => {
                // Deliver to side `s` what its peer sent.
                for _ in 0..=arg % 8 {
                    let Some(f) = sides[1 - s].wire.pop_front() else {
                        break;
                    };
                    sides[s].conn.handle_frame(f, now);
                }
            }
            12 => {
                ms += u64::from(arg) * 2;
                let now = t0 + Duration::from_millis(ms);
                for side in &mut sides {
                    side.conn.handle_timeout(now);
                }
            }
            13 => {
                // A frame as the peer's decoder-checked bytes could carry.
                let Some(kind) = FrameType::from_u8(input.byte().unwrap_or(0)) else {
                    continue;
                };
                let stream = if arg & 0x80 != 0 { id } else { u32::from(arg) };
                let len = usize::from(input.byte().unwrap_or(0));
                let payload = Bytes::copy_from_slice(input.take(len));
                let f = Frame::new(kind, stream, payload);
                if f.validate(LIMITS.max_frame).is_ok() {
                    benign = false;
                    sides[s].conn.handle_frame(f, now);
                }
            }
            14 => match arg % 3 {
                0 => sides[s].conn.go_away(ErrorCode::NoError, "fuzz"),
                1 => sides[s].conn.fail(ErrorCode::InternalError, "fuzz"),
                _ => sides[s].conn.close(CloseReason::Local("fuzz".into())),
            },
            _ => {
                sides[s].conn.consumed(id, 0);
            }
        }
        for side in &mut sides {
            while let Some(ev) = side.conn.poll_event() {
                if let Event::Opened { id, .. } = ev {
                    side.ids.push(id);
                }
            }
        }
        check(&sides, benign);
    }
}

fn check(sides: &[Side; 2], benign: bool) {
    for side in sides {
        let c = &side.conn;
        if let Err(e) = c.check_invariants() {
            panic!("{:?}: {e}", c.role());
        }
        assert!(c.control_queued() <= c.limits().control_queue_max() + 1);
    }
    let open = sides
        .iter()
        .all(|s| !s.conn.is_closed() && !s.conn.is_failing());
    if !(benign && open) {
        return;
    }
    for (tx, rx) in [(0, 1), (1, 0)] {
        let (sender, receiver) = (&sides[tx], &sides[rx]);
        if receiver.conn.control_queued() > 0 {
            continue;
        }
        let data: u64 = sender
            .wire
            .iter()
            .filter(|f| f.kind == FrameType::Data)
            .map(|f| f.payload.len() as u64)
            .sum();
        let grants: u64 = receiver
            .wire
            .iter()
            .filter(|f| f.kind == FrameType::Window && f.stream == 0)
            .map(|f| u64::from(f.window_increment().unwrap_or(0)))
            .sum();
        let total = sender.conn.send_credit()
            + (sender.conn.queued_data() + data + receiver.conn.recv_outstanding() + grants) as i64;
        assert_eq!(
            total,
            i64::from(LIMITS.conn_window),
            "uplink credit not conserved ({:?} -> {:?})",
            sender.conn.role(),
            receiver.conn.role()
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::proto::test_rng::XorShift;

    /// The fuzz target's checks on stable: 3000 random inputs.
    #[test]
    fn random_inputs() {
        let mut rng = XorShift::new(0xC0FF_EE00);
        for i in 0..3000 {
            let input = rng.noise(if i % 10 == 0 { 4000 } else { 600 });
            let result = std::panic::catch_unwind(|| super::run(&input));
            if let Err(e) = result {
                eprintln!("conn_fuzz input {i}: {input:02x?}");
                std::panic::resume_unwind(e);
            }
        }
    }
}
