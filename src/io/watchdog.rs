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

/// Shuts a connection's read side when a deadline passes. Reads are never
/// raced against timers (that can lose delivered bytes on io_uring); the
/// pending read simply sees EOF and the handler checks `fired`.
pub struct Watchdog {
    fd: RawFd,
    how: libc::c_int,
    deadline: Cell<Option<Instant>>,
    fired: Cell<bool>,
    stopped: Cell<bool>,
    wake: Notify,
}

impl Watchdog {
    pub fn start(fd: RawFd, how: libc::c_int) -> Rc<Watchdog> {
        let wd = Rc::new(Watchdog {
            fd,
            how,
            deadline: Cell::new(None),
            fired: Cell::new(false),
            stopped: Cell::new(false),
            wake: Notify::new(),
        });
        let w = wd.clone();
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
                            monoio::time::sleep(d - now).await;
                        }
                    }
                }
            }
        });
        wd
    }

    pub fn arm(&self, after: Duration) {
        self.deadline.set(Some(Instant::now() + after));
        self.wake.notify();
    }

    pub fn disarm(&self) {
        self.deadline.set(None);
    }

    pub fn stop(&self) {
        self.stopped.set(true);
        self.deadline.set(None);
        self.wake.notify();
    }
}

impl Watchdog {
    /// Whether the deadline passed (and the socket was shut down).
    pub fn fired(&self) -> bool {
        self.fired.get()
    }
}
