//! Projector. Consumes every status-bearing topic (`herald.accepted`, `herald.rendered`,
//! `herald.dispatch.*`, `herald.status`, `herald.deliveries.v1`, `herald.receipts.v1`, the delay
//! tiers) and maintains PostgreSQL tables: `messages` (current status), `message_events` (the
//! timeline), `delivery_attempts` (outcome, provider response code and latency per attempt).
//! Request aggregates and stats are computed from `messages` by the read API.
//!
//! Promise 3/4: the consumed position of every (topic, partition) is stored in
//! `projector_offsets` in the same transaction as the rows, and records at or below it are
//! skipped, so a replay after a crash applies nothing twice; rows are upserts keyed by event id
//! and a status only moves up in rank, so out-of-order topics never move a message backwards.
//!
//! Those stored positions, not Kafka's committed offsets, say where projecting resumes: rows
//! commit asynchronously, so a PostgreSQL crash can lose commits whose Kafka offsets were
//! already committed. Every partition the consumer is assigned starts at the stored position,
//! and when PostgreSQL comes back in a new session every assigned partition is moved back to
//! what it really holds: what it lost is projected again.
//!
//! - Reads: every topic above. Writes: `herald.dead-letters.v1` only.
//! - Also projects `herald.dead-letters.v1` into `dead_letters` (group `herald-dead-letters`).
//! - Tables: `messages`, `message_events`, `delivery_attempts`, `projector_offsets` (the read
//!   model, `herald_domain::readmodel`).

use std::collections::HashMap;

use futures::future::BoxFuture;
use herald_core::runtime::{DELAY_TIERS_SECS, Deps, delay_topic};
use herald_core::telemetry::names;
use herald_core::transport::{InRecord, OutRecord, Positions};
use herald_core::worker::{BatchHandler, StageError, run_worker};
use herald_domain::event::{StatusEvent, Unreadable};
use herald_schemas::*;
use tokio_util::sync::CancellationToken;

use herald_domain::readmodel::{self, projection::Fact};

pub const STAGE: &str = "projector";

/// The topics the projector reads.
pub fn input_topics() -> Vec<String> {
    let mut t: Vec<String> = vec![
        topics::ACCEPTED.into(),
        topics::RENDERED.into(),
        topics::STATUS.into(),
        topics::DELIVERIES.into(),
        topics::RECEIPTS.into(),
    ];
    t.extend(Channel::ALL.iter().map(|c| topics::dispatch(*c)));
    t.push(topics::DISPATCH_HIGH.into());
    t.extend(DELAY_TIERS_SECS.iter().map(|s| delay_topic(*s)));
    t
}

struct Projector {
    deps: Deps,
    db: herald_core::db::Db,
    /// Kafka mode: the next position to apply per partition, as PostgreSQL holds it; the
    /// consumer starts assigned partitions there.
    offsets: Positions,
    use_offsets: bool,
    /// PostgreSQL came back in a new session whose positions are not loaded yet.
    stale: bool,
    /// Positions were reloaded: move the consumer back before committing.
    reposition: bool,
}

impl Projector {
    async fn fact(
        &self,
        input: &InRecord,
        out: &mut Vec<OutRecord>,
    ) -> Result<Option<Fact>, StageError> {
        let Some(event) =
            StatusEvent::decode(&self.deps.codec, STAGE, input, out, Unreadable::DeadLetter)
                .await?
        else {
            return Ok(None);
        };
        let mut f = Fact::new(event.header(), event.status());
        f.provider = event.provider().map(str::to_owned);
        f.reason = event.reason().cloned();
        match event {
            StatusEvent::Accepted(e) => {
                f.recipient_masked = Some(herald_core::util::mask_address(&e.recipient.address));
                f.recipient_key = Some(herald_core::util::recipient_key(
                    &self.deps.config.security.secret,
                    &e.recipient.address,
                ));
                f.template = e.template;
            }
            StatusEvent::Rendered(e) => {
                f.template = e.template;
                f.template_version = e.template_version;
            }
            StatusEvent::Attempted(e) => {
                f.recipient_masked = Some(e.recipient_masked);
                f.latency_ms = Some(e.latency_ms);
                f.provider_code = e.provider_response_code;
                f.outcome = Some(
                    match e.outcome {
                        DeliveryOutcome::Succeeded => "SUCCEEDED",
                        DeliveryOutcome::FailedPermanent => "FAILED_PERMANENT",
                        DeliveryOutcome::FailedTransient => "FAILED_TRANSIENT",
                        DeliveryOutcome::RateLimited => "RATE_LIMITED",
                        DeliveryOutcome::Unknown => "UNKNOWN",
                    }
                    .to_owned(),
                );
            }
            _ => {}
        }
        Ok(Some(f.without_nul()))
    }

    async fn apply(
        &mut self,
        facts: &[Fact],
        positions: &HashMap<(String, i32), i64>,
    ) -> Result<(), tokio_postgres::Error> {
        let tx = self.db.transaction().await?;
        readmodel::write(&tx, facts, self.use_offsets.then_some(positions)).await?;
        tx.commit().await?;
        if let Ok(mut offsets) = self.offsets.lock() {
            for (k, v) in positions {
                let next = offsets.entry(k.clone()).or_insert(v + 1);
                *next = (*next).max(v + 1);
            }
        }
        Ok(())
    }
}

impl BatchHandler for Projector {
    fn codec(&self) -> &herald_core::codec::Codec {
        &self.deps.codec
    }

    fn take_reposition(&mut self) -> bool {
        std::mem::take(&mut self.reposition)
    }

    fn healthy(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async { self.db.simple_query("SELECT 1").await.is_ok() })
    }

    fn handle<'a>(
        &'a mut self,
        batch: &'a [InRecord],
    ) -> BoxFuture<'a, Result<Vec<OutRecord>, StageError>> {
        Box::pin(async move {
            if self.db.ensure().await? && self.use_offsets {
                self.stale = true;
            }
            if self.stale {
                // A new session: what PostgreSQL really holds (an asynchronous commit lost in a
                // crash is gone). This batch may start past it: drop it, move back, read again.
                let held = readmodel::positions(&*self.db)
                    .await
                    .map_err(|e| StageError::postgres("projector offsets", e))?;
                if let Ok(mut offsets) = self.offsets.lock() {
                    *offsets = held;
                }
                self.stale = false;
                self.reposition = true;
                return Ok(Vec::new());
            }
            let mut out = Vec::new();
            let mut facts = Vec::with_capacity(batch.len());
            let mut positions: HashMap<(String, i32), i64> = HashMap::new();
            for input in batch {
                let key = (input.topic.clone(), input.partition);
                if self.use_offsets {
                    let applied = self.offsets.lock().ok().and_then(|o| o.get(&key).copied());
                    if applied.is_some_and(|next| input.offset < next) {
                        continue; // applied before a crash; its offset commit was lost
                    }
                    let p = positions.entry(key).or_insert(input.offset);
                    *p = (*p).max(input.offset);
                }
                if let Some(f) = self.fact(input, &mut out).await? {
                    facts.push(f);
                }
            }
            let n = facts.len() as u64;
            self.apply(&facts, &positions)
                .await
                .map_err(|e| StageError::postgres("postgres", e))?;
            metrics::counter!(names::PROJECTOR_ROWS).increment(n);
            Ok(out)
        })
    }
}

/// Runs the projector until `shutdown`.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> Result<(), StageError> {
    let use_offsets = deps.transport.kind() == "kafka";
    let (db, offsets) = herald_core::runtime::starting("postgres positions", || async {
        let mut db = herald_domain::schema::migrated(&deps).await?;
        let offsets = readmodel::positions(&*db)
            .await
            .map_err(|e| StageError::postgres("projector offsets", e))?;
        if use_offsets {
            // The rows and the positions they came from commit together, so a commit
            // PostgreSQL loses in a crash is simply replayed: no need to wait for each
            // commit's flush.
            db = db
                .with_session("SET synchronous_commit = off")
                .await
                .map_err(|e| StageError::postgres("projector session", e))?;
        }
        Ok((db, offsets))
    })
    .await?;
    // The projector runs the retention task of the tables owned in herald-domain (one process
    // purges a table at a time, whichever runs it); route and notify purge their own.
    herald_domain::retention::spawn(
        deps.config.postgres.url.clone(),
        deps.config.retention.clone(),
        herald_domain::retention::DOMAIN_PURGES,
        shutdown.clone(),
    );
    let offsets: Positions = std::sync::Arc::new(std::sync::Mutex::new(offsets));
    let mut spec = deps.spec(STAGE, input_topics(), false);
    if use_offsets {
        spec.positions = Some(offsets.clone());
    }
    let transport = deps.transport.clone();
    let letters = DeadLetters {
        db: deps.stage_db().await?,
        deps: deps.clone(),
    };
    let letters_spec = deps.spec("dead-letters", vec![topics::DEAD_LETTERS.into()], false);
    let stop = shutdown.child_token();
    let (projected, dead) = tokio::join!(
        async {
            let r = run_worker(
                STAGE,
                transport.clone(),
                spec,
                Projector {
                    deps,
                    db,
                    offsets,
                    use_offsets,
                    stale: false,
                    reposition: false,
                },
                stop.clone(),
            )
            .await;
            stop.cancel();
            r
        },
        async {
            let r = run_worker(
                "dead-letters",
                transport.clone(),
                letters_spec,
                letters,
                stop.clone(),
            )
            .await;
            stop.cancel();
            r
        }
    );
    projected.and(dead)
}

/// Projects `herald.dead-letters.v1` into `dead_letters` for operators
/// ([`herald_domain::dead_letters`]); at least once, a letter stored twice is stored once.
struct DeadLetters {
    deps: Deps,
    db: herald_core::db::Db,
}

impl BatchHandler for DeadLetters {
    fn handle<'a>(
        &'a mut self,
        batch: &'a [InRecord],
    ) -> BoxFuture<'a, Result<Vec<OutRecord>, StageError>> {
        Box::pin(async move {
            let mut letters = Vec::with_capacity(batch.len());
            for input in batch {
                let Some(payload) = input.payload.as_deref() else {
                    continue;
                };
                match self.deps.codec.decode::<DeadLettered>(payload).await {
                    Ok(d) => letters.push(d),
                    Err(e) if e.is_transient() => {
                        return Err(StageError::Transient(e.to_string()));
                    }
                    // Never dead-lettered again (it would come back here): logged and left on
                    // the topic.
                    Err(e) => tracing::warn!(topic = %input.topic, offset = input.offset,
                        error = %e, "a dead letter that does not decode; not projected"),
                }
            }
            self.db.ensure().await?;
            herald_domain::dead_letters::record_many(&*self.db, &letters)
                .await
                .map_err(|e| StageError::Transient(format!("dead letters: {e}")))?;
            Ok(Vec::new())
        })
    }

    fn codec(&self) -> &herald_core::codec::Codec {
        &self.deps.codec
    }
}
