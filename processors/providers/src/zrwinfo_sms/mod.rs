//! 掌榕网 (Zrwinfo) SMS on `api.1cloudsp.com` (PROVIDERS-MORE.md §3): a form POST per message to
//! the documented single send `/api/v2/single_send` (`accesskey` and `secret` in the form: the
//! documented scheme has no signature), or, with `auth = "token"`, to `/api/v2/send` with the
//! 2.0 token (`token` = MD5 hex of secret + random + timestamp, no secret on the wire).
//! `content` is the template's variables joined by `##`, in the order of their keys (`1`, `2`, …).
//! `{"code":"0", "smUuid"}` is accepted; any other `code` is an error from the (secondary) code
//! table; a bare HTTP error is classed by its status (5xx transient), which is then the code;
//! a timeout is unknown.
//! Delivery reports are form pushes (`smUuid`, `mobile`, `deliverResult`, `batchId`) to the
//! callback stage, moving the message `sent` → `delivered` / `undelivered`.
//!
//! What the official pages leave open, and what Herald assumes (README, "Channels and
//! providers"): error answers come with HTTP 200 and a non-`"0"` code (as the reference client
//! reads them); the code table is a third-party copy; `9024` (number over its frequency) is
//! rate-limited, every other code permanent; the report's acknowledgement is
//! `{"code":"0","msg":"SUCCESS"}`; a report names the send by `smUuid` (single send) or
//! `batchId` (token send).
//!
//! Config: `endpoint` (`http://api.1cloudsp.com`); credentials `access_key`, `secret`,
//! `callback_token`; settings `sign` (the signature text `【…】` or its id), `auth`
//! (`plain` | `token`). Templates need `provider_template` (the `templateId`).

use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_core::sign::pct;
use herald_core::util::now_ms;
use herald_schemas::{DeliveryOutcome, MessageRouted, Reason};
use md5::{Digest, Md5};

use crate::http::{http_client, provider_error, read_capped, transport_failure};
use crate::settings::Needs;
use crate::tencent_sms::template_param_set;
use crate::{CallResult, Context, Kind, Provider, ProviderError};

pub mod receipt;

pub const KIND: Kind = Kind {
    name: "zrwinfo_sms",
    channel: herald_schemas::Channel::Sms,
    check: |p| ZrwinfoSms::new(p).map(drop),
    build: |p, _: &Context| Ok(Box::new(ZrwinfoSms::new(p)?)),
    receipts: Some(crate::Receipts {
        parse: receipt::parse,
        ack: receipt::ack,
    }),
    accepts: crate::any_address,
};

pub const SINGLE_SEND: &str = "/api/v2/single_send";
pub const SEND: &str = "/api/v2/send";
/// The documented separator of template variables in `content`.
pub const SEPARATOR: &str = "##";

pub struct ZrwinfoSms {
    client: reqwest::Client,
    endpoint: String,
    access_key: String,
    secret: String,
    sign: String,
    token_auth: bool,
}

/// The 2.0 scheme's token: lowercase hex MD5 of secret + random + timestamp (ms), as strings.
pub fn token(secret: &str, random: &str, timestamp_ms: i64) -> String {
    let mut h = Md5::new();
    h.update(secret.as_bytes());
    h.update(random.as_bytes());
    h.update(timestamp_ms.to_string().as_bytes());
    hex::encode(h.finalize())
}

/// The `content` field: the template's variables in key order, joined by `##`.
pub fn content(params: &std::collections::HashMap<String, String>) -> String {
    template_param_set(params).join(SEPARATOR)
}

impl ZrwinfoSms {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let mut n = Needs::new(p);
        let endpoint = n.endpoint();
        let access_key = n.credential("access_key");
        let secret = n.credential("secret");
        let sign = n.setting("sign");
        let token_auth = match n.setting_or("auth", "plain").as_str() {
            "plain" => false,
            "token" => true,
            other => {
                n.problem(format!("auth {other:?} is not plain or token"));
                false
            }
        };
        n.done()?;
        Ok(ZrwinfoSms {
            client: http_client(p)?,
            endpoint,
            access_key,
            secret,
            sign,
            token_auth,
        })
    }

    /// The form body and the path it goes to.
    fn form(&self, m: &MessageRouted, template: &str) -> (String, &'static str) {
        let mut fields = vec![
            ("accesskey", self.access_key.clone()),
            ("sign", self.sign.clone()),
            ("templateId", template.to_owned()),
            (
                "mobile",
                m.recipient
                    .address
                    .trim()
                    .trim_start_matches("+86")
                    .to_owned(),
            ),
            ("content", content(&m.content.provider_params)),
        ];
        let path = if self.token_auth {
            let random = uuid::Uuid::new_v4().simple().to_string();
            let timestamp = now_ms();
            fields.push(("timestamp", timestamp.to_string()));
            fields.push(("token", token(&self.secret, &random, timestamp)));
            fields.push(("random", random));
            SEND
        } else {
            fields.push(("secret", self.secret.clone()));
            SINGLE_SEND
        };
        let body = fields
            .iter()
            .map(|(k, v)| format!("{k}={}", pct(v)))
            .collect::<Vec<_>>()
            .join("&");
        (body, path)
    }
}

/// The class of a 掌榕网 code (the secondary table, PROVIDERS-MORE.md §3.5).
fn outcome_of(code: &str) -> DeliveryOutcome {
    match code {
        // The number is over its frequency limit.
        "9024" => DeliveryOutcome::RateLimited,
        _ => DeliveryOutcome::FailedPermanent,
    }
}

/// An answer, classified: `code` `"0"` with `smUuid` (single) or `batchId` (send) is accepted;
/// any other code is the provider's error; a 5xx without a code is transient.
pub fn classify(status: u16, v: &serde_json::Value) -> CallResult {
    let code = match &v["code"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    let msg = v["msg"].as_str().unwrap_or_default();
    // No code for system errors or overload is documented: a bare HTTP error (a gateway's
    // page) is classed by its status, which is then the code.
    if code.is_empty() || status != 200 {
        let outcome = match status {
            429 => DeliveryOutcome::RateLimited,
            500.. | 408 => DeliveryOutcome::FailedTransient,
            _ => DeliveryOutcome::FailedPermanent,
        };
        let code = if code.is_empty() {
            status.to_string()
        } else {
            code
        };
        return provider_error(outcome, &code, &format!("HTTP {status} {msg}"));
    }
    if code == "0" {
        let id = v["smUuid"]
            .as_str()
            .or_else(|| v["batchId"].as_str())
            .filter(|s| !s.is_empty());
        return match id {
            Some(id) => CallResult::ok("0", Some(id.to_owned())),
            // Accepted, with nothing to match its report with.
            None => provider_error(
                DeliveryOutcome::Unknown,
                "missing_sm_uuid",
                "accepted without an smUuid",
            ),
        };
    }
    provider_error(outcome_of(&code), &code, msg)
}

impl Provider for ZrwinfoSms {
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
                        "掌榕网 SMS needs the template's provider_template (templateId)",
                    ),
                );
            };
            let (body, path) = self.form(m, &template);
            let req = self
                .client
                .post(format!("{}{path}", self.endpoint))
                .header(
                    "content-type",
                    "application/x-www-form-urlencoded;charset=utf-8",
                )
                .body(body);
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => return transport_failure(e),
            };
            let status = resp.status().as_u16();
            match read_capped(resp).await {
                Ok(body) => match serde_json::from_slice(&body) {
                    Ok(v) => classify(status, &v),
                    Err(_) => classify(status, &serde_json::Value::Null),
                },
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
    fn the_token_matches_the_derived_fixture() {
        // [DERIVED] PROVIDERS-MORE.md §3.3.
        assert_eq!(
            token("testSecret", "23rfsdf332", 1_465_227_303_037),
            "4b71432919155ca9620aaaa7ad6262db"
        );
    }

    #[test]
    fn content_is_the_variables_in_order_joined_by_two_hashes() {
        // The official example: template `{1}您好,您的订单于{2}已通过{3}发货,运单号{4}`.
        let params = [
            ("1", "先生"),
            ("2", "9:40"),
            ("3", "快递公司"),
            ("4", "1234567"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(content(&params), "先生##9:40##快递公司##1234567");
    }

    #[test]
    fn answers_are_classified() {
        let ok = classify(
            200,
            &json!({"code": "0", "msg": "SUCCESS", "smUuid": "10000_1_0_13700000000_1_NKWkEcS_1"}),
        );
        assert_eq!(ok.outcome, DeliveryOutcome::Succeeded);
        assert_eq!(
            ok.provider_message_id.as_deref(),
            Some("10000_1_0_13700000000_1_NKWkEcS_1")
        );
        let batch = classify(200, &json!({"code": "0", "msg": "ok", "batchId": "b-1"}));
        assert_eq!(batch.provider_message_id.as_deref(), Some("b-1"));
        assert_eq!(
            classify(200, &json!({"code": "0"})).outcome,
            DeliveryOutcome::Unknown
        );
        let limited = classify(200, &json!({"code": "9024", "msg": "手机号码超频"}));
        assert_eq!(limited.outcome, DeliveryOutcome::RateLimited);
        let bad = classify(200, &json!({"code": "9017", "msg": "无效的模板ID"}));
        assert_eq!(
            (bad.outcome, bad.reason.unwrap().code.as_str()),
            (DeliveryOutcome::FailedPermanent, "9017")
        );
        assert_eq!(
            classify(200, &json!({"code": 9006, "msg": "x"}))
                .response_code
                .as_deref(),
            Some("9006")
        );
        let bare = classify(503, &serde_json::Value::Null);
        assert_eq!(
            (bare.outcome, bare.reason.unwrap().code.as_str()),
            (DeliveryOutcome::FailedTransient, "503")
        );
        assert_eq!(
            classify(200, &serde_json::Value::Null).outcome,
            DeliveryOutcome::FailedPermanent
        );
    }
}
