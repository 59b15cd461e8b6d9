//! Accept stage. Consumes `SendRequested` from `herald.requests.v1`; emits one
//! `MessageAccepted` per recipient to `herald.accepted` (keyed by recipient, for per-receiver
//! order), `DelayScheduled` to a delay tier when `send_at` is in the future, `MessageFailed` to
//! `herald.status` for an invalid recipient, and a dead letter for an undecodable or invalid
//! request. Message ids are deterministic (promise 2); outputs and input offsets commit in one
//! Kafka transaction (promise 3); bad input never stops the stage (promise 5).
//!
//! - Reads: `herald.requests.v1`.
//! - Writes: `herald.accepted`, `herald.delay.<n>s` (scheduled sends), `herald.status`
//!   (`MessageFailed`), `herald.dead-letters.v1`.
//! - Tables (through their owners in `herald-domain`): `request_keys` (idempotency), `app_usage`
//!   (quota), `templates` (seeded at start). Owns none.
//! - Promise: one request becomes its messages exactly once, whatever is replayed.

pub mod handler;

use std::collections::HashSet;

use futures::future::BoxFuture;
use herald_core::runtime::{Deps, delay_topic, tier_for};
use herald_core::transport::{InRecord, OutRecord};
use herald_core::util::{event_id, now_ms};
use herald_core::worker::{
    BatchHandler, StageError, dead_letter, decode_or_dead_letter, record, run_worker, trace_id,
};
use herald_domain::idempotency;
use herald_schemas::{DelayPurpose, DelayScheduled, MessageFailed, Reason, SendRequested, topics};
use tokio_util::sync::CancellationToken;

use handler::{AcceptPolicy, Plan, Planned};

pub const STAGE: &str = "accept";

struct Accept {
    deps: Deps,
    policy: AcceptPolicy,
    db: herald_core::db::Db,
    /// Templates added through the API count as known within a second.
    watch: herald_domain::templates::Watch,
    /// Daily quotas per app.
    quotas: std::collections::HashMap<String, u64>,
}

/// Where a record came from: the owner of its request id (see [`herald_domain::idempotency`]).
fn source(input: &InRecord) -> String {
    match &input.entry_id {
        Some(id) => format!("{}/{id}", input.topic),
        None => format!("{}/{}/{}", input.topic, input.partition, input.offset),
    }
}

impl Accept {
    /// The records of one planned request.
    async fn emit(
        &self,
        input: &InRecord,
        req: &SendRequested,
        plan: Plan,
        over_quota: bool,
        out: &mut Vec<OutRecord>,
    ) -> Result<(), StageError> {
        let codec = &self.deps.codec;
        let trace = trace_id(input);
        let now = now_ms();
        let messages = match plan {
            Plan::Refused(reason) => {
                let rid = Some(req.request_id.clone()).filter(|r| !r.contains('\0'));
                out.push(dead_letter(codec, STAGE, input, reason, None, rid).await?);
                return Ok(());
            }
            Plan::Rejected(reason, failed) => {
                out.push(
                    dead_letter(
                        codec,
                        STAGE,
                        input,
                        reason,
                        None,
                        Some(req.request_id.clone()),
                    )
                    .await?,
                );
                for f in failed {
                    out.push(
                        record(codec, topics::STATUS, &f.header.message_id, &trace, &f).await?,
                    );
                }
                return Ok(());
            }
            Plan::Messages(m) => m,
        };
        for m in messages {
            match m {
                Planned::Failed(f) => {
                    out.push(
                        record(codec, topics::STATUS, &f.header.message_id, &trace, &*f).await?,
                    );
                }
                Planned::Accepted(m) if over_quota => {
                    let mid = m.header.message_id.clone();
                    let ev = MessageFailed {
                        header: m.header.follow(STAGE, event_id(&mid, "failed", 0), now),
                        provider: None,
                        reason: Reason::new(
                            "quota_exceeded",
                            format!("app {} is over its daily quota", m.header.app_id),
                        ),
                    };
                    out.push(record(codec, topics::STATUS, &mid, &trace, &ev).await?);
                }
                Planned::Accepted(m) => {
                    let key = m.recipient.address.clone();
                    let accepted = record(codec, topics::ACCEPTED, &key, &trace, &*m).await?;
                    match m.send_at {
                        Some(at) if at > now + 500 => {
                            let scheduled = DelayScheduled {
                                header: m.header.follow(
                                    STAGE,
                                    event_id(&m.header.message_id, "scheduled", 0),
                                    now,
                                ),
                                purpose: DelayPurpose::ScheduledSend,
                                due_at: at,
                                target_topic: topics::ACCEPTED.into(),
                                key: accepted.key.clone(),
                                payload: accepted.payload,
                                reason: None,
                            };
                            let tier = delay_topic(tier_for(at - now));
                            out.push(record(codec, &tier, &key, &trace, &scheduled).await?);
                        }
                        _ => out.push(accepted),
                    }
                }
            }
        }
        Ok(())
    }
}

impl BatchHandler for Accept {
    fn codec(&self) -> &herald_core::codec::Codec {
        &self.deps.codec
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
            match self.watch.changed().await {
                Ok(Some(all)) => {
                    self.policy.templates = all
                        .into_iter()
                        .map(|t| (t.app.unwrap_or_default(), t.code))
                        .collect();
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(StageError::Transient(format!("templates: {e}")));
                }
            }
            let mut out = Vec::with_capacity(batch.len());
            let mut reqs = Vec::with_capacity(batch.len());
            let now = now_ms();
            for input in batch {
                if let Some(req) =
                    decode_or_dead_letter::<SendRequested>(&self.deps.codec, STAGE, input, &mut out)
                        .await?
                {
                    // Validated before anything is stored: a request PostgreSQL could not hold
                    // never reaches it.
                    let plan = handler::plan(&req, &self.policy, &trace_id(input), now);
                    reqs.push((input, req, plan));
                }
            }
            // Invalid requests end here; valid ones are checked for replays in one round trip.
            let mut valid = Vec::with_capacity(reqs.len());
            for (input, req, plan) in reqs {
                if matches!(plan, Plan::Messages(_)) {
                    valid.push((input, req, plan));
                } else {
                    self.emit(input, &req, plan, false, &mut out).await?;
                }
            }
            let seen: Vec<idempotency::Seen> = valid
                .iter()
                .map(|(input, r, _)| idempotency::Seen {
                    app_id: &r.app_id,
                    request_id: &r.request_id,
                    idempotency_key: r.idempotency_key.as_deref().filter(|k| !k.is_empty()),
                    source: source(input),
                })
                .collect();
            let duplicate = idempotency::check(&self.db, &seen)
                .await
                .map_err(|e| StageError::postgres("idempotency keys", e))?;
            drop(seen);
            for ((input, req, plan), dup) in valid.into_iter().zip(duplicate) {
                if dup {
                    // The original request's messages exist (same ids); nothing new.
                    metrics::counter!(herald_core::telemetry::names::DUPLICATE_REQUESTS, "app" => req.app_id.clone())
                        .increment(1);
                    tracing::info!(request_id = %req.request_id, "duplicate request ignored");
                    continue;
                }
                // Requests that did not come through the gateway count against the app's daily
                // quota here (the gateway counted its own, and vouches for it with a keyed mark
                // an outside producer cannot forge).
                let quota = self.quotas.get(&req.app_id).copied();
                let counted = input
                    .header(herald_domain::quota::COUNTED_HEADER)
                    .is_some_and(|mark| {
                        herald_domain::quota::verify_mark(
                            &self.deps.config,
                            &req.app_id,
                            &req.request_id,
                            mark,
                        )
                    });
                let over_quota = match quota {
                    Some(q) if !counted => !herald_domain::quota::take(
                        &self.db,
                        &req.app_id,
                        req.recipients.len() as i64,
                        q as i64,
                    )
                    .await
                    .map_err(|e| StageError::postgres("quota", e))?,
                    _ => false,
                };
                self.emit(input, &req, plan, over_quota, &mut out).await?;
            }
            Ok(out)
        })
    }
}

/// Runs the accept stage until `shutdown`.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> Result<(), StageError> {
    let policy = AcceptPolicy {
        limits: herald_domain::validate::Limits::from_config(&deps.config.pipeline),
        apps: deps.config.apps.iter().map(|a| a.id.clone()).collect(),
        templates: deps
            .config
            .templates
            .iter()
            .map(|t| (t.app.clone().unwrap_or_default(), t.code.clone()))
            .collect::<HashSet<_>>(),
    };
    let spec = deps.spec(STAGE, vec![topics::REQUESTS.into()], true);
    let transport = deps.transport.clone();
    let db = herald_domain::schema::migrated(&deps).await?;
    let quotas = deps
        .config
        .apps
        .iter()
        .filter_map(|a| Some((a.id.clone(), a.daily_quota?)))
        .collect();
    let tdb = herald_domain::templates::seeded(&deps).await?;
    let watch = herald_domain::templates::Watch::new(tdb);
    run_worker(
        STAGE,
        transport,
        spec,
        Accept {
            deps,
            policy,
            db,
            watch,
            quotas,
        },
        shutdown,
    )
    .await
}
