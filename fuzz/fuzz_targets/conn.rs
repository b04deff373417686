//! Interprets arbitrary bytes as operations on a gateway and an agent
//! `Connection` back to back (stream operations, partial delivery, time,
//! frames a decoder would pass) and checks the connection's invariants
//! after every one, including uplink credit conservation while the peers
//! are benign. The interpreter is `ringtunnel::proto::conn_fuzz::run`; the
//! same checks run on stable as its `random_inputs` unit test.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringtunnel::proto::conn_fuzz::run(data);
});
