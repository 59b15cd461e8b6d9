//! Receiver history and stats (CONTRACT.md §2): `GET /v1/recipients/{address}/messages` and
//! `GET /v1/stats`, read from the projector's `messages` table. Addresses are never stored: the
//! history is found by the address's SHA-256.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use herald_core::util::recipient_key;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{ApiError, ApiState, authenticate, db_err};

#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    #[serde(default)]
    pub cursor: Option<String>,
    #[serde(default)]
    pub limit: Option<i64>,
    #[serde(default)]
    pub channel: Option<String>,
}

/// `GET /v1/recipients/{address}/messages`: newest first, `cursor` = `<created_ms>:<message_id>`.
pub async fn history(
    State(state): State<Arc<ApiState>>,
    Path(address): Path<String>,
    Query(q): Query<HistoryQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let app = authenticate(&state, &method, &uri, &headers, b"").await?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_limit",
            "limit must be 1 to 500",
        )
        .field("limit"));
    }
    let (cur_ms, cur_id) = crate::parse_cursor(q.cursor.as_deref())?;
    let channel = q.channel.map(|c| c.to_ascii_lowercase());
    let rows = state
        .db()
        .await
        .map_err(db_err)?
        .query(
            "SELECT message_id, request_id, channel, status, provider, template, recipient_masked,
                    (extract(epoch from created_at) * 1000)::bigint AS c, (extract(epoch from updated_at) * 1000)::bigint
             FROM messages
             WHERE app_id = $1 AND recipient_key = $2 AND ($3::text IS NULL OR channel = $3)
               AND ((extract(epoch from created_at) * 1000)::bigint, message_id) < ($4, $5)
             ORDER BY created_at DESC, message_id DESC LIMIT $6",
            &[&app, &recipient_key(&state.deps.config.security.secret, &address), &channel, &cur_ms, &cur_id, &(limit + 1)],
        )
        .await
        .map_err(db_err)?;
    let more = rows.len() as i64 > limit;
    let messages: Vec<Value> = rows
        .iter()
        .take(limit as usize)
        .map(|r| {
            json!({
                "message_id": r.get::<_, String>(0), "request_id": r.get::<_, String>(1),
                "channel": r.get::<_, String>(2), "status": r.get::<_, String>(3),
                "provider": r.get::<_, Option<String>>(4), "template": r.get::<_, Option<String>>(5),
                "recipient": r.get::<_, Option<String>>(6),
                "created_at": r.get::<_, i64>(7), "updated_at": r.get::<_, i64>(8),
            })
        })
        .collect();
    let next = more
        .then(|| {
            messages.last().map(|m| {
                format!(
                    "{}:{}",
                    m["created_at"],
                    m["message_id"].as_str().unwrap_or_default()
                )
            })
        })
        .flatten();
    Ok(Json(json!({"messages": messages, "next_cursor": next})).into_response())
}

#[derive(Debug, Deserialize)]
pub struct StatsQuery {
    /// Unix milliseconds or RFC 3339; default: 24 h before `to`.
    #[serde(default)]
    pub from: Option<String>,
    /// Unix milliseconds or RFC 3339; default: now.
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub group_by: Option<String>,
}

fn instant(s: &str, field: &str) -> Result<i64, ApiError> {
    s.parse::<i64>()
        .ok()
        .or_else(|| {
            s.parse::<jiff::Timestamp>()
                .ok()
                .map(|t| t.as_millisecond())
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_time",
                format!("{field}: Unix ms or RFC 3339"),
            )
            .field(field.to_owned())
        })
}

/// `GET /v1/stats?from=&to=&group_by=channel|provider|template`: volume, success rate and
/// provider-call latency percentiles of the app's messages created in the range.
pub async fn stats(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<StatsQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let app = authenticate(&state, &method, &uri, &headers, b"").await?;
    let to = match &q.to {
        Some(t) => instant(t, "to")?,
        None => herald_core::util::now_ms(),
    };
    let from = match &q.from {
        Some(f) => instant(f, "from")?,
        None => to - 86_400_000,
    };
    if from > to {
        return Err(
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_range", "from is after to")
                .field("from"),
        );
    }
    let column = match q.group_by.as_deref().unwrap_or("channel") {
        "channel" => "channel",
        "provider" => "coalesce(provider, '')",
        "template" => "coalesce(template, '')",
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_group_by",
                format!("group_by {other:?}: channel, provider or template"),
            )
            .field("group_by"));
        }
    };
    let rows = state
        .db()
        .await
        .map_err(db_err)?
        .query(
            &format!(
                "SELECT {column} AS k, count(*),
                        count(*) FILTER (WHERE status = 'delivered'),
                        count(*) FILTER (WHERE status IN ('failed', 'undelivered')),
                        percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms)::float8,
                        percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms)::float8
                 FROM messages
                 WHERE app_id = $1 AND created_at >= to_timestamp($2::float8 / 1000.0) AND created_at < to_timestamp($3::float8 / 1000.0)
                 GROUP BY k ORDER BY k"
            ),
            &[&app, &(from as f64), &(to as f64)],
        )
        .await
        .map_err(db_err)?;
    let out: Vec<Value> = rows
        .iter()
        .map(|r| {
            let total: i64 = r.get(1);
            let delivered: i64 = r.get(2);
            json!({
                "key": r.get::<_, String>(0),
                "total": total,
                "delivered": delivered,
                "failed": r.get::<_, i64>(3),
                "success_rate": if total > 0 { delivered as f64 / total as f64 } else { 0.0 },
                "p50_ms": r.get::<_, Option<f64>>(4),
                "p99_ms": r.get::<_, Option<f64>>(5),
            })
        })
        .collect();
    Ok(Json(json!({"from": from, "to": to, "group_by": q.group_by.unwrap_or_else(|| "channel".into()), "rows": out})).into_response())
}
