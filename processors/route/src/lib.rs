//! Route stage. Consumes `MessageRendered` from `herald.rendered`; emits `MessageRouted` to
//! `herald.dispatch.<channel>` with the chosen provider, `MessageSuppressed` (status `expired`)
//! for a message past its `expires_at` (never sent late), or `MessageFailed` when the channel has
//! no provider. Exactly-once between topics. Providers whose circuit breaker is open (the send
//! stage writes `provider_health`; read here at most once a second) are skipped.

pub mod handler;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use herald_core::runtime::Deps;
use herald_core::transport::{InRecord, OutRecord};
use herald_core::util::{event_id, now_ms};
use herald_core::worker::{
    BatchHandler, StageError, decode_or_dead_letter, record, run_worker, trace_id,
};
use herald_schemas::{
    Channel, MessageFailed, MessageRendered, MessageRouted, MessageSuppressed, Reason, topics,
};
use tokio_util::sync::CancellationToken;

use handler::{Balancer, expired};

pub const STAGE: &str = "route";

struct Route {
    deps: Deps,
    balancers: HashMap<Channel, Balancer>,
    health: Health,
}

/// Open breakers, as the send stage last wrote them.
struct Health {
    db: Option<tokio_postgres::Client>,
    open: HashSet<String>,
    read_at: Option<Instant>,
}

impl Health {
    /// The canceled ones among `ids`; on a database problem none (the send stage's gate is
    /// the authority and fails safe).
    async fn canceled(&self, ids: &[String]) -> HashSet<String> {
        let Some(db) = &self.db else {
            return HashSet::new();
        };
        herald_core::gate::canceled(db, ids)
            .await
            .unwrap_or_default()
    }

    /// Refreshes the open set at most once a second. Without the database every provider is
    /// available (routing never stops on a health read).
    async fn refresh(&mut self, deps: &Deps) {
        if self
            .read_at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.read_at = Some(Instant::now());
        if self.db.as_ref().is_none_or(|c| c.is_closed()) {
            self.db = deps.postgres().await.ok();
        }
        let Some(db) = &self.db else { return };
        match db
            .query(
                "SELECT provider FROM provider_health WHERE open_until > now()",
                &[],
            )
            .await
        {
            Ok(rows) => self.open = rows.iter().map(|r| r.get(0)).collect(),
            // The table appears when the send stage first runs.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                self.open.clear()
            }
            Err(e) => {
                tracing::warn!(error = %herald_core::runtime::pg_error(e), "provider health not read")
            }
        }
    }
}

impl BatchHandler for Route {
    fn handle<'a>(
        &'a mut self,
        batch: &'a [InRecord],
    ) -> BoxFuture<'a, Result<Vec<OutRecord>, StageError>> {
        Box::pin(async move {
            let codec = self.deps.codec.clone();
            let mut out = Vec::with_capacity(batch.len());
            self.health.refresh(&self.deps).await;
            let mut decoded = Vec::with_capacity(batch.len());
            for input in batch {
                if let Some(m) =
                    decode_or_dead_letter::<MessageRendered>(&codec, STAGE, input, &mut out).await?
                {
                    decoded.push((m, input));
                }
            }
            // Canceled messages (the API published their MessageCanceled) go no further.
            let ids: Vec<String> = decoded
                .iter()
                .map(|(m, _)| m.header.message_id.clone())
                .collect();
            let canceled = self.health.canceled(&ids).await;
            let open = &self.health.open;
            for (m, input) in decoded {
                if canceled.contains(&m.header.message_id) {
                    metrics::counter!(herald_core::telemetry::names::CANCELED_DROPPED, "stage" => STAGE)
                        .increment(1);
                    continue;
                }
                let trace = trace_id(input);
                let now = now_ms();
                let mid = m.header.message_id.clone();
                if expired(m.expires_at, now) {
                    let ev = MessageSuppressed {
                        header: m.header.follow(STAGE, event_id(&mid, "expired", 0), now),
                        status: "expired".into(),
                        policy: "expires_at".into(),
                        reason: Reason::new(
                            "expired",
                            "expires_at passed before the message could be sent",
                        ),
                    };
                    out.push(record(&codec, topics::STATUS, &mid, &trace, &ev).await?);
                    continue;
                }
                let choice = self
                    .balancers
                    .get_mut(&m.header.channel)
                    // Skip open breakers; when every provider of the channel is open, still
                    // route (the send stage's rules retry with backoff): never a failed message
                    // for a health state.
                    .and_then(|b| {
                        b.pick(|code| !open.contains(code))
                            .or_else(|| b.pick(|_| true))
                    });
                let Some((provider, kind)) = choice else {
                    let ev = MessageFailed {
                        header: m.header.follow(STAGE, event_id(&mid, "failed", 0), now),
                        provider: None,
                        reason: Reason::new(
                            "no_provider",
                            format!("no provider configured for {}", m.header.channel.as_str()),
                        ),
                    };
                    out.push(record(&codec, topics::STATUS, &mid, &trace, &ev).await?);
                    continue;
                };
                let topic = topics::dispatch(m.header.channel);
                let ev = MessageRouted {
                    header: m.header.follow(STAGE, event_id(&mid, "routed", 0), now),
                    recipient: m.recipient,
                    priority: m.priority,
                    expires_at: m.expires_at,
                    template: m.template,
                    template_version: m.template_version,
                    content: m.content,
                    provider,
                    provider_kind: kind.into(),
                    tried_providers: Vec::new(),
                };
                out.push(record(&codec, &topic, &ev.recipient.address, &trace, &ev).await?);
            }
            Ok(out)
        })
    }
}

/// Runs the route stage until `shutdown`.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> Result<(), StageError> {
    let balancers = Channel::ALL
        .iter()
        .map(|c| (*c, Balancer::new(&deps.config.providers_for(*c))))
        .collect();
    let spec = deps.spec(STAGE, vec![topics::RENDERED.into()], true);
    let transport = deps.transport.clone();
    let health = Health {
        db: None,
        open: HashSet::new(),
        read_at: None,
    };
    run_worker(
        STAGE,
        transport,
        spec,
        Route {
            deps,
            balancers,
            health,
        },
        shutdown,
    )
    .await
}
