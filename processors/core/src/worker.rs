//! The consume → handle → commit loop every stage runs, and the helpers stages use to turn
//! events into records and bad input into dead letters.
//!
//! Promise 5 lives here: a record whose data a dependency refuses (a byte PostgreSQL cannot
//! store, an output over Kafka's size limit) never stalls the records behind it. A batch that
//! fails with [`StageError::Permanent`] is split in halves until the record that fails alone is
//! found; that record is ended by [`BatchHandler::reject`] (a dead letter with its original bytes
//! and, where the stage can, a `failed` status) and the rest proceed. A batch that keeps failing
//! with a transient error is retried with back-off, and every few rounds probed the same way: a
//! record that still fails alone while the stage's dependencies answer is isolated too. A
//! dependency that is down only pauses the stage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use herald_schemas::{DeadLettered, Event, MessageFailed, Reason, headers, topics};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::codec::{Codec, CodecError};
use crate::telemetry::names;
use crate::transport::{InRecord, OutRecord, SourceSpec, Transport};
use crate::util::{event_id, now_ms, random_id};

/// Why a stage could not finish a batch, classified once where it happened.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Something in this batch's data is refused for good (a constraint or encoding the data
    /// breaks, a record too large): the worker isolates the record and ends it alone.
    #[error("permanent: {0}")]
    Permanent(String),
    /// A dependency is unavailable (registry, PostgreSQL, a provider outage …): the batch is not
    /// acknowledged and is processed again after a back-off.
    #[error("transient: {0}")]
    Transient(String),
    /// The stage cannot go on (bad configuration): the process exits non-zero.
    #[error("fatal: {0}")]
    Fatal(String),
}

impl StageError {
    /// Classifies a PostgreSQL error: data the server refuses for what it is (SQLSTATE class 22
    /// data exception — e.g. a NUL byte, 22021 —, class 54 program limit exceeded, and integrity
    /// violations other than a unique race) is permanent for the record carrying it; everything
    /// else (connection lost, timeouts, serialization failures) is transient.
    pub fn postgres(context: &str, e: tokio_postgres::Error) -> StageError {
        let permanent = e.as_db_error().is_some_and(|db| {
            let code = db.code().code();
            code.starts_with("22")
                || code.starts_with("54")
                || (code.starts_with("23") && code != "23505")
        });
        let text = format!("{context}: {}", crate::runtime::pg_error(e));
        if permanent {
            StageError::Permanent(text)
        } else {
            StageError::Transient(text)
        }
    }
}

impl From<CodecError> for StageError {
    fn from(e: CodecError) -> Self {
        StageError::Transient(e.to_string())
    }
}

/// A stage's logic over one batch: the records to publish, committed with the batch.
pub trait BatchHandler: Send {
    fn handle<'a>(
        &'a mut self,
        batch: &'a [InRecord],
    ) -> BoxFuture<'a, Result<Vec<OutRecord>, StageError>>;

    /// The codec the worker encodes dead letters with.
    fn codec(&self) -> &Codec;

    /// Whether a record this stage isolates also fails its message ([`fail_message`]): true
    /// for stages that move messages forward; false (a dead letter only) for stages that read
    /// the status topic themselves (projector, notify), which must not feed it their poison.
    fn fails_messages(&self) -> bool {
        false
    }

    /// Ends a record this stage cannot process (isolated by the worker): a dead letter with the
    /// original bytes, and a `failed` status where [`BatchHandler::fails_messages`].
    fn reject<'a>(
        &'a mut self,
        stage: &'static str,
        input: &'a InRecord,
        reason: Reason,
    ) -> BoxFuture<'a, Result<Vec<OutRecord>, StageError>> {
        Box::pin(async move {
            if self.fails_messages() {
                return fail_message(self.codec(), stage, input, reason).await;
            }
            let header = match input.payload.as_deref() {
                Some(p) => self.codec().header(p).await.ok().flatten(),
                None => None,
            };
            let (mid, rid) =
                header.map_or((None, None), |h| (Some(h.message_id), Some(h.request_id)));
            Ok(vec![
                dead_letter(self.codec(), stage, input, reason, mid, rid).await?,
            ])
        })
    }

    /// Whether the source must move back to the positions the stage keeps before the batch
    /// just handled is committed (see [`crate::transport::Source::reposition`]).
    fn take_reposition(&mut self) -> bool {
        false
    }

    /// Whether the stage's own dependencies answer (PostgreSQL …): a record that keeps failing
    /// alone while they do is isolated; while they do not, the stage waits.
    fn healthy(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}

/// Largest record a stage may publish (Kafka's default `message.max.bytes` less room for the
/// framing); a larger output marks its input as poison instead of failing every commit.
pub const MAX_OUTPUT_BYTES: usize = 1_000_000 - 16 * 1024;

/// After this many failed rounds in a row, a round probes the batch for a poison record.
const PROBE_EVERY: u32 = 3;

/// How long consume errors may persist before the source is rebuilt.
const POLL_ERRORS_REBUILD: Duration = Duration::from_secs(60);

/// How the worker handles one polled batch.
struct Isolating<'h, H> {
    stage: &'static str,
    handler: &'h mut H,
}

impl<H: BatchHandler> Isolating<'_, H> {
    /// The handler over `batch`, with its outputs checked against [`MAX_OUTPUT_BYTES`].
    async fn attempt(&mut self, batch: &[InRecord]) -> Result<Vec<OutRecord>, StageError> {
        let out = self.handler.handle(batch).await?;
        if let Some(big) = out.iter().find(|r| r.payload.len() > MAX_OUTPUT_BYTES) {
            return Err(StageError::Permanent(format!(
                "an output record for {} is {} bytes, over the {MAX_OUTPUT_BYTES}-byte limit",
                big.topic,
                big.payload.len()
            )));
        }
        Ok(out)
    }

    /// Handles `batch`, splitting it on a permanent error (and, when `probe`, on a transient
    /// one) until the records that fail alone are found and rejected. Boxed: it recurses.
    fn run<'a>(
        &'a mut self,
        batch: &'a [InRecord],
        probe: bool,
    ) -> BoxFuture<'a, Result<Vec<OutRecord>, StageError>> {
        Box::pin(async move {
            let err = match self.attempt(batch).await {
                Ok(out) => return Ok(out),
                Err(StageError::Fatal(e)) => return Err(StageError::Fatal(e)),
                Err(StageError::Transient(e)) if !probe => return Err(StageError::Transient(e)),
                Err(e) => e,
            };
            if let [input] = batch {
                let transient = matches!(err, StageError::Transient(_));
                // A transient failure is the record's own only while everything the stage
                // depends on answers; during an outage the stage waits, it ends nothing.
                if transient
                    && !(self.handler.healthy().await
                        && self.handler.codec().registry_reachable().await)
                {
                    return Err(err);
                }
                let code = if transient {
                    "stage_retries_exhausted"
                } else {
                    "refused_by_dependency"
                };
                metrics::counter!(names::POISON_RECORDS, "stage" => self.stage, "class" => if transient { "transient" } else { "permanent" })
                    .increment(1);
                warn!(stage = self.stage, topic = %input.topic, partition = input.partition,
                      offset = input.offset, error = %err, "isolated a record that fails alone");
                return self
                    .handler
                    .reject(self.stage, input, Reason::new(code, err.to_string()))
                    .await;
            }
            let (a, b) = batch.split_at(batch.len() / 2);
            let mut out = self.run(a, probe).await?;
            out.extend(self.run(b, probe).await?);
            Ok(out)
        })
    }
}

/// [`names::STAGE_UP`] counts a stage's workers running in this process (the send stage runs one
/// per channel): up when one starts, down when it returns, however it ends.
struct Up(&'static str);

impl Up {
    fn new(stage: &'static str) -> Up {
        metrics::gauge!(names::STAGE_UP, "stage" => stage).increment(1.0);
        Up(stage)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        metrics::gauge!(names::STAGE_UP, "stage" => self.0).decrement(1.0);
    }
}

/// Runs `handler` over `spec` until `shutdown`. A failing source drops the source (nothing
/// uncommitted is acknowledged) and rebuilds it after a back-off; a batch that fails is retried
/// in place with back-off and probed for poison records (see the module header); a batch in
/// flight when shutdown comes is finished and committed first.
pub async fn run_worker(
    stage: &'static str,
    transport: Arc<dyn Transport>,
    spec: SourceSpec,
    mut handler: impl BatchHandler,
    shutdown: CancellationToken,
) -> Result<(), StageError> {
    let mut backoff = Duration::from_millis(100);
    let _up = Up::new(stage);
    // Shown from the start (0), not only after the first failure.
    metrics::counter!(names::STAGE_ERRORS, "stage" => stage, "class" => "transient").increment(0);
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let mut source = match transport.source(spec.clone()).await {
            Ok(s) => s,
            Err(e) => {
                warn!(stage, error = %e, "cannot open source; retrying");
                if wait(&shutdown, backoff).await {
                    return Ok(());
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        info!(stage, topics = ?spec.topics, "consuming");
        let mut poll_failing_since: Option<Instant> = None;
        loop {
            let polled = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    source.close().await;
                    info!(stage, "stopped");
                    return Ok(());
                }
                b = source.poll() => b,
            };
            let mut batch = match polled {
                Ok(b) => {
                    poll_failing_since = None;
                    if b.is_empty() {
                        continue;
                    }
                    b
                }
                // A consume error is mostly news (a broker of several went away, a connection
                // dropped): the client recovers by itself. Rebuilding the source for it would
                // make the group rebalance on every error — a storm while a broker is down.
                // Only errors that persist get a new source.
                Err(e) => {
                    let since = *poll_failing_since.get_or_insert_with(Instant::now);
                    if !source.recovers_by_itself() || since.elapsed() > POLL_ERRORS_REBUILD {
                        warn!(stage, error = %e, "poll failing for long; rebuilding source");
                        break;
                    }
                    debug!(stage, error = %e, "poll error; the client recovers");
                    if wait(&shutdown, Duration::from_millis(200)).await {
                        source.close().await;
                        return Ok(());
                    }
                    continue;
                }
            };
            let started = Instant::now();
            let mut spans = crate::trace::enter(stage, &mut batch);
            metrics::counter!(names::RECORDS_IN, "stage" => stage).increment(batch.len() as u64);
            let mut failures = 0u32;
            let outputs = loop {
                let probe = failures > 0 && failures.is_multiple_of(PROBE_EVERY);
                let mut isolating = Isolating {
                    stage,
                    handler: &mut handler,
                };
                match isolating.run(&batch, probe).await {
                    Ok(o) => break Some(o),
                    Err(StageError::Fatal(e)) => {
                        source.close().await;
                        return Err(StageError::Fatal(e));
                    }
                    Err(e) => {
                        failures += 1;
                        metrics::counter!(names::STAGE_ERRORS, "stage" => stage, "class" => "transient")
                            .increment(1);
                        warn!(stage, error = %e, failures, "batch failed; it will be processed again");
                        spans.failed(&e);
                        // Long outages: give the source back (the broker may have presumed this
                        // consumer dead) and rebuild it.
                        if failures >= 4 * PROBE_EVERY {
                            break None;
                        }
                        if wait(&shutdown, backoff).await {
                            source.close().await;
                            return Ok(());
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            let Some(outputs) = outputs else { break };
            if handler.take_reposition() {
                info!(
                    stage,
                    "moving every partition to the positions the stage keeps"
                );
                if let Err(e) = source.reposition().await {
                    warn!(stage, error = %e, "reposition failed; rebuilding source");
                    break;
                }
            }
            let n = outputs.len() as u64;
            if let Err(e) = source.commit(outputs).await {
                warn!(stage, error = %e, "commit failed; the batch will be processed again");
                break;
            }
            spans.end();
            metrics::counter!(names::RECORDS_OUT, "stage" => stage).increment(n);
            metrics::histogram!(names::BATCH_SECONDS, "stage" => stage)
                .record(started.elapsed().as_secs_f64());
            backoff = Duration::from_millis(100);
        }
        source.close().await;
        metrics::counter!(names::SOURCE_RESTARTS, "stage" => stage).increment(1);
        if wait(&shutdown, backoff).await {
            return Ok(());
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Runs several workers of one stage (one per channel, per tier …) until `shutdown`; the first
/// fatal error of any of them is the stage's result.
pub async fn run_workers<H: BatchHandler + 'static>(
    stage: &'static str,
    transport: Arc<dyn Transport>,
    workers: Vec<(SourceSpec, H)>,
    shutdown: CancellationToken,
) -> Result<(), StageError> {
    // The workers stop with the process, or when one of them fails for good.
    let stop = shutdown.child_token();
    let handles: Vec<_> = workers
        .into_iter()
        .map(|(spec, handler)| {
            tokio::spawn(run_worker(
                stage,
                transport.clone(),
                spec,
                handler,
                stop.clone(),
            ))
        })
        .collect();
    join_until_failure(stage, handles, &stop).await
}

/// Waits for every task; the first that fails (or panics) stops the others through `stop`, and
/// its error is returned once they have ended. A stage with a dead worker does not run on as if
/// healthy: the process exits and its supervisor restarts it.
async fn join_until_failure(
    stage: &str,
    handles: Vec<tokio::task::JoinHandle<Result<(), StageError>>>,
    stop: &CancellationToken,
) -> Result<(), StageError> {
    let mut pending: futures::stream::FuturesUnordered<_> = handles.into_iter().collect();
    let mut first = None;
    while let Some(done) = futures::StreamExt::next(&mut pending).await {
        let result = done
            .map_err(|e| StageError::Fatal(format!("{stage} worker: {e}")))
            .and_then(|r| r);
        if let Err(e) = result
            && first.is_none()
        {
            tracing::error!(stage, error = %e, "worker failed; stopping the stage's other workers");
            stop.cancel();
            first = Some(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Sleeps `d`; true if shutdown came first.
async fn wait(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// Builds an output record carrying `event`, keyed by `key`, with the `traceparent` header.
pub async fn record<T: Event>(
    codec: &Codec,
    topic: &str,
    key: &str,
    traceparent: &str,
    event: &T,
) -> Result<OutRecord, CodecError> {
    Ok(OutRecord {
        topic: topic.to_owned(),
        key: Some(key.as_bytes().to_vec()),
        payload: codec.encode(topic, event).await?,
        headers: vec![
            (headers::TRACEPARENT.into(), traceparent.as_bytes().to_vec()),
            (headers::EVENT_TYPE.into(), T::FULL_NAME.as_bytes().to_vec()),
        ],
    })
}

/// A dead-letter record for `input`: the original bytes, where they came from, and why.
pub async fn dead_letter(
    codec: &Codec,
    stage: &str,
    input: &InRecord,
    reason: Reason,
    message_id: Option<String>,
    request_id: Option<String>,
) -> Result<OutRecord, CodecError> {
    metrics::counter!(names::DEAD_LETTERS, "stage" => stage.to_owned(), "reason" => reason.code.clone())
        .increment(1);
    warn!(stage, topic = %input.topic, partition = input.partition, offset = input.offset,
          reason = %reason.code, "dead-lettered");
    // A record near the broker's size limit cannot travel again inside a dead letter whole:
    // keep what fits and say so.
    let room = MAX_OUTPUT_BYTES - 64 * 1024;
    let mut reason = reason;
    let payload = input.payload.as_ref().map(|p| {
        if p.len() > room {
            reason.message = format!(
                "{} (original payload of {} bytes truncated to {room})",
                reason.message,
                p.len()
            );
            p[..room].to_vec()
        } else {
            p.clone()
        }
    });
    let event = DeadLettered {
        event_id: random_id(),
        event_time: now_ms(),
        stage: stage.to_owned(),
        source_topic: input.topic.clone(),
        source_partition: input.partition,
        source_offset: input.offset,
        key: input.key.clone(),
        payload,
        reason,
        message_id,
        request_id,
    };
    let mut out = OutRecord {
        topic: topics::DEAD_LETTERS.to_owned(),
        key: input.key.clone(),
        payload: codec.encode(topics::DEAD_LETTERS, &event).await?,
        headers: input.headers.clone(),
    };
    out.headers.retain(|(k, _)| k != headers::EVENT_TYPE);
    out.headers.push((
        headers::EVENT_TYPE.into(),
        DeadLettered::FULL_NAME.as_bytes().to_vec(),
    ));
    Ok(out)
}

/// Ends a message whose record a stage had to isolate: a dead letter with the original bytes
/// and, when the record carries a message header, a `MessageFailed` so the message reaches a
/// terminal status with the reason. For stages whose outputs feed the status topic (never the
/// projector or notify, which read it).
pub async fn fail_message(
    codec: &Codec,
    stage: &'static str,
    input: &InRecord,
    reason: Reason,
) -> Result<Vec<OutRecord>, StageError> {
    let header = match input.payload.as_deref() {
        Some(p) => match codec.header(p).await {
            Ok(h) => h,
            // The registry is away: fail the message once it is back, rather than
            // dead-lettering a record whose message then never ends. One that answers yet
            // keeps failing this record's schema (the worker isolated it while the registry
            // answered) does not hold the partition: the record is dead-lettered.
            Err(e) if e.is_transient() && !codec.registry_reachable().await => {
                return Err(StageError::Transient(e.to_string()));
            }
            Err(_) => None,
        },
        None => None,
    };
    let Some(header) = header else {
        return Ok(vec![
            dead_letter(codec, stage, input, reason, None, None).await?,
        ]);
    };
    let mid = header.message_id.clone();
    let letter = dead_letter(
        codec,
        stage,
        input,
        reason.clone(),
        Some(mid.clone()),
        Some(header.request_id.clone()),
    )
    .await?;
    let failed = MessageFailed {
        header: header.follow(stage, event_id(&mid, "failed", header.attempt), now_ms()),
        provider: None,
        reason,
    };
    let trace = trace_id(input);
    Ok(vec![
        letter,
        record(codec, topics::STATUS, &mid, &trace, &failed).await?,
    ])
}

/// Decodes `input` as `T`. Bad input becomes a dead letter pushed to `out` (and `None`); a
/// registry outage is an error so the batch is retried instead.
pub async fn decode_or_dead_letter<T: Event>(
    codec: &Codec,
    stage: &str,
    input: &InRecord,
    out: &mut Vec<OutRecord>,
) -> Result<Option<T>, StageError> {
    let Some(payload) = input.payload.as_deref() else {
        out.push(
            dead_letter(
                codec,
                stage,
                input,
                Reason::new("empty_payload", "record has no value"),
                None,
                None,
            )
            .await?,
        );
        return Ok(None);
    };
    match codec.decode::<T>(payload).await {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_transient() => Err(StageError::Transient(e.to_string())),
        Err(e) => {
            out.push(
                dead_letter(
                    codec,
                    stage,
                    input,
                    Reason::new(e.code(), e.to_string()),
                    None,
                    None,
                )
                .await?,
            );
            Ok(None)
        }
    }
}

/// The `traceparent` for what a stage writes from `input`: the stage's span for it (set by the
/// worker, [`crate::trace::enter`]), else the record's own, else a new trace.
pub fn trace_id(input: &InRecord) -> String {
    crate::trace::of_record(input)
        .map(|sc| crate::trace::format(&sc))
        .unwrap_or_else(crate::trace::new_root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::MemoryResolver;

    #[tokio::test]
    async fn the_first_failing_worker_stops_the_others_and_its_error_is_returned() {
        let stop = CancellationToken::new();
        let patient = |stop: CancellationToken| {
            tokio::spawn(async move {
                stop.cancelled().await;
                Ok(())
            })
        };
        let failing = tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Err(StageError::Fatal("listen: address in use".into()))
        });
        let handles = vec![patient(stop.clone()), failing, patient(stop.clone())];
        let joined = tokio::time::timeout(
            Duration::from_secs(5),
            join_until_failure("test", handles, &stop),
        )
        .await
        .expect("the others were stopped");
        assert!(matches!(joined, Err(StageError::Fatal(m)) if m.contains("address in use")));
        assert!(stop.is_cancelled());

        let stop = CancellationToken::new();
        let ok = vec![
            tokio::spawn(async { Ok(()) }),
            tokio::spawn(async { Ok(()) }),
        ];
        assert!(join_until_failure("test", ok, &stop).await.is_ok());
        assert!(!stop.is_cancelled());
    }

    /// A registry that registers, but answers lookups of ids from 1000 on with a failure that
    /// says nothing about the id (a 500), while `GET /subjects` answers or not (`up`).
    struct Flaky {
        inner: MemoryResolver,
        up: bool,
    }

    impl crate::codec::SchemaResolver for Flaky {
        fn register<'a>(
            &'a self,
            subject: &'a str,
            full_name: &'a str,
            schema: &'a str,
        ) -> BoxFuture<'a, Result<u32, CodecError>> {
            self.inner.register(subject, full_name, schema)
        }
        fn fetch(&self, id: u32) -> BoxFuture<'_, Result<String, CodecError>> {
            if id >= 1000 {
                return Box::pin(async { Err(CodecError::Registry("500".into())) });
            }
            self.inner.fetch(id)
        }
        fn reachable(&self) -> BoxFuture<'_, bool> {
            let up = self.up;
            Box::pin(async move { up })
        }
    }

    /// A record isolated while its schema cannot be looked up: while the registry is away the
    /// stage waits (no dead letter for a message that would then never end); while it answers
    /// but keeps failing this one id, the record is dead-lettered rather than holding the
    /// partition for ever.
    #[tokio::test]
    async fn failing_a_record_whose_schema_lookup_fails_waits_only_for_an_absent_registry() {
        let input = InRecord {
            topic: "herald.rendered".into(),
            partition: 0,
            offset: 7,
            entry_id: None,
            key: Some(b"k".to_vec()),
            payload: Some(b"\x00\x00\x00\x03\xe8rest".to_vec()),
            headers: vec![],
        };
        let reason = || Reason::new("stage_retries_exhausted", "refused");
        let away = Codec::new(Arc::new(Flaky {
            inner: MemoryResolver::default(),
            up: false,
        }));
        assert!(matches!(
            fail_message(&away, "route", &input, reason()).await,
            Err(StageError::Transient(_))
        ));
        let answering = Codec::new(Arc::new(Flaky {
            inner: MemoryResolver::default(),
            up: true,
        }));
        let out = fail_message(&answering, "route", &input, reason())
            .await
            .expect("dead-lettered");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, herald_schemas::topics::DEAD_LETTERS);
    }

    /// Fails a batch holding a `poison` record for good, one holding a `sticky` record
    /// transiently (as if a dependency refused just that record); echoes everything else.
    struct Picky {
        codec: Codec,
        calls: usize,
        up: bool,
    }

    impl BatchHandler for Picky {
        fn handle<'a>(
            &'a mut self,
            batch: &'a [InRecord],
        ) -> BoxFuture<'a, Result<Vec<OutRecord>, StageError>> {
            self.calls += 1;
            Box::pin(async move {
                let has = |p: &[u8]| batch.iter().any(|r| r.payload.as_deref() == Some(p));
                if has(b"poison") {
                    return Err(StageError::Permanent("22021: invalid byte".into()));
                }
                if has(b"sticky") || !self.up {
                    return Err(StageError::Transient("refused".into()));
                }
                if has(b"huge") {
                    return Ok(vec![OutRecord {
                        topic: "t".into(),
                        key: None,
                        payload: vec![0; MAX_OUTPUT_BYTES + 1],
                        headers: vec![],
                    }]);
                }
                Ok(batch
                    .iter()
                    .map(|r| OutRecord {
                        topic: "out".into(),
                        key: None,
                        payload: r.payload.clone().unwrap_or_default(),
                        headers: vec![],
                    })
                    .collect())
            })
        }

        fn codec(&self) -> &Codec {
            &self.codec
        }

        fn healthy(&mut self) -> BoxFuture<'_, bool> {
            let up = self.up;
            Box::pin(async move { up })
        }
    }

    fn batch(bad_at: usize, bad: &[u8]) -> Vec<InRecord> {
        (0..16)
            .map(|i| InRecord {
                topic: "in".into(),
                partition: 0,
                offset: i as i64,
                entry_id: None,
                key: None,
                payload: Some(if i == bad_at {
                    bad.to_vec()
                } else {
                    vec![b'a' + i as u8]
                }),
                headers: vec![],
            })
            .collect()
    }

    fn picky(up: bool) -> Picky {
        Picky {
            codec: Codec::new(Arc::new(MemoryResolver::default())),
            calls: 0,
            up,
        }
    }

    fn split(out: &[OutRecord]) -> (usize, usize) {
        let letters = out
            .iter()
            .filter(|r| r.topic == topics::DEAD_LETTERS)
            .count();
        (out.len() - letters, letters)
    }

    #[tokio::test]
    async fn a_permanent_failure_is_isolated_and_the_rest_proceed() {
        for bad in [b"poison".as_slice(), b"huge"] {
            let mut h = picky(true);
            let b = batch(11, bad);
            let out = Isolating {
                stage: "t",
                handler: &mut h,
            }
            .run(&b, false)
            .await
            .unwrap();
            assert_eq!(
                split(&out),
                (15, 1),
                "{bad:?}: 15 records through, 1 dead letter"
            );
            // Bisection: about 2·log2(16) handler calls, not one per record.
            assert!(h.calls <= 10, "{} calls", h.calls);
        }
    }

    #[tokio::test]
    async fn a_record_that_keeps_failing_alone_is_isolated_only_while_dependencies_answer() {
        let b = batch(3, b"sticky");
        let mut h = picky(true);
        // Not probing: the transient error is the batch's, retried later.
        assert!(matches!(
            Isolating {
                stage: "t",
                handler: &mut h
            }
            .run(&b, false)
            .await,
            Err(StageError::Transient(_))
        ));
        let out = Isolating {
            stage: "t",
            handler: &mut h,
        }
        .run(&b, true)
        .await
        .unwrap();
        assert_eq!(split(&out), (15, 1));
        // A dependency that is down isolates nothing: the stage waits.
        let mut down = picky(false);
        assert!(matches!(
            Isolating {
                stage: "t",
                handler: &mut down
            }
            .run(&batch(99, b""), true)
            .await,
            Err(StageError::Transient(_))
        ));
    }
}
