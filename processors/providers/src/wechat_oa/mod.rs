//! WeChat Official Account template message (PROVIDERS.md §6). The token comes from
//! `/cgi-bin/stable_token` (the same token while valid, so several processes do not clobber
//! each other), cached and refreshed on 40001 / 40014 / 42001 without failing the message.
//! `client_msg_id` = Herald's message id: WeChat sends one message per openid + id within 10
//! minutes, so a resend after an unknown outcome cannot double-deliver.
//!
//! Config: endpoint `https://api.weixin.qq.com` (base); credentials `app_id`, `app_secret`.
//! Templates need `provider_template` (the `template_id`) and `provider_params` (the `data`
//! keys); a `url` param (if any) becomes the click-through URL. The recipient is the openid.

use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_core::sign::pct;
use herald_schemas::{DeliveryOutcome, MessageRouted, Reason};
use serde_json::json;

use crate::http::{http_client, json_call};
use crate::settings::Needs;
use crate::token::{TokenCache, call_with_token, fetch_token};
use crate::wecom::classify;
use crate::{CallResult, Context, Kind, Provider, ProviderError};

pub mod sign;

pub const KIND: Kind = Kind {
    name: "wechat_oa",
    channel: herald_schemas::Channel::Wechat,
    check: |p| WechatOa::new(p).map(drop),
    build: |p, _: &Context| Ok(Box::new(WechatOa::new(p)?)),
    receipts: None,
    accepts: crate::any_address,
};

pub struct WechatOa {
    client: reqwest::Client,
    base: String,
    app_id: String,
    app_secret: String,
    code: String,
    tokens: TokenCache,
}

impl WechatOa {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let mut n = Needs::new(p);
        let base = n.endpoint();
        let app_id = n.credential("app_id");
        let app_secret = n.credential("app_secret");
        n.done()?;
        Ok(WechatOa {
            client: http_client(p)?,
            base,
            app_id,
            app_secret,
            code: p.code.clone(),
            tokens: TokenCache::default(),
        })
    }

    async fn token(&self) -> Result<String, CallResult> {
        self.tokens
            .get(&self.code, || {
                fetch_token(
                    self.client
                        .post(format!("{}/cgi-bin/stable_token", self.base))
                        .json(&json!({
                            "grant_type": "client_credential",
                            "appid": self.app_id,
                            "secret": self.app_secret,
                            "force_refresh": false,
                        })),
                )
            })
            .await
    }
}

impl Provider for WechatOa {
    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let Some(template) = crate::http::provider_template(m) else {
                return CallResult::fail(
                    DeliveryOutcome::FailedPermanent,
                    None,
                    Reason::new(
                        "missing_provider_template",
                        "WeChat template messages need provider_template (template_id)",
                    ),
                );
            };
            let mut data = serde_json::Map::new();
            for (k, v) in m
                .content
                .provider_params
                .iter()
                .filter(|(k, _)| k.as_str() != "url")
            {
                data.insert(k.clone(), json!({"value": v}));
            }
            let mut body = json!({
                "touser": m.recipient.address,
                "template_id": template,
                "client_msg_id": m.header.message_id,
                "data": data,
            });
            if let Some(url) = m.content.provider_params.get("url") {
                body["url"] = json!(url);
            }
            let v = call_with_token(
                &self.tokens,
                || self.token(),
                |token| {
                    let url = format!(
                        "{}/cgi-bin/message/template/send?access_token={}",
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
