//! Notify stage: apps that register a `status_url` get a Standard-Webhooks-signed POST when each
//! of their messages reaches a terminal state (CONTRACT.md §3), once per message.
//!
//! The stage only turns terminal facts into outbox rows: it consumes the status-bearing topics
//! (`herald.deliveries.v1`, `herald.receipts.v1`, `herald.status`) and writes the first
//! terminal state of each message of a notified app to the webhook outbox
//! ([`herald_domain::outbox`], kind `status`, keyed by message id, in the batch before its
//! offsets commit). The outbox's leased dispatcher posts it with retries and back-off; the
//! `webhook-id` is the message id, so a receiver that got a retry it had already processed can
//! drop it.
//!
//! - Reads: `herald.deliveries.v1`, `herald.receipts.v1`, `herald.status`.
//! - Writes: status webhooks (through the outbox), `herald.dead-letters.v1`.
//! - Tables: none of its own (the outbox is the domain's).
//! - Promise: each terminal status is announced once per message, at least once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use herald_domain::outbox::{self, Endpoint, Kind};

use futures::future::BoxFuture;
use herald_core::runtime::Deps;
use herald_core::transport::{InRecord, OutRecord};
use herald_core::util::webhook_key;
use herald_core::worker::{BatchHandler, StageError, run_worker};
use herald_domain::event::{StatusEvent, Unreadable};
use herald_domain::status::is_terminal;
use herald_schemas::topics;
use tokio_util::sync::CancellationToken;

pub const STAGE: &str = "notify";

/// The longest a status webhook's POST may take.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

struct Notify {
    deps: Deps,
    db: herald_core::db::Db,
    /// Apps with a status URL.
    apps: Arc<HashMap<String, Endpoint>>,
}

/// A terminal fact worth notifying: (message id, app, JSON body).
fn terminal(
    header: &herald_schemas::EventHeader,
    status: &str,
    provider: Option<&str>,
    reason: Option<&herald_schemas::Reason>,
) -> Option<(String, String, String)> {
    if !is_terminal(status) {
        return None;
    }
    let body = serde_json::json!({
        "type": "message.status",
        "message_id": header.message_id,
        "request_id": header.request_id,
        "app_id": header.app_id,
        "channel": header.channel.as_str(),
        "status": status,
        "provider": provider,
        "attempt": header.attempt,
        "reason": reason.map(|r| serde_json::json!({"code": r.code, "message": r.message})),
        "at": header.event_time,
        "metadata": header.metadata,
    });
    Some((
        header.message_id.clone(),
        header.app_id.clone(),
        body.to_string(),
    ))
}

impl Notify {
    async fn fact(
        &self,
        input: &InRecord,
        out: &mut Vec<OutRecord>,
    ) -> Result<Option<(String, String, String)>, StageError> {
        // The projector dead-letters records whose type cannot be read.
        let event =
            StatusEvent::decode(&self.deps.codec, STAGE, input, out, Unreadable::Skip).await?;
        Ok(event.and_then(|e| terminal(e.header(), e.status(), e.provider(), e.reason())))
    }
}

impl BatchHandler for Notify {
    fn codec(&self) -> &herald_core::codec::Codec {
        &self.deps.codec
    }

    fn healthy(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async { self.db.simple_query("SELECT 1").await.is_ok() })
    }

    fn handle<'a>(
        &'a mut self,
        batch: &'a [InRecord],
    ) -> BoxFuture<'a, Result<Vec<OutRecord>, StageError>> {
        Box::pin(async move {
            self.db.ensure().await?;
            let mut out = Vec::new();
            let mut rows = Vec::new();
            for input in batch {
                if let Some((id, app, payload)) = self.fact(input, &mut out).await?
                    && self.apps.contains_key(&app)
                {
                    rows.push(outbox::Row {
                        id,
                        destination: app,
                        payload,
                    });
                }
            }
            // The first terminal state of a message wins; later ones are not notified.
            outbox::enqueue(&*self.db, Kind::Status, &rows)
                .await
                .map_err(|e| StageError::postgres("notification outbox", e))?;
            Ok(out)
        })
    }
}

/// Runs the notify stage until `shutdown`. Without apps that have a `status_url` it idles.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> Result<(), StageError> {
    let apps: HashMap<String, Endpoint> = deps
        .config
        .apps
        .iter()
        .filter_map(|a| {
            Some((
                a.id.clone(),
                Endpoint {
                    url: a.status_url.clone()?,
                    key: webhook_key(&a.secret),
                },
            ))
        })
        .collect();
    if apps.is_empty() {
        shutdown.cancelled().await;
        return Ok(());
    }
    let guard = herald_core::netguard::Guard::new(&deps.config.security.outbound_allow);
    let dispatcher = outbox::Dispatcher::new(Kind::Status, apps.clone(), &guard, POST_TIMEOUT);
    let apps = Arc::new(apps);
    let db = herald_domain::schema::migrated(&deps).await?;
    dispatcher.spawn(deps.stage_db().await?, shutdown.clone());
    let mut spec = deps.spec(
        STAGE,
        vec![
            topics::DELIVERIES.into(),
            topics::RECEIPTS.into(),
            topics::STATUS.into(),
        ],
        false,
    );
    // Enabling status webhooks notifies what happens from then on, not the whole history;
    // afterwards the group's committed position resumes exactly.
    spec.from_end = true;
    let transport = deps.transport.clone();
    run_worker(STAGE, transport, spec, Notify { deps, db, apps }, shutdown).await
}
