//! Generic outgoing webhook, signed per the Standard Webhooks spec.

use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_core::util::{standard_webhook_signature, webhook_key};
use herald_schemas::{DeliveryOutcome, MessageRouted, Reason};

use herald_core::netguard::Guard;

use crate::http::{http_client, http_client_builder, transport_failure};
use crate::{CallResult, Context, Kind, Provider, ProviderError};

pub const KIND: Kind = Kind {
    name: "webhook",
    channel: herald_schemas::Channel::Webhook,
    check: |p| Webhook::new(p, &Guard::new(&[])).map(drop),
    build: |p, cx: &Context| Ok(Box::new(Webhook::new(p, cx.guard)?)),
    receipts: None,
    accepts: crate::any_address,
};

/// Generic outgoing webhook, signed per the Standard Webhooks spec
/// (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`).
pub struct Webhook {
    client: reqwest::Client,
    endpoint: Option<String>,
    key: Vec<u8>,
    /// Recipient URLs are the caller's choice: checked before the call, and every connection
    /// of the client resolves through the guard.
    guard: Guard,
}

impl Webhook {
    pub fn new(p: &ProviderConfig, guard: &Guard) -> Result<Self, ProviderError> {
        let endpoint = (!p.endpoint.is_empty()).then(|| p.endpoint.clone());
        let client = match endpoint {
            // The operator's own endpoint: no guard.
            Some(_) => http_client(p)?,
            None => guard
                .client(http_client_builder(p))
                .build()
                .map_err(|e| ProviderError::one(p, e.to_string()))?,
        };
        let secret = p.credentials.get("secret").cloned().unwrap_or_default();
        Ok(Webhook {
            client,
            endpoint,
            key: webhook_key(&secret),
            guard: guard.clone(),
        })
    }
}

impl Provider for Webhook {
    fn send<'a>(&'a self, m: &'a MessageRouted, attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let url = match &self.endpoint {
                Some(e) => e.clone(),
                None => {
                    let url = m.recipient.address.trim().to_owned();
                    if let Err(e) = self.guard.check_url(&url) {
                        return CallResult::fail(
                            DeliveryOutcome::FailedPermanent,
                            None,
                            Reason::new("destination_not_allowed", e),
                        );
                    }
                    url
                }
            };
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
            // Stable across attempts (the spec's idempotency key): a receiver that got an attempt
            // whose answer was lost recognises the retry.
            let id = m.header.message_id.clone();
            let _ = attempt;
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
                Err(e) => transport_failure(e),
            }
        })
    }
}
