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

/// A terminal fact worth notifying.
struct Terminal {
    message_id: String,
    app: String,
    body: String,
    at: i64,
    precedence: usize,
}

/// A terminal fact worth notifying.
fn terminal(
    header: &herald_schemas::EventHeader,
    status: &str,
    provider: Option<&str>,
    reason: Option<&herald_schemas::Reason>,
) -> Option<Terminal> {
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
    Some(Terminal {
        message_id: header.message_id.clone(),
        app: header.app_id.clone(),
        body: body.to_string(),
        at: header.event_time,
        precedence: herald_domain::status::Status::parse(status)
            .map_or(0, herald_domain::status::Status::precedence),
    })
}

/// Of a batch's terminal facts, the one per message the read model keeps too: the earliest,
/// and at the same instant the higher precedence ([`herald_domain::status::PRECEDENCE`]) — so
/// the status webhook says what `GET /v1/messages/{id}` says, whatever order the topics are
/// read in within a batch. In the order messages first appear.
fn first_per_message(facts: Vec<Terminal>) -> Vec<Terminal> {
    let mut out: Vec<Terminal> = Vec::with_capacity(facts.len());
    for f in facts {
        match out.iter_mut().find(|t| t.message_id == f.message_id) {
            Some(t) => {
                if (f.at, std::cmp::Reverse(f.precedence)) < (t.at, std::cmp::Reverse(t.precedence))
                {
                    *t = f;
                }
            }
            None => out.push(f),
        }
    }
    out
}

impl Notify {
    async fn fact(
        &self,
        input: &InRecord,
        out: &mut Vec<OutRecord>,
    ) -> Result<Option<Terminal>, StageError> {
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
            let mut facts = Vec::new();
            for input in batch {
                if let Some(t) = self.fact(input, &mut out).await?
                    && self.apps.contains_key(&t.app)
                {
                    facts.push(t);
                }
            }
            let rows: Vec<outbox::Row> = first_per_message(facts)
                .into_iter()
                .map(|t| outbox::Row {
                    id: t.message_id,
                    destination: t.app,
                    payload: t.body,
                })
                .collect();
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
    let dispatcher = outbox::Dispatcher::new(Kind::Status, apps.clone(), &guard, POST_TIMEOUT)
        .map_err(StageError::Fatal)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fact(id: &str, status: &str, at: i64) -> Terminal {
        Terminal {
            message_id: id.into(),
            app: "shop".into(),
            body: status.into(),
            at,
            precedence: herald_domain::status::Status::parse(status)
                .map_or(0, herald_domain::status::Status::precedence),
        }
    }

    #[test]
    fn a_batch_announces_what_the_read_model_keeps_in_every_order() {
        let pick = |facts: Vec<Terminal>| {
            first_per_message(facts)
                .into_iter()
                .map(|t| (t.message_id, t.body))
                .collect::<Vec<_>>()
        };
        let want = vec![
            ("m".to_owned(), "delivered".to_owned()),
            ("n".to_owned(), "failed".to_owned()),
        ];
        assert_eq!(
            pick(vec![
                fact("m", "unknown", 5),
                fact("m", "delivered", 5),
                fact("n", "failed", 1)
            ]),
            want
        );
        assert_eq!(
            pick(vec![
                fact("m", "delivered", 5),
                fact("m", "unknown", 5),
                fact("n", "failed", 1)
            ]),
            want
        );
        // The earlier fact wins whatever its precedence.
        assert_eq!(
            pick(vec![fact("m", "delivered", 6), fact("m", "unknown", 5)]),
            [("m".to_owned(), "unknown".to_owned())]
        );
    }
}
