//! Per-app daily message quotas (`apps.daily_quota`), counted atomically in PostgreSQL per UTC
//! day. The gateway counts what it publishes (answering 429) and marks the record with the
//! `herald-quota-counted` header; the accept stage counts everything else (requests published
//! straight to Kafka or Redis), so every request is counted once.

use tokio_postgres::Client;

use herald_core::config::Config;

/// Header on requests the gateway already counted. Its value is a keyed mark of the app and the
/// request id ([`mark`]): an outside producer that copies the header name cannot skip the quota,
/// nor can one copy a mark from another app's request onto its own with the same request id.
pub const COUNTED_HEADER: &str = "herald-quota-counted";

/// The gateway's mark for `app`'s `request_id`: HMAC-SHA256 under the server secret, hex.
pub fn mark(config: &Config, app: &str, request_id: &str) -> Vec<u8> {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(config.security.secret.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(b"quota-counted\0");
    mac.update(app.as_bytes());
    mac.update(b"\0");
    mac.update(request_id.as_bytes());
    hex::encode(mac.finalize().into_bytes()).into_bytes()
}

/// Whether `value` is the gateway's mark for `app`'s `request_id`.
pub fn verify_mark(config: &Config, app: &str, request_id: &str, value: &[u8]) -> bool {
    let want = mark(config, app, request_id);
    std::str::from_utf8(value)
        .is_ok_and(|v| herald_core::sign::ct_eq(v, std::str::from_utf8(&want).unwrap_or_default()))
}

/// Counts `n` messages for `app` today unless that would pass `quota`; true when counted.
/// Either way, the app's usage today is published as a share of its quota
/// ([`herald_core::telemetry::names::QUOTA_USED_RATIO`]).
pub async fn take(
    db: &Client,
    app: &str,
    n: i64,
    quota: i64,
) -> Result<bool, tokio_postgres::Error> {
    let row = if n > quota {
        None
    } else {
        db.query_opt(
            "INSERT INTO app_usage AS u (app_id, day, messages) VALUES ($1, (now() AT TIME ZONE 'UTC')::date, $2)
             ON CONFLICT (app_id, day) DO UPDATE SET messages = u.messages + EXCLUDED.messages
             WHERE u.messages + EXCLUDED.messages <= $3
             RETURNING messages",
            &[&app, &n, &quota],
        )
        .await?
    };
    let used: i64 = match &row {
        Some(r) => r.get(0),
        None => db
            .query_opt(
                "SELECT messages FROM app_usage WHERE app_id = $1 AND day = (now() AT TIME ZONE 'UTC')::date",
                &[&app],
            )
            .await?
            .map_or(0, |r| r.get(0)),
    };
    metrics::gauge!(herald_core::telemetry::names::QUOTA_USED_RATIO, "app" => app.to_owned())
        .set(used as f64 / quota.max(1) as f64);
    Ok(row.is_some())
}

/// Retention (`[retention]`): days past the usage window.
pub const PURGE: crate::retention::Purge = crate::retention::Purge {
    table: "app_usage",
    third: crate::retention::Third::None,
    days: |r| r.usage_days,
    sql: "DELETE FROM app_usage WHERE ctid IN (
            SELECT ctid FROM app_usage
            WHERE day < current_date - $2::int
            LIMIT $1)",
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_vouches_for_one_app_and_one_request() {
        let mut config = Config::default();
        config.security.secret = "a-server-secret-of-some-length".into();
        let m = mark(&config, "shop", "r-1");
        assert!(verify_mark(&config, "shop", "r-1", &m));
        assert!(
            !verify_mark(&config, "other", "r-1", &m),
            "another app's request"
        );
        assert!(!verify_mark(&config, "shop", "r-2", &m), "another request");
        // No confusion where the app ends and the request id begins.
        assert!(!verify_mark(&config, "sho", "pr-1", &m));
    }
}
