//! Dead device tokens (`dead_device_tokens`): a mobile push token the provider said is gone for
//! good (FCM `UNREGISTERED`, APNs 410 `Unregistered`). Recorded by the send stage after the
//! outcome is in the ledger, read by the route stage (the message is `suppressed`, policy
//! `dead_token`, before any provider is called), listed for the app by the API
//! (`GET /v1/device-tokens/dead`) so it can prune its own records, and revived by the app
//! (`DELETE /v1/device-tokens/dead/{channel}/{token}`) when a token it knows to be alive was
//! marked. This module owns the table.

use std::collections::HashSet;

use tokio_postgres::GenericClient;

/// One token a provider declared dead.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Dead {
    pub app_id: String,
    pub channel: String,
    pub token: String,
    pub provider: String,
    pub reason_code: String,
    pub message_id: String,
    /// Unix ms.
    pub at: i64,
}

/// Records dead tokens (idempotent: a token marked again keeps its first mark's time).
pub async fn mark(db: &impl GenericClient, dead: &[Dead]) -> Result<(), tokio_postgres::Error> {
    if dead.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&Dead) -> &str| dead.iter().map(f).collect::<Vec<&str>>();
    db.execute(
        "INSERT INTO dead_device_tokens (app_id, channel, token, provider, reason_code, message_id)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
         ON CONFLICT DO NOTHING",
        &[
            &col(|d| &d.app_id),
            &col(|d| &d.channel),
            &col(|d| &d.token),
            &col(|d| &d.provider),
            &col(|d| &d.reason_code),
            &col(|d| &d.message_id),
        ],
    )
    .await?;
    Ok(())
}

/// Which of these (app, channel, token) are dead, in one statement.
pub async fn dead(
    db: &impl GenericClient,
    keys: &[(&str, &str, &str)],
) -> Result<HashSet<(String, String, String)>, tokio_postgres::Error> {
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    let apps: Vec<&str> = keys.iter().map(|k| k.0).collect();
    let chans: Vec<&str> = keys.iter().map(|k| k.1).collect();
    let tokens: Vec<&str> = keys.iter().map(|k| k.2).collect();
    Ok(db
        .query(
            "SELECT d.app_id, d.channel, d.token FROM dead_device_tokens d
             JOIN UNNEST($1::text[], $2::text[], $3::text[]) AS q(a, c, t)
               ON d.app_id = q.a AND d.channel = q.c AND d.token = q.t",
            &[&apps, &chans, &tokens],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// An app's dead tokens marked after `since_ms`, oldest first, at most `limit`.
pub async fn list(
    db: &impl GenericClient,
    app: &str,
    since_ms: i64,
    limit: i64,
) -> Result<Vec<Dead>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT app_id, channel, token, provider, reason_code, message_id,
                    (EXTRACT(EPOCH FROM at) * 1000)::bigint
             FROM dead_device_tokens
             WHERE app_id = $1 AND at > to_timestamp($2::bigint / 1000.0)
             ORDER BY at, channel, token LIMIT $3",
            &[&app, &since_ms, &limit],
        )
        .await?
        .iter()
        .map(|r| Dead {
            app_id: r.get(0),
            channel: r.get(1),
            token: r.get(2),
            provider: r.get(3),
            reason_code: r.get(4),
            message_id: r.get(5),
            at: r.get(6),
        })
        .collect())
}

/// Revives a token (the app knows it is alive): sends to it go out again. Whether it was dead.
pub async fn revive(
    db: &impl GenericClient,
    app: &str,
    channel: &str,
    token: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(db
        .execute(
            "DELETE FROM dead_device_tokens WHERE app_id = $1 AND channel = $2 AND token = $3",
            &[&app, &channel, &token],
        )
        .await?
        > 0)
}
