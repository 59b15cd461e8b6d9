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
    /// Unix µs, as stored: the paging cursor's position.
    #[serde(skip)]
    pub at_us: i64,
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

/// Where a page of dead tokens starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// Tokens marked after this Unix ms (the first page; tokens sharing that millisecond with
    /// the last one seen are skipped: page with [`After::Cursor`]).
    Since(i64),
    /// Strictly after this token in the list's order (mark time in µs, channel, token): no
    /// token is skipped or repeated, whatever times they share.
    Cursor {
        at_us: i64,
        channel: String,
        token: String,
    },
}

impl After {
    /// The opaque cursor that continues after `d`: `<at µs>.<channel>.<token as hex>`.
    pub fn cursor_after(d: &Dead) -> String {
        format!("{}.{}.{}", d.at_us, d.channel, hex::encode(&d.token))
    }

    /// Reads a cursor made by [`After::cursor_after`]; `None` when it is not one.
    pub fn parse_cursor(s: &str) -> Option<After> {
        let mut parts = s.splitn(3, '.');
        let at_us = parts.next()?.parse().ok()?;
        let channel = parts.next()?.to_owned();
        let token = String::from_utf8(hex::decode(parts.next()?).ok()?).ok()?;
        Some(After::Cursor {
            at_us,
            channel,
            token,
        })
    }
}

/// An app's dead tokens after `after`, oldest first (by mark time, channel, token), at most
/// `limit`.
pub async fn list(
    db: &impl GenericClient,
    app: &str,
    after: &After,
    limit: i64,
) -> Result<Vec<Dead>, tokio_postgres::Error> {
    const COLUMNS: &str = "SELECT app_id, channel, token, provider, reason_code, message_id,
                    (EXTRACT(EPOCH FROM at) * 1000)::bigint,
                    (EXTRACT(EPOCH FROM at) * 1000000)::bigint
             FROM dead_device_tokens";
    let rows = match after {
        After::Since(ms) => {
            db.query(
                &format!(
                    "{COLUMNS} WHERE app_id = $1 AND at > to_timestamp($2::bigint / 1000.0)
                     ORDER BY at, channel, token LIMIT $3"
                ),
                &[&app, ms, &limit],
            )
            .await?
        }
        After::Cursor {
            at_us,
            channel,
            token,
        } => {
            db.query(
                &format!(
                    "{COLUMNS} WHERE app_id = $1
                       AND (at, channel, token) > (to_timestamp($2::bigint / 1000000.0), $3, $4)
                     ORDER BY at, channel, token LIMIT $5"
                ),
                &[&app, at_us, channel, token, &limit],
            )
            .await?
        }
    };
    Ok(rows
        .iter()
        .map(|r| Dead {
            app_id: r.get(0),
            channel: r.get(1),
            token: r.get(2),
            provider: r.get(3),
            reason_code: r.get(4),
            message_id: r.get(5),
            at: r.get(6),
            at_us: r.get(7),
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
