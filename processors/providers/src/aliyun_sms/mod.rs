//! Aliyun dysmsapi `SendSms` (PROVIDERS.md §1): RPC V2 HMAC-SHA1 signature in a form body by
//! default, or ACS3-HMAC-SHA256 in the `Authorization` header (`settings.signature = "acs3"`).
//! `OutId` carries Herald's message id, so receipts (SmsReport) find their message.
//!
//! Config: credentials `access_key_id`, `access_key_secret`; settings `sign_name`, optional
//! `region` (default `cn-hangzhou`), `signature`. Templates need `provider_template` (the
//! `TemplateCode`) and `provider_params` (the `TemplateParam` object).

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_core::sign::{iso8601_utc, pct, sha256_hex};
use herald_core::util::{now_ms, random_id};
use herald_schemas::{DeliveryOutcome, MessageRouted, Reason};

use crate::http::{http_client, json_call, provider_error};
use crate::settings::Needs;
use crate::{CallResult, Context, Kind, Provider, ProviderError};

pub mod receipt;
pub mod sign;

use sign::{acs3_canonical_query, acs3_sign, aliyun_canonical_query, aliyun_rpc_signature};

pub const KIND: Kind = Kind {
    name: "aliyun_sms",
    channel: herald_schemas::Channel::Sms,
    check: |p| AliyunSms::new(p).map(drop),
    build: |p, _: &Context| Ok(Box::new(AliyunSms::new(p)?)),
    receipts: Some(crate::Receipts {
        parse: receipt::parse,
        ack: receipt::ack,
    }),
    accepts: crate::any_address,
};

pub const VERSION: &str = "2017-05-25";

pub struct AliyunSms {
    client: reqwest::Client,
    endpoint: String,
    host: String,
    key_id: String,
    secret: String,
    sign_name: String,
    region: String,
    acs3: bool,
    batch_max: usize,
}

impl AliyunSms {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let mut n = Needs::new(p);
        let endpoint = n.endpoint();
        let host = n.signed_host(&endpoint);
        let acs3 = match p.settings.get("signature").map(String::as_str) {
            None | Some("v2") => false,
            Some("acs3") => true,
            Some(other) => {
                n.problem(format!("settings.signature {other:?}: want v2 or acs3"));
                false
            }
        };
        let key_id = n.credential("access_key_id");
        let secret = n.credential("access_key_secret");
        let sign_name = n.setting("sign_name");
        let region = n.setting_or("region", "cn-hangzhou");
        n.done()?;
        Ok(AliyunSms {
            client: http_client(p)?,
            endpoint,
            host,
            key_id,
            secret,
            sign_name,
            region,
            acs3,
            // SendBatchSms takes at most 100 numbers.
            batch_max: p.batch_max.unwrap_or(1).clamp(1, 100),
        })
    }

    /// The `SendSms` business parameters of a message.
    fn business_params(&self, m: &MessageRouted) -> Result<BTreeMap<String, String>, CallResult> {
        let Some(template) = crate::http::provider_template(m) else {
            return Err(CallResult::fail(
                DeliveryOutcome::FailedPermanent,
                None,
                Reason::new(
                    "missing_provider_template",
                    "Aliyun SMS needs the template's provider_template (TemplateCode)",
                ),
            ));
        };
        let params: BTreeMap<&String, &String> = m.content.provider_params.iter().collect();
        let mut p = BTreeMap::new();
        p.insert("PhoneNumbers".into(), m.recipient.address.clone());
        p.insert("SignName".into(), self.sign_name.clone());
        p.insert("TemplateCode".into(), template);
        p.insert(
            "TemplateParam".into(),
            serde_json::to_string(&params).unwrap_or_default(),
        );
        p.insert("OutId".into(), m.header.message_id.clone());
        Ok(p)
    }

    fn request_v2(
        &self,
        action: &str,
        mut params: BTreeMap<String, String>,
    ) -> reqwest::RequestBuilder {
        let common = [
            ("AccessKeyId", self.key_id.clone()),
            ("Action", action.into()),
            ("Format", "JSON".into()),
            ("RegionId", self.region.clone()),
            ("SignatureMethod", "HMAC-SHA1".into()),
            ("SignatureNonce", random_id()),
            ("SignatureVersion", "1.0".into()),
            ("Timestamp", iso8601_utc(now_ms() / 1000)),
            ("Version", VERSION.into()),
        ];
        for (k, v) in common {
            params.insert(k.into(), v);
        }
        let sig = aliyun_rpc_signature("POST", &params, &self.secret);
        let body = format!(
            "{}&Signature={}",
            aliyun_canonical_query(&params),
            pct(&sig)
        );
        self.client
            .post(format!("{}/", self.endpoint))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
    }

    fn request_acs3(
        &self,
        action: &str,
        params: BTreeMap<String, String>,
    ) -> reqwest::RequestBuilder {
        let query = acs3_canonical_query(&params);
        let mut headers = BTreeMap::new();
        headers.insert("host".to_owned(), self.host.clone());
        headers.insert("x-acs-action".to_owned(), action.to_owned());
        headers.insert("x-acs-version".to_owned(), VERSION.to_owned());
        headers.insert("x-acs-date".to_owned(), iso8601_utc(now_ms() / 1000));
        headers.insert("x-acs-signature-nonce".to_owned(), random_id());
        headers.insert("x-acs-content-sha256".to_owned(), sha256_hex(b""));
        let s = acs3_sign("POST", &query, &headers, b"", &self.secret);
        let mut req = self.client.post(format!("{}/?{query}", self.endpoint));
        for (k, v) in headers.iter().filter(|(k, _)| k.as_str() != "host") {
            req = req.header(k, v);
        }
        req.header(
            "authorization",
            format!(
                "ACS3-HMAC-SHA256 Credential={},SignedHeaders={},Signature={}",
                self.key_id, s.signed_headers, s.signature
            ),
        )
    }
}

/// Aliyun's answer, classified (PROVIDERS.md §1.5): business errors come with HTTP 200,
/// gateway errors with 4xx.
pub fn classify(status: u16, v: &serde_json::Value) -> CallResult {
    let code = v.get("Code").and_then(|c| c.as_str()).unwrap_or_default();
    let msg = v
        .get("Message")
        .and_then(|c| c.as_str())
        .unwrap_or_default();
    if status == 200 && code == "OK" {
        let biz = v.get("BizId").and_then(|b| b.as_str()).map(str::to_owned);
        return CallResult::ok("OK", biz);
    }
    let outcome = match code {
        "isv.BUSINESS_LIMIT_CONTROL" => DeliveryOutcome::RateLimited,
        c if c.starts_with("Throttling") => DeliveryOutcome::RateLimited,
        "isp.SYSTEM_ERROR" | "ServiceUnavailable" | "InternalError" => {
            DeliveryOutcome::FailedTransient
        }
        // A clock or nonce problem is fixed by signing again.
        "InvalidTimeStamp.Expired" | "SignatureNonceUsed" => DeliveryOutcome::FailedTransient,
        "" if status >= 500 => DeliveryOutcome::FailedTransient,
        _ => DeliveryOutcome::FailedPermanent,
    };
    let code = if code.is_empty() {
        format!("HTTP_{status}")
    } else {
        code.to_owned()
    };
    provider_error(outcome, &code, msg)
}

/// The receipt key of one number of a send: SmsReport carries `biz_id` and `phone_number`.
pub fn receipt_key(biz_id: &str, phone: &str) -> String {
    format!("{biz_id}/{phone}")
}

impl AliyunSms {
    async fn call(&self, action: &str, params: BTreeMap<String, String>) -> CallResult {
        let req = if self.acs3 {
            self.request_acs3(action, params)
        } else {
            self.request_v2(action, params)
        };
        match json_call(req).await {
            Ok((status, v)) => classify(status, &v),
            Err(r) => r,
        }
    }

    /// One `SendBatchSms` for messages sharing a template code (at most 100).
    async fn batch_call(&self, msgs: &[&MessageRouted]) -> Vec<CallResult> {
        let mut numbers = Vec::new();
        let mut params = Vec::new();
        let mut template = None;
        for m in msgs {
            match self.business_params(m) {
                Ok(p) => {
                    template = p.get("TemplateCode").cloned();
                    numbers.push(m.recipient.address.clone());
                    params.push(
                        serde_json::from_str::<serde_json::Value>(&p["TemplateParam"])
                            .unwrap_or_default(),
                    );
                }
                Err(r) => return vec![r; msgs.len()],
            }
        }
        let mut p = BTreeMap::new();
        p.insert(
            "PhoneNumberJson".into(),
            serde_json::to_string(&numbers).unwrap_or_default(),
        );
        p.insert(
            "SignNameJson".into(),
            serde_json::to_string(&vec![&self.sign_name; numbers.len()]).unwrap_or_default(),
        );
        p.insert("TemplateCode".into(), template.unwrap_or_default());
        p.insert(
            "TemplateParamJson".into(),
            serde_json::to_string(&params).unwrap_or_default(),
        );
        let r = self.call("SendBatchSms", p).await;
        msgs.iter()
            .map(|m| {
                let mut r = r.clone();
                r.provider_message_id = r
                    .provider_message_id
                    .as_deref()
                    .map(|biz| receipt_key(biz, &m.recipient.address));
                r
            })
            .collect()
    }
}

impl Provider for AliyunSms {
    fn has_receipts(&self) -> bool {
        true
    }

    fn batch_max(&self) -> usize {
        self.batch_max
    }

    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let params = match self.business_params(m) {
                Ok(p) => p,
                Err(r) => return r,
            };
            let mut r = self.call("SendSms", params).await;
            r.provider_message_id = r
                .provider_message_id
                .as_deref()
                .map(|biz| receipt_key(biz, &m.recipient.address));
            r
        })
    }

    fn send_batch<'a>(
        &'a self,
        msgs: &'a [(&'a MessageRouted, i32)],
    ) -> BoxFuture<'a, Vec<CallResult>> {
        Box::pin(async move {
            // One SendBatchSms per template code; a lone message goes through SendSms (its
            // OutId carries the message id).
            let mut by_template: BTreeMap<Option<String>, Vec<usize>> = BTreeMap::new();
            for (i, (m, _)) in msgs.iter().enumerate() {
                by_template
                    .entry(crate::http::provider_template(m))
                    .or_default()
                    .push(i);
            }
            let mut groups = Vec::with_capacity(by_template.len());
            for (_, idx) in by_template {
                let group: Vec<&MessageRouted> = idx.iter().map(|i| msgs[*i].0).collect();
                let results = if group.len() == 1 {
                    vec![self.send(group[0], msgs[idx[0]].1).await]
                } else {
                    self.batch_call(&group).await
                };
                groups.push((idx, results));
            }
            crate::in_message_order(msgs.len(), groups)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_are_classified() {
        let ok = classify(200, &json!({"Code":"OK","Message":"OK","BizId":"9006^0"}));
        assert_eq!(ok.outcome, DeliveryOutcome::Succeeded);
        assert_eq!(ok.provider_message_id.as_deref(), Some("9006^0"));
        let cases = [
            (
                200,
                "isv.BUSINESS_LIMIT_CONTROL",
                DeliveryOutcome::RateLimited,
            ),
            (400, "Throttling.User", DeliveryOutcome::RateLimited),
            (200, "isp.SYSTEM_ERROR", DeliveryOutcome::FailedTransient),
            (
                200,
                "isv.MOBILE_NUMBER_ILLEGAL",
                DeliveryOutcome::FailedPermanent,
            ),
            (
                400,
                "SignatureDoesNotMatch",
                DeliveryOutcome::FailedPermanent,
            ),
            (
                400,
                "InvalidTimeStamp.Expired",
                DeliveryOutcome::FailedTransient,
            ),
            (
                404,
                "InvalidAccessKeyId.NotFound",
                DeliveryOutcome::FailedPermanent,
            ),
        ];
        for (status, code, want) in cases {
            let r = classify(status, &json!({"Code": code, "Message": "m"}));
            assert_eq!(r.outcome, want, "{code}");
            assert_eq!(r.reason.unwrap().code, code);
        }
        assert_eq!(
            classify(503, &json!({})).outcome,
            DeliveryOutcome::FailedTransient
        );
    }
}
