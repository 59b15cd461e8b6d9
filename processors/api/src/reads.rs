//! Receiver history and stats (CONTRACT.md §2): `GET /v1/recipients/{address}/messages` and
//! `GET /v1/stats`, read from the projector's `messages` table. Addresses are never stored: the
//! history is found by the address's SHA-256.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use herald_core::util::recipient_key;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{ApiError, ApiState, App, db_err};
use herald_domain::readmodel;

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
    App(app): App,
) -> Result<Response, ApiError> {
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
    let key = recipient_key(&state.deps.config.security.secret, &address);
    let db = state.db().await.map_err(db_err)?;
    let rows = readmodel::history(
        &**db,
        &app,
        &key,
        channel.as_deref(),
        (cur_ms, &cur_id),
        limit + 1,
    )
    .await
    .map_err(db_err)?;
    let more = rows.len() as i64 > limit;
    let messages: Vec<Value> = rows
        .iter()
        .take(limit as usize)
        .map(|r| {
            json!({
                "message_id": r.message_id, "request_id": r.request_id,
                "channel": r.channel, "status": r.status,
                "provider": r.provider, "template": r.template,
                "recipient": r.recipient,
                "created_at": r.created_ms, "updated_at": r.updated_ms,
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
    App(app): App,
) -> Result<Response, ApiError> {
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
    let group = q.group_by.as_deref().unwrap_or("channel");
    let group_by = readmodel::GroupBy::parse(group).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_group_by",
            format!("group_by {group:?}: channel, provider or template"),
        )
        .field("group_by")
    })?;
    let db = state.db().await.map_err(db_err)?;
    let out: Vec<Value> = readmodel::stats(&**db, &app, group_by, from, to)
        .await
        .map_err(db_err)?
        .into_iter()
        .map(|r| {
            json!({
                "key": r.key,
                "total": r.total,
                "delivered": r.delivered,
                "failed": r.failed,
                "success_rate": if r.total > 0 { r.delivered as f64 / r.total as f64 } else { 0.0 },
                "p50_ms": r.p50_ms,
                "p99_ms": r.p99_ms,
            })
        })
        .collect();
    Ok(Json(json!({"from": from, "to": to, "group_by": q.group_by.unwrap_or_else(|| "channel".into()), "rows": out})).into_response())
}
