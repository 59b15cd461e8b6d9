//! Verification codes over any channel's template: `POST /v1/verifications` sends a code,
//! `POST /v1/verifications/{id}/check` checks one, `GET /v1/verifications/{id}` reads one.
//!
//! The code is drawn from the OS CSPRNG, stored only as a keyed MAC (bound to app, purpose and
//! destination) in `verifications`, and travels sealed in the published request (template
//! parameter `code`): no table, topic, event, inbox or log holds it in clear. Rules in
//! [`herald_domain::verification`]: single use, a wrong-check budget that a resend does not
//! reset, each app's cooldown and hourly/daily limits per destination (429 with `Retry-After`),
//! all keyed on the destination normalised once ([`herald_domain::destination`]). Channels whose
//! providers post to group chats are refused unless the operator lists them.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use herald_core::telemetry::names;
use herald_core::util::{mask_address, message_id, now_ms, random_id};
use herald_domain::destination::{Keyer, Region};
use herald_domain::verification::{self as v, Keys, Refused};
use herald_schemas::{Channel, Content, Priority, Recipient, SendRequested};
use serde::Deserialize;
use serde_json::json;

use crate::{ApiError, ApiState, Signed, db_err, header, prepare, publish, take_quota};

/// `POST /v1/verifications` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    /// What the code is for (`login`, `reset_password` …): a code passes only for its purpose.
    pub purpose: String,
    pub channel: Channel,
    /// The destination: a phone number, an e-mail address, a user id … as for `recipients`.
    pub to: String,
    /// The template the code is sent with (its parameter `code`, and `ttl_minutes`). Without
    /// one, a plain text ("Your verification code is …"); SMS needs one.
    #[serde(default)]
    pub template: Option<String>,
    /// More template parameters (not `code` or `ttl_minutes`).
    #[serde(default)]
    pub params: HashMap<String, String>,
    #[serde(default)]
    pub code_length: Option<u8>,
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub metadata: HashMap<String, String>,
}

/// `POST /v1/verifications/{id}/check` body. `purpose` and `to`, when given, must be the ones
/// the code was sent for (they are part of what the code is checked against).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckBody {
    pub code: String,
    #[serde(default)]
    pub purpose: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
}

/// Provider kinds that post to a group chat (a robot's webhook), where every member would read a
/// code, rather than to one person.
const GROUP_KINDS: [&str; 3] = ["wecom_robot", "dingtalk_robot", "feishu_bot"];

/// How destinations are keyed: normalised in the configured default region, then HMAC'd.
fn keyer(state: &ApiState) -> Result<Keyer<'_>, ApiError> {
    let config = &state.deps.config;
    let region = Region::parse(&config.verifications.default_region).ok_or_else(|| {
        // Refused when the config loads; here only if that check is bypassed.
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "invalid_config",
            "verifications.default_region is not a region",
        )
    })?;
    Ok(Keyer {
        server_secret: &config.security.secret,
        region,
    })
}

fn bad(code: &'static str, message: impl Into<String>, field: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message).field(field)
}

fn counted(route: &'static str, outcome: &'static str) {
    metrics::counter!(names::API_REQUESTS, "route" => route, "outcome" => outcome).increment(1);
}

fn refused(r: Refused) -> ApiError {
    let (code, message, wait) = match r {
        Refused::Cooldown { retry_after_secs } => (
            "verification_cooldown",
            "a code was sent to this destination moments ago",
            retry_after_secs,
        ),
        Refused::TooManySends { retry_after_secs } => (
            "too_many_verifications",
            "this destination has had its share of codes for now",
            retry_after_secs,
        ),
        Refused::Locked { retry_after_secs } => (
            "verification_locked",
            "too many wrong codes for this purpose and destination; try again later",
            retry_after_secs,
        ),
    };
    counted("verifications", code);
    let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message);
    e.retry_after = Some(wait.max(1) as u64);
    e
}

pub async fn start(
    State(state): State<Arc<ApiState>>,
    headers: axum::http::HeaderMap,
    Signed { app, body }: Signed,
) -> Result<Response, ApiError> {
    crate::rate_limit(&state, &app)?;
    let b: StartBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()))?;
    let cfg = &state.deps.config.verifications;
    let purpose = b.purpose.trim();
    if purpose.is_empty()
        || purpose.len() > 64
        || !purpose
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_-.:".contains(&c))
    {
        return Err(bad(
            "invalid_purpose",
            "purpose is 1–64 characters of letters, digits, _ - . :",
            "purpose",
        ));
    }
    let channel_name = b.channel.as_str().to_ascii_uppercase();
    if b.channel == Channel::Inapp
        || !cfg
            .channels
            .iter()
            .any(|c| c.eq_ignore_ascii_case(&channel_name))
    {
        let robots: Vec<&str> = if b.channel == Channel::Inapp {
            Vec::new()
        } else {
            state
                .deps
                .config
                .providers_for(b.channel)
                .into_iter()
                .filter(|p| GROUP_KINDS.contains(&p.kind.as_str()))
                .map(|p| p.code.as_str())
                .collect()
        };
        if !robots.is_empty() {
            return Err(bad(
                "group_channel_not_allowed",
                format!(
                    "verification codes are not sent on {channel_name}: its providers ({}) post \
                     to group chats, where every member would read the code; an operator may \
                     list {channel_name} in [verifications] channels to allow it",
                    robots.join(", ")
                ),
                "channel",
            ));
        }
        return Err(bad(
            "channel_not_allowed",
            format!(
                "verification codes are not sent on {channel_name} (allowed: {})",
                cfg.channels.join(", ")
            ),
            "channel",
        ));
    }
    let len = usize::from(b.code_length.unwrap_or(cfg.code_length));
    if !(v::MIN_CODE_LEN..=v::MAX_CODE_LEN).contains(&len) {
        return Err(bad(
            "invalid_code_length",
            "code_length is 4 to 10",
            "code_length",
        ));
    }
    let ttl = b.ttl_secs.unwrap_or(cfg.ttl_secs);
    if ttl == 0 || ttl > cfg.max_ttl_secs {
        return Err(bad(
            "invalid_ttl",
            format!("ttl_secs is 1 to {}", cfg.max_ttl_secs),
            "ttl_secs",
        ));
    }
    for reserved in [v::CODE_PARAM, v::TTL_MINUTES_PARAM] {
        if b.params.contains_key(reserved) {
            return Err(bad(
                "reserved_param",
                format!("the parameter {reserved:?} is Herald's"),
                &format!("params.{reserved}"),
            ));
        }
    }
    if b.template.is_none() && b.channel == Channel::Sms {
        return Err(bad(
            "template_required",
            "SMS providers send registered templates only: name one",
            "template",
        ));
    }
    let to = b.to.trim().to_owned();
    let id = random_id();
    let secret = &state.deps.config.security.secret;
    // Every per-destination rule keys on the normalised destination: one mailbox or phone
    // however the caller writes it. The message still goes to `to` as written.
    let destination_key = keyer(&state)?
        .key(b.channel, &to, "to")
        .map_err(|p| bad(p.code, p.message, &p.field))?;
    let keys = Keys::new(secret);
    // The code exists only here: sealed for the request, and as its MAC.
    let (sealed, mac) = {
        let code = v::generate_code(len);
        (
            keys.seal(&id, &code),
            keys.code_mac(&app, purpose, &destination_key, &code),
        )
    };
    let ttl_minutes = ttl.div_ceil(60).to_string();
    let mut params = b.params;
    params.insert(v::CODE_PARAM.into(), sealed.clone());
    params.insert(v::TTL_MINUTES_PARAM.into(), ttl_minutes.clone());
    let content = b.template.is_none().then(|| Content {
        subject: Some("Your verification code".into()),
        text: Some(format!(
            "Your verification code is {sealed}. It expires in {ttl_minutes} minutes. \
             If you did not ask for it, ignore this message."
        )),
        ..Default::default()
    });
    let mut metadata = b.metadata;
    metadata.insert("verification_id".into(), id.clone());
    metadata.insert("verification_purpose".into(), purpose.to_owned());
    let now = now_ms();
    let req = SendRequested {
        request_id: id.clone(),
        app_id: app.clone(),
        idempotency_key: None,
        channel: b.channel,
        template: b.template,
        params,
        recipients: vec![Recipient {
            address: to.clone(),
            params: HashMap::new(),
            timezone: None,
        }],
        content,
        send_at: None,
        // A code never waits behind marketing, and is never sent late.
        priority: Priority::High,
        expires_at: Some(now + ttl as i64 * 1000),
        metadata,
        requested_at: now,
    };
    let (span, trace) = herald_core::trace::Call::server(
        header(&headers, "traceparent"),
        "POST /v1/verifications",
        vec![herald_core::trace::Attr::new("herald.app", app.clone())],
    );
    let rec = prepare(&state, &app, &req, &trace).await;
    span.end(rec.as_ref().err().map(|e| e.code().to_owned()));
    let rec = rec?;
    let mid = message_id(&app, &id, 0);
    let masked = mask_address(&to);
    let limits = v::Limits {
        max_attempts: cfg.max_attempts,
        resend_interval_secs: cfg.resend_interval_secs as i64,
        max_sends_per_hour: cfg.max_sends_per_hour,
        max_sends_per_day: cfg.max_sends_per_day,
    };
    let created = {
        let mut db = state.db().await.map_err(db_err)?;
        v::create(
            &mut db,
            &v::New {
                id: &id,
                app_id: &app,
                purpose,
                channel: req.channel.as_str(),
                destination_key: &destination_key,
                destination_masked: &masked,
                code_mac: &mac,
                message_id: &mid,
                ttl_secs: ttl as i64,
            },
            &limits,
        )
        .await
        .map_err(db_err)?
        .map_err(refused)?
    };
    let published = match take_quota(&state, &app, 1).await {
        Ok(()) => publish(&state, vec![rec]).await,
        Err(e) => Err(e),
    };
    if let Err(e) = published {
        // Not sent: it counts against nothing, and cannot be checked; the code it was to
        // replace is still valid.
        if let Ok(db) = state.db().await
            && let Err(err) = v::unsent(&db, &id).await
        {
            tracing::warn!(error = %err, "verification not marked unsent");
        }
        counted("verifications", "unavailable");
        return Err(e);
    }
    // Out: now it replaces the older code, with every wrong check that one took meanwhile. If
    // this fails the new code stays uncheckable and the older one valid (fail closed).
    let view = {
        let mut db = state.db().await.map_err(db_err)?;
        v::published(&mut db, &id).await.map_err(|e| {
            counted("verifications", "unavailable");
            db_err(e)
        })?
    };
    let (status, attempts) = view.map_or(("pending".to_owned(), created.attempts), |v| {
        (v.status, v.attempts)
    });
    let intake = herald_domain::intake::Intake {
        app_id: app.clone(),
        request_id: id.clone(),
        channel: req.channel.as_str().to_owned(),
        message_ids: vec![mid.clone()],
    };
    if let Err(e) = state.intake_writes.submit(intake).await {
        tracing::warn!(error = %e, "intake not recorded; reads follow the projector");
    }
    counted("verifications", "sent");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "id": id,
            "status": status,
            "purpose": purpose,
            "channel": req.channel.as_str(),
            "to": masked,
            "expires_at": created.expires_at_ms,
            "attempts": attempts,
            "max_attempts": cfg.max_attempts,
            "message_id": mid,
            "request_id": id,
        })),
    )
        .into_response())
}

pub async fn check(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Signed { app, body }: Signed,
) -> Result<Response, ApiError> {
    crate::rate_limit(&state, &app)?;
    let b: CheckBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()))?;
    if b.code.is_empty() || b.code.len() > 64 {
        return Err(bad("invalid_code", "code is 1–64 characters", "code"));
    }
    let keys = Keys::new(&state.deps.config.security.secret);
    let keyer = keyer(&state)?;
    let mut db = state.db().await.map_err(db_err)?;
    let checked = v::check(
        &mut db,
        &keys,
        &keyer,
        &app,
        &id,
        b.code.trim(),
        (
            b.purpose.as_deref().map(str::trim),
            b.to.as_deref().map(str::trim),
        ),
    )
    .await
    .map_err(db_err)?
    .ok_or_else(|| {
        counted("verification_check", "not_found");
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no verification {id}"),
        )
    })?;
    let view = checked.view;
    counted(
        "verification_check",
        if checked.approved {
            "approved"
        } else if view.status == "pending" || view.status == "max_attempts_reached" {
            "wrong"
        } else {
            "refused"
        },
    );
    Ok(Json(json!({
        "id": view.id,
        "status": view.status,
        "valid": checked.approved,
        "attempts": view.attempts,
        "attempts_left": (view.max_attempts - view.attempts).max(0),
        "expires_at": view.expires_at,
    }))
    .into_response())
}

pub async fn get_one(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    crate::App(app): crate::App,
) -> Result<Response, ApiError> {
    let db = state.db().await.map_err(db_err)?;
    let view = v::get(&db, &app, &id)
        .await
        .map_err(db_err)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no verification {id}"),
            )
        })?;
    Ok(Json(view).into_response())
}
