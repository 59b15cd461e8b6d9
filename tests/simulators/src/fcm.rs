//! Firebase Cloud Messaging HTTP v1 and Google's OAuth 2.0 token endpoint (PROVIDERS-MORE.md
//! §1.7).
//!
//! `POST /fcm/token` (form): `grant_type` jwt-bearer; the assertion RS256, signed by a known
//! service account (by `iss` and `kid`), verified; `aud` = this endpoint's URL; `scope` one of
//! the FCM scopes; `iat` within ±300 s, `0 < exp - iat <= 3600`; refusals are 400
//! `invalid_grant` with Google's texts. Tokens are `ya29.`-prefixed, `expires_in` 3599, bound
//! to the service account's project; `POST /_control/fcm/revoke` revokes every token issued.
//!
//! `POST /fcm/v1/projects/{project}/messages:send`: no, unknown, revoked or expired bearer →
//! 401 `UNAUTHENTICATED` (no FCM error detail); another project → 403 `PERMISSION_DENIED`;
//! then the body: exactly one of token/topic/condition, `data` values strings and no reserved
//! keys, Android `ttl` a Duration of at most 4 weeks, `priority` NORMAL/HIGH (any case), no
//! `/topics/` prefix, at most 4096 bytes (2048 to a topic) → 400 `INVALID_ARGUMENT` in the
//! official shape; camelCase and snake_case both accepted. Device tokens starting
//! `unregistered-` are gone (404 `UNREGISTERED`), `other-project-` belong to another sender
//! (403 `SENDER_ID_MISMATCH`). Scripted errors answer with FCM's status for the code (and
//! `Retry-After` for `QUOTA_EXCEEDED` / `UNAVAILABLE`). `validate_only` answers
//! `…/messages/fake_message_id` and records nothing. `POST /fcm/batch` is gone (404).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use herald_core::util::now_ms;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use crate::{Sim, apply_fault, hang};

const P: &str = "fcm";
/// The service account the simulator knows (its key file is Herald's test credential).
pub const SERVICE_ACCOUNT: &str = include_str!("fcm-service-account.json");
const PUBLIC_KEY: &str = include_str!("fcm-service-account.pub.pem");
const CLIENT_EMAIL: &str = "herald-sim@herald-sim.iam.gserviceaccount.com";
const KEY_ID: &str = "sim-key-1";
pub const PROJECT: &str = "herald-sim";
const SCOPES: [&str; 2] = [
    "https://www.googleapis.com/auth/firebase.messaging",
    "https://www.googleapis.com/auth/cloud-platform",
];
const SHORT_LIVED: &str = "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.";

pub fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/fcm/token", post(token))
        .route("/fcm/v1/projects/{project}/messages:send", post(send))
        .route("/fcm/batch", post(batch))
}

fn grant_error(code: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": code, "error_description": description})),
    )
        .into_response()
}

async fn token(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(&body).into_owned().collect();
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        sim.count_rejected(P);
        return grant_error("unsupported_grant_type", "Invalid grant_type: ");
    }
    let Some(assertion) = form.get("assertion") else {
        sim.count_rejected(P);
        return grant_error("invalid_request", "Missing required parameter: assertion");
    };
    let header = match jsonwebtoken::decode_header(assertion) {
        Ok(h) if h.alg == Algorithm::RS256 => h,
        _ => {
            sim.count_rejected(P);
            return grant_error("invalid_grant", "Invalid JWT Signature.");
        }
    };
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let audience = format!("http://{host}/fcm/token");
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[CLIENT_EMAIL]);
    validation.set_required_spec_claims(&["iss", "aud", "exp", "iat"]);
    validation.leeway = 300;
    let key = DecodingKey::from_rsa_pem(PUBLIC_KEY.as_bytes()).expect("the simulator's key");
    let claims = match jsonwebtoken::decode::<Value>(assertion, &key, &validation) {
        Ok(t) if header.kid.as_deref().is_none_or(|k| k == KEY_ID) => t.claims,
        Ok(_) => {
            sim.count_rejected(P);
            return grant_error("invalid_grant", "Invalid JWT Signature.");
        }
        Err(e) => {
            sim.count_rejected(P);
            use jsonwebtoken::errors::ErrorKind::*;
            return match e.kind() {
                ExpiredSignature | ImmatureSignature => grant_error("invalid_grant", SHORT_LIVED),
                InvalidAudience => {
                    grant_error("invalid_grant", "Invalid JWT: Failed audience check.")
                }
                InvalidIssuer => grant_error("invalid_grant", "Invalid JWT Signature."),
                _ => grant_error("invalid_grant", "Invalid JWT Signature."),
            };
        }
    };
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap_or(0),
        claims["exp"].as_i64().unwrap_or(0),
    );
    let now = now_ms() / 1000;
    if (iat - now).abs() > 300 || exp - iat <= 0 || exp - iat > 3600 {
        sim.count_rejected(P);
        return grant_error("invalid_grant", SHORT_LIVED);
    }
    let scope = claims["scope"].as_str().unwrap_or_default();
    if !scope.split(' ').any(|s| SCOPES.contains(&s)) {
        sim.count_rejected(P);
        return grant_error(
            "invalid_scope",
            "Invalid OAuth scope or ID token audience provided.",
        );
    }
    let expires = now_ms() + 3_599_000;
    let token = format!("ya29.{PROJECT}.{expires}.{}", uuid::Uuid::new_v4().simple());
    sim.issue(P, token.clone());
    axum::Json(json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}))
        .into_response()
}

/// Google's error shape; with an FCM error detail when `fcm` names one.
fn fcm_error(status: StatusCode, canonical: &str, fcm: Option<&str>, message: &str) -> Response {
    let mut error = json!({"code": status.as_u16(), "message": message, "status": canonical});
    if let Some(code) = fcm {
        error["details"] = json!([{
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": code,
        }]);
    }
    let mut resp = (status, axum::Json(json!({ "error": error }))).into_response();
    if matches!(fcm, Some("QUOTA_EXCEEDED" | "UNAVAILABLE")) {
        resp.headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("1"));
    }
    resp
}

/// An FCM error code as FCM answers it.
fn scripted(code: &str, message: &str) -> Response {
    let (status, canonical) = match code {
        "UNREGISTERED" => (StatusCode::NOT_FOUND, "NOT_FOUND"),
        "SENDER_ID_MISMATCH" => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
        "QUOTA_EXCEEDED" => (StatusCode::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED"),
        "UNAVAILABLE" => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        "INTERNAL" | "UNSPECIFIED_ERROR" => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
        "THIRD_PARTY_AUTH_ERROR" => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
        _ => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
    };
    fcm_error(
        status,
        canonical,
        Some(code),
        if message.is_empty() {
            "simulated failure"
        } else {
            message
        },
    )
}

fn invalid(message: &str) -> Response {
    fcm_error(
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        Some("INVALID_ARGUMENT"),
        message,
    )
}

/// A field in either JSON spelling (proto3: lowerCamelCase or the original snake_case).
fn field<'a>(v: &'a Value, snake: &str) -> Option<&'a Value> {
    if let Some(x) = v.get(snake) {
        return Some(x);
    }
    let mut camel = String::new();
    let mut up = false;
    for c in snake.chars() {
        if c == '_' {
            up = true;
        } else if up {
            camel.push(c.to_ascii_uppercase());
            up = false;
        } else {
            camel.push(c);
        }
    }
    v.get(camel.as_str())
}

/// The request's problem, if any, as FCM words it.
fn check_message(m: &Value) -> Result<(), String> {
    let targets = ["token", "topic", "condition"]
        .iter()
        .filter(|t| m.get(**t).is_some())
        .count();
    if targets != 1 {
        return Err("Exactly one of token, topic or condition must be specified".into());
    }
    if let Some(topic) = m["topic"].as_str()
        && (topic.starts_with("/topics/")
            || !topic
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.~%".contains(c)))
    {
        return Err(format!("Invalid topic name {topic}"));
    }
    if m["token"].as_str().is_some_and(|t| t.is_empty()) {
        return Err("The registration token is not a valid FCM registration token".into());
    }
    let check_data = |data: Option<&Value>, at: &str| -> Result<(), String> {
        let Some(data) = data else { return Ok(()) };
        let Some(map) = data.as_object() else {
            return Err(format!("Invalid value at '{at}'"));
        };
        for (i, (k, v)) in map.iter().enumerate() {
            if !v.is_string() {
                return Err(format!(
                    "Invalid value at '{at}[{i}].value' (TYPE_STRING), {v}"
                ));
            }
            if k == "from" || k == "message_type" || k.starts_with("google") || k.starts_with("gcm")
            {
                return Err(format!("Invalid data payload key: {k}"));
            }
        }
        Ok(())
    };
    check_data(m.get("data"), "message.data")?;
    if let Some(android) = m.get("android") {
        check_data(android.get("data"), "message.android.data")?;
        if let Some(ttl) = android.get("ttl") {
            let secs = ttl
                .as_str()
                .and_then(|t| t.strip_suffix('s'))
                .and_then(|t| t.parse::<f64>().ok());
            if !secs.is_some_and(|s| (0.0..=2_419_200.0).contains(&s)) {
                return Err(format!("Invalid value at 'message.android.ttl' ({ttl})"));
            }
        }
        if let Some(p) = android.get("priority")
            && !p
                .as_str()
                .is_some_and(|p| p.eq_ignore_ascii_case("normal") || p.eq_ignore_ascii_case("high"))
        {
            return Err(format!(
                "Invalid value at 'message.android.priority' (type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), {p}"
            ));
        }
        if field(android, "collapse_key").is_some_and(|c| !c.is_string()) {
            return Err("Invalid value at 'message.android.collapse_key'".into());
        }
    }
    let size = m.to_string().len();
    let limit = if m.get("topic").is_some() { 2048 } else { 4096 };
    if size > limit {
        return Err(format!("Message is too big: {size} bytes, at most {limit}"));
    }
    Ok(())
}

async fn send(
    State(sim): State<Arc<Sim>>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let live = sim.token_live(P, bearer);
    let (token_project, expires) = {
        let mut parts = bearer.split('.');
        let _ya29 = parts.next();
        (
            parts.next().unwrap_or_default().to_owned(),
            parts
                .next()
                .and_then(|e| e.parse::<i64>().ok())
                .unwrap_or(0),
        )
    };
    if !live || expires <= now_ms() {
        sim.count_rejected(P);
        return fcm_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            None,
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
        );
    }
    if token_project != project {
        sim.count_rejected(P);
        return fcm_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            None,
            &format!(
                "Permission 'cloudmessaging.messages.create' denied on resource '//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist)."
            ),
        );
    }
    sim.count_request(P);
    let hang_ms = match apply_fault(sim.next_fault(P)).await {
        Err((code, message)) => return scripted(&code, &message),
        Ok(h) => h,
    };
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return invalid("Invalid JSON payload received.");
    };
    let Some(message) = req.get("message").filter(|m| m.is_object()) else {
        return invalid("Request contains an invalid argument: message is required.");
    };
    if let Err(e) = check_message(message) {
        return invalid(&e);
    }
    if let Some(token) = message["token"].as_str() {
        if token.starts_with("unregistered-") {
            return scripted("UNREGISTERED", "Requested entity was not found.");
        }
        if token.starts_with("other-project-") {
            return scripted("SENDER_ID_MISMATCH", "SenderId mismatch");
        }
    }
    let validate_only = field(&req, "validate_only").and_then(Value::as_bool) == Some(true);
    let name = if validate_only {
        format!("projects/{project}/messages/fake_message_id")
    } else {
        let name = format!(
            "projects/{project}/messages/0:{}%{}",
            now_ms(),
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        );
        let android = message.get("android").cloned().unwrap_or(Value::Null);
        sim.record(
            P,
            json!({
                "token": message.get("token"), "topic": message.get("topic"),
                "notification": message.get("notification"), "data": message.get("data"),
                "collapse_key": field(&android, "collapse_key"),
                "priority": android.get("priority"), "ttl": android.get("ttl"),
                "tag": android.get("notification").and_then(|n| n.get("tag")),
                "apns": message.get("apns"), "name": name,
            }),
        );
        name
    };
    hang(hang_ms).await;
    axum::Json(json!({ "name": name })).into_response()
}

async fn batch() -> Response {
    (
        StatusCode::NOT_FOUND,
        [("content-type", "text/html; charset=UTF-8")],
        "<!DOCTYPE html><title>Error 404 (Not Found)!!1</title><p>The requested URL <code>/batch</code> was not found on this server.",
    )
        .into_response()
}
