//! Deadlines enforced by shutting a socket down.
//!
//! On io_uring, dropping an in-flight read can lose bytes the kernel
//! already delivered, so reads are never raced against timers. Instead one
//! watchdog task per connection sleeps until the armed deadline and then
//! shuts the socket down; the pending read returns EOF and its owner
//! checks [`Watchdog::fired`].

use std::cell::Cell;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::shutdown_fd;
use crate::runtime::notify::Notify;

/// Shuts a connection's socket when a deadline passes. Reads are never
/// raced against timers (that can lose delivered bytes on io_uring); the
/// pending read simply sees EOF and the handler checks [`Watchdog::fired`].
///
/// Re-arming is cheap: the task sleeps until the earliest deadline it knows
/// and, on waking, re-reads the current one, so `arm` only wakes the task
/// when it is idle. Keep-alive connections re-arm per request without a
/// task switch or a timer insert.
pub struct Watchdog {
    inner: Rc<Inner>,
}

struct Inner {
    fd: RawFd,
    how: libc::c_int,
    deadline: Cell<Option<Instant>>,
    fired: Cell<bool>,
    stopped: Cell<bool>,
    /// The deadline the task is sleeping towards, if it sleeps.
    sleeping: Cell<Option<Instant>>,
    wake: Notify,
}

impl Watchdog {
    /// Starts the watchdog task for `fd`; `how` is the `shutdown(2)` mode
    /// applied when a deadline passes. Dropping the handle stops it, so a
    /// reused fd number can never be shut down by a stale watchdog.
    pub fn start(fd: RawFd, how: libc::c_int) -> Watchdog {
        let inner = Rc::new(Inner {
            fd,
            how,
            deadline: Cell::new(None),
            fired: Cell::new(false),
            stopped: Cell::new(false),
            sleeping: Cell::new(None),
            wake: Notify::new(),
        });
        let w = inner.clone();
        monoio::spawn(async move {
            while !w.stopped.get() {
                match w.deadline.get() {
                    None => w.wake.notified().await,
                    Some(d) => {
                        let now = Instant::now();
                        if now >= d {
                            w.deadline.set(None);
                            w.fired.set(true);
                            shutdown_fd(w.fd, w.how);
                        } else {
                            w.sleeping.set(Some(d));
                            // Racing a timer is fine here: no socket read is
                            // involved, and an earlier deadline must cut the
                            // sleep short.
                            monoio::select! {
                                _ = monoio::time::sleep(d - now) => {}
                                _ = w.wake.notified() => {}
                            }
                            w.sleeping.set(None);
                        }
                    }
                }
            }
        });
        Watchdog { inner }
    }

    /// Sets the deadline to `after` from now.
    pub fn arm(&self, after: Duration) {
        let d = Instant::now() + after;
        self.inner.deadline.set(Some(d));
        // A later deadline than the one slept towards needs no wake-up:
        // the task re-reads the deadline when its sleep ends.
        match self.inner.sleeping.get() {
            Some(s) if s <= d => {}
            _ => self.inner.wake.notify(),
        }
    }

    pub fn disarm(&self) {
        self.inner.deadline.set(None);
    }

    pub fn stop(&self) {
        self.inner.stopped.set(true);
        self.inner.deadline.set(None);
        self.inner.wake.notify();
    }

    /// Whether the deadline passed (and the socket was shut down).
    pub fn fired(&self) -> bool {
        self.inner.fired.get()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}
