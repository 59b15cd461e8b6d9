//! Aliyun dysmsapi `SendSms` (PROVIDERS.md §1.8): V2 (HMAC-SHA1, query or form) and ACS3
//! (`Authorization` header) signatures, ±15 min timestamps, 15 min nonce replay window, business
//! checks, optional per-number limits, `BizId` in the `<digits>^0` shape, and SmsReport receipts
//! pushed as JSON arrays. Numbers ending in `0000` are reported undelivered.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use herald_core::sign::{ct_eq, parse_iso8601_utc, sha256_hex};
use herald_core::util::now_ms;
use herald_providers::aliyun_sms::sign::{
    acs3_canonical_query, acs3_sign, aliyun_rpc_signature, aliyun_rpc_string_to_sign,
};
use serde_json::{Value, json};

use crate::{Fault, Sim, apply_fault, credential};

const P: &str = "aliyun";
const WINDOW_MS: i64 = 15 * 60 * 1000;

pub fn routes() -> Router<Arc<Sim>> {
    Router::new().route("/aliyun/", any(handle))
}

fn answer(status: u16, code: &str, message: &str) -> Response {
    let mut body = json!({"RequestId": uuid::Uuid::new_v4().to_string().to_uppercase(), "Code": code, "Message": message});
    if status != 200 {
        body["HostId"] = json!("dysmsapi.aliyuncs.com");
        body["Recommend"] = json!(format!(
            "https://api.aliyun.com/troubleshoot?q={code}&product=Dysmsapi"
        ));
    }
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        axum::Json(body),
    )
        .into_response()
}

/// Business errors (`isv.` / `isp.`) come with HTTP 200, gateway errors with 4xx.
fn error(code: &str, message: &str) -> Response {
    let status = if code.starts_with("isv.") || code.starts_with("isp.") {
        200
    } else if code.starts_with("InvalidAccessKeyId.NotFound") || code.starts_with("InvalidApi") {
        404
    } else if code.starts_with("Forbidden") {
        403
    } else {
        400
    };
    answer(status, code, message)
}

fn parse_pairs(raw: &[u8]) -> Vec<(String, String)> {
    url_pairs(raw)
}

/// `application/x-www-form-urlencoded` pairs, strictly: `+` is a space, `%XX` decoded.
pub fn url_pairs(raw: &[u8]) -> Vec<(String, String)> {
    raw.split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = match p.iter().position(|b| *b == b'=') {
                Some(i) => (&p[..i], &p[i + 1..]),
                None => (p, &b""[..]),
            };
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &[u8]) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() => {
                match std::str::from_utf8(&s[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A mainland number: `^(\+?86|0086)?1\d{10}$`.
pub fn valid_number(n: &str) -> bool {
    let rest = n
        .strip_prefix("+86")
        .or_else(|| n.strip_prefix("0086"))
        .or_else(|| n.strip_prefix("86").filter(|r| r.len() == 11))
        .unwrap_or(n);
    rest.len() == 11 && rest.starts_with('1') && rest.bytes().all(|b| b.is_ascii_digit())
}

async fn handle(
    State(sim): State<Arc<Sim>>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    sim.count_request(P);
    match check(
        &sim,
        &method,
        query.as_deref().unwrap_or_default(),
        &headers,
        &body,
    ) {
        Ok(params) => send(&sim, params).await,
        Err((code, message)) => {
            sim.count_rejected(P);
            error(&code, &message)
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// Authenticates the request and answers its parameters.
fn rej(code: &str, message: &str) -> (String, String) {
    (code.to_owned(), message.to_owned())
}

fn check(
    sim: &Sim,
    method: &Method,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<BTreeMap<String, String>, (String, String)> {
    let key_id = credential("HERALD_SIM_ALIYUN_KEY_ID");
    let secret = credential("HERALD_SIM_ALIYUN_KEY_SECRET");
    let mut params: BTreeMap<String, String> = parse_pairs(query.as_bytes()).into_iter().collect();
    let form = header(headers, "content-type").starts_with("application/x-www-form-urlencoded");
    if form {
        params.extend(parse_pairs(body));
    }
    let now = now_ms();
    let auth = header(headers, "authorization");
    if let Some(rest) = auth.strip_prefix("ACS3-HMAC-SHA256 ") {
        let mut parts = BTreeMap::new();
        for kv in rest.split(',') {
            if let Some((k, v)) = kv.split_once('=') {
                parts.insert(k.to_owned(), v.to_owned());
            }
        }
        let (Some(cred), Some(signed), Some(sig)) = (
            parts.get("Credential"),
            parts.get("SignedHeaders"),
            parts.get("Signature"),
        ) else {
            return Err(rej(
                "IncompleteSignature",
                "The request signature does not conform to Aliyun standards.",
            ));
        };
        if *cred != key_id {
            return Err(rej(
                "InvalidAccessKeyId.NotFound",
                "Specified access key is not found.",
            ));
        }
        let date = header(headers, "x-acs-date");
        match parse_iso8601_utc(date) {
            Some(t) if (now / 1000 - t).abs() * 1000 <= WINDOW_MS => {}
            Some(_) => {
                return Err(rej(
                    "InvalidTimeStamp.Expired",
                    "Specified time stamp or date value is expired.",
                ));
            }
            None => {
                return Err(rej(
                    "InvalidTimeStamp.Format",
                    "Specified time stamp or date value is not well formatted.",
                ));
            }
        }
        if sha256_hex(body) != header(headers, "x-acs-content-sha256") {
            return Err(rej(
                "InvalidParameter",
                "x-acs-content-sha256 does not match the body",
            ));
        }
        let names: Vec<&str> = signed.split(';').collect();
        for required in [
            "host",
            "x-acs-action",
            "x-acs-date",
            "x-acs-signature-nonce",
            "x-acs-version",
        ] {
            if !names.contains(&required) {
                return Err(rej(
                    "IncompleteSignature",
                    &format!("{required} must be signed"),
                ));
            }
        }
        let signed_headers: BTreeMap<String, String> = names
            .iter()
            .map(|n| (n.to_string(), header(headers, n).to_owned()))
            .collect();
        let q: BTreeMap<String, String> = parse_pairs(query.as_bytes()).into_iter().collect();
        let want = acs3_sign(
            method.as_str(),
            &acs3_canonical_query(&q),
            &signed_headers,
            body,
            &secret,
        );
        if !ct_eq(&want.signature, sig) {
            return Err(rej(
                "SignatureDoesNotMatch",
                "Specified signature is not matched with our calculation.",
            ));
        }
        if !sim.fresh_nonce(P, header(headers, "x-acs-signature-nonce"), WINDOW_MS) {
            return Err(rej(
                "SignatureNonceUsed",
                "Specified signature nonce was used already.",
            ));
        }
        params.insert("Action".into(), header(headers, "x-acs-action").to_owned());
        params.insert(
            "Version".into(),
            header(headers, "x-acs-version").to_owned(),
        );
        return Ok(params);
    }

    for p in [
        "AccessKeyId",
        "Action",
        "Version",
        "SignatureMethod",
        "SignatureVersion",
        "SignatureNonce",
        "Timestamp",
        "Signature",
    ] {
        if !params.contains_key(p) {
            return Err(rej(
                &format!("Missing{p}"),
                &format!("{p} is mandatory for this action."),
            ));
        }
    }
    if params["AccessKeyId"] != key_id {
        return Err(rej(
            "InvalidAccessKeyId.NotFound",
            "Specified access key is not found.",
        ));
    }
    if params["SignatureMethod"] != "HMAC-SHA1" || params["SignatureVersion"] != "1.0" {
        return Err(rej(
            "InvalidSignatureMethod",
            "Specified signature method is not supported.",
        ));
    }
    match parse_iso8601_utc(&params["Timestamp"]) {
        Some(t) if (now / 1000 - t).abs() * 1000 <= WINDOW_MS => {}
        Some(_) => {
            return Err(rej(
                "InvalidTimeStamp.Expired",
                "Specified time stamp or date value is expired.",
            ));
        }
        None => {
            return Err(rej(
                "InvalidTimeStamp.Format",
                "Specified time stamp or date value is not well formatted.",
            ));
        }
    }
    let given = params["Signature"].clone();
    let want = aliyun_rpc_signature(method.as_str(), &params, &secret);
    if !ct_eq(&want, &given) {
        return Err(rej(
            "SignatureDoesNotMatch",
            &format!(
                "Specified signature is not matched with our calculation. server string to sign is:{}",
                aliyun_rpc_string_to_sign(method.as_str(), &params)
            ),
        ));
    }
    if !sim.fresh_nonce(P, &params["SignatureNonce"], WINDOW_MS) {
        return Err(rej(
            "SignatureNonceUsed",
            "Specified signature nonce was used already.",
        ));
    }
    Ok(params)
}

/// The scripted fault of an accepted call (an error answer, or how long to hang after it), and
/// the call's `BizId` in the real `<digits>^0` shape.
/// A call past its checks: the hang of a timeout fault, the `BizId`, and the receipt every
/// number of it gets.
struct Accepted {
    hang: Option<u64>,
    biz_id: String,
    undelivered: Option<(String, String)>,
    /// A `no_receipt` fault: no receipt is pushed.
    silent: bool,
}

impl Accepted {
    /// The SmsReport fields for a number: numbers ending in `0000` are never reached (the user
    /// is out of service), and an `undelivered` fault reports its code.
    fn report(&self, n: &str) -> Value {
        let (ok, code, msg) = match &self.undelivered {
            Some((code, msg)) => (false, code.as_str(), msg.as_str()),
            None if n.ends_with("0000") => (false, "MK:0001", "用户不在服务区"),
            None => (true, "DELIVERED", "用户接收成功"),
        };
        json!({
            "phone_number": n, "send_time": "2026-01-01 00:00:00", "report_time": "2026-01-01 00:00:05",
            "success": ok, "err_code": code, "err_msg": msg, "sms_size": "1", "biz_id": self.biz_id,
        })
    }
}

async fn accept_call(sim: &Sim) -> Result<Accepted, Box<Response>> {
    let fault = sim.next_fault(P);
    let undelivered = Fault::undelivered(&fault);
    let silent = matches!(fault, Some(Fault::NoReceipt));
    match apply_fault(fault).await {
        Err((code, msg)) => {
            let msg = if msg.is_empty() {
                "simulated failure".into()
            } else {
                msg
            };
            Err(Box::new(error(&code, &msg)))
        }
        Ok(hang) => Ok(Accepted {
            hang,
            biz_id: format!("{}{:06}^0", now_ms(), sim.next_serial()),
            undelivered,
            silent,
        }),
    }
}

/// `SendBatchSms`: one template, per-number sign names and params (JSON arrays of equal
/// length), at most 100 numbers; one `BizId` for the call.
async fn send_batch(sim: &Arc<Sim>, params: BTreeMap<String, String>) -> Response {
    let arr = |k: &str| -> Option<Vec<Value>> {
        serde_json::from_str::<Value>(params.get(k)?)
            .ok()?
            .as_array()
            .cloned()
    };
    let Some(numbers) = arr("PhoneNumberJson") else {
        return error(
            "MissingPhoneNumberJson",
            "PhoneNumberJson is mandatory for this action.",
        );
    };
    let Some(signs) = arr("SignNameJson") else {
        return error(
            "MissingSignNameJson",
            "SignNameJson is mandatory for this action.",
        );
    };
    let template_params = arr("TemplateParamJson").unwrap_or_default();
    if numbers.len() > 100 {
        return error("isv.MOBILE_COUNT_OVER_LIMIT", "手机号码数量超过限制");
    }
    if signs.len() != numbers.len()
        || (!template_params.is_empty() && template_params.len() != numbers.len())
    {
        return error(
            "isv.INVALID_PARAMETERS",
            "JSON arrays must have the same length",
        );
    }
    if !params
        .get("TemplateCode")
        .is_some_and(|t| t.starts_with("SMS_"))
    {
        return error("isv.SMS_TEMPLATE_ILLEGAL", "该账号下找不到对应模板");
    }
    let numbers: Vec<String> = numbers
        .iter()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect();
    if let Some(bad) = numbers.iter().find(|n| !valid_number(n)) {
        return error(
            "isv.MOBILE_NUMBER_ILLEGAL",
            &format!("{bad}invalid mobile number"),
        );
    }
    if template_params.iter().any(|p| {
        !p.as_object()
            .is_some_and(|o| o.values().all(Value::is_string))
    }) {
        return error("isv.INVALID_JSON_PARAM", "JSON参数不合法，只接受字符串值");
    }
    let accepted = match accept_call(sim).await {
        Ok(x) => x,
        Err(resp) => return *resp,
    };
    let (hang, biz_id) = (accepted.hang, accepted.biz_id.clone());
    let mut reports = Vec::new();
    for (i, n) in numbers.iter().enumerate() {
        sim.record(
            P,
            json!({
                "out_id": params.get("OutId"), "phone_numbers": n, "batch": true,
                "template_code": params.get("TemplateCode"),
                "template_param": template_params.get(i).map(|p| p.to_string()),
                "biz_id": biz_id,
            }),
        );
        let mut report = accepted.report(n);
        report["out_id"] = json!(params.get("OutId").cloned().unwrap_or_default());
        reports.push(report);
    }
    if !accepted.silent {
        sim.push_receipt(P, Value::Array(reports), Duration::from_millis(200));
    }
    crate::hang(hang).await;
    (
        StatusCode::OK,
        axum::Json(json!({"Code": "OK", "Message": "OK", "BizId": biz_id, "RequestId": uuid::Uuid::new_v4().to_string().to_uppercase()})),
    )
        .into_response()
}

async fn send(sim: &Arc<Sim>, params: BTreeMap<String, String>) -> Response {
    if params.get("Action").map(String::as_str) == Some("SendBatchSms")
        && params.get("Version").map(String::as_str) == Some(crate::aliyun::VERSION)
    {
        return send_batch(sim, params).await;
    }
    if params.get("Action").map(String::as_str) != Some("SendSms") {
        return error(
            "InvalidApi.NotFound",
            "Specified api is not found, please check your url and method.",
        );
    }
    if params.get("Version").map(String::as_str) != Some(crate::aliyun::VERSION) {
        return error(
            "InvalidVersion",
            "Specified parameter Version is not valid.",
        );
    }
    for p in ["PhoneNumbers", "SignName", "TemplateCode"] {
        if params.get(p).is_none_or(|v| v.is_empty()) {
            return error(
                &format!("Missing{p}"),
                &format!("{p} is mandatory for this action."),
            );
        }
    }
    let numbers: Vec<&str> = params["PhoneNumbers"].split(',').collect();
    if numbers.len() > 1000 {
        return error("isv.MOBILE_COUNT_OVER_LIMIT", "手机号码数量超过限制");
    }
    if let Some(bad) = numbers.iter().find(|n| !valid_number(n)) {
        return error(
            "isv.MOBILE_NUMBER_ILLEGAL",
            &format!("{bad}invalid mobile number"),
        );
    }
    if !params["TemplateCode"].starts_with("SMS_") {
        return error("isv.SMS_TEMPLATE_ILLEGAL", "该账号下找不到对应模板");
    }
    if params["SignName"] == "BLOCKED" {
        return error("isv.SMS_SIGNATURE_ILLEGAL", "签名不合法(不存在或被拉黑)");
    }
    if let Some(tp) = params.get("TemplateParam") {
        let ok = serde_json::from_str::<Value>(tp)
            .ok()
            .and_then(|v| v.as_object().map(|o| o.values().all(Value::is_string)))
            .unwrap_or(false);
        if !ok {
            return error("isv.INVALID_JSON_PARAM", "JSON参数不合法，只接受字符串值");
        }
    }
    if let Some(out_id) = params.get("OutId")
        && out_id.len() >= 256
    {
        return error("isv.INVALID_PARAMETERS", "OutId too long");
    }
    if let Some(n) = numbers.iter().find(|n| !sim.within_limit(P, n, 0)) {
        let _ = n;
        return error("isv.BUSINESS_LIMIT_CONTROL", "触发分钟级流控Permits:1");
    }
    let accepted = match accept_call(sim).await {
        Ok(x) => x,
        Err(resp) => return *resp,
    };
    let (hang, biz_id) = (accepted.hang, accepted.biz_id.clone());
    record(sim, &params, &biz_id);
    let reports: Vec<Value> = numbers
        .iter()
        .map(|n| {
            let mut report = accepted.report(n);
            report["out_id"] = json!(params.get("OutId").cloned().unwrap_or_default());
            report
        })
        .collect();
    if !accepted.silent {
        sim.push_receipt(P, Value::Array(reports), Duration::from_millis(200));
    }
    crate::hang(hang).await;
    (
        StatusCode::OK,
        axum::Json(json!({"Code": "OK", "Message": "OK", "BizId": biz_id, "RequestId": uuid::Uuid::new_v4().to_string().to_uppercase()})),
    )
        .into_response()
}

fn record(sim: &Sim, params: &BTreeMap<String, String>, biz_id: &str) {
    sim.record(
        P,
        json!({
            "out_id": params.get("OutId"),
            "phone_numbers": params.get("PhoneNumbers"),
            "sign_name": params.get("SignName"),
            "template_code": params.get("TemplateCode"),
            "template_param": params.get("TemplateParam"),
            "biz_id": biz_id,
        }),
    );
}

pub const VERSION: &str = "2017-05-25";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_form_decoding() {
        for ok in [
            "13800000000",
            "+8613800000000",
            "008613800000000",
            "8613800000000",
        ] {
            assert!(valid_number(ok), "{ok}");
        }
        for bad in ["1380000000", "23800000000", "+1415555", "1380000000x"] {
            assert!(!valid_number(bad), "{bad}");
        }
        assert_eq!(
            url_pairs(b"a=%E9%98%BF+b&c=&d"),
            vec![
                ("a".into(), "阿 b".into()),
                ("c".into(), "".into()),
                ("d".into(), "".into())
            ]
        );
    }
}
