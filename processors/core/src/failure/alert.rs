//! The `alert` rule action: a Standard-Webhooks-signed JSON POST to an operator URL, made while
//! the batch is handled (so the alert goes out before the failure is committed), with a short
//! bounded retry. An alert that cannot be delivered is logged and counted, never blocks the
//! stage.

use std::time::Duration;

use crate::util::{now_ms, standard_webhook_signature, webhook_key};
use herald_schemas::MessageRouted;
use tracing::warn;

use super::{CallResult, outcome_str};

pub const ALERTS: &str = "herald_send_alerts_total";

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

/// Where an alert goes: the rule's `webhook_url`, signed with its secret.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub url: &'a str,
    pub secret: &'a str,
}

pub struct Alerter {
    client: reqwest::Client,
}

impl Alerter {
    /// Alerts go only where the outbound guard permits (the config is checked at load; names
    /// are checked again, address by address, when they resolve).
    pub fn new(guard: &crate::netguard::Guard) -> Alerter {
        Alerter {
            client: guard
                .client(reqwest::Client::builder().timeout(Duration::from_secs(5)))
                .build()
                .unwrap_or_default(),
        }
    }

    /// Sends one alert about attempt `attempt` of `m` (which ended with `r`) to `to`.
    pub async fn send(
        &self,
        to: Target<'_>,
        scene: Scene,
        rule: &str,
        m: &MessageRouted,
        attempt: i32,
        r: &CallResult,
    ) {
        let Target { url, secret } = to;
        let body = serde_json::json!({
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
        let id = format!("{}-{}-{attempt}", scene.event_type(), m.header.message_id);
        let key = webhook_key(secret);
        for wait_ms in [200u64, 1000, 0] {
            let ts = now_ms() / 1000;
            let sig = standard_webhook_signature(&key, &id, ts, body.as_bytes());
            let sent = self
                .client
                .post(url)
                .header("content-type", "application/json")
                .header("webhook-id", &id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", sig)
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(resp) if resp.status().is_success() => {
                    metrics::counter!(ALERTS, "result" => "sent").increment(1);
                    return;
                }
                Ok(resp) => warn!(%url, status = %resp.status(), "alert refused"),
                Err(e) => warn!(%url, error = %e, "alert failed"),
            }
            if wait_ms == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        }
        metrics::counter!(ALERTS, "result" => "failed").increment(1);
    }
}
