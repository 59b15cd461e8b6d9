//! Group commit for concurrent callers: each caller submits one item and awaits its own answer;
//! a worker takes every item queued meanwhile (up to a maximum) and answers them all from one
//! round trip. Under load, N concurrent requests cost one statement instead of N; alone, a
//! request waits only for its own round trip (nothing lingers).

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

type Job<I, O> = (I, oneshot::Sender<Result<O, String>>);

/// A handle to submit items to one batching worker (cheap to clone).
pub struct Coalescer<I, O> {
    tx: mpsc::Sender<Job<I, O>>,
}

impl<I, O> Clone for Coalescer<I, O> {
    fn clone(&self) -> Self {
        Coalescer {
            tx: self.tx.clone(),
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> Coalescer<I, O> {
    /// Spawns the worker (needs a Tokio runtime). `run` gets up to `max` items and returns one
    /// answer per item, in order, or one error for all of them. The worker ends when every
    /// handle is dropped.
    pub fn spawn<F, Fut>(max: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<O>, String>> + Send,
    {
        let max = max.max(1);
        let (tx, mut rx) = mpsc::channel::<Job<I, O>>(max * 4);
        tokio::spawn(async move {
            let mut jobs = Vec::with_capacity(max);
            while rx.recv_many(&mut jobs, max).await > 0 {
                let (items, answers): (Vec<I>, Vec<_>) = jobs.drain(..).unzip();
                let n = items.len();
                match run(items).await {
                    Ok(outs) if outs.len() == n => {
                        for (answer, out) in answers.into_iter().zip(outs) {
                            let _ = answer.send(Ok(out));
                        }
                    }
                    Ok(outs) => {
                        let e = format!("{} answers for {n} items", outs.len());
                        for answer in answers {
                            let _ = answer.send(Err(e.clone()));
                        }
                    }
                    Err(e) => {
                        for answer in answers {
                            let _ = answer.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        Coalescer { tx }
    }

    /// Submits one item and waits for its answer (an error when the batch failed, or when the
    /// worker is gone).
    pub async fn submit(&self, item: I) -> Result<O, String> {
        let (answer, rx) = oneshot::channel();
        self.tx
            .send((item, answer))
            .await
            .map_err(|_| "the batching worker has stopped".to_owned())?;
        rx.await
            .map_err(|_| "the batching worker has stopped".to_owned())?
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_round_trips_and_each_gets_its_own_answer() {
        let rounds = Arc::new(AtomicUsize::new(0));
        let r = rounds.clone();
        let doubler = Coalescer::spawn(64, move |items: Vec<u32>| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                Ok(items.into_iter().map(|i| i * 2).collect())
            }
        });
        let calls: Vec<_> = (0..200u32)
            .map(|i| {
                let d = doubler.clone();
                tokio::spawn(async move { (i, d.submit(i).await) })
            })
            .collect();
        for c in calls {
            let (i, got) = c.await.unwrap();
            assert_eq!(got, Ok(i * 2));
        }
        assert!(
            rounds.load(Ordering::SeqCst) < 200,
            "callers waiting together were batched"
        );
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_of_its_callers_and_the_next_batch_runs() {
        let fail = Arc::new(AtomicUsize::new(1));
        let f = fail.clone();
        let c = Coalescer::spawn(8, move |items: Vec<u32>| {
            let f = f.clone();
            async move {
                if f.fetch_sub(1, Ordering::SeqCst) == 1 {
                    Err("database away".to_owned())
                } else {
                    Ok(items)
                }
            }
        });
        assert_eq!(c.submit(1).await, Err("database away".to_owned()));
        assert_eq!(c.submit(2).await, Ok(2));
    }

    #[tokio::test]
    async fn a_wrong_number_of_answers_is_an_error_not_a_mismatch() {
        let c = Coalescer::spawn(8, |_items: Vec<u32>| async { Ok(Vec::<u32>::new()) });
        assert!(c.submit(1).await.is_err());
    }
}
