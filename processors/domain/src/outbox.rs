//! Outbox backlogs as a metric ([`names::OUTBOX_BACKLOG`]): rows not yet delivered, counted by
//! each dispatcher at most every [`INTERVAL`] (the outboxes' partial indexes on undelivered rows
//! keep the count cheap).

use std::time::{Duration, Instant};

use herald_core::telemetry::names;
use tokio_postgres::GenericClient;

/// How often a dispatcher counts its outbox.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// One outbox's backlog reporter.
pub struct Backlog {
    /// The outbox table (a name from code, never from input).
    table: &'static str,
    last: Option<Instant>,
}

impl Backlog {
    pub const fn new(table: &'static str) -> Backlog {
        Backlog { table, last: None }
    }

    /// Counts the undelivered rows when [`INTERVAL`] has passed since the last count. A failed
    /// count is left to the dispatcher's own error handling (its next query fails the same way).
    pub async fn report(&mut self, db: &impl GenericClient) {
        if self.last.is_some_and(|t| t.elapsed() < INTERVAL) {
            return;
        }
        self.last = Some(Instant::now());
        let sql = format!(
            "SELECT count(*) FROM {} WHERE delivered_at IS NULL",
            self.table
        );
        if let Ok(row) = db.query_one(&sql, &[]).await {
            let n: i64 = row.get(0);
            metrics::gauge!(names::OUTBOX_BACKLOG, "outbox" => self.table).set(n as f64);
        }
    }
}
