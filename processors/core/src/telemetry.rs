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
    pub const PROJECTOR_ROWS: &str = "herald_projector_events_applied_total";
    pub const API_REQUESTS: &str = "herald_api_requests_total";
    pub const TOKEN_FETCHES: &str = "herald_send_token_fetches_total";
    pub const RULE_ACTIONS: &str = "herald_send_rule_actions_total";
    pub const RATE_LIMIT_WAIT_SECONDS: &str = "herald_send_rate_limit_wait_seconds";
    pub const BREAKER_STATE: &str = "herald_send_breaker_open";
    pub const RECEIPTS: &str = "herald_callback_receipts_total";
    pub const DUPLICATE_REQUESTS: &str = "herald_accept_duplicate_requests_total";
    pub const SUPPRESSED: &str = "herald_route_suppressed_total";
    pub const STATUS_WEBHOOKS: &str = "herald_notify_status_webhooks_total";
    pub const CANCELED_DROPPED: &str = "herald_stage_canceled_dropped_total";
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
