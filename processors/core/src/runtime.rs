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

    /// A stage's own pooled PostgreSQL connection, taken at start: failing is fatal (the
    /// process exits; its supervisor restarts it). Later failures are the worker's to retry.
    pub async fn stage_db(&self) -> Result<crate::db::Db, crate::worker::StageError> {
        crate::db::Db::connect(&self.config.postgres.url)
            .await
            .map_err(|e| crate::worker::StageError::Fatal(format!("postgres: {e}")))
    }

    /// A pool shared by a process's concurrent users (the API's handlers), made at start.
    pub async fn shared_db(&self) -> Result<crate::db::SharedDb, crate::worker::StageError> {
        crate::db::SharedDb::connect(&self.config.postgres.url)
            .await
            .map_err(|e| crate::worker::StageError::Fatal(format!("postgres: {e}")))
    }

    /// A PostgreSQL client (the connection task runs in the background).
    pub async fn postgres(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        connect_postgres(&self.config.postgres.url).await
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
    #[test]
    fn picks_the_largest_tier_that_fits() {
        assert_eq!(super::tier_for(500), 1);
        assert_eq!(super::tier_for(1_500), 1);
        assert_eq!(super::tier_for(45_000), 10);
        assert_eq!(super::tier_for(5 * 3600 * 1000), 3600);
    }
}
