//! Template management (CONTRACT.md §2): `PUT /v1/templates/{code}` stores the next version
//! (after checking that it compiles), `GET /v1/templates/{code}[?version=N]` reads one. The store
//! is PostgreSQL ([`herald_domain::templates`]); render workers pick new versions up within a
//! second, and each rendered message records the version it used.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use herald_core::config::TemplateConfig;
use serde::Deserialize;
use serde_json::json;

use crate::{ApiError, ApiState, App, Signed, db_err};

#[derive(Debug, Deserialize)]
pub struct VersionQuery {
    #[serde(default)]
    pub version: Option<i32>,
}

fn view(t: &TemplateConfig) -> serde_json::Value {
    json!({
        "code": t.code, "app": t.app, "channel": t.channel, "version": t.version, "subject": t.subject,
        "text": t.text, "html": t.html, "markdown": t.markdown,
        "provider_template": t.provider_template, "provider_params": t.provider_params,
        "provider_templates": t.provider_templates,
    })
}

pub async fn put_template(
    State(state): State<Arc<ApiState>>,
    Path(code): Path<String>,
    Signed { app, body }: Signed,
) -> Result<Response, ApiError> {
    // Every render child and watcher loads the store: an app may not grow it at will.
    if let Err(not_until) = state.template_puts.check_key(&app) {
        use governor::clock::Clock;
        let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "app {app} stores at most {} templates a minute",
                state.deps.config.template_store.puts_per_minute
            ),
        );
        e.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        return Err(e);
    }
    let bounds = &state.deps.config.template_store;
    let t = submitted(&code, &body, bounds)?;
    let mut db = state.db().await.map_err(db_err)?;
    let stored = herald_domain::templates::put(&mut db, &app, t, bounds)
        .await
        .map_err(put_error)?;
    Ok((StatusCode::CREATED, Json(view(&stored))).into_response())
}

/// The template a `PUT /v1/templates/{code}` body describes, checked as every submitted
/// template is ([`herald_domain::templates::checked`]); or the 4xx that refuses it. The body is
/// a template as in the config file, minus `code` (the path), `version` (the store assigns the
/// next one) and `app` (the caller).
pub fn submitted(
    code: &str,
    body: &[u8],
    bounds: &herald_core::config::TemplateStoreConfig,
) -> Result<TemplateConfig, ApiError> {
    use herald_domain::templates::Refusal;
    let invalid = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", m);
    if !herald_domain::templates::valid_code(code) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_code",
            Refusal::Code.to_string(),
        )
        .field("code"));
    }
    let mut fields: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
    for k in ["code", "version", "app"] {
        if fields.contains_key(k) {
            return Err(invalid(format!("{k} is not part of the body")).field(k));
        }
    }
    fields.insert("code".into(), json!(code));
    let t: TemplateConfig = serde_json::from_value(serde_json::Value::Object(fields))
        .map_err(|e| invalid(e.to_string()))?;
    herald_domain::templates::checked(t, bounds).map_err(|r| {
        let status = match r {
            Refusal::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, r.code(), r.to_string())
    })
}

/// The store's refusal in the JSON error shape.
fn put_error(e: herald_domain::templates::PutError) -> ApiError {
    use herald_domain::templates::PutError;
    match e {
        PutError::TooLarge { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "template_too_large",
            e.to_string(),
        ),
        PutError::TooManyCodes { .. } => {
            ApiError::new(StatusCode::CONFLICT, "too_many_templates", e.to_string()).field("code")
        }
        PutError::Db(e) => db_err(e),
    }
}

pub async fn get_template(
    State(state): State<Arc<ApiState>>,
    Path(code): Path<String>,
    Query(q): Query<VersionQuery>,
    App(app): App,
) -> Result<Response, ApiError> {
    let t =
        herald_domain::templates::get(&*state.db().await.map_err(db_err)?, &app, &code, q.version)
            .await
            .map_err(db_err)?
            .or_else(|| {
                state
                    .deps
                    .config
                    .templates
                    .iter()
                    .filter(|t| {
                        t.code == code
                            && t.app.as_deref().is_none_or(|a| a == app)
                            && q.version.is_none_or(|v| v == t.version)
                    })
                    .max_by_key(|t| t.version)
                    .cloned()
            })
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "template_not_found",
                    format!("no template {code}"),
                )
            })?;
    Ok(Json(view(&t)).into_response())
}
