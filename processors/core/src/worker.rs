//! The consume → handle → commit loop every stage runs, and the helpers stages use to turn
//! events into records and bad input into dead letters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use herald_schemas::{DeadLettered, Event, Reason, headers, topics};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::codec::{Codec, CodecError};
use crate::telemetry::names;
use crate::transport::{InRecord, OutRecord, SourceSpec, Transport};
use crate::util::{now_ms, random_id};

/// Why a stage could not finish a batch.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A dependency is unavailable (registry, PostgreSQL, a provider outage …): the batch is not
    /// acknowledged and is processed again after a back-off.
    #[error("transient: {0}")]
    Transient(String),
    /// The stage cannot go on (bad configuration): the process exits non-zero.
    #[error("fatal: {0}")]
    Fatal(String),
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
}

/// Runs `handler` over `spec` until `shutdown`. A failing source or a transient error drops the
/// source (nothing uncommitted is acknowledged) and rebuilds it after a back-off; a batch in
/// flight when shutdown comes is finished and committed first.
pub async fn run_worker(
    stage: &'static str,
    transport: Arc<dyn Transport>,
    spec: SourceSpec,
    mut handler: impl BatchHandler,
    shutdown: CancellationToken,
) -> Result<(), StageError> {
    let mut backoff = Duration::from_millis(100);
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
            let batch = match polled {
                Ok(b) if b.is_empty() => continue,
                Ok(b) => b,
                Err(e) => {
                    warn!(stage, error = %e, "poll failed; rebuilding source");
                    break;
                }
            };
            let started = Instant::now();
            metrics::counter!(names::RECORDS_IN, "stage" => stage).increment(batch.len() as u64);
            let outputs = match handler.handle(&batch).await {
                Ok(o) => o,
                Err(StageError::Fatal(e)) => {
                    source.close().await;
                    return Err(StageError::Fatal(e));
                }
                Err(StageError::Transient(e)) => {
                    warn!(stage, error = %e, "batch failed; it will be processed again");
                    break;
                }
            };
            let n = outputs.len() as u64;
            if let Err(e) = source.commit(outputs).await {
                warn!(stage, error = %e, "commit failed; the batch will be processed again");
                break;
            }
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
    let handles: Vec<_> = workers
        .into_iter()
        .map(|(spec, handler)| {
            tokio::spawn(run_worker(
                stage,
                transport.clone(),
                spec,
                handler,
                shutdown.clone(),
            ))
        })
        .collect();
    for h in handles {
        h.await
            .map_err(|e| StageError::Fatal(format!("{stage} worker: {e}")))??;
    }
    Ok(())
}

/// Sleeps `d`; true if shutdown came first.
async fn wait(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// Builds an output record carrying `event`, keyed by `key`, with the trace id header.
pub async fn record<T: Event>(
    codec: &Codec,
    topic: &str,
    key: &str,
    trace_id: &str,
    event: &T,
) -> Result<OutRecord, CodecError> {
    Ok(OutRecord {
        topic: topic.to_owned(),
        key: Some(key.as_bytes().to_vec()),
        payload: codec.encode(topic, event).await?,
        headers: vec![
            (headers::TRACE_ID.into(), trace_id.as_bytes().to_vec()),
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
    let event = DeadLettered {
        event_id: random_id(),
        event_time: now_ms(),
        stage: stage.to_owned(),
        source_topic: input.topic.clone(),
        source_partition: input.partition,
        source_offset: input.offset,
        key: input.key.clone(),
        payload: input.payload.clone(),
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

/// The trace id of an input record, or a new one.
pub fn trace_id(input: &InRecord) -> String {
    input
        .header(headers::TRACE_ID)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned)
        .unwrap_or_else(random_id)
}
