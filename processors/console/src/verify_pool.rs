//! Password verification off the runtime: argon2 is slow on purpose (tens of milliseconds and
//! 19 MiB per run), so it runs on the console's own small pool of named threads, never on
//! tokio's shared blocking pool that the stages use for their own blocking work. A login flood
//! then costs the console its own threads, not the stages' pool.
//!
//! The pool is bounded: at most `threads + queued` verifications are admitted at once; the rest
//! wait up to `wait` for room and are then turned away ([`Busy`]), so a flood neither queues
//! without limit nor holds connections for long.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, oneshot};

/// Threads verifying passwords: one, so that a flood takes at most one core.
pub const THREADS: usize = 1;
/// Verifications admitted beyond the running ones.
pub const QUEUED: usize = 4;
/// How long an attempt waits for room before it is turned away.
pub const WAIT: Duration = Duration::from_secs(2);

/// The pool had no room within its wait (or is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

type Job = Box<dyn FnOnce() + Send>;

pub struct VerifyPool {
    jobs: mpsc::Sender<Job>,
    admitted: Arc<Semaphore>,
    wait: Duration,
}

impl VerifyPool {
    /// Starts `threads` threads named `name`; they end when the pool is dropped.
    pub fn new(
        name: &str,
        threads: usize,
        queued: usize,
        wait: Duration,
    ) -> std::io::Result<VerifyPool> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let inbox = Arc::new(Mutex::new(inbox));
        for _ in 0..threads.max(1) {
            let inbox = inbox.clone();
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || {
                    loop {
                        // The lock is held only while taking a job, not while running it.
                        let job = match inbox.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        // A panicking job loses its answer (its caller sees Busy), not the thread.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                    }
                })?;
        }
        Ok(VerifyPool {
            jobs,
            admitted: Arc::new(Semaphore::new(threads.max(1) + queued)),
            wait,
        })
    }

    /// Runs `work` on the pool and returns its result; [`Busy`] when no room came up in time.
    /// The room is given back when `work` ends, even if the caller stopped waiting for it.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Busy> {
        let permit = tokio::time::timeout(self.wait, self.admitted.clone().acquire_owned())
            .await
            .map_err(|_| Busy)?
            .map_err(|_| Busy)?;
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let out = work();
            drop(permit);
            let _ = tx.send(out);
        });
        self.jobs.send(job).map_err(|_| Busy)?;
        rx.await.map_err(|_| Busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_the_pools_own_thread() {
        let pool = VerifyPool::new("test-verify", 1, 0, WAIT).unwrap();
        let name = pool
            .run(|| std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("test-verify"));
    }

    #[tokio::test]
    async fn beyond_its_bound_an_attempt_waits_then_is_turned_away() {
        let pool =
            Arc::new(VerifyPool::new("test-verify", 1, 1, Duration::from_millis(200)).unwrap());
        // One running and one queued fill the pool: both block until released.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = Arc::new(Mutex::new(held));
        let mut filling = Vec::new();
        for _ in 0..2 {
            let (pool, held) = (pool.clone(), held.clone());
            filling.push(tokio::spawn(async move {
                pool.run(move || held.lock().unwrap().recv().is_ok()).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        assert_eq!(pool.run(|| true).await, Err(Busy));
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "waited first"
        );
        // Room again once they end.
        release.send(()).unwrap();
        release.send(()).unwrap();
        for f in filling {
            assert_eq!(f.await.unwrap(), Ok(true));
        }
        assert_eq!(pool.run(|| 7).await, Ok(7));
    }

    #[tokio::test]
    async fn a_panicking_job_loses_its_answer_not_the_thread() {
        let pool = VerifyPool::new("test-verify", 1, 0, WAIT).unwrap();
        assert_eq!(pool.run(|| -> u8 { panic!("boom") }).await, Err(Busy));
        assert_eq!(pool.run(|| 1).await, Ok(1));
    }
}
