//! Single-core wake-up primitives for tasks of one runtime.
//!
//! monoio tasks of one core never run concurrently, so these are `Cell`s
//! and `RefCell`s: no atomics, no locks on the data path.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// A one-waiter notification: `notify` before `notified().await` is not
/// lost (a permit is stored), like a binary semaphore.
#[derive(Default)]
pub struct Notify {
    permit: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn notify(&self) {
        self.permit.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub fn notified(&self) -> Notified<'_> {
        Notified { n: self }
    }
}

pub struct Notified<'a> {
    n: &'a Notify,
}

impl Future for Notified<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.n.permit.replace(false) {
            return Poll::Ready(());
        }
        let mut slot = self.n.waker.borrow_mut();
        match slot.as_ref() {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// Waiters in arrival order (e.g. requests waiting for a backend slot).
/// Waiters re-check their condition after waking. Registering is O(1): a
/// waiter polled again while listed may appear twice, which only costs a
/// spurious wake-up; the list is emptied by every wake.
#[derive(Default)]
pub struct WaitList {
    wakers: RefCell<std::collections::VecDeque<Waker>>,
}

impl WaitList {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&self, w: &Waker) {
        let mut v = self.wakers.borrow_mut();
        // Cheap guard against the common repeat: the same waiter twice in
        // a row.
        if v.back().is_some_and(|x| x.will_wake(w)) {
            return;
        }
        v.push_back(w.clone());
    }

    /// Wakes the longest waiter. A waiter that gives up after being woken
    /// must pass the wake-up on (see the agent's slot wait).
    pub fn wake_one(&self) {
        let w = self.wakers.borrow_mut().pop_front();
        if let Some(w) = w {
            w.wake();
        }
    }

    pub fn wake_all(&self) {
        let v = std::mem::take(&mut *self.wakers.borrow_mut());
        for w in v {
            w.wake();
        }
    }
}

/// Resolves when `cond()` holds, re-checked each time `list` wakes us.
pub async fn wait_until(list: &WaitList, mut cond: impl FnMut() -> bool) {
    std::future::poll_fn(|cx| {
        if cond() {
            Poll::Ready(())
        } else {
            list.register(cx.waker());
            Poll::Pending
        }
    })
    .await
}

/// Gives the other ready tasks of this core a turn before continuing.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}
