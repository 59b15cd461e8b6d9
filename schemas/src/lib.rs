//! Rust types for Herald's events. The `.avsc` files beside this crate are the contract: each
//! type here derives its Avro schema, and `tests/schemas.rs` checks that the derived schema and the
//! file have the same Parsing Canonical Form, so the two cannot drift. At run time the codec uses
//! the schema parsed from the file ([`Event::schema`]), never the derived one.

use std::collections::HashMap;
use std::sync::LazyLock;

use apache_avro::{AvroSchema, Schema};
use serde::{Deserialize, Serialize};

/// Public topics (CONTRACT.md §1). Names are exact.
pub mod topics {
    pub const REQUESTS: &str = "herald.requests.v1";
    pub const DELIVERIES: &str = "herald.deliveries.v1";
    pub const RECEIPTS: &str = "herald.receipts.v1";
    pub const DEAD_LETTERS: &str = "herald.dead-letters.v1";
    /// Internal: one record per recipient, after validation and dedup.
    pub const ACCEPTED: &str = "herald.accepted";
    /// Internal: final content per message.
    pub const RENDERED: &str = "herald.rendered";
    /// Internal: terminal facts decided before sending (suppressed, canceled, failed, expired).
    pub const STATUS: &str = "herald.status";
    /// Internal: the delay tier (one topic per tier: `herald.delay.<secs>s`).
    pub const DELAY_PREFIX: &str = "herald.delay.";
    /// Internal: per-channel dispatch topics (`herald.dispatch.email`, …).
    pub const DISPATCH_PREFIX: &str = "herald.dispatch.";

    /// The dispatch topic of a channel.
    pub fn dispatch(channel: crate::Channel) -> String {
        format!("{DISPATCH_PREFIX}{}", channel.as_str())
    }

    /// The priority lane: every channel's HIGH messages (codes, alerts) share one topic with its
    /// own send worker, so they never queue behind a NORMAL/LOW backlog of their channel.
    pub const DISPATCH_HIGH: &str = "herald.dispatch.high";

    /// Where a routed message of this channel and priority waits for the send stage.
    pub fn dispatch_lane(channel: crate::Channel, priority: crate::Priority) -> String {
        match priority {
            crate::Priority::High => DISPATCH_HIGH.to_owned(),
            _ => dispatch(channel),
        }
    }
}

/// Kafka / stream header names.
pub mod headers {
    /// W3C Trace Context `traceparent` (`00-<trace id>-<parent span id>-<flags>`).
    pub const TRACEPARENT: &str = "traceparent";
    /// Before traceparent: the trace id alone. Read (when it holds a traceparent), not written.
    pub const TRACE_ID: &str = "herald-trace-id";
    pub const EVENT_TYPE: &str = "herald-event";
}

/// Schemas of the logical types the derive cannot infer from a plain `i64`.
mod logical {
    use std::collections::HashSet;

    use apache_avro::Schema;
    use apache_avro::schema::{Name, NamespaceRef, UnionSchema};

    pub fn ts_millis(_: &mut HashSet<Name>, _: NamespaceRef) -> Schema {
        Schema::TimestampMillis
    }

    pub fn opt_ts_millis(_: &mut HashSet<Name>, _: NamespaceRef) -> Schema {
        Schema::Union(
            UnionSchema::new(vec![Schema::Null, Schema::TimestampMillis])
                .unwrap_or_else(|_| unreachable!("null and a long are a valid union")),
        )
    }
}

/// An event type with its schema file.
pub trait Event: Serialize + for<'de> Deserialize<'de> + Send + Sync + 'static {
    /// Avro full name, e.g. `io.herald.v1.SendRequested`.
    const FULL_NAME: &'static str;
    /// The schema parsed from `schemas/<file>.avsc`.
    fn schema() -> &'static Schema;
    /// The schema's JSON text, as registered in the schema registry.
    fn schema_text() -> &'static str;
}

macro_rules! event {
    ($ty:ident, $file:literal) => {
        impl Event for $ty {
            const FULL_NAME: &'static str = concat!("io.herald.v1.", stringify!($ty));
            fn schema() -> &'static Schema {
                static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
                    // The file is compiled in; a parse failure is a build defect that the
                    // schema tests catch before anything ships.
                    Schema::parse_str($ty::schema_text()).expect(concat!("valid ", $file))
                });
                &SCHEMA
            }
            fn schema_text() -> &'static str {
                include_str!(concat!("../", $file))
            }
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
/// `PUSH` is mobile push (FCM, APNs, Getui): the address is a device token.
pub enum Channel {
    #[serde(rename = "EMAIL")]
    Email,
    #[serde(rename = "SMS")]
    Sms,
    #[serde(rename = "WECOM")]
    Wecom,
    #[serde(rename = "DINGTALK")]
    Dingtalk,
    #[serde(rename = "FEISHU")]
    Feishu,
    #[serde(rename = "WECHAT")]
    Wechat,
    #[serde(rename = "WEBHOOK")]
    Webhook,
    #[serde(rename = "INAPP")]
    Inapp,
    #[serde(rename = "PUSH")]
    Push,
}

impl Channel {
    pub const ALL: [Channel; 9] = [
        Channel::Email,
        Channel::Sms,
        Channel::Wecom,
        Channel::Dingtalk,
        Channel::Feishu,
        Channel::Wechat,
        Channel::Webhook,
        Channel::Inapp,
        Channel::Push,
    ];

    /// Lower-case name used in topic names, config and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Wecom => "wecom",
            Channel::Dingtalk => "dingtalk",
            Channel::Feishu => "feishu",
            Channel::Wechat => "wechat",
            Channel::Webhook => "webhook",
            Channel::Inapp => "inapp",
            Channel::Push => "push",
        }
    }

    pub fn parse(s: &str) -> Option<Channel> {
        Channel::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub enum Priority {
    #[serde(rename = "HIGH")]
    High,
    #[default]
    #[serde(rename = "NORMAL")]
    Normal,
    #[serde(rename = "LOW")]
    Low,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub struct Recipient {
    pub address: String,
    #[serde(default)]
    pub params: HashMap<String, String>,
    #[serde(default)]
    pub timezone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub struct Content {
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub html: Option<String>,
    #[serde(default)]
    pub markdown: Option<String>,
}

/// `io.herald.v1.SendRequested`, exactly as CONTRACT.md §1 fixes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub struct SendRequested {
    pub request_id: String,
    pub app_id: String,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    pub channel: Channel,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub params: HashMap<String, String>,
    pub recipients: Vec<Recipient>,
    #[serde(default)]
    pub content: Option<Content>,
    #[avro(with = crate::logical::opt_ts_millis)]
    #[serde(default)]
    pub send_at: Option<i64>,
    #[serde(default)]
    pub priority: Priority,
    #[avro(with = crate::logical::opt_ts_millis)]
    #[serde(default)]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub metadata: HashMap<String, String>,
    #[avro(with = crate::logical::ts_millis)]
    pub requested_at: i64,
}
event!(SendRequested, "send_requested.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub struct EventHeader {
    pub event_id: String,
    #[avro(with = crate::logical::ts_millis)]
    pub event_time: i64,
    pub stage: String,
    pub trace_id: String,
    pub message_id: String,
    pub request_id: String,
    pub app_id: String,
    pub channel: Channel,
    pub attempt: i32,
    #[serde(default)]
    pub metadata: HashMap<String, String>,
}

impl EventHeader {
    /// The header of the next event about the same message, produced by `stage`.
    pub fn follow(&self, stage: &str, event_id: String, event_time: i64) -> EventHeader {
        EventHeader {
            event_id,
            event_time,
            stage: stage.to_owned(),
            ..self.clone()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub struct Reason {
    pub code: String,
    pub message: String,
}

impl Reason {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Reason {
        Reason {
            code: code.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub struct RenderedContent {
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub html: Option<String>,
    #[serde(default)]
    pub markdown: Option<String>,
    #[serde(default)]
    pub provider_template: Option<String>,
    #[serde(default)]
    pub provider_params: HashMap<String, String>,
    #[serde(default)]
    pub provider_templates: HashMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub struct MessageAccepted {
    pub header: EventHeader,
    pub recipient: Recipient,
    pub recipient_index: i32,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub params: HashMap<String, String>,
    #[serde(default)]
    pub content: Option<Content>,
    #[avro(with = crate::logical::opt_ts_millis)]
    #[serde(default)]
    pub send_at: Option<i64>,
    #[serde(default)]
    pub priority: Priority,
    #[avro(with = crate::logical::opt_ts_millis)]
    #[serde(default)]
    pub expires_at: Option<i64>,
    #[avro(with = crate::logical::ts_millis)]
    pub requested_at: i64,
}
event!(MessageAccepted, "message_accepted.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub struct MessageRendered {
    pub header: EventHeader,
    pub recipient: Recipient,
    #[serde(default)]
    pub priority: Priority,
    #[avro(with = crate::logical::opt_ts_millis)]
    #[serde(default)]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub template_version: Option<i32>,
    pub content: RenderedContent,
    /// When the message became due: its request's time, or its `send_at` when scheduled.
    #[avro(with = crate::logical::opt_ts_millis)]
    #[serde(default)]
    pub due_at: Option<i64>,
}
event!(MessageRendered, "message_rendered.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub struct MessageRouted {
    pub header: EventHeader,
    pub recipient: Recipient,
    #[serde(default)]
    pub priority: Priority,
    #[avro(with = crate::logical::opt_ts_millis)]
    #[serde(default)]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub template_version: Option<i32>,
    pub content: RenderedContent,
    pub provider: String,
    pub provider_kind: String,
    #[serde(default)]
    pub tried_providers: Vec<String>,
    /// When the message became due (see [`MessageRendered::due_at`]).
    #[avro(with = crate::logical::opt_ts_millis)]
    #[serde(default)]
    pub due_at: Option<i64>,
}
event!(MessageRouted, "message_routed.avsc");

/// How a provider call ended, classified once at the edge (STYLE.md "Errors").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub enum DeliveryOutcome {
    #[serde(rename = "SUCCEEDED")]
    Succeeded,
    #[serde(rename = "FAILED_PERMANENT")]
    FailedPermanent,
    #[serde(rename = "FAILED_TRANSIENT")]
    FailedTransient,
    #[serde(rename = "RATE_LIMITED")]
    RateLimited,
    #[serde(rename = "UNKNOWN")]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub struct DeliveryAttempted {
    pub header: EventHeader,
    #[serde(default)]
    pub provider: Option<String>,
    pub status: String,
    pub outcome: DeliveryOutcome,
    #[serde(default)]
    pub reason: Option<Reason>,
    #[serde(default)]
    pub provider_message_id: Option<String>,
    #[serde(default)]
    pub provider_response_code: Option<String>,
    pub latency_ms: i64,
    pub recipient_masked: String,
    #[serde(default)]
    pub template: Option<String>,
}
event!(DeliveryAttempted, "delivery_attempted.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub struct ReceiptReceived {
    pub header: EventHeader,
    pub provider: String,
    pub status: String,
    pub provider_status_code: String,
    #[serde(default)]
    pub provider_message_id: Option<String>,
    #[serde(default)]
    pub reason: Option<Reason>,
    #[avro(with = crate::logical::ts_millis)]
    pub reported_at: i64,
    /// The `callback_failure` rules' decision on an undelivered receipt (`retry`, `fail`,
    /// `alert`); `None` when no rule matched.
    #[serde(default)]
    pub decision: Option<String>,
}
event!(ReceiptReceived, "receipt_received.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub struct MessageSuppressed {
    pub header: EventHeader,
    pub status: String,
    pub policy: String,
    pub reason: Reason,
}
event!(MessageSuppressed, "message_suppressed.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub struct MessageCanceled {
    pub header: EventHeader,
    #[serde(default)]
    pub reason: Option<Reason>,
}
event!(MessageCanceled, "message_canceled.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub struct MessageFailed {
    pub header: EventHeader,
    #[serde(default)]
    pub provider: Option<String>,
    pub reason: Reason,
}
event!(MessageFailed, "message_failed.avsc");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub enum DelayPurpose {
    #[serde(rename = "SCHEDULED_SEND")]
    ScheduledSend,
    #[serde(rename = "RETRY")]
    Retry,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub struct DelayScheduled {
    pub header: EventHeader,
    pub purpose: DelayPurpose,
    #[avro(with = crate::logical::ts_millis)]
    pub due_at: i64,
    pub target_topic: String,
    #[avro(with)]
    #[serde(default, with = "apache_avro::serde::bytes_opt")]
    pub key: Option<Vec<u8>>,
    #[avro(with)]
    #[serde(with = "apache_avro::serde::bytes")]
    pub payload: Vec<u8>,
    #[serde(default)]
    pub reason: Option<Reason>,
}
event!(DelayScheduled, "delay_scheduled.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "io.herald.v1")]
pub struct DeadLettered {
    pub event_id: String,
    #[avro(with = crate::logical::ts_millis)]
    pub event_time: i64,
    pub stage: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    #[avro(with)]
    #[serde(default, with = "apache_avro::serde::bytes_opt")]
    pub key: Option<Vec<u8>>,
    #[avro(with)]
    #[serde(default, with = "apache_avro::serde::bytes_opt")]
    pub payload: Option<Vec<u8>>,
    pub reason: Reason,
    #[serde(default)]
    pub message_id: Option<String>,
    #[serde(default)]
    pub request_id: Option<String>,
}
event!(DeadLettered, "dead_lettered.avsc");

/// Every event schema: (full name, file text). Registered at start-up.
pub fn all_schemas() -> Vec<(&'static str, &'static str)> {
    vec![
        (SendRequested::FULL_NAME, SendRequested::schema_text()),
        (MessageAccepted::FULL_NAME, MessageAccepted::schema_text()),
        (MessageRendered::FULL_NAME, MessageRendered::schema_text()),
        (MessageRouted::FULL_NAME, MessageRouted::schema_text()),
        (
            DeliveryAttempted::FULL_NAME,
            DeliveryAttempted::schema_text(),
        ),
        (ReceiptReceived::FULL_NAME, ReceiptReceived::schema_text()),
        (
            MessageSuppressed::FULL_NAME,
            MessageSuppressed::schema_text(),
        ),
        (MessageCanceled::FULL_NAME, MessageCanceled::schema_text()),
        (MessageFailed::FULL_NAME, MessageFailed::schema_text()),
        (DelayScheduled::FULL_NAME, DelayScheduled::schema_text()),
        (DeadLettered::FULL_NAME, DeadLettered::schema_text()),
    ]
}
