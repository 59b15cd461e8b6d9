//! Route stage. Consumes `MessageRendered` from `herald.rendered`; emits `MessageRouted` to
//! `herald.dispatch.<channel>` with the chosen provider, `MessageSuppressed` (status `expired`)
//! for a message past its `expires_at` (never sent late), or `MessageFailed` when the channel has
//! no provider. Exactly-once between topics. Providers whose circuit breaker is open (the send
//! stage writes `provider_health`; read here at most once a second) are skipped.
//!
//! - Reads: `herald.rendered`.
//! - Writes: `herald.dispatch.<channel>` and `herald.dispatch.high`, `herald.delay.<n>s` (quiet
//!   hours), `herald.status` (`MessageSuppressed`, `MessageFailed`), `herald.dead-letters.v1`.
//! - Tables: owns `policy_hits` ([`policy`]: dedup and frequency caps); reads `opt_outs`,
//!   `message_gate` and `provider_health` through their owners in `herald-domain`.
//! - Promise: a message is routed once, never after its `expires_at`, never while canceled.

pub mod handler;
pub mod policy;

use std::collections::{HashMap, HashSet};

use futures::future::BoxFuture;
use herald_core::config::PolicyConfig;
use herald_core::runtime::{Deps, delay_topic, tier_for};
use herald_core::transport::{InRecord, OutRecord};
use herald_core::util::{event_id, now_ms};
use herald_core::worker::{
    BatchHandler, StageError, decode_or_dead_letter, record, run_worker, trace_id,
};
use herald_schemas::{
    Channel, DelayPurpose, DelayScheduled, MessageFailed, MessageRendered, MessageRouted,
    MessageSuppressed, Reason, topics,
};
use tokio_util::sync::CancellationToken;

use handler::{Balancer, expired};
use herald_domain::failure::eligible::Eligible;
use herald_providers::REGISTRY;
use policy::Verdict;

pub const STAGE: &str = "route";

struct Route {
    deps: Deps,
    balancers: HashMap<Channel, Balancer>,
    /// Each configured provider's kind, by code.
    kinds: HashMap<String, String>,
    health: Health,
    policies: HashMap<Channel, PolicyConfig>,
    /// Where phone numbers without a country code belong (per-recipient policies key on the
    /// normalised address).
    region: herald_domain::destination::Region,
    policy_db: herald_core::db::Db,
}

/// Open breakers, as the send (calls) and callback (receipts) stages last wrote them.
struct Health {
    db: Option<tokio_postgres::Client>,
    open: herald_domain::failure::breaker::OpenSet,
}

impl Health {
    /// The canceled ones among `ids`; on a database problem none (the send stage's gate is
    /// the authority and fails safe).
    async fn canceled(&self, ids: &[String]) -> HashSet<String> {
        let Some(db) = &self.db else {
            return HashSet::new();
        };
        herald_domain::gate::canceled(db, ids)
            .await
            .unwrap_or_default()
    }

    /// Refreshes the open set at most once a second. Without the database every provider is
    /// available (routing never stops on a health read).
    async fn refresh(&mut self, deps: &Deps) {
        if self.db.as_ref().is_none_or(|c| c.is_closed()) {
            self.db = deps.postgres().await.ok();
        }
        if let Some(db) = &self.db {
            self.open.refresh(db).await;
        }
    }
}

impl BatchHandler for Route {
    fn codec(&self) -> &herald_core::codec::Codec {
        &self.deps.codec
    }

    fn fails_messages(&self) -> bool {
        true
    }

    fn healthy(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async { self.policy_db.simple_query("SELECT 1").await.is_ok() })
    }

    fn handle<'a>(
        &'a mut self,
        batch: &'a [InRecord],
    ) -> BoxFuture<'a, Result<Vec<OutRecord>, StageError>> {
        Box::pin(async move {
            let codec = self.deps.codec.clone();
            let mut out = Vec::with_capacity(batch.len());
            self.policy_db.ensure().await?;
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
            let now = now_ms();
            // Expired and canceled messages go no further; the rest meet the policies.
            let mut live = Vec::with_capacity(decoded.len());
            for (m, input) in decoded {
                if canceled.contains(&m.header.message_id) {
                    metrics::counter!(herald_core::telemetry::names::CANCELED_DROPPED, "stage" => STAGE)
                        .increment(1);
                    continue;
                }
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
                    out.push(record(&codec, topics::STATUS, &mid, &trace_id(input), &ev).await?);
                    continue;
                }
                live.push((m, input));
            }
            let mut verdicts: Vec<Verdict> = live
                .iter()
                .map(|(m, _)| {
                    self.policies
                        .get(&m.header.channel)
                        .and_then(|p| p.quiet_hours.as_ref())
                        .and_then(|q| {
                            policy::quiet(q, m.recipient.timezone.as_deref(), m.priority, now)
                        })
                        .unwrap_or(Verdict::Send)
                })
                .collect();
            let sendable: Vec<usize> = (0..live.len())
                .filter(|i| verdicts[*i] == Verdict::Send)
                .collect();
            let refs: Vec<&MessageRendered> = sendable.iter().map(|i| &live[*i].0).collect();
            let stateful =
                policy::stateful(&mut self.policy_db, &refs, &self.policies, self.region)
                    .await
                    .map_err(|e| StageError::postgres("route policies", e))?;
            for (i, v) in sendable.into_iter().zip(stateful) {
                verdicts[i] = v;
            }
            let open = &self.health.open;
            for ((m, input), verdict) in live.into_iter().zip(verdicts) {
                let trace = trace_id(input);
                let mid = m.header.message_id.clone();
                match verdict {
                    Verdict::Send => {}
                    Verdict::Suppress {
                        policy,
                        code,
                        message,
                    } => {
                        metrics::counter!(herald_core::telemetry::names::SUPPRESSED, "policy" => policy)
                            .increment(1);
                        let ev = MessageSuppressed {
                            header: m.header.follow(STAGE, event_id(&mid, "suppressed", 0), now),
                            status: "suppressed".into(),
                            policy: policy.into(),
                            reason: Reason::new(code, message),
                        };
                        out.push(record(&codec, topics::STATUS, &mid, &trace, &ev).await?);
                        continue;
                    }
                    Verdict::Hold { until_ms } => {
                        // Back to the route stage when the quiet window ends.
                        let key = m.recipient.address.clone();
                        let again = record(&codec, topics::RENDERED, &key, &trace, &m).await?;
                        let ev = DelayScheduled {
                            header: m.header.follow(STAGE, event_id(&mid, "quiet_hold", 0), now),
                            purpose: DelayPurpose::ScheduledSend,
                            due_at: until_ms,
                            target_topic: topics::RENDERED.into(),
                            key: again.key,
                            payload: again.payload,
                            reason: Some(Reason::new(
                                "quiet_hours",
                                "held until the quiet window ends",
                            )),
                        };
                        let tier = delay_topic(tier_for(until_ms - now));
                        out.push(record(&codec, &tier, &key, &trace, &ev).await?);
                        continue;
                    }
                }
                let choice = self
                    .balancers
                    .get_mut(&m.header.channel)
                    // Skip open breakers; when every provider of the channel is open, still
                    // route (the send stage's rules retry with backoff): never a failed message
                    // for a health state.
                    // Only providers that reach the address (mobile push: its platform).
                    .and_then(|b| {
                        let eligible = Eligible::new(&self.kinds, &REGISTRY, open);
                        let address = &m.recipient.address;
                        b.pick(|code| eligible.now(code, address))
                            .or_else(|| b.pick(|code| eligible.reaches(code, address)))
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
                let topic = topics::dispatch_lane(m.header.channel, m.priority);
                let ev = MessageRouted {
                    header: m.header.follow(STAGE, event_id(&mid, "routed", 0), now),
                    recipient: m.recipient,
                    priority: m.priority,
                    expires_at: m.expires_at,
                    template: m.template,
                    template_version: m.template_version,
                    content: m.content,
                    provider,
                    provider_kind: kind,
                    tried_providers: Vec::new(),
                    due_at: m.due_at,
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
    let kinds = deps.config.provider_kinds();
    let spec = deps.spec(STAGE, vec![topics::RENDERED.into()], true);
    let transport = deps.transport.clone();
    let policies: HashMap<Channel, PolicyConfig> = deps
        .config
        .policies
        .iter()
        .map(|p| (p.channel, p.clone()))
        .collect();
    let policy_db = herald_domain::schema::migrated(&deps).await?;
    // The route stage owns `policy_hits` and purges it.
    herald_domain::retention::spawn(
        deps.config.postgres.url.clone(),
        deps.config.retention.clone(),
        std::slice::from_ref(&policy::PURGE),
        shutdown.clone(),
    );
    let health = Health {
        db: None,
        open: Default::default(),
    };
    let region = herald_domain::destination::Region::configured(&deps.config);
    run_worker(
        STAGE,
        transport,
        spec,
        Route {
            deps,
            balancers,
            kinds,
            health,
            policies,
            region,
            policy_db,
        },
        shutdown,
    )
    .await
}
