//! Running two futures of one task side by side.
//!
//! `monoio::join!` keeps each branch in a `MaybeDone` and takes the output
//! with `mem::replace` of the whole `MaybeDone`, which copies the branch's
//! full future size (several KiB for an exchange's pumps) once per branch
//! per request; issue 9's profile found that copy among the top user-time
//! items on both the gateway and the agent. [`join2`] keeps the finished
//! futures in place and moves out only their outputs.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project_lite::pin_project! {
    /// The future of [`join2`].
    #[must_use = "futures do nothing unless awaited"]
    pub struct Join2<A: Future, B: Future> {
        #[pin]
        a: A,
        #[pin]
        b: B,
        out_a: Option<A::Output>,
        out_b: Option<B::Output>,
    }
}

/// Polls `a` and `b` on every wake-up of the task (as `monoio::join!`
/// does: neither gets its own waker) until both have finished, and returns
/// both outputs. A finished future is never polled again; it is dropped
/// with the `Join2`.
pub fn join2<A: Future, B: Future>(a: A, b: B) -> Join2<A, B> {
    Join2 {
        a,
        b,
        out_a: None,
        out_b: None,
    }
}

impl<A: Future, B: Future> Future for Join2<A, B> {
    type Output = (A::Output, B::Output);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if this.out_a.is_none() {
            if let Poll::Ready(v) = this.a.poll(cx) {
                *this.out_a = Some(v);
            }
        }
        if this.out_b.is_none() {
            if let Poll::Ready(v) = this.b.poll(cx) {
                *this.out_b = Some(v);
            }
        }
        if this.out_a.is_some() && this.out_b.is_some() {
            match (this.out_a.take(), this.out_b.take()) {
                (Some(a), Some(b)) => Poll::Ready((a, b)),
                _ => unreachable!("both outputs were just checked"),
            }
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::Duration;

    fn block_on<F: Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn both_outputs_come_back_whichever_ends_first() {
        let (x, y) = block_on(join2(
            async {
                monoio::time::sleep(Duration::from_millis(5)).await;
                "slow"
            },
            async { 7 },
        ));
        assert_eq!((x, y), ("slow", 7));
        let (x, y) = block_on(join2(async { 1u8 }, async {
            monoio::time::sleep(Duration::from_millis(5)).await;
            vec![2u8; 3]
        }));
        assert_eq!((x, y), (1, vec![2, 2, 2]));
    }

    #[test]
    fn a_finished_branch_is_not_polled_again() {
        // A future that counts its polls and panics if polled after Ready
        // (what a std async block would do).
        struct Once {
            polls: Rc<Cell<u32>>,
            done: bool,
        }
        impl Future for Once {
            type Output = ();
            fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
                assert!(!self.done, "polled after completion");
                self.polls.set(self.polls.get() + 1);
                self.done = true;
                Poll::Ready(())
            }
        }
        let polls = Rc::new(Cell::new(0));
        let once = Once {
            polls: polls.clone(),
            done: false,
        };
        block_on(join2(once, async {
            for _ in 0..3 {
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
        assert_eq!(polls.get(), 1);
    }

    #[test]
    fn both_branches_run_concurrently() {
        // Each branch waits for the other's signal: sequential polling to
        // completion would deadlock (the test would hang, then time out).
        let (ping, pong) = (Rc::new(Cell::new(false)), Rc::new(Cell::new(false)));
        let r = block_on(async {
            monoio::time::timeout(
                Duration::from_secs(5),
                join2(
                    async {
                        ping.set(true);
                        while !pong.get() {
                            monoio::time::sleep(Duration::from_millis(1)).await;
                        }
                    },
                    async {
                        while !ping.get() {
                            monoio::time::sleep(Duration::from_millis(1)).await;
                        }
                        pong.set(true);
                    },
                ),
            )
            .await
        });
        assert!(r.is_ok(), "the branches did not run side by side");
    }
}
