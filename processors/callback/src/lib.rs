//! Callback stage: receipt endpoints for providers. A receipt becomes `ReceiptReceived` on
//! `herald.receipts.v1`, and the provider is acknowledged only after the broker acknowledged the
//! write (otherwise 5xx, and the provider retries).
//!
//! - `POST /callbacks/{provider}`: a generic receipt (JSON) signed per the Standard Webhooks
//!   spec with the provider's `callback_secret`; unverifiable → 401, nothing published.
//! - `POST /callbacks/{provider}/{token}`: SMS receipt pushes (Aliyun SmsReport, Tencent status
//!   callback), which are unsigned: the path carries the provider's `callback_token`. Each report
//!   is matched to its message through the send ledger, and only if that provider sent it.
//!
//! An `undelivered` receipt meets the `callback_failure` rules (CONTRACT.md §4): `retry` and
//! `switch_provider` put the next attempt on its way (the send stage kept the message in its
//! ledger for this), `alert` tells the operator, `fail` (or no rule) lets the receipt stand.
//! The decision travels in the receipt event, so the projector keeps a resent message `sent`.
//! Every receipt also feeds the provider's receipt breaker: a provider that accepts calls but
//! delivers nothing is opened for routing like one that refuses them.
//!
//! - Reads: HTTP receipt pushes (no topic).
//! - Writes: `herald.receipts.v1` (`ReceiptReceived`), the next attempt (`herald.dispatch.*` or
//!   `herald.delay.<n>s`).
//! - Tables: owns `receipt_ids` (replayed signed receipts); reads `send_ledger` through the send
//!   ledger's lookup, ends `receipt_waits`, feeds `provider_health`, enqueues alerts in the webhook outbox
//!   (owners in `herald-domain`).
//! - Promise: a provider is acknowledged only for receipts published; each is matched to an
//!   attempt that provider really made.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use herald_core::runtime::Deps;
use herald_core::util::{event_id, now_ms, standard_webhook_verify};
use herald_core::worker::{StageError, record};
use herald_domain::failure::alert::{Alert, Scene};
use herald_domain::failure::breaker::{Breakers, OpenSet, Signal};
use herald_domain::failure::eligible::Eligible;
use herald_domain::failure::outcome::consequence;
use herald_domain::failure::rules::Rules;
use herald_domain::failure::{CallResult, next_attempt};
use herald_providers::{REGISTRY, Receipts, Report};
use herald_schemas::{
    Channel, DeliveryOutcome, EventHeader, MessageRouted, Reason, ReceiptReceived, topics,
};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub const STAGE: &str = "callback";

/// Why a receipt cannot be taken now. Every cause is transient: the provider is answered 503
/// and pushes the receipt again later.
#[derive(Debug, thiserror::Error)]
enum Unavailable {
    #[error("database: {0}")]
    Database(String),
    #[error("codec: {0}")]
    Codec(#[from] herald_core::codec::CodecError),
    #[error("broker: {0}")]
    Broker(String),
}

impl From<tokio_postgres::Error> for Unavailable {
    fn from(e: tokio_postgres::Error) -> Self {
        Unavailable::Database(herald_core::runtime::pg_error(e))
    }
}

struct CallbackState {
    deps: Deps,
    secrets: HashMap<String, Vec<u8>>,
    /// Providers that push receipts: code → (their format, callback token).
    sms: HashMap<String, (&'static Receipts, String)>,
    db: tokio::sync::Mutex<Db>,
    rules: Rules,
    /// Receipt breakers per provider.
    breakers: Breakers,
    /// Provider code → kind (where a rule may move a message on).
    kinds: HashMap<String, String>,
}

#[derive(Default)]
struct Db {
    client: Option<tokio_postgres::Client>,
    /// Providers open by either signal (`switch_provider` skips them).
    open: OpenSet,
}

/// What a receipt's rule decision adds to the receipt: its reason, the records to publish
/// with it, and the alerts to send after.
struct Follow<'a> {
    reason: &'a mut Option<Reason>,
    records: &'a mut Vec<herald_core::transport::OutRecord>,
    alerts: &'a mut Vec<PendingAlert>,
}

/// An alert for the outbox: rule, message, attempt, report.
type PendingAlert = (String, MessageRouted, i32, Report);

/// A report matched to the attempt it is about.
struct Matched {
    report: Report,
    row: LedgerRow,
    reported_at: i64,
}

impl CallbackState {
    /// Claims a signed receipt's `webhook-id`; false when it was already taken (a replay).
    async fn claim_receipt(&self, provider: &str, id: &str) -> Result<bool, Unavailable> {
        let mut g = self.db.lock().await;
        let db = Self::connected(&self.deps, &mut g).await?;
        static CLAIMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        // Past the signature window a replay fails verification anyway.
        if CLAIMS
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(500)
        {
            db.execute(
                "DELETE FROM receipt_ids WHERE at < now() - interval '15 minutes'",
                &[],
            )
            .await
            .map_err(Unavailable::from)?;
        }
        let n = db
            .execute(
                "INSERT INTO receipt_ids (provider, webhook_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&provider, &id],
            )
            .await
            .map_err(Unavailable::from)?;
        Ok(n == 1)
    }

    /// Gives a claimed `webhook-id` back when its receipt could not be published (the provider
    /// retries it).
    async fn release_receipt(&self, provider: &str, id: &str) {
        let mut g = self.db.lock().await;
        if let Ok(db) = Self::connected(&self.deps, &mut g).await {
            let _ = db
                .execute(
                    "DELETE FROM receipt_ids WHERE provider = $1 AND webhook_id = $2",
                    &[&provider, &id],
                )
                .await;
        }
    }

    /// Attempts and message facts for reports, from the send ledger: keyed by message id and by
    /// provider message id.
    async fn lookup(
        &self,
        provider: &str,
        reports: &[Report],
    ) -> Result<Vec<Option<LedgerRow>>, Unavailable> {
        let mut g = self.db.lock().await;
        let db = Self::connected(&self.deps, &mut g).await?;
        let ids: Vec<&str> = reports
            .iter()
            .filter_map(|r| r.message_id.as_deref())
            .collect();
        let pids: Vec<&str> = reports
            .iter()
            .filter_map(|r| r.provider_message_id.as_deref())
            .collect();
        let rows = herald_domain::ledger::receipt_candidates(db, provider, &ids, &pids)
            .await
            .map_err(Unavailable::from)?;
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

use herald_domain::ledger::ReceiptCandidate as LedgerRow;

impl CallbackState {
    async fn connected<'a>(
        deps: &Deps,
        g: &'a mut Db,
    ) -> Result<&'a tokio_postgres::Client, Unavailable> {
        if g.client.as_ref().is_none_or(|c| c.is_closed()) {
            g.client = Some(deps.postgres().await.map_err(Unavailable::from)?);
        }
        g.client
            .as_ref()
            .ok_or_else(|| Unavailable::Database("no database".into()))
    }

    /// The `callback_failure` rules on an undelivered receipt for the message the send stage
    /// kept (`row.routed`): the decision's name, the next attempt (into `follow.records`), the
    /// alert to send, and the rule noted in the reason.
    async fn apply_rules(
        &self,
        provider: &str,
        row: &LedgerRow,
        rep: &Report,
        open: &OpenSet,
        trace: &str,
        follow: &mut Follow<'_>,
    ) -> Result<Option<&'static str>, Unavailable> {
        let Some(kept) = &row.routed else {
            return Ok(None);
        };
        let m = match self.deps.codec.decode::<MessageRouted>(kept).await {
            Ok(m) => m,
            // The registry is away: the receipt waits for it rather than skip its rules.
            Err(e) if e.is_transient() => return Err(e.into()),
            // The kept record is ours; unreadable, the receipt still stands.
            Err(e) => {
                tracing::warn!(message_id = %row.message_id, error = %e, "kept message unreadable; no callback rules");
                return Ok(None);
            }
        };
        let eligible = Eligible::new(&self.kinds, &herald_providers::REGISTRY, open)
            .with_breakers(&self.breakers);
        let available = |c: &str| eligible.now(c, &m.recipient.address);
        let now = now_ms();
        let Some(d) =
            self.rules
                .decide_receipt(&m, row.attempt, &rep.code, &rep.message, now, available)
        else {
            return Ok(None);
        };
        metrics::counter!(herald_core::telemetry::names::RULE_ACTIONS, "provider" => provider.to_owned(), "action" => d.label())
            .increment(1);
        let c = consequence(&d, follow.reason.take(), &m.provider);
        *follow.reason = c.reason;
        if let Some(next) = c.next {
            follow.records.push(
                next_attempt(&self.deps.codec, STAGE, &m, row.attempt, next, trace, now).await?,
            );
        }
        if let Some(rule) = c.alert {
            follow.alerts.push((rule, m, row.attempt, rep.clone()));
        }
        Ok(Some(c.name))
    }

    /// Publishes one `ReceiptReceived` per matched report, with the `callback_failure` rules'
    /// decision and the next attempt it calls for, all in one publish (the provider is
    /// acknowledged only after it). Then feeds the receipt breakers and sends alerts.
    async fn publish(&self, provider: &str, matched: Vec<Matched>) -> Result<(), Unavailable> {
        let now = now_ms();
        let mut records = Vec::new();
        let mut alerts = Vec::new();
        let mut observed = Vec::with_capacity(matched.len());
        let arrived: Vec<(String, i32)> = matched
            .iter()
            .map(|m| (m.row.message_id.clone(), m.row.attempt))
            .collect();
        let open = {
            let mut g = self.db.lock().await;
            // Without the database every provider counts as available.
            let _ = Self::connected(&self.deps, &mut g).await;
            let Db { client, open } = &mut *g;
            if let Some(c) = client.as_ref() {
                open.refresh(c).await;
            }
            open.clone()
        };
        for Matched {
            report: rep,
            row,
            reported_at,
        } in matched
        {
            let Some(channel) = Channel::ALL.into_iter().find(|c| c.as_str() == row.channel) else {
                continue;
            };
            let status = if rep.delivered {
                "delivered"
            } else {
                "undelivered"
            };
            observed.push((
                (row.message_id.clone(), row.attempt),
                (provider.to_owned(), !rep.delivered),
            ));
            metrics::counter!(herald_core::telemetry::names::RECEIPTS, "provider" => provider.to_owned(), "result" => status).increment(1);
            let trace = herald_core::trace::new_root();
            let mut reason =
                (!rep.delivered).then(|| Reason::new(rep.code.clone(), rep.message.clone()));
            let decision = if rep.delivered {
                None
            } else {
                let mut follow = Follow {
                    reason: &mut reason,
                    records: &mut records,
                    alerts: &mut alerts,
                };
                self.apply_rules(provider, &row, &rep, &open, &trace, &mut follow)
                    .await?
            };
            let ev = ReceiptReceived {
                header: EventHeader {
                    // Deterministic: a receipt pushed twice is the same fact.
                    event_id: event_id(&row.message_id, &format!("receipt:{status}"), row.attempt),
                    event_time: now,
                    stage: STAGE.into(),
                    trace_id: herald_core::trace::trace_id_of(&trace),
                    message_id: row.message_id.clone(),
                    request_id: row.request_id.clone(),
                    app_id: row.app_id.clone(),
                    channel,
                    attempt: row.attempt,
                    metadata: Default::default(),
                },
                provider: provider.to_owned(),
                status: status.into(),
                provider_status_code: rep.code.clone(),
                provider_message_id: rep
                    .provider_message_id
                    .clone()
                    .or(row.provider_message_id.clone()),
                reason,
                reported_at,
                decision: decision.map(str::to_owned),
            };
            records.push(
                record(
                    &self.deps.codec,
                    topics::RECEIPTS,
                    &row.message_id,
                    &trace,
                    &ev,
                )
                .await?,
            );
        }
        // Alerts go into the outbox before the receipts are published: a failure here is a
        // 503, the provider calls again, and the outbox takes each alert once.
        if !alerts.is_empty() {
            let alerts: Vec<Alert> = alerts
                .into_iter()
                .map(|(rule, m, attempt, rep)| {
                    let r = CallResult::fail(
                        DeliveryOutcome::FailedPermanent,
                        Some(rep.code.clone()),
                        Reason::new(rep.code, rep.message),
                    );
                    Alert::new(Scene::CallbackFailure, &rule, &m, attempt, &r)
                })
                .collect();
            let mut g = self.db.lock().await;
            let db = Self::connected(&self.deps, &mut g).await?;
            herald_domain::failure::alert::enqueue(db, &alerts)
                .await
                .map_err(Unavailable::from)?;
        }
        if !records.is_empty() {
            let p = self
                .deps
                .transport
                .publisher()
                .map_err(|e| Unavailable::Broker(e.to_string()))?;
            p.publish(records)
                .await
                .map_err(|e| Unavailable::Broker(e.to_string()))?;
        }
        // These attempts wait for their receipt no longer (else the deadline would end a
        // message a receipt rule is sending again). A failure here is a 503: the provider
        // pushes again and the same facts are published again.
        let first = if arrived.is_empty() {
            Vec::new()
        } else {
            let mut g = self.db.lock().await;
            let db = Self::connected(&self.deps, &mut g).await?;
            let keys: Vec<(&str, i32)> = arrived.iter().map(|(m, a)| (m.as_str(), *a)).collect();
            herald_domain::failure::receipt_wait::received(db, &keys)
                .await
                .map_err(Unavailable::from)?
        };
        // Only an attempt's first receipt counts toward its provider's receipt breaker: the
        // same receipt pushed again (a retry after a 503, a replayed SMS push) is the same fact.
        let mut counted = std::collections::HashSet::new();
        let observed: Vec<(String, bool)> = observed
            .into_iter()
            .filter(|(key, _)| first.contains(key) && counted.insert(key.clone()))
            .map(|(_, o)| o)
            .collect();
        let changes = self.breakers.record_failed(&observed);
        if !changes.is_empty() {
            let g = self.db.lock().await;
            if let Some(db) = &g.client
                && let Err(e) = self.breakers.persist(db, &changes).await
            {
                tracing::warn!(error = %herald_core::runtime::pg_error(e), "receipt breaker state not persisted");
            }
        }

        Ok(())
    }
}

async fn sms_receipt(
    State(st): State<Arc<CallbackState>>,
    Path((provider, token)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Some((format, want)) = st.sms.get(&provider) else {
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
    let parsed = match (format.parse)(&body) {
        Ok(r) => r,
        Err(e) => return err(StatusCode::BAD_REQUEST, "invalid_body", e),
    };
    // A report naming no usable id is refused on its own (it matches nothing we sent, and
    // asking for it again would bring it back for ever); the others in the push go on.
    let mut reports = Vec::with_capacity(parsed.len());
    let mut refused = None;
    for r in parsed {
        match r.checked() {
            Ok(r) => reports.push(r),
            Err(e) => {
                metrics::counter!(herald_core::telemetry::names::RECEIPTS, "provider" => provider.clone(), "result" => "invalid").increment(1);
                tracing::warn!(%provider, error = %e, "receipt report refused");
                refused = Some(e);
            }
        }
    }
    if let (true, Some(e)) = (reports.is_empty(), refused) {
        return err(StatusCode::BAD_REQUEST, "invalid_body", e);
    }
    let rows = match st.lookup(&provider, &reports).await {
        Ok(r) => r,
        Err(e) => {
            return err(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            );
        }
    };
    let mut matched = Vec::new();
    let mut unmatched = 0;
    for (rep, row) in reports.into_iter().zip(rows) {
        let Some(row) = row else {
            // Not (yet) a message this provider sent for us: a receipt can overtake the send's
            // answer. Never attributed to anything; the provider is asked to push it again.
            metrics::counter!(herald_core::telemetry::names::RECEIPTS, "provider" => provider.clone(), "result" => "unmatched").increment(1);
            tracing::warn!(%provider, "receipt for no message this provider sent (yet)");
            unmatched += 1;
            continue;
        };
        matched.push(Matched {
            report: rep,
            row,
            reported_at: now_ms(),
        });
    }
    if let Err(e) = st.publish(&provider, matched).await {
        return err(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        );
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
    (StatusCode::OK, Json((format.ack)())).into_response()
}

/// The generic receipt body (`POST /callbacks/{provider}`), checked: the status is
/// `delivered` or `undelivered`.
pub fn parse_generic(body: &[u8]) -> Result<GenericReceipt, String> {
    let r: GenericReceipt = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if r.status != "delivered" && r.status != "undelivered" {
        return Err(format!(
            "status {:?}: want delivered or undelivered",
            r.status
        ));
    }
    Ok(r)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenericReceipt {
    message_id: String,
    /// Optional: when given, they must match what the ledger has for the message.
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    app_id: Option<String>,
    #[serde(default)]
    channel: Option<Channel>,
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
    let r = match parse_generic(&body) {
        Ok(r) => r,
        Err(e) => return err(StatusCode::BAD_REQUEST, "invalid_body", e),
    };
    // Only a message this provider really sent can get its receipt.
    let report = match (Report {
        message_id: Some(r.message_id.clone()),
        provider_message_id: r.provider_message_id.clone(),
        delivered: r.status == "delivered",
        code: r.code.clone(),
        message: "provider reported undelivered".into(),
    })
    .checked()
    {
        Ok(r) => r,
        Err(e) => return err(StatusCode::BAD_REQUEST, "invalid_body", e),
    };
    let row = match st.lookup(&provider, std::slice::from_ref(&report)).await {
        Ok(mut rows) => match rows.pop().flatten() {
            // The attempt (and request, app, channel) the provider names, when it names them.
            Some(row)
                if r.attempt.is_none_or(|a| a == row.attempt)
                    && r.request_id.as_ref().is_none_or(|x| *x == row.request_id)
                    && r.app_id.as_ref().is_none_or(|x| *x == row.app_id)
                    && r.channel.is_none_or(|c| c.as_str() == row.channel) =>
            {
                row
            }
            _ => {
                return err(
                    StatusCode::NOT_FOUND,
                    "unknown_message",
                    format!("{provider} sent no message {}", r.message_id),
                );
            }
        },
        Err(e) => {
            return err(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            );
        }
    };
    let matched = Matched {
        report,
        row,
        reported_at: r.reported_at.unwrap_or_else(now_ms),
    };
    // The same signed receipt twice (a replay, or the provider's retry of one we took) counts
    // once: no second receipt event, no second rule decision.
    let webhook_id = h("webhook-id");
    match st.claim_receipt(&provider, &webhook_id).await {
        Ok(true) => {}
        Ok(false) => {
            return (StatusCode::OK, Json(json!({"ok": true, "duplicate": true}))).into_response();
        }
        Err(e) => {
            return err(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            );
        }
    }
    match st.publish(&provider, vec![matched]).await {
        Ok(()) => (StatusCode::OK, Json(json!({"ok": true}))).into_response(),
        // The provider retries a failed callback: nothing is lost.
        Err(e) => {
            st.release_receipt(&provider, &webhook_id).await;
            err(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            )
        }
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
        .filter_map(|p| {
            Some((
                p.code.clone(),
                (
                    REGISTRY.receipts(&p.kind)?,
                    p.credentials.get("callback_token")?.clone(),
                ),
            ))
        })
        .collect();
    let rules = Rules::new(&deps.config);
    let breakers = Breakers::new(
        Signal::Receipts,
        deps.config
            .providers
            .iter()
            .map(|p| (p.code.clone(), p.breaker)),
    );
    Router::new()
        .route("/callbacks/{provider}", post(receipt))
        .route("/callbacks/{provider}/{token}", post(sms_receipt))
        .with_state(Arc::new(CallbackState {
            kinds: deps.config.provider_kinds(),
            deps,
            secrets,
            sms,
            db: Default::default(),
            rules,
            breakers,
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
    drop(herald_domain::schema::migrated(&deps).await?);
    herald_domain::failure::receipt_wait::spawn_sweeper(
        deps.stage_db().await?,
        deps.codec.clone(),
        deps.transport.clone(),
        shutdown.clone(),
    );
    herald_domain::failure::alert::spawn_dispatcher(
        &herald_core::netguard::Guard::new(&deps.config.security.outbound_allow),
        deps.stage_db().await?,
        &deps.config,
        shutdown.clone(),
    )?;
    let limits = deps.config.api.limits();
    herald_core::serve::serve(listener, router(deps), limits, shutdown)
        .await
        .map_err(|e| StageError::Fatal(format!("callback: {e}")))
}
