//! The send gate: one row per message in PostgreSQL decides, atomically, between a cancel and
//! the first provider call. `POST …/cancel` inserts `canceled`; the send stage inserts `sending`
//! right before claiming a message's first attempt. Whichever comes first wins the primary key:
//! a canceled message is never sent, and a cancel after sending began answers 409 — no window in
//! between. The route stage reads the gate too, so canceled messages (also those waiting in the
//! delay tier) are dropped before they are routed.

use std::collections::HashSet;

use tokio_postgres::Client;

/// The outcome of a cancel for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// Canceled now, or already canceled before.
    Canceled,
    /// Sending had begun.
    TooLate,
}

/// Cancels messages that have not started sending.
pub async fn cancel(db: &Client, ids: &[String]) -> Result<Vec<Cancel>, tokio_postgres::Error> {
    db.execute(
        "INSERT INTO message_gate (message_id, state)
         SELECT unnest($1::text[]), 'canceled' ON CONFLICT DO NOTHING",
        &[&ids],
    )
    .await?;
    let canceled = states(db, ids, "canceled").await?;
    Ok(ids
        .iter()
        .map(|id| {
            if canceled.contains(id) {
                Cancel::Canceled
            } else {
                Cancel::TooLate
            }
        })
        .collect())
}

async fn states(
    db: &Client,
    ids: &[String],
    state: &str,
) -> Result<HashSet<String>, tokio_postgres::Error> {
    let rows = db
        .query(
            "SELECT message_id FROM message_gate WHERE message_id = ANY($1) AND state = $2",
            &[&ids, &state],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The canceled ones among `ids` (read only).
pub async fn canceled(
    db: &Client,
    ids: &[String],
) -> Result<HashSet<String>, tokio_postgres::Error> {
    states(db, ids, "canceled").await
}

/// Marks `ids` as sending unless canceled first; answers the canceled ones (not to be sent).
pub async fn open_for_sending(
    db: &Client,
    ids: &[String],
) -> Result<HashSet<String>, tokio_postgres::Error> {
    db.execute(
        "INSERT INTO message_gate (message_id, state)
         SELECT unnest($1::text[]), 'sending' ON CONFLICT DO NOTHING",
        &[&ids],
    )
    .await?;
    canceled(db, ids).await
}

/// Retention (`[retention]`): a gate only past the furthest a message can be scheduled (and that schedule's expiry), so a canceled scheduled message never loses its cancel before its time.
pub const PURGE: crate::retention::Purge = crate::retention::Purge {
    table: "message_gate",
    third: crate::retention::Third::GateSlack,
    days: |r| r.ledger_days,
    sql: "DELETE FROM message_gate WHERE ctid IN (
            SELECT ctid FROM message_gate
            WHERE at < now() - make_interval(days => $2) - make_interval(secs => $3)
             
            LIMIT $1)",
};
