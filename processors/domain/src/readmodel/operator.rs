//! What the operators' console reads, across apps, as JSON for its pages: the read model
//! (`messages`, `delivery_attempts`, `message_events`) and, read only, the tables other modules
//! of this crate own (`app_usage`, `request_keys`, `provider_health`, `opt_outs`, `templates`,
//! `console_audit`, the outbox's backlog, `intake`). Here, in the crate that owns them, so no
//! other crate names a table it does not own.

use crate::readmodel;
use serde_json::{Value, json};
use tokio_postgres::GenericClient;

type Res<T> = Result<T, tokio_postgres::Error>;

const MESSAGE: &str = "message_id, request_id, app_id, channel, recipient_masked, status, \
    provider, attempts, template, template_version, \
    (extract(epoch from created_at) * 1000)::bigint, latency_ms";

fn message_json(r: &tokio_postgres::Row) -> Value {
    json!({
        "message_id": r.get::<_, String>(0), "request_id": r.get::<_, String>(1),
        "app_id": r.get::<_, String>(2), "channel": r.get::<_, String>(3),
        "recipient": r.get::<_, Option<String>>(4), "status": r.get::<_, String>(5),
        "provider": r.get::<_, Option<String>>(6), "attempts": r.get::<_, i32>(7),
        "template": r.get::<_, Option<String>>(8), "template_version": r.get::<_, Option<i32>>(9),
        "created_ms": r.get::<_, i64>(10), "latency_ms": r.get::<_, Option<i64>>(11),
    })
}

/// Messages matching `q` — a message id, a request id, a recipient address or an idempotency
/// key — or the newest ones when `q` is empty; optionally of one status and channel.
pub async fn search(
    db: &impl GenericClient,
    secret: &str,
    q: &str,
    status: Option<&str>,
    channel: Option<&str>,
    limit: i64,
) -> Res<Vec<Value>> {
    let q = q.trim();
    let rows = if q.is_empty() {
        db.query(
            &format!(
                "SELECT {MESSAGE} FROM messages WHERE ($1::text IS NULL OR status = $1) \
                 AND ($2::text IS NULL OR channel = $2) \
                 ORDER BY created_at DESC, message_id LIMIT $3"
            ),
            &[&status, &channel, &limit],
        )
        .await?
    } else {
        let key = herald_core::util::recipient_key(secret, q);
        db.query(
            &format!(
                "SELECT {MESSAGE} FROM messages WHERE (message_id = $1 OR request_id = $1 \
                   OR recipient_key = $2 \
                   OR request_id IN (SELECT request_id FROM request_keys WHERE key = $1)) \
                 AND ($3::text IS NULL OR status = $3) AND ($4::text IS NULL OR channel = $4) \
                 ORDER BY created_at DESC, message_id LIMIT $5"
            ),
            &[&q, &key, &status, &channel, &limit],
        )
        .await?
    };
    Ok(rows.iter().map(message_json).collect())
}

/// One message with its timeline and attempts.
pub async fn message(db: &impl GenericClient, id: &str) -> Res<Option<Value>> {
    let Some(row) = db
        .query_opt(
            &format!("SELECT {MESSAGE} FROM messages WHERE message_id = $1"),
            &[&id],
        )
        .await?
    else {
        return Ok(None);
    };
    let mut m = message_json(&row);
    let timeline: Vec<Value> = readmodel::timeline(db, id)
        .await?
        .into_iter()
        .map(|e| {
            json!({"status": e.status, "at_ms": e.at_ms, "provider": e.provider,
                   "attempt": e.attempt, "reason_code": e.reason_code,
                   "reason_message": e.reason_message})
        })
        .collect();
    let attempts: Vec<Value> = readmodel::attempts(db, id)
        .await?
        .into_iter()
        .map(|a| {
            json!({"attempt": a.attempt, "provider": a.provider, "outcome": a.outcome,
                   "status": a.status, "response_code": a.response_code,
                   "latency_ms": a.latency_ms, "reason_code": a.reason_code, "at_ms": a.at_ms})
        })
        .collect();
    let cancelable = !(m["status"] == "sent"
        || crate::status::TERMINAL.contains(&m["status"].as_str().unwrap_or("")));
    m["timeline"] = json!(timeline);
    m["delivery_attempts"] = json!(attempts);
    m["cancelable"] = json!(cancelable);
    Ok(Some(m))
}

/// A request: counts per status and its messages (of one status, if given).
pub async fn request(db: &impl GenericClient, id: &str, status: Option<&str>) -> Res<Value> {
    let counts: Vec<Value> = db
        .query(
            "SELECT status, count(*) FROM messages WHERE request_id = $1 GROUP BY status \
             ORDER BY status",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| json!({"status": r.get::<_, String>(0), "count": r.get::<_, i64>(1)}))
        .collect();
    let messages: Vec<Value> = db
        .query(
            &format!(
                "SELECT {MESSAGE} FROM messages WHERE request_id = $1 \
                 AND ($2::text IS NULL OR status = $2) ORDER BY message_id LIMIT 500"
            ),
            &[&id, &status],
        )
        .await?
        .iter()
        .map(message_json)
        .collect();
    let app = messages.first().map(|m| m["app_id"].clone());
    Ok(json!({"request_id": id, "counts": counts, "messages": messages, "app_id": app}))
}

/// Statuses that end a message well, and badly (the terminal success rate's terms).
const SUCCESS: [&str; 1] = ["delivered"];
const FAILURE: [&str; 3] = ["failed", "undelivered", "expired"];

/// The overview of the last `minutes`: counts per status, terminal success rate, latency per
/// channel / provider / template, and a per-minute series per channel.
pub async fn overview(db: &impl GenericClient, minutes: i32) -> Res<Value> {
    let counts: Vec<(String, i64)> = db
        .query(
            "SELECT status, count(*) FROM messages \
             WHERE created_at > now() - make_interval(mins => $1) GROUP BY status ORDER BY status",
            &[&minutes],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let total: i64 = counts.iter().map(|c| c.1).sum();
    let sum = |set: &[&str]| -> i64 {
        counts
            .iter()
            .filter(|c| set.contains(&c.0.as_str()))
            .map(|c| c.1)
            .sum()
    };
    let (ok, bad) = (sum(&SUCCESS), sum(&FAILURE));
    let rate = (ok + bad > 0).then(|| ok as f64 / (ok + bad) as f64);
    let mut groups = serde_json::Map::new();
    for (name, column) in [
        ("channel", "channel"),
        ("provider", "coalesce(provider, '-')"),
        (
            "template",
            "coalesce(template || '@' || template_version, '-')",
        ),
    ] {
        let rows: Vec<Value> = db
            .query(
                &format!(
                    "SELECT {column}, count(*), \
                       count(*) FILTER (WHERE status = 'delivered'), \
                       count(*) FILTER (WHERE status IN ('failed', 'undelivered', 'expired')), \
                       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms), \
                       percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) \
                     FROM messages WHERE created_at > now() - make_interval(mins => $1) \
                     GROUP BY 1 ORDER BY 2 DESC LIMIT 20"
                ),
                &[&minutes],
            )
            .await?
            .iter()
            .map(|r| {
                let (ok, bad): (i64, i64) = (r.get(2), r.get(3));
                json!({"key": r.get::<_, String>(0), "total": r.get::<_, i64>(1),
                       "delivered": ok, "failed": bad,
                       "success_rate": (ok + bad > 0).then(|| ok as f64 / (ok + bad) as f64),
                       "p50_ms": r.get::<_, Option<f64>>(4), "p99_ms": r.get::<_, Option<f64>>(5)})
            })
            .collect();
        groups.insert(name.into(), json!(rows));
    }
    // One point per minute of the window (0 where nothing was created), per channel.
    let rows = db
        .query(
            "SELECT (extract(epoch FROM date_trunc('minute', created_at)))::bigint, channel, \
               count(*) \
             FROM messages WHERE created_at > now() - make_interval(mins => $1) \
             GROUP BY 1, 2 ORDER BY 1",
            &[&minutes],
        )
        .await?;
    let now_min = herald_core::util::now_ms() / 60_000 * 60;
    let start = now_min - i64::from(minutes - 1) * 60;
    let xs: Vec<i64> = (0..i64::from(minutes)).map(|i| start + i * 60).collect();
    let mut series: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for r in &rows {
        let (t, ch, n): (i64, String, i64) = (r.get(0), r.get(1), r.get(2));
        let slot = series.entry(ch).or_insert_with(|| vec![0; xs.len()]);
        if let Ok(i) = usize::try_from((t - start) / 60)
            && i < slot.len()
        {
            slot[i] += n;
        }
    }
    // p99 of the last attempt's provider call per minute, per channel (ms).
    let rows = db
        .query(
            "SELECT (extract(epoch FROM date_trunc('minute', created_at)))::bigint, channel, \
               percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) \
             FROM messages WHERE created_at > now() - make_interval(mins => $1) \
               AND latency_ms IS NOT NULL GROUP BY 1, 2 ORDER BY 1",
            &[&minutes],
        )
        .await?;
    let mut p99: std::collections::BTreeMap<String, Vec<Option<f64>>> = Default::default();
    for r in &rows {
        let (t, ch, v): (i64, String, Option<f64>) = (r.get(0), r.get(1), r.get(2));
        let slot = p99.entry(ch).or_insert_with(|| vec![None; xs.len()]);
        if let Ok(i) = usize::try_from((t - start) / 60)
            && i < slot.len()
        {
            slot[i] = v;
        }
    }
    Ok(json!({
        "minutes": minutes,
        "p99": p99,
        "total": total,
        "counts": counts.iter().map(|(s, n)| json!({"status": s, "count": n})).collect::<Vec<_>>(),
        "success_rate": rate,
        "groups": groups,
        "series": {"x": xs, "channels": series},
    }))
}

/// Breakers per provider (both signals).
pub async fn provider_health(db: &impl GenericClient) -> Res<Vec<Value>> {
    Ok(db
        .query(
            "SELECT provider, open_until > now(), failure_rate, receipts_open_until > now(), \
               receipts_failure_rate, (extract(epoch FROM updated_at) * 1000)::bigint \
             FROM provider_health ORDER BY provider",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            json!({"provider": r.get::<_, String>(0),
                   "open": r.get::<_, Option<bool>>(1).unwrap_or(false),
                   "failure_rate": r.get::<_, f64>(2),
                   "receipts_open": r.get::<_, Option<bool>>(3).unwrap_or(false),
                   "receipts_failure_rate": r.get::<_, f64>(4),
                   "updated_ms": r.get::<_, i64>(5)})
        })
        .collect())
}

/// Attempts per provider and outcome in the last hour, with latency.
pub async fn provider_attempts(db: &impl GenericClient) -> Res<Vec<Value>> {
    Ok(db
        .query(
            "SELECT coalesce(provider, '-'), outcome, count(*), \
               percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms), \
               percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) \
             FROM delivery_attempts WHERE at > now() - interval '1 hour' \
             GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            json!({"provider": r.get::<_, String>(0), "outcome": r.get::<_, String>(1),
                   "count": r.get::<_, i64>(2), "p50_ms": r.get::<_, Option<f64>>(3),
                   "p99_ms": r.get::<_, Option<f64>>(4)})
        })
        .collect())
}

/// Per app: today's usage and the status-webhook backlog (the outbox's own read).
pub async fn app_usage(db: &impl GenericClient) -> Res<Vec<(String, i64, i64, i64)>> {
    let mut rows: Vec<(String, i64, i64, i64)> = db
        .query(
            "SELECT app_id, messages FROM app_usage WHERE day = current_date",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), 0, 0))
        .collect();
    let pending = crate::outbox::pending_by_destination(db, crate::outbox::Kind::Status).await?;
    for (app, due, failing) in pending {
        match rows.iter_mut().find(|r| r.0 == app) {
            Some(r) => (r.2, r.3) = (due, failing),
            None => rows.push((app, 0, due, failing)),
        }
    }
    Ok(rows)
}

pub async fn opt_outs(db: &impl GenericClient, q: &str) -> Res<Vec<Value>> {
    let pattern = format!("%{}%", q.replace(['%', '_'], ""));
    Ok(db
        .query(
            "SELECT app_id, channel, address, (extract(epoch FROM at) * 1000)::bigint \
             FROM opt_outs WHERE address LIKE $1 ORDER BY at DESC LIMIT 200",
            &[&pattern],
        )
        .await?
        .iter()
        .map(|r| {
            json!({"app_id": r.get::<_, String>(0), "channel": r.get::<_, String>(1),
                   "address": r.get::<_, String>(2), "at_ms": r.get::<_, i64>(3)})
        })
        .collect())
}

pub async fn audit(db: &impl GenericClient) -> Res<Vec<Value>> {
    Ok(db
        .query(
            "SELECT (extract(epoch FROM at) * 1000)::bigint, operator, action, target, \
               detail::text FROM console_audit ORDER BY id DESC LIMIT 200",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            json!({"at_ms": r.get::<_, i64>(0), "operator": r.get::<_, String>(1),
                   "action": r.get::<_, String>(2), "target": r.get::<_, String>(3),
                   "detail": r.get::<_, String>(4)})
        })
        .collect())
}

/// Template codes: per (owner, code) the versions stored.
pub async fn template_versions(db: &impl GenericClient, code: &str) -> Res<Vec<Value>> {
    Ok(db
        .query(
            "SELECT app_id, version, body, (extract(epoch FROM created_at) * 1000)::bigint \
             FROM templates WHERE code = $1 ORDER BY app_id, version DESC",
            &[&code],
        )
        .await?
        .iter()
        .map(|r| {
            json!({"app": r.get::<_, String>(0), "version": r.get::<_, i32>(1),
                   "body": r.get::<_, String>(2), "created_ms": r.get::<_, i64>(3)})
        })
        .collect())
}

/// Which app owns the message (`Key::Message`) or request (`Key::Request`) `id`: from the read
/// model, else from `intake` (accepted, not projected yet).
pub async fn owner(
    db: &impl GenericClient,
    key: crate::cancel::Key,
    id: &str,
) -> Res<Option<String>> {
    let (messages, intake) = match key {
        crate::cancel::Key::Message => (
            "SELECT app_id FROM messages WHERE message_id = $1 LIMIT 1",
            "SELECT app_id FROM intake WHERE message_id = $1 LIMIT 1",
        ),
        crate::cancel::Key::Request => (
            "SELECT app_id FROM messages WHERE request_id = $1 LIMIT 1",
            "SELECT app_id FROM intake WHERE request_id = $1 LIMIT 1",
        ),
    };
    if let Some(r) = db.query_opt(messages, &[&id]).await? {
        return Ok(Some(r.get(0)));
    }
    Ok(db.query_opt(intake, &[&id]).await?.map(|r| r.get(0)))
}
