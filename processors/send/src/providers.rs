//! Provider clients. Each classifies its answer once, at the edge: success, permanent,
//! transient, rate-limited, or unknown (the request may have left and we cannot know).

use std::time::Duration;

use futures::future::BoxFuture;
use herald_core::config::{ProviderConfig, ProviderKind, SmtpTls};
use herald_core::util::{standard_webhook_signature, webhook_key};
use herald_schemas::{DeliveryOutcome, MessageRouted, Reason};
use lettre::message::{Mailbox, MultiPart, SinglePart, header};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

/// The classified answer of one provider call.
#[derive(Debug, Clone, PartialEq)]
pub struct CallResult {
    pub outcome: DeliveryOutcome,
    pub response_code: Option<String>,
    pub provider_message_id: Option<String>,
    pub reason: Option<Reason>,
}

impl CallResult {
    pub fn ok(code: impl Into<String>, provider_message_id: Option<String>) -> Self {
        CallResult {
            outcome: DeliveryOutcome::Succeeded,
            response_code: Some(code.into()),
            provider_message_id,
            reason: None,
        }
    }

    pub fn fail(outcome: DeliveryOutcome, code: Option<String>, reason: Reason) -> Self {
        CallResult {
            outcome,
            response_code: code,
            provider_message_id: None,
            reason: Some(reason),
        }
    }
}

pub trait Provider: Send + Sync {
    /// Whether the channel confirms delivery later by receipt (then success means `sent`).
    fn has_receipts(&self) -> bool {
        false
    }
    /// How many calls can really be in progress at once (e.g. the SMTP connection pool): the
    /// send stage never marks more attempts as started than this.
    fn max_in_flight(&self) -> usize {
        256
    }
    fn send<'a>(&'a self, m: &'a MessageRouted, attempt: i32) -> BoxFuture<'a, CallResult>;
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("provider {0}: {1}")]
    Config(String, String),
}

/// Builds the client for a configured provider.
pub fn build(p: &ProviderConfig) -> Result<Box<dyn Provider>, ProviderError> {
    match p.kind {
        ProviderKind::Smtp => Ok(Box::new(Smtp::new(p)?)),
        ProviderKind::Webhook => Ok(Box::new(Webhook::new(p)?)),
        other => Err(ProviderError::Config(
            p.code.clone(),
            format!(
                "provider kind {} is not available in this build",
                other.as_str()
            ),
        )),
    }
}

// ---------------------------------------------------------------------------------------------

/// Pooled SMTP connections per provider.
const SMTP_POOL: u32 = 16;

pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Smtp {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let err = |m: String| ProviderError::Config(p.code.clone(), m);
        let (host, port) = p
            .endpoint
            .rsplit_once(':')
            .and_then(|(h, port)| Some((h.to_owned(), port.parse::<u16>().ok()?)))
            .ok_or_else(|| err(format!("endpoint {:?} is not host:port", p.endpoint)))?;
        let mut b = match p.tls {
            SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&host),
            SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&host)
                .map_err(|e| err(e.to_string()))?,
            SmtpTls::Implicit => AsyncSmtpTransport::<Tokio1Executor>::relay(&host)
                .map_err(|e| err(e.to_string()))?,
        }
        .port(port)
        .timeout(Some(Duration::from_millis(p.timeout_ms)))
        .pool_config(PoolConfig::new().max_size(SMTP_POOL));
        if let (Some(u), Some(pw)) = (p.credentials.get("username"), p.credentials.get("password"))
        {
            b = b.credentials(Credentials::new(u.clone(), pw.clone()));
        }
        let from = p
            .from
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|e| err(format!("from: {e}")))?;
        Ok(Smtp {
            transport: b.build(),
            from,
        })
    }

    fn message(&self, m: &MessageRouted) -> Result<lettre::Message, Reason> {
        let to: Mailbox = m
            .recipient
            .address
            .parse()
            .map_err(|e| Reason::new("invalid_recipient", format!("{e}")))?;
        let b = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .message_id(Some(format!("<{}@herald>", m.header.message_id)))
            .subject(m.content.subject.clone().unwrap_or_default());
        let text = m
            .content
            .text
            .clone()
            .or_else(|| m.content.markdown.clone());
        let built = match (text, m.content.html.clone()) {
            (Some(t), Some(h)) => b.multipart(MultiPart::alternative_plain_html(t, h)),
            (None, Some(h)) => b.singlepart(
                SinglePart::builder()
                    .header(header::ContentType::TEXT_HTML)
                    .body(h),
            ),
            (Some(t), None) => b.singlepart(SinglePart::plain(t)),
            (None, None) => b.singlepart(SinglePart::plain(String::new())),
        };
        built.map_err(|e| Reason::new("invalid_message", e.to_string()))
    }
}

impl Provider for Smtp {
    fn max_in_flight(&self) -> usize {
        SMTP_POOL as usize
    }

    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let msg = match self.message(m) {
                Ok(msg) => msg,
                Err(reason) => {
                    return CallResult::fail(DeliveryOutcome::FailedPermanent, None, reason);
                }
            };
            match self.transport.send(msg).await {
                Ok(resp) => CallResult::ok(
                    resp.code().to_string(),
                    resp.message().next().map(str::to_owned),
                ),
                Err(e) => {
                    let code = e.status().map(|c| c.to_string());
                    let reason = Reason::new(
                        if e.is_permanent() {
                            "smtp_rejected"
                        } else if e.is_timeout() {
                            "smtp_timeout"
                        } else {
                            "smtp_unavailable"
                        },
                        e.to_string(),
                    );
                    let outcome = if e.is_permanent() {
                        DeliveryOutcome::FailedPermanent
                    } else if e.is_timeout() {
                        // The message may have been accepted before the answer was lost.
                        DeliveryOutcome::Unknown
                    } else {
                        DeliveryOutcome::FailedTransient
                    };
                    CallResult::fail(outcome, code, reason)
                }
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// Generic outgoing webhook, signed per the Standard Webhooks spec
/// (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`).
pub struct Webhook {
    client: reqwest::Client,
    endpoint: Option<String>,
    key: Vec<u8>,
}

impl Webhook {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(p.timeout_ms))
            .connect_timeout(Duration::from_millis(p.timeout_ms.min(3000)))
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| ProviderError::Config(p.code.clone(), e.to_string()))?;
        let secret = p.credentials.get("secret").cloned().unwrap_or_default();
        Ok(Webhook {
            client,
            endpoint: (!p.endpoint.is_empty()).then(|| p.endpoint.clone()),
            key: webhook_key(&secret),
        })
    }
}

impl Provider for Webhook {
    fn send<'a>(&'a self, m: &'a MessageRouted, attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let url = self
                .endpoint
                .clone()
                .unwrap_or_else(|| m.recipient.address.clone());
            let body = serde_json::json!({
                "type": "message.send",
                "message_id": m.header.message_id,
                "request_id": m.header.request_id,
                "app_id": m.header.app_id,
                "recipient": m.recipient.address,
                "subject": m.content.subject,
                "text": m.content.text,
                "html": m.content.html,
                "markdown": m.content.markdown,
                "metadata": m.header.metadata,
            })
            .to_string();
            // The same message attempt always carries the same webhook-id: receivers dedupe on it.
            let id = format!("{}-{attempt}", m.header.message_id);
            let ts = herald_core::util::now_ms() / 1000;
            let sig = standard_webhook_signature(&self.key, &id, ts, body.as_bytes());
            let resp = self
                .client
                .post(&url)
                .header("content-type", "application/json")
                .header("webhook-id", &id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", sig)
                .body(body)
                .send()
                .await;
            match resp {
                Ok(r) => {
                    let status = r.status();
                    let code = Some(status.as_u16().to_string());
                    if status.is_success() {
                        CallResult::ok(status.as_u16().to_string(), None)
                    } else if status.as_u16() == 429 {
                        CallResult::fail(
                            DeliveryOutcome::RateLimited,
                            code,
                            Reason::new("rate_limited", "HTTP 429"),
                        )
                    } else if status.is_server_error() || status.as_u16() == 408 {
                        CallResult::fail(
                            DeliveryOutcome::FailedTransient,
                            code,
                            Reason::new("http_error", format!("HTTP {status}")),
                        )
                    } else {
                        CallResult::fail(
                            DeliveryOutcome::FailedPermanent,
                            code,
                            Reason::new("http_rejected", format!("HTTP {status}")),
                        )
                    }
                }
                Err(e) if e.is_connect() => CallResult::fail(
                    DeliveryOutcome::FailedTransient,
                    None,
                    Reason::new("connect_failed", e.to_string()),
                ),
                Err(e) => CallResult::fail(
                    DeliveryOutcome::Unknown,
                    None,
                    Reason::new(
                        if e.is_timeout() {
                            "timeout"
                        } else {
                            "transport_error"
                        },
                        e.to_string(),
                    ),
                ),
            }
        })
    }
}
