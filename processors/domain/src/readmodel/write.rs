//! Writing the read model: one batch of facts folded per message and written in the caller's
//! transaction, one statement per table, with the positions they were read at.

use std::collections::HashMap;

use tokio_postgres::GenericClient;

use super::projection::{Fact, MessageRow, fold};

/// When a fact's status replaces the row's: a higher rank, or at the same rank an earlier fact,
/// or at the same rank and time the higher [`crate::status::Status::precedence`] (`$16`, the
/// terminal statuses from lowest to highest) — so the row is the same whatever order the
/// topics are read in.
const WINS: &str = "(EXCLUDED.status_rank > m.status_rank
    OR (EXCLUDED.status_rank = m.status_rank AND EXCLUDED.updated_at < m.updated_at)
    OR (EXCLUDED.status_rank = m.status_rank AND EXCLUDED.updated_at = m.updated_at
        AND array_position($16::text[], EXCLUDED.status) > array_position($16::text[], m.status)))";

static UPSERT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
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
                status = CASE WHEN {WINS} THEN EXCLUDED.status ELSE m.status END,
                status_rank = GREATEST(m.status_rank, EXCLUDED.status_rank),
                updated_at = CASE WHEN {WINS} THEN EXCLUDED.updated_at ELSE m.updated_at END,
                created_at = LEAST(m.created_at, EXCLUDED.created_at),
                provider = CASE WHEN EXCLUDED.provider IS NOT NULL AND EXCLUDED.attempts >= m.attempts
                                THEN EXCLUDED.provider ELSE m.provider END,
                attempts = GREATEST(m.attempts, EXCLUDED.attempts),
                recipient_masked = COALESCE(m.recipient_masked, EXCLUDED.recipient_masked),
                template = COALESCE(m.template, EXCLUDED.template),
                template_version = COALESCE(m.template_version, EXCLUDED.template_version),
                recipient_key = COALESCE(m.recipient_key, EXCLUDED.recipient_key),
                latency_ms = CASE WHEN EXCLUDED.latency_ms IS NOT NULL AND EXCLUDED.attempts >= m.attempts
                                  THEN EXCLUDED.latency_ms ELSE m.latency_ms END
             -- Only where a column above changes: a fact that brings nothing new (a delay-tier
             -- hop, a redelivered event) writes no new row version and no WAL.
             WHERE {WINS}
                OR EXCLUDED.created_at < m.created_at
                OR (EXCLUDED.provider IS NOT NULL AND EXCLUDED.attempts >= m.attempts
                    AND EXCLUDED.provider IS DISTINCT FROM m.provider)
                OR EXCLUDED.attempts > m.attempts
                OR (m.recipient_masked IS NULL AND EXCLUDED.recipient_masked IS NOT NULL)
                OR (m.template IS NULL AND EXCLUDED.template IS NOT NULL)
                OR (m.template_version IS NULL AND EXCLUDED.template_version IS NOT NULL)
                OR (m.recipient_key IS NULL AND EXCLUDED.recipient_key IS NOT NULL)
                OR (EXCLUDED.latency_ms IS NOT NULL AND EXCLUDED.attempts >= m.attempts
                    AND EXCLUDED.latency_ms IS DISTINCT FROM m.latency_ms)",
    )
});

/// Writes a batch of facts: message rows (a status only moves up in rank), delivery attempts
/// (the earliest record of each), timeline events (one per event id, its earliest time) and,
/// with `positions`, the next position of every (topic, partition) read.
pub async fn write(
    tx: &impl GenericClient,
    facts: &[Fact],
    positions: Option<&HashMap<(String, i32), i64>>,
) -> Result<(), tokio_postgres::Error> {
    let rows = fold(facts);
    if !rows.is_empty() {
        let col = |f: fn(&MessageRow) -> String| rows.iter().map(f).collect::<Vec<_>>();
        let ids = col(|r| r.message_id.clone());
        let reqs = col(|r| r.request_id.clone());
        let apps = col(|r| r.app_id.clone());
        let chans = col(|r| r.channel.clone());
        let statuses = col(|r| r.status.clone());
        let ranks: Vec<i16> = rows.iter().map(|r| r.rank).collect();
        let providers: Vec<Option<String>> = rows.iter().map(|r| r.provider.clone()).collect();
        let attempts: Vec<i32> = rows.iter().map(|r| r.attempts).collect();
        let masked: Vec<Option<String>> = rows.iter().map(|r| r.recipient_masked.clone()).collect();
        let tpls: Vec<Option<String>> = rows.iter().map(|r| r.template.clone()).collect();
        let tvs: Vec<Option<i32>> = rows.iter().map(|r| r.template_version).collect();
        let rkeys: Vec<Option<String>> = rows.iter().map(|r| r.recipient_key.clone()).collect();
        let lats: Vec<Option<i64>> = rows.iter().map(|r| r.latency_ms).collect();
        let created: Vec<i64> = rows.iter().map(|r| r.created_at).collect();
        let updated: Vec<i64> = rows.iter().map(|r| r.updated_at).collect();
        tx.execute(
            &*UPSERT,
            &[
                &ids,
                &reqs,
                &apps,
                &chans,
                &statuses,
                &ranks,
                &providers,
                &attempts,
                &masked,
                &tpls,
                &tvs,
                &created,
                &updated,
                &rkeys,
                &lats,
                &crate::status::PRECEDENCE.as_slice(),
            ],
        )
        .await?;
        // Delivery attempts (latency, provider response code): one row per attempt, the
        // earliest record of it (a redelivered attempt re-emits the same result).
        let attempts: Vec<&Fact> = facts.iter().filter(|f| f.outcome.is_some()).collect();
        if !attempts.is_empty() {
            let col =
                |g: fn(&Fact) -> Option<String>| attempts.iter().map(|f| g(f)).collect::<Vec<_>>();
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
    if let Some(positions) = positions.filter(|p| !p.is_empty()) {
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
    Ok(())
}

/// The positions applied, as PostgreSQL holds them: where projecting resumes.
pub async fn positions(
    db: &impl GenericClient,
) -> Result<HashMap<(String, i32), i64>, tokio_postgres::Error> {
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
