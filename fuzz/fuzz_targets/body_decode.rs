//! Decodes arbitrary bytes as a body of an arbitrary kind, in arbitrary
//! reads, and checks the invariants of `ringtunnel::http::invariants`:
//! - the same input gives the same body bytes, the same verdict and the
//!   same end of body however it is split and however small the pieces;
//! - a Content-Length body never yields more than its length;
//! - a finished body needed no byte past its end, and a chunked body never
//!   waits on more than MAX_TRAILERS bytes without deciding.
//!
//! The same checks run on stable as the `twenty_thousand_random_bodies`
//! unit test in src/http/invariants.rs.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringtunnel::http::{invariants, BodyKind};

const MAXES: [usize; 4] = [1, 3, 64, usize::MAX];

fuzz_target!(|data: &[u8]| {
    // Three knob bytes: the kind (and length), the piece size, and the
    // read boundaries, which are spread over the input.
    let [kind, len, reads, input @ ..] = data else {
        return;
    };
    let kind = match kind & 7 {
        0 => BodyKind::Empty,
        1 => BodyKind::Length(u64::from(*len)),
        2 => BodyKind::Length(u64::MAX),
        3 => BodyKind::Eof,
        _ => BodyKind::Chunked,
    };
    let max = MAXES[usize::from(len & 3)];
    let step = usize::from(reads & 15) + 1;
    let offset = usize::from(reads >> 4);
    let cuts: Vec<usize> = (offset..input.len()).step_by(step).collect();
    invariants::check_body(kind, input, &cuts, max);
});
