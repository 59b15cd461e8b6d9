//! Retention: every table that grows with traffic is purged in small batches by a background
//! task, by the windows in `[retention]`. One process purges at a time (a PostgreSQL advisory
//! lock), and nothing an unfinished message still needs is touched:
//!
//! - the read model (`messages`, `message_events`, `delivery_attempts`): terminal messages only;
//! - the send ledger: only once its message is terminal (a message held for a receipt is not);
//! - cancel gates: only past the furthest a message can be scheduled, so a canceled scheduled
//!   message can never lose its cancel before its time comes;
//! - idempotency keys: past the configured replay window;
//! - outboxes: delivered or given-up rows only.
//!
//! Tables a deployment does not have (a stage it never ran) are skipped.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::status::TERMINAL;
use crate::validate::MAX_SCHEDULE_AHEAD_MS;
use herald_core::config::RetentionConfig;

pub const ROWS_PURGED: &str = "herald_retention_rows_purged_total";

/// Advisory lock key (any constant shared by every Herald process).
const LOCK_KEY: i64 = 0x4845_5241_4c44_5254;

/// One purge: a table and the statement deleting up to `$1` of its expired rows, with the
/// retention window in days as `$2` and, where it says so, a third parameter.
struct Purge {
    table: &'static str,
    days: fn(&RetentionConfig) -> i32,
    third: Third,
    sql: &'static str,
}

/// The third parameter of a purge.
enum Third {
    None,
    /// `$3`: the terminal statuses.
    Terminal,
    /// `$3`: seconds a cancel gate must outlive (the furthest schedule and its expiry).
    GateSlack,
}

fn purges() -> Vec<Purge> {
    vec![
        Purge {
            table: "send_ledger",
            third: Third::Terminal,
            days: |r| r.ledger_days,
            sql: "DELETE FROM send_ledger WHERE ctid IN (
                    SELECT l.ctid FROM send_ledger l
                    WHERE coalesce(l.finished_at, l.started_at, l.claimed_at) < now() - make_interval(days => $2)
                      AND NOT EXISTS (SELECT 1 FROM messages m
                                      WHERE m.message_id = l.message_id AND NOT (m.status = ANY($3)))
                    LIMIT $1)",
        },
        Purge {
            table: "message_gate",
            third: Third::GateSlack,
            days: |r| r.ledger_days,
            sql: "DELETE FROM message_gate WHERE ctid IN (
                    SELECT ctid FROM message_gate
                    WHERE at < now() - make_interval(days => $2) - make_interval(secs => $3)
                     
                    LIMIT $1)",
        },
        Purge {
            table: "messages",
            third: Third::Terminal,
            days: |r| r.messages_days,
            sql: "WITH doomed AS (
                    SELECT message_id FROM messages
                    WHERE status = ANY($3) AND updated_at < now() - make_interval(days => $2)
                    LIMIT $1),
                  e AS (DELETE FROM message_events WHERE message_id IN (SELECT message_id FROM doomed)),
                  a AS (DELETE FROM delivery_attempts WHERE message_id IN (SELECT message_id FROM doomed))
                  DELETE FROM messages WHERE message_id IN (SELECT message_id FROM doomed)",
        },
        Purge {
            table: "request_keys",
            third: Third::None,
            days: |r| r.idempotency_days,
            sql: "DELETE FROM request_keys WHERE ctid IN (
                    SELECT ctid FROM request_keys
                    WHERE at < now() - make_interval(days => $2)
                    LIMIT $1)",
        },
        Purge {
            table: "policy_hits",
            third: Third::None,
            days: |r| r.policy_hits_days,
            sql: "DELETE FROM policy_hits WHERE ctid IN (
                    SELECT ctid FROM policy_hits
                    WHERE at < now() - make_interval(days => $2)
                    LIMIT $1)",
        },
        Purge {
            table: "inbox",
            third: Third::None,
            days: |r| r.inbox_days,
            sql: "DELETE FROM inbox WHERE ctid IN (
                    SELECT ctid FROM inbox
                    WHERE created_at < now() - make_interval(days => $2)
                    LIMIT $1)",
        },
        Purge {
            table: "status_notifications",
            third: Third::None,
            days: |r| r.outbox_days,
            sql: "DELETE FROM status_notifications WHERE ctid IN (
                    SELECT ctid FROM status_notifications
                    WHERE (delivered_at < now() - make_interval(days => $2)
                           OR created_at < now() - make_interval(days => $2 + 2))
                     
                    LIMIT $1)",
        },
        Purge {
            table: "alert_outbox",
            third: Third::None,
            days: |r| r.outbox_days,
            sql: "DELETE FROM alert_outbox WHERE ctid IN (
                    SELECT ctid FROM alert_outbox
                    WHERE (delivered_at < now() - make_interval(days => $2)
                           OR created_at < now() - make_interval(days => $2 + 2))
                     
                    LIMIT $1)",
        },
        Purge {
            table: "app_usage",
            third: Third::None,
            days: |r| r.usage_days,
            sql: "DELETE FROM app_usage WHERE ctid IN (
                    SELECT ctid FROM app_usage
                    WHERE day < current_date - $2::int
                    LIMIT $1)",
        },
    ]
}

/// Runs purge rounds every `interval_secs` until `shutdown`.
pub fn spawn(url: String, cfg: RetentionConfig, shutdown: CancellationToken) {
    if !cfg.enabled {
        return;
    }
    tokio::spawn(async move {
        loop {
            if let Err(e) = round(&url, &cfg, &shutdown).await {
                warn!(error = %herald_core::runtime::pg_error(e), "retention round failed; next round later");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(cfg.interval_secs.max(1))) => {}
            }
        }
    });
}

/// One round: each table until nothing expired is left (or shutdown).
pub async fn round(
    url: &str,
    cfg: &RetentionConfig,
    shutdown: &CancellationToken,
) -> Result<(), tokio_postgres::Error> {
    let db = herald_core::runtime::connect_postgres(url).await?;
    let locked: bool = db
        .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY])
        .await?
        .get(0);
    if !locked {
        return Ok(()); // another process purges now
    }
    let terminal: Vec<&str> = TERMINAL.to_vec();
    // Cancel gates outlive the furthest schedule (and that schedule's expiry).
    let gate_slack = (2 * MAX_SCHEDULE_AHEAD_MS / 1000) as f64;
    for p in purges() {
        let days = (p.days)(cfg);
        let mut total = 0u64;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let n = match p.third {
                Third::None => db.execute(p.sql, &[&cfg.batch_rows, &days]).await,
                Third::Terminal => {
                    db.execute(p.sql, &[&cfg.batch_rows, &days, &terminal])
                        .await
                }
                Third::GateSlack => {
                    db.execute(p.sql, &[&cfg.batch_rows, &days, &gate_slack])
                        .await
                }
            };
            let n = match n {
                Ok(n) => n,
                // A table this deployment never created.
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                    break;
                }
                Err(e) => return Err(e),
            };
            total += n;
            if n < cfg.batch_rows as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if total > 0 {
            metrics::counter!(ROWS_PURGED, "table" => p.table).increment(total);
            info!(table = p.table, rows = total, "retention purged");
        }
    }
    Ok(())
}
