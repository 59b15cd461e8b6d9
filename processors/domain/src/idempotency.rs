//! Request deduplication (CONTRACT.md §1: replaying the same `request_id`, or the same
//! `idempotency_key` for the app, creates nothing new). Keys live in PostgreSQL:
//! `rid:<request_id>` is owned by the input position (topic/partition/offset or stream entry)
//! that first carried it, so a *redelivery* of that same record (after a crash, before the
//! transaction committed) is processed again, while a *replay* (the same request published
//! again) is a duplicate; `idem:<key>` is owned by the first request id that used it. The HTTP
//! gateway reserves `idem:` keys before publishing, so a retried POST answers the original
//! request instead of publishing a second one.

use std::collections::HashMap;

use tokio_postgres::Client;

/// One request to check: its app, request id, optional idempotency key, and input position.
pub struct Seen<'a> {
    pub app_id: &'a str,
    pub request_id: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub source: String,
}

/// Registers the requests' keys; answers, per request, whether it is a duplicate.
pub async fn check(db: &Client, reqs: &[Seen<'_>]) -> Result<Vec<bool>, tokio_postgres::Error> {
    let mut apps = Vec::new();
    let mut keys = Vec::new();
    let mut rids = Vec::new();
    let mut sources = Vec::new();
    for r in reqs {
        apps.push(r.app_id);
        keys.push(format!("rid:{}", r.request_id));
        rids.push(r.request_id);
        sources.push(r.source.as_str());
        if let Some(k) = r.idempotency_key {
            apps.push(r.app_id);
            keys.push(format!("idem:{k}"));
            rids.push(r.request_id);
            sources.push(r.source.as_str());
        }
    }
    db.execute(
        "INSERT INTO request_keys (app_id, key, request_id, source)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[])
         ON CONFLICT DO NOTHING",
        &[&apps, &keys, &rids, &sources],
    )
    .await?;
    // A gateway reservation whose request accept now takes holds for good (no takeover).
    if reqs.iter().any(|r| r.idempotency_key.is_some()) {
        db.execute(
            "UPDATE request_keys k SET source = 'api'
         FROM UNNEST($1::text[], $2::text[], $3::text[]) AS q(a, k2, r)
         WHERE k.app_id = q.a AND k.key = q.k2 AND k.request_id = q.r AND k.source = 'api-pending'",
            &[&apps, &keys, &rids],
        )
        .await?;
    }
    let rows = db
        .query(
            "SELECT k.app_id, k.key, k.request_id, k.source FROM request_keys k
             JOIN UNNEST($1::text[], $2::text[]) AS q(a, k2) ON k.app_id = q.a AND k.key = q.k2",
            &[&apps, &keys],
        )
        .await?;
    let owners: HashMap<(String, String), (String, String)> = rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect();
    Ok(reqs
        .iter()
        .map(|r| {
            let rid = owners.get(&(r.app_id.to_owned(), format!("rid:{}", r.request_id)));
            let replayed = rid.is_some_and(|(_, src)| *src != r.source);
            let idem_taken = r.idempotency_key.is_some_and(|k| {
                owners
                    .get(&(r.app_id.to_owned(), format!("idem:{k}")))
                    .is_some_and(|(owner, _)| owner != r.request_id)
            });
            replayed || idem_taken
        })
        .collect())
}

/// How long a gateway reservation waits for its publish before another request may take it
/// over (a process that died between reserving and publishing leaves nothing reserved for good).
pub const PENDING_SECS: f64 = 60.0;

/// Gateway: reserves `idem:<key>` for `request_id` (pending until [`confirm`]); answers the
/// request id that owns it (the given one when newly reserved, or taken over from a reservation
/// whose publish never came).
pub async fn reserve(
    db: &Client,
    app_id: &str,
    key: &str,
    request_id: &str,
) -> Result<String, tokio_postgres::Error> {
    let k = format!("idem:{key}");
    let row = db
        .query_one(
            "WITH claimed AS (
                 INSERT INTO request_keys AS r (app_id, key, request_id, source)
                 VALUES ($1, $2, $3, 'api-pending')
                 ON CONFLICT (app_id, key) DO UPDATE SET request_id = EXCLUDED.request_id, at = now()
                 WHERE r.source = 'api-pending' AND r.at < now() - make_interval(secs => $4)
                 RETURNING request_id)
             SELECT request_id FROM claimed
             UNION ALL
             SELECT request_id FROM request_keys WHERE app_id = $1 AND key = $2
             LIMIT 1",
            &[&app_id, &k, &request_id, &PENDING_SECS],
        )
        .await?;
    Ok(row.get(0))
}

/// Gateway: the request was published; its reservation holds for good.
pub async fn confirm(
    db: &Client,
    app_id: &str,
    key: &str,
    request_id: &str,
) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "UPDATE request_keys SET source = 'api' WHERE app_id = $1 AND key = $2 AND request_id = $3
         AND source = 'api-pending'",
        &[&app_id, &format!("idem:{key}"), &request_id],
    )
    .await?;
    Ok(())
}

/// Gateway: gives a reservation back when the request could not be published.
pub async fn release(
    db: &Client,
    app_id: &str,
    key: &str,
    request_id: &str,
) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "DELETE FROM request_keys WHERE app_id = $1 AND key = $2 AND request_id = $3
         AND source IN ('api', 'api-pending')",
        &[&app_id, &format!("idem:{key}"), &request_id],
    )
    .await?;
    Ok(())
}

/// Retention (`[retention]`): keys past the replay window.
pub const PURGE: crate::retention::Purge = crate::retention::Purge {
    table: "request_keys",
    third: crate::retention::Third::None,
    days: |r| r.idempotency_days,
    sql: "DELETE FROM request_keys WHERE ctid IN (
            SELECT ctid FROM request_keys
            WHERE at < now() - make_interval(days => $2)
            LIMIT $1)",
};
