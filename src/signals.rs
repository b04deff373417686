//! SIGTERM / SIGINT as a flag the main thread polls: the handler only
//! stores an atomic, which is async-signal-safe.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

/// Routes SIGTERM and SIGINT to [`terminated`].
pub fn install() {
    // SAFETY: installing a handler that only touches an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn terminated() -> bool {
    TERM.load(Ordering::SeqCst)
}

/// Installs the handlers, then blocks until SIGTERM or SIGINT arrives.
pub fn wait_for_termination() {
    install();
    while !terminated() {
        std::thread::sleep(Duration::from_millis(100));
    }
}
