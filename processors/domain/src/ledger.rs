//! The attempt ledger in PostgreSQL: promise 2 (nothing sent twice). A batch's (message,
//! attempt) pairs are claimed; right before a wave of provider calls starts, the wave is marked
//! `started` (durably, one statement per wave); after the calls, outcomes are recorded.
//! A redelivered record finds its row: with an outcome, the outcome is re-emitted without calling
//! the provider; started without an outcome (the process died mid-call), the outcome is
//! `unknown`, never a silent resend; claimed but never started, the call is made now.
//! One statement per batch or wave for each step: no per-message round trips.

use tokio_postgres::Client;

use crate::failure::{CallResult, outcome_from_str, outcome_str};

/// What the ledger says about a claimed attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Prior {
    /// Never claimed, or claimed and never started: call the provider.
    Fresh,
    /// Finished before: re-emit this. `provider` is the one the ledger says was called; a copy
    /// of the message routed again (to another provider, maybe) speaks of that one.
    Finished {
        result: CallResult,
        latency: i64,
        provider: String,
    },
    /// Started and never finished: the call may have happened, with `provider` where the
    /// ledger knows it.
    InFlight { provider: Option<String> },
}

impl Prior {
    /// The provider the ledger says this attempt was made with, if it was (or may have been).
    pub fn called(&self) -> Option<&str> {
        match self {
            Prior::Fresh => None,
            Prior::Finished { provider, .. } => Some(provider),
            Prior::InFlight { provider } => provider.as_deref(),
        }
    }
}

/// One attempt to claim. The request, app and channel let receipt callbacks find the message
/// from the provider's id alone.
pub struct ClaimKey<'a> {
    pub message_id: &'a str,
    pub attempt: i32,
    pub provider: &'a str,
    pub request_id: &'a str,
    pub app_id: &'a str,
    pub channel: &'a str,
}

/// One attempt to mark started: the copy about to call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StartKey<'a> {
    pub message_id: &'a str,
    pub attempt: i32,
    pub provider: &'a str,
    /// The consumed `MessageRouted` record, where the ledger keeps one for a resend.
    pub routed: Option<&'a [u8]>,
}

/// Claims each (message, attempt); answers in input order.
pub async fn claim(
    db: &Client,
    claims: &[ClaimKey<'_>],
) -> Result<Vec<Prior>, tokio_postgres::Error> {
    let keys: Vec<(String, i32)> = claims
        .iter()
        .map(|c| (c.message_id.to_owned(), c.attempt))
        .collect();
    let ids: Vec<&str> = claims.iter().map(|k| k.message_id).collect();
    let attempts: Vec<i32> = claims.iter().map(|k| k.attempt).collect();
    let providers: Vec<&str> = claims.iter().map(|k| k.provider).collect();
    let requests: Vec<&str> = claims.iter().map(|k| k.request_id).collect();
    let apps: Vec<&str> = claims.iter().map(|k| k.app_id).collect();
    let channels: Vec<&str> = claims.iter().map(|k| k.channel).collect();
    let fresh = db
        .query(
            "INSERT INTO send_ledger (message_id, attempt, provider, request_id, app_id, channel)
             SELECT * FROM UNNEST($1::text[], $2::int[], $3::text[], $4::text[], $5::text[], $6::text[])
             ON CONFLICT DO NOTHING RETURNING message_id, attempt",
            &[&ids, &attempts, &providers, &requests, &apps, &channels],
        )
        .await?;
    let fresh: std::collections::HashSet<(String, i32)> =
        fresh.iter().map(|r| (r.get(0), r.get(1))).collect();
    let seen: Vec<usize> = (0..keys.len())
        .filter(|i| !fresh.contains(&(keys[*i].0.clone(), keys[*i].1)))
        .collect();
    let mut prior = std::collections::HashMap::new();
    if !seen.is_empty() {
        let ids: Vec<&str> = seen.iter().map(|i| keys[*i].0.as_str()).collect();
        let attempts: Vec<i32> = seen.iter().map(|i| keys[*i].1).collect();
        let rows = db
            .query(
                "SELECT l.message_id, l.attempt, l.outcome, l.response_code, l.provider_message_id,
                        l.reason_code, l.reason_message, l.latency_ms, l.started_at IS NOT NULL,
                        l.provider
                 FROM send_ledger l JOIN UNNEST($1::text[], $2::int[]) AS k(m, a)
                   ON l.message_id = k.m AND l.attempt = k.a",
                &[&ids, &attempts],
            )
            .await?;
        for r in rows {
            let outcome: Option<String> = r.get(2);
            let p = match outcome.as_deref().and_then(outcome_from_str) {
                Some(outcome) => {
                    let code: Option<String> = r.get(5);
                    let msg: Option<String> = r.get(6);
                    Prior::Finished {
                        result: CallResult {
                            outcome,
                            response_code: r.get(3),
                            provider_message_id: r.get(4),
                            reason: code
                                .map(|c| herald_schemas::Reason::new(c, msg.unwrap_or_default())),
                        },
                        latency: r.get::<_, Option<i64>>(7).unwrap_or_default(),
                        provider: r.get(9),
                    }
                }
                None if r.get::<_, bool>(8) => Prior::InFlight {
                    provider: Some(r.get(9)),
                },
                None => Prior::Fresh,
            };
            prior.insert((r.get::<_, String>(0), r.get::<_, i32>(1)), p);
        }
    }
    Ok(keys
        .iter()
        .map(|k| {
            if fresh.contains(&(k.0.clone(), k.1)) {
                Prior::Fresh
            } else {
                prior
                    .remove(&(k.0.clone(), k.1))
                    .unwrap_or(Prior::InFlight { provider: None })
            }
        })
        .collect())
}

/// Marks attempts as started, durably, before their provider calls are made; answers the ones
/// this call started. An attempt another process started meanwhile is not among them: two
/// copies of one attempt (a message routed again after a transport lost an acknowledgement,
/// read by two workers at once) both find it claimed but not started, and only the one that
/// marks it started may call the provider — the other leaves it to that one.
///
/// The row takes the provider and the kept `MessageRouted` (none where no receipt rule could
/// act on this provider's receipts) of the copy that starts it, so receipts, their rules and re-emitted outcomes speak of the provider
/// actually called even when the copy that claimed first was routed elsewhere.
pub async fn start(
    db: &Client,
    keys: &[StartKey<'_>],
) -> Result<std::collections::HashSet<(String, i32)>, tokio_postgres::Error> {
    if keys.is_empty() {
        return Ok(Default::default());
    }
    let ids: Vec<&str> = keys.iter().map(|k| k.message_id).collect();
    let attempts: Vec<i32> = keys.iter().map(|k| k.attempt).collect();
    let providers: Vec<&str> = keys.iter().map(|k| k.provider).collect();
    let routed: Vec<Option<&[u8]>> = keys.iter().map(|k| k.routed).collect();
    let rows = db
        .query(
            "UPDATE send_ledger l SET started_at = now(), provider = k.p, routed = k.r
             FROM UNNEST($1::text[], $2::int[], $3::text[], $4::bytea[]) AS k(m, a, p, r)
             WHERE l.message_id = k.m AND l.attempt = k.a AND l.started_at IS NULL
             RETURNING l.message_id, l.attempt",
            &[&ids, &attempts, &providers, &routed],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Records the outcomes of a batch's calls and, in the same statement, which of them now wait
/// for a receipt (`waits[i]`: the deadline in ms for `done[i]`, if it waits; see
/// `herald_domain::failure::receipt_wait`).
pub async fn finish(
    db: &Client,
    done: &[(String, i32, CallResult, i64)],
    waits: &[Option<i64>],
) -> Result<(), tokio_postgres::Error> {
    if done.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = done.iter().map(|d| d.0.as_str()).collect();
    let attempts: Vec<i32> = done.iter().map(|d| d.1).collect();
    let outcomes: Vec<&str> = done.iter().map(|d| outcome_str(d.2.outcome)).collect();
    let codes: Vec<Option<&str>> = done.iter().map(|d| d.2.response_code.as_deref()).collect();
    let pmids: Vec<Option<&str>> = done
        .iter()
        .map(|d| d.2.provider_message_id.as_deref())
        .collect();
    let rcodes: Vec<Option<&str>> = done
        .iter()
        .map(|d| d.2.reason.as_ref().map(|r| r.code.as_str()))
        .collect();
    let rmsgs: Vec<Option<&str>> = done
        .iter()
        .map(|d| d.2.reason.as_ref().map(|r| r.message.as_str()))
        .collect();
    let lat: Vec<i64> = done.iter().map(|d| d.3).collect();
    let (mut wait_ids, mut wait_attempts, mut due) = (Vec::new(), Vec::new(), Vec::new());
    for (d, w) in done.iter().zip(waits) {
        if let Some(at) = w {
            wait_ids.push(d.0.as_str());
            wait_attempts.push(d.1);
            due.push(*at);
        }
    }
    db.execute(
        "WITH w AS (
             INSERT INTO receipt_waits (message_id, attempt, due_at)
             SELECT m, a, to_timestamp(d / 1000.0) FROM UNNEST($9::text[], $10::int[], $11::bigint[]) AS w(m, a, d)
             ON CONFLICT DO NOTHING)
         UPDATE send_ledger l SET finished_at = now(), outcome = u.o, response_code = u.c,
                provider_message_id = u.p, reason_code = u.rc, reason_message = u.rm, latency_ms = u.l
         FROM UNNEST($1::text[], $2::int[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[])
              AS u(m, a, o, c, p, rc, rm, l)
         WHERE l.message_id = u.m AND l.attempt = u.a",
        &[
            &ids,
            &attempts,
            &outcomes,
            &codes,
            &pmids,
            &rcodes,
            &rmsgs,
            &lat,
            &wait_ids,
            &wait_attempts,
            &due,
        ],
    )
    .await?;
    Ok(())
}
/// An attempt a receipt may be about: one that provider accepted (or whose answer was lost).
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiptCandidate {
    pub message_id: String,
    pub attempt: i32,
    pub request_id: String,
    pub app_id: String,
    pub channel: String,
    pub provider_message_id: Option<String>,
    /// The `MessageRouted` the send stage kept for a resend.
    pub routed: Option<Vec<u8>>,
}

/// The attempts of `provider` that receipts naming these message ids or provider message ids may
/// be about, oldest first (the callback stage matches each report to one).
pub async fn receipt_candidates(
    db: &Client,
    provider: &str,
    message_ids: &[&str],
    provider_message_ids: &[&str],
) -> Result<Vec<ReceiptCandidate>, tokio_postgres::Error> {
    let rows = db
        .query(
            "SELECT message_id, attempt, request_id, app_id, channel, provider_message_id, routed
             FROM send_ledger
             WHERE provider = $1 AND (outcome IS NULL OR outcome IN ('SUCCEEDED', 'UNKNOWN'))
               AND (message_id = ANY($2) OR provider_message_id = ANY($3))
             ORDER BY attempt",
            &[&provider, &message_ids, &provider_message_ids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ReceiptCandidate {
            message_id: r.get(0),
            attempt: r.get(1),
            request_id: r.get::<_, Option<String>>(2).unwrap_or_default(),
            app_id: r.get::<_, Option<String>>(3).unwrap_or_default(),
            channel: r.get::<_, Option<String>>(4).unwrap_or_default(),
            provider_message_id: r.get(5),
            routed: r.get(6),
        })
        .collect())
}

/// Retention (`[retention]`): an attempt once its message is terminal and the window passed (a message held for a receipt keeps its rows).
pub const PURGE: crate::retention::Purge = crate::retention::Purge {
    table: "send_ledger",
    third: crate::retention::Third::Terminal,
    days: |r| r.ledger_days,
    sql: "DELETE FROM send_ledger WHERE ctid IN (
            SELECT l.ctid FROM send_ledger l
            WHERE coalesce(l.finished_at, l.started_at, l.claimed_at) < now() - make_interval(days => $2)
              AND NOT EXISTS (SELECT 1 FROM messages m
                              WHERE m.message_id = l.message_id AND NOT (m.status = ANY($3)))
            LIMIT $1)",
};
