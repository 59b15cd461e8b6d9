//! Token-based Tencent APIs: the WeCom app message API (PROVIDERS.md §4.2: `gettoken`, the same
//! token while valid, `message/send`) and the WeChat Official Account template message (§6:
//! `stable_token`, `message/template/send`, `client_msg_id` dedup within 10 minutes). A revoked
//! token answers 42001, an unknown one 40014 / 40001, like the real services.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::robots::wecom_errcode;
use crate::{Sim, apply_fault, credential, hang as hang_for};

pub fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/wecom/cgi-bin/gettoken", get(wecom_token))
        .route("/wecom/cgi-bin/message/send", post(wecom_send))
        .route("/wechat/cgi-bin/stable_token", post(wechat_token))
        .route("/wechat/cgi-bin/message/template/send", post(wechat_send))
}

const WECOM: &str = "wecom_app";
const WECHAT: &str = "wechat";
/// The WeCom app the simulator knows.
pub const AGENT_ID: i64 = 1000002;

async fn wecom_token(
    State(sim): State<Arc<Sim>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    sim.count_request(&format!("{WECOM}-token"));
    if q.get("corpid") != Some(&credential("HERALD_SIM_WECOM_CORP_ID")) {
        return wecom_errcode(40013, "invalid corpid");
    }
    if q.get("corpsecret") != Some(&credential("HERALD_SIM_WECOM_CORP_SECRET")) {
        return wecom_errcode(40001, "invalid credential");
    }
    Json(json!({"errcode": 0, "errmsg": "ok", "access_token": sim.token(WECOM, false), "expires_in": 7200})).into_response()
}

/// Token check shared by both APIs: `Err((errcode, errmsg))` when refused.
fn check_token(
    sim: &Sim,
    provider: &str,
    q: &HashMap<String, String>,
    unknown: (i64, &'static str),
) -> Result<(), (i64, &'static str)> {
    match q.get("access_token") {
        None => Err((41001, "access_token missing")),
        Some(t) if sim.token_valid(provider, t) => Ok(()),
        Some(t) if sim.token_known(provider, t) => Err((42001, "access_token expired")),
        Some(_) => Err(unknown),
    }
}

async fn wecom_send(
    State(sim): State<Arc<Sim>>,
    Query(q): Query<HashMap<String, String>>,
    Json(v): Json<Value>,
) -> Response {
    sim.count_request(WECOM);
    if let Err((code, msg)) = check_token(&sim, WECOM, &q, (40014, "invalid access_token")) {
        sim.count_rejected(WECOM);
        return wecom_errcode(code, msg);
    }
    if v["agentid"].as_i64() != Some(AGENT_ID) {
        return wecom_errcode(40056, "invalid agentid");
    }
    let content = match v["msgtype"].as_str() {
        Some("text") => v.pointer("/text/content"),
        Some("markdown") => v.pointer("/markdown/content"),
        Some(_) => return wecom_errcode(40008, "invalid message type"),
        None => return wecom_errcode(41008, "missing msgtype"),
    };
    let Some(content) = content.and_then(Value::as_str).filter(|c| !c.is_empty()) else {
        return wecom_errcode(44004, "empty content");
    };
    let users: Vec<&str> = v["touser"]
        .as_str()
        .unwrap_or_default()
        .split('|')
        .filter(|u| !u.is_empty())
        .collect();
    // Members whose id starts with `unknown` do not exist in the simulated corp.
    let (invalid, valid): (Vec<&str>, Vec<&str>) =
        users.iter().partition(|u| u.starts_with("unknown"));
    if valid.is_empty() {
        return wecom_errcode(81013, "user & party & tag all invalid");
    }
    if valid.iter().any(|u| !sim.within_limit(WECOM, u, 30)) {
        return wecom_errcode(45009, "api freq out of limit");
    }
    let hang = match apply_fault(sim.next_fault(WECOM)).await {
        Err((code, msg)) => return wecom_errcode(code.parse().unwrap_or(-1), &msg),
        Ok(h) => h,
    };
    let msgid = format!("wecom-{}", sim.next_serial());
    sim.record(
        WECOM,
        json!({"touser": valid, "msgtype": v["msgtype"], "content": content, "msgid": msgid}),
    );
    hang_for(hang).await;
    Json(json!({"errcode": 0, "errmsg": "ok", "invaliduser": invalid.join("|"), "invalidparty": "", "invalidtag": "", "unlicenseduser": "", "msgid": msgid})).into_response()
}

fn wx(code: i64, msg: &str) -> Response {
    Json(
        json!({"errcode": code, "errmsg": format!("{msg} rid: {}", uuid::Uuid::new_v4().simple())}),
    )
    .into_response()
}

async fn wechat_token(State(sim): State<Arc<Sim>>, Json(v): Json<Value>) -> Response {
    sim.count_request(&format!("{WECHAT}-token"));
    if v["grant_type"].as_str() != Some("client_credential") {
        return wx(40002, "invalid grant_type");
    }
    if v["appid"].as_str() != Some(credential("HERALD_SIM_WECHAT_APP_ID").as_str()) {
        return wx(40013, "invalid appid");
    }
    if v["secret"].as_str() != Some(credential("HERALD_SIM_WECHAT_APP_SECRET").as_str()) {
        return wx(40125, "invalid appsecret");
    }
    let fresh = v["force_refresh"].as_bool().unwrap_or(false);
    Json(json!({"access_token": sim.token(WECHAT, fresh), "expires_in": 7200})).into_response()
}

async fn wechat_send(
    State(sim): State<Arc<Sim>>,
    Query(q): Query<HashMap<String, String>>,
    Json(v): Json<Value>,
) -> Response {
    sim.count_request(WECHAT);
    if let Err((code, msg)) = check_token(
        &sim,
        WECHAT,
        &q,
        (
            40001,
            "invalid credential, access_token is invalid or not latest",
        ),
    ) {
        sim.count_rejected(WECHAT);
        return wx(code, msg);
    }
    let openid = v["touser"].as_str().unwrap_or_default();
    if !openid.starts_with('o') || openid.len() < 10 {
        return wx(40003, "invalid openid");
    }
    let Some(template) = v["template_id"].as_str().filter(|t| !t.is_empty()) else {
        return wx(40037, "invalid template_id");
    };
    let Some(data) = v["data"].as_object() else {
        return wx(47003, "argument invalid! data empty");
    };
    if let Some((k, _)) = data
        .iter()
        .find(|(_, d)| d["value"].as_str().is_none_or(str::is_empty))
    {
        return wx(47003, &format!("argument invalid! data.{k}.value empty"));
    }
    // Openids starting with `ounsub` have unfollowed the account.
    if openid.starts_with("ounsub") {
        return wx(43004, "require subscribe");
    }
    let client_msg_id = v["client_msg_id"].as_str().unwrap_or_default().to_owned();
    if !client_msg_id.is_empty()
        && !sim.fresh_nonce(WECHAT, &format!("{openid}/{client_msg_id}"), 600_000)
    {
        // The same openid + client_msg_id within 10 minutes is sent only once.
        return Json(json!({"errcode": 0, "errmsg": "ok", "msgid": 0})).into_response();
    }
    let hang = match apply_fault(sim.next_fault(WECHAT)).await {
        Err((code, msg)) => return wx(code.parse().unwrap_or(-1), &msg),
        Ok(h) => h,
    };
    let msgid = sim.next_serial() as i64 + 200_000_000;
    sim.record(WECHAT, json!({"touser": openid, "template_id": template, "client_msg_id": client_msg_id, "data": v["data"], "url": v["url"], "msgid": msgid}));
    hang_for(hang).await;
    Json(json!({"errcode": 0, "errmsg": "ok", "msgid": msgid})).into_response()
}
