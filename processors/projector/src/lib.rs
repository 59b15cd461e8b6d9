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

pub mod handler;

use std::collections::HashMap;

use futures::future::BoxFuture;
use herald_core::runtime::{DELAY_TIERS_SECS, Deps, delay_topic};
use herald_core::telemetry::names;
use herald_core::transport::{InRecord, OutRecord, Positions};
use herald_core::worker::{BatchHandler, StageError, run_worker};
use herald_domain::event::{StatusEvent, Unreadable};
use herald_schemas::*;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use handler::{Fact, fold};

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
        Ok(Some(f))
    }

    async fn apply(
        &mut self,
        facts: &[Fact],
        positions: &HashMap<(String, i32), i64>,
    ) -> Result<(), tokio_postgres::Error> {
        let tx = self.db.transaction().await?;
        let rows = fold(facts);
        if !rows.is_empty() {
            let col =
                |f: fn(&handler::MessageRow) -> String| rows.iter().map(f).collect::<Vec<_>>();
            let ids = col(|r| r.message_id.clone());
            let reqs = col(|r| r.request_id.clone());
            let apps = col(|r| r.app_id.clone());
            let chans = col(|r| r.channel.clone());
            let statuses = col(|r| r.status.clone());
            let ranks: Vec<i16> = rows.iter().map(|r| r.rank).collect();
            let providers: Vec<Option<String>> = rows.iter().map(|r| r.provider.clone()).collect();
            let attempts: Vec<i32> = rows.iter().map(|r| r.attempts).collect();
            let masked: Vec<Option<String>> =
                rows.iter().map(|r| r.recipient_masked.clone()).collect();
            let tpls: Vec<Option<String>> = rows.iter().map(|r| r.template.clone()).collect();
            let tvs: Vec<Option<i32>> = rows.iter().map(|r| r.template_version).collect();
            let rkeys: Vec<Option<String>> = rows.iter().map(|r| r.recipient_key.clone()).collect();
            let lats: Vec<Option<i64>> = rows.iter().map(|r| r.latency_ms).collect();
            let created: Vec<i64> = rows.iter().map(|r| r.created_at).collect();
            let updated: Vec<i64> = rows.iter().map(|r| r.updated_at).collect();
            tx.execute(
                "INSERT INTO messages AS m (message_id, request_id, app_id, channel, status, status_rank, provider,
                                            attempts, recipient_masked, template, template_version, created_at, updated_at,
                                            recipient_key, latency_ms)
                 SELECT u.id, u.req, u.app, u.ch, u.st, u.rk, u.pr, u.at, u.ma, u.tp, u.tv,
                        to_timestamp(u.cr / 1000.0), to_timestamp(u.up / 1000.0), u.rkey, u.lat
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::smallint[], $7::text[],
                             $8::int[], $9::text[], $10::text[], $11::int[], $12::bigint[], $13::bigint[],
                             $14::text[], $15::bigint[])
                      AS u(id, req, app, ch, st, rk, pr, at, ma, tp, tv, cr, up, rkey, lat)
                 ON CONFLICT (message_id) DO UPDATE SET
                    status = CASE WHEN EXCLUDED.status_rank > m.status_rank
                                    OR (EXCLUDED.status_rank = m.status_rank AND EXCLUDED.updated_at < m.updated_at)
                                  THEN EXCLUDED.status ELSE m.status END,
                    status_rank = GREATEST(m.status_rank, EXCLUDED.status_rank),
                    updated_at = CASE WHEN EXCLUDED.status_rank > m.status_rank
                                        OR (EXCLUDED.status_rank = m.status_rank AND EXCLUDED.updated_at < m.updated_at)
                                      THEN EXCLUDED.updated_at ELSE m.updated_at END,
                    created_at = LEAST(m.created_at, EXCLUDED.created_at),
                    provider = CASE WHEN EXCLUDED.provider IS NOT NULL AND EXCLUDED.attempts >= m.attempts
                                    THEN EXCLUDED.provider ELSE m.provider END,
                    attempts = GREATEST(m.attempts, EXCLUDED.attempts),
                    recipient_masked = COALESCE(m.recipient_masked, EXCLUDED.recipient_masked),
                    template = COALESCE(m.template, EXCLUDED.template),
                    template_version = COALESCE(m.template_version, EXCLUDED.template_version),
                    recipient_key = COALESCE(m.recipient_key, EXCLUDED.recipient_key),
                    latency_ms = CASE WHEN EXCLUDED.latency_ms IS NOT NULL AND EXCLUDED.attempts >= m.attempts
                                      THEN EXCLUDED.latency_ms ELSE m.latency_ms END",
                &[&ids, &reqs, &apps, &chans, &statuses, &ranks, &providers, &attempts, &masked, &tpls, &tvs, &created, &updated, &rkeys, &lats],
            )
            .await?;
            // Delivery attempts (latency, provider response code): one row per attempt, the
            // earliest record of it (a redelivered attempt re-emits the same result).
            let attempts: Vec<&Fact> = facts.iter().filter(|f| f.outcome.is_some()).collect();
            if !attempts.is_empty() {
                let col = |g: fn(&Fact) -> Option<String>| {
                    attempts.iter().map(|f| g(f)).collect::<Vec<_>>()
                };
                let mids: Vec<&str> = attempts.iter().map(|f| f.message_id.as_str()).collect();
                let nums: Vec<i32> = attempts.iter().map(|f| f.attempt).collect();
                let outcomes = col(|f| f.outcome.clone());
                let statuses: Vec<&str> = attempts.iter().map(|f| f.status.as_str()).collect();
                let providers = col(|f| f.provider.clone());
                let codes = col(|f| f.provider_code.clone());
                let lats: Vec<Option<i64>> = attempts.iter().map(|f| f.latency_ms).collect();
                let rcs = col(|f| f.reason.as_ref().map(|r| r.code.clone()));
                let rms = col(|f| f.reason.as_ref().map(|r| r.message.clone()));
                let ats: Vec<i64> = attempts.iter().map(|f| f.at).collect();
                tx.execute(
                    "INSERT INTO delivery_attempts AS d (message_id, attempt, provider, outcome, status, response_code,
                                                         latency_ms, reason_code, reason_message, at)
                     SELECT DISTINCT ON (u.m, u.n) u.m, u.n, u.p, u.o, u.s, u.c, u.l, u.rc, u.rm, to_timestamp(u.a / 1000.0)
                     FROM UNNEST($1::text[], $2::int[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[],
                                 $8::text[], $9::text[], $10::bigint[]) AS u(m, n, p, o, s, c, l, rc, rm, a)
                     ORDER BY u.m, u.n, u.a
                     ON CONFLICT (message_id, attempt) DO UPDATE SET at = EXCLUDED.at
                     WHERE EXCLUDED.at < d.at",
                    &[&mids, &nums, &providers, &outcomes, &statuses, &codes, &lats, &rcs, &rms, &ats],
                )
                .await?;
            }
            // One row per event id; a re-published event (a delay-tier move) keeps its earliest
            // time, whatever order the copies are read in.
            let mut first: HashMap<&str, &Fact> = HashMap::new();
            for f in facts {
                let e = first.entry(f.event_id.as_str()).or_insert(f);
                if f.at < e.at {
                    *e = f;
                }
            }
            let facts: Vec<&Fact> = first.into_values().collect();
            let eids: Vec<&str> = facts.iter().map(|f| f.event_id.as_str()).collect();
            let mids: Vec<&str> = facts.iter().map(|f| f.message_id.as_str()).collect();
            let sts: Vec<&str> = facts.iter().map(|f| f.status.as_str()).collect();
            let ats: Vec<i64> = facts.iter().map(|f| f.at).collect();
            let stages: Vec<&str> = facts.iter().map(|f| f.stage.as_str()).collect();
            let provs: Vec<Option<&str>> = facts.iter().map(|f| f.provider.as_deref()).collect();
            let atts: Vec<i32> = facts.iter().map(|f| f.attempt).collect();
            let rc: Vec<Option<&str>> = facts
                .iter()
                .map(|f| f.reason.as_ref().map(|r| r.code.as_str()))
                .collect();
            let rm: Vec<Option<&str>> = facts
                .iter()
                .map(|f| f.reason.as_ref().map(|r| r.message.as_str()))
                .collect();
            tx.execute(
                "INSERT INTO message_events (event_id, message_id, status, at, stage, provider, attempt, reason_code, reason_message)
                 SELECT u.e, u.m, u.s, to_timestamp(u.a / 1000.0), u.st, u.p, u.at, u.rc, u.rm
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::int[], $8::text[], $9::text[])
                      AS u(e, m, s, a, st, p, at, rc, rm)
                 ON CONFLICT (message_id, event_id) DO UPDATE SET at = EXCLUDED.at
                 WHERE EXCLUDED.at < message_events.at",
                &[&eids, &mids, &sts, &ats, &stages, &provs, &atts, &rc, &rm],
            )
            .await?;
        }
        if self.use_offsets && !positions.is_empty() {
            let topics: Vec<&str> = positions.keys().map(|k| k.0.as_str()).collect();
            let parts: Vec<i32> = positions.keys().map(|k| k.1).collect();
            let next: Vec<i64> = positions.values().map(|o| o + 1).collect();
            tx.execute(
                "INSERT INTO projector_offsets (topic, partition, next_offset)
                 SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[])
                 ON CONFLICT (topic, partition) DO UPDATE SET next_offset = GREATEST(projector_offsets.next_offset, EXCLUDED.next_offset)",
                &[&topics, &parts, &next],
            )
            .await?;
        }
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
                let held = load_offsets(&self.db)
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

/// The positions applied, as PostgreSQL holds them.
async fn load_offsets(db: &Client) -> Result<HashMap<(String, i32), i64>, tokio_postgres::Error> {
    let rows = db
        .query(
            "SELECT topic, partition, next_offset FROM projector_offsets",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// Runs the projector until `shutdown`.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> Result<(), StageError> {
    let mut db = deps
        .postgres_migrated(herald_domain::readmodel::SCHEMA)
        .await?;
    let offsets = load_offsets(&db)
        .await
        .map_err(|e| StageError::Fatal(format!("projector offsets: {e}")))?;
    let use_offsets = deps.transport.kind() == "kafka";
    if use_offsets {
        // The rows and the positions they came from commit together, so a commit PostgreSQL
        // loses in a crash is simply replayed: no need to wait for each commit's flush.
        db = db
            .with_session("SET synchronous_commit = off")
            .await
            .map_err(|e| StageError::Fatal(format!("projector session: {e}")))?;
    }
    // The projector owns the read model; it also runs the retention task (one process purges
    // at a time, whichever runs it).
    herald_domain::retention::spawn(
        deps.config.postgres.url.clone(),
        deps.config.retention.clone(),
        shutdown.clone(),
    );
    let offsets: Positions = std::sync::Arc::new(std::sync::Mutex::new(offsets));
    let mut spec = deps.spec(STAGE, input_topics(), false);
    if use_offsets {
        spec.positions = Some(offsets.clone());
    }
    let transport = deps.transport.clone();
    run_worker(
        STAGE,
        transport,
        spec,
        Projector {
            deps,
            db,
            offsets,
            use_offsets,
            stale: false,
            reposition: false,
        },
        shutdown,
    )
    .await
}
