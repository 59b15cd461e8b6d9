//! The send stage's pure planning, apart from its ports (the ledger, the gate and the provider
//! calls): which records of a batch are attempts, which expired on the way, how the calls are cut
//! into waves, what status an attempt gives its message, and how long it waits for a receipt.
//! Unit-tested without PostgreSQL or a provider.

use std::collections::HashSet;
use std::time::Duration;

use herald_core::config::UnknownOutcomePolicy;
use herald_domain::failure::rules::Decision;
use herald_domain::status::Status;
use herald_schemas::DeliveryOutcome;

/// Largest wave of provider calls.
pub const CONCURRENCY: usize = 256;

/// Waves in progress at once: the next wave starts while the last one's stragglers finish.
pub const WAVES_IN_FLIGHT: usize = 4;

/// Indexes of the first record of each (message, attempt): the same attempt twice in one batch
/// (a redelivery beside its first copy) is one attempt.
pub fn first_of_each_attempt<'a>(keys: impl IntoIterator<Item = (&'a str, i32)>) -> Vec<usize> {
    let mut seen = HashSet::new();
    keys.into_iter()
        .enumerate()
        .filter(|(_, k)| seen.insert(*k))
        .map(|(i, _)| i)
        .collect()
}

/// A message whose `expires_at` has passed is never sent late.
pub fn expired(expires_at: Option<i64>, now: i64) -> bool {
    expires_at.is_some_and(|e| e <= now)
}

/// How many calls one wave holds: a quarter of what the tightest provider of the batch can have
/// in flight (waves overlap), and never more tokens than a rate-limited provider's bucket
/// holds.
pub fn wave_size(
    max_in_flight: impl IntoIterator<Item = usize>,
    rate_limits: impl IntoIterator<Item = u32>,
) -> usize {
    let size = max_in_flight
        .into_iter()
        .min()
        .unwrap_or(CONCURRENCY)
        .div_ceil(WAVES_IN_FLIGHT)
        .clamp(1, CONCURRENCY);
    rate_limits
        .into_iter()
        .min()
        .map_or(size, |r| size.min((r as usize).max(1)))
}

/// Cuts `items` into waves of `size`, each item with its index.
pub fn waves<T>(items: Vec<T>, size: usize) -> Vec<Vec<(usize, T)>> {
    let size = size.max(1);
    let mut waves: Vec<Vec<(usize, T)>> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        match waves.last_mut() {
            Some(w) if w.len() < size => w.push((i, item)),
            _ => waves.push(vec![(i, item)]),
        }
    }
    waves
}

/// The status a delivery outcome gives the message (CONTRACT.md §3).
pub fn status_for(outcome: DeliveryOutcome, has_receipts: bool) -> &'static str {
    match outcome {
        DeliveryOutcome::Succeeded if has_receipts => Status::Sent,
        DeliveryOutcome::Succeeded => Status::Delivered,
        DeliveryOutcome::Unknown => Status::Unknown,
        _ => Status::Failed,
    }
    .as_str()
}

/// The status the message has after an attempt and the rules' decision. A retry leaves it
/// `routed` (on its way to a provider again).
pub fn status_after(
    decision: &Decision,
    outcome: DeliveryOutcome,
    has_receipts: bool,
) -> &'static str {
    match decision {
        Decision::Done => status_for(outcome, has_receipts),
        Decision::Retry { .. } => Status::Routed.as_str(),
        Decision::Fail { .. } | Decision::Alert { .. } => Status::Failed.as_str(),
        Decision::Unknown => Status::Unknown.as_str(),
        Decision::HoldForReceipt => Status::Sent.as_str(),
        Decision::Expired => Status::Expired.as_str(),
    }
}

/// When an attempt with this outcome stops waiting for its receipt: accepted by a provider
/// with receipts, or unknown and held for the receipt by the channel's policy.
pub fn receipt_due(
    has_receipts: bool,
    outcome: DeliveryOutcome,
    unknown: UnknownOutcomePolicy,
    timeout: Duration,
    now: i64,
) -> Option<i64> {
    let waits = match outcome {
        DeliveryOutcome::Succeeded => true,
        DeliveryOutcome::Unknown => unknown == UnknownOutcomePolicy::HoldForReceipt,
        _ => false,
    };
    (has_receipts && waits).then(|| now + timeout.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redelivered_attempt_in_the_same_batch_is_one_attempt() {
        let keys = [("m1", 1), ("m2", 1), ("m1", 1), ("m1", 2), ("m2", 1)];
        assert_eq!(first_of_each_attempt(keys), [0, 1, 3]);
    }

    #[test]
    fn expiry_is_inclusive() {
        assert!(expired(Some(5), 5));
        assert!(!expired(Some(6), 5));
        assert!(!expired(None, i64::MAX));
    }

    #[test]
    fn waves_follow_the_tightest_provider_and_rate_limit() {
        // SMTP's pool of 16: waves of 4, so four overlap.
        assert_eq!(wave_size([256, 16], []), 4);
        assert_eq!(wave_size([], []), CONCURRENCY / WAVES_IN_FLIGHT);
        assert_eq!(wave_size([256], [2]), 2);
        assert_eq!(wave_size([1], []), 1);
        assert_eq!(wave_size([256], [0]), 1);
        let w = waves(vec!['a', 'b', 'c', 'd', 'e'], 2);
        assert_eq!(
            w,
            vec![
                vec![(0, 'a'), (1, 'b')],
                vec![(2, 'c'), (3, 'd')],
                vec![(4, 'e')]
            ]
        );
        assert!(waves(Vec::<u8>::new(), 3).is_empty());
    }

    #[test]
    fn statuses_of_attempts() {
        assert_eq!(status_for(DeliveryOutcome::Succeeded, true), "sent");
        assert_eq!(status_for(DeliveryOutcome::Succeeded, false), "delivered");
        assert_eq!(status_for(DeliveryOutcome::Unknown, false), "unknown");
        assert_eq!(status_for(DeliveryOutcome::RateLimited, false), "failed");
        let retry = Decision::Retry {
            delay: Duration::ZERO,
            provider: "p".into(),
            kind: "webhook".into(),
            rule: "r".into(),
        };
        assert_eq!(
            status_after(&retry, DeliveryOutcome::FailedTransient, false),
            "routed"
        );
        assert_eq!(
            status_after(&Decision::HoldForReceipt, DeliveryOutcome::Unknown, true),
            "sent"
        );
        assert_eq!(
            status_after(&Decision::Expired, DeliveryOutcome::FailedTransient, false),
            "expired"
        );
    }

    #[test]
    fn only_attempts_a_receipt_can_end_wait_for_one() {
        let t = Duration::from_secs(60);
        let hold = UnknownOutcomePolicy::HoldForReceipt;
        assert_eq!(
            receipt_due(true, DeliveryOutcome::Succeeded, hold, t, 1000),
            Some(61_000)
        );
        assert_eq!(
            receipt_due(false, DeliveryOutcome::Succeeded, hold, t, 1000),
            None
        );
        assert_eq!(
            receipt_due(true, DeliveryOutcome::Unknown, hold, t, 0),
            Some(60_000)
        );
        assert_ne!(UnknownOutcomePolicy::default(), hold);
        assert_eq!(
            receipt_due(
                true,
                DeliveryOutcome::Unknown,
                UnknownOutcomePolicy::default(),
                t,
                0
            ),
            None
        );
        assert_eq!(
            receipt_due(true, DeliveryOutcome::FailedPermanent, hold, t, 0),
            None
        );
    }
}
