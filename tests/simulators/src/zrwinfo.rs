//! 掌榕网 (Zrwinfo) SMS, `api.1cloudsp.com` (PROVIDERS-MORE.md §3.7), as far as its thin
//! official pages and the reference client go: form or query fields; `accesskey` known (else
//! `9006`); `secret` equal to the account's, or for `/api/v2/send` the 2.0 token (`timestamp`
//! within 10 minutes, `random` not seen before, `token` = MD5 hex of secret + random +
//! timestamp; a bad one is `9006`, the code being undocumented); `sign` a registered `【…】`
//! text or id (`9016`); `templateId` registered (`9017`); `content` split on `##` (or `$$`)
//! with exactly the template's number of `{n}` placeholders (`10006`), each 1–20 characters
//! (`9018`); `mobile` `1` + 10 digits each (`9003`), at most 100 per send (`9014`), none empty
//! (`9022`); at most 3 messages per number per minute (`9024`). Answers are HTTP 200 with a
//! string `code`: `{"code":"0","msg":"SUCCESS","smUuid":…}` (single) or `batchId` (send).
//! A scripted `5xx` code answers that HTTP status with an HTML page. Reports are pushed as forms (`DELIVRD`; `MK:0001` for numbers ending 0000) to the receipts
//! URL set by the test.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use herald_core::sign::pct;
use herald_core::util::now_ms;
use serde_json::json;

use crate::{Fault, Sim, apply_fault, credential, hang};

const P: &str = "zrwinfo";
/// The signatures and templates (id → text) the simulated account has registered.
const SIGNS: [&str; 2] = ["【Herald】", "1001"];
const TEMPLATES: [(&str, &str); 2] = [
    ("100001", "您的验证码是{1}，5分钟内有效。"),
    ("100002", "{1}您好,您的订单于{2}已通过{3}发货,运单号{4}"),
];

pub fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/zrwinfo/api/v2/single_send", post(single).get(single))
        .route("/zrwinfo/api/v2/send", post(batch).get(batch))
}

fn answer(code: &str, msg: &str) -> Response {
    axum::Json(json!({"code": code, "msg": msg})).into_response()
}

async fn single(State(sim): State<Arc<Sim>>, RawQuery(q): RawQuery, body: Bytes) -> Response {
    handle(sim, q, body, false).await
}

async fn batch(State(sim): State<Arc<Sim>>, RawQuery(q): RawQuery, body: Bytes) -> Response {
    handle(sim, q, body, true).await
}

async fn handle(sim: Arc<Sim>, query: Option<String>, body: Bytes, batch: bool) -> Response {
    // GET carries the fields in the query, POST in the form body.
    let mut f: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    if let Some(q) = query {
        f.extend(url::form_urlencoded::parse(q.as_bytes()).into_owned());
    }
    let get = |k: &str| f.get(k).map(String::as_str).unwrap_or_default();
    if get("accesskey") != credential("HERALD_SIM_ZRWINFO_ACCESS_KEY") {
        sim.count_rejected(P);
        return answer("9006", "accessKey不正确");
    }
    let secret = credential("HERALD_SIM_ZRWINFO_SECRET");
    let authenticated = if batch && f.contains_key("token") {
        let ts = get("timestamp").parse::<i64>().unwrap_or(0);
        let random = get("random");
        !random.is_empty()
            && (now_ms() - ts).abs() <= 600_000
            && herald_core::sign::ct_eq(
                get("token"),
                &herald_providers::zrwinfo_sms::token(&secret, random, ts),
            )
            && sim.fresh_nonce(P, random, 600_000)
    } else {
        herald_core::sign::ct_eq(get("secret"), &secret)
    };
    if !authenticated {
        sim.count_rejected(P);
        return answer("9006", "accessKey不正确");
    }
    sim.count_request(P);
    let fault = sim.next_fault(P);
    let undelivered = Fault::undelivered(&fault);
    let silent = matches!(fault, Some(Fault::NoReceipt));
    let hang_ms = match apply_fault(fault).await {
        // A bare HTTP error (the platform documents no code for its own trouble).
        Err((code, _)) if code.len() == 3 && code.starts_with('5') => {
            let status = axum::http::StatusCode::from_u16(code.parse().unwrap_or(503))
                .unwrap_or(axum::http::StatusCode::SERVICE_UNAVAILABLE);
            return (status, "<html><body>Service Unavailable</body></html>").into_response();
        }
        Err((code, msg)) => {
            return answer(
                &code,
                if msg.is_empty() {
                    "simulated failure"
                } else {
                    &msg
                },
            );
        }
        Ok(h) => h,
    };
    let sign = get("sign");
    if sign.is_empty() || !(SIGNS.contains(&sign) || get("signId") == SIGNS[1]) {
        return answer("9016", "无效的签名或签名ID");
    }
    let Some((_, text)) = TEMPLATES.iter().find(|(id, _)| *id == get("templateId")) else {
        return answer("9017", "无效的模板ID");
    };
    let content = get("content");
    if content.is_empty() {
        return answer("9019", "内容不可为空");
    }
    let parts: Vec<&str> = if content.contains("##") {
        content.split("##").collect()
    } else {
        content.split("$$").collect()
    };
    if parts.len() != text.matches('{').count() {
        return answer("10006", "模版和内容不匹配");
    }
    if parts.iter().any(|p| !(1..=20).contains(&p.chars().count())) {
        return answer("9018", "单个变量限制1-20字");
    }
    let mobile = get("mobile");
    if mobile.is_empty() {
        return answer("9022", "手机号码不能为空");
    }
    let numbers: Vec<&str> = mobile.split(',').collect();
    if numbers.len() > 100 || (!batch && numbers.len() > 1) {
        return answer("9014", "超出最大手机号数量");
    }
    if numbers
        .iter()
        .any(|n| !(n.len() == 11 && n.starts_with('1') && n.bytes().all(|b| b.is_ascii_digit())))
    {
        return answer("9003", "手机号码格式不正确");
    }
    if numbers.iter().any(|n| !sim.within_limit(P, n, 3)) {
        return answer("9024", "手机号码超频");
    }
    let serial = sim.next_serial();
    let batch_id = batch.then(|| format!("{}", uuid::Uuid::new_v4().simple()));
    let mut first_uuid = String::new();
    for n in &numbers {
        let sm_uuid = format!(
            "10000_1_{serial}_{n}_1_{}_1",
            &uuid::Uuid::new_v4().simple().to_string()[..7]
        );
        if first_uuid.is_empty() {
            first_uuid = sm_uuid.clone();
        }
        sim.record(
            P,
            json!({"sm_uuid": sm_uuid, "batch_id": batch_id, "mobile": n, "sign": sign,
                   "template_id": get("templateId"), "content": content,
                   "auth": if f.contains_key("token") { "token" } else { "plain" }}),
        );
        if !silent {
            let result = match &undelivered {
                Some((code, _)) => code.clone(),
                None if n.ends_with("0000") => "MK:0001".to_owned(),
                None => "DELIVRD".to_owned(),
            };
            let mut report = format!(
                "smUuid={}&mobile={n}&deliverResult={}&deliverTime={}",
                pct(&sm_uuid),
                pct(&result),
                pct("2026-01-01 08:00:00")
            );
            if let Some(b) = &batch_id {
                report.push_str(&format!("&batchId={b}"));
            }
            sim.push_form_receipt(P, report, Duration::from_millis(200));
        }
    }
    hang(hang_ms).await;
    match batch_id {
        Some(b) => axum::Json(json!({"code": "0", "msg": "SUCCESS", "batchId": b})).into_response(),
        None => {
            axum::Json(json!({"code": "0", "msg": "SUCCESS", "smUuid": first_uuid})).into_response()
        }
    }
}
