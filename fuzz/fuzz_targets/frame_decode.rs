//! Feeds arbitrary bytes to the frame decoder, in two reads, and checks the
//! invariants of `ringtunnel::proto` rather than mere absence of panics:
//! - a decoded frame re-encodes to exactly the bytes it consumed;
//! - `Ok(None)` and `Err` leave the buffer untouched;
//! - no payload exceeds the decoder's limit, and every decoded frame passes
//!   `Frame::validate`;
//! - typed payloads that parse survive their own round trip.
//!
//! The same checks run on stable as the `fifty_thousand_random_inputs` unit
//! test in src/proto/frame.rs.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringtunnel::proto::{encode, invariants, Decoder, ProtoError, DEFAULT_MAX_FRAME};

const LIMITS: [u32; 5] = [0, 8, 64, 1024, DEFAULT_MAX_FRAME];

fuzz_target!(|data: &[u8]| {
    // The first byte is a knob, so the fuzzer also explores the limit and
    // where the input is split between two reads.
    let Some((&knob, input)) = data.split_first() else {
        return;
    };
    let max = LIMITS[usize::from(knob) % LIMITS.len()];
    let split = input.len() * usize::from(knob >> 3) / 31;

    let mut dec = Decoder::new(max);
    let mut buf = BytesMut::from(&input[..split]);
    let mut offset = 0;
    if drain(&mut dec, &mut buf, input, &mut offset, max).is_err() {
        return;
    }
    buf.extend_from_slice(&input[split..]);
    let _ = drain(&mut dec, &mut buf, input, &mut offset, max);
});

/// Decodes until the decoder needs more bytes (`Ok`) or rejects the input
/// (`Err`), checking every frame against the bytes it came from.
fn drain(
    dec: &mut Decoder,
    buf: &mut BytesMut,
    input: &[u8],
    offset: &mut usize,
    max: u32,
) -> Result<(), ProtoError> {
    loop {
        let before = buf.clone();
        match dec.decode(buf) {
            Ok(Some(frame)) => {
                let consumed = before.len() - buf.len();
                let mut again = BytesMut::new();
                encode(&frame, &mut again);
                assert_eq!(&again[..], &input[*offset..*offset + consumed]);
                assert_eq!(frame.encoded_len(), consumed);
                assert!(frame.payload.len() <= max as usize);
                assert_eq!(frame.validate(max), Ok(()));
                invariants::assert_typed_payloads_round_trip(&frame);
                *offset += consumed;
            }
            Ok(None) => {
                assert_eq!(*buf, before);
                return Ok(());
            }
            Err(e) => {
                assert_eq!(*buf, before);
                return Err(e);
            }
        }
    }
}
