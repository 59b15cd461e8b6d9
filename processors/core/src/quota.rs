//! Per-app daily message quotas (`apps.daily_quota`), counted atomically in PostgreSQL per UTC
//! day. The gateway counts what it publishes (answering 429) and marks the record with the
//! `herald-quota-counted` header; the accept stage counts everything else (requests published
//! straight to Kafka or Redis), so every request is counted once.

use tokio_postgres::Client;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS app_usage (
    app_id text NOT NULL,
    day date NOT NULL,
    messages bigint NOT NULL,
    PRIMARY KEY (app_id, day)
)";

/// Header on requests the gateway already counted.
pub const COUNTED_HEADER: &str = "herald-quota-counted";

/// Counts `n` messages for `app` today unless that would pass `quota`; true when counted.
pub async fn take(
    db: &Client,
    app: &str,
    n: i64,
    quota: i64,
) -> Result<bool, tokio_postgres::Error> {
    if n > quota {
        return Ok(false);
    }
    let row = db
        .query_opt(
            "INSERT INTO app_usage AS u (app_id, day, messages) VALUES ($1, (now() AT TIME ZONE 'UTC')::date, $2)
             ON CONFLICT (app_id, day) DO UPDATE SET messages = u.messages + EXCLUDED.messages
             WHERE u.messages + EXCLUDED.messages <= $3
             RETURNING messages",
            &[&app, &n, &quota],
        )
        .await?;
    Ok(row.is_some())
}
