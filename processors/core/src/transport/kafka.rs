//! Kafka transport (rdkafka). At-least-once sources store offsets only after their outputs are
//! acknowledged, batch by batch, so the auto-commit timer never moves past unfinished work;
//! exactly-once sources wrap outputs and input offsets in one transaction per batch.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, join_all};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use super::{
    Delivery, InRecord, OutRecord, Positions, Publisher, Source, SourceSpec, TResult, TopicSpec,
    Transport, TransportError,
};

/// Connection settings shared by every client of the process.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    /// Raw librdkafka options, applied last (they win).
    pub options: BTreeMap<String, String>,
    /// Prefix of transactional ids (`<prefix>-<group>-<instance>`).
    pub transactional_prefix: String,
    /// Replicas of topics created by [`Transport::ensure_topics`].
    pub replication_factor: i32,
}

impl KafkaSettings {
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            options: BTreeMap::new(),
            transactional_prefix: "herald".into(),
            // Test helpers build settings without a config: the stack's cluster says how many.
            replication_factor: std::env::var("HERALD_KAFKA_REPLICATION_FACTOR")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
        }
    }

    fn client(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in &self.options {
            c.set(k, v);
        }
        c
    }

    fn producer(&self, transactional_id: Option<&str>) -> TResult<FutureProducer> {
        let mut c = self.client(&[
            ("linger.ms", "5"),
            ("batch.num.messages", "10000"),
            ("compression.type", "lz4"),
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("message.timeout.ms", "30000"),
        ]);
        if let Some(id) = transactional_id {
            c.set("transactional.id", id);
            c.set("transaction.timeout.ms", "60000");
        }
        Ok(c.create()?)
    }

    fn consumer(&self, spec: &SourceSpec) -> TResult<StreamConsumer<StageContext>> {
        let auto_commit = if spec.delivery == Delivery::AtLeastOnce {
            "true"
        } else {
            "false"
        };
        let max_poll = spec.max_batch_time.as_millis().to_string();
        let c = self.client(&[
            ("group.id", &spec.group),
            ("max.poll.interval.ms", &max_poll),
            ("enable.auto.commit", auto_commit),
            ("auto.commit.interval.ms", "1000"),
            ("enable.auto.offset.store", "false"),
            (
                "auto.offset.reset",
                if spec.from_end { "latest" } else { "earliest" },
            ),
            ("isolation.level", "read_committed"),
            ("session.timeout.ms", "10000"),
            ("heartbeat.interval.ms", "1000"),
            // How long the broker holds a fetch that finds nothing (one answers as soon as
            // records arrive). Was 20 ms: ~27 idle consumers then cost the broker ~28 % of a
            // core and Herald ~18 % doing nothing (scripts/bench, 2026-12-02); 500 ms (the
            // librdkafka default) costs ~5 % and ~11 %, with no latency lost.
            ("fetch.wait.max.ms", "500"),
            // One process runs a consumer per stage: librdkafka's default prefetch (64 MiB each)
            // alone would blow the all-in-one memory budget. 1 MiB is a few batches of
            // messages, and measured as fast as 4 MiB on the benchmark (scripts/bench).
            ("queued.max.messages.kbytes", "1024"),
            ("partition.assignment.strategy", "cooperative-sticky"),
            // Consumer lag per partition (see `StageContext::stats`).
            ("statistics.interval.ms", LAG_INTERVAL_MS),
        ]);
        let consumer: StreamConsumer<StageContext> = c.create_with_context(StageContext {
            positions: spec.positions.clone(),
            group: spec.group.clone(),
            lagging: Default::default(),
        })?;
        let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(consumer)
    }
}

/// Where a partition starts for a stage that keeps its own positions.
fn start_at(positions: &Positions, topic: &str, partition: i32) -> Offset {
    let next = positions
        .lock()
        .ok()
        .and_then(|p| p.get(&(topic.to_owned(), partition)).copied());
    next.map_or(Offset::Beginning, Offset::Offset)
}

/// How often each consumer reports its lag (librdkafka statistics).
const LAG_INTERVAL_MS: &str = "5000";

/// The consumers' context: a stage that keeps its own positions starts each partition it is
/// assigned there (librdkafka's default rebalance, with the offsets set first); every consumer
/// reports its lag per partition from librdkafka's statistics.
pub struct StageContext {
    positions: Option<Positions>,
    group: String,
    /// Partitions whose lag this consumer reported last time (a partition it no longer holds is
    /// reported as 0 once: another instance reports it now).
    lagging: std::sync::Mutex<std::collections::HashSet<(String, i32)>>,
}

/// Records not yet consumed by this group on one partition: from the position the stage has
/// reached (or, before it has read anything since the assignment, the committed offset) to the
/// last stable offset (records of open transactions are not yet readable under read_committed).
/// `None` when librdkafka does not know yet (-1 values).
pub fn partition_lag(p: &rdkafka::statistics::Partition) -> Option<i64> {
    if p.partition < 0 || !p.desired || p.ls_offset < 0 {
        return None;
    }
    let at = if p.app_offset >= 0 {
        p.app_offset
    } else {
        p.committed_offset
    };
    (at >= 0).then(|| (p.ls_offset - at).max(0))
}

impl ClientContext for StageContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut now = std::collections::HashSet::new();
        for (topic, t) in &statistics.topics {
            for p in t.partitions.values() {
                if let Some(lag) = partition_lag(p) {
                    crate::telemetry::consumer_lag(&self.group, topic, p.partition, lag);
                    now.insert((topic.clone(), p.partition));
                }
            }
        }
        if let Ok(mut before) = self.lagging.lock() {
            for (topic, partition) in before.difference(&now) {
                crate::telemetry::consumer_lag(&self.group, topic, *partition, 0);
            }
            *before = now;
        }
    }
}

impl ConsumerContext for StageContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Some(positions) = &self.positions {
                    for mut tp in tpl.elements() {
                        let offset = start_at(positions, tp.topic(), tp.partition());
                        if let Err(e) = tp.set_offset(offset) {
                            warn!(error = %e, "cannot set a start position");
                        }
                    }
                }
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            // A revocation, or an error (librdkafka's default treats both alike).
            other => {
                if other != RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                    warn!(error = ?other, "rebalance error");
                }
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
        };
        if let Err(e) = result {
            warn!(error = %e, "rebalance failed");
        }
    }
}

pub struct KafkaTransport {
    settings: KafkaSettings,
    publisher: std::sync::OnceLock<Arc<KafkaPublisher>>,
}

impl KafkaTransport {
    pub fn new(settings: KafkaSettings) -> Self {
        KafkaTransport {
            settings,
            publisher: std::sync::OnceLock::new(),
        }
    }

    fn shared_publisher(&self) -> TResult<Arc<KafkaPublisher>> {
        if let Some(p) = self.publisher.get() {
            return Ok(p.clone());
        }
        let p = Arc::new(KafkaPublisher {
            producer: self.settings.producer(None)?,
        });
        Ok(self.publisher.get_or_init(|| p).clone())
    }

    /// A concrete source, for callers (and tests) that need the two-phase transactional API.
    pub async fn kafka_source(&self, spec: SourceSpec) -> TResult<KafkaSource> {
        let consumer = self.settings.consumer(&spec)?;
        let producer = match spec.delivery {
            Delivery::AtLeastOnce => self.shared_publisher()?.producer.clone(),
            Delivery::ExactlyOnce => {
                let id = format!(
                    "{}-{}-{}",
                    self.settings.transactional_prefix, spec.group, spec.instance
                );
                let p = self.settings.producer(Some(&id))?;
                let p2 = p.clone();
                blocking(move || p2.init_transactions(Duration::from_secs(30))).await?;
                p
            }
        };
        Ok(KafkaSource {
            consumer: Arc::new(consumer),
            producer,
            spec,
            positions: HashMap::new(),
            in_transaction: false,
        })
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> TResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TransportError::Other(format!("blocking task: {e}")))?
        .map_err(TransportError::from)
}

fn to_future_record(r: &OutRecord) -> FutureRecord<'_, [u8], [u8]> {
    let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
    for (k, v) in &r.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_slice()),
        });
    }
    let mut fr = FutureRecord::to(&r.topic)
        .payload(r.payload.as_slice())
        .headers(headers);
    if let Some(k) = &r.key {
        fr = fr.key(k.as_slice());
    }
    fr
}

/// Sends all records with many in flight and waits for every acknowledgement.
async fn produce_all(producer: &FutureProducer, records: &[OutRecord]) -> TResult<()> {
    let mut futures = Vec::with_capacity(records.len());
    for r in records {
        let mut record = to_future_record(r);
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    futures.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), rec)) => {
                    // Local queue full: let librdkafka drain, then retry (backpressure).
                    record = rec;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    for r in join_all(futures).await {
        match r {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(e.into()),
            Err(_) => return Err(TransportError::Other("producer dropped a delivery".into())),
        }
    }
    Ok(())
}

pub struct KafkaPublisher {
    producer: FutureProducer,
}

impl Publisher for KafkaPublisher {
    fn publish(&self, records: Vec<OutRecord>) -> BoxFuture<'_, TResult<()>> {
        Box::pin(async move { produce_all(&self.producer, &records).await })
    }
}

pub struct KafkaSource {
    consumer: Arc<StreamConsumer<StageContext>>,
    producer: FutureProducer,
    spec: SourceSpec,
    /// (topic, partition) → (first offset, last offset) polled since the last commit.
    positions: HashMap<(String, i32), (i64, i64)>,
    in_transaction: bool,
}

impl KafkaSource {
    async fn poll_batch(&mut self) -> TResult<Vec<InRecord>> {
        let mut batch = Vec::new();
        let consumer = self.consumer.clone();
        let first = match tokio::time::timeout(self.spec.max_wait, consumer.recv()).await {
            Err(_) => return Ok(batch),
            Ok(r) => r?,
        };
        batch.push(self.take(&first));
        drop(first);
        let deadline = tokio::time::Instant::now() + self.spec.linger;
        while batch.len() < self.spec.max_batch {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Err(_) => break,
                Ok(Ok(m)) => {
                    let rec = self.take(&m);
                    batch.push(rec);
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "kafka consume error");
                    break;
                }
            }
        }
        Ok(batch)
    }

    fn take(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) -> InRecord {
        let entry = self
            .positions
            .entry((m.topic().to_owned(), m.partition()))
            .or_insert((m.offset(), m.offset()));
        entry.1 = m.offset();
        InRecord {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            entry_id: None,
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Phase one of an exactly-once commit: opens the transaction and writes the outputs.
    /// Until [`KafkaSource::finish_transaction`] they are invisible to `read_committed` readers.
    pub async fn stage_outputs(&mut self, outputs: &[OutRecord]) -> TResult<()> {
        let p = self.producer.clone();
        blocking(move || p.begin_transaction()).await?;
        self.in_transaction = true;
        produce_all(&self.producer, outputs).await
    }

    /// Phase two: adds the input offsets to the transaction and commits it.
    pub async fn finish_transaction(&mut self) -> TResult<()> {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), (_, last)) in &self.positions {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(last + 1))?;
        }
        let cgm = self
            .consumer
            .group_metadata()
            .ok_or_else(|| TransportError::Other("no consumer group metadata".into()))?;
        let p = self.producer.clone();
        blocking(move || {
            if tpl.count() > 0 {
                p.send_offsets_to_transaction(&tpl, &cgm, Duration::from_secs(30))?;
            }
            p.commit_transaction(Duration::from_secs(30))
        })
        .await?;
        self.in_transaction = false;
        self.positions.clear();
        Ok(())
    }

    /// After a failed transaction: abort it and rewind to the batch's first offsets so the
    /// batch is processed again by this consumer.
    async fn abort_and_rewind(&mut self) -> TResult<()> {
        if self.in_transaction {
            let p = self.producer.clone();
            blocking(move || p.abort_transaction(Duration::from_secs(30))).await?;
            self.in_transaction = false;
        }
        for ((topic, partition), (first, _)) in self.positions.drain() {
            self.consumer.seek(
                &topic,
                partition,
                Offset::Offset(first),
                Duration::from_secs(10),
            )?;
        }
        Ok(())
    }

    async fn commit_batch(&mut self, outputs: Vec<OutRecord>) -> TResult<()> {
        match self.spec.delivery {
            Delivery::AtLeastOnce => {
                produce_all(&self.producer, &outputs).await?;
                for ((topic, partition), (_, last)) in self.positions.drain() {
                    // librdkafka stores `last + 1`: the next record to read.
                    self.consumer.store_offset(&topic, partition, last)?;
                }
                Ok(())
            }
            Delivery::ExactlyOnce => {
                let result = match self.stage_outputs(&outputs).await {
                    Ok(()) => self.finish_transaction().await,
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    warn!(error = %e, group = %self.spec.group, "transaction failed; aborting and rewinding");
                    self.abort_and_rewind().await?;
                    return Err(e);
                }
                Ok(())
            }
        }
    }
}

impl Source for KafkaSource {
    fn poll(&mut self) -> BoxFuture<'_, TResult<Vec<InRecord>>> {
        Box::pin(self.poll_batch())
    }

    fn commit(&mut self, outputs: Vec<OutRecord>) -> BoxFuture<'_, TResult<()>> {
        Box::pin(self.commit_batch(outputs))
    }

    fn reposition(&mut self) -> BoxFuture<'_, TResult<()>> {
        Box::pin(async move {
            let Some(positions) = self.spec.positions.clone() else {
                return Ok(());
            };
            self.positions.clear();
            let consumer = self.consumer.clone();
            blocking(move || {
                for tp in consumer.assignment()?.elements() {
                    let offset = start_at(&positions, tp.topic(), tp.partition());
                    consumer.seek(tp.topic(), tp.partition(), offset, Duration::from_secs(10))?;
                }
                Ok(())
            })
            .await
        })
    }

    /// librdkafka reconnects and fails over between brokers on its own.
    fn recovers_by_itself(&self) -> bool {
        true
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let consumer = self.consumer.clone();
            let delivery = self.spec.delivery;
            let _ = tokio::task::spawn_blocking(move || {
                if delivery == Delivery::AtLeastOnce {
                    // Offsets stored since the last auto-commit.
                    match consumer.commit_consumer_state(CommitMode::Sync) {
                        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                        Err(e) => warn!(error = %e, "final offset commit failed"),
                    }
                }
                consumer.unsubscribe();
            })
            .await;
        })
    }
}

impl Transport for KafkaTransport {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn source(&self, spec: SourceSpec) -> BoxFuture<'_, TResult<Box<dyn Source>>> {
        Box::pin(async move { Ok(Box::new(self.kafka_source(spec).await?) as Box<dyn Source>) })
    }

    fn publisher(&self) -> TResult<Arc<dyn Publisher>> {
        Ok(self.shared_publisher()?)
    }

    fn rewind<'a>(&'a self, group: &'a str, topics: &'a [String]) -> BoxFuture<'a, TResult<()>> {
        Box::pin(async move {
            let consumer: rdkafka::consumer::BaseConsumer = self
                .settings
                .client(&[("group.id", group), ("enable.auto.commit", "false")])
                .create()?;
            let topics = topics.to_vec();
            blocking(move || {
                let mut tpl = rdkafka::TopicPartitionList::new();
                for t in &topics {
                    let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10))?;
                    for mt in md.topics() {
                        for p in mt.partitions() {
                            let (low, _) =
                                consumer.fetch_watermarks(t, p.id(), Duration::from_secs(10))?;
                            tpl.add_partition_offset(t, p.id(), rdkafka::Offset::Offset(low))?;
                        }
                    }
                }
                consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync)
            })
            .await
        })
    }

    fn ensure_topics<'a>(&'a self, topics: &'a [TopicSpec]) -> BoxFuture<'a, TResult<()>> {
        Box::pin(async move {
            let admin: AdminClient<DefaultClientContext> = self.settings.client(&[]).create()?;
            let new: Vec<NewTopic<'_>> = topics
                .iter()
                .map(|t| {
                    let nt = NewTopic::new(
                        &t.name,
                        t.partitions,
                        TopicReplication::Fixed(self.settings.replication_factor),
                    );
                    if t.compact {
                        nt.set("cleanup.policy", "compact")
                    } else {
                        nt
                    }
                })
                .collect();
            let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
            for r in admin.create_topics(&new, &opts).await? {
                match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((t, e)) => {
                        return Err(TransportError::Other(format!("create topic {t}: {e}")));
                    }
                }
            }
            // Creation is asynchronous: wait until every partition has a leader.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            for t in topics {
                loop {
                    let md = admin
                        .inner()
                        .fetch_metadata(Some(&t.name), Duration::from_secs(5))?;
                    let ready = md.topics().iter().any(|mt| {
                        mt.error().is_none()
                            && mt.partitions().len() as i32 >= t.partitions
                            && mt.partitions().iter().all(|p| p.leader() >= 0)
                    });
                    if ready {
                        break;
                    }
                    if tokio::time::Instant::now() > deadline {
                        return Err(TransportError::Other(format!(
                            "topic {} has no leader",
                            t.name
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Ok(())
        })
    }

    fn ping(&self) -> BoxFuture<'_, TResult<()>> {
        Box::pin(async move {
            let p = self.shared_publisher()?;
            blocking(move || {
                p.producer
                    .client()
                    .fetch_metadata(None, Duration::from_secs(3))
                    .map(|_| ())
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::partition_lag;
    use rdkafka::statistics::Partition;

    fn partition(app: i64, committed: i64, ls: i64) -> Partition {
        Partition {
            partition: 2,
            desired: true,
            app_offset: app,
            committed_offset: committed,
            ls_offset: ls,
            // librdkafka's own lag counts from the committed offset, which an exactly-once
            // stage never moves through the consumer: not used.
            consumer_lag: 999,
            ..Default::default()
        }
    }

    #[test]
    fn lag_counts_from_the_position_reached_to_the_last_stable_offset() {
        assert_eq!(partition_lag(&partition(40, 10, 100)), Some(60));
        // Nothing read since the assignment: from the committed offset.
        assert_eq!(partition_lag(&partition(-1, 10, 100)), Some(90));
        // Caught up (the position may pass the stable offset by a transaction marker).
        assert_eq!(partition_lag(&partition(101, 10, 100)), Some(0));
        // Unknown yet, not assigned, or librdkafka's internal partition: not reported.
        assert_eq!(partition_lag(&partition(-1, -1, 100)), None);
        assert_eq!(partition_lag(&partition(40, 10, -1)), None);
        let unassigned = Partition {
            desired: false,
            ..partition(40, 10, 100)
        };
        assert_eq!(partition_lag(&unassigned), None);
        let internal = Partition {
            partition: -1,
            ..partition(40, 10, 100)
        };
        assert_eq!(partition_lag(&internal), None);
    }
}
