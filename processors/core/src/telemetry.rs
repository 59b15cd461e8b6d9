//! Logging (tracing) and metrics (Prometheus text through metrics-exporter-prometheus).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Metric names: `herald_<stage>_<noun>_<unit>_total` for counters, `_seconds` for histograms.
/// Labels stay low-cardinality (stage, channel, provider, outcome).
pub mod names {
    pub const RECORDS_IN: &str = "herald_stage_records_in_total";
    pub const RECORDS_OUT: &str = "herald_stage_records_out_total";
    pub const DEAD_LETTERS: &str = "herald_stage_dead_letters_total";
    pub const BATCH_SECONDS: &str = "herald_stage_batch_seconds";
    pub const SOURCE_RESTARTS: &str = "herald_stage_source_restarts_total";
    /// Failed batch rounds, by stage and error class.
    pub const STAGE_ERRORS: &str = "herald_stage_errors_total";
    /// Records isolated and ended alone because they failed alone.
    pub const POISON_RECORDS: &str = "herald_stage_poison_records_total";
    /// Render children killed by a render (memory or time exhausted), restarted at once.
    pub const RENDER_SANDBOX_DEATHS: &str = "herald_render_sandbox_deaths_total";
    pub const SEND_ATTEMPTS: &str = "herald_send_attempts_total";
    pub const SEND_SECONDS: &str = "herald_send_provider_call_seconds";
    /// From when a message became due (its request, or its `send_at`) to the start of its first
    /// provider call, by channel: the latency users see.
    pub const REQUEST_TO_CALL_SECONDS: &str = "herald_send_request_to_call_seconds";
    pub const PROJECTOR_ROWS: &str = "herald_projector_events_applied_total";
    pub const API_REQUESTS: &str = "herald_api_requests_total";
    /// Console logins by outcome: ok, failed, throttled (refused before the password was checked),
    /// busy (no room to check it).
    pub const CONSOLE_LOGINS: &str = "herald_console_logins_total";
    pub const TOKEN_FETCHES: &str = "herald_send_token_fetches_total";
    pub const RULE_ACTIONS: &str = "herald_send_rule_actions_total";
    pub const RATE_LIMIT_WAIT_SECONDS: &str = "herald_send_rate_limit_wait_seconds";
    pub const BREAKER_STATE: &str = "herald_send_breaker_open";
    pub const RECEIPTS: &str = "herald_callback_receipts_total";
    pub const DUPLICATE_REQUESTS: &str = "herald_accept_duplicate_requests_total";
    /// Copies of an attempt the send stage left to the worker that started it.
    pub const COPIES_SKIPPED: &str = "herald_send_copies_skipped_total";
    pub const SUPPRESSED: &str = "herald_route_suppressed_total";
    pub const STATUS_WEBHOOKS: &str = "herald_notify_status_webhooks_total";
    /// Alerts posted by the alert outbox, by result (sent, retry, given_up).
    pub const ALERTS: &str = "herald_send_alerts_total";
    /// Rows purged by retention, by table.
    pub const ROWS_PURGED: &str = "herald_retention_rows_purged_total";
    pub const CANCELED_DROPPED: &str = "herald_stage_canceled_dropped_total";
    /// Records a stage's consumer group has not yet consumed, per topic and partition (Kafka:
    /// librdkafka statistics; Redis Streams: entries not yet delivered plus pending). The delay
    /// tiers' backlog is the delay stage's lag on its tier topics.
    pub const CONSUMER_LAG: &str = "herald_stage_consumer_lag";
    /// Workers of a stage running in this process (instances are Prometheus' `instance` label).
    pub const STAGE_UP: &str = "herald_stage_up";
    /// An app's messages today over its daily quota (apps with a quota).
    pub const QUOTA_USED_RATIO: &str = "herald_app_quota_used_ratio";
    /// Rows waiting in an outbox (alerts, status webhooks) to be delivered.
    pub const OUTBOX_BACKLOG: &str = "herald_outbox_backlog";
    /// Tries of a dependency a process waited for at start (registry, PostgreSQL, topics), by
    /// dependency: a stage that starts while one is away waits for it instead of exiting.
    pub const START_RETRIES: &str = "herald_start_retries_total";
    /// Redis Streams: how long the group's first pending entry (handed to a consumer, not yet
    /// acknowledged) has waited since it was handed out, per stream (0 when none is pending).
    /// Entries of a dead consumer are taken over after `claim_idle`, so outside the delay tiers
    /// (which hold records for up to a tier's length) this stays below `claim_idle` plus a batch.
    pub const PENDING_OLDEST_SECONDS: &str = "herald_stage_pending_oldest_seconds";
    /// Requests whose body did not arrive within the listener's body-read timeout (answered
    /// 408, connection closed).
    pub const BODY_TIMEOUTS: &str = "herald_http_body_timeouts_total";
}

/// Every metric Herald exports (README's metrics section is checked against this list, and a
/// live `/metrics` against it, in tests/tests/ops.rs).
pub const ALL: &[&str] = &[
    names::RECORDS_IN,
    names::RECORDS_OUT,
    names::DEAD_LETTERS,
    names::BATCH_SECONDS,
    names::SOURCE_RESTARTS,
    names::STAGE_ERRORS,
    names::POISON_RECORDS,
    names::RENDER_SANDBOX_DEATHS,
    names::SEND_ATTEMPTS,
    names::SEND_SECONDS,
    names::REQUEST_TO_CALL_SECONDS,
    names::PROJECTOR_ROWS,
    names::API_REQUESTS,
    names::CONSOLE_LOGINS,
    names::TOKEN_FETCHES,
    names::RULE_ACTIONS,
    names::RATE_LIMIT_WAIT_SECONDS,
    names::BREAKER_STATE,
    names::RECEIPTS,
    names::DUPLICATE_REQUESTS,
    names::COPIES_SKIPPED,
    names::SUPPRESSED,
    names::STATUS_WEBHOOKS,
    names::ALERTS,
    names::ROWS_PURGED,
    names::CANCELED_DROPPED,
    names::CONSUMER_LAG,
    names::STAGE_UP,
    names::QUOTA_USED_RATIO,
    names::OUTBOX_BACKLOG,
    names::START_RETRIES,
    names::PENDING_OLDEST_SECONDS,
    names::BODY_TIMEOUTS,
];

/// Sets a consumer group's lag on one partition ([`names::CONSUMER_LAG`]).
pub fn consumer_lag(group: &str, topic: &str, partition: i32, lag: i64) {
    metrics::gauge!(names::CONSUMER_LAG, "group" => group.to_owned(), "topic" => topic.to_owned(),
        "partition" => partition.to_string())
    .set(lag as f64);
}

/// Installs the tracing subscriber (RUST_LOG, default info). Safe to call twice.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

/// The process-wide Prometheus recorder.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Fails only if another recorder is installed (tests): the handle still renders.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
