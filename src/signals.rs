//! Process signals as flags the main thread reads: SIGTERM / SIGINT ask
//! to stop (a second one exits at once, status 130, saying so), SIGHUP
//! asks the gateway to reload its configuration. The handlers only store
//! atomics and write one byte to a pipe, which is async-signal-safe; the
//! work (draining, re-reading files) happens on the main thread.
//!
//! The main thread sleeps in [`wait`] on that pipe (the self-pipe trick),
//! so an idle process never wakes up to poll: a signal, or a [`nudge`]
//! from a worker whose state the main thread reports (an agent's uplink
//! accepted or refused), is what wakes it.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

static TERM: AtomicBool = AtomicBool::new(false);
static HUP: AtomicBool = AtomicBool::new(false);
/// The pipe's ends; -1 until [`install`] made it.
static WAKE_READ: AtomicI32 = AtomicI32::new(-1);
static WAKE_WRITE: AtomicI32 = AtomicI32::new(-1);

/// Wakes [`wait`]. Async-signal-safe (one non-blocking write(2)); a full
/// pipe already holds a wake-up, so a failed write loses nothing.
pub fn nudge() {
    let fd = WAKE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: one byte from a static buffer to a descriptor we own.
        unsafe {
            libc::write(fd, b"!".as_ptr().cast(), 1);
        }
    }
}

/// Sleeps until a signal or a [`nudge`] arrives since the last call, or
/// `timeout` passes (`None`: no timeout). Without [`install`] it sleeps
/// for `timeout` (or 100 ms) instead. Callers re-check their flags after
/// it returns: it may return early.
pub fn wait(timeout: Option<Duration>) {
    let fd = WAKE_READ.load(Ordering::SeqCst);
    if fd < 0 {
        std::thread::sleep(timeout.unwrap_or(Duration::from_millis(100)));
        return;
    }
    let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd on the stack; EINTR just returns early.
    unsafe { libc::poll(&mut pfd, 1, ms) };
    // Drain every byte: one wake-up covers all that came before it.
    let mut sink = [0u8; 64];
    // SAFETY: the read end is non-blocking; reads into a stack buffer.
    while unsafe { libc::read(fd, sink.as_mut_ptr().cast(), sink.len()) } > 0 {}
}

/// Said by a second SIGTERM/SIGINT, which ends the process at once.
const FORCED: &[u8] = b"ringtunnel: second stop signal: exiting now, in-flight requests are cut\n";

extern "C" fn on_signal(_sig: libc::c_int) {
    nudge();
    if TERM.swap(true, Ordering::SeqCst) {
        // A second Ctrl-C while draining: the operator does not want to
        // wait. write(2) and _exit(2) are async-signal-safe.
        // SAFETY: a static buffer and its length; _exit does not return.
        unsafe {
            libc::write(2, FORCED.as_ptr().cast(), FORCED.len());
            libc::_exit(130);
        }
    }
}

extern "C" fn on_hangup(_sig: libc::c_int) {
    HUP.store(true, Ordering::SeqCst);
    nudge();
}

/// Routes SIGTERM and SIGINT to [`terminated`], SIGHUP to
/// [`take_hangup`]. Without this, SIGHUP's default action would kill the
/// process, which is exactly wrong for `systemctl reload`.
pub fn install() {
    if WAKE_READ.load(Ordering::SeqCst) < 0 {
        let mut fds = [-1; 2];
        // SAFETY: pipe2 fills the two-element array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } == 0 {
            // Write end first: a handler that sees the read end set finds
            // a usable write end.
            WAKE_WRITE.store(fds[1], Ordering::SeqCst);
            WAKE_READ.store(fds[0], Ordering::SeqCst);
        }
    }
    // SAFETY: installing handlers that only touch atomics and write(2).
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGHUP, on_hangup as *const () as libc::sighandler_t);
    }
}

pub fn terminated() -> bool {
    TERM.load(Ordering::SeqCst)
}

/// Whether SIGHUP arrived since the last call (several coalesce into one
/// reload, which re-reads everything anyway).
pub fn take_hangup() -> bool {
    HUP.swap(false, Ordering::SeqCst)
}

/// Installs the handlers, then blocks until SIGTERM or SIGINT arrives.
pub fn wait_for_termination() {
    install();
    while !terminated() {
        wait(None);
    }
}
