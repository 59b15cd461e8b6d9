//! The signed-webhook outbox (`webhook_outbox`): a side call (an operator alert, an app's status
//! webhook) is written here in the batch that decided it, and posted later by a dispatcher, so
//! an endpoint that is slow or down never slows the stage that decided it.
//!
//! One table and one dispatcher for every [`Kind`]. A row names its destination (an alert
//! rule, an app), never its URL or secret: both are looked up in the configuration when the row
//! is posted, so a rule or app whose URL changed is posted to its new URL, and a secret never
//! sits in a table. Rows are claimed with a lease (`FOR UPDATE SKIP LOCKED`, then
//! `next_attempt_at` moved past the post's timeout), so every process that runs a dispatcher
//! can run one and no two post the same row at once; a row is posted, signed (Standard
//! Webhooks, its stable `webhook-id` lets a receiver drop a retry it already took), and either
//! marked delivered or moved on by back-off (2 s, 4 s … up to 10 min) until it is given up
//! after 24 h. At least once: a row posted whose result could not be recorded (PostgreSQL
//! went away mid-round) is posted again when its lease ends. Enqueuing twice keeps the first row (`ON CONFLICT DO NOTHING`): a batch
//! processed again adds nothing, and a message's first terminal status is its only one.
//!
//! - Owns: `webhook_outbox`. Metrics: [`names::OUTBOX_BACKLOG`] per kind, and each kind's own
//!   counter of results.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::telemetry::names;
use herald_core::util::{now_ms, standard_webhook_signature};
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How often a dispatcher counts its backlog.
pub const BACKLOG_INTERVAL: Duration = Duration::from_secs(10);
/// How long a row is retried before it is given up (and counted).
pub const GIVE_UP_AFTER_SECS: i64 = 86_400;
/// Rows claimed per round.
const ROUND: i64 = 100;

/// What an outbox row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An `alert` rule's alert; the destination is the rule's name.
    Alert,
    /// An app's status webhook (CONTRACT.md §3); the destination is the app's id.
    Status,
}

impl Kind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Alert => "alert",
            Kind::Status => "status",
        }
    }

    /// The `outbox` label of [`names::OUTBOX_BACKLOG`] (the names dashboards already use).
    const fn backlog_label(self) -> &'static str {
        match self {
            Kind::Alert => "alert_outbox",
            Kind::Status => "status_notifications",
        }
    }

    /// The counter of posting results, and the result label of a post that was taken.
    const fn counter(self) -> (&'static str, &'static str) {
        match self {
            Kind::Alert => (names::ALERTS, "sent"),
            Kind::Status => (names::STATUS_WEBHOOKS, "delivered"),
        }
    }
}

/// One row to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The `webhook-id`: stable, so the same fact enqueued twice is one row.
    pub id: String,
    /// The alert rule or app it goes to.
    pub destination: String,
    /// The JSON body.
    pub payload: String,
}

/// Writes `rows` of `kind` (one statement; rows already there are left as they are). The
/// number of rows written.
pub async fn enqueue(
    db: &impl GenericClient,
    kind: Kind,
    rows: &[Row],
) -> Result<u64, tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let to: Vec<&str> = rows.iter().map(|r| r.destination.as_str()).collect();
    let payloads: Vec<&str> = rows.iter().map(|r| r.payload.as_str()).collect();
    db.execute(
        "INSERT INTO webhook_outbox (kind, id, destination, payload)
         SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[])
         ON CONFLICT (kind, id) DO NOTHING",
        &[&kind.as_str(), &ids, &to, &payloads],
    )
    .await
}

/// Where a destination's rows go: its URL and the key they are signed with.
#[derive(Clone)]
pub struct Endpoint {
    pub url: String,
    pub key: Vec<u8>,
}

/// Posts one kind's rows.
#[derive(Clone)]
pub struct Dispatcher {
    kind: Kind,
    /// By destination, from the configuration; a destination not here is no longer configured.
    endpoints: Arc<HashMap<String, Endpoint>>,
    http: reqwest::Client,
    /// A claimed row is not claimed again for this long (longer than a post can take).
    lease: Duration,
}

impl Dispatcher {
    /// A dispatcher of `kind` posting through the outbound guard, each post bounded by
    /// `timeout`; or why its HTTP client cannot be built (never a client without the guard or
    /// the timeout: the lease relies on the one, the allow-list on the other).
    pub fn new(
        kind: Kind,
        endpoints: HashMap<String, Endpoint>,
        guard: &herald_core::netguard::Guard,
        timeout: Duration,
    ) -> Result<Dispatcher, String> {
        let http = guard
            .client(reqwest::Client::builder().timeout(timeout))
            .build()
            .map_err(|e| format!("{} outbox HTTP client: {e}", kind.as_str()))?;
        Ok(Dispatcher {
            kind,
            endpoints: Arc::new(endpoints),
            http,
            lease: timeout * 6,
        })
    }

    /// Posts due rows until `shutdown`.
    pub fn spawn(self, mut db: herald_core::db::Db, shutdown: CancellationToken) {
        tokio::spawn(async move {
            let mut counted: Option<Instant> = None;
            loop {
                let busy = match self.round(&mut db, &mut counted).await {
                    Ok(n) => n > 0,
                    Err(e) => {
                        warn!(outbox = self.kind.as_str(), error = %e, "outbox unreachable");
                        false
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(if busy { 10 } else { 500 })) => {}
                }
            }
        });
    }

    /// One round: claims what is due, posts it, records each result. The number of rows tried.
    async fn round(
        &self,
        db: &mut herald_core::db::Db,
        counted: &mut Option<Instant>,
    ) -> Result<usize, herald_core::db::PoolFailure> {
        db.reconnect_if_closed().await?;
        if counted.is_none_or(|t| t.elapsed() >= BACKLOG_INTERVAL) {
            *counted = Some(Instant::now());
            let n: i64 = db
                .query_one(
                    "SELECT count(*) FROM webhook_outbox WHERE kind = $1 AND delivered_at IS NULL",
                    &[&self.kind.as_str()],
                )
                .await?
                .get(0);
            metrics::gauge!(names::OUTBOX_BACKLOG, "outbox" => self.kind.backlog_label())
                .set(n as f64);
        }
        let lease = self.lease.as_secs_f64();
        let rows = db
            .query(
                "UPDATE webhook_outbox o SET next_attempt_at = now() + make_interval(secs => $2)
                 FROM (SELECT kind, id FROM webhook_outbox
                       WHERE kind = $1 AND delivered_at IS NULL AND next_attempt_at <= now()
                       ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED) due
                 WHERE o.kind = due.kind AND o.id = due.id
                 RETURNING o.id, o.destination, o.payload, o.attempts,
                           extract(epoch from now() - o.created_at)::bigint",
                &[&self.kind.as_str(), &lease, &ROUND],
            )
            .await?;
        let posts = rows.iter().map(|r| {
            let (id, to, payload): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            let (attempts, age): (i32, i64) = (r.get(3), r.get(4));
            async move {
                let posted = match self.endpoints.get(&to) {
                    None => Err(format!("{to:?} is no longer configured")),
                    Some(e) => post(&self.http, e, &id, payload).await,
                };
                (id, posted, attempts, age)
            }
        });
        let n = rows.len();
        let (counter, taken) = self.kind.counter();
        for (id, posted, attempts, age) in futures::future::join_all(posts).await {
            let (result, next, error) = match posted {
                Ok(()) => (taken, None, None),
                Err(e) => {
                    warn!(outbox = self.kind.as_str(), %id, error = %e, attempts, "webhook not delivered");
                    match backoff(attempts, age) {
                        Some(secs) => ("retry", Some(secs), Some(e)),
                        None => ("given_up", Some(GIVEN_UP_SECS), Some(e)),
                    }
                }
            };
            metrics::counter!(counter, "result" => result).increment(1);
            db.execute(
                "UPDATE webhook_outbox SET attempts = attempts + 1, last_error = $3,
                        delivered_at = CASE WHEN $4::float8 IS NULL THEN now() END,
                        next_attempt_at = now() + make_interval(secs => coalesce($4::float8, 0))
                 WHERE kind = $1 AND id = $2",
                &[&self.kind.as_str(), &id, &error, &next],
            )
            .await?;
        }
        Ok(n)
    }
}

/// A given-up row is never due again (retention removes it).
const GIVEN_UP_SECS: f64 = 10.0 * 365.0 * 86_400.0;

/// Seconds until the next try of a row tried `attempts` times before, `age_secs` old; `None`
/// when it is given up.
pub fn backoff(attempts: i32, age_secs: i64) -> Option<f64> {
    (age_secs <= GIVE_UP_AFTER_SECS).then(|| (2f64 * 2f64.powi(attempts.clamp(0, 9))).min(600.0))
}

async fn post(
    http: &reqwest::Client,
    to: &Endpoint,
    id: &str,
    payload: String,
) -> Result<(), String> {
    let ts = now_ms() / 1000;
    let sig = standard_webhook_signature(&to.key, id, ts, payload.as_bytes());
    let resp = http
        .post(&to.url)
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(payload)
        .send()
        .await
        // Never the URL: it may carry a token.
        .map_err(|e| e.without_url().to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", resp.status()))
    }
}

/// Undelivered rows by destination, for `kind`: (destination, due now or later, failing — tried
/// at least once).
pub async fn pending_by_destination(
    db: &impl GenericClient,
    kind: Kind,
) -> Result<Vec<(String, i64, i64)>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT destination, count(*), count(*) FILTER (WHERE attempts > 0)
             FROM webhook_outbox WHERE kind = $1 AND delivered_at IS NULL
             GROUP BY destination",
            &[&kind.as_str()],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Retention (`[retention]`): delivered or given-up rows only.
pub const PURGE: crate::retention::Purge = crate::retention::Purge {
    table: "webhook_outbox",
    third: crate::retention::Third::None,
    days: |r| r.outbox_days,
    sql: "DELETE FROM webhook_outbox WHERE ctid IN (
            SELECT ctid FROM webhook_outbox
            WHERE (delivered_at < now() - make_interval(days => $2)
                   OR created_at < now() - make_interval(days => $2 + 2))
            LIMIT $1)",
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_ten_minutes_and_gives_up_after_a_day() {
        assert_eq!(backoff(0, 0), Some(2.0));
        assert_eq!(backoff(1, 10), Some(4.0));
        assert_eq!(backoff(8, 10), Some(512.0));
        assert_eq!(backoff(9, 10), Some(600.0));
        assert_eq!(backoff(1000, 10), Some(600.0));
        assert_eq!(backoff(-5, 10), Some(2.0));
        assert_eq!(backoff(3, GIVE_UP_AFTER_SECS), Some(16.0));
        assert_eq!(backoff(3, GIVE_UP_AFTER_SECS + 1), None);
    }
}
