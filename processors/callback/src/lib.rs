//! Callback stage: receipt endpoints for providers. A receipt becomes `ReceiptReceived` on
//! `herald.receipts.v1`, and the provider is acknowledged only after the broker acknowledged the
//! write (otherwise 5xx, and the provider retries).
//!
//! - `POST /callbacks/{provider}`: a generic receipt (JSON) signed per the Standard Webhooks
//!   spec with the provider's `callback_secret`; unverifiable → 401, nothing published.
//! - `POST /callbacks/{provider}/{token}`: SMS receipt pushes (Aliyun SmsReport, Tencent status
//!   callback), which are unsigned: the path carries the provider's `callback_token`. Each report
//!   is matched to its message through the send ledger, and only if that provider sent it.

pub mod sms;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use herald_core::config::ProviderKind;
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
    /// SMS providers: code → (kind, callback token).
    sms: HashMap<String, (&'static str, String)>,
    db: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl CallbackState {
    /// Attempts and message facts for reports, from the send ledger: keyed by message id and by
    /// provider message id.
    async fn lookup(
        &self,
        provider: &str,
        reports: &[sms::Report],
    ) -> Result<Vec<Option<LedgerRow>>, String> {
        let mut g = self.db.lock().await;
        if g.as_ref().is_none_or(|c| c.is_closed()) {
            *g = Some(
                self.deps
                    .postgres()
                    .await
                    .map_err(herald_core::runtime::pg_error)?,
            );
        }
        let Some(db) = g.as_ref() else {
            return Err("no database".into());
        };
        let ids: Vec<&str> = reports
            .iter()
            .filter_map(|r| r.message_id.as_deref())
            .collect();
        let pids: Vec<&str> = reports
            .iter()
            .filter_map(|r| r.provider_message_id.as_deref())
            .collect();
        let rows = db
            .query(
                "SELECT message_id, attempt, request_id, app_id, channel, provider_message_id
                 FROM send_ledger
                 WHERE provider = $1 AND (outcome IS NULL OR outcome IN ('SUCCEEDED', 'UNKNOWN'))
                   AND (message_id = ANY($2) OR provider_message_id = ANY($3))
                 ORDER BY attempt",
                &[&provider, &ids, &pids],
            )
            .await
            .map_err(herald_core::runtime::pg_error)?;
        let rows: Vec<LedgerRow> = rows
            .iter()
            .map(|r| LedgerRow {
                message_id: r.get(0),
                attempt: r.get(1),
                request_id: r.get::<_, Option<String>>(2).unwrap_or_default(),
                app_id: r.get::<_, Option<String>>(3).unwrap_or_default(),
                channel: r.get::<_, Option<String>>(4).unwrap_or_default(),
                provider_message_id: r.get(5),
            })
            .collect();
        Ok(reports
            .iter()
            .map(|rep| {
                rows.iter()
                    .rev()
                    .find(|row| match (&rep.provider_message_id, &rep.message_id) {
                        // The provider id is unknown to us when the send's answer was lost.
                        (Some(p), Some(m)) => {
                            row.message_id == *m
                                && row.provider_message_id.as_deref().is_none_or(|x| x == p)
                        }
                        (Some(p), None) => row.provider_message_id.as_deref() == Some(p),
                        (None, Some(m)) => row.message_id == *m,
                        (None, None) => false,
                    })
                    .cloned()
            })
            .collect())
    }
}

#[derive(Debug, Clone)]
struct LedgerRow {
    message_id: String,
    attempt: i32,
    request_id: String,
    app_id: String,
    channel: String,
    provider_message_id: Option<String>,
}

async fn sms_receipt(
    State(st): State<Arc<CallbackState>>,
    Path((provider, token)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Some((kind, want)) = st.sms.get(&provider) else {
        return err(
            StatusCode::NOT_FOUND,
            "unknown_provider",
            format!("no receipts for {provider}"),
        );
    };
    if !herald_core::sign::ct_eq(want, &token) {
        return err(
            StatusCode::NOT_FOUND,
            "unknown_provider",
            format!("no receipts for {provider}"),
        );
    }
    let reports = match sms::parse(kind, &body) {
        Ok(r) => r,
        Err(e) => return err(StatusCode::BAD_REQUEST, "invalid_body", e),
    };
    let rows = match st.lookup(&provider, &reports).await {
        Ok(r) => r,
        Err(e) => return err(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
    };
    let mut records = Vec::new();
    let mut unmatched = 0;
    for (rep, row) in reports.iter().zip(rows) {
        let Some(row) = row else {
            // Not (yet) a message this provider sent for us: a receipt can overtake the send's
            // answer. Never attributed to anything; the provider is asked to push it again.
            metrics::counter!(herald_core::telemetry::names::RECEIPTS, "provider" => provider.clone(), "result" => "unmatched").increment(1);
            tracing::warn!(%provider, "receipt for no message this provider sent (yet)");
            unmatched += 1;
            continue;
        };
        let Some(channel) = Channel::ALL.into_iter().find(|c| c.as_str() == row.channel) else {
            continue;
        };
        let status = if rep.delivered {
            "delivered"
        } else {
            "undelivered"
        };
        metrics::counter!(herald_core::telemetry::names::RECEIPTS, "provider" => provider.clone(), "result" => status).increment(1);
        let ev = ReceiptReceived {
            header: EventHeader {
                // Deterministic: a receipt pushed twice is the same fact.
                event_id: event_id(&row.message_id, &format!("receipt:{status}"), row.attempt),
                event_time: now_ms(),
                stage: STAGE.into(),
                trace_id: random_id(),
                message_id: row.message_id.clone(),
                request_id: row.request_id.clone(),
                app_id: row.app_id.clone(),
                channel,
                attempt: row.attempt,
                metadata: Default::default(),
            },
            provider: provider.clone(),
            status: status.into(),
            provider_status_code: rep.code.clone(),
            provider_message_id: rep.provider_message_id.clone(),
            reason: (!rep.delivered).then(|| Reason::new(rep.code.clone(), rep.message.clone())),
            reported_at: now_ms(),
        };
        match record(
            &st.deps.codec,
            topics::RECEIPTS,
            &row.message_id,
            &ev.header.trace_id,
            &ev,
        )
        .await
        {
            Ok(r) => records.push(r),
            Err(e) => {
                return err(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    e.to_string(),
                );
            }
        }
    }
    if !records.is_empty() {
        let published = match st.deps.transport.publisher() {
            Ok(p) => p.publish(records).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = published {
            return err(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e);
        }
    }
    if unmatched > 0 {
        // The matched ones are published (their event ids are deterministic, so the retry's
        // copies are the same facts); 5xx makes the provider push the batch again later.
        return err(
            StatusCode::SERVICE_UNAVAILABLE,
            "unmatched_receipts",
            format!("{unmatched} report(s) match no message sent by {provider} yet"),
        );
    }
    (StatusCode::OK, Json(sms::ack(kind))).into_response()
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
    // Only a message this provider really sent can get its receipt.
    let probe = sms::Report {
        message_id: Some(r.message_id.clone()),
        provider_message_id: None,
        delivered: r.status == "delivered",
        code: r.code.clone(),
        message: String::new(),
    };
    match st.lookup(&provider, std::slice::from_ref(&probe)).await {
        Ok(rows) if rows.first().is_some_and(|row| row.is_some()) => {}
        Ok(_) => {
            return err(
                StatusCode::NOT_FOUND,
                "unknown_message",
                format!("{provider} sent no message {}", r.message_id),
            );
        }
        Err(e) => return err(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
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
    let sms = deps
        .config
        .providers
        .iter()
        .filter(|p| matches!(p.kind, ProviderKind::AliyunSms | ProviderKind::TencentSms))
        .filter_map(|p| {
            Some((
                p.code.clone(),
                (
                    p.kind.as_str(),
                    p.credentials.get("callback_token")?.clone(),
                ),
            ))
        })
        .collect();
    Router::new()
        .route("/callbacks/{provider}", post(receipt))
        .route("/callbacks/{provider}/{token}", post(sms_receipt))
        .with_state(Arc::new(CallbackState {
            deps,
            secrets,
            sms,
            db: tokio::sync::Mutex::new(None),
        }))
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
