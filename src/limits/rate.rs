//! A session's request rate, shared by every core without a lock.
//!
//! The issue suggests one token bucket per session per core with the rate
//! and burst split across cores. That split has a bad error bound for a
//! small burst: a client whose connections all hash to one core gets only
//! `ceil(burst / cores)` of its burst, and one spread over cores gets up to
//! `burst + cores - 1`. Instead each session has ONE cell shared by all
//! cores, run by GCRA (the generic cell rate algorithm, a token bucket
//! expressed as a single "theoretical arrival time"): one `AtomicU64`
//! updated by compare-and-swap. The count is exact across cores (error
//! bound: zero requests), there is no lock, and the cost is one CAS on a
//! cache line that moves between cores only when two cores serve the same
//! session in the same instant: a request, not a frame, pays it.
//!
//! With `T = per / n` (the emission interval) and `tau = (burst - 1) * T`,
//! a request at `now` is admitted iff `max(tat, now) - now <= tau`, and
//! then `tat = max(tat, now) + T`. Starting fresh, exactly `burst` requests
//! pass at once, then one per `T`. A refused request learns how long until
//! one would pass: `max(tat, now) - now - tau`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::scope::Rate;

#[derive(Debug)]
pub struct Gcra {
    interval_ns: u64,
    tau_ns: u64,
    /// Theoretical arrival time, ns since the owner's epoch.
    tat: AtomicU64,
    /// What it was made from, to tell a stale cell from a current one.
    pub rate: Rate,
    pub burst: u32,
}

impl Gcra {
    pub fn new(rate: Rate, burst: u32) -> Gcra {
        let interval_ns = (rate.per.as_nanos() / u128::from(rate.n.max(1))).max(1);
        let interval_ns = u64::try_from(interval_ns).unwrap_or(u64::MAX);
        let tau_ns = interval_ns.saturating_mul(u64::from(burst.max(1) - 1));
        Gcra {
            interval_ns,
            tau_ns,
            tat: AtomicU64::new(0),
            rate,
            burst,
        }
    }

    /// Whether the cell carries no state at `now_ns`: it would admit its
    /// full burst, exactly like a fresh cell, so it may be forgotten.
    pub fn idle(&self, now_ns: u64) -> bool {
        self.tat.load(Ordering::Acquire) <= now_ns
    }

    /// Admits one request at `now_ns` (ns since the epoch all callers
    /// share), or says how long until one would be admitted.
    pub fn check(&self, now_ns: u64) -> Result<(), Duration> {
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let start = tat.max(now_ns);
            let ahead = start - now_ns;
            if ahead > self.tau_ns {
                return Err(Duration::from_nanos(ahead - self.tau_ns));
            }
            let next = start.saturating_add(self.interval_ns);
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }
}

/// `Retry-After` in whole seconds: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let s = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn rate(s: &str) -> Rate {
        s.parse().unwrap()
    }

    #[test]
    fn exactly_burst_then_one_per_interval() {
        let g = Gcra::new(rate("1/h"), 5);
        let now = 10 * S;
        for i in 0..5 {
            assert_eq!(g.check(now), Ok(()), "request {i}");
        }
        let wait = g.check(now).unwrap_err();
        assert_eq!(wait, Duration::from_secs(3600));
        assert_eq!(retry_after_secs(wait), 3600);
        // One interval later exactly one more passes.
        assert_eq!(g.check(now + 3600 * S), Ok(()));
        assert!(g.check(now + 3600 * S).is_err());
    }

    #[test]
    fn steady_rate_and_rounded_up_retry() {
        let g = Gcra::new(rate("2/s"), 1);
        assert_eq!(g.check(0), Ok(()));
        let w = g.check(S / 4).unwrap_err();
        assert_eq!(w, Duration::from_millis(250));
        assert_eq!(retry_after_secs(w), 1);
        assert_eq!(g.check(S / 2), Ok(()));
        // An idle session does not bank more than its burst.
        let g = Gcra::new(rate("10/s"), 3);
        let later = 1000 * S;
        let passed = (0..10).filter(|_| g.check(later).is_ok()).count();
        assert_eq!(passed, 3);
    }

    #[test]
    fn racing_cores_admit_exactly_the_burst() {
        let g = std::sync::Arc::new(Gcra::new(rate("1/h"), 50));
        let passed: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let g = g.clone();
                    s.spawn(move || (0..100).filter(|_| g.check(S).is_ok()).count())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(passed, 50);
    }

    #[test]
    fn huge_values_do_not_overflow() {
        let g = Gcra::new(rate("1/h"), u32::MAX);
        assert_eq!(g.check(u64::MAX - 1), Ok(()));
        assert_eq!(retry_after_secs(Duration::from_nanos(1)), 1);
    }
}
