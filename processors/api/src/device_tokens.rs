//! Dead device tokens, for the app to prune its records: `GET /v1/device-tokens/dead?since=&limit=`
//! lists the tokens a push provider declared gone (oldest first; page with `cursor` =
//! `next_cursor`, which skips nothing when tokens share a mark time; `since` = the last `at`
//! still works for a first page), `DELETE /v1/device-tokens/dead/{channel}/{token}` revives one (sends to it go out
//! again). Owned by [`herald_domain::device_tokens`].

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::{ApiError, ApiState, App, Signed, channel_param, db_err};

#[derive(Debug, Deserialize)]
pub struct Since {
    #[serde(default)]
    pub since: i64,
    /// `next_cursor` of the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
    #[serde(default)]
    pub limit: Option<i64>,
}

pub async fn list(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<Since>,
    App(app): App,
) -> Result<Response, ApiError> {
    use herald_domain::device_tokens::After;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let after = match q.cursor.as_deref() {
        Some(c) => After::parse_cursor(c).ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "invalid_cursor",
                "cursor is not a next_cursor this API gave",
            )
            .field("cursor")
        })?,
        None => After::Since(q.since),
    };
    let db = state.db().await.map_err(db_err)?;
    let tokens = herald_domain::device_tokens::list(&**db, &app, &after, limit)
        .await
        .map_err(db_err)?;
    let full = tokens.len() as i64 == limit;
    let next = full.then(|| tokens.last().map(|t| t.at)).flatten();
    let cursor = full
        .then(|| tokens.last().map(After::cursor_after))
        .flatten();
    Ok(Json(json!({"tokens": tokens, "next_since": next, "next_cursor": cursor})).into_response())
}

pub async fn revive(
    State(state): State<Arc<ApiState>>,
    Path((channel, token)): Path<(String, String)>,
    Signed { app, .. }: Signed,
) -> Result<Response, ApiError> {
    let channel = channel_param(&channel)?;
    let db = state.db().await.map_err(db_err)?;
    let revived = herald_domain::device_tokens::revive(&**db, &app, channel.as_str(), &token)
        .await
        .map_err(db_err)?;
    Ok(
        Json(json!({"channel": channel.as_str(), "token": token, "revived": revived}))
            .into_response(),
    )
}
