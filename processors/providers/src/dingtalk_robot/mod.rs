//! DingTalk custom robot (PROVIDERS.md §3): `POST …/robot/send?access_token=…&timestamp=…&sign=…`
//! with the HMAC-SHA256 signature when a signing secret is configured. Text, or markdown when the
//! template has markdown.
//!
//! Config: endpoint `https://oapi.dingtalk.com/robot/send`; credentials `access_token`, optional
//! `secret`. The recipient address names who to @: a mobile number, `@all`, or `-` for nobody.

use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_core::sign::pct;
use herald_core::util::now_ms;
use herald_schemas::{DeliveryOutcome, MessageRouted};
use serde_json::json;

use crate::http::{errcode, http_client, json_call, plain_text, provider_error};
use crate::settings::Needs;
use crate::{CallResult, Context, Kind, Provider, ProviderError};

pub mod sign;

use sign::dingtalk_sign;

pub const KIND: Kind = Kind {
    name: "dingtalk_robot",
    channel: herald_schemas::Channel::Dingtalk,
    check: |p| DingtalkRobot::new(p).map(drop),
    build: |p, _: &Context| Ok(Box::new(DingtalkRobot::new(p)?)),
    receipts: None,
    accepts: crate::any_address,
};

pub struct DingtalkRobot {
    client: reqwest::Client,
    endpoint: String,
    token: String,
    secret: Option<String>,
}

impl DingtalkRobot {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let mut n = Needs::new(p);
        let endpoint = n.endpoint();
        let token = n.credential("access_token");
        n.done()?;
        Ok(DingtalkRobot {
            client: http_client(p)?,
            endpoint,
            token,
            secret: p
                .credentials
                .get("secret")
                .cloned()
                .filter(|s| !s.is_empty()),
        })
    }
}

/// The `at` block for a recipient address.
pub fn mention(address: &str) -> serde_json::Value {
    match address {
        "@all" => json!({"isAtAll": true}),
        a if !a.is_empty() && a.chars().all(|c| c.is_ascii_digit() || c == '+') => {
            json!({"atMobiles": [a], "isAtAll": false})
        }
        _ => json!({"isAtAll": false}),
    }
}

/// DingTalk answers HTTP 200 with an `errcode` (PROVIDERS.md §3.4).
pub fn classify(v: &serde_json::Value) -> CallResult {
    match errcode(v) {
        Some((0, _)) => CallResult::ok("0", None),
        Some((code, msg)) => {
            let outcome = match code {
                130101 | 410100 => DeliveryOutcome::RateLimited,
                -1 => DeliveryOutcome::FailedTransient,
                _ => DeliveryOutcome::FailedPermanent,
            };
            provider_error(outcome, &code.to_string(), &msg)
        }
        None => provider_error(
            DeliveryOutcome::FailedTransient,
            "invalid_response",
            "no errcode in the answer",
        ),
    }
}

impl Provider for DingtalkRobot {
    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let at = mention(&m.recipient.address);
            let body = match &m.content.markdown {
                Some(md) => json!({
                    "msgtype": "markdown",
                    "markdown": {"title": m.content.subject.clone().unwrap_or_else(|| "Herald".into()), "text": md},
                    "at": at,
                }),
                None => json!({"msgtype": "text", "text": {"content": plain_text(m)}, "at": at}),
            };
            let mut url = format!("{}?access_token={}", self.endpoint, pct(&self.token));
            if let Some(secret) = &self.secret {
                let ts = now_ms();
                url.push_str(&format!(
                    "&timestamp={ts}&sign={}",
                    pct(&dingtalk_sign(ts, secret))
                ));
            }
            match json_call(self.client.post(url).json(&body)).await {
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
            classify(&json!({"errcode":0,"errmsg":"ok"})).outcome,
            DeliveryOutcome::Succeeded
        );
        let limited = classify(&json!({"errcode":130101,"errmsg":"send too fast"}));
        assert_eq!(limited.outcome, DeliveryOutcome::RateLimited);
        assert_eq!(limited.reason.unwrap().code, "130101");
        assert_eq!(
            classify(&json!({"errcode":310000,"errmsg":"sign not match"})).outcome,
            DeliveryOutcome::FailedPermanent
        );
        assert_eq!(
            classify(&json!({"errcode":-1,"errmsg":"busy"})).outcome,
            DeliveryOutcome::FailedTransient
        );
    }

    #[test]
    fn mentions() {
        assert_eq!(mention("@all")["isAtAll"], true);
        assert_eq!(mention("13800000000")["atMobiles"][0], "13800000000");
        assert_eq!(mention("-")["isAtAll"], false);
    }
}
