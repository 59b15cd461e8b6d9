//! Huawei Cloud SMS (华为云 消息&短信) `batchSendSms/v1` (PROVIDERS-MORE.md §4): a form body,
//! authenticated with WSSE UsernameToken (default) or AK/SK `SDK-HMAC-SHA256` (`auth = "aksk"`).
//! One number per call; `extend` carries Herald's message id and `smsMsgId` is the receipt key.
//! Status reports come back to the callback stage (form, or the JSON batch variant) and move
//! the message `sent` → `delivered` / `undelivered`.
//!
//! Config: credentials `app_key`, `app_secret`; settings `from` (the channel number, 通道号),
//! optional `signature` (签名名称, needed for a generic template on a channel with several
//! signatures), `status_callback` (URL for reports; else the app's configured one), `auth`
//! (`wsse` | `aksk`). Templates need `provider_template` (the `templateId`); `provider_params`
//! are positional (`1`, `2`, …) and become `templateParas`.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_core::sign::{iso8601_utc, pct};
use herald_core::util::now_ms;
use herald_schemas::{DeliveryOutcome, MessageRouted, Reason};

use crate::http::{http_client, json_call, provider_error};
use crate::settings::Needs;
use crate::tencent_sms::template_param_set;
use crate::{CallResult, Context, Kind, Provider, ProviderError};

pub mod receipt;
pub mod sign;

pub const KIND: Kind = Kind {
    name: "huawei_sms",
    channel: herald_schemas::Channel::Sms,
    check: |p| HuaweiSms::new(p).map(drop),
    build: |p, _: &Context| Ok(Box::new(HuaweiSms::new(p)?)),
    receipts: Some(crate::Receipts {
        parse: receipt::parse,
        ack: receipt::ack,
    }),
    accepts: crate::any_address,
};

pub const PATH: &str = "/sms/batchSendSms/v1";
const FORM: &str = "application/x-www-form-urlencoded";

pub struct HuaweiSms {
    client: reqwest::Client,
    endpoint: String,
    host: String,
    app_key: String,
    app_secret: String,
    from: String,
    signature: Option<String>,
    status_callback: Option<String>,
    aksk: bool,
}

impl HuaweiSms {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let mut n = Needs::new(p);
        let endpoint = n.endpoint();
        let host = n.signed_host(&endpoint);
        let app_key = n.credential("app_key");
        let app_secret = n.credential("app_secret");
        let from = n.setting("from");
        let optional = |k: &str| p.settings.get(k).filter(|v| !v.is_empty()).cloned();
        let aksk = match n.setting_or("auth", "wsse").as_str() {
            "wsse" => false,
            "aksk" => true,
            other => {
                n.problem(format!("auth {other:?} is not wsse or aksk"));
                false
            }
        };
        n.done()?;
        Ok(HuaweiSms {
            client: http_client(p)?,
            endpoint,
            host,
            app_key,
            app_secret,
            from,
            signature: optional("signature"),
            status_callback: optional("status_callback"),
            aksk,
        })
    }

    fn form(&self, m: &MessageRouted, template: &str) -> String {
        let paras = serde_json::to_string(&template_param_set(&m.content.provider_params))
            .unwrap_or_else(|_| "[]".into());
        let mut fields = vec![
            ("from", self.from.clone()),
            ("to", e164(&m.recipient.address)),
            ("templateId", template.to_owned()),
            ("templateParas", paras),
            ("extend", m.header.message_id.clone()),
        ];
        if let Some(url) = &self.status_callback {
            fields.push(("statusCallback", url.clone()));
        }
        if let Some(s) = &self.signature {
            fields.push(("signature", s.clone()));
        }
        fields
            .iter()
            .map(|(k, v)| format!("{k}={}", pct(v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    async fn call(&self, body: String) -> Result<(u16, serde_json::Value), CallResult> {
        let now = now_ms() / 1000;
        let req = self
            .client
            .post(format!("{}{PATH}", self.endpoint))
            .header("content-type", FORM);
        let req = if self.aksk {
            let date = sign::sdk_date(now);
            let headers: BTreeMap<String, String> = [
                ("content-type", FORM.to_owned()),
                ("host", self.host.clone()),
                ("x-sdk-date", date.clone()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            let auth = sign::AkSk {
                method: "POST",
                path: PATH,
                query: &[],
                headers: &headers,
                body: body.as_bytes(),
            }
            .authorization(&self.app_key, &self.app_secret);
            req.header("x-sdk-date", date).header("authorization", auth)
        } else {
            let nonce = uuid::Uuid::new_v4().simple().to_string();
            req.header("authorization", sign::WSSE_AUTHORIZATION)
                .header(
                    "x-wsse",
                    sign::x_wsse(&self.app_key, &self.app_secret, &nonce, &iso8601_utc(now)),
                )
        };
        json_call(req.body(body)).await
    }
}

/// `+{country}{number}`: a mainland number without a prefix gets `+86`.
pub fn e164(n: &str) -> String {
    let n = n.trim();
    if n.starts_with('+') {
        n.to_owned()
    } else if let Some(rest) = n.strip_prefix("00") {
        format!("+{rest}")
    } else if n.len() == 11 && n.starts_with('1') {
        format!("+86{n}")
    } else {
        format!("+{n}")
    }
}

/// The class of a Huawei code (PROVIDERS-MORE.md §4.5).
fn outcome_of(code: &str) -> DeliveryOutcome {
    match code {
        // A fresh header fixes a clock skew; a system error is retried once by the rules.
        "E000110" | "E000000" => DeliveryOutcome::FailedTransient,
        // Too many messages pending at the platform.
        "E200015" => DeliveryOutcome::RateLimited,
        _ => DeliveryOutcome::FailedPermanent,
    }
}

/// An answer, classified: `000000` with the number's `000000` is accepted (its `smsMsgId` is the
/// receipt key); a per-number status decides when there is one (`E000510`); else the top-level
/// code. A 5xx without a Huawei code is transient.
pub fn classify(status: u16, v: &serde_json::Value) -> CallResult {
    let code = v["code"].as_str().unwrap_or_default();
    let description = v["description"].as_str().unwrap_or_default();
    if let Some(first) = v["result"].as_array().and_then(|r| r.first()) {
        let number_status = first["status"].as_str().unwrap_or_default();
        if number_status == "000000" && (code == "000000" || code.is_empty()) {
            let id = first["smsMsgId"].as_str().filter(|s| !s.is_empty());
            return match id {
                Some(id) => CallResult::ok("000000", Some(id.to_owned())),
                // Accepted, but nothing to match its report with.
                None => provider_error(
                    DeliveryOutcome::Unknown,
                    "missing_sms_msg_id",
                    "accepted without an smsMsgId",
                ),
            };
        }
        if !number_status.is_empty() && number_status != "000000" {
            return provider_error(outcome_of(number_status), number_status, description);
        }
    }
    if code.is_empty() {
        let outcome = match status {
            429 => DeliveryOutcome::RateLimited,
            500.. => DeliveryOutcome::FailedTransient,
            _ => DeliveryOutcome::FailedPermanent,
        };
        return CallResult::fail(
            outcome,
            Some(status.to_string()),
            Reason::new("invalid_response", format!("HTTP {status} without a code")),
        );
    }
    if code == "000000" {
        return CallResult::fail(
            DeliveryOutcome::Unknown,
            Some(code.to_owned()),
            Reason::new("invalid_response", "success without a result entry"),
        );
    }
    provider_error(outcome_of(code), code, description)
}

impl Provider for HuaweiSms {
    fn has_receipts(&self) -> bool {
        true
    }

    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let Some(template) = crate::http::provider_template(m) else {
                return CallResult::fail(
                    DeliveryOutcome::FailedPermanent,
                    None,
                    Reason::new(
                        "missing_provider_template",
                        "Huawei SMS needs the template's provider_template (templateId)",
                    ),
                );
            };
            match self.call(self.form(m, &template)).await {
                Ok((status, v)) => classify(status, &v),
                Err(r) => r,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_are_classified() {
        // The official success example.
        let ok = classify(
            200,
            &json!({"result":[{"originTo":"+86155****5678","createTime":"2018-05-25T16:34:34Z","from":"1069********0012","smsMsgId":"d6e3cdd0-522b-4692-8304-a07553cdf591_8539659","status":"000000"}],"code":"000000","description":"Success"}),
        );
        assert_eq!(ok.outcome, DeliveryOutcome::Succeeded);
        assert_eq!(
            ok.provider_message_id.as_deref(),
            Some("d6e3cdd0-522b-4692-8304-a07553cdf591_8539659")
        );
        let per_number = |s: &str| {
            classify(
                200,
                &json!({"result":[{"status": s, "smsMsgId": ""}],"code":"E000510","description":"x"}),
            )
        };
        assert_eq!(per_number("E200015").outcome, DeliveryOutcome::RateLimited);
        let bad = per_number("E200028");
        assert_eq!(bad.outcome, DeliveryOutcome::FailedPermanent);
        assert_eq!(bad.reason.unwrap().code, "E200028");
        let top = |c: &str, status: u16| {
            classify(status, &json!({"code": c, "description": "d"})).outcome
        };
        assert_eq!(top("E000105", 401), DeliveryOutcome::FailedPermanent);
        assert_eq!(top("E000110", 401), DeliveryOutcome::FailedTransient);
        assert_eq!(top("E000040", 400), DeliveryOutcome::FailedPermanent);
        assert_eq!(
            classify(503, &json!({})).outcome,
            DeliveryOutcome::FailedTransient
        );
        assert_eq!(
            classify(200, &json!({"code": "000000"})).outcome,
            DeliveryOutcome::Unknown
        );
    }

    #[test]
    fn numbers_are_sent_in_international_form() {
        assert_eq!(e164("13800000000"), "+8613800000000");
        assert_eq!(e164("+8613800000000"), "+8613800000000");
        assert_eq!(e164("008613800000000"), "+8613800000000");
    }
}
