//! Deadlines enforced by shutting a socket down.
//!
//! On io_uring, dropping an in-flight read can lose bytes the kernel
//! already delivered, so reads are never raced against timers. Instead one
//! watchdog task per connection sleeps until the earliest armed deadline
//! and then shuts the socket down; the pending read returns EOF (or the
//! pending write fails) and its owner checks [`Watchdog::fired`].
//!
//! Two deadlines run side by side, because both directions of an exchange
//! can wait at once: the read deadline (head, body-idle or response
//! timeout) shuts down the read side only, so an answer such as 408 can
//! still be written; the write deadline (a peer that stopped reading)
//! shuts down both sides, which fails the stuck write.

use std::cell::Cell;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::shutdown_fd;
use crate::runtime::notify::Notify;

/// Which deadline fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fired {
    Read,
    Write,
}

pub struct Watchdog {
    inner: Rc<Inner>,
}

struct Inner {
    fd: RawFd,
    read_how: libc::c_int,
    read: Cell<Option<Instant>>,
    write: Cell<Option<Instant>>,
    fired: Cell<Option<Fired>>,
    stopped: Cell<bool>,
    /// The deadline the task is sleeping towards, if it sleeps.
    sleeping: Cell<Option<Instant>>,
    wake: Notify,
}

impl Inner {
    fn earliest(&self) -> Option<(Instant, Fired)> {
        match (self.read.get(), self.write.get()) {
            (Some(r), Some(w)) if w < r => Some((w, Fired::Write)),
            (Some(r), _) => Some((r, Fired::Read)),
            (None, Some(w)) => Some((w, Fired::Write)),
            (None, None) => None,
        }
    }
}

impl Watchdog {
    /// Starts the watchdog task for `fd`; `read_how` is the `shutdown(2)`
    /// mode applied when the read deadline passes (the write deadline
    /// always shuts down both ways). Dropping the handle stops it, so a
    /// reused fd number can never be shut down by a stale watchdog.
    ///
    /// Re-arming is cheap: the task sleeps until the earliest deadline it
    /// knows and, on waking, re-reads the current ones, so `arm` only wakes
    /// the task when the new deadline is earlier than the one slept to.
    pub fn start(fd: RawFd, read_how: libc::c_int) -> Watchdog {
        let inner = Rc::new(Inner {
            fd,
            read_how,
            read: Cell::new(None),
            write: Cell::new(None),
            fired: Cell::new(None),
            stopped: Cell::new(false),
            sleeping: Cell::new(None),
            wake: Notify::new(),
        });
        let w = inner.clone();
        crate::runtime::spawn_isolated("watchdog", async move {
            while !w.stopped.get() {
                match w.earliest() {
                    None => w.wake.notified().await,
                    Some((d, which)) => {
                        let now = Instant::now();
                        if now >= d {
                            w.read.set(None);
                            w.write.set(None);
                            w.fired.set(Some(which));
                            let how = match which {
                                Fired::Read => w.read_how,
                                Fired::Write => libc::SHUT_RDWR,
                            };
                            shutdown_fd(w.fd, how);
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

    fn set(&self, slot: &Cell<Option<Instant>>, after: Duration) {
        let d = Instant::now() + after;
        slot.set(Some(d));
        // A later deadline than the one slept towards needs no wake-up:
        // the task re-reads the deadlines when its sleep ends.
        match self.inner.sleeping.get() {
            Some(s) if s <= d => {}
            _ => self.inner.wake.notify(),
        }
    }

    /// Sets the read deadline to `after` from now.
    pub fn arm(&self, after: Duration) {
        self.set(&self.inner.read, after);
    }

    pub fn disarm(&self) {
        self.inner.read.set(None);
    }

    /// Sets the write deadline (a peer that stopped reading).
    pub fn arm_write(&self, after: Duration) {
        self.set(&self.inner.write, after);
    }

    pub fn disarm_write(&self) {
        self.inner.write.set(None);
    }

    pub fn stop(&self) {
        self.inner.stopped.set(true);
        self.inner.read.set(None);
        self.inner.write.set(None);
        self.inner.wake.notify();
    }

    /// Whether a deadline passed (and the socket was shut down).
    pub fn fired(&self) -> bool {
        self.inner.fired.get().is_some()
    }

    /// Which deadline passed, if one did.
    pub fn which(&self) -> Option<Fired> {
        self.inner.fired.get()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}
