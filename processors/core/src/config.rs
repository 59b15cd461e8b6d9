//! Operator configuration: one TOML file, environment overrides for endpoints and secrets,
//! validated at start with every problem listed (CONTRACT.md §4).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use herald_schemas::Channel;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("cannot parse {0}: {1}")]
    Parse(String, String),
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    #[default]
    Kafka,
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Which transport carries the stages: `kafka` (production) or `redis` (lightweight).
    pub transport: TransportKind,
    pub kafka: KafkaConfig,
    pub registry: RegistryConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub admin: AdminConfig,
    pub tracing: TracingConfig,
    pub console: ConsoleConfig,
    pub api: ApiConfig,
    pub pipeline: PipelineConfig,
    pub security: SecurityConfig,
    pub retention: RetentionConfig,
    pub verifications: VerificationsConfig,
    pub template_store: TemplateStoreConfig,
    pub apps: Vec<AppConfig>,
    pub providers: Vec<ProviderConfig>,
    pub templates: Vec<TemplateConfig>,
    /// Failure rules, evaluated in ascending `priority`; the first match decides.
    pub rules: Vec<RuleConfig>,
    /// Per-channel policies.
    pub policies: Vec<PolicyConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            transport: TransportKind::Kafka,
            kafka: KafkaConfig::default(),
            registry: RegistryConfig::default(),
            postgres: PostgresConfig::default(),
            redis: RedisConfig::default(),
            admin: AdminConfig::default(),
            tracing: TracingConfig::default(),
            console: ConsoleConfig::default(),
            api: ApiConfig::default(),
            pipeline: PipelineConfig::default(),
            security: SecurityConfig::default(),
            retention: RetentionConfig::default(),
            verifications: VerificationsConfig::default(),
            template_store: TemplateStoreConfig::default(),
            apps: Vec::new(),
            providers: Vec::new(),
            templates: Vec::new(),
            rules: Vec::new(),
            policies: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers. Env: HERALD_KAFKA_BROKERS.
    pub brokers: String,
    /// Kafka transactions between topics for accept, render, route and delay.
    pub exactly_once: bool,
    /// Partitions of the topics Herald creates.
    pub partitions: i32,
    /// Replicas of the topics Herald creates (3 on a 3-broker cluster, whose
    /// `min.insync.replicas` is 2). Env: HERALD_KAFKA_REPLICATION_FACTOR.
    pub replication_factor: i32,
    /// Raw librdkafka options, applied last.
    pub options: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            exactly_once: true,
            partitions: 4,
            replication_factor: 1,
            options: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Confluent-compatible schema registry URL. Env: HERALD_REGISTRY_URL.
    pub url: String,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            url: "http://127.0.0.1:8081/apis/ccompat/v7".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// libpq-style connection string. Env: HERALD_POSTGRES_URL.
    pub url: String,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: "host=127.0.0.1 port=55432 user=herald dbname=herald".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Env: HERALD_REDIS_URL.
    pub url: String,
    /// Approximate cap per stream in Redis mode.
    pub max_len: usize,
    /// Pending entries idle this long are reclaimed from dead consumers.
    pub claim_idle_secs: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:56379".into(),
            max_len: 5_000_000,
            claim_idle_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `/metrics` and `/health`. Env: HERALD_ADMIN_LISTEN.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// Span export. Trace context (W3C `traceparent`) travels in record headers whether or not
/// spans are exported.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// OTLP/HTTP (protobuf) traces URL, used verbatim (`http://127.0.0.1:4318/v1/traces`); spans
    /// are exported only when set. Env: HERALD_OTLP_ENDPOINT, else the standard
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT + `/v1/traces`.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Share of new traces (requests without a sampled `traceparent`) that are sampled, 0–1;
    /// an incoming sampling decision is followed.
    pub sample_ratio: f64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            service_name: "herald".into(),
            sample_ratio: 1.0,
        }
    }
}

/// The operators' web console (stage `console`): its own listener, operators from here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Env: HERALD_CONSOLE_LISTEN. Loopback by default; put TLS in front to expose it.
    pub listen: String,
    /// How long a login lasts.
    pub session_hours: u64,
    /// Mark the session cookie `Secure` (set when served behind TLS).
    pub secure_cookie: bool,
    /// Who may log in. The console stays off without any.
    pub operators: Vec<OperatorConfig>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            listen: "127.0.0.1:8070".into(),
            session_hours: 12,
            secure_cookie: false,
            operators: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    pub name: String,
    /// `viewer` (reads), `operator` (also cancel, redrive, resolve, opt-outs, test sends),
    /// `admin` (also templates, and the audit log).
    pub role: String,
    /// The environment variable holding the password's argon2 hash (PHC string, as printed by
    /// `herald console hash-password`).
    pub password_hash_env: String,
    #[serde(skip)]
    pub password_hash: String,
}

/// The console's roles, weakest first.
pub const CONSOLE_ROLES: [&str; 3] = ["viewer", "operator", "admin"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// HTTP gateway and read API. Env: HERALD_API_LISTEN.
    pub listen: String,
    /// Accepted clock skew of `X-Herald-Timestamp`, and how long nonces are remembered.
    pub signature_window_secs: u64,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// How long a client may take to send its request headers (API and callback listeners).
    pub header_read_timeout_ms: u64,
    /// How long a client may take, after its headers, to send the whole request body (API and
    /// callback listeners): a body trickled slowly is cut off with 408.
    pub body_read_timeout_ms: u64,
    /// Most connections open at once on each listener; more wait in the backlog.
    pub max_connections: usize,
    /// Most live inbox streams (SSE) one app may hold open on one API process.
    pub max_streams_per_app: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "127.0.0.1:8080".into(),
            signature_window_secs: 300,
            max_body_bytes: 1 << 20,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            max_connections: 4096,
            max_streams_per_app: 100,
        }
    }
}

impl ApiConfig {
    /// The listener bounds of the API and callback ports.
    pub fn limits(&self) -> crate::serve::Limits {
        crate::serve::Limits {
            header_read_timeout: std::time::Duration::from_millis(self.header_read_timeout_ms),
            body_read_timeout: std::time::Duration::from_millis(self.body_read_timeout_ms.max(1)),
            max_connections: self.max_connections.max(1),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Most records a stage handles (and commits) as one batch. Larger batches cost memory
    /// (every stage holds one in flight) and latency more than they gain in throughput.
    pub batch_max: usize,
    /// After a batch's first record, how long to keep filling it.
    pub batch_linger_ms: u64,
    /// How long a poll waits for a first record.
    pub poll_wait_ms: u64,
    /// Largest number of recipients in one request.
    pub max_recipients: usize,
    /// Largest payload of one message (shared and own params, content, metadata), bytes.
    pub max_message_bytes: usize,
    /// Largest total a request may fan out into (its messages' payloads summed), bytes: shared
    /// params and metadata are copied into every message.
    pub max_request_bytes: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            batch_max: 1000,
            batch_linger_ms: 5,
            poll_wait_ms: 200,
            max_recipients: 10_000,
            max_message_bytes: 256 * 1024,
            max_request_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Name of the environment variable holding the server secret: it keys the recipient lookup
    /// hash and the marks stages leave for each other on records (never logged).
    pub secret_env: String,
    /// Resolved from `secret_env` at load.
    #[serde(skip)]
    pub secret: String,
    /// Outbound destinations allowed although they are loopback, private, link-local … (webhook
    /// recipients, alert and status URLs): exact `host:port` or a CIDR (`10.1.0.0/16`).
    /// Env: HERALD_OUTBOUND_ALLOW (comma-separated, added to these).
    pub outbound_allow: Vec<String>,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            secret_env: "HERALD_SERVER_SECRET".into(),
            secret: String::new(),
            outbound_allow: Vec::new(),
        }
    }
}

/// Verification codes (`POST /v1/verifications`): how they are made, how long they live, how
/// often they may be checked and sent. Keep the send limits at or below the SMS providers' own
/// per-number caps and the channel's frequency cap, so callers get Herald's clear 429 rather than
/// a provider's refusal.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerificationsConfig {
    /// Digits in a code (4–10); a request may ask for another length in that range.
    pub code_length: u8,
    /// How long a code is valid; a request may ask for less, never more than `max_ttl_secs`.
    pub ttl_secs: u64,
    pub max_ttl_secs: u64,
    /// Wrong checks before the code is dead. A resend does not reset the count.
    pub max_attempts: i32,
    /// Least time between two sends by one app to one destination.
    pub resend_interval_secs: u64,
    /// Most sends by one app to one destination per rolling hour and per rolling day (each app
    /// has its own: one app's abuse never denies another's codes).
    pub max_sends_per_hour: i64,
    pub max_sends_per_day: i64,
    /// Channels codes may go out on. `INAPP` is refused: the inbox stores what it shows. The
    /// default leaves out `WECOM`, `DINGTALK` and `FEISHU`, whose robots post to group chats
    /// where every member reads the code: list one to allow it.
    pub channels: Vec<String>,
    /// Region (ISO 3166-1 alpha-2) of phone numbers written without a country code: the limits
    /// key on numbers in E.164, so `13800138000` and `+8613800138000` are one destination.
    pub default_region: String,
}

impl Default for VerificationsConfig {
    fn default() -> Self {
        VerificationsConfig {
            code_length: 6,
            ttl_secs: 300,
            max_ttl_secs: 600,
            max_attempts: 5,
            resend_interval_secs: 60,
            max_sends_per_hour: 5,
            max_sends_per_day: 10,
            channels: ["SMS", "EMAIL", "WECHAT", "WEBHOOK"]
                .map(String::from)
                .to_vec(),
            default_region: "CN".into(),
        }
    }
}

/// Bounds of the template store that apps write through `PUT /v1/templates/{code}` and operators
/// through the console: every template is loaded by every render child and watcher, so no app may
/// grow it without limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplateStoreConfig {
    /// Largest template: its subject, texts and provider fields together, in bytes.
    pub max_bytes: usize,
    /// Versions kept per template code and app; older ones are deleted when a new one is stored
    /// (only the newest renders).
    pub versions_kept: usize,
    /// Template codes one app may own.
    pub codes_per_app: usize,
    /// Templates one app may store per minute (per API process).
    pub puts_per_minute: u32,
}

impl Default for TemplateStoreConfig {
    fn default() -> Self {
        TemplateStoreConfig {
            max_bytes: 64 * 1024,
            versions_kept: 20,
            codes_per_app: 1000,
            puts_per_minute: 60,
        }
    }
}

/// How long rows that grow with traffic are kept (see `retention.rs`). Purged in small batches
/// by a background task; rows an unfinished message still needs are never touched.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    pub enabled: bool,
    /// Seconds between purge rounds.
    pub interval_secs: u64,
    /// Rows deleted per statement (short transactions, no long locks).
    pub batch_rows: i64,
    /// Terminal messages (with their timeline and attempts), by last change.
    pub messages_days: i32,
    /// The send ledger, once its message is terminal (or gone from the read model).
    pub ledger_days: i32,
    /// Idempotency keys and request ids: a replay within this window creates nothing new.
    pub idempotency_days: i32,
    /// Cap and dedup hits; keep it longer than the longest policy window.
    pub policy_hits_days: i32,
    /// In-app inbox entries.
    pub inbox_days: i32,
    /// Delivered (or given-up) status notifications and alerts.
    pub outbox_days: i32,
    /// Daily usage counters.
    pub usage_days: i32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            enabled: true,
            interval_secs: 600,
            batch_rows: 5_000,
            messages_days: 90,
            ledger_days: 30,
            idempotency_days: 7,
            policy_hits_days: 7,
            inbox_days: 90,
            outbox_days: 7,
            usage_days: 400,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub id: String,
    /// Name of the environment variable holding the app's signing secret.
    pub secret_env: String,
    /// Resolved from `secret_env` at load; never logged.
    #[serde(skip)]
    pub secret: String,
    #[serde(default)]
    pub daily_quota: Option<u64>,
    #[serde(default)]
    pub rate_limit_per_sec: Option<u32>,
    #[serde(default)]
    pub status_url: Option<String>,
}

/// What loading the config needs to know about provider kinds. The providers crate's registry
/// implements it: the plumbing lists no provider, so adding one rebuilds nothing here.
pub trait ProviderKinds: Sync {
    /// The channel a kind sends on; `None` for a kind nobody registered.
    fn channel(&self, kind: &str) -> Option<Channel>;
    /// Every problem with one provider's kind-specific settings and credentials, each a
    /// sentence without the provider's code (the caller prefixes it).
    fn check(&self, p: &ProviderConfig) -> Vec<String>;
    /// The registered kinds, for the message about an unknown one.
    fn names(&self) -> Vec<&'static str>;
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Unique code, e.g. `smtp-main`.
    pub code: String,
    /// The provider kind (`smtp`, `aliyun_sms` …: the providers crate's registry lists them).
    pub kind: String,
    /// The kind's channel, resolved by [`Config::validate`] from the registry.
    #[serde(skip)]
    pub channel: Option<Channel>,
    /// Where requests go (overridable so simulators can stand in): `host:port` for SMTP, a URL
    /// for HTTP providers. Webhook providers may leave it empty: the recipient is the URL.
    #[serde(default)]
    pub endpoint: String,
    /// Lower first.
    #[serde(default)]
    pub priority: u32,
    /// Smooth weighted round robin within a priority group.
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub rate_limit_per_sec: Option<u32>,
    #[serde(default)]
    pub batch_max: Option<usize>,
    /// Provider call timeout.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// SMTP: sender address.
    #[serde(default)]
    pub from: Option<String>,
    /// SMTP: `none` (default), `starttls` or `implicit` (checked by the SMTP provider).
    #[serde(default)]
    pub tls: Option<String>,
    /// Environment variables holding credentials, by name (`username`, `password`, `secret`,
    /// `access_key_id` …). Resolved at load into `credentials`; never logged.
    #[serde(default)]
    pub credentials_env: BTreeMap<String, String>,
    #[serde(skip)]
    pub credentials: BTreeMap<String, String>,
    /// Non-secret provider options: `sign_name`, `sdk_app_id`, `region`, `agent_id`,
    /// `signature` (`v2`/`acs3` for Aliyun) … (README lists each kind's).
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    #[serde(default)]
    pub breaker: BreakerConfig,
}

/// Circuit breaker of a provider: opens when at least `min_calls` calls in the last
/// `window_secs` failed at `failure_rate` or more; stays open `open_secs`, then probes.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    pub failure_rate: f64,
    pub min_calls: u32,
    pub window_secs: u64,
    pub open_secs: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_rate: 0.5,
            min_calls: 10,
            window_secs: 30,
            open_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RuleScene {
    SendFailure,
    CallbackFailure,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    Retry,
    SwitchProvider,
    Fail,
    Alert,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// retry: most retries of a message (attempts after the first).
    #[serde(default = "three")]
    pub max_retry: u32,
    /// retry: delay before the first retry.
    #[serde(default = "five_f")]
    pub delay_seconds: f64,
    /// retry: each later retry waits this many times longer.
    #[serde(default = "two_f")]
    pub backoff_rate: f64,
    /// alert: the operator URL (signed per Standard Webhooks with `secret_env`'s value).
    #[serde(default)]
    pub webhook_url: Option<String>,
    #[serde(default)]
    pub secret_env: Option<String>,
    #[serde(skip)]
    pub secret: String,
}

impl Default for ActionConfig {
    fn default() -> Self {
        ActionConfig {
            max_retry: three(),
            delay_seconds: five_f(),
            backoff_rate: two_f(),
            webhook_url: None,
            secret_env: None,
            secret: String::new(),
        }
    }
}

fn three() -> u32 {
    3
}
fn five_f() -> f64 {
    5.0
}
fn two_f() -> f64 {
    2.0
}

/// One failure rule (CONTRACT.md §4). Empty matchers match anything.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    pub scene: RuleScene,
    #[serde(default)]
    pub channel: Option<Channel>,
    #[serde(default)]
    pub provider: String,
    /// Matched against the provider's error code and Herald's reason code.
    #[serde(default)]
    pub error_codes: Vec<String>,
    /// Matched (case-insensitive) inside the code and message.
    #[serde(default)]
    pub error_keywords: Vec<String>,
    pub action: RuleAction,
    #[serde(default)]
    pub action_config: ActionConfig,
    #[serde(default)]
    pub priority: i32,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnknownOutcomePolicy {
    /// The message ends `unknown` (nothing is resent blindly).
    #[default]
    Fail,
    /// Retry through the rules, with the same provider-side idempotency key.
    Resend,
    /// Record `sent` and let the provider's receipt decide.
    HoldForReceipt,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub channel: Channel,
    /// Unset: the channel's default ([`Config::unknown_outcome`]).
    #[serde(default)]
    pub unknown_outcome: Option<UnknownOutcomePolicy>,
    /// No sending in this local-time window (the recipient's time zone, else `timezone`).
    #[serde(default)]
    pub quiet_hours: Option<QuietHours>,
    /// At most `max` messages per recipient per `window_secs` (further ones are suppressed).
    #[serde(default)]
    pub frequency_cap: Option<FrequencyCap>,
    /// The same content to the same recipient within this many seconds is suppressed.
    #[serde(default)]
    pub dedup_window_secs: Option<u64>,
    /// Consult the opt-out list (`PUT /v1/opt-outs/{channel}/{address}`).
    #[serde(default = "yes")]
    pub opt_out: bool,
    /// A message waiting in `sent` for its receipt (accepted, or held after an unknown outcome)
    /// ends `unknown` (reason `receipt_timeout`) when none comes within this many seconds of
    /// the provider's answer. Default: 72 hours (the longest receipt window of our providers).
    #[serde(default)]
    pub receipt_timeout_secs: Option<u64>,
}

/// How long a message waits for its receipt when its channel's policy does not say.
pub const DEFAULT_RECEIPT_TIMEOUT_SECS: u64 = 72 * 3600;

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum QuietMode {
    /// Hold the message until the window ends.
    #[default]
    Hold,
    /// Suppress it.
    Drop,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuietHours {
    /// `HH:MM` or `HH:MM:SS`, local time; the window may cross midnight.
    pub start: String,
    pub end: String,
    #[serde(default)]
    pub mode: QuietMode,
    /// IANA zone for recipients without one (default UTC).
    #[serde(default)]
    pub timezone: Option<String>,
    /// Priorities that ignore quiet hours (default HIGH: codes and alerts go out at night).
    #[serde(default = "high_only")]
    pub exempt_priorities: Vec<herald_schemas::Priority>,
}

fn high_only() -> Vec<herald_schemas::Priority> {
    vec![herald_schemas::Priority::High]
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FrequencyCap {
    pub max: u32,
    pub window_secs: u64,
}

fn one() -> u32 {
    1
}

fn default_timeout_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    pub code: String,
    /// The app that owns the template; none: shared by every app (readable, not writable
    /// through the API). An app's own template of the same code shadows the shared one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    pub channel: Channel,
    #[serde(default = "one_i32")]
    pub version: i32,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub html: Option<String>,
    #[serde(default)]
    pub markdown: Option<String>,
    /// SMS: the provider-side template code and its parameters (each a template).
    #[serde(default)]
    pub provider_template: Option<String>,
    #[serde(default)]
    pub provider_params: BTreeMap<String, String>,
    /// Provider-side template code per provider code, where providers differ (e.g. Aliyun
    /// `SMS_…` and Tencent's numeric ids); overrides `provider_template`.
    #[serde(default)]
    pub provider_templates: BTreeMap<String, String>,
}

fn one_i32() -> i32 {
    1
}

impl TemplateConfig {
    /// Whether the template has anything to render.
    pub fn has_content(&self) -> bool {
        self.subject.is_some()
            || self.text.is_some()
            || self.html.is_some()
            || self.markdown.is_some()
            || self.provider_template.is_some()
            || !self.provider_templates.is_empty()
    }
}

impl Config {
    /// Reads `path` (if given), applies environment overrides, resolves secrets, validates
    /// (provider kinds against `kinds`).
    pub fn load(path: Option<&Path>, kinds: &dyn ProviderKinds) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| ConfigError::Read(p.display().to_string(), e))?;
                Config::parse(&text).map_err(|e| match e {
                    ConfigError::Parse(_, m) => ConfigError::Parse(p.display().to_string(), m),
                    e => e,
                })?
            }
            None => Config::default(),
        };
        cfg.apply_env(|k| std::env::var(k).ok());
        cfg.validate(kinds)?;
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse("config".into(), e.to_string()))
    }

    /// Environment overrides (endpoints) and secret resolution.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        if let Some(v) = env("HERALD_TRANSPORT") {
            match v.as_str() {
                "redis" => self.transport = TransportKind::Redis,
                "kafka" => self.transport = TransportKind::Kafka,
                _ => {}
            }
        }
        let set = |slot: &mut String, key: &str| {
            if let Some(v) = env(key) {
                *slot = v;
            }
        };
        set(&mut self.kafka.brokers, "HERALD_KAFKA_BROKERS");
        if let Some(rf) = env("HERALD_KAFKA_REPLICATION_FACTOR").and_then(|v| v.parse().ok()) {
            self.kafka.replication_factor = rf;
        }
        set(&mut self.registry.url, "HERALD_REGISTRY_URL");
        set(&mut self.postgres.url, "HERALD_POSTGRES_URL");
        set(&mut self.redis.url, "HERALD_REDIS_URL");
        set(&mut self.admin.listen, "HERALD_ADMIN_LISTEN");
        set(&mut self.api.listen, "HERALD_API_LISTEN");
        set(&mut self.console.listen, "HERALD_CONSOLE_LISTEN");
        for o in &mut self.console.operators {
            o.password_hash = env(&o.password_hash_env).unwrap_or_default();
        }
        if let Some(url) = env("HERALD_OTLP_ENDPOINT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            .or_else(|| {
                env("OTEL_EXPORTER_OTLP_ENDPOINT")
                    .map(|base| format!("{}/v1/traces", base.trim_end_matches('/')))
            })
        {
            self.tracing.otlp_endpoint = Some(url);
        }
        for app in &mut self.apps {
            app.secret = env(&app.secret_env).unwrap_or_default();
        }
        self.security.secret = env(&self.security.secret_env).unwrap_or_default();
        if let Some(extra) = env("HERALD_OUTBOUND_ALLOW") {
            self.security.outbound_allow.extend(
                extra
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            );
        }
        for r in &mut self.rules {
            if let Some(var) = &r.action_config.secret_env {
                r.action_config.secret = env(var).unwrap_or_default();
            }
        }
        for p in &mut self.providers {
            p.credentials = p
                .credentials_env
                .iter()
                .filter_map(|(name, var)| Some((name.clone(), env(var)?)))
                .collect();
        }
    }

    /// Every problem, not just the first. Resolves each provider's channel from `kinds`.
    pub fn validate(&mut self, kinds: &dyn ProviderKinds) -> Result<(), ConfigError> {
        for p in &mut self.providers {
            p.channel = kinds.channel(&p.kind);
        }
        let mut problems = Vec::new();
        let mut seen = HashSet::new();
        for app in &self.apps {
            if !seen.insert(&app.id) {
                problems.push(format!("apps: duplicate id {:?}", app.id));
            }
            if app.secret.is_empty() {
                problems.push(format!(
                    "apps.{}: secret variable {} is not set",
                    app.id, app.secret_env
                ));
            }
        }
        if self.security.secret.len() < 16 {
            problems.push(format!(
                "security: server secret variable {} must be set (at least 16 characters)",
                self.security.secret_env
            ));
        }
        let v = &self.verifications;
        if !(4..=10).contains(&v.code_length) {
            problems.push("verifications: code_length must be 4 to 10".to_owned());
        }
        if v.ttl_secs == 0 || v.ttl_secs > v.max_ttl_secs {
            problems.push(
                "verifications: ttl_secs must be positive and at most max_ttl_secs".to_owned(),
            );
        }
        if v.max_attempts < 1
            || v.max_sends_per_hour < 1
            || v.max_sends_per_day < v.max_sends_per_hour
        {
            problems.push(
                "verifications: max_attempts and max_sends_per_hour must be at least 1, max_sends_per_day at least max_sends_per_hour"
                    .to_owned(),
            );
        }
        for c in &v.channels {
            if c.eq_ignore_ascii_case("INAPP") {
                problems.push("verifications.channels: INAPP cannot carry codes (the inbox stores what it shows)".to_owned());
            } else if !herald_schemas::Channel::ALL
                .iter()
                .any(|k| k.as_str().eq_ignore_ascii_case(c))
            {
                problems.push(format!("verifications.channels: unknown channel {c:?}"));
            }
        }
        if <phonenumber::country::Id as std::str::FromStr>::from_str(
            &v.default_region.trim().to_ascii_uppercase(),
        )
        .is_err()
        {
            problems.push(format!(
                "verifications.default_region: {:?} is not a region with phone numbers (ISO 3166-1 alpha-2, e.g. CN)",
                v.default_region
            ));
        }
        for a in &self.security.outbound_allow {
            if let Err(e) = crate::netguard::Allow::parse(a) {
                problems.push(format!("security.outbound_allow: {e}"));
            }
        }
        if let Some(url) = &self.tracing.otlp_endpoint
            && !matches!(
                url::Url::parse(url)
                    .map(|u| u.scheme().to_owned())
                    .as_deref(),
                Ok("http" | "https")
            )
        {
            problems.push(format!(
                "tracing.otlp_endpoint: {url:?} is not an http(s) URL"
            ));
        }
        let mut names = HashSet::new();
        for o in &self.console.operators {
            if !names.insert(&o.name) || o.name.is_empty() {
                problems.push(format!(
                    "console.operators: duplicate or empty name {:?}",
                    o.name
                ));
            }
            if !CONSOLE_ROLES.contains(&o.role.as_str()) {
                problems.push(format!(
                    "console.operators.{}: role {:?} is not one of {CONSOLE_ROLES:?}",
                    o.name, o.role
                ));
            }
            // Unset: that operator cannot log in (a deployment that does not run the console
            // need not hold its secrets). Set: it must be a hash, not a password.
            if !o.password_hash.is_empty() && !o.password_hash.starts_with("$argon2") {
                problems.push(format!(
                    "console.operators.{}: {} must hold an argon2 password hash \
                     (herald console hash-password), not a password",
                    o.name, o.password_hash_env
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.tracing.sample_ratio) {
            problems.push(format!(
                "tracing.sample_ratio: {} is not between 0 and 1",
                self.tracing.sample_ratio
            ));
        }
        let guard = crate::netguard::Guard::new(&self.security.outbound_allow);
        for app in &self.apps {
            if let Some(url) = &app.status_url
                && let Err(e) = guard.check_url(url)
            {
                problems.push(format!("apps.{}: status_url: {e}", app.id));
            }
        }
        for r in &self.rules {
            if let Some(url) = &r.action_config.webhook_url
                && let Err(e) = guard.check_url(url)
            {
                problems.push(format!("rules.{}: webhook_url: {e}", r.name));
            }
        }
        let mut codes = HashSet::new();
        for p in &self.providers {
            if !codes.insert(&p.code) {
                problems.push(format!("providers: duplicate code {:?}", p.code));
            }
            if p.weight == 0 {
                problems.push(format!("providers.{}: weight must be at least 1", p.code));
            }
            if !(0.0..=1.0).contains(&p.breaker.failure_rate) || p.breaker.min_calls == 0 {
                problems.push(format!(
                    "providers.{}: breaker needs 0 <= failure_rate <= 1 and min_calls >= 1",
                    p.code
                ));
            }
            if p.rate_limit_per_sec == Some(0) {
                problems.push(format!(
                    "providers.{}: rate_limit_per_sec must be positive",
                    p.code
                ));
            }
            if p.timeout_ms == 0 {
                problems.push(format!("providers.{}: timeout_ms must be positive", p.code));
            }
            for (name, var) in &p.credentials_env {
                if !p.credentials.contains_key(name) {
                    problems.push(format!(
                        "providers.{}: credential {name} (variable {var}) is not set",
                        p.code
                    ));
                }
            }
            if p.channel.is_none() {
                problems.push(format!(
                    "providers.{}: unknown kind {:?} (known: {})",
                    p.code,
                    p.kind,
                    kinds.names().join(", ")
                ));
            } else {
                problems.extend(
                    kinds
                        .check(p)
                        .into_iter()
                        .map(|m| format!("providers.{}: {m}", p.code)),
                );
            }
        }
        // A receipt signed with a secret Herald also signs outgoing webhooks with could be
        // forged by every receiver of those webhooks: the two must differ.
        let signing: Vec<(&str, &str)> = self
            .providers
            .iter()
            .filter(|p| p.kind == "webhook")
            .flat_map(|p| {
                p.credentials
                    .iter()
                    .filter(|(name, v)| name.as_str() == "secret" && !v.is_empty())
                    .map(|(_, v)| (p.code.as_str(), v.as_str()))
            })
            .collect();
        for p in &self.providers {
            let Some(callback) = p
                .credentials
                .get("callback_secret")
                .filter(|v| !v.is_empty())
            else {
                continue;
            };
            for (signer, secret) in &signing {
                if callback == secret {
                    problems.push(format!(
                        "providers.{}: callback_secret is the secret providers.{signer} signs \
                         outgoing webhooks with; every receiver of those could forge receipts \
                         (use a separate secret)",
                        p.code
                    ));
                }
            }
        }
        for r in &self.rules {
            let a = &r.action_config;
            if !r.provider.is_empty() && !codes.contains(&r.provider) {
                problems.push(format!(
                    "rules.{}: unknown provider {:?}",
                    r.name, r.provider
                ));
            }
            if r.action == RuleAction::Retry
                && (a.delay_seconds < 0.0 || a.backoff_rate < 1.0 || !a.delay_seconds.is_finite())
            {
                problems.push(format!(
                    "rules.{}: retry needs delay_seconds >= 0 and backoff_rate >= 1",
                    r.name
                ));
            }
            if r.action == RuleAction::Alert {
                if a.webhook_url.is_none() {
                    problems.push(format!(
                        "rules.{}: alert needs action_config.webhook_url",
                        r.name
                    ));
                }
                if let Some(var) = &a.secret_env
                    && a.secret.is_empty()
                {
                    problems.push(format!(
                        "rules.{}: secret variable {var} is not set",
                        r.name
                    ));
                }
            }
        }
        for p in &self.policies {
            if p.receipt_timeout_secs == Some(0) {
                problems.push(format!(
                    "policies.{}: receipt_timeout_secs must be positive",
                    p.channel.as_str()
                ));
            }
        }
        let mut tpl = HashSet::new();
        for t in &self.templates {
            if !tpl.insert((&t.code, t.version)) {
                problems.push(format!("templates: duplicate {} v{}", t.code, t.version));
            }
            if !t.has_content() {
                problems.push(format!("templates.{}: no content", t.code));
            }
        }
        if self.pipeline.max_message_bytes > crate::worker::MAX_OUTPUT_BYTES / 3 {
            problems.push(format!(
                "pipeline.max_message_bytes must be at most {} (a message travels inside larger records)",
                crate::worker::MAX_OUTPUT_BYTES / 3
            ));
        }
        if self.pipeline.batch_max == 0 {
            problems.push("pipeline.batch_max must be positive".into());
        }
        let ts = &self.template_store;
        if ts.max_bytes == 0 || ts.max_bytes > 1 << 20 {
            problems.push("template_store.max_bytes must be 1 to 1048576".into());
        }
        if ts.versions_kept == 0 || ts.codes_per_app == 0 || ts.puts_per_minute == 0 {
            problems.push(
                "template_store.versions_kept, codes_per_app and puts_per_minute must be positive"
                    .into(),
            );
        }
        if self.kafka.partitions < 1 {
            problems.push("kafka.partitions must be positive".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The policy of a channel, if any.
    pub fn policy(&self, channel: Channel) -> Option<&PolicyConfig> {
        self.policies.iter().find(|p| p.channel == channel)
    }

    /// The unknown-outcome policy of a channel: the configured one, else `resend` for INAPP
    /// (Herald's own inbox: an insert is keyed by the message id, so a second one adds
    /// nothing and resending is always safe) and `fail` for every other channel.
    pub fn unknown_outcome(&self, channel: Channel) -> UnknownOutcomePolicy {
        self.policies
            .iter()
            .find(|p| p.channel == channel)
            .and_then(|p| p.unknown_outcome)
            .unwrap_or(match channel {
                Channel::Inapp => UnknownOutcomePolicy::Resend,
                _ => UnknownOutcomePolicy::Fail,
            })
    }

    /// How long a message of `channel` waits in `sent` for its receipt.
    pub fn receipt_timeout(&self, channel: Channel) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.policy(channel)
                .and_then(|p| p.receipt_timeout_secs)
                .unwrap_or(DEFAULT_RECEIPT_TIMEOUT_SECS),
        )
    }

    /// Provider code → kind, for every provider configured.
    pub fn provider_kinds(&self) -> std::collections::HashMap<String, String> {
        self.providers
            .iter()
            .map(|p| (p.code.clone(), p.kind.clone()))
            .collect()
    }

    /// Providers of a channel in routing order (priority, then config order).
    pub fn providers_for(&self, channel: Channel) -> Vec<&ProviderConfig> {
        let mut v: Vec<&ProviderConfig> = self
            .providers
            .iter()
            .filter(|p| p.channel == Some(channel))
            .collect();
        v.sort_by_key(|p| p.priority);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two kinds, the way the providers crate's registry answers.
    struct Kinds;

    impl ProviderKinds for Kinds {
        fn channel(&self, kind: &str) -> Option<Channel> {
            match kind {
                "smtp" => Some(Channel::Email),
                "aliyun_sms" => Some(Channel::Sms),
                "webhook" => Some(Channel::Webhook),
                _ => None,
            }
        }
        fn check(&self, p: &ProviderConfig) -> Vec<String> {
            let mut v = Vec::new();
            if p.endpoint.is_empty() {
                v.push("endpoint is required".to_owned());
            }
            if p.kind == "aliyun_sms" && !p.settings.contains_key("sign_name") {
                v.push("settings.sign_name is required".to_owned());
            }
            v
        }
        fn names(&self) -> Vec<&'static str> {
            vec!["smtp", "aliyun_sms"]
        }
    }

    #[test]
    fn lists_every_problem() {
        let text = r#"
            [[apps]]
            id = "shop"
            secret_env = "NOPE_SECRET"
            [[providers]]
            code = "a"
            kind = "smtp"
            weight = 0
            [[providers]]
            code = "a"
            kind = "aliyun_sms"
            [[providers]]
            code = "b"
            kind = "pigeon"
            [verifications]
            code_length = 3
            channels = ["SMS", "INAPP", "PIGEON"]
            default_region = "XX"
        "#;
        let mut cfg = Config::parse(text).unwrap();
        cfg.apply_env(|_| None);
        let ConfigError::Invalid(p) = cfg.validate(&Kinds).unwrap_err() else {
            panic!("expected Invalid")
        };
        let all = p.join("\n");
        for needle in [
            "NOPE_SECRET",
            "weight",
            "duplicate code",
            "providers.a: endpoint is required",
            "providers.a: settings.sign_name is required",
            "providers.b: unknown kind \"pigeon\" (known: smtp, aliyun_sms)",
            "verifications: code_length must be 4 to 10",
            "verifications.channels: INAPP cannot carry codes",
            "verifications.channels: unknown channel \"PIGEON\"",
            "verifications.default_region: \"XX\" is not a region",
        ] {
            assert!(all.contains(needle), "{needle} missing from:\n{all}");
        }
        assert_eq!(cfg.providers[1].channel, Some(Channel::Sms));
        assert_eq!(cfg.providers_for(Channel::Email).len(), 1);
    }

    #[test]
    fn a_callback_secret_equal_to_an_outbound_signing_secret_is_refused() {
        let text = r#"
            [[providers]]
            code = "hooks"
            kind = "webhook"
            endpoint = "-"
            credentials_env = { secret = "OUT", callback_secret = "IN" }
            [[providers]]
            code = "relay"
            kind = "smtp"
            endpoint = "127.0.0.1:2525"
            credentials_env = { callback_secret = "SAME" }
        "#;
        let env = |same: &'static str| {
            move |k: &str| match k {
                "OUT" => Some("whsec_out".to_owned()),
                "IN" => Some("whsec_in".to_owned()),
                "SAME" => Some(same.to_owned()),
                "HERALD_SERVER_SECRET" => Some("a-server-secret-of-some-length".to_owned()),
                _ => None,
            }
        };
        let mut cfg = Config::parse(text).unwrap();
        cfg.apply_env(env("whsec_out"));
        let ConfigError::Invalid(p) = cfg.validate(&Kinds).unwrap_err() else {
            panic!("expected Invalid")
        };
        assert!(
            p.iter().any(|m| m.starts_with(
                "providers.relay: callback_secret is the secret providers.hooks signs"
            )),
            "{p:?}"
        );
        let mut cfg = Config::parse(text).unwrap();
        cfg.apply_env(env("whsec_other"));
        cfg.validate(&Kinds).unwrap();
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(Config::parse("[kafka]\nbrokerz = \"x\"").is_err());
    }

    #[test]
    fn env_overrides_endpoints_and_resolves_secrets() {
        let mut cfg = Config::parse("[[apps]]\nid = \"a\"\nsecret_env = \"S\"").unwrap();
        cfg.apply_env(|k| match k {
            "S" => Some("s3cret".into()),
            "HERALD_SERVER_SECRET" => Some("a-server-secret-of-some-length".into()),
            "HERALD_KAFKA_BROKERS" => Some("k:1".into()),
            "HERALD_TRANSPORT" => Some("redis".into()),
            _ => None,
        });
        assert_eq!(cfg.apps[0].secret, "s3cret");
        assert_eq!(cfg.kafka.brokers, "k:1");
        assert_eq!(cfg.transport, TransportKind::Redis);
        cfg.validate(&Kinds).unwrap();
    }

    #[test]
    fn the_otlp_endpoint_comes_from_the_config_or_the_standard_variables() {
        let secret = |k: &str| {
            (k == "HERALD_SERVER_SECRET").then(|| "a-server-secret-of-some-length".to_owned())
        };
        let mut cfg = Config::default();
        cfg.apply_env(|k| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://127.0.0.1:4318/".into()),
            _ => secret(k),
        });
        assert_eq!(
            cfg.tracing.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
        cfg.validate(&Kinds).unwrap();
        let mut cfg = Config::parse("[tracing]\nsample_ratio = 2.0").unwrap();
        cfg.apply_env(|k| match k {
            "HERALD_OTLP_ENDPOINT" => Some("127.0.0.1:4318".into()),
            _ => secret(k),
        });
        let Err(ConfigError::Invalid(problems)) = cfg.validate(&Kinds) else {
            panic!("a URL without a scheme and a ratio above 1 are refused");
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
