//! Tencent Cloud SMS `SendSms` 2021-01-11 (PROVIDERS.md §2), TC3-HMAC-SHA256 signed.
//! `SessionContext` carries Herald's message id; the per-number `SerialNo` is the receipt key.
//!
//! With `batch_max` > 1 (at most 200), messages with the same `TemplateId` and the same
//! `TemplateParamSet` (a notice to many) go out in one call of up to `batch_max` numbers; each
//! message gets its own number's `SendStatusSet` entry. A batch's `SessionContext` names its
//! first message (the receipt key is the per-number `SerialNo`).
//!
//! Config: credentials `secret_id`, `secret_key`; settings `sdk_app_id`, `sign_name`, optional
//! `region` (default `ap-guangzhou`). Templates need `provider_template` (the `TemplateId`);
//! `provider_params` are positional: keys `1`, `2`, … give `TemplateParamSet` in order.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_core::util::now_ms;
use herald_schemas::{DeliveryOutcome, MessageRouted, Reason};

use crate::http::{http_client, json_call, provider_error};
use crate::settings::Needs;
use crate::{CallResult, Context, Kind, Provider, ProviderError};

pub mod receipt;
pub mod sign;

use sign::Tc3;

pub const KIND: Kind = Kind {
    name: "tencent_sms",
    channel: herald_schemas::Channel::Sms,
    check: |p| TencentSms::new(p).map(drop),
    build: |p, _: &Context| Ok(Box::new(TencentSms::new(p)?)),
    receipts: Some(crate::Receipts {
        parse: receipt::parse,
        ack: receipt::ack,
    }),
    accepts: crate::any_address,
};

pub const VERSION: &str = "2021-01-11";
const CONTENT_TYPE: &str = "application/json; charset=utf-8";
const SIGNED: &[&str] = &["content-type", "host", "x-tc-action"];

pub struct TencentSms {
    client: reqwest::Client,
    endpoint: String,
    host: String,
    service: String,
    secret_id: String,
    secret_key: String,
    sdk_app_id: String,
    sign_name: String,
    region: String,
    batch_max: usize,
}

impl TencentSms {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let mut n = Needs::new(p);
        let endpoint = n.endpoint();
        let host = n.signed_host(&endpoint);
        let secret_id = n.credential("secret_id");
        let secret_key = n.credential("secret_key");
        let sdk_app_id = n.setting("sdk_app_id");
        let sign_name = n.setting("sign_name");
        // The service is the first label of the real host; simulators answer for `sms`.
        let service = n.setting_or("service", "sms");
        let region = n.setting_or("region", "ap-guangzhou");
        n.done()?;
        Ok(TencentSms {
            client: http_client(p)?,
            endpoint,
            host,
            service,
            secret_id,
            secret_key,
            sdk_app_id,
            sign_name,
            region,
            batch_max: p.batch_max.unwrap_or(1).clamp(1, 200),
        })
    }

    /// One signed `SendSms` call; the answer's JSON, or the call's failure.
    async fn call(&self, body: String) -> Result<serde_json::Value, CallResult> {
        let ts = now_ms() / 1000;
        let mut headers = BTreeMap::new();
        headers.insert("content-type".to_owned(), CONTENT_TYPE.to_owned());
        headers.insert("host".to_owned(), self.host.clone());
        headers.insert("x-tc-action".to_owned(), "SendSms".to_owned());
        let auth = Tc3 {
            secret_key: &self.secret_key,
            service: &self.service,
            timestamp: ts,
            signed_headers: SIGNED,
            headers: &headers,
            payload: body.as_bytes(),
        }
        .authorization(&self.secret_id);
        let req = self
            .client
            .post(format!("{}/", self.endpoint))
            .header("content-type", CONTENT_TYPE)
            .header("x-tc-action", "SendSms")
            .header("x-tc-version", VERSION)
            .header("x-tc-region", &self.region)
            .header("x-tc-timestamp", ts.to_string())
            .header("authorization", auth)
            .body(body);
        json_call(req).await.map(|(_, v)| v)
    }

    /// The request body for messages sharing a template and its params.
    fn body(&self, template: &str, group: &[&MessageRouted]) -> String {
        let Some(first) = group.first() else {
            return String::new();
        };
        serde_json::json!({
            "PhoneNumberSet": group.iter().map(|m| m.recipient.address.as_str()).collect::<Vec<_>>(),
            "SmsSdkAppId": self.sdk_app_id,
            "SignName": self.sign_name,
            "TemplateId": template,
            "TemplateParamSet": template_param_set(&first.content.provider_params),
            "SessionContext": first.header.message_id,
        })
        .to_string()
    }
}

fn missing_template() -> CallResult {
    CallResult::fail(
        DeliveryOutcome::FailedPermanent,
        None,
        Reason::new(
            "missing_provider_template",
            "Tencent SMS needs the template's provider_template (TemplateId)",
        ),
    )
}

/// A mainland number's 11 digits (`+86`, `0086`, `86` prefixes dropped), to match a
/// `SendStatusSet` entry (E.164) to the address a message was sent to.
fn national(n: &str) -> &str {
    n.strip_prefix("+86")
        .or_else(|| n.strip_prefix("0086"))
        .or_else(|| n.strip_prefix("86").filter(|r| r.len() == 11))
        .unwrap_or(n)
}

/// A batch answer, one result per address in order: a request-level error is every message's;
/// otherwise each message gets its number's `SendStatusSet` entry, and a number the answer does
/// not mention has an unknown outcome (the call was taken).
pub fn classify_batch(v: &serde_json::Value, addresses: &[&str]) -> Vec<CallResult> {
    let resp = &v["Response"];
    let Some(set) = resp["SendStatusSet"]
        .as_array()
        .filter(|_| resp.get("Error").is_none())
    else {
        let r = classify(v);
        return vec![r; addresses.len()];
    };
    addresses
        .iter()
        .map(|a| {
            set.iter()
                .find(|e| {
                    e["PhoneNumber"]
                        .as_str()
                        .is_some_and(|p| national(p) == national(a))
                })
                .map(|e| classify(&serde_json::json!({"Response": {"SendStatusSet": [e]}})))
                .unwrap_or_else(|| {
                    provider_error(
                        DeliveryOutcome::Unknown,
                        "missing_send_status",
                        "the answer has no SendStatusSet entry for this number",
                    )
                })
        })
        .collect()
}

/// `TemplateParamSet` from positional params (`1`, `2`, … in numeric order).
pub fn template_param_set(params: &std::collections::HashMap<String, String>) -> Vec<String> {
    let mut v: Vec<(&String, &String)> = params.iter().collect();
    v.sort_by(|a, b| match (a.0.parse::<u32>(), b.0.parse::<u32>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.0.cmp(b.0),
    });
    v.into_iter().map(|(_, v)| v.clone()).collect()
}

/// Tencent's answer, classified (PROVIDERS.md §2.4): always HTTP 200; request-level errors in
/// `Response.Error`, per-number outcomes in `SendStatusSet`.
pub fn classify(v: &serde_json::Value) -> CallResult {
    let resp = &v["Response"];
    let (code, msg, serial) = if let Some(err) = resp.get("Error") {
        (
            err["Code"].as_str().unwrap_or_default(),
            err["Message"].as_str().unwrap_or_default(),
            None,
        )
    } else if let Some(first) = resp["SendStatusSet"].as_array().and_then(|s| s.first()) {
        (
            first["Code"].as_str().unwrap_or_default(),
            first["Message"].as_str().unwrap_or_default(),
            first["SerialNo"].as_str().filter(|s| !s.is_empty()),
        )
    } else {
        return CallResult::fail(
            DeliveryOutcome::FailedTransient,
            None,
            Reason::new("invalid_response", "neither Error nor SendStatusSet"),
        );
    };
    if code == "Ok" {
        return CallResult::ok("Ok", serial.map(str::to_owned));
    }
    let outcome = match code {
        "RequestLimitExceeded"
        | "LimitExceeded.DeliveryFrequencyLimit"
        | "LimitExceeded.PhoneNumberThirtySecondLimit" => DeliveryOutcome::RateLimited,
        c if c.starts_with("InternalError") => DeliveryOutcome::FailedTransient,
        // Re-signing with a fresh timestamp fixes an expired signature.
        "AuthFailure.SignatureExpire" => DeliveryOutcome::FailedTransient,
        _ => DeliveryOutcome::FailedPermanent,
    };
    provider_error(outcome, code, msg)
}

impl Provider for TencentSms {
    fn has_receipts(&self) -> bool {
        true
    }

    fn batch_max(&self) -> usize {
        self.batch_max
    }

    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let Some(template) = crate::http::provider_template(m) else {
                return missing_template();
            };
            match self.call(self.body(&template, &[m])).await {
                Ok(v) => classify(&v),
                Err(r) => r,
            }
        })
    }

    fn send_batch<'a>(
        &'a self,
        msgs: &'a [(&'a MessageRouted, i32)],
    ) -> BoxFuture<'a, Vec<CallResult>> {
        Box::pin(async move {
            // One call per (TemplateId, TemplateParamSet); a number at most once per call.
            type Key = (Option<String>, Vec<String>);
            let mut calls: Vec<(Key, Vec<usize>)> = Vec::new();
            for (i, (m, _)) in msgs.iter().enumerate() {
                let key = (
                    crate::http::provider_template(m),
                    template_param_set(&m.content.provider_params),
                );
                let addr = national(&m.recipient.address);
                let fits = calls.iter_mut().find(|(k, idx)| {
                    *k == key
                        && idx.len() < self.batch_max
                        && idx
                            .iter()
                            .all(|j| national(&msgs[*j].0.recipient.address) != addr)
                });
                match fits {
                    Some((_, idx)) => idx.push(i),
                    None => calls.push((key, vec![i])),
                }
            }
            let results =
                futures::future::join_all(calls.iter().map(|((template, _), idx)| async move {
                    let Some(template) = template else {
                        return vec![missing_template(); idx.len()];
                    };
                    let group: Vec<&MessageRouted> = idx.iter().map(|i| msgs[*i].0).collect();
                    let addresses: Vec<&str> =
                        group.iter().map(|m| m.recipient.address.as_str()).collect();
                    match self.call(self.body(template, &group)).await {
                        Ok(v) => classify_batch(&v, &addresses),
                        Err(r) => vec![r; idx.len()],
                    }
                }))
                .await;
            crate::in_message_order(
                msgs.len(),
                calls.iter().map(|(_, idx)| idx.as_slice()).zip(results),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_are_classified() {
        let ok = classify(
            &json!({"Response":{"SendStatusSet":[{"SerialNo":"5000:1","Code":"Ok","Message":"send success"}],"RequestId":"r"}}),
        );
        assert_eq!(ok.outcome, DeliveryOutcome::Succeeded);
        assert_eq!(ok.provider_message_id.as_deref(), Some("5000:1"));
        let per_number = classify(
            &json!({"Response":{"SendStatusSet":[{"SerialNo":"","Code":"FailedOperation.TemplateParamSetNotMatchApprovedTemplate","Message":"m"}]}}),
        );
        assert_eq!(per_number.outcome, DeliveryOutcome::FailedPermanent);
        assert_eq!(
            per_number.reason.unwrap().code,
            "FailedOperation.TemplateParamSetNotMatchApprovedTemplate"
        );
        let err = |c: &str| {
            classify(&json!({"Response":{"Error":{"Code":c,"Message":"m"},"RequestId":"r"}}))
                .outcome
        };
        assert_eq!(
            err("AuthFailure.SignatureFailure"),
            DeliveryOutcome::FailedPermanent
        );
        assert_eq!(
            err("AuthFailure.SignatureExpire"),
            DeliveryOutcome::FailedTransient
        );
        assert_eq!(err("RequestLimitExceeded"), DeliveryOutcome::RateLimited);
        assert_eq!(
            err("InternalError.Timeout"),
            DeliveryOutcome::FailedTransient
        );
        // "OK" is not Tencent's success code.
        let wrong = classify(&json!({"Response":{"SendStatusSet":[{"Code":"OK"}]}}));
        assert_ne!(wrong.outcome, DeliveryOutcome::Succeeded);
    }

    #[test]
    fn batch_answers_go_to_their_numbers() {
        let v = json!({"Response":{"SendStatusSet":[
            {"SerialNo":"","PhoneNumber":"+8613800000002","Code":"FailedOperation.PhoneNumberInBlacklist","Message":"m"},
            {"SerialNo":"5000:1","PhoneNumber":"+8613800000001","Code":"Ok","Message":"send success"}
        ]}});
        let rs = classify_batch(&v, &["13800000001", "+8613800000002", "008613800000003"]);
        assert_eq!(rs[0].provider_message_id.as_deref(), Some("5000:1"));
        assert_eq!(rs[1].outcome, DeliveryOutcome::FailedPermanent);
        // Taken, but not answered for: unknown, never a silent resend.
        assert_eq!(rs[2].outcome, DeliveryOutcome::Unknown);
        let err = json!({"Response":{"Error":{"Code":"RequestLimitExceeded","Message":"m"}}});
        assert!(
            classify_batch(&err, &["1", "2"])
                .iter()
                .all(|r| r.outcome == DeliveryOutcome::RateLimited)
        );
    }

    #[test]
    fn positional_params_keep_numeric_order() {
        let p = [("10", "j"), ("2", "b"), ("1", "a")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(template_param_set(&p), ["a", "b", "j"]);
    }
}
