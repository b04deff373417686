//! Panic isolation for tasks. A panic in any monoio task unwinds out of
//! `block_on` and takes the whole core down; wrapping each task's future
//! turns its panic into a value, so only that task ends.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project_lite::pin_project! {
    /// Polls the inner future inside `catch_unwind`; a panic becomes
    /// `Err(payload)` and the inner future is dropped with the wrapper.
    ///
    /// The future is held inline (pin-projected), not boxed: a task is
    /// spawned per stream, and a box there was one more allocation and one
    /// more copy of the whole future per stream (issue 9's profile).
    pub struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future> CatchUnwind<F> {
    pub fn new(future: F) -> Self {
        CatchUnwind { inner: future }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Unwind safety: after a panic the inner future is never polled
        // again, so no broken invariant inside it can be observed.
        let inner = self.project().inner;
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Err(payload) => Poll::Ready(Err(payload)),
        }
    }
}

pin_project_lite::pin_project! {
    /// A spawned task's future with [`CatchUnwind`]'s isolation, logging
    /// and counting a panic itself, so that `spawn_isolated` hands monoio
    /// the caller's future as it is: no wrapping async block that would
    /// move it once more on its first poll.
    pub(crate) struct Isolated<F> {
        what: &'static str,
        #[pin]
        inner: CatchUnwind<F>,
    }
}

impl<F: Future<Output = ()>> Isolated<F> {
    pub(crate) fn new(what: &'static str, future: F) -> Self {
        Isolated {
            what,
            inner: CatchUnwind::new(future),
        }
    }
}

impl<F: Future<Output = ()>> Future for Isolated<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        match this.inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Ready(Err(payload)) => {
                super::count_panic(this.what, payload.as_ref());
                Poll::Ready(())
            }
        }
    }
}

/// The message of a panic payload, for logging.
pub fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "non-string panic payload"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_task_does_not_stop_its_siblings() {
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let (bad, good) = rt.block_on(async {
            let bad = monoio::spawn(CatchUnwind::new(async {
                monoio::time::sleep(std::time::Duration::from_millis(1)).await;
                if std::hint::black_box(true) {
                    panic!("boom");
                }
                1
            }));
            let good = monoio::spawn(CatchUnwind::new(async {
                monoio::time::sleep(std::time::Duration::from_millis(5)).await;
                2
            }));
            (bad.await, good.await)
        });
        let payload = bad.unwrap_err();
        assert_eq!(panic_message(payload.as_ref()), "boom");
        assert_eq!(good.unwrap(), 2);
    }
}
