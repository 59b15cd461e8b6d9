//! The `alert` rule action: a Standard-Webhooks-signed JSON POST to an operator URL, through an
//! outbox so that an alert endpoint that is slow or down never slows sending.
//!
//! The stage that decides an alert writes it to the outbox ([`crate::outbox`], kind `alert`) in
//! the batch, before the batch commits; the outbox's dispatcher posts it, to the URL and signed
//! with the secret the configuration holds for the rule when it is posted (a rule whose URL
//! changed gets its queued alerts at the new URL).

use std::collections::HashMap;
use std::time::Duration;

use herald_schemas::MessageRouted;
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use super::{CallResult, outcome_str};
use crate::outbox::{self, Endpoint, Kind};
use herald_core::config::{Config, RuleAction};
use herald_core::util::webhook_key;

/// The longest an alert's POST may take.
const POST_TIMEOUT: Duration = Duration::from_secs(5);

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
    pub payload: String,
}

impl Alert {
    /// The alert about attempt `attempt` of `m` (which ended with `r`), for rule `rule`.
    pub fn new(scene: Scene, rule: &str, m: &MessageRouted, attempt: i32, r: &CallResult) -> Alert {
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
            payload,
        }
    }
}

/// Writes `alerts` to the outbox (one statement; already-queued ones are left as they are).
pub async fn enqueue(
    db: &impl GenericClient,
    alerts: &[Alert],
) -> Result<(), tokio_postgres::Error> {
    let rows: Vec<outbox::Row> = alerts
        .iter()
        .map(|a| outbox::Row {
            id: a.id.clone(),
            destination: a.rule.clone(),
            payload: a.payload.clone(),
        })
        .collect();
    outbox::enqueue(db, Kind::Alert, &rows).await.map(drop)
}

/// Where each alert rule's alerts go, by rule name.
pub fn endpoints(cfg: &Config) -> HashMap<String, Endpoint> {
    cfg.rules
        .iter()
        .filter(|r| r.action == RuleAction::Alert)
        .filter_map(|r| {
            Some((
                r.name.clone(),
                Endpoint {
                    url: r.action_config.webhook_url.clone()?,
                    key: webhook_key(&r.action_config.secret),
                },
            ))
        })
        .collect()
}

/// Posts queued alerts until `shutdown`, only where the outbound guard permits.
pub fn spawn_dispatcher(
    guard: &herald_core::netguard::Guard,
    db: herald_core::db::Db,
    cfg: &Config,
    shutdown: CancellationToken,
) -> Result<(), herald_core::worker::StageError> {
    outbox::Dispatcher::new(Kind::Alert, endpoints(cfg), guard, POST_TIMEOUT)
        .map_err(herald_core::worker::StageError::Fatal)?
        .spawn(db, shutdown);
    Ok(())
}
