//! Shared helpers for the integration tests. They run against the real stack started by
//! `scripts/stack up` (Kafka, Apicurio, PostgreSQL, Redis, SMTP); `scripts/test` exports the
//! addresses below.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

pub fn brokers() -> String {
    env("HERALD_KAFKA_BROKERS", "127.0.0.1:9092")
}

pub fn registry() -> String {
    env(
        "HERALD_REGISTRY_URL",
        "http://127.0.0.1:8081/apis/ccompat/v7",
    )
}

pub fn postgres() -> String {
    env(
        "HERALD_POSTGRES_URL",
        "host=127.0.0.1 port=55432 user=herald dbname=herald",
    )
}

pub fn redis_url() -> String {
    env("HERALD_REDIS_URL", "redis://127.0.0.1:56379")
}

pub fn maildir() -> PathBuf {
    PathBuf::from(env(
        "HERALD_MAILDIR",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../.stack/mail"),
    ))
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid_like())
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:x}{:x}{:x}",
        t,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `herald` binary built by `cargo build -p herald` (scripts/test builds it first).
pub fn herald_bin() -> PathBuf {
    std::env::var("HERALD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/debug/herald"
            ))
        })
}

/// A running `herald run` process, killed on drop.
pub struct Herald {
    pub child: Child,
}

impl Herald {
    pub fn start(config: &std::path::Path, envs: &[(&str, String)]) -> Herald {
        let bin = herald_bin();
        assert!(
            bin.exists(),
            "{} missing: run `cargo build -p herald` first",
            bin.display()
        );
        let log = std::fs::File::create(config.with_extension("log")).expect("log file");
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(config)
            .arg("run")
            // tracing writes to stdout: keep both streams in the log.
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Herald {
            child: cmd.spawn().expect("spawn herald"),
        }
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits for exit; the exit code, or None after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
