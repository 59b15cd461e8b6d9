//! Apple Push Notification service, HTTP/2 provider API (PROVIDERS-MORE.md §2.6), served as h2c
//! (HTTP/2 with prior knowledge on plain TCP); a request over HTTP/1.1 gets 505, so a sender
//! that is not speaking HTTP/2 fails loudly.
//!
//! `POST /apns/3/device/{token}`: `authorization: bearer <jwt>` (absent → 403
//! `MissingProviderToken`) with header exactly ES256 + the registered Key ID, `iss` the
//! registered Team ID and a signature that verifies (else 403 `InvalidProviderToken`; `iat` more
//! than an hour old → `ExpiredProviderToken`, in the future → `InvalidProviderToken`); a new
//! token (another `iat`) within 20 minutes of the team's last one → 429
//! `TooManyProviderTokenUpdates` (`POST /_control/apns/revoke` forgets the team's tokens);
//! `apns-topic` present (`MissingTopic`) and the registered bundle (`TopicDisallowed`);
//! `apns-push-type` known (`InvalidPushType`); `apns-priority` 1, 5 or 10 and 5 for background
//! (`BadPriority`); `apns-expiration` an integer (`BadExpirationDate`); `apns-id` a UUID
//! (`BadMessageId`); `apns-collapse-id` at most 64 bytes (`BadCollapseId`); no header twice
//! (`DuplicateHeaders`); a body (`PayloadEmpty`) of at most 4096 bytes (413 `PayloadTooLarge`)
//! holding an `aps` object. Device tokens: even-length hex of at least 64 characters, else
//! `BadDeviceToken`; starting `dead` → 410 `Unregistered` with a timestamp; starting `0ba0` →
//! `DeviceTokenNotForTopic`. Success: 200 with `apns-id` (the request's, or a new one), empty
//! body.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use herald_core::util::now_ms;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use crate::{Sim, apply_fault, hang};

const P: &str = "apns";
/// The simulator's registered auth key (its `.p8` is Herald's test credential).
pub const AUTH_KEY: &str = include_str!("apns-auth-key.p8");
const PUBLIC_KEY: &str = include_str!("apns-auth-key.pub.pem");
pub const KEY_ID: &str = "SIMKEY0001";
pub const TEAM_ID: &str = "SIMTEAM001";
pub const TOPIC: &str = "io.herald.sim";
/// Apple counts provider-token updates per team: one new token per 20 minutes.
const TOKEN_UPDATE_MS: i64 = 20 * 60 * 1000;
const PUSH_TYPES: [&str; 11] = [
    "alert",
    "background",
    "location",
    "voip",
    "complication",
    "fileprovider",
    "mdm",
    "liveactivity",
    "pushtotalk",
    "widgets",
    "controls",
];

pub fn routes() -> Router<Arc<Sim>> {
    Router::new().route("/apns/3/device/{token}", post(send))
}

fn reason(status: StatusCode, reason: &str) -> Response {
    (status, axum::Json(json!({ "reason": reason }))).into_response()
}

/// A scripted reason, with APNs' status for it.
fn scripted(code: &str) -> Response {
    let status = match code {
        "TooManyRequests" | "TooManyProviderTokenUpdates" => StatusCode::TOO_MANY_REQUESTS,
        "InternalServerError" => StatusCode::INTERNAL_SERVER_ERROR,
        "ServiceUnavailable" | "Shutdown" => StatusCode::SERVICE_UNAVAILABLE,
        "Unregistered" | "ExpiredToken" => StatusCode::GONE,
        "ExpiredProviderToken"
        | "InvalidProviderToken"
        | "MissingProviderToken"
        | "BadCertificate"
        | "BadCertificateEnvironment"
        | "Forbidden" => StatusCode::FORBIDDEN,
        "PayloadTooLarge" => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    reason(status, code)
}

/// The provider token's verdict: `Err(reason)` when APNs would refuse it.
fn check_token(sim: &Sim, bearer: Option<&str>) -> Result<(), (StatusCode, &'static str)> {
    let forbidden = |r| Err((StatusCode::FORBIDDEN, r));
    let Some(jwt) = bearer else {
        return forbidden("MissingProviderToken");
    };
    let Ok(header) = jsonwebtoken::decode_header(jwt) else {
        return forbidden("InvalidProviderToken");
    };
    if header.alg != Algorithm::ES256 || header.kid.as_deref() != Some(KEY_ID) {
        return forbidden("InvalidProviderToken");
    }
    let mut validation = Validation::new(Algorithm::ES256);
    validation.validate_exp = false;
    validation.set_required_spec_claims(&["iss"]);
    validation.set_issuer(&[TEAM_ID]);
    let key = DecodingKey::from_ec_pem(PUBLIC_KEY.as_bytes()).expect("the simulator's key");
    let Ok(claims) = jsonwebtoken::decode::<Value>(jwt, &key, &validation) else {
        return forbidden("InvalidProviderToken");
    };
    let Some(iat) = claims.claims["iat"].as_i64() else {
        return forbidden("InvalidProviderToken");
    };
    let now = now_ms();
    if now / 1000 - iat > 3600 {
        return forbidden("ExpiredProviderToken");
    }
    if iat > now / 1000 + 60 {
        return forbidden("InvalidProviderToken");
    }
    // Token updates per team: a new `iat` within the window of the last new one is refused.
    let mark = format!("iat:{iat}:");
    sim.with_tokens(P, |tokens| {
        let live = tokens
            .iter()
            .rposition(|t| t.starts_with("revoked-"))
            .map_or(0, |at| at + 1);
        if tokens[live..].iter().any(|t| t.starts_with(&mark)) {
            return Ok(());
        }
        let last = tokens[live..]
            .last()
            .and_then(|t| t.rsplit(':').next())
            .and_then(|ms| ms.parse::<i64>().ok());
        if last.is_some_and(|seen| now - seen < TOKEN_UPDATE_MS) {
            return Err((StatusCode::TOO_MANY_REQUESTS, "TooManyProviderTokenUpdates"));
        }
        tokens.push(format!("{mark}{now}"));
        Ok(())
    })
}

async fn send(
    State(sim): State<Arc<Sim>>,
    Path(token): Path<String>,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if version != Version::HTTP_2 {
        sim.count_rejected(P);
        return (
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "APNs speaks HTTP/2 only",
        )
            .into_response();
    }
    let one = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let bearer = one("authorization").and_then(|v| v.strip_prefix("bearer "));
    if let Err((status, r)) = check_token(&sim, bearer) {
        sim.count_rejected(P);
        return reason(status, r);
    }
    sim.count_request(P);
    let hang_ms = match apply_fault(sim.next_fault(P)).await {
        Err((code, _)) => return scripted(&code),
        Ok(h) => h,
    };
    for name in [
        "apns-topic",
        "apns-push-type",
        "apns-priority",
        "apns-id",
        "apns-expiration",
        "apns-collapse-id",
        "authorization",
    ] {
        if headers.get_all(name).iter().count() > 1 {
            return reason(StatusCode::BAD_REQUEST, "DuplicateHeaders");
        }
    }
    let Some(topic) = one("apns-topic") else {
        return reason(StatusCode::BAD_REQUEST, "MissingTopic");
    };
    if topic != TOPIC {
        return reason(StatusCode::BAD_REQUEST, "TopicDisallowed");
    }
    let push_type = one("apns-push-type").unwrap_or("alert");
    if !PUSH_TYPES.contains(&push_type) {
        return reason(StatusCode::BAD_REQUEST, "InvalidPushType");
    }
    let priority = one("apns-priority").unwrap_or("10");
    if !["1", "5", "10"].contains(&priority) || (push_type == "background" && priority != "5") {
        return reason(StatusCode::BAD_REQUEST, "BadPriority");
    }
    if one("apns-expiration").is_some_and(|e| e.parse::<u64>().is_err()) {
        return reason(StatusCode::BAD_REQUEST, "BadExpirationDate");
    }
    if one("apns-id").is_some_and(|id| uuid::Uuid::parse_str(id).is_err() || id.len() != 36) {
        return reason(StatusCode::BAD_REQUEST, "BadMessageId");
    }
    if one("apns-collapse-id").is_some_and(|c| c.len() > 64) {
        return reason(StatusCode::BAD_REQUEST, "BadCollapseId");
    }
    if body.is_empty() {
        return reason(StatusCode::BAD_REQUEST, "PayloadEmpty");
    }
    if body.len() > 4096 {
        return reason(StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge");
    }
    // Apple's table names no reason for a payload that is not JSON with `aps`; the closest one.
    let Some(payload) = serde_json::from_slice::<Value>(&body)
        .ok()
        .filter(|v| v["aps"].is_object())
    else {
        return reason(StatusCode::BAD_REQUEST, "PayloadEmpty");
    };
    if token.len() < 64 || token.len() % 2 != 0 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return reason(StatusCode::BAD_REQUEST, "BadDeviceToken");
    }
    if token.starts_with("dead") {
        return (
            StatusCode::GONE,
            axum::Json(json!({"reason": "Unregistered", "timestamp": now_ms() - 60_000})),
        )
            .into_response();
    }
    if token.starts_with("0ba0") {
        return reason(StatusCode::BAD_REQUEST, "DeviceTokenNotForTopic");
    }
    let apns_id = one("apns-id")
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    sim.record(
        P,
        json!({
            "token": token, "payload": payload, "push_type": push_type, "priority": priority,
            "collapse_id": one("apns-collapse-id"), "expiration": one("apns-expiration"),
            "apns_id": apns_id, "http": "HTTP/2",
        }),
    );
    hang(hang_ms).await;
    let mut resp = StatusCode::OK.into_response();
    if let Ok(v) = HeaderValue::from_str(&apns_id) {
        resp.headers_mut().insert("apns-id", v);
    }
    resp
}
