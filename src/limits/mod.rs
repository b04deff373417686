//! Limits and abuse resistance of the gateway: how many public
//! connections it holds (in total and per client IP), the file
//! descriptors it keeps in reserve for agents, the per-session request
//! rate, and how the tunnel listener treats peers that keep failing their
//! handshake.
//!
//! This module owns the counting; the listeners only ask it. The pieces:
//!
//! - [`conns`]: exact public connection counts across cores (a sharded
//!   table taken at accept and at close, never per request);
//! - [`rate`]: per-session request rate, one lock-free GCRA cell per
//!   session shared by all cores;
//! - [`ip_rate`]: per-client-IP rate within a session, one such cell per
//!   (session, IP) in a bounded table, cached per core;
//! - [`strikes`]: failed handshakes per IP and the growing ban that
//!   follows;
//! - [`backoff`]: accept-error back-off and log-line rate limiting, so an
//!   EMFILE never spins a core or the admin thread;
//! - [`gate`]: the glue the gateway's listeners call.
//!
//! Everything but `gate` is plain data with `now` passed in, unit-tested
//! without sockets or clocks.

pub mod backoff;
pub mod conns;
pub mod gate;
pub mod ip_rate;
pub mod rate;
pub mod strikes;

pub use backoff::{AcceptBackoff, LogLimiter};
pub use conns::{ConnPermit, ConnRefusal, ConnTable};
pub use gate::{GatewayLimits, LimitsConfig, RateScope, SessionRates};
pub use rate::Gcra;
pub use strikes::Strikes;

/// Agent-supplied text (session names, refusal reasons) as it may appear
/// in a log line: at most 64 characters, then `…`. Callers print it with
/// `{:?}` so control characters and quotes come out escaped.
pub fn log_safe(s: &str) -> &str {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The file-descriptor limit this process runs under (soft RLIMIT_NOFILE).
pub fn nofile_limit() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a plain syscall filling a stack struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 1024;
    }
    rl.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_safe_truncates_on_a_char_boundary() {
        assert_eq!(log_safe("short"), "short");
        let long = "é".repeat(100);
        assert_eq!(log_safe(&long).chars().count(), 64);
        let exact = "a".repeat(64);
        assert_eq!(log_safe(&exact), exact);
        // Escaping is the caller's `{:?}`.
        assert_eq!(
            format!("{:?}", log_safe("a\nb\x1b[31m")),
            "\"a\\nb\\u{1b}[31m\""
        );
    }
}
