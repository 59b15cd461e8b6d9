//! Group robots: DingTalk custom robot (PROVIDERS.md §3, signed, 20/min), Feishu custom bot
//! (§5, signature in the body, 100/min, 20 KB), WeCom group robot (§4.1, key only, 20/min).
//! All answer HTTP 200 with their error envelopes, as the real ones do.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use herald_core::sign::ct_eq;
use herald_core::util::now_ms;
use herald_providers::dingtalk_robot::sign::dingtalk_sign;
use herald_providers::feishu_bot::sign::feishu_sign;
use serde_json::{Value, json};

use crate::{Sim, apply_fault, credential, hang as hang_for};

pub fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/dingtalk/robot/send", post(dingtalk))
        .route("/feishu/open-apis/bot/v2/hook/{id}", post(feishu))
        .route("/wecom/cgi-bin/webhook/send", post(wecom))
}

fn errcode(code: i64, msg: &str) -> Response {
    Json(json!({"errcode": code, "errmsg": msg})).into_response()
}

/// WeCom's errmsg carries a hint suffix.
pub fn wecom_errcode(code: i64, msg: &str) -> Response {
    errcode(
        code,
        &format!(
            "{msg}, hint: [{}], from ip: 127.0.0.1, more info at https://open.work.weixin.qq.com/devtool/query?e={code}",
            uuid::Uuid::new_v4().simple()
        ),
    )
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// The text a robot message shows, if its shape is valid.
fn dingtalk_content(v: &Value) -> Result<String, (i64, &'static str)> {
    let s = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_owned);
    match v["msgtype"].as_str() {
        Some("text") => s("/text/content").ok_or((40035, "缺少参数 text.content")),
        Some("markdown") => match (s("/markdown/title"), s("/markdown/text")) {
            (Some(_), Some(t)) => Ok(t),
            _ => Err((40035, "缺少参数 markdown.title/text")),
        },
        Some("link") | Some("actionCard") | Some("feedCard") => Ok(v.to_string()),
        _ => Err((400105, "不支持的消息类型")),
    }
}

async fn dingtalk(
    State(sim): State<Arc<Sim>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    const P: &str = "dingtalk";
    sim.count_request(P);
    let reject = |code, msg| {
        sim.count_rejected(P);
        errcode(code, msg)
    };
    if !is_json(&headers) {
        return reject(43004, "无效的HTTP HEADER Content-Type");
    }
    match q.get("access_token") {
        None => return reject(40035, "缺少参数 access_token"),
        Some(t) if *t != credential("HERALD_SIM_DINGTALK_TOKEN") => {
            return reject(300005, "token is not exist");
        }
        _ => {}
    }
    let secret = credential("HERALD_SIM_DINGTALK_SECRET");
    let (Some(ts), Some(sign)) = (
        q.get("timestamp").and_then(|t| t.parse::<i64>().ok()),
        q.get("sign"),
    ) else {
        return reject(
            310000,
            "sign not match, more: [https://ding-doc.dingtalk.com/doc#/serverapi2/qf2nxq]",
        );
    };
    if (now_ms() - ts).abs() > 3_600_000 {
        return reject(310000, "invalid timestamp");
    }
    if !ct_eq(&dingtalk_sign(ts, &secret), sign) {
        return reject(310000, "sign not match");
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return reject(40035, "缺少参数 json");
    };
    let content = match dingtalk_content(&v) {
        Ok(c) => c,
        Err((code, msg)) => return reject(code, msg),
    };
    if !sim.within_limit(P, "robot", 20) {
        return errcode(130101, "send too fast, exceed 20 times per minute");
    }
    let hang = match apply_fault(sim.next_fault(P)).await {
        Err((code, msg)) => return errcode(code.parse().unwrap_or(-1), &msg),
        Ok(h) => h,
    };
    sim.record(
        P,
        json!({"msgtype": v["msgtype"], "content": content, "at": v["at"]}),
    );
    hang_for(hang).await;
    errcode(0, "ok")
}

fn feishu_reply(status: StatusCode, code: i64, msg: &str) -> Response {
    (status, Json(json!({"code": code, "msg": msg, "data": {}}))).into_response()
}

async fn feishu(State(sim): State<Arc<Sim>>, Path(id): Path<String>, body: Bytes) -> Response {
    const P: &str = "feishu";
    sim.count_request(P);
    let reject = |status, code, msg| {
        sim.count_rejected(P);
        feishu_reply(status, code, msg)
    };
    if id != credential("HERALD_SIM_FEISHU_HOOK") {
        return reject(
            StatusCode::NOT_FOUND,
            19001,
            "param invalid: incoming webhook access token invalid",
        );
    }
    if body.len() > 20 * 1024 {
        return reject(StatusCode::BAD_REQUEST, 9499, "Bad Request");
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return reject(StatusCode::BAD_REQUEST, 9499, "Bad Request");
    };
    let secret = credential("HERALD_SIM_FEISHU_SECRET");
    let ts = v["timestamp"].as_str().and_then(|t| t.parse::<i64>().ok());
    let signed = match (ts, v["sign"].as_str()) {
        (Some(ts), Some(sign)) => {
            (now_ms() / 1000 - ts).abs() <= 3600 && ct_eq(&feishu_sign(ts, &secret), sign)
        }
        _ => false,
    };
    if !signed {
        return reject(
            StatusCode::OK,
            19021,
            "sign match fail or timestamp is not within one hour from current time",
        );
    }
    let content = match v["msg_type"].as_str() {
        Some("text") => v
            .pointer("/content/text")
            .and_then(Value::as_str)
            .map(str::to_owned),
        Some("interactive") => v.get("card").map(|c| c.to_string()),
        Some("post") => v.pointer("/content/post").map(|c| c.to_string()),
        Some("image") | Some("share_chat") => v.get("content").map(|c| c.to_string()),
        _ => None,
    };
    let Some(content) = content else {
        return reject(StatusCode::BAD_REQUEST, 9499, "Bad Request");
    };
    if !sim.within_limit(P, "bot", 100) {
        return feishu_reply(StatusCode::BAD_REQUEST, 9499, "too many request");
    }
    let hang = match apply_fault(sim.next_fault(P)).await {
        Err((code, msg)) => {
            return feishu_reply(StatusCode::OK, code.parse().unwrap_or(9499), &msg);
        }
        Ok(h) => h,
    };
    sim.record(P, json!({"msg_type": v["msg_type"], "content": content}));
    hang_for(hang).await;
    feishu_reply(StatusCode::OK, 0, "success")
}

async fn wecom(
    State(sim): State<Arc<Sim>>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    const P: &str = "wecom_robot";
    sim.count_request(P);
    let reject = |code, msg| {
        sim.count_rejected(P);
        wecom_errcode(code, msg)
    };
    if q.get("key") != Some(&credential("HERALD_SIM_WECOM_KEY")) {
        return reject(93000, "invalid webhook url");
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return reject(40058, "invalid json");
    };
    let (content, max) = match v["msgtype"].as_str() {
        Some("text") => (v.pointer("/text/content"), 2048),
        Some("markdown") => (v.pointer("/markdown/content"), 4096),
        _ => return reject(40008, "invalid message type"),
    };
    let Some(content) = content.and_then(Value::as_str).filter(|c| !c.is_empty()) else {
        return reject(44004, "empty content");
    };
    if content.len() > max {
        return reject(40058, "content exceed max length");
    }
    if !sim.within_limit(P, "robot", 20) {
        return wecom_errcode(45009, "api freq out of limit");
    }
    let hang = match apply_fault(sim.next_fault(P)).await {
        Err((code, msg)) => return wecom_errcode(code.parse().unwrap_or(-1), &msg),
        Ok(h) => h,
    };
    sim.record(P, json!({"msgtype": v["msgtype"], "content": content, "mentioned_list": v.pointer("/text/mentioned_list"), "mentioned_mobile_list": v.pointer("/text/mentioned_mobile_list")}));
    hang_for(hang).await;
    errcode(0, "ok")
}
