//! What a stage is given to run: configuration, codec, transport, and the topic layout.

use std::sync::Arc;
use std::time::Duration;

use herald_schemas::{Channel, topics};

use crate::codec::{Codec, RegistryResolver};
use crate::config::{Config, TransportKind};
use crate::transport::kafka::{KafkaSettings, KafkaTransport};
use crate::transport::redis::{RedisSettings, RedisTransport};
use crate::transport::{Delivery, SourceSpec, TopicSpec, Transport};

/// Delay tiers in seconds. A record due later than the largest tier cycles through it.
pub const DELAY_TIERS_SECS: [u64; 5] = [1, 10, 60, 600, 3600];

/// The delay tier for a record due in `remaining_ms`: the largest tier not longer than it (the
/// smallest for anything shorter).
pub fn tier_for(remaining_ms: i64) -> u64 {
    DELAY_TIERS_SECS
        .iter()
        .rev()
        .copied()
        .find(|t| (*t as i64) * 1000 <= remaining_ms)
        .unwrap_or(DELAY_TIERS_SECS[0])
}

pub fn delay_topic(tier_secs: u64) -> String {
    format!("{}{tier_secs}s", topics::DELAY_PREFIX)
}

/// Every topic Herald uses.
pub fn all_topics(partitions: i32) -> Vec<TopicSpec> {
    let mut names: Vec<String> = vec![
        topics::REQUESTS.into(),
        topics::ACCEPTED.into(),
        topics::RENDERED.into(),
        topics::STATUS.into(),
        topics::DELIVERIES.into(),
        topics::RECEIPTS.into(),
        topics::DEAD_LETTERS.into(),
    ];
    names.extend(Channel::ALL.iter().map(|c| topics::dispatch(*c)));
    names.push(topics::DISPATCH_HIGH.into());
    names.extend(DELAY_TIERS_SECS.iter().map(|t| delay_topic(*t)));
    names
        .into_iter()
        .map(|name| TopicSpec {
            name,
            partitions,
            compact: false,
        })
        .collect()
}

/// Shared dependencies of the stages in one process.
#[derive(Clone)]
pub struct Deps {
    pub config: Arc<Config>,
    pub codec: Arc<Codec>,
    pub transport: Arc<dyn Transport>,
}

#[derive(Debug, thiserror::Error)]
pub enum DepsError {
    #[error("{0}")]
    Codec(#[from] crate::codec::CodecError),
    #[error("{0}")]
    Transport(#[from] crate::transport::TransportError),
}

impl Deps {
    pub fn new(config: Config) -> Result<Deps, DepsError> {
        let codec = Arc::new(Codec::new(Arc::new(RegistryResolver::new(
            &config.registry.url,
        )?)));
        let transport: Arc<dyn Transport> = match config.transport {
            TransportKind::Kafka => {
                let mut s = KafkaSettings::new(&config.kafka.brokers);
                s.options = config.kafka.options.clone();
                s.replication_factor = config.kafka.replication_factor;
                Arc::new(KafkaTransport::new(s))
            }
            TransportKind::Redis => {
                let mut s = RedisSettings::new(&config.redis.url);
                s.max_len = config.redis.max_len;
                s.claim_idle = Duration::from_secs(config.redis.claim_idle_secs);
                Arc::new(RedisTransport::new(s)?)
            }
        };
        Ok(Deps {
            config: Arc::new(config),
            codec,
            transport,
        })
    }

    /// A source spec with the pipeline's batching settings. Exactly-once is used where asked
    /// for and enabled in the config.
    pub fn spec(&self, group: &str, topics: Vec<String>, exactly_once: bool) -> SourceSpec {
        let p = &self.config.pipeline;
        let mut spec = SourceSpec::new(format!("herald-{group}"), topics);
        spec.delivery = if exactly_once && self.config.kafka.exactly_once {
            Delivery::ExactlyOnce
        } else {
            Delivery::AtLeastOnce
        };
        spec.instance = instance_id();
        spec.max_batch = p.batch_max;
        spec.linger = Duration::from_millis(p.batch_linger_ms);
        spec.max_wait = Duration::from_millis(p.poll_wait_ms);
        spec
    }

    /// A stage's own pooled PostgreSQL connection, taken at start. While PostgreSQL is away
    /// (or not accepting connections yet) the start waits for it ([`starting`]); only a
    /// connection it refuses for good (bad credentials, no such database) is fatal.
    pub async fn stage_db(&self) -> Result<crate::db::Db, crate::worker::StageError> {
        starting("postgres", || async {
            crate::db::Db::connect(&self.config.postgres.url)
                .await
                .map_err(pool_start_error)
        })
        .await
    }

    /// A pool shared by a process's concurrent users (the API's handlers), made at start
    /// (waiting for PostgreSQL like [`Deps::stage_db`]).
    pub async fn shared_db(&self) -> Result<crate::db::SharedDb, crate::worker::StageError> {
        starting("postgres", || async {
            crate::db::SharedDb::connect(&self.config.postgres.url)
                .await
                .map_err(pool_start_error)
        })
        .await
    }

    /// A PostgreSQL client (the connection task runs in the background).
    pub async fn postgres(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        connect_postgres(&self.config.postgres.url).await
    }
}

/// A failure to connect at start: fatal when PostgreSQL refuses us for good (SQLSTATE class 28
/// invalid authorization, 3D no such database), else transient.
fn pool_start_error(e: crate::db::PoolFailure) -> crate::worker::StageError {
    use crate::worker::StageError;
    let refused = match &e {
        crate::db::PoolFailure::Postgres(pg) => pg.as_db_error().is_some_and(|db| {
            let code = db.code().code();
            code.starts_with("28") || code.starts_with("3D")
        }),
        crate::db::PoolFailure::Pool(_) => false,
    };
    if refused {
        StageError::Fatal(format!("postgres: {e}"))
    } else {
        StageError::Transient(format!("postgres: {e}"))
    }
}

/// Longest pause between two tries of a dependency at start.
const START_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Runs `attempt` until it succeeds or fails for good: what a process needs before it can work
/// (the registry, PostgreSQL, topics) may be restarting when the process starts, and a stage
/// that exited then would stay down wherever nothing restarts it (promise 1: a dependency that
/// is down only pauses a stage — at start too). A transient failure is logged and tried again
/// with back-off (100 ms doubling to 5 s); a fatal or permanent one is returned; SIGTERM or
/// SIGINT while waiting ends the wait with a fatal error.
pub async fn starting<T, F, Fut>(what: &str, mut attempt: F) -> Result<T, crate::worker::StageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::worker::StageError>>,
{
    use crate::worker::StageError;
    let shutdown = crate::shutdown::on_signals();
    let mut backoff = Duration::from_millis(100);
    let mut tries = 0u32;
    loop {
        match attempt().await {
            Err(StageError::Transient(e)) => {
                tries += 1;
                metrics::counter!(crate::telemetry::names::START_RETRIES, "dependency" => what.to_owned())
                    .increment(1);
                tracing::warn!(dependency = what, error = %e, tries, "not available at start; trying again");
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        return Err(StageError::Fatal(format!("stopped while waiting for {what}: {e}")));
                    }
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(START_BACKOFF_MAX);
            }
            other => return other,
        }
    }
}

/// Longest a single statement may run before the server cancels it (a transient error for the
/// stage, retried): no input can hold a connection for ever.
pub const STATEMENT_TIMEOUT_MS: u64 = 30_000;

/// A client configuration from `url` with Herald's statement and connect timeouts.
pub fn postgres_config(url: &str) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
    let mut cfg: tokio_postgres::Config = url.parse()?;
    let timeout = format!("-c statement_timeout={STATEMENT_TIMEOUT_MS}");
    let options = match cfg.get_options() {
        Some(o) if o.contains("statement_timeout") => o.to_owned(),
        Some(o) => format!("{o} {timeout}"),
        None => timeout,
    };
    cfg.options(&options);
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(10));
    }
    Ok(cfg)
}

/// One unpooled client (tools and tests; stages take theirs from [`crate::db`]).
pub async fn connect_postgres(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = postgres_config(url)?.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

/// This worker's stable id: HERALD_INSTANCE, else the host name. Stable across restarts so
/// Kafka fences a zombie's transactions and Redis hands a restarted worker its pending entries.
pub fn instance_id() -> String {
    std::env::var("HERALD_INSTANCE").unwrap_or_else(|_| {
        std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_owned())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "herald-0".into())
    })
}

/// A PostgreSQL error with the server's message (tokio-postgres' Display says only "db error").
pub fn pg_error(e: tokio_postgres::Error) -> String {
    pg_error_ref(&e)
}

/// [`pg_error`] by reference.
pub fn pg_error_ref(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use crate::worker::StageError;

    #[tokio::test]
    async fn a_start_waits_out_transient_failures_and_gives_up_on_fatal_ones() {
        let mut tries = 0;
        let got = super::starting("test dependency", || {
            tries += 1;
            let n = tries;
            async move {
                if n < 3 {
                    Err(StageError::Transient("away".into()))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(got.ok(), Some(3));
        let mut tries = 0;
        let got: Result<(), _> = super::starting("test dependency", || {
            tries += 1;
            async { Err(StageError::Fatal("bad config".into())) }
        })
        .await;
        assert!(matches!(got, Err(StageError::Fatal(_))));
        assert_eq!(tries, 1, "a fatal failure is not tried again");
    }

    #[test]
    fn picks_the_largest_tier_that_fits() {
        assert_eq!(super::tier_for(500), 1);
        assert_eq!(super::tier_for(1_500), 1);
        assert_eq!(super::tier_for(45_000), 10);
        assert_eq!(super::tier_for(5 * 3600 * 1000), 3600);
    }
}
