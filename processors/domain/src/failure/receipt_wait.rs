//! Receipt deadlines: a message waits in `sent` for its receipt (accepted by a provider with
//! receipts, or its outcome unknown and held for the receipt), but not for ever. The send stage
//! writes each waiting attempt to `receipt_waits` in the statement that records its outcome;
//! the callback stage removes it when the receipt comes, and a sweeper in the callback stage
//! publishes, for each wait past its deadline, a `ReceiptReceived` with status `unknown` and
//! reason `receipt_timeout` — the message ends `unknown` instead of waiting in `sent` for ever
//! (a call cut by a crash that never reached the provider has no receipt to wait for).

use std::time::Duration;

use herald_schemas::{Channel, EventHeader, Reason, ReceiptReceived, topics};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use herald_core::codec::Codec;
use herald_core::db::Db;
use herald_core::runtime::pg_error;
use herald_core::transport::Transport;
use herald_core::util::{event_id, now_ms};
use herald_core::worker::record;

/// The reason code a timed-out wait ends with.
pub const TIMEOUT_CODE: &str = "receipt_timeout";

/// Waits past due handled per round.
const ROUND: i64 = 500;

/// The receipts of these attempts came: they wait no longer. The wait becomes a marker, whether
/// it had started or not (a receipt can overtake the send stage's record of its attempt, and a
/// send batch delivered again records its attempts again): the wait that record would start
/// never starts, so no `receipt_timeout` follows a receipt that came. Markers are swept a day
/// later.
///
/// Answers the attempts whose first receipt this is: a receipt pushed again (a provider's
/// retry, a replay) finds the marker, so it counts once toward the provider's health.
pub async fn received(
    db: &Client,
    keys: &[(&str, i32)],
) -> Result<Vec<(String, i32)>, tokio_postgres::Error> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&str> = keys.iter().map(|k| k.0).collect();
    let attempts: Vec<i32> = keys.iter().map(|k| k.1).collect();
    let rows = db
        .query(
            "INSERT INTO receipt_waits (message_id, attempt, due_at, received)
             SELECT DISTINCT k.m, k.a, now(), true FROM UNNEST($1::text[], $2::int[]) AS k(m, a)
             ON CONFLICT (message_id, attempt) DO UPDATE SET received = true, due_at = now()
             WHERE NOT receipt_waits.received
             RETURNING message_id, attempt",
            &[&ids, &attempts],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Runs the sweeper until `shutdown`: every few seconds, the waits past due end `unknown`.
pub fn spawn_sweeper(
    mut db: Db,
    codec: std::sync::Arc<Codec>,
    transport: std::sync::Arc<dyn Transport>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            let busy = match sweep(&mut db, &codec, transport.as_ref()).await {
                Ok(n) => n as i64 == ROUND,
                Err(e) => {
                    warn!(error = %e, "receipt deadlines not swept; retrying");
                    false
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(if busy { 10 } else { 5_000 })) => {}
            }
        }
    });
}

/// One round: the waits past due (locked, so two callback processes never take the same one)
/// are published as `unknown` receipts, then removed, in one transaction. A crash between the
/// two publishes them again with the same event ids: the same facts.
pub async fn sweep(db: &mut Db, codec: &Codec, transport: &dyn Transport) -> Result<usize, String> {
    db.reconnect_if_closed().await.map_err(|e| e.to_string())?;
    db.execute(
        "DELETE FROM receipt_waits WHERE received AND due_at < now() - interval '1 day'",
        &[],
    )
    .await
    .map_err(pg_error)?;
    let tx = db.transaction().await.map_err(pg_error)?;
    let rows = tx
        .query(
            "SELECT w.message_id, w.attempt, l.provider, l.request_id, l.app_id, l.channel,
                    l.provider_message_id,
                    extract(epoch FROM w.due_at - coalesce(l.finished_at, l.claimed_at))::bigint
             FROM receipt_waits w JOIN send_ledger l USING (message_id, attempt)
             WHERE w.due_at <= now() AND NOT w.received
             ORDER BY w.due_at LIMIT $1
             FOR UPDATE OF w SKIP LOCKED",
            &[&ROUND],
        )
        .await
        .map_err(pg_error)?;
    if rows.is_empty() {
        return Ok(0);
    }
    let now = now_ms();
    let mut records = Vec::with_capacity(rows.len());
    let mut done: Vec<(String, i32)> = Vec::with_capacity(rows.len());
    for r in &rows {
        let message_id: String = r.get(0);
        let attempt: i32 = r.get(1);
        let provider: String = r.get(2);
        let channel: Option<String> = r.get(5);
        let waited: Option<i64> = r.get(7);
        done.push((message_id.clone(), attempt));
        // A row from before channels were kept cannot become an event; it waits no longer.
        let Some(channel) = Channel::ALL
            .into_iter()
            .find(|c| Some(c.as_str()) == channel.as_deref())
        else {
            continue;
        };
        metrics::counter!(herald_core::telemetry::names::RECEIPTS, "provider" => provider.clone(), "result" => "timed_out")
            .increment(1);
        let trace = herald_core::trace::new_root();
        let ev = ReceiptReceived {
            header: EventHeader {
                event_id: event_id(&message_id, "receipt:unknown", attempt),
                event_time: now,
                stage: "callback".into(),
                trace_id: herald_core::trace::trace_id_of(&trace),
                message_id: message_id.clone(),
                request_id: r.get::<_, Option<String>>(3).unwrap_or_default(),
                app_id: r.get::<_, Option<String>>(4).unwrap_or_default(),
                channel,
                attempt,
                metadata: Default::default(),
            },
            provider,
            status: "unknown".into(),
            provider_status_code: TIMEOUT_CODE.into(),
            provider_message_id: r.get(6),
            reason: Some(Reason::new(
                TIMEOUT_CODE,
                format!(
                    "no receipt within {} s of the provider's answer",
                    waited.unwrap_or_default()
                ),
            )),
            reported_at: now,
            decision: None,
        };
        records.push(
            record(codec, topics::RECEIPTS, &message_id, &trace, &ev)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    if !records.is_empty() {
        let publisher = transport.publisher().map_err(|e| e.to_string())?;
        publisher
            .publish(records)
            .await
            .map_err(|e| e.to_string())?;
    }
    let ids: Vec<&str> = done.iter().map(|d| d.0.as_str()).collect();
    let attempts: Vec<i32> = done.iter().map(|d| d.1).collect();
    tx.execute(
        "DELETE FROM receipt_waits w USING UNNEST($1::text[], $2::int[]) AS k(m, a)
         WHERE w.message_id = k.m AND w.attempt = k.a",
        &[&ids, &attempts],
    )
    .await
    .map_err(pg_error)?;
    tx.commit().await.map_err(pg_error)?;
    Ok(rows.len())
}
