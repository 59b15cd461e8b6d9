//! Huawei Cloud SMS `batchSendSms/v1` (PROVIDERS-MORE.md §4.7): form content type only; WSSE
//! (`realm="SDP"`, `profile="UsernameToken"`, `type="Appkey"`, a known app_key, `Created` in the
//! exact UTC format within 24 h, Base64(hex(SHA-256(Nonce+Created+secret))) compared in constant
//! time) or AK/SK `SDK-HMAC-SHA256` (rebuilt from the listed SignedHeaders, `X-Sdk-Date` within
//! 15 min); the registered channel number, a 32-character template id, `templateParas` a JSON
//! array of non-empty strings, at most 500 numbers each `+?digits` (one bad number fails the
//! whole request), duplicates refused per number (`E200041`); the official answer shape with a
//! `<uuid>_<n>` `smsMsgId` per number; form status reports (`DELIVRD`, `UNDELIV` for numbers
//! ending in `0000`) to `statusCallback` or the receipts URL set by the test.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use herald_core::sign::{ct_eq, iso8601_utc, parse_iso8601_utc, pct};
use herald_core::util::now_ms;
use herald_providers::huawei_sms::sign::{
    AkSk, WSSE_AUTHORIZATION, parse_authorization, parse_sdk_date, password_digest,
};
use serde_json::{Value, json};

use crate::{Fault, Sim, apply_fault, credential};

const P: &str = "huawei";
/// The channel number (通道号) the simulator has registered.
pub const CHANNEL: &str = "8824032015014";

pub fn routes() -> Router<Arc<Sim>> {
    Router::new().route("/huawei/sms/batchSendSms/v1", post(handle))
}

fn error(status: StatusCode, code: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"code": code, "description": description})),
    )
        .into_response()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// `Key="value"` pairs of a WSSE header (spaces after the commas tolerated).
fn quoted_pairs(s: &str) -> HashMap<&str, &str> {
    s.split(',')
        .filter_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            Some((k.trim(), v.trim().trim_matches('"')))
        })
        .collect()
}

/// Why a request is refused: status, Huawei code, description.
type Refused = (StatusCode, &'static str, &'static str);

fn authenticate(headers: &HeaderMap, body: &[u8]) -> Result<(), Refused> {
    let app_key = credential("HERALD_SIM_HUAWEI_APP_KEY");
    let secret = credential("HERALD_SIM_HUAWEI_APP_SECRET");
    let unauthorized =
        |code: &'static str, what: &'static str| (StatusCode::UNAUTHORIZED, code, what);
    let bad = |code: &'static str, what: &'static str| (StatusCode::BAD_REQUEST, code, what);
    let auth = header(headers, "authorization");
    if auth.starts_with("WSSE") {
        if auth != WSSE_AUTHORIZATION {
            return Err(bad(
                "E000004",
                "Authorization must be WSSE realm=\"SDP\",profile=\"UsernameToken\",type=\"Appkey\"",
            ));
        }
        let Some(token) = header(headers, "x-wsse").strip_prefix("UsernameToken ") else {
            return Err(bad("E000020", "X-WSSE is missing or not a UsernameToken"));
        };
        let p = quoted_pairs(token);
        let (Some(user), Some(digest), Some(nonce), Some(created)) = (
            p.get("Username"),
            p.get("PasswordDigest"),
            p.get("Nonce"),
            p.get("Created"),
        ) else {
            return Err(bad("E000021", "X-WSSE lacks a field"));
        };
        if nonce.is_empty()
            || nonce.len() > 128
            || !nonce.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(bad("E000027", "illegal Nonce"));
        }
        if *user != app_key {
            return Err(unauthorized("E000102", "app_key is invalid"));
        }
        let Some(at) = parse_iso8601_utc(created).filter(|t| iso8601_utc(*t) == *created) else {
            return Err(bad("E000025", "Created is not yyyy-MM-ddTHH:mm:ssZ"));
        };
        if (now_ms() / 1000 - at).abs() > 24 * 3600 {
            return Err(unauthorized("E000110", "Created is out of the time window"));
        }
        if !ct_eq(&password_digest(nonce, created, &secret), digest) {
            return Err(unauthorized("E000105", "PasswordDigest is invalid"));
        }
        return Ok(());
    }
    if let Some((access, signed, sig)) = parse_authorization(auth) {
        if access != app_key {
            return Err(unauthorized("E000045", "AK/SK Authorization check failed"));
        }
        let Some(at) = parse_sdk_date(header(headers, "x-sdk-date")) else {
            return Err(unauthorized(
                "E000045",
                "X-Sdk-Date is missing or malformed",
            ));
        };
        if (now_ms() / 1000 - at).abs() > 15 * 60 || !signed.iter().any(|h| h == "x-sdk-date") {
            return Err(unauthorized(
                "E000045",
                "X-Sdk-Date is out of the window or unsigned",
            ));
        }
        let values: BTreeMap<String, String> = signed
            .iter()
            .map(|h| (h.clone(), header(headers, h).to_owned()))
            .collect();
        let want = AkSk {
            method: "POST",
            path: "/sms/batchSendSms/v1",
            query: &[],
            headers: &values,
            body,
        }
        .signature(&secret);
        if !ct_eq(&want, &sig) {
            return Err(unauthorized("E000045", "AK/SK Authorization check failed"));
        }
        return Ok(());
    }
    Err(bad(
        "E000001",
        "Authorization is missing or not WSSE / SDK-HMAC-SHA256",
    ))
}

async fn handle(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    sim.count_request(P);
    if !header(&headers, "content-type").starts_with("application/x-www-form-urlencoded") {
        sim.count_rejected(P);
        return error(
            StatusCode::BAD_REQUEST,
            "E000040",
            "Content-Type must be a form",
        );
    }
    if let Err((status, code, what)) = authenticate(&headers, &body) {
        sim.count_rejected(P);
        return error(status, code, what);
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    let invalid = |what: &str| error(StatusCode::BAD_REQUEST, "E000503", what);
    if field("from") != CHANNEL {
        return invalid("from is not a registered channel number");
    }
    let template = field("templateId");
    if template.len() != 32 || !template.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return invalid("templateId is not a registered template");
    }
    let paras: Vec<Value> = match form.get("templateParas") {
        None => Vec::new(),
        Some(t) => match serde_json::from_str::<Vec<Value>>(t) {
            Ok(v) if v.iter().all(Value::is_string) => v,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "E000000",
                    "templateParas is not a JSON array of strings",
                );
            }
        },
    };
    let empty_para = paras.iter().any(|p| p.as_str().is_some_and(str::is_empty));
    let numbers: Vec<&str> = field("to").split(',').filter(|n| !n.is_empty()).collect();
    if numbers.is_empty() || numbers.len() > 500 {
        return invalid("to must hold 1 to 500 numbers");
    }
    let well_formed = |n: &str| {
        let d = n.strip_prefix('+').unwrap_or(n);
        n.len() <= 21 && !d.is_empty() && d.len() <= 20 && d.bytes().all(|b| b.is_ascii_digit())
    };
    if !numbers.iter().all(|n| well_formed(n)) {
        return invalid("a number is not +digits: the whole request fails");
    }
    let callback = form.get("statusCallback").cloned();
    if callback
        .as_ref()
        .is_some_and(|u| u.is_empty() || u.len() > 1024)
    {
        return invalid("statusCallback must be 1-1024 characters");
    }
    let extend = field("extend").to_owned();
    if extend.len() > 128 {
        return invalid("extend is longer than 128");
    }
    let fault = sim.next_fault(P);
    let undelivered = Fault::undelivered(&fault);
    let silent = matches!(fault, Some(Fault::NoReceipt));
    let per_number_fault =
        matches!(&fault, Some(Fault::Error { code, .. }) if code.starts_with("E2"));
    let (injected, hang) = match apply_fault(fault).await {
        Err((code, msg)) if !per_number_fault => {
            let status = if code == "E000000" {
                StatusCode::INTERNAL_SERVER_ERROR
            } else if code.starts_with("E0001") {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::BAD_REQUEST
            };
            return error(
                status,
                &code,
                if msg.is_empty() {
                    "simulated failure"
                } else {
                    &msg
                },
            );
        }
        Err(e) => (Some(e), None),
        Ok(h) => (None, h),
    };
    let mut seen = HashSet::new();
    let mut results = Vec::new();
    let mut all_ok = true;
    for n in &numbers {
        let e164 = if n.starts_with('+') {
            n.to_string()
        } else {
            format!("+{n}")
        };
        let failure = if let Some((code, _)) = &injected {
            Some(code.clone())
        } else if !seen.insert(e164.clone()) {
            Some("E200041".to_owned())
        } else if empty_para {
            Some("E200028".to_owned())
        } else if !sim.within_limit(P, &e164, 0) {
            Some("E200015".to_owned())
        } else {
            None
        };
        let created = iso8601_utc(now_ms() / 1000);
        match failure {
            Some(code) => {
                all_ok = false;
                results.push(json!({"originTo": e164, "createTime": created, "from": CHANNEL, "smsMsgId": "", "status": code}));
            }
            None => {
                let id = format!("{}_{}", uuid::Uuid::new_v4(), sim.next_serial());
                let (status, desc) = match &undelivered {
                    Some((code, msg)) => (code.clone(), msg.clone()),
                    None if e164.ends_with("0000") => {
                        ("UNDELIV".to_owned(), "用户短信未送达".to_owned())
                    }
                    None => ("DELIVRD".to_owned(), "用户已成功收到短信".to_owned()),
                };
                sim.record(P, json!({"sms_msg_id": id, "to": e164, "extend": extend, "template_id": template, "params": paras}));
                if !silent {
                    let mut report = format!(
                        "sequence=1&total=1&updateTime={}&source=2&smsMsgId={}&status={}&statusDesc={}",
                        pct(&created),
                        pct(&id),
                        pct(&status),
                        pct(&desc)
                    );
                    if !extend.is_empty() {
                        report.push_str(&format!("&extend={}&to={}", pct(&extend), pct(&e164)));
                    }
                    match &callback {
                        Some(url) => {
                            let http = sim.http.clone();
                            let url = url.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                let _ = http
                                    .post(url)
                                    .header("content-type", "application/x-www-form-urlencoded")
                                    .body(report)
                                    .send()
                                    .await;
                            });
                        }
                        None => sim.push_form_receipt(P, report, Duration::from_millis(200)),
                    }
                }
                results.push(json!({"originTo": e164, "createTime": created, "from": CHANNEL, "smsMsgId": id, "status": "000000"}));
            }
        }
    }
    crate::hang(hang).await;
    let (code, description) = if all_ok {
        ("000000", "Success")
    } else {
        ("E000510", "短信发送失败，见status")
    };
    Json(json!({"result": results, "code": code, "description": description})).into_response()
}
