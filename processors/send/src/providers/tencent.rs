//! Tencent Cloud SMS `SendSms` 2021-01-11 (PROVIDERS.md §2), TC3-HMAC-SHA256 signed.
//! `SessionContext` carries Herald's message id; the per-number `SerialNo` is the receipt key.
//!
//! Config: credentials `secret_id`, `secret_key`; settings `sdk_app_id`, `sign_name`, optional
//! `region` (default `ap-guangzhou`). Templates need `provider_template` (the `TemplateId`);
//! `provider_params` are positional: keys `1`, `2`, … give `TemplateParamSet` in order.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_core::sign::Tc3;
use herald_core::util::now_ms;
use herald_schemas::{DeliveryOutcome, MessageRouted, Reason};

use super::{
    CallResult, Provider, ProviderError, credential, endpoint, http_client, json_call,
    provider_error, setting,
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
}

impl TencentSms {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let endpoint = endpoint(p)?;
        let host = super::signed_host(p, &endpoint)?;
        Ok(TencentSms {
            client: http_client(p)?,
            endpoint,
            host,
            // The service is the first label of the real host; simulators answer for `sms`.
            service: p
                .settings
                .get("service")
                .cloned()
                .unwrap_or_else(|| "sms".into()),
            secret_id: credential(p, "secret_id")?,
            secret_key: credential(p, "secret_key")?,
            sdk_app_id: setting(p, "sdk_app_id")?,
            sign_name: setting(p, "sign_name")?,
            region: p
                .settings
                .get("region")
                .cloned()
                .unwrap_or_else(|| "ap-guangzhou".into()),
        })
    }
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

    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let Some(template) = super::provider_template(m) else {
                return CallResult::fail(
                    DeliveryOutcome::FailedPermanent,
                    None,
                    Reason::new(
                        "missing_provider_template",
                        "Tencent SMS needs the template's provider_template (TemplateId)",
                    ),
                );
            };
            let body = serde_json::json!({
                "PhoneNumberSet": [m.recipient.address],
                "SmsSdkAppId": self.sdk_app_id,
                "SignName": self.sign_name,
                "TemplateId": template,
                "TemplateParamSet": template_param_set(&m.content.provider_params),
                "SessionContext": m.header.message_id,
            })
            .to_string();
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
            match json_call(req).await {
                Ok((_, v)) => classify(&v),
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
    fn positional_params_keep_numeric_order() {
        let p = [("10", "j"), ("2", "b"), ("1", "a")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(template_param_set(&p), ["a", "b", "j"]);
    }
}
