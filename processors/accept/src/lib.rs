//! Accept stage. Consumes `SendRequested` from `herald.requests.v1`; emits one
//! `MessageAccepted` per recipient to `herald.accepted` (keyed by recipient, for per-receiver
//! order), `DelayScheduled` to a delay tier when `send_at` is in the future, `MessageFailed` to
//! `herald.status` for an invalid recipient, and a dead letter for an undecodable or invalid
//! request. Message ids are deterministic (promise 2); outputs and input offsets commit in one
//! Kafka transaction (promise 3); bad input never stops the stage (promise 5).

pub mod handler;

use std::collections::HashSet;

use futures::future::BoxFuture;
use herald_core::runtime::{Deps, delay_topic, tier_for};
use herald_core::transport::{InRecord, OutRecord};
use herald_core::util::{event_id, now_ms};
use herald_core::worker::{
    BatchHandler, StageError, dead_letter, decode_or_dead_letter, record, run_worker, trace_id,
};
use herald_schemas::{DelayPurpose, DelayScheduled, SendRequested, topics};
use tokio_util::sync::CancellationToken;

use handler::{AcceptPolicy, Plan, Planned};

pub const STAGE: &str = "accept";

struct Accept {
    deps: Deps,
    policy: AcceptPolicy,
}

impl Accept {
    async fn handle_one(
        &self,
        input: &InRecord,
        out: &mut Vec<OutRecord>,
    ) -> Result<(), StageError> {
        let codec = &self.deps.codec;
        let Some(req) = decode_or_dead_letter::<SendRequested>(codec, STAGE, input, out).await?
        else {
            return Ok(());
        };
        let trace = trace_id(input);
        let now = now_ms();
        match handler::plan(&req, &self.policy, &trace, now) {
            Plan::Rejected(reason) => {
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
            }
            Plan::Messages(messages) => {
                for m in messages {
                    match m {
                        Planned::Failed(f) => {
                            out.push(
                                record(codec, topics::STATUS, &f.header.message_id, &trace, &*f)
                                    .await?,
                            );
                        }
                        Planned::Accepted(m) => {
                            let key = m.recipient.address.clone();
                            let accepted =
                                record(codec, topics::ACCEPTED, &key, &trace, &*m).await?;
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
            }
        }
        Ok(())
    }
}

impl BatchHandler for Accept {
    fn handle<'a>(
        &'a mut self,
        batch: &'a [InRecord],
    ) -> BoxFuture<'a, Result<Vec<OutRecord>, StageError>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(batch.len());
            for input in batch {
                self.handle_one(input, &mut out).await?;
            }
            Ok(out)
        })
    }
}

/// Runs the accept stage until `shutdown`.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> Result<(), StageError> {
    let policy = AcceptPolicy {
        max_recipients: deps.config.pipeline.max_recipients,
        templates: deps
            .config
            .templates
            .iter()
            .map(|t| t.code.clone())
            .collect::<HashSet<_>>(),
        max_payload_bytes: 256 * 1024,
    };
    let spec = deps.spec(STAGE, vec![topics::REQUESTS.into()], true);
    let transport = deps.transport.clone();
    run_worker(STAGE, transport, spec, Accept { deps, policy }, shutdown).await
}
