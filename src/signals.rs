//! Process signals as flags the main thread polls: SIGTERM / SIGINT ask
//! to stop, SIGHUP asks the gateway to reload its configuration. The
//! handlers only store atomics, which is async-signal-safe; the work
//! (draining, re-reading files) happens on the main thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static TERM: AtomicBool = AtomicBool::new(false);
static HUP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
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
