//! The read model's tables (`messages`, `message_events`, `delivery_attempts`,
//! `projector_offsets`): written by the projector, read by the API, emptied by `herald rebuild`
//! before a replay. Their DDL is the migrations' (`V1__baseline.sql`). This module owns them:
//! [`projection`] turns events into facts and rows (pure), [`write`] writes them, the functions
//! below read them.

pub mod operator;
pub mod projection;
mod write;

pub use write::{positions, write};

use tokio_postgres::GenericClient;

/// Empties the read model in the caller's transaction (`herald rebuild`: the projector then
/// replays every event into it).
pub async fn empty(db: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    db.batch_execute("TRUNCATE messages, message_events, delivery_attempts, projector_offsets")
        .await
}

/// A message's row.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub message_id: String,
    pub request_id: String,
    pub app_id: String,
    pub channel: String,
    /// Masked.
    pub recipient: Option<String>,
    pub status: String,
    pub provider: Option<String>,
    pub attempts: i32,
    pub template: Option<String>,
    pub template_version: Option<i32>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

const MESSAGE: &str = "message_id, request_id, app_id, channel, recipient_masked, status, provider,
    attempts, template, template_version, (extract(epoch from created_at) * 1000)::bigint,
    (extract(epoch from updated_at) * 1000)::bigint";

fn message_row(r: &tokio_postgres::Row) -> Message {
    Message {
        message_id: r.get(0),
        request_id: r.get(1),
        app_id: r.get(2),
        channel: r.get(3),
        recipient: r.get(4),
        status: r.get(5),
        provider: r.get(6),
        attempts: r.get(7),
        template: r.get(8),
        template_version: r.get(9),
        created_ms: r.get(10),
        updated_ms: r.get(11),
    }
}

/// One entry of a message's timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub status: String,
    pub at_ms: i64,
    pub provider: Option<String>,
    pub attempt: i32,
    pub reason_code: Option<String>,
    pub reason_message: Option<String>,
}

/// One delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub attempt: i32,
    pub provider: Option<String>,
    pub outcome: String,
    pub status: String,
    pub response_code: Option<String>,
    pub latency_ms: Option<i64>,
    pub reason_code: Option<String>,
    pub at_ms: i64,
}

/// An app's message by id.
pub async fn message(
    db: &impl GenericClient,
    app: &str,
    id: &str,
) -> Result<Option<Message>, tokio_postgres::Error> {
    Ok(db
        .query_opt(
            &format!("SELECT {MESSAGE} FROM messages WHERE message_id = $1 AND app_id = $2"),
            &[&id, &app],
        )
        .await?
        .as_ref()
        .map(message_row))
}

/// An app's messages of a request, or the one message, for canceling.
pub async fn of_request_or_message(
    db: &impl GenericClient,
    app: &str,
    request_id: Option<&str>,
    message_id: Option<&str>,
) -> Result<Vec<Message>, tokio_postgres::Error> {
    Ok(db
        .query(
            &format!(
                "SELECT {MESSAGE} FROM messages
                 WHERE app_id = $1 AND (request_id = $2 OR message_id = $3)"
            ),
            &[&app, &request_id, &message_id],
        )
        .await?
        .iter()
        .map(message_row)
        .collect())
}

/// A message's timeline, oldest first.
pub async fn timeline(
    db: &impl GenericClient,
    id: &str,
) -> Result<Vec<Event>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT status, (extract(epoch from at) * 1000)::bigint, provider, attempt, reason_code,
                    reason_message
             FROM message_events WHERE message_id = $1 ORDER BY at, status",
            &[&id],
        )
        .await?
        .iter()
        .map(|e| Event {
            status: e.get(0),
            at_ms: e.get(1),
            provider: e.get(2),
            attempt: e.get(3),
            reason_code: e.get(4),
            reason_message: e.get(5),
        })
        .collect())
}

/// A message's delivery attempts, in order.
pub async fn attempts(
    db: &impl GenericClient,
    id: &str,
) -> Result<Vec<Attempt>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT attempt, provider, outcome, status, response_code, latency_ms, reason_code,
                    (extract(epoch from at) * 1000)::bigint
             FROM delivery_attempts WHERE message_id = $1 ORDER BY attempt",
            &[&id],
        )
        .await?
        .iter()
        .map(|a| Attempt {
            attempt: a.get(0),
            provider: a.get(1),
            outcome: a.get(2),
            status: a.get(3),
            response_code: a.get(4),
            latency_ms: a.get(5),
            reason_code: a.get(6),
            at_ms: a.get(7),
        })
        .collect())
}

/// How many of a request's messages are in each status.
pub async fn request_counts(
    db: &impl GenericClient,
    app: &str,
    request_id: &str,
) -> Result<Vec<(String, i64)>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT status, count(*) FROM messages WHERE request_id = $1 AND app_id = $2
             GROUP BY status",
            &[&request_id, &app],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// A request's messages after message id `after`, by message id.
pub async fn request_page(
    db: &impl GenericClient,
    app: &str,
    request_id: &str,
    after: &str,
    limit: i64,
) -> Result<Vec<Message>, tokio_postgres::Error> {
    Ok(db
        .query(
            &format!(
                "SELECT {MESSAGE} FROM messages
                 WHERE request_id = $1 AND app_id = $2 AND message_id > $3
                 ORDER BY message_id LIMIT $4"
            ),
            &[&request_id, &app, &after, &limit],
        )
        .await?
        .iter()
        .map(message_row)
        .collect())
}

/// A recipient's messages (by recipient key) before `before` (`(created ms, message id)`),
/// newest first, optionally of one channel.
pub async fn history(
    db: &impl GenericClient,
    app: &str,
    recipient_key: &str,
    channel: Option<&str>,
    before: (i64, &str),
    limit: i64,
) -> Result<Vec<Message>, tokio_postgres::Error> {
    Ok(db
        .query(
            &format!(
                "SELECT {MESSAGE} FROM messages
                 WHERE app_id = $1 AND recipient_key = $2 AND ($3::text IS NULL OR channel = $3)
                   AND ((extract(epoch from created_at) * 1000)::bigint, message_id) < ($4, $5)
                 ORDER BY created_at DESC, message_id DESC LIMIT $6"
            ),
            &[&app, &recipient_key, &channel, &before.0, &before.1, &limit],
        )
        .await?
        .iter()
        .map(message_row)
        .collect())
}

/// What statistics are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Channel,
    Provider,
    Template,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<GroupBy> {
        Some(match s {
            "channel" => GroupBy::Channel,
            "provider" => GroupBy::Provider,
            "template" => GroupBy::Template,
            _ => return None,
        })
    }

    fn column(self) -> &'static str {
        match self {
            GroupBy::Channel => "channel",
            GroupBy::Provider => "coalesce(provider, '')",
            GroupBy::Template => "coalesce(template, '')",
        }
    }
}

/// Volume, outcomes and provider-call latency of one group.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub key: String,
    pub total: i64,
    pub delivered: i64,
    pub failed: i64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// Statistics of an app's messages created in `[from_ms, to_ms)`.
pub async fn stats(
    db: &impl GenericClient,
    app: &str,
    group_by: GroupBy,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<Stats>, tokio_postgres::Error> {
    let column = group_by.column();
    Ok(db
        .query(
            &format!(
                "SELECT {column} AS k, count(*),
                        count(*) FILTER (WHERE status = 'delivered'),
                        count(*) FILTER (WHERE status IN ('failed', 'undelivered')),
                        percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms)::float8,
                        percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms)::float8
                 FROM messages
                 WHERE app_id = $1 AND created_at >= to_timestamp($2::float8 / 1000.0)
                   AND created_at < to_timestamp($3::float8 / 1000.0)
                 GROUP BY k ORDER BY k"
            ),
            &[&app, &(from_ms as f64), &(to_ms as f64)],
        )
        .await?
        .iter()
        .map(|r| Stats {
            key: r.get(0),
            total: r.get(1),
            delivered: r.get(2),
            failed: r.get(3),
            p50_ms: r.get(4),
            p99_ms: r.get(5),
        })
        .collect())
}

/// Retention (`[retention]`): terminal messages past the window, with their timeline and attempts.
pub const PURGE: crate::retention::Purge = crate::retention::Purge {
    table: "messages",
    third: crate::retention::Third::Terminal,
    days: |r| r.messages_days,
    sql: "WITH doomed AS (
            SELECT message_id FROM messages
            WHERE status = ANY($3) AND updated_at < now() - make_interval(days => $2)
            LIMIT $1),
          e AS (DELETE FROM message_events WHERE message_id IN (SELECT message_id FROM doomed)),
          a AS (DELETE FROM delivery_attempts WHERE message_id IN (SELECT message_id FROM doomed))
          DELETE FROM messages WHERE message_id IN (SELECT message_id FROM doomed)",
};
