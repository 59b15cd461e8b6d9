//! What the HTTP providers share: one pooled client per provider, a JSON call classified at the
//! edge, answers read up to a cap, errors carrying the provider's own code.
//!
//! Every client connects directly: `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` (and the system's
//! proxy settings) are ignored. A proxy from the environment would receive the destination's
//! name and connect to it on Herald's behalf, so the outbound guard (which checks the addresses
//! Herald itself connects to) would only ever see the proxy; Herald has no proxy setting.

use std::time::Duration;

use herald_core::config::ProviderConfig;
use herald_schemas::{DeliveryOutcome, MessageRouted, Reason};

use crate::{CallResult, ProviderError};

/// One pooled HTTP client per provider, with the provider's timeout.
pub fn http_client(p: &ProviderConfig) -> Result<reqwest::Client, ProviderError> {
    http_client_builder(p)
        .build()
        .map_err(|e| ProviderError::one(p, e.to_string()))
}

/// The provider's client settings, before building: direct connections only (no proxy from
/// the environment), no redirects.
pub fn http_client_builder(p: &ProviderConfig) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(p.timeout_ms))
        .connect_timeout(Duration::from_millis(p.timeout_ms.min(3000)))
        .pool_max_idle_per_host(64)
        .redirect(reqwest::redirect::Policy::none())
}

/// A request that failed before an answer: refused connections never reached the provider
/// (transient); anything else (timeout, reset mid-answer) may have, so the outcome is unknown.
pub fn transport_failure(e: reqwest::Error) -> CallResult {
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
pub async fn json_call(
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
pub async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, CallResult> {
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
pub fn provider_error(outcome: DeliveryOutcome, code: &str, message: &str) -> CallResult {
    CallResult::fail(
        outcome,
        Some(code.to_owned()),
        Reason::new(code.to_owned(), message.to_owned()),
    )
}

/// The plain text of a rendered message for text-only channels.
pub fn plain_text(m: &MessageRouted) -> String {
    m.content
        .text
        .clone()
        .or_else(|| m.content.markdown.clone())
        .or_else(|| m.content.html.clone())
        .unwrap_or_default()
}

/// The `{"errcode":N,"errmsg":…}` envelope of DingTalk, WeCom and WeChat.
pub fn errcode(v: &serde_json::Value) -> Option<(i64, String)> {
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
pub fn provider_template(m: &MessageRouted) -> Option<String> {
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
