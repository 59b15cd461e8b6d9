//! What the gateway accepted and the projector may not have shown yet (promise: a 202 is true at
//! once). After the broker acknowledged a request, the gateway records its message ids here, so
//! `GET /v1/messages/{id}`, `GET /v1/requests/{id}` and the cancel routes answer `accepted` —
//! and a cancel takes effect through the send gate — before the projector has caught up, from
//! any API process. Rows are only a bridge: the projector's `messages` row wins once it exists,
//! and rows older than [`KEEP`] are purged.

use tokio_postgres::Client;

/// How long a row bridges the gap (the projector is seconds behind at worst in normal running).
pub const KEEP: &str = "1 hour";

/// One accepted message not necessarily projected yet.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub message_id: String,
    pub request_id: String,
    pub channel: String,
    /// Unix ms.
    pub at: i64,
}

/// One published request's messages, for [`record_many`].
pub struct Intake {
    pub app_id: String,
    pub request_id: String,
    pub channel: String,
    pub message_ids: Vec<String>,
}

/// Records many published requests' messages in one statement (the gateway's group commit).
pub async fn record_many(db: &Client, requests: &[Intake]) -> Result<(), tokio_postgres::Error> {
    let (mut ids, mut reqs, mut apps, mut channels) = (vec![], vec![], vec![], vec![]);
    for r in requests {
        for id in &r.message_ids {
            ids.push(id.as_str());
            reqs.push(r.request_id.as_str());
            apps.push(r.app_id.as_str());
            channels.push(r.channel.as_str());
        }
    }
    db.execute(
        "INSERT INTO intake (message_id, request_id, app_id, channel)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
         ON CONFLICT DO NOTHING",
        &[&ids, &reqs, &apps, &channels],
    )
    .await?;
    Ok(())
}

fn row(r: &tokio_postgres::Row) -> Accepted {
    Accepted {
        message_id: r.get(0),
        request_id: r.get(1),
        channel: r.get(2),
        at: r.get(3),
    }
}

const COLUMNS: &str = "message_id, request_id, channel, (extract(epoch from at) * 1000)::bigint";

/// The app's accepted message `id`, if recorded.
pub async fn message(
    db: &Client,
    app_id: &str,
    id: &str,
) -> Result<Option<Accepted>, tokio_postgres::Error> {
    let r = db
        .query_opt(
            &format!("SELECT {COLUMNS} FROM intake WHERE message_id = $1 AND app_id = $2"),
            &[&id, &app_id],
        )
        .await?;
    Ok(r.as_ref().map(row))
}

/// The app's accepted messages of request `id`, in message id order.
pub async fn request(
    db: &Client,
    app_id: &str,
    id: &str,
) -> Result<Vec<Accepted>, tokio_postgres::Error> {
    let rows = db
        .query(
            &format!(
                "SELECT {COLUMNS} FROM intake WHERE app_id = $1 AND request_id = $2 ORDER BY message_id"
            ),
            &[&app_id, &id],
        )
        .await?;
    Ok(rows.iter().map(row).collect())
}

/// Drops rows past [`KEEP`], a bounded number at a time; answers how many went.
pub async fn purge(db: &Client) -> Result<u64, tokio_postgres::Error> {
    db.execute(
        &format!(
            "DELETE FROM intake WHERE message_id IN (
                 SELECT message_id FROM intake WHERE at < now() - interval '{KEEP}' LIMIT 5000)"
        ),
        &[],
    )
    .await
}
