//! The transport interface every stage runs on. Stage code never names Kafka or Redis.
//!
//! A [`Source`] hands out batches; [`Source::commit`] publishes the batch's outputs and
//! acknowledges the whole batch as one step:
//! - Kafka, [`Delivery::ExactlyOnce`]: one transaction holds the outputs and the input offsets.
//! - Kafka, [`Delivery::AtLeastOnce`]: outputs are published and acknowledged by the broker,
//!   then the batch's offsets are stored (in order, per partition) for the auto-commit timer.
//! - Redis Streams: outputs (`XADD`) and the acknowledgement (`XACK`) go in one `MULTI`/`EXEC`.
//!
//! A source that fails is dropped and rebuilt: whatever was not committed is delivered again
//! (Kafka from the committed offsets, Redis from the consumer's pending entries).
//!
//! Delayed publish is a publish to a delay tier topic (see `herald-delay`); both transports
//! carry it the same way.

use std::time::Duration;

use futures::future::BoxFuture;

pub mod kafka;
pub mod redis;

/// A consumed record.
#[derive(Debug, Clone)]
pub struct InRecord {
    pub topic: String,
    /// Kafka partition; 0 on Redis.
    pub partition: i32,
    /// Kafka offset; on Redis the millisecond part of the entry id.
    pub offset: i64,
    /// Redis entry id (`1700000000000-0`); `None` on Kafka.
    pub entry_id: Option<String>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl InRecord {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// A record to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct OutRecord {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// How a source acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    AtLeastOnce,
    /// Kafka transactions; on Redis the same as at-least-once with an atomic `MULTI`.
    ExactlyOnce,
}

/// What to consume.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    /// Consumer group (one per stage).
    pub group: String,
    pub topics: Vec<String>,
    pub delivery: Delivery,
    /// Stable id of this worker (transactional id suffix, Redis consumer name).
    pub instance: String,
    pub max_batch: usize,
    /// How long a poll waits for the first record.
    pub max_wait: Duration,
    /// After the first record, how long a poll keeps filling the batch.
    pub linger: Duration,
    /// Longest time the stage may spend on one batch before the broker presumes it dead
    /// (Kafka `max.poll.interval.ms`). The delay stage holds records for up to a tier's length.
    pub max_batch_time: Duration,
    /// A group with no position yet starts at the end (new records only) instead of the
    /// beginning: for consumers that react to what happens from now on (status webhooks).
    pub from_end: bool,
    /// Positions the stage keeps itself (the projector keeps them with its rows): where each
    /// partition starts when assigned, instead of the group's committed offset.
    pub positions: Option<Positions>,
}

/// Next offset to read per (topic, partition), shared by a stage and its source.
pub type Positions =
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(String, i32), i64>>>;

impl SourceSpec {
    pub fn new(group: impl Into<String>, topics: Vec<String>) -> Self {
        SourceSpec {
            group: group.into(),
            topics,
            delivery: Delivery::AtLeastOnce,
            instance: "0".into(),
            max_batch: 1000,
            max_wait: Duration::from_millis(200),
            linger: Duration::from_millis(5),
            max_batch_time: Duration::from_secs(300),
            from_end: false,
            positions: None,
        }
    }
}

/// Errors of a transport. All are transient from a stage's point of view: the stage drops the
/// source, backs off and rebuilds it; nothing uncommitted is lost.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("{0}")]
    Other(String),
}

pub type TResult<T> = Result<T, TransportError>;

/// Consumes batches and commits them together with their outputs.
pub trait Source: Send {
    /// The next batch: empty when nothing arrived within `max_wait`.
    fn poll(&mut self) -> BoxFuture<'_, TResult<Vec<InRecord>>>;
    /// Publishes `outputs` and acknowledges everything polled since the last commit.
    fn commit(&mut self, outputs: Vec<OutRecord>) -> BoxFuture<'_, TResult<()>>;
    /// Commits what was acknowledged and leaves the group.
    fn close(self: Box<Self>) -> BoxFuture<'static, ()>;
    /// Moves every assigned partition to the position [`SourceSpec::positions`] holds for it
    /// (its start when none), forgetting what was polled since the last commit. Transports
    /// without positions (Redis Streams) ignore it.
    fn reposition(&mut self) -> BoxFuture<'_, TResult<()>> {
        Box::pin(async { Ok(()) })
    }
    /// True when the client behind this source recovers from consume errors by itself (the
    /// worker keeps polling it), false when an error means the source must be rebuilt.
    fn recovers_by_itself(&self) -> bool {
        false
    }
}

/// Publishes records outside a consume loop (gateway, callbacks, demo).
pub trait Publisher: Send + Sync {
    /// Resolves once every record is acknowledged by the broker.
    fn publish(&self, records: Vec<OutRecord>) -> BoxFuture<'_, TResult<()>>;
}

/// Topic layout.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    /// `compact` for latest-value topics (templates), `delete` otherwise.
    pub compact: bool,
}

/// A transport: the factory for sources and publishers.
pub trait Transport: Send + Sync {
    fn kind(&self) -> &'static str;
    fn source(&self, spec: SourceSpec) -> BoxFuture<'_, TResult<Box<dyn Source>>>;
    fn publisher(&self) -> TResult<std::sync::Arc<dyn Publisher>>;
    /// Creates missing topics (streams and groups are created lazily on Redis).
    fn ensure_topics<'a>(&'a self, topics: &'a [TopicSpec]) -> BoxFuture<'a, TResult<()>>;
    /// Cheap liveness probe for `/health`.
    fn ping(&self) -> BoxFuture<'_, TResult<()>>;
    /// Moves a consumer group back to the start of `topics` (the group must have no live
    /// members): what `herald rebuild` replays from.
    fn rewind<'a>(&'a self, group: &'a str, topics: &'a [String]) -> BoxFuture<'a, TResult<()>>;
}
