//! The in-app inbox (`inbox`): rows the `inapp` provider stores, read and marked read through the
//! API, announced on the `herald_inbox` notification channel as `<app>/<user>`. This module owns
//! the table.

use tokio_postgres::GenericClient;

/// The PostgreSQL notification channel new rows are announced on.
pub const CHANNEL: &str = "herald_inbox";

/// One inbox message.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub message_id: String,
    pub title: Option<String>,
    pub body: Option<String>,
    pub created_ms: i64,
    pub read_ms: Option<i64>,
}

const COLUMNS: &str = "message_id, title, body, (extract(epoch from created_at) * 1000)::bigint,
     (extract(epoch from read_at) * 1000)::bigint";

fn item(r: &tokio_postgres::Row) -> Item {
    Item {
        message_id: r.get(0),
        title: r.get(1),
        body: r.get(2),
        created_ms: r.get(3),
        read_ms: r.get(4),
    }
}

/// Stores a message (idempotent on its id) and announces it to live streams.
pub async fn store(
    db: &impl GenericClient,
    message_id: &str,
    app: &str,
    user: &str,
    title: Option<&str>,
    body: &str,
) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "WITH ins AS (
            INSERT INTO inbox (message_id, app_id, user_id, title, body)
            VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING user_id)
         SELECT pg_notify($6, $2 || '/' || user_id) FROM ins",
        &[&message_id, &app, &user, &title, &body, &CHANNEL],
    )
    .await?;
    Ok(())
}

/// A user's messages before `before` (`(created ms, message id)`), newest first.
pub async fn page(
    db: &impl GenericClient,
    app: &str,
    user: &str,
    unread_only: bool,
    before: (i64, &str),
    limit: i64,
) -> Result<Vec<Item>, tokio_postgres::Error> {
    let rows = db
        .query(
            &format!(
                "SELECT {COLUMNS} FROM inbox
                 WHERE app_id = $1 AND user_id = $2 AND (NOT $3 OR read_at IS NULL)
                   AND ((extract(epoch from created_at) * 1000)::bigint, message_id) < ($4, $5)
                 ORDER BY created_at DESC, message_id DESC LIMIT $6"
            ),
            &[&app, &user, &unread_only, &before.0, &before.1, &limit],
        )
        .await?;
    Ok(rows.iter().map(item).collect())
}

/// A user's messages after `after`, oldest first (what a live stream has not sent yet).
pub async fn newer(
    db: &impl GenericClient,
    app: &str,
    user: &str,
    after: (i64, &str),
    limit: i64,
) -> Result<Vec<Item>, tokio_postgres::Error> {
    let rows = db
        .query(
            &format!(
                "SELECT {COLUMNS} FROM inbox
                 WHERE app_id = $1 AND user_id = $2
                   AND ((extract(epoch from created_at) * 1000)::bigint, message_id) > ($3, $4)
                 ORDER BY created_at, message_id LIMIT $5"
            ),
            &[&app, &user, &after.0, &after.1, &limit],
        )
        .await?;
    Ok(rows.iter().map(item).collect())
}

/// How many of a user's messages are unread.
pub async fn unread(
    db: &impl GenericClient,
    app: &str,
    user: &str,
) -> Result<i64, tokio_postgres::Error> {
    Ok(db
        .query_one(
            "SELECT count(*) FROM inbox WHERE app_id = $1 AND user_id = $2 AND read_at IS NULL",
            &[&app, &user],
        )
        .await?
        .get(0))
}

/// Marks a message read (idempotent); false when the user has no such message.
pub async fn mark_read(
    db: &impl GenericClient,
    app: &str,
    user: &str,
    message_id: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(db
        .execute(
            "UPDATE inbox SET read_at = coalesce(read_at, now())
             WHERE app_id = $1 AND user_id = $2 AND message_id = $3",
            &[&app, &user, &message_id],
        )
        .await?
        > 0)
}

/// Retention (`[retention]`): messages past the inbox window.
pub const PURGE: crate::retention::Purge = crate::retention::Purge {
    table: "inbox",
    third: crate::retention::Third::None,
    days: |r| r.inbox_days,
    sql: "DELETE FROM inbox WHERE ctid IN (
            SELECT ctid FROM inbox
            WHERE created_at < now() - make_interval(days => $2)
            LIMIT $1)",
};
