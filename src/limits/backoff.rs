//! Accept errors without a spin and without a log flood.
//!
//! At EMFILE/ENFILE the kernel keeps the pending connection queued, so an
//! accept loop that retries at once fails again at once, forever: 100% CPU
//! and one log line per try. [`AcceptBackoff`] waits 10 ms after the first
//! failure, doubling up to 1 s, and starts over after a success;
//! [`LogLimiter`] lets one line through per interval and counts the rest,
//! which the next line reports.

use std::time::{Duration, Instant};

pub const FIRST_DELAY: Duration = Duration::from_millis(10);
pub const MAX_DELAY: Duration = Duration::from_secs(1);
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// One line per `every`; the lines in between are counted.
#[derive(Debug)]
pub struct LogLimiter {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(every: Duration) -> LogLimiter {
        LogLimiter {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log now, mentioning the `n` lines suppressed since the
    /// last one. `None`: stay quiet (counted).
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    delay: Duration,
    log: LogLimiter,
}

impl AcceptBackoff {
    /// `what` names the listener in log lines ("public", "tunnel", "admin").
    pub fn new(what: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            what,
            delay: FIRST_DELAY,
            log: LogLimiter::new(LOG_EVERY),
        }
    }

    /// An accept failed: logs (rate-limited) and returns how long to wait
    /// before the next accept.
    pub fn failed(&mut self, e: &std::io::Error, now: Instant) -> Duration {
        let wait = self.delay;
        self.delay = (self.delay * 2).min(MAX_DELAY);
        if let Some(suppressed) = self.log.allow(now) {
            let hint = match e.raw_os_error() {
                Some(libc::EMFILE) | Some(libc::ENFILE) => {
                    " (out of file descriptors: raise `ulimit -n` or lower --max-conns)"
                }
                _ => "",
            };
            tracing::warn!(
                listener = self.what,
                error = %e,
                retry_in_ms = wait.as_millis() as u64,
                suppressed,
                "accept failed{hint}"
            );
        }
        wait
    }

    pub fn succeeded(&mut self) {
        self.delay = FIRST_DELAY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_to_the_cap_and_reset() {
        let mut b = AcceptBackoff::new("test");
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let now = Instant::now();
        let ds: Vec<_> = (0..10).map(|_| b.failed(&e, now)).collect();
        assert_eq!(ds[0], Duration::from_millis(10));
        assert_eq!(ds[1], Duration::from_millis(20));
        assert_eq!(ds[6], Duration::from_millis(640));
        assert_eq!(ds[7], MAX_DELAY);
        assert_eq!(ds[9], MAX_DELAY);
        // Ten failures cost 4.27 s of waiting (1.27 s doubling, then 1 s
        // each): ten tries, not millions.
        assert_eq!(ds.iter().sum::<Duration>(), Duration::from_millis(4270));
        b.succeeded();
        assert_eq!(b.failed(&e, now), FIRST_DELAY);
    }

    #[test]
    fn log_lines_are_rate_limited_and_count_the_rest() {
        let mut l = LogLimiter::new(Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(l.allow(t), Some(0));
        for i in 1..=99 {
            assert_eq!(l.allow(t + Duration::from_millis(i * 10)), None);
        }
        assert_eq!(l.allow(t + Duration::from_secs(10)), Some(99));
        assert_eq!(l.allow(t + Duration::from_secs(11)), None);
    }
}
