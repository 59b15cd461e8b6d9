//! Redis Streams transport: one stream per topic, one consumer group per stage. Reads are batched
//! (`XREADGROUP COUNT n BLOCK ms`), a batch's outputs (`XADD … MAXLEN ~`) and its acknowledgement
//! (`XACK`) go in one `MULTI`/`EXEC`, so a crash leaves either both or neither. A restarted worker
//! first re-reads its own pending entries; entries a dead worker left pending are taken over with
//! `XAUTOCLAIM` once idle long enough.
//!
//! "No entry stays pending longer than `claim_idle` plus a poll while a worker of its group
//! runs" holds by construction:
//! - a source that fails in any way (a dropped connection, a Redis restart, an answer that did
//!   not come in time — after which the server may still have handed this consumer entries) is
//!   rebuilt, and a new source re-reads its own consumer's pending entries first;
//! - every source sweeps its group's whole pending list with `XAUTOCLAIM` at least every
//!   `claim_idle / 2`, following the command's cursor to the end of the list (a sweep that
//!   always restarted at `0-0` with `COUNT` could stop short of entries further on);
//! - the connections that publish and probe reconnect by themselves (`ConnectionManager`), so
//!   a Redis restart never leaves a process with a dead one;
//! - each source reports the age of its group's oldest pending entry per stream
//!   ([`names::PENDING_OLDEST_SECONDS`]), which the `HeraldRedisPendingStuck` alert watches.
//!
//! [`names::PENDING_OLDEST_SECONDS`]: crate::telemetry::names::PENDING_OLDEST_SECONDS

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamInfoGroupsReply, StreamPendingCountReply, StreamReadReply,
};
use redis::{AsyncCommands, AsyncConnectionConfig, Value};

use super::{
    InRecord, OutRecord, Publisher, Source, SourceSpec, TResult, TopicSpec, Transport,
    TransportError,
};

#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    /// Approximate cap per stream (`MAXLEN ~`). Size it above the largest backlog you expect:
    /// trimming drops the oldest entries whether or not they were read.
    pub max_len: usize,
    /// A pending entry idle this long is taken over from its (presumed dead) consumer.
    pub claim_idle: Duration,
}

impl RedisSettings {
    pub fn new(url: impl Into<String>) -> Self {
        RedisSettings {
            url: url.into(),
            max_len: 5_000_000,
            claim_idle: Duration::from_secs(30),
        }
    }
}

pub struct RedisTransport {
    settings: RedisSettings,
    client: redis::Client,
    /// Probes, rewinds and every publisher of the process share one reconnecting connection.
    shared: Arc<tokio::sync::OnceCell<ConnectionManager>>,
}

/// Longest wait for Redis to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for an answer beyond a command's own blocking time: a batch's `MULTI` of a
/// thousand `XADD`s, or a server busy rewriting its append-only file, can take more than the
/// client's default half second, and a command given up on may still be carried out.
const ANSWER_SLACK: Duration = Duration::from_secs(10);

impl RedisTransport {
    pub fn new(settings: RedisSettings) -> TResult<Self> {
        let client = redis::Client::open(settings.url.as_str())?;
        Ok(RedisTransport {
            settings,
            client,
            shared: Arc::new(tokio::sync::OnceCell::new()),
        })
    }

    async fn shared(&self) -> TResult<ConnectionManager> {
        shared_connection(&self.client, &self.shared).await
    }
}

/// The process's reconnecting connection, made on first use.
async fn shared_connection(
    client: &redis::Client,
    cell: &tokio::sync::OnceCell<ConnectionManager>,
) -> TResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(ANSWER_SLACK))
        // A command during a restart fails at once (the caller retries); reconnecting goes on
        // in the background.
        .set_number_of_retries(2);
    Ok(cell
        .get_or_try_init(|| ConnectionManager::new_with_config(client.clone(), config))
        .await?
        .clone())
}

fn add_xadd(pipe: &mut redis::Pipeline, r: &OutRecord, max_len: usize) {
    let c = pipe
        .cmd("XADD")
        .arg(&r.topic)
        .arg("MAXLEN")
        .arg("~")
        .arg(max_len)
        .arg("*");
    if let Some(k) = &r.key {
        c.arg("k").arg(k.as_slice());
    }
    c.arg("v").arg(r.payload.as_slice());
    for (name, value) in &r.headers {
        c.arg(format!("h.{name}")).arg(value.as_slice());
    }
    c.ignore();
}

fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

fn to_in_record(topic: &str, e: &StreamId) -> InRecord {
    let offset =
        e.id.split('-')
            .next()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or_default();
    InRecord {
        topic: topic.to_owned(),
        partition: 0,
        offset,
        entry_id: Some(e.id.clone()),
        key: e.map.get("k").and_then(bytes),
        payload: e.map.get("v").and_then(bytes),
        headers: e
            .map
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("h.")?.to_owned(), bytes(v)?)))
            .collect(),
    }
}

/// How often a source reports its group's lag.
const LAG_INTERVAL: Duration = Duration::from_secs(5);

pub struct RedisSource {
    conn: MultiplexedConnection,
    settings: RedisSettings,
    spec: SourceSpec,
    /// Still re-reading this consumer's own pending entries (after a restart).
    draining_own_pending: bool,
    last_claim: Instant,
    /// When the group's lag was last reported.
    last_lag: Option<Instant>,
    unacked: BTreeMap<String, Vec<String>>,
}

/// `XAUTOCLAIM` calls one sweep makes at most per stream (each examines up to ten times `COUNT`
/// pending entries); a longer list is swept on in the next round from where this one stopped.
const CLAIM_CALLS_PER_SWEEP: usize = 16;

impl RedisSource {
    async fn read(&mut self, ids: &str, block: Option<Duration>) -> TResult<Vec<InRecord>> {
        let mut c = redis::cmd("XREADGROUP");
        c.arg("GROUP")
            .arg(&self.spec.group)
            .arg(&self.spec.instance)
            .arg("COUNT")
            .arg(self.spec.max_batch);
        if let Some(b) = block {
            c.arg("BLOCK").arg(b.as_millis().max(1) as u64);
        }
        c.arg("STREAMS");
        for t in &self.spec.topics {
            c.arg(t);
        }
        for _ in &self.spec.topics {
            c.arg(ids);
        }
        let reply: Option<StreamReadReply> = c.query_async(&mut self.conn).await?;
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for e in &key.ids {
                // An entry trimmed while pending comes back without fields: nothing to process,
                // but it must still be acknowledged.
                out.push(to_in_record(&key.key, e));
            }
        }
        Ok(out)
    }

    /// Takes over the group's entries idle for `claim_idle` or more (a dead worker's; this
    /// consumer's own too, should it have lost track of one), sweeping each stream's pending
    /// list to its end: `XAUTOCLAIM` examines a bounded slice per call and answers where to go
    /// on, so the sweep follows that cursor rather than starting at `0-0` every time.
    async fn claim_abandoned(&mut self) -> TResult<Vec<InRecord>> {
        let mut out = Vec::new();
        for t in self.spec.topics.clone() {
            let mut cursor = "0-0".to_owned();
            for _ in 0..CLAIM_CALLS_PER_SWEEP {
                let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                    .arg(&t)
                    .arg(&self.spec.group)
                    .arg(&self.spec.instance)
                    .arg(self.settings.claim_idle.as_millis() as u64)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(self.spec.max_batch)
                    .query_async(&mut self.conn)
                    .await?;
                if !reply.claimed.is_empty() {
                    tracing::warn!(group = %self.spec.group, stream = %t, entries = reply.claimed.len(),
                        "took over entries pending on a consumer for longer than claim_idle");
                }
                out.extend(reply.claimed.iter().map(|e| to_in_record(&t, e)));
                cursor = reply.next_stream_id;
                if cursor == "0-0" || out.len() >= self.spec.max_batch {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Reports the group's lag on each stream (entries not yet delivered to the group plus
    /// entries delivered and not yet acknowledged) at most every [`LAG_INTERVAL`]. A failure
    /// here is left to the next poll's own error.
    async fn report_lag(&mut self) {
        if self.last_lag.is_some_and(|t| t.elapsed() < LAG_INTERVAL) {
            return;
        }
        self.last_lag = Some(Instant::now());
        for t in &self.spec.topics {
            let reply: Result<StreamInfoGroupsReply, _> = self.conn.xinfo_groups(t).await;
            let Ok(reply) = reply else {
                continue;
            };
            if let Some(g) = reply.groups.iter().find(|g| g.name == self.spec.group) {
                let lag = g.lag.unwrap_or(0) + g.pending;
                crate::telemetry::consumer_lag(&self.spec.group, t, 0, lag as i64);
            }
            // The group's first pending entry (lowest id) has waited longest unless it was
            // re-delivered: its time since it was handed out is the age an alert needs (an entry
            // added long ago and read just now, from a backlog, is not stuck).
            let first: Result<StreamPendingCountReply, _> = self
                .conn
                .xpending_count(t, &self.spec.group, "-", "+", 1)
                .await;
            if let Ok(p) = first {
                let oldest = p
                    .ids
                    .first()
                    .map_or(0.0, |e| e.last_delivered_ms as f64 / 1000.0);
                metrics::gauge!(crate::telemetry::names::PENDING_OLDEST_SECONDS,
                    "group" => self.spec.group.clone(), "topic" => t.clone())
                .set(oldest);
            }
        }
    }

    async fn poll_batch(&mut self) -> TResult<Vec<InRecord>> {
        self.report_lag().await;
        let batch = if self.draining_own_pending {
            let b = self.read("0", None).await?;
            if b.is_empty() {
                self.draining_own_pending = false;
            }
            b
        } else if self.last_claim.elapsed() >= self.settings.claim_idle / 2 {
            self.last_claim = Instant::now();
            self.claim_abandoned().await?
        } else {
            Vec::new()
        };
        let batch = if batch.is_empty() {
            self.read(">", Some(self.spec.max_wait)).await?
        } else {
            batch
        };
        for r in &batch {
            if let Some(id) = &r.entry_id {
                self.unacked
                    .entry(r.topic.clone())
                    .or_default()
                    .push(id.clone());
            }
        }
        Ok(batch)
    }

    async fn commit_batch(&mut self, outputs: Vec<OutRecord>) -> TResult<()> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for r in &outputs {
            add_xadd(&mut pipe, r, self.settings.max_len);
        }
        for (topic, ids) in &self.unacked {
            pipe.cmd("XACK")
                .arg(topic)
                .arg(&self.spec.group)
                .arg(ids)
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn).await?;
        self.unacked.clear();
        Ok(())
    }
}

impl Source for RedisSource {
    fn poll(&mut self) -> BoxFuture<'_, TResult<Vec<InRecord>>> {
        Box::pin(self.poll_batch())
    }

    fn commit(&mut self, outputs: Vec<OutRecord>) -> BoxFuture<'_, TResult<()>> {
        Box::pin(self.commit_batch(outputs))
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, ()> {
        // Unacknowledged entries stay pending for this consumer name and are re-read on restart.
        Box::pin(async {})
    }
}

/// Publishes on the process's shared reconnecting connection, made on first use.
pub struct RedisPublisher {
    client: redis::Client,
    shared: Arc<tokio::sync::OnceCell<ConnectionManager>>,
    max_len: usize,
}

impl Publisher for RedisPublisher {
    fn publish(&self, records: Vec<OutRecord>) -> BoxFuture<'_, TResult<()>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            for r in &records {
                add_xadd(&mut pipe, r, self.max_len);
            }
            let mut conn = shared_connection(&self.client, &self.shared).await?;
            pipe.query_async::<()>(&mut conn).await?;
            Ok(())
        })
    }
}

impl Transport for RedisTransport {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn source(&self, spec: SourceSpec) -> BoxFuture<'_, TResult<Box<dyn Source>>> {
        Box::pin(async move {
            // A dedicated connection: XREADGROUP BLOCK would stall a shared multiplexed one.
            // Its answers may take the blocking time plus a large MULTI's; a failure of any
            // kind drops the source (see the module header).
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(spec.max_wait + ANSWER_SLACK));
            let mut conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            for t in &spec.topics {
                let r: redis::RedisResult<()> = conn
                    .xgroup_create_mkstream(t, &spec.group, if spec.from_end { "$" } else { "0" })
                    .await;
                if let Err(e) = r
                    && e.code() != Some("BUSYGROUP")
                {
                    return Err(TransportError::Redis(e));
                }
            }
            Ok(Box::new(RedisSource {
                conn,
                settings: self.settings.clone(),
                spec,
                draining_own_pending: true,
                last_claim: Instant::now(),
                last_lag: None,
                unacked: BTreeMap::new(),
            }) as Box<dyn Source>)
        })
    }

    fn publisher(&self) -> TResult<Arc<dyn Publisher>> {
        // Connecting is async: the shared connection is made on first publish.
        Ok(Arc::new(RedisPublisher {
            client: self.client.clone(),
            shared: self.shared.clone(),
            max_len: self.settings.max_len,
        }))
    }

    fn ensure_topics<'a>(&'a self, _topics: &'a [TopicSpec]) -> BoxFuture<'a, TResult<()>> {
        // Streams and groups are created on first use (XGROUP CREATE … MKSTREAM).
        Box::pin(async { Ok(()) })
    }

    fn rewind<'a>(&'a self, group: &'a str, topics: &'a [String]) -> BoxFuture<'a, TResult<()>> {
        Box::pin(async move {
            let mut c = self.shared().await?;
            for t in topics {
                // A stream or group that does not exist yet has nothing to rewind.
                let _: redis::RedisResult<String> = redis::cmd("XGROUP")
                    .arg("SETID")
                    .arg(t)
                    .arg(group)
                    .arg("0")
                    .query_async(&mut c)
                    .await;
            }
            Ok(())
        })
    }

    fn ping(&self) -> BoxFuture<'_, TResult<()>> {
        Box::pin(async move {
            let mut c = self.shared().await?;
            let _: String = redis::cmd("PING").query_async(&mut c).await?;
            Ok(())
        })
    }
}
