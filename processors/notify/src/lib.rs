//! Notify stage: apps that register a `status_url` get a Standard-Webhooks-signed POST when each
//! of their messages reaches a terminal state (CONTRACT.md §3), once per message.
//!
//! An outbox in PostgreSQL makes it reliable: the stage consumes the status-bearing topics
//! (`herald.deliveries.v1`, `herald.receipts.v1`, `herald.status`), records the first terminal
//! state of each message of a notified app (`INSERT … ON CONFLICT DO NOTHING`, in the batch
//! before its offsets commit), and a dispatcher delivers pending rows with retries and backoff
//! (2 s, 4 s … up to 10 min, for 24 h). The `webhook-id` is stable per message, so a receiver
//! that got a retry it had already processed can drop it.
//!
//! - Reads: `herald.deliveries.v1`, `herald.receipts.v1`, `herald.status`.
//! - Writes: status webhooks (HTTP), `herald.dead-letters.v1`.
//! - Tables: owns `status_notifications` (the outbox).
//! - Promise: each terminal status is announced once per message, at least once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use herald_core::runtime::Deps;
use herald_core::transport::{InRecord, OutRecord};
use herald_core::util::{now_ms, standard_webhook_signature, webhook_key};
use herald_core::worker::{BatchHandler, StageError, run_worker};
use herald_domain::event::{StatusEvent, Unreadable};
use herald_domain::status::is_terminal;
use herald_schemas::topics;
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub const STAGE: &str = "notify";

/// How long a notification is retried before it is given up (and counted).
const GIVE_UP_AFTER_SECS: i64 = 86_400;

struct Notify {
    deps: Deps,
    db: herald_core::db::Db,
    /// Apps with a status URL.
    apps: Arc<HashMap<String, (String, Vec<u8>)>>,
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
            let (mut ids, mut apps, mut payloads) = (Vec::new(), Vec::new(), Vec::new());
            for input in batch {
                if let Some((id, app, body)) = self.fact(input, &mut out).await?
                    && self.apps.contains_key(&app)
                {
                    ids.push(id);
                    apps.push(app);
                    payloads.push(body);
                }
            }
            if !ids.is_empty() {
                // The first terminal state of a message wins; later ones are not notified.
                self.db
                    .execute(
                        "INSERT INTO status_notifications (message_id, app_id, payload)
                         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[])
                         ON CONFLICT (message_id) DO NOTHING",
                        &[&ids, &apps, &payloads],
                    )
                    .await
                    .map_err(|e| StageError::postgres("notification outbox", e))?;
            }
            Ok(out)
        })
    }
}

/// Delivers due notifications until `shutdown`.
async fn dispatch(
    guard: herald_core::netguard::Guard,
    mut db: herald_core::db::Db,
    apps: Arc<HashMap<String, (String, Vec<u8>)>>,
    shutdown: CancellationToken,
) {
    let http = guard
        .client(reqwest::Client::builder().timeout(Duration::from_secs(10)))
        .build()
        .unwrap_or_default();
    let mut backlog = herald_domain::outbox::Backlog::new("status_notifications");
    loop {
        if let Err(e) = db.reconnect_if_closed().await {
            warn!(error = %e, "notification outbox unreachable");
        }
        backlog.report(&*db).await;
        let rows = db
            .query(
                "SELECT message_id, app_id, payload, attempts, extract(epoch from now() - created_at)::bigint
                 FROM status_notifications
                 WHERE delivered_at IS NULL AND next_attempt_at <= now()
                 ORDER BY next_attempt_at LIMIT 200",
                &[],
            )
            .await;
        let rows = match rows {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %herald_core::runtime::pg_error(e), "notification outbox unreadable");
                Vec::new()
            }
        };
        let sends = rows.iter().map(|r| {
            let (id, app, payload): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            let attempts: i32 = r.get(3);
            let age: i64 = r.get(4);
            let http = &http;
            let apps = &apps;
            async move {
                let Some((url, key)) = apps.get(&app) else {
                    return (
                        id,
                        Err("app has no status_url any more".to_owned()),
                        attempts,
                        age,
                    );
                };
                let ts = now_ms() / 1000;
                let sig = standard_webhook_signature(key, &id, ts, payload.as_bytes());
                let r = http
                    .post(url)
                    .header("content-type", "application/json")
                    .header("webhook-id", &id)
                    .header("webhook-timestamp", ts.to_string())
                    .header("webhook-signature", sig)
                    .body(payload)
                    .send()
                    .await;
                let r = match r {
                    Ok(resp) if resp.status().is_success() => Ok(()),
                    Ok(resp) => Err(format!("HTTP {}", resp.status())),
                    Err(e) => Err(e.to_string()),
                };
                (id, r, attempts, age)
            }
        });
        for (id, r, attempts, age) in futures::future::join_all(sends).await {
            let res = match r {
                Ok(()) => {
                    metrics::counter!(herald_core::telemetry::names::STATUS_WEBHOOKS, "result" => "delivered")
                        .increment(1);
                    db.execute(
                        "UPDATE status_notifications SET delivered_at = now(), attempts = attempts + 1
                         WHERE message_id = $1",
                        &[&id],
                    )
                    .await
                }
                Err(e) => {
                    let give_up = age > GIVE_UP_AFTER_SECS;
                    metrics::counter!(herald_core::telemetry::names::STATUS_WEBHOOKS, "result" => if give_up { "given_up" } else { "retry" })
                        .increment(1);
                    let backoff = (2f64 * 2f64.powi(attempts.min(9))).min(600.0);
                    let next = if give_up {
                        10.0 * 365.0 * 86_400.0
                    } else {
                        backoff
                    };
                    db.execute(
                        "UPDATE status_notifications SET attempts = attempts + 1, last_error = $2,
                                next_attempt_at = now() + make_interval(secs => $3)
                         WHERE message_id = $1",
                        &[&id, &e, &next],
                    )
                    .await
                }
            };
            if let Err(e) = res {
                warn!(error = %herald_core::runtime::pg_error(e), "notification outbox not updated");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(if rows.is_empty() { 500 } else { 10 })) => {}
        }
    }
}

/// Runs the notify stage until `shutdown`. Without apps that have a `status_url` it idles.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> Result<(), StageError> {
    // The notify stage owns its outbox and purges it (also once no app has a status URL).
    herald_domain::retention::spawn(
        deps.config.postgres.url.clone(),
        deps.config.retention.clone(),
        std::slice::from_ref(&PURGE),
        shutdown.clone(),
    );
    let apps: HashMap<String, (String, Vec<u8>)> = deps
        .config
        .apps
        .iter()
        .filter_map(|a| {
            Some((
                a.id.clone(),
                (a.status_url.clone()?, webhook_key(&a.secret)),
            ))
        })
        .collect();
    if apps.is_empty() {
        shutdown.cancelled().await;
        return Ok(());
    }
    let apps = Arc::new(apps);
    let db = herald_domain::schema::migrated(&deps).await?;
    let dispatcher_db = deps.stage_db().await?;
    let dispatcher = tokio::spawn(dispatch(
        herald_core::netguard::Guard::new(&deps.config.security.outbound_allow),
        dispatcher_db,
        apps.clone(),
        shutdown.clone(),
    ));
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
    let r = run_worker(STAGE, transport, spec, Notify { deps, db, apps }, shutdown).await;
    let _ = dispatcher.await;
    r
}

/// Retention (`[retention]`): delivered or given-up notifications only.
pub const PURGE: herald_domain::retention::Purge = herald_domain::retention::Purge {
    table: "status_notifications",
    third: herald_domain::retention::Third::None,
    days: |r| r.outbox_days,
    sql: "DELETE FROM status_notifications WHERE ctid IN (
            SELECT ctid FROM status_notifications
            WHERE (delivered_at < now() - make_interval(days => $2)
                   OR created_at < now() - make_interval(days => $2 + 2))
             
            LIMIT $1)",
};
