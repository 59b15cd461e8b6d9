//! Dead device tokens, for the app to prune its records: `GET /v1/device-tokens/dead?since=&limit=`
//! lists the tokens a push provider declared gone (oldest first; page with `since` = the last
//! `at`), `DELETE /v1/device-tokens/dead/{channel}/{token}` revives one (sends to it go out
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
    #[serde(default)]
    pub limit: Option<i64>,
}

pub async fn list(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<Since>,
    App(app): App,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let db = state.db().await.map_err(db_err)?;
    let tokens = herald_domain::device_tokens::list(&**db, &app, q.since, limit)
        .await
        .map_err(db_err)?;
    let next = (tokens.len() as i64 == limit)
        .then(|| tokens.last().map(|t| t.at))
        .flatten();
    Ok(Json(json!({"tokens": tokens, "next_since": next})).into_response())
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
