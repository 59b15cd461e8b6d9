//! WeCom (PROVIDERS.md §4): the group robot webhook (`key` only) and the app message API with a
//! cached `access_token` refreshed on 40014 / 42001 without failing the message.
//!
//! Robot config: endpoint `https://qyapi.weixin.qq.com/cgi-bin/webhook/send`; credential `key`.
//! The recipient address is a user id or mobile to mention, `@all`, or `-`.
//! App config: endpoint `https://qyapi.weixin.qq.com` (base); credentials `corp_id`,
//! `corp_secret`; settings `agent_id`. The recipient address is the member's UserID.

use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_core::sign::pct;
use herald_schemas::{DeliveryOutcome, MessageRouted};
use serde_json::json;

use crate::http::{errcode, http_client, json_call, plain_text, provider_error};
use crate::settings::Needs;
use crate::token::{TokenCache, call_with_token, fetch_token};
use crate::{CallResult, Context, Kind, Provider, ProviderError};

pub const ROBOT: Kind = Kind {
    name: "wecom_robot",
    channel: herald_schemas::Channel::Wecom,
    check: |p| WecomRobot::new(p).map(drop),
    build: |p, _: &Context| Ok(Box::new(WecomRobot::new(p)?)),
    receipts: None,
    accepts: crate::any_address,
};

pub const APP: Kind = Kind {
    name: "wecom_app",
    channel: herald_schemas::Channel::Wecom,
    check: |p| WecomApp::new(p).map(drop),
    build: |p, _: &Context| Ok(Box::new(WecomApp::new(p)?)),
    receipts: None,
    accepts: crate::any_address,
};

/// The WeCom/WeChat `errcode` envelope, classified. Token errors are handled by the caller.
pub fn classify(v: &serde_json::Value) -> CallResult {
    match errcode(v) {
        Some((0, _)) => CallResult::ok(
            "0",
            v.get("msgid").map(|id| match id {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            }),
        ),
        Some((code, msg)) => {
            let outcome = match code {
                45009 | 45033 | 45011 => DeliveryOutcome::RateLimited,
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

pub struct WecomRobot {
    client: reqwest::Client,
    endpoint: String,
    key: String,
}

impl WecomRobot {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let mut n = Needs::new(p);
        let endpoint = n.endpoint();
        let key = n.credential("key");
        n.done()?;
        Ok(WecomRobot {
            client: http_client(p)?,
            endpoint,
            key,
        })
    }
}

impl Provider for WecomRobot {
    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let to = m.recipient.address.as_str();
            let body = match &m.content.markdown {
                Some(md) => json!({"msgtype": "markdown", "markdown": {"content": md}}),
                None => {
                    let (users, mobiles): (Vec<&str>, Vec<&str>) = match to {
                        "" | "-" => (vec![], vec![]),
                        "@all" => (vec!["@all"], vec![]),
                        a if a.chars().all(|c| c.is_ascii_digit() || c == '+') => (vec![], vec![a]),
                        a => (vec![a], vec![]),
                    };
                    json!({"msgtype": "text", "text": {
                        "content": plain_text(m),
                        "mentioned_list": users,
                        "mentioned_mobile_list": mobiles,
                    }})
                }
            };
            let url = format!("{}?key={}", self.endpoint, pct(&self.key));
            match json_call(self.client.post(url).json(&body)).await {
                Ok((_, v)) => classify(&v),
                Err(r) => r,
            }
        })
    }
}

pub struct WecomApp {
    client: reqwest::Client,
    base: String,
    corp_id: String,
    corp_secret: String,
    agent_id: i64,
    code: String,
    tokens: TokenCache,
}

impl WecomApp {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let mut n = Needs::new(p);
        let agent_id = n.parsed("agent_id", "an integer").unwrap_or_default();
        let base = n.endpoint();
        let corp_id = n.credential("corp_id");
        let corp_secret = n.credential("corp_secret");
        n.done()?;
        Ok(WecomApp {
            client: http_client(p)?,
            base,
            corp_id,
            corp_secret,
            agent_id,
            code: p.code.clone(),
            tokens: TokenCache::default(),
        })
    }

    async fn token(&self) -> Result<String, CallResult> {
        self.tokens
            .get(&self.code, || {
                fetch_token(self.client.get(format!(
                    "{}/cgi-bin/gettoken?corpid={}&corpsecret={}",
                    self.base,
                    pct(&self.corp_id),
                    pct(&self.corp_secret)
                )))
            })
            .await
    }
}

impl Provider for WecomApp {
    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let body = match &m.content.markdown {
                Some(md) => {
                    json!({"touser": m.recipient.address, "msgtype": "markdown", "agentid": self.agent_id, "markdown": {"content": md}})
                }
                None => {
                    json!({"touser": m.recipient.address, "msgtype": "text", "agentid": self.agent_id, "text": {"content": plain_text(m)}})
                }
            };
            let v = call_with_token(
                &self.tokens,
                || self.token(),
                |token| {
                    let url = format!(
                        "{}/cgi-bin/message/send?access_token={}",
                        self.base,
                        pct(&token)
                    );
                    let body = &body;
                    async move {
                        json_call(self.client.post(url).json(body))
                            .await
                            .map(|(_, v)| v)
                    }
                },
            )
            .await;
            v.map(|v| classify(&v)).unwrap_or_else(|r| r)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified() {
        let ok = classify(&json!({"errcode":0,"errmsg":"ok","msgid":"abc"}));
        assert_eq!(ok.outcome, DeliveryOutcome::Succeeded);
        assert_eq!(ok.provider_message_id.as_deref(), Some("abc"));
        assert_eq!(
            classify(&json!({"errcode":45009,"errmsg":"api freq out of limit"})).outcome,
            DeliveryOutcome::RateLimited
        );
        assert_eq!(
            classify(&json!({"errcode":81013,"errmsg":"user & party & tag all invalid"})).outcome,
            DeliveryOutcome::FailedPermanent
        );
        assert_eq!(
            classify(&json!({"errcode":93000,"errmsg":"invalid webhook url"}))
                .reason
                .unwrap()
                .code,
            "93000"
        );
    }
}
