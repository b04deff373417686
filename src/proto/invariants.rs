//! Invariants of decoded frames, shared by the randomized unit tests and
//! the cargo-fuzz target (`fuzz/`), so both check exactly the same thing.

use super::{Frame, FrameType};

/// Panics unless every typed payload that the decoder let through parses,
/// and HELLO/ACCEPT survive their own re-encoding.
pub fn assert_typed_payloads_round_trip(frame: &Frame) {
    match frame.kind {
        FrameType::Window => assert!(frame.window_increment().is_ok()),
        FrameType::Reset => assert!(frame.reset_code().is_ok()),
        FrameType::Ping | FrameType::Pong => assert!(frame.ping_payload().is_ok()),
        FrameType::GoAway => assert!(frame.parse_goaway().is_ok()),
        FrameType::Refuse => assert!(frame.parse_refuse().is_ok()),
        FrameType::Hello => {
            if let Ok(hello) = frame.parse_hello() {
                assert_eq!(Frame::hello(&hello).parse_hello(), Ok(hello));
            }
        }
        FrameType::Accept => {
            if let Ok(accept) = frame.parse_accept() {
                assert_eq!(Frame::accept(&accept).parse_accept(), Ok(accept));
            }
        }
        FrameType::Open => {
            // A TCP tunnel OPEN has an exact layout: what parses is the
            // encoding of what it parsed to.
            if let Ok(open) = super::tcp::TcpOpen::decode(&frame.payload) {
                assert_eq!(open.encode(), frame.payload);
            }
        }
        FrameType::Response | FrameType::Data | FrameType::End => {}
    }
}
