//! Process signals as flags the main thread polls: SIGTERM / SIGINT ask
//! to stop (a second one exits at once, status 130, saying so), SIGHUP
//! asks the gateway to reload its configuration. The
//! handlers only store atomics, which is async-signal-safe; the work
//! (draining, re-reading files) happens on the main thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static TERM: AtomicBool = AtomicBool::new(false);
static HUP: AtomicBool = AtomicBool::new(false);

/// Said by a second SIGTERM/SIGINT, which ends the process at once.
const FORCED: &[u8] = b"ringtunnel: second stop signal: exiting now, in-flight requests are cut\n";

extern "C" fn on_signal(_sig: libc::c_int) {
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
}

/// Routes SIGTERM and SIGINT to [`terminated`], SIGHUP to
/// [`take_hangup`]. Without this, SIGHUP's default action would kill the
/// process, which is exactly wrong for `systemctl reload`.
pub fn install() {
    // SAFETY: installing handlers that only touch atomics.
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
        std::thread::sleep(Duration::from_millis(100));
    }
}
