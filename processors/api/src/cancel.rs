//! Cancel and recall (CONTRACT.md §2): `POST /v1/messages/{id}/cancel` and
//! `POST /v1/requests/{id}/cancel`. A message is canceled through the send gate
//! ([`herald_domain::gate`]) — atomically against its first provider call — and a `MessageCanceled`
//! is published so its status becomes `canceled`. 200 `{canceled: n, too_late: m}` when anything
//! was canceled; 409 when nothing could be (already sent, or already final).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use herald_core::util::{event_id, now_ms};
use herald_core::worker::record;
use herald_domain::gate::{self, Cancel};
use herald_schemas::{Channel, EventHeader, MessageCanceled, Reason, topics};
use serde_json::json;

use crate::{ApiError, ApiState, Signed, db_err, publish};

/// Whether a message in `status` has nothing left to cancel: a terminal status, or `sent` (the
/// provider has it).
fn settled(status: &str) -> bool {
    status == "sent" || herald_domain::status::TERMINAL.contains(&status)
}

struct Target {
    message_id: String,
    request_id: String,
    channel: String,
    status: String,
}

pub async fn message(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Signed { app, .. }: Signed,
) -> Result<Response, ApiError> {
    let (canceled, too_late) =
        by(&state, Key::Message, &id, &app, "canceled through the API").await?;
    Ok(Json(json!({"canceled": canceled, "too_late": too_late})).into_response())
}

pub async fn request(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Signed { app, .. }: Signed,
) -> Result<Response, ApiError> {
    let (canceled, too_late) =
        by(&state, Key::Request, &id, &app, "canceled through the API").await?;
    Ok(Json(json!({"canceled": canceled, "too_late": too_late})).into_response())
}

/// What a cancel names.
pub enum Key {
    Message,
    Request,
}

/// Cancels a message or every message of a request of `app`: (canceled, too late). The
/// console's cancel runs through here too (`why` says who).
pub async fn by(
    state: &ApiState,
    key: Key,
    id: &str,
    app: &str,
    why: &str,
) -> Result<(usize, usize), ApiError> {
    let what = match key {
        Key::Message => "message",
        Key::Request => "request",
    };
    let (request_id, message_id) = match key {
        Key::Message => (None, Some(id)),
        Key::Request => (Some(id), None),
    };
    let db = state.db().await.map_err(db_err)?;
    let mut targets: Vec<Target> =
        herald_domain::readmodel::of_request_or_message(&**db, app, request_id, message_id)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(|m| Target {
                message_id: m.message_id,
                request_id: m.request_id,
                channel: m.channel,
                status: m.status,
            })
            .collect();
    if targets.is_empty() {
        // Accepted by the gateway, not projected yet: cancelable at once.
        let accepted = match key {
            Key::Message => {
                herald_domain::intake::message(&*state.db().await.map_err(db_err)?, app, id)
                    .await
                    .map_err(db_err)?
                    .into_iter()
                    .collect()
            }
            Key::Request => {
                herald_domain::intake::request(&*state.db().await.map_err(db_err)?, app, id)
                    .await
                    .map_err(db_err)?
            }
        };
        targets = accepted
            .into_iter()
            .map(|a| Target {
                message_id: a.message_id,
                request_id: a.request_id,
                channel: a.channel,
                status: "accepted".into(),
            })
            .collect();
    }
    run(state, app, targets, &format!("no {what} {id}"), why).await
}

async fn run(
    state: &ApiState,
    app: &str,
    targets: Vec<Target>,
    missing: &str,
    why: &str,
) -> Result<(usize, usize), ApiError> {
    if targets.is_empty() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", missing));
    }
    let open: Vec<&Target> = targets.iter().filter(|t| !settled(&t.status)).collect();
    let ids: Vec<String> = open.iter().map(|t| t.message_id.clone()).collect();
    let results = gate::cancel(&*state.db().await.map_err(db_err)?, &ids)
        .await
        .map_err(db_err)?;
    let now = now_ms();
    let mut recs = Vec::new();
    for (t, r) in open.iter().zip(&results) {
        if *r != Cancel::Canceled {
            continue;
        }
        let Some(channel) = Channel::ALL.into_iter().find(|c| c.as_str() == t.channel) else {
            continue;
        };
        let trace = herald_core::trace::new_root();
        let ev = MessageCanceled {
            header: EventHeader {
                event_id: event_id(&t.message_id, "canceled", 0),
                event_time: now,
                stage: crate::STAGE.into(),
                trace_id: herald_core::trace::trace_id_of(&trace),
                message_id: t.message_id.clone(),
                request_id: t.request_id.clone(),
                app_id: app.to_owned(),
                channel,
                attempt: 0,
                metadata: Default::default(),
            },
            reason: Some(Reason::new("canceled", why)),
        };
        let rec = record(
            &state.deps.codec,
            topics::STATUS,
            &t.message_id,
            &trace,
            &ev,
        )
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "registry_unavailable",
                e.to_string(),
            )
        })?;
        recs.push(rec);
    }
    let canceled = recs.len();
    // The gate already holds: were publishing to fail, the message still never goes out, and a
    // retried cancel publishes the (same) event again.
    publish(state, recs).await?;
    let too_late = targets.len() - canceled;
    if canceled == 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "too_late",
            "nothing left to cancel: already sent or final",
        ));
    }
    Ok((canceled, too_late))
}
