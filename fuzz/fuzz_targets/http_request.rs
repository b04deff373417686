//! Feeds arbitrary bytes to `parse_request`, then the bytes after a
//! complete head to its body decoder, and checks the invariants of
//! `ringtunnel::http::invariants` rather than mere absence of panics:
//! - a read ending anywhere before the end sees "incomplete" or the same
//!   head or error as the whole input;
//! - a complete head lies within the input and the head limit; an
//!   incomplete one is shorter than the limit (no endless waiting);
//! - the body decodes the same however it is split, never past its end.
//!
//! The same checks run on stable as the `twenty_thousand_random_requests`
//! unit test in src/http/invariants.rs.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringtunnel::http::{invariants, DEFAULT_MAX_HEAD};

const MAX_HEADS: [usize; 4] = [16, 256, 4096, DEFAULT_MAX_HEAD];

fuzz_target!(|data: &[u8]| {
    // The first byte is a knob: head limit, where the first read ends, and
    // the read and piece sizes for the body.
    let Some((&knob, input)) = data.split_first() else {
        return;
    };
    let max_head = MAX_HEADS[usize::from(knob & 3)];
    let split = input.len() * usize::from(knob >> 2) / 63;
    let step = usize::from(knob % 13) + 1;
    let cuts: Vec<usize> = (step..input.len()).step_by(step).collect();
    let _ = invariants::check_request(input, max_head, split, &cuts, step);
});
