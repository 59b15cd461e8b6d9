//! Feishu/Lark custom bot (PROVIDERS.md §5): the signature travels in the JSON body
//! (`timestamp` in seconds as a string, `sign`). Text, or an interactive card with a markdown
//! element when the template has markdown.
//!
//! Config: endpoint `https://open.feishu.cn/open-apis/bot/v2/hook/<uuid>`; optional credential
//! `secret` (signing).

use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_core::util::now_ms;
use herald_schemas::{DeliveryOutcome, MessageRouted};
use serde_json::json;

use crate::http::{http_client, json_call, plain_text, provider_error};
use crate::settings::Needs;
use crate::{CallResult, Context, Kind, Provider, ProviderError};

pub mod sign;

use sign::feishu_sign;

pub const KIND: Kind = Kind {
    name: "feishu_bot",
    channel: herald_schemas::Channel::Feishu,
    check: |p| FeishuBot::new(p).map(drop),
    build: |p, _: &Context| Ok(Box::new(FeishuBot::new(p)?)),
    receipts: None,
    accepts: crate::any_address,
};

pub struct FeishuBot {
    client: reqwest::Client,
    endpoint: String,
    secret: Option<String>,
}

impl FeishuBot {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let mut n = Needs::new(p);
        let endpoint = n.endpoint();
        n.done()?;
        Ok(FeishuBot {
            client: http_client(p)?,
            endpoint,
            secret: p
                .credentials
                .get("secret")
                .cloned()
                .filter(|s| !s.is_empty()),
        })
    }
}

/// Feishu answers `{"code":0,"msg":"success"}`; errors carry a `code` (sometimes with HTTP 400).
pub fn classify(v: &serde_json::Value) -> CallResult {
    let code = v
        .get("code")
        .or_else(|| v.get("StatusCode"))
        .and_then(|c| c.as_i64());
    let msg = v.get("msg").and_then(|m| m.as_str()).unwrap_or_default();
    match code {
        Some(0) => CallResult::ok("0", None),
        Some(code) => {
            let outcome = match code {
                11232 => DeliveryOutcome::RateLimited,
                9499 if msg.contains("too many request") => DeliveryOutcome::RateLimited,
                _ => DeliveryOutcome::FailedPermanent,
            };
            provider_error(outcome, &code.to_string(), msg)
        }
        None => provider_error(
            DeliveryOutcome::FailedTransient,
            "invalid_response",
            "no code in the answer",
        ),
    }
}

impl Provider for FeishuBot {
    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let mut body = match &m.content.markdown {
                Some(md) => json!({
                    "msg_type": "interactive",
                    "card": {
                        "header": {"title": {"tag": "plain_text", "content": m.content.subject.clone().unwrap_or_else(|| "Herald".into())}},
                        "elements": [{"tag": "markdown", "content": md}],
                    },
                }),
                None => json!({"msg_type": "text", "content": {"text": plain_text(m)}}),
            };
            if let Some(secret) = &self.secret {
                let ts = now_ms() / 1000;
                body["timestamp"] = json!(ts.to_string());
                body["sign"] = json!(feishu_sign(ts, secret));
            }
            match json_call(self.client.post(&self.endpoint).json(&body)).await {
                Ok((_, v)) => classify(&v),
                Err(r) => r,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified() {
        assert_eq!(
            classify(&json!({"code":0,"msg":"success","data":{}})).outcome,
            DeliveryOutcome::Succeeded
        );
        assert_eq!(
            classify(&json!({"code":19021,"msg":"sign match fail or timestamp is not within one hour from current time"})).outcome,
            DeliveryOutcome::FailedPermanent
        );
        assert_eq!(
            classify(&json!({"code":9499,"msg":"too many request"})).outcome,
            DeliveryOutcome::RateLimited
        );
        assert_eq!(
            classify(&json!({"code":11232,"msg":"frequency limited"})).outcome,
            DeliveryOutcome::RateLimited
        );
    }
}
