//! HTTP gateway and read API (CONTRACT.md §2), on axum.
//!
//! `POST /v1/messages` publishes a `SendRequested` to `herald.requests.v1` and answers 202 only
//! once the broker acknowledged it (promise 1); bad requests get a 4xx with a machine-readable
//! reason and publish nothing (promise 5). `GET /v1/messages/{id}` and `GET /v1/requests/{id}`
//! read the projector's tables.
//! Every `/v1` route needs app authentication ([`auth`]).
//!
//! - Reads: HTTP. Writes: `herald.requests.v1`, `herald.status` (`MessageCanceled`).
//! - Tables: owns `api_nonces` ([`auth`]); reads the read model, `intake`, `inbox`, `templates`,
//!   `opt_outs`, `app_usage` and writes `message_gate` (cancel) through their owners in
//!   `herald-domain`.
//! - Promise: a 202 is true at once (the broker acknowledged; `GET` answers from `intake` until
//!   the projector has the message).

pub mod auth;
pub mod cancel;
pub mod device_tokens;
pub mod inbox;
pub mod reads;
pub mod templates;
pub mod verifications;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use herald_core::coalesce::Coalescer;
use herald_core::runtime::Deps;
use herald_core::telemetry::names;
use herald_core::util::{message_id, now_ms, random_id};
use herald_core::worker::{StageError, record};
use herald_domain::readmodel;
use herald_schemas::{Channel, Content, Priority, Recipient, SendRequested, topics};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub const STAGE: &str = "api";

/// Most requests one group-commit statement carries.
const GROUP_COMMIT_MAX: usize = 512;

pub struct ApiState {
    pub deps: Deps,
    /// Reconnects after a PostgreSQL restart: take it with [`ApiState::db`].
    pub pg: herald_core::db::SharedDb,
    pub nonces: auth::NonceCache,
    /// Group commit of every request's nonce (one statement for the requests waiting together).
    pub nonce_writes: Coalescer<(String, String), bool>,
    /// Group commit of every accepted request's `intake` rows.
    pub intake_writes: Coalescer<herald_domain::intake::Intake, ()>,
    pub secrets: HashMap<String, String>,
    pub http: reqwest::Client,
    pub inbox: inbox::Notifications,
    /// Per-app request rate limits (`rate_limit_per_sec`), per API process.
    pub limits: HashMap<String, governor::DefaultDirectRateLimiter>,
    /// Where webhook recipients may point.
    pub guard: herald_core::netguard::Guard,
    /// Live inbox streams per app.
    pub streams: Arc<inbox::StreamSlots>,
    /// Template stores per app per minute (`[template_store] puts_per_minute`), per API process.
    pub template_puts: governor::DefaultKeyedRateLimiter<String>,
}

impl ApiState {
    /// A live PostgreSQL connection from the pool, for this handler's queries.
    pub async fn db(&self) -> Result<herald_core::db::Pooled, herald_core::db::PoolFailure> {
        self.pg.get().await
    }
}

/// The app's request rate limit: 429 with `Retry-After` when over it.
fn rate_limit(state: &ApiState, app: &str) -> Result<(), ApiError> {
    use governor::clock::Clock;
    let Some(lim) = state.limits.get(app) else {
        return Ok(());
    };
    lim.check().map_err(|not_until| {
        let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
        metrics::counter!(names::API_REQUESTS, "route" => "send", "outcome" => "rate_limited")
            .increment(1);
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("app {app} is over its request rate limit"),
        );
        e.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        e
    })
}

/// Counts `n` messages against the app's daily quota (UTC days); 429 when it would exceed it.
async fn take_quota(state: &ApiState, app: &str, n: i64) -> Result<(), ApiError> {
    let Some(quota) = state
        .deps
        .config
        .apps
        .iter()
        .find(|a| a.id == app)
        .and_then(|a| a.daily_quota)
    else {
        return Ok(());
    };
    let quota = quota as i64;
    let counted = herald_domain::quota::take(&*state.db().await.map_err(db_err)?, app, n, quota)
        .await
        .map_err(db_err)?;
    if !counted {
        let secs_to_midnight = 86_400 - (now_ms() / 1000).rem_euclid(86_400);
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "quota_exceeded",
            format!("app {app} would exceed its daily quota of {quota} messages"),
        );
        e.retry_after = Some(secs_to_midnight as u64);
        return Err(e);
    }
    Ok(())
}

/// A 4xx/5xx with `{"error": {"code", "message", "field"}}`.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    /// The machine-readable code (`too_late`, `not_found` …).
    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The HTTP status it answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    fn field(mut self, f: impl Into<String>) -> Self {
        self.field = Some(f.into());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"code": self.code, "message": self.message, "field": self.field}});
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, v);
        }
        resp
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

async fn authenticate(
    state: &ApiState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<String, ApiError> {
    let req = auth::Request {
        app: header(headers, "x-herald-app"),
        timestamp: header(headers, "x-herald-timestamp"),
        nonce: header(headers, "x-herald-nonce"),
        signature: header(headers, "x-herald-signature"),
        method: method.as_str(),
        path_and_query: uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        body,
    };
    let window = state.deps.config.api.signature_window_secs as i64;
    let refused = |e: auth::AuthError| {
        metrics::counter!(names::API_REQUESTS, "route" => "auth", "outcome" => e.code())
            .increment(1);
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            e.code(),
            format!("authentication failed: {e:?}"),
        )
    };
    let app = auth::verify(
        &req,
        |a| state.secrets.get(a).cloned(),
        &state.nonces,
        now_ms() / 1000,
        window,
    )
    .map_err(refused)?;
    // The nonce once across every API process: PostgreSQL holds them for the window.
    let nonce = req.nonce.unwrap_or_default();
    let fresh = state
        .nonce_writes
        .submit((app.clone(), nonce.to_owned()))
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "nonce not stored");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is unavailable; try again",
            )
        })?;
    if !fresh {
        return Err(refused(auth::AuthError::ReusedNonce));
    }
    Ok(app)
}

/// The authenticated app of a `/v1` request without a body (the signature covers an empty one).
/// Every read route takes it: a handler cannot forget authentication.
pub struct App(pub String);

impl FromRequestParts<Arc<ApiState>> for App {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        authenticate(state, &parts.method, &parts.uri, &parts.headers, b"")
            .await
            .map(App)
    }
}

/// The authenticated app of a `/v1` request with a body, and the body it signed. Reads the body
/// (within the router's body limit), so it comes last among a handler's arguments.
pub struct Signed {
    pub app: String,
    pub body: Bytes,
}

impl FromRequest<Arc<ApiState>> for Signed {
    /// axum's own refusals (body too large …) pass through and get the JSON error shape from
    /// [`json_errors`] like every other refusal of axum's.
    type Rejection = Response;

    async fn from_request(
        req: axum::extract::Request,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let body = Bytes::from_request(
            axum::extract::Request::from_parts(parts.clone(), body),
            state,
        )
        .await
        .map_err(IntoResponse::into_response)?;
        let app = authenticate(state, &parts.method, &parts.uri, &parts.headers, &body)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Signed { app, body })
    }
}

/// `POST /v1/messages` body: `SendRequested` as JSON, `request_id` and `requested_at` optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    #[serde(default)]
    pub request_id: Option<String>,
    #[serde(default)]
    pub app_id: Option<String>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    pub channel: Channel,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub params: HashMap<String, String>,
    pub recipients: Vec<Recipient>,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub send_at: Option<i64>,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub metadata: HashMap<String, String>,
    #[serde(default)]
    pub requested_at: Option<i64>,
}

async fn send(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Signed { app, body }: Signed,
) -> Result<Response, ApiError> {
    // The caller's trace (W3C traceparent) if it sent a valid one, else a new trace; what the
    // request leads to carries it through every stage.
    let (mut span, trace) = herald_core::trace::Call::server(
        header(&headers, "traceparent"),
        "POST /v1/messages",
        vec![herald_core::trace::Attr::new("herald.app", app.clone())],
    );
    let result = send_traced(state, headers, app, body, &trace).await;
    match &result {
        Ok(r) => {
            span.set(herald_core::trace::Attr::new(
                "http.response.status_code",
                i64::from(r.status().as_u16()),
            ));
            span.end(None);
        }
        Err(e) => {
            span.set(herald_core::trace::Attr::new(
                "http.response.status_code",
                i64::from(e.status.as_u16()),
            ));
            span.end(Some(e.code.to_owned()));
        }
    }
    result
}

async fn send_traced(
    state: Arc<ApiState>,
    headers: HeaderMap,
    app: String,
    body: Bytes,
    trace: &str,
) -> Result<Response, ApiError> {
    rate_limit(&state, &app)?;
    let b: SendBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()))?;
    if b.app_id.as_ref().is_some_and(|a| *a != app) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "app_mismatch",
            "app_id differs from X-Herald-App",
        )
        .field("app_id"));
    }
    let request_id = b.request_id.clone().unwrap_or_else(random_id);
    let req = SendRequested {
        request_id: request_id.clone(),
        app_id: app.clone(),
        idempotency_key: b
            .idempotency_key
            .or_else(|| header(&headers, "idempotency-key").map(str::to_owned)),
        channel: b.channel,
        template: b.template,
        params: b.params,
        recipients: b.recipients,
        content: b.content,
        send_at: b.send_at,
        priority: b.priority,
        expires_at: b.expires_at,
        metadata: b.metadata,
        requested_at: b.requested_at.unwrap_or_else(now_ms),
    };
    let rec = prepare(&state, &app, &req, trace).await?;
    let ids: Vec<String> = (0..req.recipients.len())
        .map(|i| message_id(&app, &request_id, i))
        .collect();
    // An idempotency key already used answers the original request; nothing is published.
    if let Some(key) = req.idempotency_key.as_deref().filter(|k| !k.is_empty()) {
        let owner = herald_domain::idempotency::reserve(
            &*state.db().await.map_err(db_err)?,
            &app,
            key,
            &request_id,
        )
        .await
        .map_err(db_err)?;
        if owner != request_id {
            metrics::counter!(names::API_REQUESTS, "route" => "send", "outcome" => "duplicate")
                .increment(1);
            let ids: Vec<String> = (0..req.recipients.len())
                .map(|i| message_id(&app, &owner, i))
                .collect();
            return Ok((
                StatusCode::OK,
                Json(json!({"request_id": owner, "message_ids": ids, "duplicate": true})),
            )
                .into_response());
        }
        let n = req.recipients.len() as i64;
        let published = match take_quota(&state, &app, n).await {
            Ok(()) => publish(&state, vec![rec]).await,
            Err(e) => Err(e),
        };
        if let Err(e) = published {
            if let Ok(db) = state.db().await {
                let _ = herald_domain::idempotency::release(&db, &app, key, &request_id).await;
            }
            return Err(e);
        }
        let confirmed = match state.db().await {
            Ok(db) => herald_domain::idempotency::confirm(&db, &app, key, &request_id)
                .await
                .map_err(herald_core::db::PoolFailure::from),
            Err(e) => Err(e),
        };
        if let Err(e) = confirmed {
            // Accept confirms it too when it takes the request; nothing is lost.
            tracing::warn!(error = %e, "idempotency key not confirmed");
        }
    } else {
        take_quota(&state, &app, req.recipients.len() as i64).await?;
        publish(&state, vec![rec]).await?;
    }
    // Readable and cancelable at once, before the projector catches up.
    let intake = herald_domain::intake::Intake {
        app_id: app.clone(),
        request_id: request_id.clone(),
        channel: req.channel.as_str().to_owned(),
        message_ids: ids.clone(),
    };
    if let Err(e) = state.intake_writes.submit(intake).await {
        tracing::warn!(error = %e, "intake not recorded; reads follow the projector");
    }
    metrics::counter!(names::API_REQUESTS, "route" => "send", "outcome" => "accepted").increment(1);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"request_id": request_id, "message_ids": ids})),
    )
        .into_response())
}

/// The record of a request the gateway takes: refused here with the code accept would give
/// (promise 5), its template known, webhook destinations allowed, small enough, and marked as
/// counted against the app's daily quota (the caller takes the quota).
pub(crate) async fn prepare(
    state: &ApiState,
    app: &str,
    req: &SendRequested,
    trace: &str,
) -> Result<herald_core::transport::OutRecord, ApiError> {
    let cfg = &state.deps.config;
    let request_id = &req.request_id;
    // Everything accept would reject is refused here, with the same code (promise 5).
    let limits = herald_domain::validate::Limits::from_config(&cfg.pipeline);
    herald_domain::validate::all(req, &limits, now_ms()).map_err(|p| {
        let status = if p.code == "request_too_large" {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(status, p.code, p.message).field(p.field)
    })?;
    if let Some(t) = &req.template
        && !cfg
            .templates
            .iter()
            .any(|x| &x.code == t && x.app.as_deref().is_none_or(|a| a == app))
        && herald_domain::templates::get(&*state.db().await.map_err(db_err)?, app, t, None)
            .await
            .map_err(db_err)?
            .is_none()
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_template",
            format!("template {t:?} is not defined"),
        )
        .field("template"));
    }
    if req.channel == Channel::Webhook {
        for (i, r) in req.recipients.iter().enumerate() {
            state.guard.check_url(r.address.trim()).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "destination_not_allowed", e)
                    .field(format!("recipients[{i}].address"))
            })?;
        }
    }
    let mut rec = record(&state.deps.codec, topics::REQUESTS, request_id, trace, req)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "registry_unavailable",
                e.to_string(),
            )
        })?;
    if rec.payload.len() > herald_core::worker::MAX_OUTPUT_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!(
                "the request is {} bytes as a record, at most {}",
                rec.payload.len(),
                herald_core::worker::MAX_OUTPUT_BYTES
            ),
        ));
    }
    // The gateway counts this request against the daily quota (below) and vouches for that
    // with a keyed mark, so accept does not count it again.
    rec.headers.push((
        herald_domain::quota::COUNTED_HEADER.into(),
        herald_domain::quota::mark(cfg, &req.app_id, request_id),
    ));
    Ok(rec)
}

fn channel_param(c: &str) -> Result<Channel, ApiError> {
    Channel::ALL
        .into_iter()
        .find(|x| x.as_str().eq_ignore_ascii_case(c))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_channel",
                format!("unknown channel {c:?}"),
            )
            .field("channel")
        })
}

/// `PUT /v1/opt-outs/{channel}/{address}` (the recipient gets nothing more on that channel from
/// this app: messages are `suppressed`, policy `opt_out`) and `DELETE` (opted back in).
async fn opt_out(
    State(state): State<Arc<ApiState>>,
    Path((channel, address)): Path<(String, String)>,
    method: Method,
    Signed { app, .. }: Signed,
) -> Result<Response, ApiError> {
    let channel = channel_param(&channel)?;
    let opted_out = method == Method::PUT;
    // Kept in the form every per-recipient rule keys on (`13800138000` is `+8613800138000`).
    let region = herald_domain::destination::Region::configured(&state.deps.config);
    let normal = herald_domain::opt_out::address(channel, &address, region)
        .map_err(|p| ApiError::new(StatusCode::BAD_REQUEST, p.code, p.message).field("address"))?;
    let db = state.db().await.map_err(db_err)?;
    let mut spellings = herald_domain::destination::spellings(channel, &normal, region);
    spellings.push(address.trim().to_owned());
    herald_domain::opt_out::set(
        &**db,
        &app,
        channel.as_str(),
        &normal,
        &spellings,
        opted_out,
    )
    .await
    .map_err(db_err)?;
    Ok(
        Json(json!({"channel": channel.as_str(), "address": address, "opted_out": opted_out}))
            .into_response(),
    )
}

/// A database problem, by its class ([`herald_domain::store`]): 503 `database_unavailable`
/// (transient: retry), 409 `conflict`, 400 `invalid_input` (a value from the request the
/// database cannot take, e.g. a NUL), 500 `database_error`; never the database's text.
pub(crate) fn db_err(e: impl Into<herald_core::db::PoolFailure>) -> ApiError {
    use herald_domain::store::{Class, StoreError};
    let e = StoreError::from(e.into());
    // The database's text names tables, columns and values: the log has it, the answer not.
    tracing::warn!(class = ?e.class, error = %e.detail(), "database call failed");
    let (status, code) = match e.class {
        Class::Transient => (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
        Class::Conflict => (StatusCode::CONFLICT, "conflict"),
        Class::Invalid => (StatusCode::BAD_REQUEST, "invalid_input"),
        Class::Permanent => (StatusCode::INTERNAL_SERVER_ERROR, "database_error"),
    };
    ApiError::new(status, code, e.to_string())
}

/// A `<created_ms>:<id>` cursor (newest-first pages); no cursor starts at the newest.
pub(crate) fn parse_cursor(cursor: Option<&str>) -> Result<(i64, String), ApiError> {
    match cursor {
        None => Ok((i64::MAX, "\u{10ffff}".to_owned())),
        Some(c) => c
            .split_once(':')
            .and_then(|(ms, id)| Some((ms.parse::<i64>().ok()?, id.to_owned())))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_cursor",
                    "cursor is <ms>:<id>",
                )
                .field("cursor")
            }),
    }
}

/// Publishes and waits for the broker's acknowledgement.
pub(crate) async fn publish(
    state: &ApiState,
    recs: Vec<herald_core::transport::OutRecord>,
) -> Result<(), ApiError> {
    if recs.is_empty() {
        return Ok(());
    }
    let unavailable =
        |e: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "transport_unavailable", e);
    let publisher = state
        .deps
        .transport
        .publisher()
        .map_err(|e| unavailable(e.to_string()))?;
    publisher
        .publish(recs)
        .await
        .map_err(|e| unavailable(e.to_string()))
}

async fn get_message(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    App(app): App,
) -> Result<Response, ApiError> {
    let db = state.db().await.map_err(db_err)?;
    let row = readmodel::message(&**db, &app, &id).await.map_err(db_err)?;
    let Some(row) = row else {
        // Accepted by the gateway, not projected yet: `accepted`, true at once.
        let a = herald_domain::intake::message(&db, &app, &id)
            .await
            .map_err(db_err)?
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "message_not_found",
                    format!("no message {id}"),
                )
            })?;
        return Ok(Json(json!({
            "message_id": a.message_id, "request_id": a.request_id, "app_id": app,
            "channel": a.channel, "recipient": null, "status": "accepted", "provider": null,
            "attempts": 0, "template": null, "template_version": null,
            "created_at": a.at, "updated_at": a.at,
            "timeline": [{"status": "accepted", "at": a.at, "provider": null, "attempt": 0, "reason": null}],
            "delivery_attempts": [],
        }))
        .into_response());
    };
    let timeline: Vec<_> = readmodel::timeline(&**db, &id)
        .await
        .map_err(db_err)?
        .into_iter()
        .map(|e| {
            json!({
                "status": e.status,
                "at": e.at_ms,
                "provider": e.provider,
                "attempt": e.attempt,
                "reason": e.reason_code.map(|c| json!({"code": c, "message": e.reason_message})),
            })
        })
        .collect();
    let delivery_attempts: Vec<_> = readmodel::attempts(&**db, &id)
        .await
        .map_err(db_err)?
        .into_iter()
        .map(|a| {
            json!({
                "attempt": a.attempt,
                "provider": a.provider,
                "outcome": a.outcome,
                "status": a.status,
                "response_code": a.response_code,
                "latency_ms": a.latency_ms,
                "reason_code": a.reason_code,
                "at": a.at_ms,
            })
        })
        .collect();
    metrics::counter!(names::API_REQUESTS, "route" => "get_message", "outcome" => "ok")
        .increment(1);
    Ok(Json(json!({
        "message_id": row.message_id,
        "request_id": row.request_id,
        "app_id": row.app_id,
        "channel": row.channel,
        "recipient": row.recipient,
        "status": row.status,
        "provider": row.provider,
        "attempts": row.attempts,
        "template": row.template,
        "template_version": row.template_version,
        "created_at": row.created_ms,
        "updated_at": row.updated_ms,
        "timeline": timeline,
        "delivery_attempts": delivery_attempts,
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
pub struct Page {
    #[serde(default)]
    pub cursor: Option<String>,
    #[serde(default)]
    pub limit: Option<i64>,
}

/// `GET /v1/requests/{id}`: the request's messages (recipient order of their ids, paginated by
/// message id) and the count per status.
async fn get_request(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    axum::extract::Query(page): axum::extract::Query<Page>,
    App(app): App,
) -> Result<Response, ApiError> {
    let limit = page.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_limit",
            "limit must be 1 to 1000",
        )
        .field("limit"));
    }
    let db = state.db().await.map_err(db_err)?;
    let counts = readmodel::request_counts(&**db, &app, &id)
        .await
        .map_err(db_err)?;
    if counts.is_empty() {
        let accepted = herald_domain::intake::request(&db, &app, &id)
            .await
            .map_err(db_err)?;
        if accepted.is_empty() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "request_not_found",
                format!("no request {id}"),
            ));
        }
        // Accepted by the gateway, not projected yet.
        let after = page.cursor.unwrap_or_default();
        let page_rows: Vec<_> = accepted
            .iter()
            .filter(|a| a.message_id > after)
            .take(limit as usize + 1)
            .collect();
        let more = page_rows.len() as i64 > limit;
        let messages: Vec<_> = page_rows
            .iter()
            .take(limit as usize)
            .map(|a| json!({"message_id": a.message_id, "recipient": null, "status": "accepted"}))
            .collect();
        let next_cursor = more
            .then(|| {
                page_rows
                    .get(limit as usize - 1)
                    .map(|a| a.message_id.clone())
            })
            .flatten();
        return Ok(Json(json!({
            "request_id": id, "app_id": app, "total": accepted.len(),
            "counts": {"accepted": accepted.len()}, "messages": messages,
            "next_cursor": next_cursor,
        }))
        .into_response());
    }
    let total: i64 = counts.iter().map(|(_, n)| n).sum();
    let counts: serde_json::Map<String, serde_json::Value> =
        counts.into_iter().map(|(s, n)| (s, json!(n))).collect();
    let after = page.cursor.unwrap_or_default();
    let rows = readmodel::request_page(&**db, &app, &id, &after, limit + 1)
        .await
        .map_err(db_err)?;
    let more = rows.len() as i64 > limit;
    let messages: Vec<_> = rows
        .iter()
        .take(limit as usize)
        .map(|r| json!({"message_id": r.message_id, "recipient": r.recipient, "status": r.status}))
        .collect();
    let next_cursor = more
        .then(|| {
            messages
                .last()
                .and_then(|m| m["message_id"].as_str().map(str::to_owned))
        })
        .flatten();
    metrics::counter!(names::API_REQUESTS, "route" => "get_request", "outcome" => "ok")
        .increment(1);
    Ok(Json(json!({
        "request_id": id,
        "app_id": app,
        "total": total,
        "counts": counts,
        "messages": messages,
        "next_cursor": next_cursor,
    }))
    .into_response())
}

/// `GET /health` and `/health/ready`: each dependency's state (503 when one is down).
pub async fn health(State(state): State<Arc<ApiState>>) -> Response {
    let (ok, body) = herald_core::health::check(&state.deps, &state.pg, &state.http).await;
    herald_core::health::answer(ok, body)
}

/// The OpenAPI document of this API, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../doc/openapi.json");

/// Every route `router` serves, as (method, path): the OpenAPI document must describe exactly
/// these (a test checks both ways).
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/messages"),
    ("get", "/v1/messages/{id}"),
    ("post", "/v1/messages/{id}/cancel"),
    ("get", "/v1/requests/{id}"),
    ("post", "/v1/requests/{id}/cancel"),
    ("get", "/v1/recipients/{address}/messages"),
    ("get", "/v1/stats"),
    ("get", "/v1/device-tokens/dead"),
    ("delete", "/v1/device-tokens/dead/{channel}/{token}"),
    ("post", "/v1/verifications"),
    ("get", "/v1/verifications/{id}"),
    ("post", "/v1/verifications/{id}/check"),
    ("get", "/v1/templates/{code}"),
    ("put", "/v1/templates/{code}"),
    ("put", "/v1/opt-outs/{channel}/{address}"),
    ("delete", "/v1/opt-outs/{channel}/{address}"),
    ("get", "/v1/inbox/{user}"),
    ("get", "/v1/inbox/{user}/stream"),
    ("post", "/v1/inbox/{user}/{message_id}/read"),
    ("get", "/health"),
    ("get", "/health/ready"),
    ("get", "/health/live"),
    ("get", "/openapi.json"),
];

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response()
}

pub fn router(state: Arc<ApiState>) -> Router {
    let limit = state.deps.config.api.max_body_bytes;
    Router::new()
        .route("/v1/messages", post(send))
        .route("/v1/messages/{id}", get(get_message))
        .route("/v1/requests/{id}", get(get_request))
        .route("/v1/messages/{id}/cancel", post(cancel::message))
        .route("/v1/requests/{id}/cancel", post(cancel::request))
        .route(
            "/v1/opt-outs/{channel}/{address}",
            axum::routing::put(opt_out).delete(opt_out),
        )
        .route("/v1/recipients/{address}/messages", get(reads::history))
        .route("/v1/stats", get(reads::stats))
        .route("/v1/device-tokens/dead", get(device_tokens::list))
        .route(
            "/v1/device-tokens/dead/{channel}/{token}",
            axum::routing::delete(device_tokens::revive),
        )
        .route("/v1/verifications", post(verifications::start))
        .route("/v1/verifications/{id}", get(verifications::get_one))
        .route("/v1/verifications/{id}/check", post(verifications::check))
        .route(
            "/v1/templates/{code}",
            get(templates::get_template).put(templates::put_template),
        )
        .route("/v1/inbox/{user}", get(inbox::list))
        .route("/v1/inbox/{user}/stream", get(inbox::stream))
        .route("/v1/inbox/{user}/{message_id}/read", post(inbox::mark_read))
        .route("/health", get(health))
        .route("/health/ready", get(health))
        .route("/health/live", get(herald_core::health::live))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// Every error answer in the JSON error shape, also those axum and its layers write themselves
/// (body too large, wrong method, unparsable path or query).
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("text/event-stream"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal_error",
        _ => "invalid_request",
    };
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut out = ApiError::new(status, code, message).into_response();
    if let Some(allow) = parts.headers.get(axum::http::header::ALLOW) {
        out.headers_mut()
            .insert(axum::http::header::ALLOW, allow.clone());
    }
    out
}

/// Serves the API until `shutdown`.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> Result<(), StageError> {
    let state = build_state(deps).await?;
    let listen = state.deps.config.api.listen.clone();
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| StageError::Fatal(format!("api listen {listen}: {e}")))?;
    tracing::info!(%listen, "api listening");
    let limits = state.deps.config.api.limits();
    // Accepted messages older than an hour are the projector's: the bridge is purged.
    let purge_db = state.clone();
    let purge_stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = purge_stop.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
            }
            let purged = match purge_db.db().await {
                Ok(db) => herald_domain::intake::purge(&db)
                    .await
                    .map_err(herald_core::db::PoolFailure::from),
                Err(e) => Err(e),
            };
            if let Err(e) = purged {
                tracing::warn!(error = %e, "intake purge");
            }
        }
    });
    herald_core::serve::serve(listener, router(state), limits, shutdown)
        .await
        .map_err(|e| StageError::Fatal(format!("api: {e}")))
}

/// The API's state (the console builds its own, to share the API's code paths).
pub async fn build_state(deps: Deps) -> Result<Arc<ApiState>, StageError> {
    // The API may start before any other stage: the schema is brought up to date first.
    drop(herald_domain::schema::migrated(&deps).await?);
    let pg = deps.shared_db().await?;
    let limits = deps
        .config
        .apps
        .iter()
        .filter_map(|a| {
            let rate = std::num::NonZeroU32::new(a.rate_limit_per_sec?)?;
            Some((
                a.id.clone(),
                governor::RateLimiter::direct(governor::Quota::per_second(rate)),
            ))
        })
        .collect();
    let template_puts = governor::RateLimiter::keyed(governor::Quota::per_minute(
        std::num::NonZeroU32::new(deps.config.template_store.puts_per_minute)
            .unwrap_or(std::num::NonZeroU32::MIN),
    ));
    let inbox = inbox::listen(deps.config.postgres.url.clone());
    let secrets = deps
        .config
        .apps
        .iter()
        .map(|a| (a.id.clone(), a.secret.clone()))
        .collect();
    let deps_guard = deps.config.security.outbound_allow.clone();
    let window = deps.config.api.signature_window_secs as i64;
    let db = pg.clone();
    let nonce_writes = Coalescer::spawn(GROUP_COMMIT_MAX, move |nonces: Vec<(String, String)>| {
        let db = db.clone();
        async move {
            let c = db.get().await.map_err(|e| e.to_string())?;
            auth::remember_nonces(&c, &nonces, window)
                .await
                .map_err(|e| e.to_string())
        }
    });
    let db = pg.clone();
    let intake_writes = Coalescer::spawn(GROUP_COMMIT_MAX, move |rows: Vec<_>| {
        let db = db.clone();
        async move {
            let c = db.get().await.map_err(|e| e.to_string())?;
            let n = rows.len();
            herald_domain::intake::record_many(&c, &rows)
                .await
                .map(|()| vec![(); n])
                .map_err(|e| e.to_string())
        }
    });
    let state = Arc::new(ApiState {
        deps,
        pg,
        nonces: auth::NonceCache::default(),
        nonce_writes,
        intake_writes,
        secrets,
        http: reqwest::Client::new(),
        inbox,
        limits,
        guard: herald_core::netguard::Guard::new(&deps_guard),
        streams: Default::default(),
        template_puts,
    });
    Ok(state)
}

#[cfg(test)]
mod openapi_tests {
    use super::*;

    #[test]
    fn the_openapi_document_describes_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented = Vec::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                assert!(op["responses"].is_object(), "{method} {path} has responses");
                documented.push((method.clone(), path.clone()));
            }
        }
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
        // Every $ref resolves.
        let text = OPENAPI;
        for piece in text.split("\"$ref\": \"#/").skip(1) {
            let target = piece.split('"').next().unwrap();
            let mut node = &doc;
            for part in target.split('/') {
                node = &node[part];
            }
            assert!(!node.is_null(), "dangling $ref {target}");
        }
    }
}
