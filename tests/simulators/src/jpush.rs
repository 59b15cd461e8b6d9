//! 极光 JPush Push API v3 (PROVIDERS-MORE.md §5.2): `POST /jpush/v3/push` and
//! `/jpush/v3/push/validate`. HTTP Basic `appKey:masterSecret`, compared in constant time (else
//! 401 + `1004`); a JSON body (`1003`) with `platform` and `audience` (`1002`), the audience a
//! non-empty `registration_id` list or `all` (`1003`), a `notification` or a `message` (`1002`),
//! at most 4000 bytes (`1005`). Registration ids starting `inactive-` match no active user (400
//! with `1011`). Errors: a non-200 status and `{"error":{"code","message"}}`; scripted codes get
//! JPush's status (`2002` 429, `1000` 500, `1030` 503, `1004` 401). Success: `sendno` echoed as
//! a string and a numeric-string `msg_id`; `validate` records nothing.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use serde_json::{Value, json};

use crate::{Sim, apply_fault, credential, hang};

const P: &str = "jpush";

pub fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/jpush/v3/push", post(push))
        .route("/jpush/v3/push/validate", post(validate))
}

fn error(code: i64, message: &str) -> Response {
    let status = match code {
        2002 => StatusCode::TOO_MANY_REQUESTS,
        1000 => StatusCode::INTERNAL_SERVER_ERROR,
        1030 => StatusCode::SERVICE_UNAVAILABLE,
        1004 => StatusCode::UNAUTHORIZED,
        _ => StatusCode::BAD_REQUEST,
    };
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

async fn push(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(sim, headers, body, false).await
}

async fn validate(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(sim, headers, body, true).await
}

async fn handle(sim: Arc<Sim>, headers: HeaderMap, body: Bytes, validate_only: bool) -> Response {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default();
    let expected = format!(
        "{}:{}",
        credential("HERALD_SIM_JPUSH_APP_KEY"),
        credential("HERALD_SIM_JPUSH_MASTER_SECRET")
    );
    if !herald_core::sign::ct_eq(&given, &expected) {
        sim.count_rejected(P);
        return error(1004, "Authen failed");
    }
    sim.count_request(P);
    let hang_ms = match apply_fault(sim.next_fault(P)).await {
        Err((code, message)) => {
            return error(
                code.parse().unwrap_or(1000),
                if message.is_empty() {
                    "simulated failure"
                } else {
                    &message
                },
            );
        }
        Ok(h) => h,
    };
    if body.len() > 4000 {
        return error(1005, "Msg content too long");
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(1003, "Invalid json");
    };
    if req.get("platform").is_none() || req.get("audience").is_none() {
        return error(1002, "Missing parameter: platform or audience");
    }
    if req.get("notification").is_none() && req.get("message").is_none() {
        return error(1002, "Missing parameter: notification or message");
    }
    let rids: Vec<&str> = match &req["audience"] {
        Value::String(s) if s == "all" => Vec::new(),
        a => match a["registration_id"].as_array() {
            Some(ids) if !ids.is_empty() && ids.iter().all(Value::is_string) => {
                ids.iter().filter_map(Value::as_str).collect()
            }
            _ => return error(1003, "audience value is invalid"),
        },
    };
    if rids.iter().any(|r| r.starts_with("inactive-")) {
        return error(
            1011,
            "cannot find user by this audience or has been inactive for more than 255 days",
        );
    }
    let sendno = match &req["options"]["sendno"] {
        Value::Number(n) => n.to_string(),
        _ => "0".to_owned(),
    };
    let msg_id = format!("{}", 1_000_000_000 + sim.next_serial());
    if !validate_only {
        sim.record(
            P,
            json!({"registration_id": rids, "notification": req.get("notification"),
                   "message": req.get("message"), "options": req.get("options"),
                   "msg_id": msg_id}),
        );
    }
    hang(hang_ms).await;
    axum::Json(json!({"sendno": sendno, "msg_id": msg_id})).into_response()
}
