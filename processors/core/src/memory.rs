//! Keeping the all-in-one process small (target: 128 MiB RSS on the benchmark). glibc's malloc
//! gives every busy thread its own arena and keeps freed memory in them; with librdkafka's and
//! tokio's threads that is tens of MiB held after every burst. Here: two arenas, and freed
//! memory handed back to the kernel every few seconds. No-ops off glibc.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Caps malloc arenas. Call first thing in `main`, before threads start.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; M_ARENA_MAX with a small positive value
    // is always valid, and no other thread allocates yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns freed heap memory to the kernel every `every` until `shutdown`.
pub fn spawn_trimmer(every: Duration, shutdown: CancellationToken) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Walks the heaps (milliseconds); off the async workers.
            let _ = tokio::task::spawn_blocking(|| {
                // SAFETY: malloc_trim is thread-safe and has no preconditions.
                unsafe { libc::malloc_trim(0) }
            })
            .await;
        }
    });
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (every, shutdown);
}
