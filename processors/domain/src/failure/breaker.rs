//! Circuit breakers per provider. A provider whose calls fail (transient failures and unknown
//! outcomes; a bad phone number says nothing about the provider) at `failure_rate` or more over
//! the last `window_secs`, with at least `min_calls` calls, opens for `open_secs`. Then it is
//! half-open: traffic is let through again and the first outcomes decide — a failure reopens it,
//! `min_calls` successes close it.
//!
//! Two signals feed a provider's health, each through its own breaker with the provider's
//! `breaker` config: call outcomes (the send stage) and delivery receipts (the callback stage:
//! `undelivered` is a failure, `delivered` a success) — a provider that accepts every call but
//! delivers nothing is as broken as one that refuses them.
//!
//! The state is written to PostgreSQL (`provider_health`, one column pair per signal) when it
//! changes, so the route stage — possibly another process — stops choosing a provider either
//! signal opened, and `switch_provider` skips it ([`OpenSet`]).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use herald_core::config::BreakerConfig;
use herald_schemas::DeliveryOutcome;

/// What a breaker counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Provider calls (send stage).
    Calls,
    /// Delivery receipts (callback stage).
    Receipts,
}

impl Signal {
    pub fn label(self) -> &'static str {
        match self {
            Signal::Calls => "calls",
            Signal::Receipts => "receipts",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { successes: u32 },
}

/// A state change to persist: provider, open for how long (None = closed), failure rate.
pub type Change = (String, Option<Duration>, f64);

#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    calls: VecDeque<(Instant, bool)>,
    /// Failures among `calls` (kept so the rate is O(1) per call).
    failures: usize,
    pub state: State,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Breaker {
        Breaker {
            cfg,
            calls: VecDeque::new(),
            failures: 0,
            state: State::Closed,
        }
    }

    /// Whether an outcome says something about the provider's health: `Some(failed)`.
    pub fn health_signal(outcome: DeliveryOutcome) -> Option<bool> {
        match outcome {
            DeliveryOutcome::Succeeded => Some(false),
            DeliveryOutcome::FailedTransient | DeliveryOutcome::Unknown => Some(true),
            DeliveryOutcome::FailedPermanent | DeliveryOutcome::RateLimited => None,
        }
    }

    fn failure_rate(&self) -> f64 {
        if self.calls.is_empty() {
            return 0.0;
        }
        self.failures as f64 / self.calls.len() as f64
    }

    /// Records one call; answers the new state when it changed.
    pub fn record(&mut self, failed: bool, now: Instant) -> Option<State> {
        let window = Duration::from_secs(self.cfg.window_secs);
        self.calls.push_back((now, failed));
        self.failures += usize::from(failed);
        while self
            .calls
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > window)
        {
            if let Some((_, true)) = self.calls.pop_front() {
                self.failures -= 1;
            }
        }
        let open = State::Open {
            until: now + Duration::from_secs(self.cfg.open_secs),
        };
        let next = match self.state {
            State::Open { until } if now >= until => {
                // The first outcome after the open period is the probe.
                if failed {
                    open
                } else {
                    State::HalfOpen { successes: 1 }
                }
            }
            State::Open { .. } => return None,
            State::HalfOpen { .. } if failed => open,
            State::HalfOpen { successes } if successes + 1 >= self.cfg.min_calls => {
                self.calls.clear();
                self.failures = 0;
                State::Closed
            }
            State::HalfOpen { successes } => State::HalfOpen {
                successes: successes + 1,
            },
            State::Closed
                if self.calls.len() as u32 >= self.cfg.min_calls
                    && self.failure_rate() >= self.cfg.failure_rate =>
            {
                open
            }
            State::Closed => State::Closed,
        };
        // Reopening after a failed probe is a change too (a new open period).
        let changed = std::mem::discriminant(&next) != std::mem::discriminant(&self.state)
            || matches!((self.state, next), (State::Open { .. }, State::Open { .. }));
        self.state = next;
        changed.then_some(next)
    }
}

/// The breakers of every provider in this process, for one signal.
pub struct Breakers {
    signal: Signal,
    by_provider: std::sync::Mutex<HashMap<String, Breaker>>,
}

impl Breakers {
    pub fn new(
        signal: Signal,
        cfgs: impl IntoIterator<Item = (String, BreakerConfig)>,
    ) -> Breakers {
        let by_provider: HashMap<String, Breaker> = cfgs
            .into_iter()
            .map(|(p, c)| (p, Breaker::new(c)))
            .collect();
        // Every breaker is shown from the start (closed), not only once it first changes.
        for provider in by_provider.keys() {
            metrics::gauge!(herald_core::telemetry::names::BREAKER_STATE, "provider" => provider.clone(), "signal" => signal.label())
                .set(0.0);
        }
        Breakers {
            signal,
            by_provider: std::sync::Mutex::new(by_provider),
        }
    }

    /// Records a batch's call outcomes; answers the state changes to persist.
    pub fn record(&self, outcomes: &[(String, DeliveryOutcome)]) -> Vec<Change> {
        let signals: Vec<(String, bool)> = outcomes
            .iter()
            .filter_map(|(p, o)| Some((p.clone(), Breaker::health_signal(*o)?)))
            .collect();
        self.record_failed(&signals)
    }

    /// Records `(provider, failed)` observations; answers the state changes to persist.
    pub fn record_failed(&self, observed: &[(String, bool)]) -> Vec<Change> {
        let now = Instant::now();
        let mut g = self.by_provider.lock().unwrap_or_else(|p| p.into_inner());
        let mut changes = Vec::new();
        for (provider, failed) in observed {
            let Some(b) = g.get_mut(provider) else {
                continue;
            };
            let failed = *failed;
            if let Some(state) = b.record(failed, now) {
                let rate = b.failure_rate();
                metrics::gauge!(herald_core::telemetry::names::BREAKER_STATE, "provider" => provider.clone(), "signal" => self.signal.label())
                    .set(if matches!(state, State::Open { .. }) { 1.0 } else { 0.0 });
                tracing::warn!(%provider, signal = self.signal.label(), ?state, failure_rate = rate, "circuit breaker changed");
                let open = match state {
                    State::Open { until } => Some(until.saturating_duration_since(now)),
                    _ => None,
                };
                changes.push((provider.clone(), open, rate));
            }
        }
        changes
    }

    /// Whether a provider may be chosen now (closed, half-open, or its open period is over).
    pub fn available(&self, provider: &str) -> bool {
        let g = self.by_provider.lock().unwrap_or_else(|p| p.into_inner());
        !matches!(g.get(provider).map(|b| b.state), Some(State::Open { until }) if Instant::now() < until)
    }

    /// Persists state changes for the route stage (and the other processes' `switch_provider`).
    pub async fn persist(
        &self,
        db: &tokio_postgres::Client,
        changes: &[Change],
    ) -> Result<(), tokio_postgres::Error> {
        persist(db, self.signal, changes).await
    }
}

async fn persist(
    db: &tokio_postgres::Client,
    signal: Signal,
    changes: &[Change],
) -> Result<(), tokio_postgres::Error> {
    let sql = match signal {
        Signal::Calls => {
            "INSERT INTO provider_health (provider, open_until, failure_rate, updated_at)
             VALUES ($1, now() + make_interval(secs => $2), $3, now())
             ON CONFLICT (provider) DO UPDATE
               SET open_until = EXCLUDED.open_until, failure_rate = EXCLUDED.failure_rate, updated_at = now()"
        }
        Signal::Receipts => {
            "INSERT INTO provider_health (provider, receipts_open_until, receipts_failure_rate, updated_at)
             VALUES ($1, now() + make_interval(secs => $2), $3, now())
             ON CONFLICT (provider) DO UPDATE
               SET receipts_open_until = EXCLUDED.receipts_open_until,
                   receipts_failure_rate = EXCLUDED.receipts_failure_rate, updated_at = now()"
        }
    };
    for (provider, open, rate) in changes {
        let secs = open.map(|d| d.as_secs_f64());
        db.execute(sql, &[provider, &secs, rate]).await?;
    }
    Ok(())
}

/// The providers open now by either signal, as PostgreSQL last has them, re-read at most once a
/// second. A failed read keeps the last set (routing never stops on a health read).
#[derive(Debug, Default, Clone)]
pub struct OpenSet {
    open: std::collections::HashSet<String>,
    read_at: Option<Instant>,
}

impl OpenSet {
    pub async fn refresh(&mut self, db: &tokio_postgres::Client) {
        if self
            .read_at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.read_at = Some(Instant::now());
        match db
            .query(
                "SELECT provider FROM provider_health
                 WHERE open_until > now() OR receipts_open_until > now()",
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

    pub fn is_open(&self, provider: &str) -> bool {
        self.open.contains(provider)
    }

    /// A set as if just read with these providers open (tests, and callers that know).
    pub fn with_open<'a>(providers: impl IntoIterator<Item = &'a str>) -> Self {
        OpenSet {
            open: providers.into_iter().map(str::to_owned).collect(),
            read_at: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            failure_rate: 0.5,
            min_calls: 4,
            window_secs: 10,
            open_secs: 5,
        }
    }

    #[test]
    fn opens_on_failure_rate_half_opens_and_closes_or_reopens() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        assert_eq!(b.record(true, t0), None);
        assert_eq!(b.record(false, t0), None);
        assert_eq!(b.record(false, t0), None);
        // 2 failures of 4 calls = 50 %: open.
        assert!(matches!(b.record(true, t0), Some(State::Open { .. })));
        // While open, outcomes (of calls routed earlier) change nothing.
        assert_eq!(b.record(false, t0 + Duration::from_secs(1)), None);
        // After the open period a failed probe reopens…
        let t1 = t0 + Duration::from_secs(6);
        assert!(matches!(b.record(true, t1), Some(State::Open { .. })));
        // …and successful probes half-open then close it.
        let t2 = t1 + Duration::from_secs(6);
        assert_eq!(b.record(false, t2), Some(State::HalfOpen { successes: 1 }));
        assert_eq!(b.record(false, t2), None);
        assert_eq!(b.record(false, t2), None);
        assert_eq!(b.record(false, t2), Some(State::Closed));
    }

    #[test]
    fn old_calls_leave_the_window_and_permanent_failures_do_not_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            b.record(true, t0);
        }
        // Those failures are 11 s old: the window holds only the new calls.
        let t1 = t0 + Duration::from_secs(11);
        for _ in 0..4 {
            assert_eq!(b.record(false, t1), None);
        }
        assert_eq!(
            Breaker::health_signal(DeliveryOutcome::FailedPermanent),
            None
        );
        assert_eq!(Breaker::health_signal(DeliveryOutcome::Unknown), Some(true));
        let all = Breakers::new(Signal::Calls, [("p".to_owned(), cfg())]);
        let fails: Vec<_> = (0..4)
            .map(|_| ("p".to_owned(), DeliveryOutcome::FailedTransient))
            .collect();
        assert_eq!(all.record(&fails).len(), 1);
        assert!(!all.available("p"));
        assert!(all.available("other"));
    }
}
