//! Retention: every table that grows with traffic is purged in small batches by a background
//! task, by the windows in `[retention]`. Each table's owning module defines its [`Purge`]; the
//! projector runs [`DOMAIN_PURGES`], the route and notify stages the purges of their own tables.
//! One process purges a table at a time (a PostgreSQL advisory lock per table), and nothing an
//! unfinished message still needs is touched:
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

/// Advisory lock class (with the table's hash): any constant shared by every Herald process.
const LOCK_KEY: i32 = 0x4852_4554;

/// One purge, defined by the table's owning module: the table and the statement deleting up to
/// `$1` of its expired rows, with the retention window in days as `$2` and, where it says so, a
/// third parameter.
pub struct Purge {
    pub table: &'static str,
    pub days: fn(&RetentionConfig) -> i32,
    pub third: Third,
    pub sql: &'static str,
}

/// The third parameter of a purge.
pub enum Third {
    None,
    /// `$3`: the terminal statuses.
    Terminal,
    /// `$3`: seconds a cancel gate must outlive (the furthest schedule and its expiry).
    GateSlack,
}

/// The purges of the tables owned in this crate, each defined by its owning module. Tables owned
/// by a stage (`policy_hits`) are purged by that stage's own task.
pub const DOMAIN_PURGES: &[Purge] = &[
    crate::ledger::PURGE,
    crate::gate::PURGE,
    crate::readmodel::PURGE,
    crate::idempotency::PURGE,
    crate::inbox::PURGE,
    crate::outbox::PURGE,
    crate::quota::PURGE,
    crate::verification::PURGE,
];

/// Runs rounds of `purges` every `interval_secs` until `shutdown`.
pub fn spawn(
    url: String,
    cfg: RetentionConfig,
    purges: &'static [Purge],
    shutdown: CancellationToken,
) {
    if !cfg.enabled {
        return;
    }
    tokio::spawn(async move {
        loop {
            if let Err(e) = round(&url, &cfg, purges, &shutdown).await {
                warn!(error = %herald_core::runtime::pg_error(e), "retention round failed; next round later");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(cfg.interval_secs.max(1))) => {}
            }
        }
    });
}

/// One round: each table until nothing expired is left (or shutdown). One process purges a
/// table at a time (an advisory lock per table); a table another process is purging is skipped.
pub async fn round(
    url: &str,
    cfg: &RetentionConfig,
    purges: &[Purge],
    shutdown: &CancellationToken,
) -> Result<(), tokio_postgres::Error> {
    let db = herald_core::runtime::connect_postgres(url).await?;
    let terminal: Vec<&str> = TERMINAL.to_vec();
    // Cancel gates outlive the furthest schedule (and that schedule's expiry).
    let gate_slack = (2 * MAX_SCHEDULE_AHEAD_MS / 1000) as f64;
    for p in purges {
        let locked: bool = db
            .query_one(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                &[&LOCK_KEY, &p.table],
            )
            .await?
            .get(0);
        if !locked {
            continue; // another process purges it now
        }
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
        db.execute(
            "SELECT pg_advisory_unlock($1, hashtext($2))",
            &[&LOCK_KEY, &p.table],
        )
        .await?;
        if total > 0 {
            metrics::counter!(herald_core::telemetry::names::ROWS_PURGED, "table" => p.table)
                .increment(total);
            info!(table = p.table, rows = total, "retention purged");
        }
    }
    Ok(())
}
