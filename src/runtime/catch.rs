//! Panic isolation for tasks. A panic in any monoio task unwinds out of
//! `block_on` and takes the whole core down; wrapping each task's future
//! turns its panic into a value, so only that task ends.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Polls the inner future inside `catch_unwind`; a panic becomes
/// `Err(payload)` and the inner future is dropped with the wrapper.
pub struct CatchUnwind<F> {
    // Boxed so the wrapper needs no unsafe pin projection; one allocation
    // per connection is noise next to the socket.
    inner: Pin<Box<F>>,
}

impl<F: Future> CatchUnwind<F> {
    pub fn new(future: F) -> Self {
        CatchUnwind {
            inner: Box::pin(future),
        }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Unwind safety: after a panic the inner future is never polled
        // again, so no broken invariant inside it can be observed.
        let inner = self.inner.as_mut();
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Err(payload) => Poll::Ready(Err(payload)),
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
