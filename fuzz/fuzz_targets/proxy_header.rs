//! Feeds arbitrary bytes to the PROXY header parser and checks the
//! invariants of `ringtunnel::http::invariants::check_proxy`, not mere
//! absence of panics: every read short of a header waits, the header
//! alone parses the same, an error stays the same error as bytes arrive,
//! and waiting is bounded.
//!
//! The same checks run on stable as the `twenty_thousand_random_proxy_headers`
//! unit test in src/http/invariants.rs.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringtunnel::http::invariants;

fuzz_target!(|data: &[u8]| {
    // The first byte picks a signature to start from, so the fuzzer need
    // not find 12 exact bytes before it reaches the v2 fields.
    let Some((&knob, rest)) = data.split_first() else {
        return;
    };
    let mut input = match knob % 3 {
        0 => b"\r\n\r\n\0\r\nQUIT\n".to_vec(),
        1 => b"PROXY ".to_vec(),
        _ => Vec::new(),
    };
    input.extend_from_slice(&rest[..rest.len().min(4200)]);
    let _ = invariants::check_proxy(&input);
});
