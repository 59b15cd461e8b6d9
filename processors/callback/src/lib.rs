//! Callback stage: receipt endpoints for providers. `POST /callbacks/{provider}` takes a
//! generic receipt (JSON) signed per the Standard Webhooks spec with the provider's
//! `callback_secret`; a verified receipt becomes `ReceiptReceived` on `herald.receipts.v1`, and
//! the provider is acknowledged (200) only after the broker acknowledged the write. Anything
//! unverifiable gets 401 and publishes nothing. Provider-specific receipt formats (Aliyun
//! SmsReport, Tencent status callbacks) plug in here.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use herald_core::runtime::Deps;
use herald_core::util::{event_id, now_ms, random_id, standard_webhook_verify};
use herald_core::worker::{StageError, record};
use herald_schemas::{Channel, EventHeader, Reason, ReceiptReceived, topics};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub const STAGE: &str = "callback";

struct CallbackState {
    deps: Deps,
    secrets: HashMap<String, Vec<u8>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenericReceipt {
    message_id: String,
    request_id: String,
    app_id: String,
    channel: Channel,
    /// `delivered` or `undelivered`.
    status: String,
    code: String,
    #[serde(default)]
    provider_message_id: Option<String>,
    #[serde(default)]
    attempt: Option<i32>,
    #[serde(default)]
    reported_at: Option<i64>,
}

fn err(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

async fn receipt(
    State(st): State<Arc<CallbackState>>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(key) = st.secrets.get(&provider) else {
        return err(
            StatusCode::NOT_FOUND,
            "unknown_provider",
            format!("no callbacks configured for {provider}"),
        );
    };
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    if !standard_webhook_verify(
        key,
        &h("webhook-id"),
        &h("webhook-timestamp"),
        &h("webhook-signature"),
        &body,
        now_ms() / 1000,
        300,
    ) {
        return err(
            StatusCode::UNAUTHORIZED,
            "bad_signature",
            "receipt signature does not verify".into(),
        );
    }
    let r: GenericReceipt = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return err(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()),
    };
    if r.status != "delivered" && r.status != "undelivered" {
        return err(
            StatusCode::BAD_REQUEST,
            "invalid_status",
            format!("status {:?}: want delivered or undelivered", r.status),
        );
    }
    let attempt = r.attempt.unwrap_or(1);
    let ev = ReceiptReceived {
        header: EventHeader {
            event_id: event_id(&r.message_id, &format!("receipt:{}", r.status), attempt),
            event_time: now_ms(),
            stage: STAGE.into(),
            trace_id: random_id(),
            message_id: r.message_id.clone(),
            request_id: r.request_id,
            app_id: r.app_id,
            channel: r.channel,
            attempt,
            metadata: Default::default(),
        },
        provider,
        reason: (r.status == "undelivered")
            .then(|| Reason::new(r.code.clone(), "provider reported undelivered")),
        status: r.status,
        provider_status_code: r.code,
        provider_message_id: r.provider_message_id,
        reported_at: r.reported_at.unwrap_or_else(now_ms),
    };
    let publish = async {
        let rec = record(
            &st.deps.codec,
            topics::RECEIPTS,
            &r.message_id,
            &ev.header.trace_id,
            &ev,
        )
        .await
        .map_err(|e| e.to_string())?;
        let p = st.deps.transport.publisher().map_err(|e| e.to_string())?;
        p.publish(vec![rec]).await.map_err(|e| e.to_string())
    };
    match publish.await {
        Ok(()) => (StatusCode::OK, Json(json!({"ok": true}))).into_response(),
        // The provider retries a failed callback: nothing is lost.
        Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
    }
}

pub fn router(deps: Deps) -> Router {
    let secrets = deps
        .config
        .providers
        .iter()
        .filter_map(|p| {
            Some((
                p.code.clone(),
                herald_core::util::webhook_key(p.credentials.get("callback_secret")?),
            ))
        })
        .collect();
    Router::new()
        .route("/callbacks/{provider}", post(receipt))
        .with_state(Arc::new(CallbackState { deps, secrets }))
}

/// Serves the callback endpoints on `listen` until `shutdown`.
pub async fn run(
    deps: Deps,
    listen: String,
    shutdown: CancellationToken,
) -> Result<(), StageError> {
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| StageError::Fatal(format!("callback listen {listen}: {e}")))?;
    axum::serve(listener, router(deps))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|e| StageError::Fatal(format!("callback: {e}")))
}
