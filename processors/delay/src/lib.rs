//! Delay stage. Consumes `DelayScheduled` from the tier topics `herald.delay.<n>s`, one worker
//! per tier; a record in tier `n` waits until it has spent `n` seconds there (records in a tier partition are in
//! arrival order, so waiting on the head never delays a record behind it past its own time),
//! then is re-published to its `target_topic` when due, or moved to the tier that fits the time
//! still left. Scheduled sends and retries both ride on it. Exactly-once between topics.
//!
//! - Reads: `herald.delay.<n>s`.
//! - Writes: each record's `target_topic` (any stage's input), or a shorter tier.
//! - Tables: none.
//! - Promise: a record is released once, and never early.

use std::time::Duration;

use futures::future::BoxFuture;
use herald_core::runtime::{DELAY_TIERS_SECS, Deps, delay_topic, tier_for};
use herald_core::transport::{InRecord, OutRecord};
use herald_core::util::now_ms;
use herald_core::worker::{
    BatchHandler, StageError, decode_or_dead_letter, record, run_workers, trace_id,
};
use herald_schemas::{DelayScheduled, headers, topics};
use tokio_util::sync::CancellationToken;

pub const STAGE: &str = "delay";

/// A record released or moved on is held in its batch no longer than this: a later record of the
/// batch whose turn comes after that is moved to the tier that fits its time left instead (see
/// [`step`]).
pub const HOLD_SLACK: Duration = Duration::from_millis(100);

/// What to do with a delayed record now.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Wait this long, then decide again.
    Wait(Duration),
    Release,
    /// Move to this tier.
    Retier(u64),
}

/// The next step for a record. A batch's records are published together when the batch ends,
/// so once the batch holds an output (since `holding_since`: a record released on time, or one
/// moved on whose clock in its next tier has started), waiting for a later record would make
/// that output late by the wait: a record whose turn comes more than [`HOLD_SLACK`] after the
/// first output moves on to the tier that fits its time left (re-published now, it waits there). The handler takes a
/// batch's records in the order they need attention, so the first wait is the shortest.
pub fn step(
    due_at: i64,
    entered_tier_at: i64,
    tier_secs: u64,
    now: i64,
    holding_since: Option<i64>,
) -> Step {
    if now >= due_at {
        return Step::Release;
    }
    let leave_tier = entered_tier_at + tier_secs as i64 * 1000;
    if now >= leave_tier {
        return Step::Retier(tier_for(due_at - now));
    }
    let wake = due_at.min(leave_tier);
    if holding_since.is_some_and(|since| wake - since > HOLD_SLACK.as_millis() as i64) {
        return Step::Retier(tier_for(due_at - now));
    }
    Step::Wait(Duration::from_millis((wake - now) as u64))
}

struct Delay {
    deps: Deps,
    shutdown: CancellationToken,
}

impl BatchHandler for Delay {
    fn codec(&self) -> &herald_core::codec::Codec {
        &self.deps.codec
    }

    fn fails_messages(&self) -> bool {
        true
    }

    fn handle<'a>(
        &'a mut self,
        batch: &'a [InRecord],
    ) -> BoxFuture<'a, Result<Vec<OutRecord>, StageError>> {
        Box::pin(async move {
            let codec = &self.deps.codec;
            let mut out = Vec::with_capacity(batch.len());
            // Records in the order they need attention (due, or due to leave the tier), not
            // the order they were read in: a batch interleaves partitions.
            let mut held = Vec::with_capacity(batch.len());
            for input in batch {
                let Some(d) =
                    decode_or_dead_letter::<DelayScheduled>(codec, STAGE, input, &mut out).await?
                else {
                    continue;
                };
                let tier: u64 = input
                    .topic
                    .strip_prefix(topics::DELAY_PREFIX)
                    .and_then(|t| t.strip_suffix('s'))
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(DELAY_TIERS_SECS[0]);
                let wake = d.due_at.min(d.header.event_time + tier as i64 * 1000);
                held.push((wake, d, input, tier));
            }
            held.sort_by_key(|h| h.0);
            let mut holding_since = None;
            for (_, mut d, input, tier) in held {
                loop {
                    match step(d.due_at, d.header.event_time, tier, now_ms(), holding_since) {
                        Step::Wait(w) => {
                            tokio::select! {
                                // Not committed: the batch is delivered again after restart.
                                _ = self.shutdown.cancelled() => return Err(StageError::Transient("shutting down while holding a delayed record".into())),
                                _ = tokio::time::sleep(w) => {}
                            }
                        }
                        Step::Release => {
                            holding_since = holding_since.or(Some(now_ms()));
                            out.push(OutRecord {
                                topic: d.target_topic.clone(),
                                key: d.key.clone(),
                                payload: std::mem::take(&mut d.payload),
                                headers: vec![(
                                    headers::TRACEPARENT.into(),
                                    trace_id(input).into_bytes(),
                                )],
                            });
                            break;
                        }
                        Step::Retier(t) => {
                            holding_since = holding_since.or(Some(now_ms()));
                            d.header.event_time = now_ms();
                            let key = d.header.message_id.clone();
                            out.push(
                                record(codec, &delay_topic(t), &key, &trace_id(input), &d).await?,
                            );
                            break;
                        }
                    }
                }
            }
            Ok(out)
        })
    }
}

/// Runs the delay stage until `shutdown`: one worker per tier, so a record held for an hour
/// never holds up one due in a second.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> Result<(), StageError> {
    let workers = DELAY_TIERS_SECS
        .iter()
        .map(|tier| {
            let mut spec = deps.spec(&format!("{STAGE}-{tier}s"), vec![delay_topic(*tier)], true);
            spec.max_batch = spec.max_batch.min(500);
            // Records are held for up to the tier's length: the broker must not presume us dead.
            spec.max_batch_time = Duration::from_secs(tier + 300);
            let handler = Delay {
                deps: deps.clone(),
                shutdown: shutdown.clone(),
            };
            (spec, handler)
        })
        .collect();
    run_workers(STAGE, deps.transport.clone(), workers, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_releases_and_retiers() {
        assert_eq!(step(5_000, 0, 10, 5_000, None), Step::Release);
        assert_eq!(
            step(5_000, 0, 10, 1_000, None),
            Step::Wait(Duration::from_millis(4_000))
        );
        // Due in 45 s, entered the 10 s tier 10 s ago: move on to the 10 s tier again.
        assert_eq!(step(55_000, 0, 10, 10_000, None), Step::Retier(10));
        assert_eq!(step(4_000_000, 0, 60, 60_000, None), Step::Retier(3600));
    }

    #[test]
    fn a_released_record_is_held_in_its_batch_no_longer_than_the_slack() {
        // Nothing released yet: the batch's first record is waited for, however long.
        assert_eq!(
            step(9_000, 0, 10, 1_000, None),
            Step::Wait(Duration::from_millis(8_000))
        );
        // A record was released at 1 000 and waits in the batch: a later one due at 1 800
        // moves to the 1 s tier now rather than making it 800 ms late; one due within the
        // slack of that release is waited for.
        assert_eq!(step(1_800, 0, 10, 1_000, Some(1_000)), Step::Retier(1));
        assert_eq!(step(9_000, 0, 10, 1_000, Some(1_000)), Step::Retier(1));
        assert_eq!(step(25_000, 0, 60, 1_000, Some(1_000)), Step::Retier(10));
        assert_eq!(
            step(1_050, 0, 10, 1_000, Some(1_000)),
            Step::Wait(Duration::from_millis(50))
        );
        // The slack counts from the first release, not from the last wait: many records a few
        // ms apart do not hold the first one for the whole batch.
        assert_eq!(step(1_130, 0, 10, 1_120, Some(1_000)), Step::Retier(1));
        // Never early: a record not due is never released, holding or not.
        assert_ne!(step(1_001, 0, 10, 1_000, Some(1_000)), Step::Release);
    }
}
