//! Cross-core mailboxes: the only way work moves between cores.
//!
//! A crossbeam channel carries plain `Send` data (raw fds, `Bytes`,
//! names); the receiving core parks its mailbox task on a waker that the
//! sender takes and wakes. With monoio's `sync` feature a waker woken from
//! another thread is sent to its owner runtime and unparks its driver, so
//! this works on io_uring and epoll alike.
//!
//! The slot's `Mutex` is touched once per cross-core message (handoffs,
//! directory updates), never per frame.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

struct WakeSlot {
    waker: Mutex<Option<Waker>>,
    parked: AtomicBool,
}

/// The sending side; clone it to every core.
pub struct MailboxSender<T> {
    tx: Sender<T>,
    slot: Arc<WakeSlot>,
}

impl<T> Clone for MailboxSender<T> {
    fn clone(&self) -> Self {
        MailboxSender {
            tx: self.tx.clone(),
            slot: self.slot.clone(),
        }
    }
}

/// The receiving side, owned by one core.
pub struct MailboxReceiver<T> {
    rx: Receiver<T>,
    slot: Arc<WakeSlot>,
}

pub fn mailbox<T>() -> (MailboxSender<T>, MailboxReceiver<T>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let slot = Arc::new(WakeSlot {
        waker: Mutex::new(None),
        parked: AtomicBool::new(false),
    });
    (
        MailboxSender {
            tx,
            slot: slot.clone(),
        },
        MailboxReceiver { rx, slot },
    )
}

impl<T> MailboxSender<T> {
    /// Queues `msg` and wakes the owning core if it sleeps on the mailbox.
    /// Returns the message back if that core has gone.
    pub fn send(&self, msg: T) -> Result<(), T> {
        self.tx.send(msg).map_err(|e| e.0)?;
        if self.slot.parked.swap(false, Ordering::AcqRel) {
            // Take (not clone) the waker: monoio wakers must only be
            // woken by value off their own thread.
            let w = self.slot.waker.lock().ok().and_then(|mut g| g.take());
            if let Some(w) = w {
                w.wake();
            }
        }
        Ok(())
    }
}

impl<T> MailboxReceiver<T> {
    /// Next message; `None` once every sender is gone.
    pub async fn recv(&self) -> Option<T> {
        std::future::poll_fn(|cx| {
            match self.rx.try_recv() {
                Ok(m) => return Poll::Ready(Some(m)),
                Err(TryRecvError::Disconnected) => return Poll::Ready(None),
                Err(TryRecvError::Empty) => {}
            }
            if let Ok(mut g) = self.slot.waker.lock() {
                *g = Some(cx.waker().clone());
            }
            self.slot.parked.store(true, Ordering::Release);
            // A send that raced with parking left a message and possibly
            // found `parked` still false: look again before sleeping.
            match self.rx.try_recv() {
                Ok(m) => {
                    self.slot.parked.store(false, Ordering::Release);
                    Poll::Ready(Some(m))
                }
                Err(TryRecvError::Disconnected) => Poll::Ready(None),
                Err(TryRecvError::Empty) => Poll::Pending,
            }
        })
        .await
    }

    pub fn try_recv(&self) -> Option<T> {
        self.rx.try_recv().ok()
    }
}
