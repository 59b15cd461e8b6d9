//! The `alert` rule action: a Standard-Webhooks-signed JSON POST to an operator URL, through an
//! outbox so that an alert endpoint that is slow or down never slows sending.
//!
//! The stage that decides an alert writes it to `alert_outbox` in the batch, before the batch
//! commits (one statement; `ON CONFLICT DO NOTHING` on the stable `webhook-id`, so a batch
//! processed again adds nothing). A dispatcher task delivers due rows with retries and back-off
//! (2 s, 4 s … up to 10 min, for 24 h); a receiver that gets a retry it already processed can
//! drop it by its `webhook-id`. Rows hold the rule's name and URL, never its secret: the
//! dispatcher signs with the secret the configuration holds for the rule.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use herald_schemas::MessageRouted;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{CallResult, outcome_str};
use herald_core::config::{Config, RuleAction};
use herald_core::util::{now_ms, standard_webhook_signature, webhook_key};

/// How long an alert is retried before it is given up (and counted).
const GIVE_UP_AFTER_SECS: i64 = 86_400;

/// Which rule scene raised the alert.
#[derive(Debug, Clone, Copy)]
pub enum Scene {
    /// A provider call failed.
    SendFailure,
    /// A delivery receipt said undelivered.
    CallbackFailure,
}

impl Scene {
    fn event_type(self) -> &'static str {
        match self {
            Scene::SendFailure => "herald.send_failure.alert",
            Scene::CallbackFailure => "herald.callback_failure.alert",
        }
    }
}

/// One alert, ready for the outbox.
#[derive(Debug, Clone)]
pub struct Alert {
    /// The `webhook-id`: stable per (scene, message, attempt).
    pub id: String,
    pub rule: String,
    pub url: String,
    pub payload: String,
}

impl Alert {
    /// The alert about attempt `attempt` of `m` (which ended with `r`), for rule `rule`.
    pub fn new(
        scene: Scene,
        rule: &str,
        url: &str,
        m: &MessageRouted,
        attempt: i32,
        r: &CallResult,
    ) -> Alert {
        let payload = serde_json::json!({
            "type": scene.event_type(),
            "rule": rule,
            "message_id": m.header.message_id,
            "request_id": m.header.request_id,
            "app_id": m.header.app_id,
            "channel": m.header.channel.as_str(),
            "provider": m.provider,
            "attempt": attempt,
            "outcome": outcome_str(r.outcome),
            "response_code": r.response_code,
            "reason": r.reason.as_ref().map(|x| serde_json::json!({"code": x.code, "message": x.message})),
        })
        .to_string();
        Alert {
            id: format!("{}-{}-{attempt}", scene.event_type(), m.header.message_id),
            rule: rule.to_owned(),
            url: url.to_owned(),
            payload,
        }
    }
}

/// Writes `alerts` to the outbox (one statement; already-queued ones are left as they are).
pub async fn enqueue(db: &Client, alerts: &[Alert]) -> Result<(), tokio_postgres::Error> {
    if alerts.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = alerts.iter().map(|a| a.id.as_str()).collect();
    let rules: Vec<&str> = alerts.iter().map(|a| a.rule.as_str()).collect();
    let urls: Vec<&str> = alerts.iter().map(|a| a.url.as_str()).collect();
    let payloads: Vec<&str> = alerts.iter().map(|a| a.payload.as_str()).collect();
    db.execute(
        "INSERT INTO alert_outbox (id, rule, url, payload)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[])
         ON CONFLICT (id) DO NOTHING",
        &[&ids, &rules, &urls, &payloads],
    )
    .await?;
    Ok(())
}

/// The signing key of every alert rule, by rule name.
pub fn keys(cfg: &Config) -> HashMap<String, Vec<u8>> {
    cfg.rules
        .iter()
        .filter(|r| r.action == RuleAction::Alert)
        .map(|r| (r.name.clone(), webhook_key(&r.action_config.secret)))
        .collect()
}

/// Delivers due alerts until `shutdown`. Alerts go only where the outbound guard permits.
pub fn spawn_dispatcher(
    guard: &herald_core::netguard::Guard,
    mut db: herald_core::db::Db,
    keys: HashMap<String, Vec<u8>>,
    shutdown: CancellationToken,
) {
    let http = guard
        .client(reqwest::Client::builder().timeout(Duration::from_secs(5)))
        .build()
        .unwrap_or_default();
    let keys = Arc::new(keys);
    tokio::spawn(async move {
        let mut backlog = crate::outbox::Backlog::new("alert_outbox");
        loop {
            backlog.report(&*db).await;
            let busy = match deliver_due(&mut db, &http, &keys).await {
                Ok(n) => n > 0,
                Err(e) => {
                    warn!(error = %e, "alert outbox unreachable");
                    false
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(if busy { 10 } else { 500 })) => {}
            }
        }
    });
}

/// One round: sends what is due, records each result. The number of alerts tried.
async fn deliver_due(
    db: &mut herald_core::db::Db,
    http: &reqwest::Client,
    keys: &HashMap<String, Vec<u8>>,
) -> Result<usize, herald_core::db::PoolFailure> {
    db.reconnect_if_closed().await?;
    // Claimed with a lease: every process that runs send or callback runs a dispatcher, and
    // no two of them post the same alert at once.
    let rows = db
        .query(
            "UPDATE alert_outbox o SET next_attempt_at = now() + interval '60 seconds'
             FROM (SELECT id FROM alert_outbox
                   WHERE delivered_at IS NULL AND next_attempt_at <= now()
                   ORDER BY next_attempt_at LIMIT 100 FOR UPDATE SKIP LOCKED) due
             WHERE o.id = due.id
             RETURNING o.id, o.rule, o.url, o.payload, o.attempts,
                       extract(epoch from now() - o.created_at)::bigint",
            &[],
        )
        .await?;
    let sends = rows.iter().map(|r| {
        let (id, rule, url, payload): (String, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let (attempts, age): (i32, i64) = (r.get(4), r.get(5));
        async move {
            let sent = match keys.get(&rule) {
                None => Err(format!("rule {rule:?} is no longer configured")),
                Some(key) => post(http, &url, key, &id, payload).await,
            };
            (id, sent, attempts, age)
        }
    });
    let n = rows.len();
    for (id, sent, attempts, age) in futures::future::join_all(sends).await {
        match sent {
            Ok(()) => {
                metrics::counter!(herald_core::telemetry::names::ALERTS, "result" => "sent")
                    .increment(1);
                db.execute(
                    "UPDATE alert_outbox SET delivered_at = now(), attempts = attempts + 1
                     WHERE id = $1",
                    &[&id],
                )
                .await?;
            }
            Err(e) => {
                let give_up = age > GIVE_UP_AFTER_SECS;
                metrics::counter!(herald_core::telemetry::names::ALERTS, "result" => if give_up { "given_up" } else { "retry" })
                    .increment(1);
                warn!(alert = %id, error = %e, attempts, "alert not delivered");
                let next = if give_up {
                    10.0 * 365.0 * 86_400.0
                } else {
                    (2f64 * 2f64.powi(attempts.min(9))).min(600.0)
                };
                db.execute(
                    "UPDATE alert_outbox SET attempts = attempts + 1, last_error = $2,
                            next_attempt_at = now() + make_interval(secs => $3)
                     WHERE id = $1",
                    &[&id, &e, &next],
                )
                .await?;
            }
        }
    }
    Ok(n)
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    key: &[u8],
    id: &str,
    payload: String,
) -> Result<(), String> {
    let ts = now_ms() / 1000;
    let sig = standard_webhook_signature(key, id, ts, payload.as_bytes());
    let resp = http
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(payload)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", resp.status()))
    }
}

/// Retention (`[retention]`): delivered or given-up alerts only.
pub const PURGE: crate::retention::Purge = crate::retention::Purge {
    table: "alert_outbox",
    third: crate::retention::Third::None,
    days: |r| r.outbox_days,
    sql: "DELETE FROM alert_outbox WHERE ctid IN (
            SELECT ctid FROM alert_outbox
            WHERE (delivered_at < now() - make_interval(days => $2)
                   OR created_at < now() - make_interval(days => $2 + 2))
             
            LIMIT $1)",
};
