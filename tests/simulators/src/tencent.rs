//! Tencent Cloud SMS `SendSms` 2021-01-11 (PROVIDERS.md §2.6): the five `X-TC-*` headers,
//! TC3-HMAC-SHA256 rebuilt from the listed SignedHeaders (values lowercased), ±300 s, the UTC
//! date in the credential scope, field checks, per-number `SendStatusSet` (`Code: "Ok"`), errors
//! in `Response.Error` with HTTP 200, and status callbacks pushed as JSON arrays. Numbers ending
//! in `0000` are reported undelivered.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use herald_core::sign::{ct_eq, utc_date};
use herald_core::util::now_ms;
use herald_providers::tencent_sms::sign::Tc3;
use serde_json::{Value, json};

use crate::{Fault, Sim, apply_fault, credential};

const P: &str = "tencent";

pub fn routes() -> Router<Arc<Sim>> {
    Router::new().route("/tencent/", post(handle))
}

fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn error(code: &str, message: &str) -> Json<Value> {
    Json(
        json!({"Response": {"Error": {"Code": code, "Message": message}, "RequestId": request_id()}}),
    )
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

fn authenticate(headers: &HeaderMap, body: &[u8]) -> Result<(), Json<Value>> {
    for h in [
        "x-tc-action",
        "x-tc-version",
        "x-tc-region",
        "x-tc-timestamp",
        "authorization",
    ] {
        if header(headers, h).is_empty() {
            return Err(error(
                "MissingParameter",
                &format!("The request is missing a required parameter `{h}`."),
            ));
        }
    }
    let auth = header(headers, "authorization");
    let Some(rest) = auth.strip_prefix("TC3-HMAC-SHA256 ") else {
        return Err(error(
            "AuthFailure.InvalidAuthorization",
            "Authorization is not TC3-HMAC-SHA256",
        ));
    };
    let mut parts = BTreeMap::new();
    for kv in rest.split(", ") {
        if let Some((k, v)) = kv.split_once('=') {
            parts.insert(k, v);
        }
    }
    let (Some(cred), Some(signed), Some(sig)) = (
        parts.get("Credential"),
        parts.get("SignedHeaders"),
        parts.get("Signature"),
    ) else {
        return Err(error(
            "AuthFailure.InvalidAuthorization",
            "Credential, SignedHeaders and Signature are required",
        ));
    };
    let scope: Vec<&str> = cred.split('/').collect();
    if scope.len() != 4 || scope[3] != "tc3_request" {
        return Err(error(
            "AuthFailure.InvalidAuthorization",
            "malformed Credential",
        ));
    }
    if scope[0] != credential("HERALD_SIM_TENCENT_SECRET_ID") {
        return Err(error(
            "AuthFailure.SecretIdNotFound",
            "The SecretId is not found.",
        ));
    }
    let Ok(ts) = header(headers, "x-tc-timestamp").parse::<i64>() else {
        return Err(error(
            "InvalidParameter",
            "X-TC-Timestamp is not an integer",
        ));
    };
    if (now_ms() / 1000 - ts).abs() > 300 {
        return Err(error("AuthFailure.SignatureExpire", "Signature expired."));
    }
    if scope[1] != utc_date(ts) || scope[2] != "sms" {
        return Err(error(
            "AuthFailure.SignatureFailure",
            "The credential scope date or service is wrong.",
        ));
    }
    let names: Vec<&str> = signed.split(';').collect();
    if !names.contains(&"content-type") || !names.contains(&"host") {
        return Err(error(
            "AuthFailure.SignatureFailure",
            "content-type and host must be signed",
        ));
    }
    let values: BTreeMap<String, String> = names
        .iter()
        .map(|n| (n.to_string(), header(headers, n).to_owned()))
        .collect();
    let secret = credential("HERALD_SIM_TENCENT_SECRET_KEY");
    let want = Tc3 {
        secret_key: &secret,
        service: "sms",
        timestamp: ts,
        signed_headers: &names,
        headers: &values,
        payload: body,
    }
    .signature();
    if !ct_eq(&want, sig) {
        return Err(error(
            "AuthFailure.SignatureFailure",
            "The provided credentials could not be validated. Please check your signature is correct.",
        ));
    }
    if header(headers, "x-tc-action") != "SendSms" {
        return Err(error("InvalidAction", "The action does not exist."));
    }
    if header(headers, "x-tc-version") != "2021-01-11" {
        return Err(error("NoSuchVersion", "The API version does not exist."));
    }
    Ok(())
}

/// A number Tencent takes: E.164, or a domestic one with `86` / `0086` / no prefix.
fn normalise(n: &str) -> Option<String> {
    let digits = n
        .strip_prefix("+86")
        .or_else(|| n.strip_prefix("0086"))
        .or_else(|| n.strip_prefix("86").filter(|r| r.len() == 11))
        .unwrap_or(n);
    (digits.len() == 11 && digits.starts_with('1') && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| format!("+86{digits}"))
}

async fn handle(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Json<Value> {
    sim.count_request(P);
    if let Err(e) = authenticate(&headers, &body) {
        sim.count_rejected(P);
        return e;
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(
            "FailedOperation.JsonParseFail",
            "The request body is not valid JSON.",
        );
    };
    let numbers: Vec<&str> = req["PhoneNumberSet"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if numbers.is_empty() {
        return error(
            "MissingParameter.EmptyPhoneNumberSet",
            "The PhoneNumberSet is empty.",
        );
    }
    if numbers.len() > 200 {
        return error(
            "LimitExceeded.PhoneNumberCountLimit",
            "More than 200 numbers in one request.",
        );
    }
    if !req["SmsSdkAppId"]
        .as_str()
        .is_some_and(|a| a.starts_with("1400"))
    {
        return error(
            "InvalidParameterValue.SdkAppIdNotExist",
            "The SdkAppId does not exist.",
        );
    }
    if !req["TemplateId"]
        .as_str()
        .is_some_and(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
    {
        return error(
            "FailedOperation.TemplateIncorrectOrUnapproved",
            "The template is not approved or does not exist.",
        );
    }
    if req["SignName"].as_str().is_none_or(str::is_empty) {
        return error(
            "MissingParameter",
            "SignName is required for domestic numbers.",
        );
    }
    if req["TemplateParamSet"]
        .as_array()
        .is_some_and(|a| a.iter().any(|v| !v.is_string()))
    {
        return error(
            "InvalidParameterValue.TemplateParameterFormatError",
            "TemplateParamSet must hold strings.",
        );
    }
    let session = req["SessionContext"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if session.len() >= 512 {
        return error("InvalidParameterValue", "SessionContext is too long.");
    }
    let fault = sim.next_fault(P);
    let undelivered = Fault::undelivered(&fault);
    let silent = matches!(fault, Some(Fault::NoReceipt));
    let per_number_fault = matches!(&fault, Some(Fault::Error { code, .. })
        if code.starts_with("FailedOperation.")
            || code.starts_with("LimitExceeded.Phone")
            || code.starts_with("LimitExceeded.Delivery"));
    let (injected, hang) = match apply_fault(fault).await {
        Err((code, msg)) if !per_number_fault => {
            let msg = if msg.is_empty() {
                "simulated failure".into()
            } else {
                msg
            };
            return error(&code, &msg);
        }
        Err(e) => (Some(e), None),
        Ok(h) => (None, h),
    };
    let mut set = Vec::new();
    let mut reports = Vec::new();
    for n in &numbers {
        let entry = match (normalise(n), &injected) {
            (_, Some((code, msg))) => {
                json!({"SerialNo": "", "PhoneNumber": n, "Fee": 0, "SessionContext": session, "Code": code, "Message": msg, "IsoCode": "CN"})
            }
            (None, _) => {
                json!({"SerialNo": "", "PhoneNumber": n, "Fee": 0, "SessionContext": session, "Code": "InvalidParameterValue.IncorrectPhoneNumber", "Message": "incorrect phone number", "IsoCode": "CN"})
            }
            (Some(e164), None) if !sim.within_limit(P, &e164, 0) => {
                json!({"SerialNo": "", "PhoneNumber": e164, "Fee": 0, "SessionContext": session, "Code": "LimitExceeded.PhoneNumberThirtySecondLimit", "Message": "the number hit the 30 s limit", "IsoCode": "CN"})
            }
            (Some(e164), None) => {
                let serial = format!("2433:{}{:08}", now_ms(), sim.next_serial());
                let (ok, code, description) = match &undelivered {
                    Some((code, msg)) => (false, code.as_str(), msg.as_str()),
                    None if e164.ends_with("0000") => (false, "UNDELIV", "用户短信未送达"),
                    None => (true, "DELIVRD", "用户短信送达成功"),
                };
                reports.push(json!({
                    "user_receive_time": "2026-01-01 00:00:05", "nationcode": "86",
                    "mobile": e164.trim_start_matches("+86"), "report_status": if ok { "SUCCESS" } else { "FAIL" },
                    "errmsg": code, "description": description, "sid": serial,
                }));
                {
                    sim.record(P, json!({"session_context": session, "numbers": [e164], "serial_no": serial, "template_id": req["TemplateId"], "params": req["TemplateParamSet"]}));
                }
                json!({"SerialNo": serial, "PhoneNumber": e164, "Fee": 1, "SessionContext": session, "Code": "Ok", "Message": "send success", "IsoCode": "CN"})
            }
        };
        set.push(entry);
    }
    if !reports.is_empty() && !silent {
        sim.push_receipt(P, Value::Array(reports), Duration::from_millis(200));
    }
    crate::hang(hang).await;
    Json(json!({"Response": {"SendStatusSet": set, "RequestId": request_id()}}))
}
