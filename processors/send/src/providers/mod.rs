//! Provider clients, one module per provider kind. Each classifies its answer once, at the edge:
//! success, permanent failure, transient failure, rate-limited, or unknown (the request may have
//! left and the answer was lost). Adding a provider is one module here plus its config.

pub mod aliyun;
pub mod dingtalk;
pub mod feishu;
pub mod inapp;
pub mod smtp;
pub mod tencent;
pub mod token;
pub mod webhook;
pub mod wechat;
pub mod wecom;

use std::time::Duration;

use futures::future::BoxFuture;
use herald_core::config::{ProviderConfig, ProviderKind};
use herald_schemas::{DeliveryOutcome, MessageRouted, Reason};

pub use herald_domain::failure::CallResult;

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
    /// Most messages one provider call can carry (1: no batching).
    fn batch_max(&self) -> usize {
        1
    }
    /// Sends several messages in one call where the provider allows it; one result per message,
    /// in order. Only called with up to [`Provider::batch_max`] messages.
    fn send_batch<'a>(
        &'a self,
        msgs: &'a [(&'a MessageRouted, i32)],
    ) -> BoxFuture<'a, Vec<CallResult>> {
        Box::pin(futures::future::join_all(
            msgs.iter().map(|(m, a)| self.send(m, *a)),
        ))
    }
}

/// Puts grouped calls' results back in message order: each group is the indexes of the messages
/// one call carried and that call's results. A message no result came back for (a provider
/// answering for fewer numbers than it was sent) gets a transient internal error.
pub fn in_message_order<I: AsRef<[usize]>>(
    n: usize,
    groups: impl IntoIterator<Item = (I, Vec<CallResult>)>,
) -> Vec<CallResult> {
    let mut out: Vec<Option<CallResult>> = vec![None; n];
    for (idx, results) in groups {
        for (i, r) in idx.as_ref().iter().zip(results) {
            if let Some(slot) = out.get_mut(*i) {
                *slot = Some(r);
            }
        }
    }
    out.into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                provider_error(DeliveryOutcome::FailedTransient, "internal", "no result")
            })
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("provider {0}: {1}")]
    Config(String, String),
}

/// Builds the client for a configured provider.
/// `guard` applies where the destination comes from the message (webhook recipients).
pub fn build(
    p: &ProviderConfig,
    postgres_url: &str,
    guard: &herald_core::netguard::Guard,
) -> Result<Box<dyn Provider>, ProviderError> {
    Ok(match p.kind {
        ProviderKind::Smtp => Box::new(smtp::Smtp::new(p)?),
        ProviderKind::Webhook => Box::new(webhook::Webhook::new(p, guard)?),
        ProviderKind::AliyunSms => Box::new(aliyun::AliyunSms::new(p)?),
        ProviderKind::TencentSms => Box::new(tencent::TencentSms::new(p)?),
        ProviderKind::DingtalkRobot => Box::new(dingtalk::DingtalkRobot::new(p)?),
        ProviderKind::FeishuBot => Box::new(feishu::FeishuBot::new(p)?),
        ProviderKind::WecomRobot => Box::new(wecom::WecomRobot::new(p)?),
        ProviderKind::WecomApp => Box::new(wecom::WecomApp::new(p)?),
        ProviderKind::WechatOa => Box::new(wechat::WechatOa::new(p)?),
        ProviderKind::Inapp => Box::new(inapp::Inapp::new(p)?.with_postgres(postgres_url)),
    })
}

// --- shared by the HTTP providers ------------------------------------------------------------

/// One pooled HTTP client per provider, with the provider's timeout.
pub(crate) fn http_client(p: &ProviderConfig) -> Result<reqwest::Client, ProviderError> {
    http_client_builder(p)
        .build()
        .map_err(|e| ProviderError::Config(p.code.clone(), e.to_string()))
}

/// The provider's client settings, before building.
pub(crate) fn http_client_builder(p: &ProviderConfig) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(Duration::from_millis(p.timeout_ms))
        .connect_timeout(Duration::from_millis(p.timeout_ms.min(3000)))
        .pool_max_idle_per_host(64)
        .redirect(reqwest::redirect::Policy::none())
}

/// A credential the provider cannot work without.
pub(crate) fn credential(p: &ProviderConfig, name: &str) -> Result<String, ProviderError> {
    p.credentials
        .get(name)
        .filter(|v| !v.is_empty())
        .cloned()
        .ok_or_else(|| {
            ProviderError::Config(
                p.code.clone(),
                format!("credential {name} is required (credentials_env.{name})"),
            )
        })
}

pub(crate) fn setting(p: &ProviderConfig, name: &str) -> Result<String, ProviderError> {
    p.settings
        .get(name)
        .filter(|v| !v.is_empty())
        .cloned()
        .ok_or_else(|| {
            ProviderError::Config(p.code.clone(), format!("settings.{name} is required"))
        })
}

pub(crate) fn endpoint(p: &ProviderConfig) -> Result<String, ProviderError> {
    if p.endpoint.is_empty() {
        return Err(ProviderError::Config(
            p.code.clone(),
            "endpoint is required".into(),
        ));
    }
    Ok(p.endpoint.trim_end_matches('/').to_owned())
}

/// `host[:port]` of a provider endpoint URL, as the HTTP client sends it in `Host` (signed by
/// Aliyun ACS3 and Tencent TC3).
pub(crate) fn signed_host(p: &ProviderConfig, endpoint: &str) -> Result<String, ProviderError> {
    let url = reqwest::Url::parse(endpoint)
        .map_err(|e| ProviderError::Config(p.code.clone(), format!("endpoint: {e}")))?;
    match (url.host_str(), url.port()) {
        (Some(h), Some(port)) => Ok(format!("{h}:{port}")),
        (Some(h), None) => Ok(h.to_owned()),
        _ => Err(ProviderError::Config(
            p.code.clone(),
            "endpoint has no host".into(),
        )),
    }
}

/// A request that failed before an answer: refused connections never reached the provider
/// (transient); anything else (timeout, reset mid-answer) may have, so the outcome is unknown.
pub(crate) fn transport_failure(e: reqwest::Error) -> CallResult {
    // The URL carries signed queries and tokens: never in a reason.
    let e = e.without_url();
    if e.is_connect() {
        CallResult::fail(
            DeliveryOutcome::FailedTransient,
            None,
            Reason::new("connect_failed", e.to_string()),
        )
    } else {
        CallResult::fail(
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
        )
    }
}

/// Sends a request and reads a JSON answer: `(HTTP status, body)`. A body that is not JSON is
/// classified by status (5xx transient, else permanent); a lost answer is unknown.
pub(crate) async fn json_call(
    req: reqwest::RequestBuilder,
) -> Result<(u16, serde_json::Value), CallResult> {
    let resp = req.send().await.map_err(transport_failure)?;
    let status = resp.status().as_u16();
    let bytes = read_capped(resp).await?;
    match serde_json::from_slice(&bytes) {
        Ok(v) => Ok((status, v)),
        Err(_) => {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
            let outcome = match status {
                429 => DeliveryOutcome::RateLimited,
                500.. | 408 => DeliveryOutcome::FailedTransient,
                _ => DeliveryOutcome::FailedPermanent,
            };
            Err(CallResult::fail(
                outcome,
                Some(status.to_string()),
                Reason::new("http_error", format!("HTTP {status}: {text}")),
            ))
        }
    }
}

/// Largest provider answer read, bytes: a provider (or whatever answers in its place) cannot
/// make the send stage buffer without bound.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Reads an answer's body up to [`MAX_RESPONSE_BYTES`]; a longer one is a transient error (the
/// provider answered, so the call is not unknown — but the answer is unusable).
pub(crate) async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, CallResult> {
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(transport_failure)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(CallResult::fail(
                DeliveryOutcome::FailedTransient,
                Some(status.to_string()),
                Reason::new(
                    "response_too_large",
                    format!("answer longer than {MAX_RESPONSE_BYTES} bytes"),
                ),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A failure with the provider's own code as both response code and reason code, so rules can
/// match on it.
pub(crate) fn provider_error(outcome: DeliveryOutcome, code: &str, message: &str) -> CallResult {
    CallResult::fail(
        outcome,
        Some(code.to_owned()),
        Reason::new(code.to_owned(), message.to_owned()),
    )
}

/// The plain text of a rendered message for text-only channels.
pub(crate) fn plain_text(m: &MessageRouted) -> String {
    m.content
        .text
        .clone()
        .or_else(|| m.content.markdown.clone())
        .or_else(|| m.content.html.clone())
        .unwrap_or_default()
}

/// The `{"errcode":N,"errmsg":…}` envelope of DingTalk, WeCom and WeChat.
pub(crate) fn errcode(v: &serde_json::Value) -> Option<(i64, String)> {
    let code = v.get("errcode")?.as_i64()?;
    let msg = v
        .get("errmsg")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_owned();
    Some((code, msg))
}

/// The provider-side template code for this message's provider: the per-provider code when the
/// template names one, else the shared one.
pub(crate) fn provider_template(m: &MessageRouted) -> Option<String> {
    m.content
        .provider_templates
        .get(&m.provider)
        .or(m.content.provider_template.as_ref())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A loopback server answering every request with a body of `len` bytes.
    async fn answering(len: usize) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
                );
                let _ = s.write_all(head.as_bytes()).await;
                let chunk = vec![b' '; 64 * 1024];
                let mut left = len;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if s.write_all(&chunk[..n]).await.is_err() {
                        break;
                    }
                    left -= n;
                }
            }
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn a_provider_answer_is_read_up_to_its_cap() {
        let client = reqwest::Client::new();
        let small = answering(1000).await;
        let body = read_capped(client.get(&small).send().await.unwrap())
            .await
            .unwrap();
        assert_eq!(body.len(), 1000);
        let huge = answering(MAX_RESPONSE_BYTES + 1).await;
        let err = read_capped(client.get(&huge).send().await.unwrap())
            .await
            .unwrap_err();
        assert_eq!(err.outcome, DeliveryOutcome::FailedTransient);
        assert_eq!(
            err.reason.map(|r| r.code).as_deref(),
            Some("response_too_large")
        );
    }
}
