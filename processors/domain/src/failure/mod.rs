//! What happens when a delivery fails, shared by the stages that see failures: the send stage
//! (a provider call failed: scene `send_failure`) and the callback stage (a receipt said
//! undelivered: scene `callback_failure`).
//!
//! - [`rules`]: the rule engine (CONTRACT.md §4), configured as data.
//! - [`breaker`]: circuit breakers per provider, fed by call outcomes and by receipts, and the
//!   `provider_health` table the route and send stages read.
//! - [`eligible`]: whether a provider may take a message now, asked one way by route, send and
//!   callback.
//! - [`alert`]: the `alert` action's signed operator webhook.
//! - [`receipt_wait`]: how long a message waits in `sent` for its receipt.
//! - [`outcome`]: what the decision on one attempt leads to (both scenes).
//! - [`next_attempt`]: the records that put the next attempt on its way.

pub mod alert;
pub mod breaker;
pub mod eligible;
pub mod outcome;
pub mod receipt_wait;
pub mod rules;

use std::time::Duration;

use herald_schemas::{
    DelayPurpose, DelayScheduled, DeliveryOutcome, MessageRouted, Reason, topics,
};

use herald_core::codec::{Codec, CodecError};
use herald_core::runtime::{delay_topic, tier_for};
use herald_core::transport::OutRecord;
use herald_core::util::event_id;
use herald_core::worker::record;

/// The classified answer of one provider call.
#[derive(Debug, Clone, PartialEq)]
pub struct CallResult {
    pub outcome: DeliveryOutcome,
    pub response_code: Option<String>,
    pub provider_message_id: Option<String>,
    pub reason: Option<Reason>,
}

impl CallResult {
    pub fn ok(code: impl Into<String>, provider_message_id: Option<String>) -> Self {
        CallResult {
            outcome: DeliveryOutcome::Succeeded,
            response_code: Some(code.into()),
            provider_message_id,
            reason: None,
        }
    }

    pub fn fail(outcome: DeliveryOutcome, code: Option<String>, reason: Reason) -> Self {
        CallResult {
            outcome,
            response_code: code,
            provider_message_id: None,
            reason: Some(reason),
        }
    }
}

pub fn outcome_str(o: DeliveryOutcome) -> &'static str {
    match o {
        DeliveryOutcome::Succeeded => "SUCCEEDED",
        DeliveryOutcome::FailedPermanent => "FAILED_PERMANENT",
        DeliveryOutcome::FailedTransient => "FAILED_TRANSIENT",
        DeliveryOutcome::RateLimited => "RATE_LIMITED",
        DeliveryOutcome::Unknown => "UNKNOWN",
    }
}

pub fn outcome_from_str(s: &str) -> Option<DeliveryOutcome> {
    Some(match s {
        "SUCCEEDED" => DeliveryOutcome::Succeeded,
        "FAILED_PERMANENT" => DeliveryOutcome::FailedPermanent,
        "FAILED_TRANSIENT" => DeliveryOutcome::FailedTransient,
        "RATE_LIMITED" => DeliveryOutcome::RateLimited,
        "UNKNOWN" => DeliveryOutcome::Unknown,
        _ => return None,
    })
}

/// Where and when the next attempt goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Next {
    pub provider: String,
    pub kind: String,
    pub delay: Duration,
    /// Why (recorded with a delayed attempt).
    pub reason: Option<Reason>,
}

/// The record that puts attempt `attempt + 1` of `m` on its way through `next.provider`: the
/// `MessageRouted` on its dispatch lane now, or wrapped in a `DelayScheduled` on the delay tier.
/// Its event ids depend on the message and the attempt only (whichever stage decided it, it is
/// one fact; the send ledger makes one call of it).
pub async fn next_attempt(
    codec: &Codec,
    stage: &str,
    m: &MessageRouted,
    attempt: i32,
    next: Next,
    trace: &str,
    now: i64,
) -> Result<OutRecord, CodecError> {
    let mut routed = m.clone();
    if next.provider != m.provider && !routed.tried_providers.contains(&m.provider) {
        routed.tried_providers.push(m.provider.clone());
    }
    routed.provider = next.provider;
    routed.provider_kind = next.kind;
    routed.header = m.header.follow(
        stage,
        event_id(&m.header.message_id, "retry", attempt + 1),
        now,
    );
    routed.header.attempt = attempt + 1;
    let topic = topics::dispatch_lane(m.header.channel, m.priority);
    let key = m.recipient.address.clone();
    let rec = record(codec, &topic, &key, trace, &routed).await?;
    if next.delay.is_zero() {
        return Ok(rec);
    }
    let due = now + next.delay.as_millis() as i64;
    // Its own event id: the wrapped MessageRouted is another fact.
    let mut header = routed.header.clone();
    header.event_id = event_id(&m.header.message_id, "retry_scheduled", attempt + 1);
    let scheduled = DelayScheduled {
        header,
        purpose: DelayPurpose::Retry,
        due_at: due,
        target_topic: topic,
        key: rec.key,
        payload: rec.payload,
        reason: next.reason,
    };
    let tier = delay_topic(tier_for(due - now));
    record(codec, &tier, &key, trace, &scheduled).await
}
