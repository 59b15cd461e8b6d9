//! Send stage. Consumes `MessageRouted` from `herald.dispatch.<channel>` (one worker per channel
//! with providers, so a slow channel never holds up another); calls the provider; emits one
//! `DeliveryAttempted` per attempt to `herald.deliveries.v1`.
//!
//! Promise 2: every (message, attempt) is claimed in the PostgreSQL ledger before the call and
//! its outcome recorded after it (see `herald_domain::ledger`); a redelivered record never causes a second
//! call. Provider-side idempotency keys are passed where the provider has one (webhook-id,
//! SMTP Message-ID). Calls in a batch run concurrently, bounded per worker.
//!
//! - Reads: `herald.dispatch.<channel>` and `herald.dispatch.high`.
//! - Writes: `herald.deliveries.v1` (`DeliveryAttempted`), `herald.status` (`MessageSuppressed`
//!   for a message that expired on the way), the next attempt (`herald.dispatch.*` now, or
//!   `herald.delay.<n>s`), `herald.dead-letters.v1`.
//! - Tables: `send_ledger` (through `herald_domain::ledger`, which also starts `receipt_waits`
//!   in the same statement), `message_gate`, `provider_health`, the webhook outbox (alerts) through their owners in
//!   `herald-domain`.
//! - Planning is pure ([`plan`]); the waves of calls run over the ledger as a port
//!   ([`Ledger`]: [`admit`], [`call_waves`]); the decision on an outcome is `herald_domain::failure`'s.

pub mod plan;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use herald_core::runtime::Deps;
use herald_core::telemetry::names;
use herald_core::transport::{InRecord, OutRecord};
use herald_core::util::{event_id, mask_address, now_ms};
use herald_core::worker::{
    BatchHandler, StageError, decode_or_dead_letter, record, run_workers, trace_id,
};
use herald_schemas::{
    Channel, DeliveryAttempted, DeliveryOutcome, MessageRouted, MessageSuppressed, Reason, topics,
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use herald_domain::failure::eligible::Eligible;
use herald_domain::failure::outcome::consequence;
use herald_domain::failure::rules::Rules;
use herald_domain::failure::{alert, breaker, next_attempt, outcome_str};
use herald_domain::ledger::{self, Prior};
use herald_providers::{CallResult, Context, Provider, REGISTRY};
use plan::{WAVES_IN_FLIGHT, status_after};

pub const STAGE: &str = "send";

/// A provider's token bucket (`rate_limit_per_sec`, burst of one second).
pub type Limiter = governor::DefaultDirectRateLimiter;

struct Send {
    deps: Deps,
    db: herald_core::db::Db,
    providers: Arc<HashMap<String, Box<dyn Provider>>>,
    rules: Arc<Rules>,
    limiters: Arc<HashMap<String, (u32, Limiter)>>,
    breakers: Arc<breaker::Breakers>,
    /// Providers open by either signal in any process (`switch_provider` skips them).
    health: breaker::OpenSet,
    /// Provider code → kind (where a rule may move a message on).
    kinds: Arc<HashMap<String, String>>,
    redactor: herald_domain::redact::Redactor,
    /// Opens verification codes for the provider call (they travel sealed).
    keys: herald_domain::verification::Keys,
}

/// Text PostgreSQL can store (a provider may answer with a NUL byte).
fn storable(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

impl Send {
    /// Records the answers of calls made (promise 2: a known outcome is never downgraded to
    /// `unknown`). Retried with back-off for as long as PostgreSQL is away — the answers exist
    /// only in this process until then; only a crash meanwhile leaves them in doubt.
    async fn record_finished(
        &mut self,
        finished: &[(String, i32, CallResult, i64)],
        waits: &[Option<i64>],
    ) -> Result<(), StageError> {
        let mut backoff = Duration::from_millis(100);
        let mut refused = 0;
        loop {
            let written = match self.db.ensure().await {
                Ok(_) => Ledger::finish(&self.db, finished, waits).await,
                Err(e) => Err(e),
            };
            match written {
                Ok(()) => return Ok(()),
                // Refused for its data, again and again: nothing a wait will change.
                Err(StageError::Permanent(e)) if refused >= 2 => {
                    return Err(StageError::Permanent(e));
                }
                Err(e) => {
                    if matches!(e, StageError::Permanent(_)) {
                        refused += 1;
                    }
                    metrics::counter!(names::STAGE_ERRORS, "stage" => STAGE, "class" => "ledger_finish")
                        .increment(1);
                    tracing::warn!(error = %e, calls = finished.len(),
                        "known outcomes not recorded yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// When an attempt with this outcome stops waiting for its receipt: accepted by a provider
    /// with receipts, or unknown and held for the receipt by the channel's policy.
    fn receipt_due(&self, m: &MessageRouted, outcome: DeliveryOutcome) -> Option<i64> {
        let has_receipts = self
            .providers
            .get(&m.provider)
            .is_some_and(|p| p.has_receipts());
        let channel = m.header.channel;
        plan::receipt_due(
            has_receipts,
            outcome,
            self.deps.config.unknown_outcome(channel),
            self.deps.config.receipt_timeout(channel),
            now_ms(),
        )
    }

    /// The attempt's `DeliveryAttempted`, plus what the rules' decision publishes (the next
    /// attempt, now or through the delay tier).
    async fn outcome(
        &self,
        m: &MessageRouted,
        attempt: i32,
        r: CallResult,
        latency_ms: i64,
        trace: &str,
        (out, alerts): (&mut Vec<OutRecord>, &mut Vec<alert::Alert>),
    ) -> Result<(), StageError> {
        let has_receipts = self
            .providers
            .get(&m.provider)
            .is_some_and(|p| p.has_receipts());
        let now = now_ms();
        let eligible =
            Eligible::new(&self.kinds, &REGISTRY, &self.health).with_breakers(&self.breakers);
        let decision = self.rules.decide(m, attempt, &r, has_receipts, now, |c| {
            eligible.now(c, &m.recipient.address)
        });
        metrics::counter!(names::RULE_ACTIONS, "provider" => m.provider.clone(), "action" => decision.label())
            .increment(1);
        let status = status_after(&decision, r.outcome, has_receipts);
        let c = consequence(&decision, r.reason.clone(), &m.provider);
        let mut header = m.header.follow(
            STAGE,
            event_id(&m.header.message_id, "attempted", attempt),
            now_ms(),
        );
        header.attempt = attempt;
        let ev = DeliveryAttempted {
            header,
            provider: Some(m.provider.clone()),
            status: status.into(),
            outcome: r.outcome,
            reason: c.reason,
            provider_message_id: r.provider_message_id.clone(),
            provider_response_code: r.response_code.clone(),
            latency_ms,
            recipient_masked: mask_address(&m.recipient.address),
            template: m.template.clone(),
        };
        out.push(
            record(
                &self.deps.codec,
                topics::DELIVERIES,
                &m.header.message_id,
                trace,
                &ev,
            )
            .await?,
        );
        if let Some(next) = c.next {
            out.push(next_attempt(&self.deps.codec, STAGE, m, attempt, next, trace, now).await?);
        }
        if let Some(rule) = &c.alert {
            alerts.push(alert::Alert::new(
                alert::Scene::SendFailure,
                rule,
                m,
                attempt,
                &r,
            ));
        }
        Ok(())
    }
}

impl BatchHandler for Send {
    fn codec(&self) -> &herald_core::codec::Codec {
        &self.deps.codec
    }

    fn fails_messages(&self) -> bool {
        true
    }

    fn healthy(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async { self.db.simple_query("SELECT 1").await.is_ok() })
    }

    fn handle<'a>(
        &'a mut self,
        batch: &'a [InRecord],
    ) -> BoxFuture<'a, Result<Vec<OutRecord>, StageError>> {
        Box::pin(async move {
            self.db.ensure().await?;
            self.health.refresh(&self.db).await;
            let mut out = Vec::with_capacity(batch.len());
            let mut decoded: Vec<(MessageRouted, i32, &InRecord)> = Vec::with_capacity(batch.len());
            for input in batch {
                if let Some(m) =
                    decode_or_dead_letter::<MessageRouted>(&self.deps.codec, STAGE, input, &mut out)
                        .await?
                {
                    let attempt = m.header.attempt.max(1);
                    decoded.push((m, attempt, input));
                }
            }
            let first = plan::first_of_each_attempt(
                decoded
                    .iter()
                    .map(|(m, a, _)| (m.header.message_id.as_str(), *a)),
            );
            let mut msgs: Vec<(MessageRouted, i32, String)> = Vec::with_capacity(first.len());
            let mut kept: HashMap<String, &[u8]> = HashMap::new();
            let mut first = first.into_iter().peekable();
            for (i, (m, attempt, input)) in decoded.into_iter().enumerate() {
                if first.next_if_eq(&i).is_none() {
                    continue;
                }
                // Kept in the ledger where an undelivered receipt may lead to a resend.
                if let Some(payload) = &input.payload
                    && self.rules.may_act_on_receipt(m.header.channel, &m.provider)
                    && self
                        .providers
                        .get(&m.provider)
                        .is_some_and(|p| p.has_receipts())
                {
                    kept.insert(m.header.message_id.clone(), payload.as_slice());
                }
                msgs.push((m, attempt, trace_id(input)));
            }
            // A message that expired while it waited (a backlog, a retry) is never sent late.
            let now = now_ms();
            let mut expired = Vec::new();
            msgs.retain(|(m, _, trace)| {
                let late = plan::expired(m.expires_at, now);
                if late {
                    expired.push((m.clone(), trace.clone()));
                }
                !late
            });
            for (m, trace) in expired {
                let mid = m.header.message_id.clone();
                let ev = MessageSuppressed {
                    header: m.header.follow(
                        STAGE,
                        event_id(&mid, "expired", m.header.attempt),
                        now,
                    ),
                    status: "expired".into(),
                    policy: "expires_at".into(),
                    reason: Reason::new(
                        "expired",
                        "expires_at passed while the message waited to be sent",
                    ),
                };
                out.push(record(&self.deps.codec, topics::STATUS, &mid, &trace, &ev).await?);
            }
            // The gate (a message canceled before its first call is never sent), then the claim.
            let priors = admit(&self.db, &mut msgs, &self.kinds).await?;
            if msgs.is_empty() {
                return Ok(out);
            }

            // Calls go out in waves; each wave is marked started (one statement) before any of
            // its calls begins, so a crash can only leave the waves in progress in doubt.
            let providers = self.providers.clone();
            let wave_size = plan::wave_size(
                msgs.iter()
                    .filter_map(|(m, _, _)| providers.get(&m.provider).map(|p| p.max_in_flight())),
                msgs.iter()
                    .filter_map(|(m, _, _)| self.limiters.get(&m.provider).map(|(r, _)| *r)),
            );
            let fresh: HashSet<usize> = priors
                .iter()
                .enumerate()
                .filter(|(_, p)| **p == Prior::Fresh)
                .map(|(i, _)| i)
                .collect();
            // Verification codes travel sealed: only the provider call's own copy of a message
            // has its code; everything recorded or published below is built from `msgs`.
            let opened;
            let calling = if msgs
                .iter()
                .any(|(m, _, _)| herald_domain::verification::sealed_in(&m.content))
            {
                opened = msgs
                    .iter()
                    .map(|(m, a, t)| {
                        let mut m = m.clone();
                        herald_domain::verification::open_content(
                            &self.keys,
                            &m.header.request_id,
                            &mut m.content,
                        );
                        (m, *a, t.clone())
                    })
                    .collect::<Vec<_>>();
                &opened
            } else {
                &msgs
            };
            let Calls {
                done: mut calls,
                failed,
            } = call_waves(
                &self.db,
                &providers,
                &self.limiters,
                calling,
                &kept,
                plan::waves(priors, wave_size),
            )
            .await;
            // Before anything is stored or published: no secret or signed query leaves in a
            // reason (promise 8), and nothing a provider answered can break the ledger's text.
            for (_, r, _, _) in &mut calls {
                if let Some(reason) = &mut r.reason {
                    reason.message = storable(self.redactor.clean(&reason.message));
                }
                for text in [&mut r.response_code, &mut r.provider_message_id]
                    .into_iter()
                    .flatten()
                {
                    *text = storable(std::mem::take(text));
                }
            }

            let finished: Vec<(String, i32, CallResult, i64)> = calls
                .iter()
                .filter(|(_, _, _, record)| *record)
                .map(|(i, r, l, _)| {
                    (
                        msgs[*i].0.header.message_id.clone(),
                        msgs[*i].1,
                        r.clone(),
                        *l,
                    )
                })
                .collect();
            let waits: Vec<Option<i64>> = calls
                .iter()
                .filter(|(_, _, _, record)| *record)
                .map(|(i, r, _, _)| self.receipt_due(&msgs[*i].0, r.outcome))
                .collect();
            self.record_finished(&finished, &waits).await?;
            if let Some(e) = failed {
                return Err(e);
            }
            // Device tokens the provider says are gone: later sends to them are suppressed.
            // After the ledger has the outcomes, so a failure here retries the batch, which is
            // answered from the ledger and marks them again.
            let dead: Vec<herald_domain::device_tokens::Dead> = calls
                .iter()
                .filter_map(|(i, r, _, _)| {
                    let m = &msgs[*i].0;
                    providers
                        .get(&m.provider)
                        .filter(|p| p.dead_address(r))
                        .map(|_| herald_domain::device_tokens::Dead {
                            app_id: m.header.app_id.clone(),
                            channel: m.header.channel.as_str().to_owned(),
                            token: m.recipient.address.trim().to_owned(),
                            provider: m.provider.clone(),
                            reason_code: r.response_code.clone().unwrap_or_default(),
                            message_id: m.header.message_id.clone(),
                            at: 0,
                            at_us: 0,
                        })
                })
                .collect();
            herald_domain::device_tokens::mark(&*self.db, &dead)
                .await
                .map_err(|e| StageError::postgres("dead device tokens", e))?;

            // Only calls made now say anything about the provider's health (an interrupted
            // call from before a crash does not).
            let health: Vec<(String, DeliveryOutcome)> = calls
                .iter()
                .filter(|(i, _, _, _)| fresh.contains(i))
                .map(|(i, r, _, _)| (msgs[*i].0.provider.clone(), r.outcome))
                .collect();
            let changes = self.breakers.record(&health);
            if !changes.is_empty()
                && let Err(e) = self.breakers.persist(&self.db, &changes).await
            {
                tracing::warn!(error = %herald_core::runtime::pg_error(e), "breaker state not persisted");
            }
            calls.sort_by_key(|c| c.0);
            let mut alerts = Vec::new();
            for (i, r, latency, _) in calls {
                let (m, attempt, trace) = &msgs[i];
                debug!(message_id = %m.header.message_id, outcome = outcome_str(r.outcome), "attempt done");
                self.outcome(m, *attempt, r, latency, trace, (&mut out, &mut alerts))
                    .await?;
            }
            // Alerts leave through the outbox, with the batch: never a call in this path.
            alert::enqueue(&*self.db, &alerts)
                .await
                .map_err(|e| StageError::postgres("alert outbox", e))?;
            Ok(out)
        })
    }
}

/// What the send stage keeps in PostgreSQL, as a port (the gate and the attempt ledger), so its
/// batch logic runs against an in-memory ledger in unit tests and against PostgreSQL in the stage.
pub trait Ledger: Sync {
    /// Opens these messages' gates for their first call; the ones already canceled.
    fn open_for_sending<'a>(
        &'a self,
        message_ids: &'a [String],
    ) -> BoxFuture<'a, Result<HashSet<String>, StageError>>;
    /// Claims these attempts; what the ledger already knows of each.
    fn claim<'a>(
        &'a self,
        keys: &'a [ledger::ClaimKey<'a>],
    ) -> BoxFuture<'a, Result<Vec<Prior>, StageError>>;
    /// Durably marks these attempts started; no call of the wave begins before it returns.
    /// Answers the ones this call started (another worker may have started a copy of one).
    fn start<'a>(
        &'a self,
        attempts: &'a [ledger::StartKey<'a>],
    ) -> BoxFuture<'a, Result<HashSet<(String, i32)>, StageError>>;
    /// Records the outcomes of calls made (and, per attempt, when its receipt wait ends).
    fn finish<'a>(
        &'a self,
        done: &'a [(String, i32, CallResult, i64)],
        receipt_due: &'a [Option<i64>],
    ) -> BoxFuture<'a, Result<(), StageError>>;
}

impl Ledger for herald_core::db::Db {
    fn open_for_sending<'a>(
        &'a self,
        message_ids: &'a [String],
    ) -> BoxFuture<'a, Result<HashSet<String>, StageError>> {
        Box::pin(async move {
            herald_domain::gate::open_for_sending(self, message_ids)
                .await
                .map_err(|e| StageError::postgres("send gate", e))
        })
    }

    fn claim<'a>(
        &'a self,
        keys: &'a [ledger::ClaimKey<'a>],
    ) -> BoxFuture<'a, Result<Vec<Prior>, StageError>> {
        Box::pin(async move {
            ledger::claim(self, keys)
                .await
                .map_err(|e| StageError::postgres("ledger claim", e))
        })
    }

    fn start<'a>(
        &'a self,
        attempts: &'a [ledger::StartKey<'a>],
    ) -> BoxFuture<'a, Result<HashSet<(String, i32)>, StageError>> {
        Box::pin(async move {
            ledger::start(self, attempts)
                .await
                .map_err(|e| StageError::postgres("ledger start", e))
        })
    }

    fn finish<'a>(
        &'a self,
        done: &'a [(String, i32, CallResult, i64)],
        receipt_due: &'a [Option<i64>],
    ) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(async move {
            ledger::finish(self, done, receipt_due)
                .await
                .map_err(|e| StageError::postgres("ledger finish", e))
        })
    }
}

/// The gate and the claim of a batch: messages canceled before their first call are dropped
/// from `msgs` (never sent), the rest are claimed in the ledger; what it knows of each, in
/// `msgs`' order. `kinds`: provider code → kind.
pub async fn admit<L: Ledger + ?Sized>(
    ledger: &L,
    msgs: &mut Vec<(MessageRouted, i32, String)>,
    kinds: &HashMap<String, String>,
) -> Result<Vec<Prior>, StageError> {
    if msgs.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = msgs
        .iter()
        .map(|(m, _, _)| m.header.message_id.clone())
        .collect();
    let canceled = ledger.open_for_sending(&ids).await?;
    if !canceled.is_empty() {
        metrics::counter!(names::CANCELED_DROPPED, "stage" => STAGE)
            .increment(canceled.len() as u64);
        msgs.retain(|(m, _, _)| !canceled.contains(&m.header.message_id));
    }
    if msgs.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<ledger::ClaimKey> = msgs
        .iter()
        .map(|(m, a, _)| ledger::ClaimKey {
            message_id: &m.header.message_id,
            attempt: *a,
            provider: &m.provider,
            request_id: &m.header.request_id,
            app_id: &m.header.app_id,
            channel: m.header.channel.as_str(),
        })
        .collect();
    let priors = ledger.claim(&keys).await?;
    drop(keys);
    // An attempt the ledger says was made (or may have been) with another provider than this
    // copy names — the message was routed again after a lost acknowledgement — is spoken of
    // under the provider called: its outcome, receipts and rules are that provider's.
    for ((m, _, _), p) in msgs.iter_mut().zip(&priors) {
        if let Some(called) = p.called()
            && called != m.provider
        {
            debug!(message_id = %m.header.message_id, copy = %m.provider, called, "attempt made with another provider");
            m.provider = called.to_owned();
            if let Some(kind) = kinds.get(called) {
                m.provider_kind = kind.clone();
            }
        }
    }
    Ok(priors)
}

/// The calls of a batch: each message's result, and the first wave failure (a wave whose start
/// could not be marked makes no call).
pub struct Calls {
    pub done: Vec<Done>,
    pub failed: Option<StageError>,
}

/// Runs a batch's waves, [`WAVES_IN_FLIGHT`] at a time: each wave waits for its providers' rate
/// limits, is marked started in the `ledger`, then calls its fresh messages (batch calls where
/// the provider takes them); a message the ledger knows (finished, or started before a crash) is
/// answered from the ledger and never called again. Every wave runs to its end even when another
/// fails: calls made are answers known, and they are recorded before the failure is reported.
/// `kept`: the consumed records the ledger keeps for a resend, by message id.
pub async fn call_waves<L: Ledger + ?Sized>(
    ledger: &L,
    providers: &HashMap<String, Box<dyn Provider>>,
    limiters: &HashMap<String, (u32, Limiter)>,
    msgs: &[(MessageRouted, i32, String)],
    kept: &HashMap<String, &[u8]>,
    waves: Vec<Vec<(usize, Prior)>>,
) -> Calls {
    let mut wave_futs: Vec<BoxFuture<'_, WaveResult>> = Vec::new();
    for wave in waves {
        wave_futs.push(Box::pin(async move {
            let starting: Vec<ledger::StartKey> = wave
                .iter()
                .filter(|(_, p)| *p == Prior::Fresh)
                .map(|(i, _)| {
                    let (m, attempt, _) = &msgs[*i];
                    ledger::StartKey {
                        message_id: &m.header.message_id,
                        attempt: *attempt,
                        provider: &m.provider,
                        routed: kept.get(&m.header.message_id).copied(),
                    }
                })
                .collect();
            // Provider rate limits pause here, before anything is marked started:
            // backpressure on consumption, never a failed message.
            let mut per_provider: HashMap<&str, u32> = HashMap::new();
            for (i, p) in &wave {
                if *p == Prior::Fresh {
                    *per_provider.entry(msgs[*i].0.provider.as_str()).or_default() += 1;
                }
            }
            for (provider, n) in per_provider {
                if let Some((_, lim)) = limiters.get(provider) {
                    let waited = Instant::now();
                    for _ in 0..n {
                        lim.until_ready().await;
                    }
                    metrics::histogram!(names::RATE_LIMIT_WAIT_SECONDS, "provider" => provider.to_owned())
                        .record(waited.elapsed().as_secs_f64());
                }
            }
            let started = ledger.start(&starting).await?;
            // A copy of an attempt another worker started meanwhile is that worker's: no call
            // here, and no outcome (it publishes the one it gets).
            let wave: Vec<(usize, Prior)> = wave
                .into_iter()
                .filter(|(i, p)| {
                    let mine = *p != Prior::Fresh
                        || started.contains(&(msgs[*i].0.header.message_id.clone(), msgs[*i].1));
                    if !mine {
                        metrics::counter!(names::COPIES_SKIPPED).increment(1);
                        debug!(message_id = %msgs[*i].0.header.message_id, "attempt started by another worker");
                    }
                    mine
                })
                .collect();
            // Fresh messages of a provider that takes batches go out in batch calls; the
            // rest one call each.
            let mut batched: HashMap<&str, Vec<usize>> = HashMap::new();
            let mut single = Vec::new();
            for (i, prior) in wave {
                let m = &msgs[i].0;
                match providers.get(&m.provider) {
                    Some(p) if prior == Prior::Fresh && p.batch_max() > 1 => {
                        batched.entry(m.provider.as_str()).or_default().push(i);
                    }
                    _ => single.push((i, prior)),
                }
            }
            let mut calls: Vec<BoxFuture<'_, Vec<Done>>> = single
                .into_iter()
                .map(|(i, prior)| {
                    let fut = call_one(providers, &msgs[i], prior, i);
                    Box::pin(async move { vec![fut.await] }) as BoxFuture<'_, _>
                })
                .collect();
            for (code, idx) in batched {
                let Some(p) = providers.get(code) else { continue };
                for chunk in idx.chunks(p.batch_max()) {
                    let chunk = chunk.to_vec();
                    calls.push(Box::pin(async move {
                        let Some(p) = providers.get(code) else { return Vec::new() };
                        let items: Vec<(&MessageRouted, i32)> =
                            chunk.iter().map(|i| (&msgs[*i].0, msgs[*i].1)).collect();
                        for (m, attempt) in &items {
                            observe_due(m, *attempt);
                        }
                        let spans: Vec<_> =
                            chunk.iter().map(|i| call_span(&msgs[*i])).collect();
                        let started = Instant::now();
                        let results = p.send_batch(&items).await;
                        let elapsed = started.elapsed();
                        for (span, r) in spans.into_iter().zip(&results) {
                            end_call_span(span, r);
                        }
                        metrics::histogram!(names::SEND_SECONDS, "provider" => code.to_owned())
                            .record(elapsed.as_secs_f64());
                        chunk
                            .iter()
                            .zip(results)
                            .map(|(i, r)| {
                                metrics::counter!(names::SEND_ATTEMPTS, "provider" => code.to_owned(), "outcome" => outcome_str(r.outcome))
                                    .increment(1);
                                (*i, r, elapsed.as_millis() as i64, true)
                            })
                            .collect()
                    }));
                }
            }
            Ok(futures::future::join_all(calls).await.into_iter().flatten().collect())
        }));
    }
    // Every wave runs to its end even when another fails: calls made are answers
    // known, and they are recorded before the failure is reported.
    let mut calls = Vec::with_capacity(msgs.len());
    let mut failed = None;
    let mut waves = futures::stream::iter(wave_futs).buffer_unordered(WAVES_IN_FLIGHT);
    while let Some(done) = waves.next().await {
        match done {
            Ok(done) => calls.extend(done),
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    drop(waves);
    Calls {
        done: calls,
        failed,
    }
}

/// One call's result: (index in batch, result, latency ms, whether to record it).
pub type Done = (usize, CallResult, i64, bool);

/// A wave's calls.
type WaveResult = Result<Vec<Done>, StageError>;

/// Request → provider call ([`names::REQUEST_TO_CALL_SECONDS`]), at the call's start: first
/// attempts only (a retry is late by design), from when the message became due (its request,
/// or its `send_at`).
fn observe_due(m: &MessageRouted, attempt: i32) {
    if attempt == 1
        && let Some(due) = m.due_at
    {
        metrics::histogram!(names::REQUEST_TO_CALL_SECONDS, "channel" => m.header.channel.as_str())
            .record((now_ms() - due).max(0) as f64 / 1000.0);
    }
}

/// The provider call's span, under the send stage's span of the message.
fn call_span((m, attempt, trace): &(MessageRouted, i32, String)) -> herald_core::trace::Call {
    use herald_core::trace::Attr;
    herald_core::trace::Call::client(
        trace,
        "provider call",
        vec![
            Attr::new("herald.provider", m.provider.clone()),
            Attr::new("herald.channel", m.header.channel.as_str()),
            Attr::new("herald.message_id", m.header.message_id.clone()),
            Attr::new("herald.attempt", i64::from(*attempt)),
        ],
    )
}

fn end_call_span(mut span: herald_core::trace::Call, r: &CallResult) {
    use herald_core::trace::Attr;
    span.set(Attr::new("herald.outcome", outcome_str(r.outcome)));
    if let Some(code) = &r.response_code {
        span.set(Attr::new("herald.response_code", code.clone()));
    }
    let failed = (r.outcome != DeliveryOutcome::Succeeded).then(|| {
        r.reason
            .as_ref()
            .map_or_else(|| outcome_str(r.outcome).to_owned(), |x| x.code.clone())
    });
    span.end(failed);
}

/// One provider call, or the ledger's earlier answer. The bool: record the outcome.
async fn call_one(
    providers: &HashMap<String, Box<dyn Provider>>,
    msg: &(MessageRouted, i32, String),
    prior: Prior,
    i: usize,
) -> (usize, CallResult, i64, bool) {
    let (m, attempt) = (&msg.0, msg.1);
    match prior {
        Prior::Finished {
            result, latency, ..
        } => (i, result, latency, false),
        Prior::InFlight { .. } => (
            i,
            CallResult::fail(
                DeliveryOutcome::Unknown,
                None,
                Reason::new(
                    "interrupted",
                    "the process stopped during the provider call; not resent",
                ),
            ),
            0,
            true,
        ),
        Prior::Fresh => {
            observe_due(m, attempt);
            let span = call_span(msg);
            let started = Instant::now();
            let r = match providers.get(&m.provider) {
                Some(p) => p.send(m, attempt).await,
                None => CallResult::fail(
                    DeliveryOutcome::FailedPermanent,
                    None,
                    Reason::new(
                        "unknown_provider",
                        format!("provider {} is not configured", m.provider),
                    ),
                ),
            };
            let elapsed = started.elapsed();
            end_call_span(span, &r);
            metrics::histogram!(names::SEND_SECONDS, "provider" => m.provider.clone())
                .record(elapsed.as_secs_f64());
            metrics::counter!(names::SEND_ATTEMPTS, "provider" => m.provider.clone(), "outcome" => outcome_str(r.outcome))
                .increment(1);
            (i, r, elapsed.as_millis() as i64, true)
        }
    }
}

/// Runs one send worker per channel that has providers, until `shutdown`.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> Result<(), StageError> {
    let mut built: HashMap<String, Box<dyn Provider>> = HashMap::new();
    let guard = herald_core::netguard::Guard::new(&deps.config.security.outbound_allow);
    for p in &deps.config.providers {
        let cx = Context {
            postgres_url: &deps.config.postgres.url,
            guard: &guard,
        };
        let client = REGISTRY
            .build(p, &cx)
            .map_err(|e| StageError::Fatal(e.to_string()))?;
        built.insert(p.code.clone(), client);
    }
    let providers = Arc::new(built);
    let rules = Arc::new(Rules::new(&deps.config));
    let limiters: HashMap<String, (u32, Limiter)> = deps
        .config
        .providers
        .iter()
        .filter_map(|p| {
            let rate = std::num::NonZeroU32::new(p.rate_limit_per_sec?)?;
            Some((
                p.code.clone(),
                (
                    rate.get(),
                    governor::RateLimiter::direct(governor::Quota::per_second(rate)),
                ),
            ))
        })
        .collect();
    let limiters = Arc::new(limiters);
    let breakers = Arc::new(breaker::Breakers::new(
        breaker::Signal::Calls,
        deps.config
            .providers
            .iter()
            .map(|p| (p.code.clone(), p.breaker)),
    ));
    drop(herald_domain::schema::migrated(&deps).await?);
    alert::spawn_dispatcher(
        &guard,
        deps.stage_db().await?,
        &deps.config,
        shutdown.clone(),
    )?;
    let channels: Vec<Channel> = Channel::ALL
        .into_iter()
        .filter(|c| !deps.config.providers_for(*c).is_empty())
        .collect();
    // Every worker shares the providers, rules, limiters and breakers; each has its own database
    // connection and view of provider health.
    let redactor = herald_domain::redact::Redactor::new(&deps.config);
    let keys = herald_domain::verification::Keys::new(&deps.config.security.secret);
    let kinds = Arc::new(deps.config.provider_kinds());
    let handler = |db| Send {
        deps: deps.clone(),
        db,
        providers: providers.clone(),
        rules: rules.clone(),
        limiters: limiters.clone(),
        breakers: breakers.clone(),
        health: Default::default(),
        kinds: kinds.clone(),
        redactor: redactor.clone(),
        keys: keys.clone(),
    };
    let mut workers = Vec::new();
    for channel in channels.iter().copied() {
        let db = deps.stage_db().await?;
        let mut spec = deps.spec(
            &format!("{STAGE}-{}", channel.as_str()),
            vec![topics::dispatch(channel)],
            false,
        );
        // A rate-limited channel takes batches it can send in about two seconds: a batch is
        // never minutes long (cancels and expiry are checked per batch; the broker's poll
        // interval holds).
        if let Some(rate) = deps
            .config
            .providers_for(channel)
            .iter()
            .filter_map(|p| p.rate_limit_per_sec)
            .min()
        {
            spec.max_batch = spec.max_batch.min((2 * rate as usize).max(10));
        }
        workers.push((spec, handler(db)));
    }
    // The HIGH lane: one worker for every channel's HIGH messages.
    if !channels.is_empty() {
        let db = deps.stage_db().await?;
        let mut spec = deps.spec(
            &format!("{STAGE}-high"),
            vec![topics::DISPATCH_HIGH.into()],
            false,
        );
        // HIGH messages are few and urgent: small batches, never held up by a long one.
        spec.max_batch = spec.max_batch.min(100);
        workers.push((spec, handler(db)));
    }
    run_workers(STAGE, deps.transport.clone(), workers, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_domain::failure::outcome_from_str;

    /// The gate and the ledger, in memory: `canceled` messages, what `claim` answers, the start
    /// marks and the finished outcomes; refuses to mark starts when told to.
    #[derive(Default)]
    struct Marks {
        canceled: HashSet<String>,
        priors: std::sync::Mutex<HashMap<String, Prior>>,
        claimed: std::sync::Mutex<Vec<String>>,
        started: std::sync::Mutex<Vec<(String, i32)>>,
        finished: std::sync::Mutex<Vec<(String, i32)>>,
        refuse: bool,
    }

    impl Ledger for Marks {
        fn open_for_sending<'a>(
            &'a self,
            ids: &'a [String],
        ) -> BoxFuture<'a, Result<HashSet<String>, StageError>> {
            Box::pin(async move {
                Ok(ids
                    .iter()
                    .filter(|i| self.canceled.contains(*i))
                    .cloned()
                    .collect())
            })
        }

        fn claim<'a>(
            &'a self,
            keys: &'a [ledger::ClaimKey<'a>],
        ) -> BoxFuture<'a, Result<Vec<Prior>, StageError>> {
            Box::pin(async move {
                let priors = self.priors.lock().unwrap();
                let mut claimed = self.claimed.lock().unwrap();
                Ok(keys
                    .iter()
                    .map(|k| {
                        claimed.push(k.message_id.to_owned());
                        priors.get(k.message_id).cloned().unwrap_or(Prior::Fresh)
                    })
                    .collect())
            })
        }

        fn start<'a>(
            &'a self,
            attempts: &'a [ledger::StartKey<'a>],
        ) -> BoxFuture<'a, Result<HashSet<(String, i32)>, StageError>> {
            Box::pin(async move {
                if self.refuse {
                    return Err(StageError::Transient("ledger away".into()));
                }
                let mut s = self.started.lock().unwrap();
                // Like the table: an attempt started before is not started again.
                let mut now = HashSet::new();
                for k in attempts {
                    let key = (k.message_id.to_owned(), k.attempt);
                    if !s.contains(&key) {
                        s.push(key.clone());
                        now.insert(key);
                    }
                }
                Ok(now)
            })
        }

        fn finish<'a>(
            &'a self,
            done: &'a [(String, i32, CallResult, i64)],
            _receipt_due: &'a [Option<i64>],
        ) -> BoxFuture<'a, Result<(), StageError>> {
            Box::pin(async move {
                let mut f = self.finished.lock().unwrap();
                f.extend(done.iter().map(|d| (d.0.clone(), d.1)));
                Ok(())
            })
        }
    }

    /// The gate drops a canceled message before anything is claimed for it, and the rest are
    /// claimed in order.
    #[tokio::test]
    async fn a_canceled_message_is_never_claimed_or_called() {
        let marks = Marks {
            canceled: HashSet::from(["m1".to_owned()]),
            ..Default::default()
        };
        marks.priors.lock().unwrap().insert(
            "m2".into(),
            Prior::InFlight {
                provider: Some("p".into()),
            },
        );
        let mut msgs: Vec<(MessageRouted, i32, String)> = ["m0", "m1", "m2"]
            .iter()
            .map(|id| (routed(id), 1, "t".to_owned()))
            .collect();
        let priors = admit(&marks, &mut msgs, &HashMap::new()).await.unwrap();
        let left: Vec<&str> = msgs
            .iter()
            .map(|(m, _, _)| m.header.message_id.as_str())
            .collect();
        assert_eq!(left, ["m0", "m2"]);
        assert_eq!(*marks.claimed.lock().unwrap(), ["m0", "m2"]);
        assert_eq!(
            priors,
            [
                Prior::Fresh,
                Prior::InFlight {
                    provider: Some("p".into())
                }
            ]
        );
        let counting = std::sync::Arc::new(Counting::default());
        let providers: HashMap<String, Box<dyn Provider>> = HashMap::from([(
            "p".to_owned(),
            Box::new(SharedCounting(counting.clone())) as Box<dyn Provider>,
        )]);
        let calls = call_waves(
            &marks,
            &providers,
            &HashMap::new(),
            &msgs,
            &HashMap::new(),
            plan::waves(priors, 8),
        )
        .await;
        assert_eq!(
            counting.0.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "only m0 is called"
        );
        assert_eq!(calls.done.len(), 2);
    }

    /// A provider handle sharing one [`Counting`].
    struct SharedCounting(std::sync::Arc<Counting>);

    impl Provider for SharedCounting {
        fn send<'a>(&'a self, m: &'a MessageRouted, a: i32) -> BoxFuture<'a, CallResult> {
            self.0.send(m, a)
        }
    }

    /// A provider that counts its calls and accepts everything.
    #[derive(Default)]
    struct Counting(std::sync::atomic::AtomicUsize);

    impl Provider for Counting {
        fn send<'a>(&'a self, _m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { CallResult::ok("200", None) })
        }
    }

    fn routed(id: &str) -> MessageRouted {
        MessageRouted {
            header: herald_schemas::EventHeader {
                event_id: format!("e-{id}"),
                event_time: 0,
                stage: "route".into(),
                trace_id: "t".into(),
                message_id: id.into(),
                request_id: "r".into(),
                app_id: "a".into(),
                channel: Channel::Webhook,
                attempt: 1,
                metadata: Default::default(),
            },
            recipient: herald_schemas::Recipient {
                address: "https://example.invalid/hook".into(),
                params: Default::default(),
                timezone: None,
            },
            priority: herald_schemas::Priority::Normal,
            expires_at: None,
            template: None,
            template_version: None,
            content: Default::default(),
            provider: "p".into(),
            provider_kind: "webhook".into(),
            tried_providers: vec![],
            due_at: None,
        }
    }

    /// A copy of a message routed again — to another provider — after its attempt was made
    /// speaks of the provider the ledger says was called, so its re-emitted outcome, receipts
    /// and rules are that provider's (issue 29: the read model and its rebuild disagreed).
    #[tokio::test]
    async fn a_late_copy_is_answered_under_the_provider_called() {
        let marks = Marks::default();
        let earlier = CallResult::ok("200", Some("biz-1".into()));
        {
            let mut p = marks.priors.lock().unwrap();
            p.insert(
                "m1".into(),
                Prior::Finished {
                    result: earlier,
                    latency: 5,
                    provider: "aliyun".into(),
                },
            );
            p.insert(
                "m2".into(),
                Prior::InFlight {
                    provider: Some("aliyun".into()),
                },
            );
        }
        let mut msgs: Vec<(MessageRouted, i32, String)> = ["m0", "m1", "m2"]
            .iter()
            .map(|id| {
                let mut m = routed(id);
                m.provider = "tencent".into();
                (m, 1, "t".to_owned())
            })
            .collect();
        let kinds = HashMap::from([
            ("aliyun".to_owned(), "aliyun_sms".to_owned()),
            ("tencent".to_owned(), "tencent_sms".to_owned()),
        ]);
        admit(&marks, &mut msgs, &kinds).await.unwrap();
        let providers: Vec<(&str, &str)> = msgs
            .iter()
            .map(|(m, _, _)| (m.provider.as_str(), m.provider_kind.as_str()))
            .collect();
        assert_eq!(
            providers,
            [
                ("tencent", "webhook"),
                ("aliyun", "aliyun_sms"),
                ("aliyun", "aliyun_sms")
            ]
        );
    }

    /// Promise 2 in the wave logic, without PostgreSQL: only fresh attempts are marked started
    /// and called, once each; an attempt the ledger finished is answered from the ledger; one
    /// started before a crash is `unknown` (interrupted), never called again.
    #[tokio::test]
    async fn only_fresh_attempts_are_started_and_called_once() {
        let provider = std::sync::Arc::new(Counting::default());
        let providers: HashMap<String, Box<dyn Provider>> = HashMap::from([(
            "p".to_owned(),
            Box::new(SharedCounting(provider.clone())) as Box<dyn Provider>,
        )]);
        let msgs: Vec<(MessageRouted, i32, String)> = ["m0", "m1", "m2", "m3"]
            .iter()
            .map(|id| (routed(id), 1, "t".to_owned()))
            .collect();
        let earlier = CallResult::ok("202", Some("x".into()));
        let priors = vec![
            Prior::Fresh,
            Prior::Finished {
                result: earlier.clone(),
                latency: 7,
                provider: "p".into(),
            },
            Prior::InFlight { provider: None },
            Prior::Fresh,
        ];
        let marks = Marks::default();
        let calls = call_waves(
            &marks,
            &providers,
            &HashMap::new(),
            &msgs,
            &HashMap::new(),
            plan::waves(priors, 2),
        )
        .await;
        assert!(calls.failed.is_none());
        assert_eq!(provider.0.load(std::sync::atomic::Ordering::SeqCst), 2);
        let mut started = marks.started.lock().unwrap().clone();
        started.sort();
        assert_eq!(started, [("m0".to_owned(), 1), ("m3".to_owned(), 1)]);
        let mut done = calls.done;
        done.sort_by_key(|d| d.0);
        assert_eq!(done.len(), 4);
        assert_eq!(
            (done[1].1.clone(), done[1].2, done[1].3),
            (earlier, 7, false)
        );
        assert_eq!(done[2].1.outcome, DeliveryOutcome::Unknown);
        assert_eq!(
            done[2].1.reason.as_ref().map(|r| r.code.as_str()),
            Some("interrupted")
        );
        assert!(
            done[2].3,
            "an interrupted attempt's unknown outcome is recorded"
        );
        assert!(done[0].3 && done[3].3);
    }

    /// Two copies of one attempt (routed again after the transport lost an acknowledgement)
    /// read by two workers at once both find the attempt claimed and not started: only the
    /// worker that marks it started calls the provider; the other makes no call and reports
    /// nothing (issue 29: on Redis, 200 SMS went out twice this way).
    #[tokio::test]
    async fn a_copy_of_an_attempt_another_worker_started_is_not_called() {
        let provider = std::sync::Arc::new(Counting::default());
        let providers: HashMap<String, Box<dyn Provider>> = HashMap::from([(
            "p".to_owned(),
            Box::new(SharedCounting(provider.clone())) as Box<dyn Provider>,
        )]);
        let msgs = vec![(routed("m0"), 1, "t".to_owned())];
        // The two workers share one ledger; each sees the attempt as fresh.
        let marks = Marks::default();
        let limiters = HashMap::new();
        let kept = HashMap::new();
        let (a, b) = tokio::join!(
            call_waves(
                &marks,
                &providers,
                &limiters,
                &msgs,
                &kept,
                plan::waves(vec![Prior::Fresh], 4)
            ),
            call_waves(
                &marks,
                &providers,
                &limiters,
                &msgs,
                &kept,
                plan::waves(vec![Prior::Fresh], 4)
            ),
        );
        assert!(a.failed.is_none() && b.failed.is_none());
        assert_eq!(
            provider.0.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one provider call for the attempt"
        );
        assert_eq!(a.done.len() + b.done.len(), 1, "one outcome reported");
    }

    /// A wave whose start cannot be marked makes no call, and the failure is reported.
    #[tokio::test]
    async fn no_call_before_its_start_is_marked() {
        let providers: HashMap<String, Box<dyn Provider>> = HashMap::from([(
            "p".to_owned(),
            Box::new(Counting::default()) as Box<dyn Provider>,
        )]);
        let msgs = vec![(routed("m0"), 1, "t".to_owned())];
        let marks = Marks {
            refuse: true,
            ..Default::default()
        };
        let calls = call_waves(
            &marks,
            &providers,
            &HashMap::new(),
            &msgs,
            &HashMap::new(),
            plan::waves(vec![Prior::Fresh], 4),
        )
        .await;
        assert!(matches!(calls.failed, Some(StageError::Transient(_))));
        assert!(calls.done.is_empty());
    }

    #[test]
    fn outcome_names_round_trip() {
        for o in [
            DeliveryOutcome::Succeeded,
            DeliveryOutcome::FailedPermanent,
            DeliveryOutcome::FailedTransient,
            DeliveryOutcome::RateLimited,
            DeliveryOutcome::Unknown,
        ] {
            assert_eq!(outcome_from_str(outcome_str(o)), Some(o));
        }
    }
}
