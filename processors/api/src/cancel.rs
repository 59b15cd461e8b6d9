//! Cancel and recall (CONTRACT.md §2): `POST /v1/messages/{id}/cancel` and
//! `POST /v1/requests/{id}/cancel`, through the domain's use case ([`herald_domain::cancel`],
//! which the console's cancel calls too). 200 `{canceled: n, too_late: m}` when anything was
//! canceled; 404 when the app has no such message or request; 409 when nothing could be
//! (already sent, or already final).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use herald_domain::cancel::{CancelError, Key, Ports};
use serde_json::json;

use crate::{ApiError, ApiState, Signed, db_err};

pub async fn message(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Signed { app, .. }: Signed,
) -> Result<Response, ApiError> {
    by(&state, Key::Message, &id, &app).await
}

pub async fn request(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Signed { app, .. }: Signed,
) -> Result<Response, ApiError> {
    by(&state, Key::Request, &id, &app).await
}

async fn by(state: &ApiState, key: Key, id: &str, app: &str) -> Result<Response, ApiError> {
    let ports = Ports {
        db: &state.pg,
        codec: &state.deps.codec,
        transport: state.deps.transport.as_ref(),
        stage: crate::STAGE,
    };
    let (canceled, too_late) =
        herald_domain::cancel::cancel(&ports, key, id, app, "canceled through the API")
            .await
            .map_err(answer)?;
    Ok(Json(json!({"canceled": canceled, "too_late": too_late})).into_response())
}

/// A cancel's refusal in the JSON error shape.
fn answer(e: CancelError) -> ApiError {
    match e {
        CancelError::NotFound { .. } => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
        }
        CancelError::TooLate => ApiError::new(StatusCode::CONFLICT, "too_late", e.to_string()),
        CancelError::Database(e) => db_err(e),
        CancelError::Registry(m) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "registry_unavailable", m)
        }
        CancelError::Transport(m) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "transport_unavailable", m)
        }
    }
}
