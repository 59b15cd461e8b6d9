//! Every channel through the whole pipeline (gateway → accept → render → route → send →
//! deliveries/receipts → projector → read API) against the provider simulators started by
//! `scripts/stack`, with the failure rules of ops/herald.toml: retry then success, switch
//! provider then success, permanent failure with its reason, an operator alert, an unknown
//! outcome held for the receipt, SMS receipts moving status, a rate limit slowing but not
//! failing, and token revocation refreshed transparently.

use std::time::Duration;

use herald_tests::*;
use serde_json::{Value, json};

/// These share consumer groups with the other pipeline tests (another test binary): each test
/// here runs alone too.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Run {
    api: u16,
    _herald: Herald,
    http: reqwest::Client,
}

impl Run {
    async fn start(name: &str, api: u16, admin: u16) -> Run {
        let cfg = std::env::temp_dir().join(format!("herald-{name}.toml"));
        std::fs::copy(config_path(), &cfg).unwrap();
        let herald = Herald::start(&cfg, &herald_env(api, admin));
        Run::attach(api, herald).await
    }

    /// Waits for a started Herald's API and points the SMS simulators' receipts at it.
    async fn attach(api: u16, herald: Herald) -> Run {
        let run = Run {
            api,
            _herald: herald,
            http: reqwest::Client::new(),
        };
        let health = format!("http://127.0.0.1:{api}/health");
        eventually(Duration::from_secs(60), "the API answers", || {
            let (http, health) = (run.http.clone(), health.clone());
            async move { http.get(&health).send().await.ok().map(|_| ()) }
        })
        .await;
        let token = herald_simulators::credential("HERALD_SIM_CALLBACK_TOKEN");
        for (sim, code) in [
            ("aliyun", "aliyun-sim"),
            ("tencent", "tencent-sim"),
            ("huawei", "huawei-sim"),
        ] {
            let url = format!("http://127.0.0.1:{}/callbacks/{code}/{token}", api + 1);
            run.sim_put(&format!("/_control/{sim}/receipts"), json!({ "url": url }))
                .await;
        }
        run
    }

    /// SIGTERM and wait: a killed process could leave a Kafka transaction open, which stalls
    /// `read_committed` consumers of the next test until it times out.
    fn stop(mut self) {
        self._herald.signal("TERM");
        assert!(
            self._herald.wait_exit(Duration::from_secs(20)).is_some(),
            "herald drains on SIGTERM"
        );
    }

    async fn sim_put(&self, path: &str, body: Value) {
        let r = self
            .http
            .put(format!("{}{path}", sim_url()))
            .json(&body)
            .send()
            .await
            .expect("simulators up (scripts/stack up)");
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }

    /// Waits until the alert simulator received and verified an alert of `scene` for message
    /// `id` with provider code `code` (alerts leave through the outbox, after the failure).
    async fn alerted(&self, id: &str, code: &str, scene: &str) {
        let kind = format!("herald.{scene}.alert");
        eventually(
            Duration::from_secs(30),
            "alert received and verified",
            || async {
                let alerts = self.sim_log("alerts").await;
                alerts["accepted"]
                    .as_array()?
                    .iter()
                    .any(|a| {
                        a["message_id"] == id && a["response_code"] == code && a["type"] == kind
                    })
                    .then_some(())
            },
        )
        .await;
    }

    async fn fault(&self, provider: &str, fault: Value) {
        let r = self
            .http
            .post(format!("{}/_control/{provider}/faults", sim_url()))
            .json(&json!([fault]))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    /// Sends SMS until one is delivered through `provider` (routing changes within a second of
    /// a breaker's); answers that message.
    async fn sms_delivered_by(&self, provider: &str, what: &str) -> Value {
        eventually(Duration::from_secs(30), what, || async {
            let id = self.send(sms(&phone("9"))).await.remove(0);
            let v = self.until(&id, "delivered", what).await;
            (v["provider"] == provider).then_some(v)
        })
        .await
    }

    /// A provider as the next test expects it: no scripted faults left over, and open by no
    /// breaker (an earlier test may have opened it on purpose; this waits out its open period).
    async fn provider_ready(&self, sim: &str, provider: &str) {
        let r = self
            .http
            .delete(format!("{}/_control/{sim}/faults", sim_url()))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let (db, conn) = tokio_postgres::connect(&postgres(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        eventually(Duration::from_secs(60), "provider closed", || {
            let db = &db;
            async move {
                let open = db
                    .query_opt(
                        "SELECT 1 FROM provider_health WHERE provider = $1
                           AND (open_until > now() OR receipts_open_until > now())",
                        &[&provider],
                    )
                    .await
                    .ok()?;
                open.is_none().then_some(())
            }
        })
        .await;
    }

    async fn sim_log(&self, provider: &str) -> Value {
        self.http
            .get(format!("{}/_log/{provider}", sim_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// POST /v1/messages; answers the message ids.
    async fn send(&self, body: Value) -> Vec<String> {
        let bytes = serde_json::to_vec(&body).unwrap();
        let resp = signed("POST", "/v1/messages", &bytes, self.api)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(status.as_u16(), 202, "POST /v1/messages: {v}");
        v["message_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_owned())
            .collect()
    }

    /// Waits for a message to reach `status`; answers the message JSON.
    async fn until(&self, id: &str, status: &str, what: &str) -> Value {
        let path = format!("/v1/messages/{id}");
        let api = self.api;
        eventually(Duration::from_secs(60), what, || {
            let path = path.clone();
            async move {
                let v = api_json(&path, api).await?;
                (v["status"] == status).then_some(v)
            }
        })
        .await
    }
}

fn phone(suffix: &str) -> String {
    // Unique per run, valid for both SMS simulators: 139 + 7 varying digits + a 1-digit suffix.
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        % 10_000_000;
    format!("139{n:07}{suffix}")
}

fn sms(to: &str) -> Value {
    json!({
        "app_id": "demo", "channel": "SMS", "template": "verify_code",
        "params": {"code": "482913"}, "recipients": [{"address": to}], "priority": "HIGH",
        "requested_at": herald_core::util::now_ms(),
    })
}

fn timeline_has(v: &Value, status: &str) -> bool {
    v["timeline"]
        .as_array()
        .is_some_and(|t| t.iter().any(|e| e["status"] == status))
}

fn reason_codes(v: &Value) -> Vec<String> {
    v["timeline"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|e| e["reason"]["code"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn sms_rules_receipts_and_the_unknown_outcome_policy() {
    let _serial = SERIAL.lock().await;
    let run = Run::start("channels-sms", 18_300, 19_700).await;
    run.provider_ready("aliyun", "aliyun-sim").await;

    // Success: `sent` on the provider's acceptance, `delivered` when the SmsReport arrives.
    let ok = run.send(sms(&phone("1"))).await.remove(0);
    let v = run
        .until(&ok, "delivered", "SMS delivered by receipt")
        .await;
    assert_eq!(v["provider"], "aliyun-sim");
    assert!(timeline_has(&v, "sent"), "{v}");
    let accepted = run.sim_log("aliyun").await;
    assert!(
        accepted["accepted"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["out_id"] == ok.as_str() && a["template_param"] == r#"{"code":"482913"}"#),
        "the simulator got OutId = message id and the rendered params"
    );

    // A receipt saying the handset never got it.
    let lost = run.send(sms(&format!("1390000{}", "0000"))).await.remove(0);
    let v = run
        .until(&lost, "undelivered", "SMS undelivered by receipt")
        .await;
    assert!(reason_codes(&v).contains(&"MK:0001".to_owned()), "{v}");

    // Transient provider error → rule "retry" → second attempt succeeds.
    run.fault(
        "aliyun",
        json!({"kind": "error", "code": "isp.SYSTEM_ERROR", "message": "system error"}),
    )
    .await;
    let retried = run.send(sms(&phone("2"))).await.remove(0);
    let v = run
        .until(&retried, "delivered", "retried SMS delivered")
        .await;
    assert_eq!(v["attempts"], 2, "{v}");
    assert!(timeline_has(&v, "retry_scheduled"), "{v}");
    // Each attempt is a row: outcome, provider response code, latency.
    let path = format!("/v1/messages/{retried}");
    let api = run.api;
    let v = eventually(Duration::from_secs(30), "both attempts projected", || {
        let path = path.clone();
        async move {
            let v = api_json(&path, api).await?;
            (v["delivery_attempts"].as_array()?.len() == 2).then_some(v)
        }
    })
    .await;
    let a = &v["delivery_attempts"];
    assert_eq!(a[0]["outcome"], "FAILED_TRANSIENT", "{v}");
    assert_eq!(a[0]["response_code"], "isp.SYSTEM_ERROR", "{v}");
    assert_eq!(a[1]["outcome"], "SUCCEEDED", "{v}");
    assert_eq!(a[1]["response_code"], "OK", "{v}");
    assert!(a[1]["latency_ms"].is_i64(), "{v}");

    // Balance exhausted → rule "switch_provider" → Tencent sends it; its receipt (matched by
    // SerialNo) delivers it.
    run.fault(
        "aliyun",
        json!({"kind": "error", "code": "isv.AMOUNT_NOT_ENOUGH", "message": "账户余额不足"}),
    )
    .await;
    let switched = run.send(sms(&phone("3"))).await.remove(0);
    let v = run
        .until(&switched, "delivered", "switched SMS delivered")
        .await;
    assert_eq!(v["provider"], "tencent-sim", "{v}");
    let tencent = run.sim_log("tencent").await;
    assert!(
        tencent["accepted"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["session_context"] == switched.as_str() && a["template_id"] == "1110"),
        "Tencent got its own template id and SessionContext = message id: {tencent}"
    );

    // A permanent error fails the message with the provider's reason.
    run.fault("aliyun", json!({"kind": "error", "code": "isv.MOBILE_NUMBER_ILLEGAL", "message": "invalid mobile number"}))
        .await;
    let bad = run.send(sms(&phone("4"))).await.remove(0);
    let v = run.until(&bad, "failed", "permanent failure").await;
    assert!(
        reason_codes(&v).contains(&"isv.MOBILE_NUMBER_ILLEGAL".to_owned()),
        "{v}"
    );
    assert_eq!(v["attempts"], 1);

    // A revoked signature fails the message and alerts the operator (signed webhook).
    run.fault(
        "aliyun",
        json!({"kind": "error", "code": "isv.SMS_SIGNATURE_ILLEGAL", "message": "签名不合法"}),
    )
    .await;
    let alerted = run.send(sms(&phone("5"))).await.remove(0);
    run.until(&alerted, "failed", "alerted failure").await;
    // Alerts leave through the outbox: they arrive shortly after the failure.
    run.alerted(&alerted, "isv.SMS_SIGNATURE_ILLEGAL", "send_failure")
        .await;

    // The provider takes the request but the answer never comes (timeout): not resent; SMS's
    // policy holds it in `sent` and the receipt decides.
    run.fault("aliyun", json!({"kind": "timeout", "ms": 3000}))
        .await;
    let unknown = run.send(sms(&phone("6"))).await.remove(0);
    run.until(&unknown, "delivered", "unknown outcome resolved by receipt")
        .await;
    // The receipt may overtake the attempt's own (timed-out) record; both end in the timeline.
    let path = format!("/v1/messages/{unknown}");
    let api = run.api;
    let v = eventually(
        Duration::from_secs(30),
        "the timed-out attempt recorded",
        || {
            let path = path.clone();
            async move {
                let v = api_json(&path, api).await?;
                reason_codes(&v)
                    .contains(&"timeout".to_owned())
                    .then_some(v)
            }
        },
    )
    .await;
    assert_eq!(v["status"], "delivered", "{v}");
    assert_eq!(v["attempts"], 1, "never resent: {v}");

    // Cancel: a scheduled message canceled before it is due never fires; one that was sent
    // cannot be canceled (409).
    let due = herald_core::util::now_ms() + 3_000;
    let mut later = sms(&phone("8"));
    later["send_at"] = json!(due);
    let canceled = run.send(later.clone()).await.remove(0);
    later["recipients"] = json!([{"address": phone("9")}]);
    later["send_at"] = json!(due + 1_000);
    let control = run.send(later).await.remove(0);
    run.until(&canceled, "scheduled", "scheduled message visible")
        .await;
    let resp = signed(
        "POST",
        &format!("/v1/messages/{canceled}/cancel"),
        b"",
        run.api,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["canceled"], 1, "{body}");
    run.until(&canceled, "canceled", "message canceled").await;
    // The control message was due a second later: once it is delivered, the canceled one
    // would have fired too.
    run.until(&control, "delivered", "control message delivered")
        .await;
    let v = api_json(&format!("/v1/messages/{canceled}"), run.api)
        .await
        .unwrap();
    assert_eq!(v["status"], "canceled", "{v}");
    let aliyun = run.sim_log("aliyun").await;
    assert!(
        !aliyun["accepted"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["out_id"] == canceled.as_str()),
        "a canceled message never reaches the provider"
    );
    let resp = signed("POST", &format!("/v1/messages/{ok}/cancel"), b"", run.api)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        409,
        "too late to cancel a delivered message"
    );
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "too_late");

    // Aliyun breaks down: its breaker opens and new messages are routed to Tencent directly.
    for _ in 0..12 {
        run.fault(
            "aliyun",
            json!({"kind": "error", "code": "isp.SYSTEM_ERROR", "message": "system error"}),
        )
        .await;
    }
    let broken: Vec<Value> = (0..8)
        .map(|i| json!({"address": phone(&i.to_string())}))
        .collect();
    let mut storm = sms("");
    storm["recipients"] = Value::Array(broken);
    let storm_ids = run.send(storm).await;
    let db = {
        let (c, conn) = tokio_postgres::connect(&postgres(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    };
    eventually(Duration::from_secs(30), "aliyun-sim's breaker open", || async {
        let row = db
            .query_opt(
                "SELECT 1 FROM provider_health WHERE provider = 'aliyun-sim' AND open_until > now()",
                &[],
            )
            .await
            .ok()?;
        row.map(|_| ())
    })
    .await;
    let skipped = run
        .sms_delivered_by("tencent-sim", "a new SMS routed around the open breaker")
        .await;
    assert_eq!(skipped["attempts"], 1, "{skipped}");
    assert!(
        skipped["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["status"] == "routed" && e["provider"] == "tencent-sim"),
        "routed to tencent-sim in the first place: {skipped}"
    );
    // Nothing lost in the storm: every message ends delivered (retries, then the other provider).
    for id in &storm_ids {
        run.until(id, "delivered", "storm message delivered").await;
    }
    // The storm's unused faults are not the next test's.
    run.provider_ready("aliyun", "aliyun-sim").await;
    run.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn robots_tokens_inbox_and_rate_limits_through_the_pipeline() {
    let _serial = SERIAL.lock().await;
    let run = Run::start("channels-im", 18_320, 19_720).await;
    let now = herald_core::util::now_ms();
    let tag = unique("run");

    // DingTalk markdown through a template; a robot limit of 2 per 3 s slows five messages down
    // (rate-limited answers are retried through the delay tier) but fails none.
    run.sim_put(
        "/_control/dingtalk/limit",
        json!({"per_minute": 2, "window_ms": 3000}),
    )
    .await;
    let ids = run
        .send(json!({
            "app_id": "demo", "channel": "DINGTALK", "template": "alert",
            "params": {"title": "Disk full", "body": tag},
            "recipients": [{"address": "@all"}, {"address": "-"}, {"address": "13800000000"}, {"address": "-"}, {"address": "-"}],
            "requested_at": now,
        }))
        .await;
    let mut retried = 0;
    for id in &ids {
        let v = run
            .until(
                id,
                "delivered",
                "DingTalk message delivered despite the limit",
            )
            .await;
        if v["attempts"].as_i64().unwrap_or(0) > 1 {
            retried += 1;
        }
    }
    assert!(retried >= 1, "the limit was hit and absorbed by retries");
    run.sim_put("/_control/dingtalk/limit", json!({"per_minute": 20}))
        .await;
    let ding = run.sim_log("dingtalk").await;
    let ours = ding["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["content"].as_str().is_some_and(|c| c.contains(&tag)))
        .count();
    assert_eq!(ours, 5, "each message reached the robot exactly once");

    // Feishu allows 5 requests/s (simulated as at most 10 in any 1 s); Herald's token bucket
    // (rate_limit_per_sec = 5) paces twenty messages so that none is refused.
    run.sim_put(
        "/_control/feishu/limit",
        json!({"per_minute": 10, "window_ms": 1000}),
    )
    .await;
    let many: Vec<Value> = (0..20).map(|_| json!({"address": "-"})).collect();
    let paced = run
        .send(json!({"app_id": "demo", "channel": "FEISHU", "content": {"text": format!("paced {tag}")},
                     "recipients": many, "requested_at": now}))
        .await;
    for id in &paced {
        let v = run
            .until(id, "delivered", "paced Feishu message delivered")
            .await;
        assert_eq!(v["attempts"], 1, "paced, never refused: {v}");
    }
    run.sim_put("/_control/feishu/limit", json!({"per_minute": 100}))
        .await;

    // Feishu with inline content.
    let f = run
        .send(json!({"app_id": "demo", "channel": "FEISHU", "content": {"text": format!("deploy done {tag}")},
                     "recipients": [{"address": "-"}], "requested_at": now}))
        .await
        .remove(0);
    run.until(&f, "delivered", "Feishu delivered").await;

    // WeCom app message; then WeCom revokes the token and the next message still goes out.
    let wecom = |text: String| {
        json!({"app_id": "demo", "channel": "WECOM", "content": {"text": text},
               "recipients": [{"address": "zhangsan"}], "requested_at": now})
    };
    let w1 = run.send(wecom(format!("one {tag}"))).await.remove(0);
    let v = run
        .until(&w1, "delivered", "WeCom app message delivered")
        .await;
    assert_eq!(v["provider"], "wecom-app-sim");
    let before = run.sim_log("wecom_app").await["tokens_issued"]
        .as_i64()
        .unwrap();
    run.http
        .post(format!("{}/_control/wecom_app/revoke", sim_url()))
        .send()
        .await
        .unwrap();
    let w2 = run.send(wecom(format!("two {tag}"))).await.remove(0);
    let v = run
        .until(&w2, "delivered", "WeCom message after revocation delivered")
        .await;
    assert_eq!(v["attempts"], 1, "refreshed inside the attempt: {v}");
    assert_eq!(
        run.sim_log("wecom_app").await["tokens_issued"]
            .as_i64()
            .unwrap(),
        before + 1
    );

    // WeChat template message: data and URL from the template's provider params.
    let wx = run
        .send(json!({"app_id": "demo", "channel": "WECHAT", "template": "order_shipped",
                     "params": {"order": tag}, "recipients": [{"address": "oWECHATUSER0001"}], "requested_at": now}))
        .await
        .remove(0);
    run.until(&wx, "delivered", "WeChat template message delivered")
        .await;
    let log = run.sim_log("wechat").await;
    assert!(
        log["accepted"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["client_msg_id"] == wx.as_str()
                && a["data"]["thing1"]["value"] == tag.as_str()
                && a["url"] == format!("https://example.com/orders/{tag}").as_str()),
        "{log}"
    );

    // In-app: a client connected to the live stream gets the message pushed; the inbox lists it
    // unread until it is marked read.
    let user = unique("user");
    let stream_path = format!("/v1/inbox/{user}/stream");
    let mut live = signed("GET", &stream_path, b"", run.api)
        .send()
        .await
        .unwrap();
    assert_eq!(live.status().as_u16(), 200);
    let inapp = run
        .send(json!({"app_id": "demo", "channel": "INAPP", "template": "notice",
                     "params": {"title": "Welcome", "body": tag}, "recipients": [{"address": user}], "requested_at": now}))
        .await
        .remove(0);
    let pushed = tokio::time::timeout(Duration::from_secs(60), async {
        let mut seen = String::new();
        while let Ok(Some(chunk)) = live.chunk().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains(&inapp) {
                return seen;
            }
        }
        seen
    })
    .await
    .expect("pushed over SSE within 60 s");
    assert!(
        pushed.contains("event: message") && pushed.contains(&tag),
        "{pushed}"
    );
    run.until(&inapp, "delivered", "in-app message delivered")
        .await;
    let inbox = api_json(&format!("/v1/inbox/{user}"), run.api)
        .await
        .unwrap();
    assert_eq!(inbox["unread"], 1, "{inbox}");
    assert_eq!(inbox["messages"][0]["title"], "Welcome");
    let read = signed(
        "POST",
        &format!("/v1/inbox/{user}/{inapp}/read"),
        b"",
        run.api,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(read.status().as_u16(), 200);
    let inbox = api_json(&format!("/v1/inbox/{user}"), run.api)
        .await
        .unwrap();
    assert_eq!(inbox["unread"], 0, "{inbox}");
    assert_eq!(inbox["messages"][0]["read"], true);
    drop(live);
    run.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_requests_and_a_thousand_receiver_batch() {
    let _serial = SERIAL.lock().await;
    let run = Run::start("channels-batch", 18_340, 19_740).await;
    let now = herald_core::util::now_ms();

    // The same Idempotency-Key twice: the second POST answers the first request, publishes
    // nothing.
    let key = unique("idem");
    let body = json!({"app_id": "demo", "channel": "INAPP", "template": "notice",
                      "params": {"title": "Once", "body": "only once"},
                      "recipients": [{"address": unique("u")}, {"address": unique("u")}], "requested_at": now});
    let bytes = serde_json::to_vec(&body).unwrap();
    let post = || {
        signed("POST", "/v1/messages", &bytes, run.api)
            .header("Idempotency-Key", key.as_str())
            .send()
    };
    let first = post().await.unwrap();
    assert_eq!(first.status().as_u16(), 202);
    let first: Value = first.json().await.unwrap();
    let again = post().await.unwrap();
    assert_eq!(
        again.status().as_u16(),
        200,
        "a replayed key is not a new request"
    );
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["request_id"], first["request_id"]);
    assert_eq!(again["message_ids"], first["message_ids"]);
    assert_eq!(again["duplicate"], true);
    for id in first["message_ids"].as_array().unwrap() {
        run.until(
            id.as_str().unwrap(),
            "delivered",
            "idempotent request delivered",
        )
        .await;
    }

    // The same request published to Kafka twice (an upstream retry): accepted once.
    let metrics = || async {
        reqwest::get("http://127.0.0.1:19740/metrics")
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("herald_accept_duplicate_requests_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = metrics().await;
    let req = herald_schemas::SendRequested {
        request_id: unique("replayed"),
        app_id: "demo".into(),
        idempotency_key: None,
        channel: herald_schemas::Channel::Inapp,
        template: Some("notice".into()),
        params: [
            ("title".to_owned(), "Replay".to_owned()),
            ("body".to_owned(), "x".to_owned()),
        ]
        .into(),
        recipients: vec![herald_schemas::Recipient {
            address: unique("u"),
            params: Default::default(),
            timezone: None,
        }],
        content: None,
        send_at: None,
        priority: herald_schemas::Priority::Normal,
        expires_at: None,
        metadata: Default::default(),
        requested_at: now,
    };
    publish_on("kafka", std::slice::from_ref(&req)).await;
    publish_on("kafka", std::slice::from_ref(&req)).await;
    let mid = herald_core::util::message_id("demo", &req.request_id, 0);
    run.until(&mid, "delivered", "replayed request delivered")
        .await;
    eventually(
        Duration::from_secs(30),
        "the replay counted as a duplicate",
        || async { (metrics().await >= before + 1.0).then_some(()) },
    )
    .await;

    // One request, 1,000 receivers: 1,000 messages, all in one request-status answer.
    let recipients: Vec<Value> = (0..1000)
        .map(|i| json!({"address": format!("bulk-{i}")}))
        .collect();
    let ids = run
        .send(json!({"app_id": "demo", "channel": "INAPP", "template": "notice",
                     "params": {"title": "Bulk", "body": "hello"}, "recipients": recipients, "requested_at": now}))
        .await;
    assert_eq!(ids.len(), 1000);
    let rid = {
        let v = eventually(
            Duration::from_secs(60),
            "first bulk message projected",
            || async {
                api_json(&format!("/v1/messages/{}", ids[0]), run.api)
                    .await
                    .filter(|v| v["request_id"].is_string())
            },
        )
        .await;
        v["request_id"].as_str().unwrap().to_owned()
    };
    let path = format!("/v1/requests/{rid}?limit=1000");
    let api = run.api;
    let v = eventually(Duration::from_secs(120), "all 1,000 delivered", || {
        let path = path.clone();
        async move {
            let v = api_json(&path, api).await?;
            (v["counts"]["delivered"] == 1000).then_some(v)
        }
    })
    .await;
    assert_eq!(v["total"], 1000);
    assert_eq!(v["messages"].as_array().unwrap().len(), 1000);
    assert!(v["next_cursor"].is_null());
    let mut got: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    got.sort_unstable();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(got, want);

    // Stats over the last minutes: the batch shows up as in-app volume with its success rate.
    let stats = api_json(
        &format!("/v1/stats?from={}&group_by=channel", now - 120_000),
        run.api,
    )
    .await
    .unwrap();
    let inapp = stats["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "inapp")
        .cloned()
        .unwrap_or_else(|| panic!("{stats}"));
    assert!(inapp["total"].as_i64().unwrap() >= 1000, "{stats}");
    assert!(inapp["delivered"].as_i64().unwrap() >= 1000, "{stats}");
    assert!(inapp["p99_ms"].as_f64().is_some(), "{stats}");
    let bad = signed("GET", "/v1/stats?group_by=color", b"", run.api)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);

    // A receiver's history, newest first, paginated.
    let user = unique("hist");
    let mut sent = Vec::new();
    for i in 0..3 {
        let id = run
            .send(json!({"app_id": "demo", "channel": "INAPP", "template": "notice",
                         "params": {"title": format!("n{i}"), "body": "b"}, "recipients": [{"address": user}],
                         "requested_at": herald_core::util::now_ms()}))
            .await
            .remove(0);
        run.until(&id, "delivered", "history message delivered")
            .await;
        sent.push(id);
    }
    let page1 = api_json(&format!("/v1/recipients/{user}/messages?limit=2"), run.api)
        .await
        .unwrap();
    let ids1: Vec<&str> = page1["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids1,
        [sent[2].as_str(), sent[1].as_str()],
        "newest first: {page1}"
    );
    let cursor = page1["next_cursor"].as_str().unwrap();
    let page2 = api_json(
        &format!("/v1/recipients/{user}/messages?limit=2&cursor={cursor}"),
        run.api,
    )
    .await
    .unwrap();
    assert_eq!(
        page2["messages"][0]["message_id"],
        sent[0].as_str(),
        "{page2}"
    );
    assert!(page2["next_cursor"].is_null());
    run.stop();
}

fn hms(ms: i64) -> String {
    let secs = (ms / 1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

#[tokio::test(flavor = "multi_thread")]
async fn policies_hold_with_two_route_workers() {
    let _serial = SERIAL.lock().await;
    // Quiet hours computed from now (UTC): Feishu is quiet until ~30 s from now (hold), DingTalk
    // for the next hour (drop).
    let now = herald_core::util::now_ms();
    let quiet_end = now + 30_000;
    let cfg = std::env::temp_dir().join("herald-channels-policies.toml");
    let mut text = std::fs::read_to_string(config_path()).unwrap();
    text.push_str(&format!(
        r#"
[[policies]]
channel = "FEISHU"
quiet_hours = {{ start = "{}", end = "{}", mode = "hold" }}

[[policies]]
channel = "DINGTALK"
quiet_hours = {{ start = "{}", end = "{}", mode = "drop" }}
"#,
        hms(now - 60_000),
        hms(quiet_end),
        hms(now - 60_000),
        hms(now + 3_600_000),
    ));
    std::fs::write(&cfg, text).unwrap();
    let (api, admin) = (18_360, 19_760);
    let herald = Herald::start(&cfg, &herald_env(api, admin));
    // A second process running only the route stage: two route workers share the partitions.
    let mut env2 = herald_env(api + 10, admin + 10);
    env2.retain(|(k, _)| *k != "HERALD_INSTANCE");
    env2.push(("HERALD_INSTANCE", unique("route2")));
    let second = Herald::start_with(&cfg, &env2, &["--stages", "route"], "route2.");
    let run = Run::attach(api, herald).await;

    // Frequency cap: at most 3 SMS per phone per hour; the 4th (different text) is suppressed.
    let capped = phone("1");
    let mut ids = Vec::new();
    for code in ["111111", "222222", "333333", "444444"] {
        let mut body = sms(&capped);
        body["params"]["code"] = json!(code);
        ids.extend(run.send(body).await);
    }
    let mut statuses = Vec::new();
    for id in &ids {
        let path = format!("/v1/messages/{id}");
        let v = eventually(Duration::from_secs(60), "capped SMS final", || {
            let path = path.clone();
            async move {
                let v = api_json(&path, api).await?;
                (v["status"] == "delivered" || v["status"] == "suppressed").then_some(v)
            }
        })
        .await;
        statuses.push(v);
    }
    let suppressed: Vec<&Value> = statuses
        .iter()
        .filter(|v| v["status"] == "suppressed")
        .collect();
    assert_eq!(
        suppressed.len(),
        1,
        "exactly one over the cap: {statuses:?}"
    );
    assert!(reason_codes(suppressed[0]).contains(&"frequency_cap".to_owned()));

    // Content dedup: the same text twice to one phone within a minute.
    let twice = phone("2");
    let a = run.send(sms(&twice)).await.remove(0);
    run.until(&a, "delivered", "first of two identical SMS delivered")
        .await;
    let b = run.send(sms(&twice)).await.remove(0);
    let v = run
        .until(&b, "suppressed", "identical SMS suppressed")
        .await;
    assert!(
        reason_codes(&v).contains(&"duplicate_content".to_owned()),
        "{v}"
    );

    // Opt-out, then opt back in.
    let leaving = phone("3");
    let put = signed("PUT", &format!("/v1/opt-outs/sms/{leaving}"), b"", api)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 200);
    let out = run.send(sms(&leaving)).await.remove(0);
    let v = run
        .until(&out, "suppressed", "opted-out SMS suppressed")
        .await;
    assert!(reason_codes(&v).contains(&"opted_out".to_owned()), "{v}");
    let del = signed("DELETE", &format!("/v1/opt-outs/sms/{leaving}"), b"", api)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status().as_u16(), 200);
    let mut again = sms(&leaving);
    again["params"]["code"] = json!("999999");
    let back = run.send(again).await.remove(0);
    run.until(&back, "delivered", "opted back in").await;

    // Quiet hours, drop: a NORMAL DingTalk message is suppressed; a HIGH one goes out.
    let ding = |priority: &str| {
        json!({"app_id": "demo", "channel": "DINGTALK", "content": {"text": "night"}, "priority": priority,
               "recipients": [{"address": "-"}], "requested_at": herald_core::util::now_ms()})
    };
    let dropped = run.send(ding("NORMAL")).await.remove(0);
    let v = run.until(&dropped, "suppressed", "quiet-hours drop").await;
    assert!(reason_codes(&v).contains(&"quiet_hours".to_owned()), "{v}");
    let urgent = run.send(ding("HIGH")).await.remove(0);
    run.until(&urgent, "delivered", "HIGH ignores quiet hours")
        .await;

    // Quiet hours, hold: held in the delay tier, released when the window ends.
    let held = run
        .send(json!({"app_id": "demo", "channel": "FEISHU", "content": {"text": "after quiet"},
                     "recipients": [{"address": "-"}], "requested_at": herald_core::util::now_ms()}))
        .await
        .remove(0);
    let v = run
        .until(&held, "delivered", "held message released after the window")
        .await;
    let delivered_at = event_at(&v, "delivered").expect("delivered in the timeline");
    assert!(
        delivered_at >= quiet_end - 1_000,
        "not sent inside the quiet window: {v}"
    );
    assert!(
        reason_codes(&v).contains(&"quiet_hours".to_owned()),
        "the hold is in the timeline: {v}"
    );
    drop(second);
    run.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn weights_split_four_thousand_messages_three_to_one() {
    let _serial = SERIAL.lock().await;
    // Two in-app providers weighted 3:1 in the same priority group.
    let cfg = std::env::temp_dir().join("herald-channels-weights.toml");
    let text = std::fs::read_to_string(config_path()).unwrap().replace(
        "code = \"inbox\"\nkind = \"inapp\"",
        "code = \"inbox\"\nkind = \"inapp\"\nweight = 3\n\n[[providers]]\ncode = \"inbox-b\"\nkind = \"inapp\"\nweight = 1",
    );
    assert!(text.contains("inbox-b"), "config layout changed");
    std::fs::write(&cfg, text).unwrap();
    let (api, admin) = (18_380, 19_780);
    let run = Run::attach(api, Herald::start(&cfg, &herald_env(api, admin))).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let recipients: Vec<Value> = (0..1000).map(|_| json!({"address": unique("w")})).collect();
        ids.extend(
            run.send(
                json!({"app_id": "demo", "channel": "INAPP", "template": "notice",
                             "params": {"title": "w", "body": "w"}, "recipients": recipients,
                             "requested_at": herald_core::util::now_ms()}),
            )
            .await,
        );
    }
    let (db, conn) = tokio_postgres::connect(&postgres(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let counts = eventually(Duration::from_secs(120), "4,000 in-app messages delivered", || async {
        let rows = db
            .query(
                "SELECT provider, count(*) FROM messages WHERE message_id = ANY($1) AND status = 'delivered'
                 GROUP BY provider",
                &[&ids],
            )
            .await
            .ok()?;
        let m: std::collections::HashMap<String, i64> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        (m.values().sum::<i64>() == 4000).then_some(m)
    })
    .await;
    let a = counts.get("inbox").copied().unwrap_or(0) as f64;
    assert!(
        (a / 4000.0 - 0.75).abs() <= 0.02,
        "3:1 within ±2%: {counts:?}"
    );
    run.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn app_rate_limits_quotas_and_nonces_across_api_processes() {
    let _serial = SERIAL.lock().await;
    let cfg = std::env::temp_dir().join("herald-channels-limits.toml");
    let mut text = std::fs::read_to_string(config_path()).unwrap();
    text = text.replacen(
        "[[apps]]",
        "[[apps]]\nid = \"limited\"\nsecret_env = \"HERALD_APP_LIMITED_SECRET\"\nrate_limit_per_sec = 2\ndaily_quota = 5\n\n[[apps]]",
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    // A fresh day's usage for the test app.
    let (db, conn) = tokio_postgres::connect(&postgres(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let _ = db
        .execute("DELETE FROM app_usage WHERE app_id = 'limited'", &[])
        .await;
    let secret = "limited-secret";
    let mut env = herald_env(18_400, 19_800);
    env.push(("HERALD_APP_LIMITED_SECRET", secret.to_owned()));
    let run = Run::attach(18_400, Herald::start(&cfg, &env)).await;
    // A second API process on another port.
    let mut env2 = herald_env(18_410, 19_810);
    env2.push(("HERALD_APP_LIMITED_SECRET", secret.to_owned()));
    env2.retain(|(k, _)| *k != "HERALD_INSTANCE");
    env2.push(("HERALD_INSTANCE", unique("api2")));
    let _second = Herald::start_with(&cfg, &env2, &["--stages", "api"], "api2.");
    eventually(Duration::from_secs(60), "second API up", || async {
        reqwest::get("http://127.0.0.1:18410/health")
            .await
            .ok()
            .map(|_| ())
    })
    .await;

    let body = |n: usize| {
        let recipients: Vec<Value> = (0..n).map(|_| json!({"address": unique("q")})).collect();
        serde_json::to_vec(
            &json!({"channel": "INAPP", "template": "notice", "params": {"title": "t", "body": "b"},
                                   "recipients": recipients}),
        )
        .unwrap()
    };
    let post = |n: usize| {
        let b = body(n);
        async move {
            signed_as("limited", secret, "POST", "/v1/messages", &b, 18_400)
                .send()
                .await
                .unwrap()
        }
    };

    // A request signed once, replayed against the other API process: refused there too.
    let once = body(1);
    let a = signed_as("limited", secret, "POST", "/v1/messages", &once, 18_400);
    let req = a.build().unwrap();
    let headers = req.headers().clone();
    let first = reqwest::Client::new().execute(req).await.unwrap();
    assert_eq!(first.status().as_u16(), 202);
    let replay = reqwest::Client::new()
        .post("http://127.0.0.1:18410/v1/messages")
        .headers(headers)
        .body(once.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        replay.status().as_u16(),
        401,
        "a nonce is used once across processes"
    );
    let err: Value = replay.json().await.unwrap();
    assert_eq!(err["error"]["code"], "reused_nonce", "{err}");

    // Over 2 requests/s: 429 with Retry-After.
    let mut limited = None;
    for _ in 0..4 {
        let r = post(1).await;
        if r.status().as_u16() == 429 {
            limited = Some(r);
            break;
        }
    }
    let limited = limited.expect("the rate limit answered 429");
    assert!(limited.headers().get("retry-after").is_some());
    let err: Value = limited.json().await.unwrap();
    assert_eq!(err["error"]["code"], "rate_limited");

    // The daily quota of 5 messages: a request that would pass it is refused.
    let over = eventually(Duration::from_secs(30), "quota exceeded", || async {
        let r = post(3).await;
        if r.status().as_u16() != 429 {
            return None;
        }
        let retry = r.headers().get("retry-after").is_some();
        let v: Value = r.json().await.ok()?;
        (v["error"]["code"] == "quota_exceeded" && retry).then_some(v)
    })
    .await;
    assert!(over["error"]["message"].as_str().unwrap().contains("quota"));
    let used: i64 = db
        .query_one(
            "SELECT messages FROM app_usage WHERE app_id = 'limited'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(used <= 5, "the quota is never exceeded: {used}");

    // A request published straight to Kafka (not through the gateway) is counted by accept:
    // over the quota, its messages fail with quota_exceeded.
    let direct = herald_schemas::SendRequested {
        request_id: unique("direct"),
        app_id: "limited".into(),
        idempotency_key: None,
        channel: herald_schemas::Channel::Inapp,
        template: Some("notice".into()),
        params: [
            ("title".to_owned(), "t".to_owned()),
            ("body".to_owned(), "b".to_owned()),
        ]
        .into(),
        // The whole daily quota: over it whatever the gateway's requests above left.
        recipients: (0..5)
            .map(|_| herald_schemas::Recipient {
                address: unique("d"),
                params: Default::default(),
                timezone: None,
            })
            .collect(),
        content: None,
        send_at: None,
        priority: herald_schemas::Priority::Normal,
        expires_at: None,
        metadata: Default::default(),
        requested_at: herald_core::util::now_ms(),
    };
    publish_on("kafka", std::slice::from_ref(&direct)).await;
    let mid = herald_core::util::message_id("limited", &direct.request_id, 0);
    let path = format!("/v1/messages/{mid}");
    let v = eventually(
        Duration::from_secs(60),
        "direct request over quota failed",
        || {
            let path = path.clone();
            async move {
                let v = api_json_as("limited", secret, &path, 18_400).await?;
                (v["status"] == "failed").then_some(v)
            }
        },
    )
    .await;
    assert!(
        reason_codes(&v).contains(&"quota_exceeded".to_owned()),
        "{v}"
    );
    run.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_high_message_overtakes_a_low_backlog_and_expired_ones_are_never_sent() {
    let _serial = SERIAL.lock().await;
    let (api, admin) = (18_420, 19_820);
    let run = Run::start("channels-lanes", api, admin).await;
    let tag = unique("lane");
    // 5,000 LOW Feishu messages: Feishu allows 5/s, so this backlog takes many minutes.
    let recipients: Vec<Value> = (0..5000).map(|_| json!({"address": "-"})).collect();
    let backlog = run
        .send(
            json!({"app_id": "demo", "channel": "FEISHU", "priority": "LOW",
                     "content": {"text": format!("marketing {tag}")}, "recipients": recipients,
                     "requested_at": herald_core::util::now_ms()}),
        )
        .await;
    // Wait until the backlog has been routed (it then queues in the Feishu dispatch partition of
    // recipient "-"), so what follows is really behind it.
    let rid = eventually(Duration::from_secs(120), "backlog routed", || {
        let first = format!("/v1/messages/{}", backlog[0]);
        async move {
            let rid = api_json(&first, api).await?["request_id"]
                .as_str()?
                .to_owned();
            let v = api_json(&format!("/v1/requests/{rid}?limit=1"), api).await?;
            let c = &v["counts"];
            let past_route: i64 = ["routed", "sent", "delivered", "failed"]
                .iter()
                .map(|s| c[*s].as_i64().unwrap_or(0))
                .sum();
            (past_route == 5000).then_some(rid)
        }
    })
    .await;
    // Behind it: a LOW message that expires in 3 s, and a HIGH one.
    let expires_at = herald_core::util::now_ms() + 3_000;
    let expiring = run
        .send(json!({"app_id": "demo", "channel": "FEISHU", "priority": "LOW",
                     "content": {"text": format!("expiring {tag}")}, "recipients": [{"address": "-"}],
                     "expires_at": expires_at,
                     "requested_at": herald_core::util::now_ms()}))
        .await
        .remove(0);
    let high = run
        .send(json!({"app_id": "demo", "channel": "FEISHU", "priority": "HIGH",
                     "content": {"text": format!("code 9021 {tag}")}, "recipients": [{"address": "-"}],
                     "requested_at": herald_core::util::now_ms()}))
        .await
        .remove(0);
    let v = run.until(&high, "delivered", "HIGH delivered").await;
    assert!(
        v["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["status"] == "delivered"),
        "{v}"
    );
    let req = api_json(&format!("/v1/requests/{rid}?limit=1"), api)
        .await
        .unwrap();
    let delivered = req["counts"]["delivered"].as_i64().unwrap_or(0);
    assert!(
        delivered < 5000,
        "the HIGH message did not wait for the backlog: {req}"
    );

    // Cancel the backlog (clearing it for the tests after this one too) once the expiring
    // message's time has passed: the send stage then reaches it past its expiry.
    let left = expires_at + 500 - herald_core::util::now_ms();
    if left > 0 {
        tokio::time::sleep(Duration::from_millis(left as u64)).await;
    }
    let cancel = signed("POST", &format!("/v1/requests/{rid}/cancel"), b"", api)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status().as_u16(), 200);
    let body: Value = cancel.json().await.unwrap();
    assert!(body["canceled"].as_i64().unwrap() > 0, "{body}");
    // The expiring one is never sent late.
    let v = run
        .until(&expiring, "expired", "expired in the backlog")
        .await;
    assert_eq!(v["attempts"], 0, "{v}");
    let feishu = run.sim_log("feishu").await;
    assert!(
        !feishu["accepted"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["content"]
                .as_str()
                .is_some_and(|c| c.contains(&format!("expiring {tag}")))),
        "an expired message never reaches the provider"
    );

    eventually(
        Duration::from_secs(120),
        "backlog drained after the cancel",
        || {
            let path = format!("/v1/requests/{rid}?limit=1");
            async move {
                let v = api_json(&path, api).await?;
                let c = &v["counts"];
                let done =
                    c["delivered"].as_i64().unwrap_or(0) + c["canceled"].as_i64().unwrap_or(0);
                (done == 5000).then_some(())
            }
        },
    )
    .await;
    run.stop();
}

/// Every row of the read model, as JSON text, in a stable order.
async fn read_model(db: &tokio_postgres::Client) -> (Vec<String>, Vec<String>) {
    let rows = |sql: &'static str| async move {
        db.query(sql, &[])
            .await
            .map(|rows| {
                rows.iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    (
        rows("SELECT to_jsonb(m)::text FROM messages m ORDER BY message_id").await,
        rows("SELECT to_jsonb(e)::text FROM message_events e ORDER BY event_id").await,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn rebuild_reproduces_the_read_model_exactly() {
    let _serial = SERIAL.lock().await;
    let (api, admin) = (18_440, 19_840);
    let name = "channels-rebuild";
    let run = Run::start(name, api, admin).await;

    // The served OpenAPI document matches the served routes: each documented operation exists
    // (401 without credentials, never 404/405).
    let doc: Value = reqwest::get(format!("http://127.0.0.1:{api}/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let concrete = path
                .split('/')
                .map(|seg| if seg.starts_with('{') { "x" } else { seg })
                .collect::<Vec<_>>()
                .join("/");
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let status = reqwest::Client::new()
                .request(m, format!("http://127.0.0.1:{api}{concrete}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            let want = if path.starts_with("/v1/") { 401 } else { 200 };
            assert_eq!(status, want, "{method} {path}");
        }
    }

    // Some history with retries, a provider switch and receipts.
    let mut ids = Vec::new();
    run.fault(
        "aliyun",
        json!({"kind": "error", "code": "isp.SYSTEM_ERROR", "message": "x"}),
    )
    .await;
    ids.extend(run.send(sms(&phone("1"))).await);
    run.fault(
        "aliyun",
        json!({"kind": "error", "code": "isv.AMOUNT_NOT_ENOUGH", "message": "x"}),
    )
    .await;
    ids.extend(run.send(sms(&phone("2"))).await);
    let recipients: Vec<Value> = (0..20).map(|_| json!({"address": unique("r")})).collect();
    ids.extend(
        run.send(
            json!({"app_id": "demo", "channel": "INAPP", "template": "notice",
                         "params": {"title": "t", "body": "b"}, "recipients": recipients,
                         "requested_at": herald_core::util::now_ms()}),
        )
        .await,
    );
    for id in &ids {
        run.until(id, "delivered", "history delivered").await;
    }
    run.stop();

    let (db, conn) = tokio_postgres::connect(&postgres(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let before = read_model(&db).await;
    assert!(before.0.len() >= ids.len() && !before.1.is_empty());

    let cfg = std::env::temp_dir().join(format!("herald-{name}.toml"));
    let status = std::process::Command::new(herald_bin())
        .arg("-c")
        .arg(&cfg)
        .arg("rebuild")
        .envs(herald_env(api, admin))
        .status()
        .unwrap();
    assert!(status.success(), "herald rebuild");
    assert!(
        read_model(&db).await.0.is_empty(),
        "the tables were dropped"
    );

    // Only the projector: it replays every topic from the start.
    let mut env = herald_env(api, admin);
    env.retain(|(k, _)| *k != "HERALD_INSTANCE");
    env.push(("HERALD_INSTANCE", unique("rebuild")));
    let mut projector = Herald::start_with(&cfg, &env, &["--stages", "projector"], "projector.");
    // Poll until the replay has caught up (the row counts stable for three polls). Rows other
    // tests projected from Redis Streams cannot come back from a Kafka replay, so: every row the
    // replay writes must equal the row it had before, and none of this test's messages may be
    // missing (on a fresh stack, where this runs before the Redis tests, the tables are equal).
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut prev = (usize::MAX, usize::MAX);
    let mut stable = 0;
    let after = loop {
        let now = read_model(&db).await;
        if now == before {
            break now;
        }
        let sizes = (now.0.len(), now.1.len());
        stable = if sizes == prev { stable + 1 } else { 0 };
        if stable >= 3 {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replay did not settle: {sizes:?} of {:?}",
            (before.0.len(), before.1.len())
        );
        prev = sizes;
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let key = |row: &String| -> String {
        let v: Value = serde_json::from_str(row).unwrap();
        v["message_id"].as_str().unwrap_or_default().to_owned()
            + "/"
            + v["event_id"].as_str().unwrap_or_default()
    };
    let before_rows: std::collections::HashMap<String, &String> = before
        .0
        .iter()
        .chain(&before.1)
        .map(|r| (key(r), r))
        .collect();
    for row in after.0.iter().chain(&after.1) {
        let k = key(row);
        assert_eq!(
            Some(&row),
            before_rows.get(&k),
            "a row differs after the rebuild ({k})"
        );
    }
    let replayed: std::collections::HashSet<String> = after
        .0
        .iter()
        .map(|r| {
            serde_json::from_str::<Value>(r).unwrap()["message_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for id in &ids {
        assert!(replayed.contains(id), "{id} missing after the rebuild");
    }
    eprintln!(
        "rebuild: {} of {} messages and {} of {} events replayed identically",
        after.0.len(),
        before.0.len(),
        after.1.len(),
        before.1.len()
    );
    projector.signal("TERM");
    assert!(projector.wait_exit(Duration::from_secs(20)).is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn apps_get_signed_status_webhooks_once_per_terminal_state_with_retries() {
    let _serial = SERIAL.lock().await;
    let hook = unique("app");
    let cfg = std::env::temp_dir().join("herald-channels-notify.toml");
    let text = std::fs::read_to_string(config_path()).unwrap().replacen(
        "id = \"demo\"\nsecret_env = \"HERALD_APP_DEMO_SECRET\"",
        &format!(
            "id = \"demo\"\nsecret_env = \"HERALD_APP_DEMO_SECRET\"\nstatus_url = \"{}/_hooks/{hook}\"",
            sim_url()
        ),
        1,
    );
    assert!(text.contains("status_url"), "config layout changed");
    std::fs::write(&cfg, text).unwrap();
    let (api, admin) = (18_460, 19_860);
    let run = Run::attach(api, Herald::start(&cfg, &herald_env(api, admin))).await;
    let log = format!("hooks-{hook}");
    // The app's endpoint fails twice first: the notifications are retried.
    run.fault(&log, json!({"kind": "error", "code": "500"}))
        .await;
    run.fault(&log, json!({"kind": "error", "code": "500"}))
        .await;

    let mut ids = run
        .send(
            json!({"app_id": "demo", "channel": "INAPP", "template": "notice",
                     "params": {"title": "t", "body": "b"},
                     "recipients": [{"address": unique("n")}, {"address": unique("n")}],
                     "requested_at": herald_core::util::now_ms()}),
        )
        .await;
    // A suppressed one (opted out) is terminal too.
    let out = unique("n");
    signed("PUT", &format!("/v1/opt-outs/inapp/{out}"), b"", api)
        .send()
        .await
        .unwrap();
    ids.extend(
        run.send(
            json!({"app_id": "demo", "channel": "INAPP", "template": "notice",
                         "params": {"title": "t", "body": "b"}, "recipients": [{"address": out}],
                         "requested_at": herald_core::util::now_ms()}),
        )
        .await,
    );
    // Only this test's messages count (a previous run's notifications may still be due).
    let ours = |l: &Value| -> Vec<Value> {
        l["accepted"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|e| ids.iter().any(|id| e["webhook-id"] == id.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    };
    let got = eventually(Duration::from_secs(60), "a webhook per message", || async {
        let l = run.sim_log(&log).await;
        (ours(&l).len() >= ids.len()).then_some(l)
    })
    .await;
    let entries = ours(&got);
    assert_eq!(entries.len(), ids.len(), "exactly one per message: {got}");
    assert!(
        got["requests"].as_u64().unwrap() >= ids.len() as u64 + 2,
        "two were retried"
    );
    let key = herald_core::util::webhook_key(SECRET);
    let mut statuses = std::collections::HashMap::new();
    for e in &entries {
        let body = e["body"].as_str().unwrap();
        assert!(
            herald_core::util::standard_webhook_verify(
                &key,
                e["webhook-id"].as_str().unwrap(),
                e["webhook-timestamp"].as_str().unwrap(),
                e["webhook-signature"].as_str().unwrap(),
                body.as_bytes(),
                herald_core::util::now_ms() / 1000,
                300,
            ),
            "signed with the app's secret"
        );
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["message_id"], e["webhook-id"]);
        statuses.insert(
            v["message_id"].as_str().unwrap().to_owned(),
            v["status"].as_str().unwrap().to_owned(),
        );
    }
    assert_eq!(statuses[&ids[0]], "delivered");
    assert_eq!(statuses[&ids[1]], "delivered");
    assert_eq!(statuses[&ids[2]], "suppressed");
    run.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn templates_managed_through_the_api_are_versioned_and_used() {
    let _serial = SERIAL.lock().await;
    let (api, admin) = (18_480, 19_880);
    let run = Run::start("channels-templates", api, admin).await;
    let code = unique("promo").replace('-', "_");
    let put = |text: &str| {
        let body =
            serde_json::to_vec(&json!({"channel": "INAPP", "subject": "Promo", "text": text}))
                .unwrap();
        let path = format!("/v1/templates/{code}");
        async move { signed("PUT", &path, &body, api).send().await.unwrap() }
    };
    let r = put("Hi {{ name }}").await;
    assert_eq!(r.status().as_u16(), 201);
    let v1: Value = r.json().await.unwrap();
    assert_eq!(v1["version"], 1);
    // A template that does not compile is refused with its reason.
    let bad = put("Hi {{ name ").await;
    assert_eq!(bad.status().as_u16(), 400);
    let err: Value = bad.json().await.unwrap();
    assert_eq!(err["error"]["code"], "invalid_template");

    let user = unique("t");
    let send = || {
        json!({"app_id": "demo", "channel": "INAPP", "template": code, "params": {"name": "Ada"},
               "recipients": [{"address": user}], "requested_at": herald_core::util::now_ms()})
    };
    let first = run.send(send()).await.remove(0);
    let v = run.until(&first, "delivered", "rendered with v1").await;
    assert_eq!(v["template_version"], 1, "{v}");

    let r = put("Hello {{ name }}!").await;
    let v2: Value = r.json().await.unwrap();
    assert_eq!(v2["version"], 2);
    let got = api_json(&format!("/v1/templates/{code}"), api)
        .await
        .unwrap();
    assert_eq!(got["version"], 2);
    assert_eq!(got["text"], "Hello {{ name }}!");
    let old = api_json(&format!("/v1/templates/{code}?version=1"), api)
        .await
        .unwrap();
    assert_eq!(old["text"], "Hi {{ name }}");

    // Every render worker picks the new version up (within a second): a message sent after
    // that renders with v2.
    let second = eventually(
        Duration::from_secs(30),
        "a message rendered with v2",
        || async {
            let id = run.send(send()).await.remove(0);
            let v = run.until(&id, "delivered", "rendered").await;
            (v["template_version"] == 2).then_some(id)
        },
    )
    .await;
    let inbox = api_json(&format!("/v1/inbox/{user}"), api).await.unwrap();
    let bodies: Vec<&str> = inbox["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert!(
        bodies.contains(&"Hello Ada!") && bodies.contains(&"Hi Ada"),
        "{inbox}"
    );
    let _ = second;
    run.stop();
}

/// One provider's row of the matrix: how to address a message to it, and its codes.
struct Case {
    sim: &'static str,
    provider: &'static str,
    transient: (&'static str, &'static str),
    permanent: (&'static str, &'static str),
    /// An error the rules answer with `switch_provider`, and the provider that then sends.
    switch: (&'static str, &'static str),
    backup: &'static str,
    /// An error the rules answer with `alert`.
    alert: (&'static str, &'static str),
    /// The provider's rate-limit answer: slowed down (retried later), not failed.
    limited: (&'static str, &'static str),
    /// Status after a timeout, per the channel's unknown-outcome policy.
    after_timeout: &'static str,
    body: fn(&str) -> Value,
}

/// Scripts one provider error for the case's simulator, sends a message, and waits for
/// `status`; the provider's code is in the message's reasons. Answers the message.
async fn scripted_error(run: &Run, c: &Case, (code, message): (&str, &str), status: &str) -> Value {
    run.fault(
        c.sim,
        json!({"kind": "error", "code": code, "message": message}),
    )
    .await;
    let id = run.send((c.body)(&unique("e"))).await.remove(0);
    let v = run
        .until(&id, status, &format!("{} after {code}", c.sim))
        .await;
    assert!(
        reason_codes(&v).contains(&code.to_owned()),
        "{}: {v}",
        c.sim
    );
    v
}

/// Starts Herald on ops/herald.toml with `edit` applied and `extra` appended (a test's own
/// providers and rules), as test `name`.
async fn start_edited(
    name: &str,
    (api, admin): (u16, u16),
    edit: impl Fn(String) -> String,
    extra: &str,
) -> Run {
    let cfg = std::env::temp_dir().join(format!("herald-channels-{name}.toml"));
    let base = std::fs::read_to_string(config_path()).unwrap();
    std::fs::write(&cfg, edit(base) + extra).unwrap();
    Run::attach(api, Herald::start(&cfg, &herald_env(api, admin))).await
}

/// ops/herald.toml with the SMS provider at `sim`'s endpoint (configured at priority `was`)
/// first, and Aliyun behind Tencent: the provider is reached directly, Tencent is its backup.
fn sms_first(sim: &'static str, was: u32) -> impl Fn(String) -> String {
    move |text| {
        let endpoint = format!("endpoint = \"http://127.0.0.1:18100/{sim}\"\npriority = ");
        let edited = text
            .replacen(
                "endpoint = \"http://127.0.0.1:18100/aliyun\"\npriority = 0",
                "endpoint = \"http://127.0.0.1:18100/aliyun\"\npriority = 2",
                1,
            )
            .replacen(&format!("{endpoint}{was}"), &format!("{endpoint}0"), 1);
        assert!(
            edited.contains("18100/aliyun\"\npriority = 2")
                && edited.contains(&format!("{endpoint}0")),
            "config layout changed"
        );
        edited
    }
}

/// A number the operator does not reach (the simulators' numbers ending in 0000; its own, so
/// that no other test's caps count it): the report moves the message to `undelivered` with
/// the operator's `code`.
async fn unreached_is_undelivered(run: &Run, what: &str, code: &str) {
    let unreached = format!("139{}0000", &phone("")[3..7]);
    let gone = run
        .send(json!({"app_id": "demo", "channel": "SMS", "template": "verify_code", "priority": "HIGH",
                     "params": {"code": "424242"}, "recipients": [{"address": unreached}],
                     "requested_at": herald_core::util::now_ms()}))
        .await
        .remove(0);
    let v = run.until(&gone, "undelivered", what).await;
    assert!(reason_codes(&v).contains(&code.to_owned()), "{v}");
}

/// The matrix test's additions to ops/herald.toml: a second robot / account for the channels
/// that have one provider (same simulator), and rules that switch or alert on one code each.
const MATRIX_EXTRA: &str = r#"
[[providers]]
code = "dingtalk-backup"
timeout_ms = 2000
kind = "dingtalk_robot"
endpoint = "http://127.0.0.1:18100/dingtalk/robot/send"
priority = 1
credentials_env = { access_token = "HERALD_SIM_DINGTALK_TOKEN", secret = "HERALD_SIM_DINGTALK_SECRET" }

[[providers]]
code = "feishu-backup"
timeout_ms = 2000
kind = "feishu_bot"
endpoint = "http://127.0.0.1:18100/feishu/open-apis/bot/v2/hook/0b6b5b3c-sim-feishu-hook"
priority = 1
rate_limit_per_sec = 5
credentials_env = { secret = "HERALD_SIM_FEISHU_SECRET" }

[[providers]]
code = "wechat-backup"
timeout_ms = 2000
kind = "wechat_oa"
endpoint = "http://127.0.0.1:18100/wechat"
priority = 1
credentials_env = { app_id = "HERALD_SIM_WECHAT_APP_ID", app_secret = "HERALD_SIM_WECHAT_APP_SECRET" }

[[rules]]
name = "matrix: this robot or account is gone, switch"
scene = "send_failure"
error_codes = ["300005", "19022", "93000", "48001"]
action = "switch_provider"
priority = 5

[[rules]]
name = "matrix: the operator must fix it, alert"
scene = "send_failure"
error_codes = ["310000", "19021", "44004", "47003"]
action = "alert"
action_config = { webhook_url = "http://127.0.0.1:18100/_alerts", secret_env = "HERALD_SIM_ALERT_SECRET" }
priority = 5
"#;

#[tokio::test(flavor = "multi_thread")]
async fn every_provider_through_the_pipeline_success_retry_limit_switch_alert_permanent_timeout() {
    let _serial = SERIAL.lock().await;
    // Tencent first for SMS and the WeCom robot first for WECOM, so each provider is reached
    // directly (the Aliyun and WeCom-app rows are in the other tests).
    let cfg = std::env::temp_dir().join("herald-channels-matrix.toml");
    let text = std::fs::read_to_string(config_path())
        .unwrap()
        .replacen(
            "endpoint = \"http://127.0.0.1:18100/aliyun\"\npriority = 0",
            "endpoint = \"http://127.0.0.1:18100/aliyun\"\npriority = 2",
            1,
        )
        .replacen(
            "code = \"wecom-app-sim\"\n",
            "code = \"wecom-app-sim\"\npriority = 2\n",
            1,
        )
        + MATRIX_EXTRA;
    assert!(
        text.contains("18100/aliyun\"\npriority = 2")
            && text.contains("wecom-app-sim\"\npriority = 2"),
        "config layout changed"
    );
    std::fs::write(&cfg, text).unwrap();
    let (api, admin) = (18_500, 19_900);
    let run = Run::attach(api, Herald::start(&cfg, &herald_env(api, admin))).await;
    // Tencent's switch row lands on aliyun-sim.
    run.provider_ready("aliyun", "aliyun-sim").await;
    let cases = [
        Case {
            sim: "tencent",
            provider: "tencent-sim",
            transient: ("InternalError.Timeout", "internal timeout"),
            permanent: ("FailedOperation.PhoneNumberInBlacklist", "blacklisted"),
            switch: (
                "FailedOperation.InsufficientBalanceInSmsPackage",
                "套餐包余量不足",
            ),
            backup: "aliyun-sim",
            alert: (
                "FailedOperation.SignatureIncorrectOrUnapproved",
                "签名未审批",
            ),
            limited: ("RequestLimitExceeded", "请求的次数超过了频率限制"),
            // The SerialNo of a lost answer is unknown: the message stays `sent` (held for a
            // receipt that cannot be matched), never resent.
            after_timeout: "sent",
            body: |tag| {
                json!({"app_id": "demo", "channel": "SMS", "template": "verify_code", "priority": "HIGH",
                               "params": {"code": tag.chars().filter(char::is_ascii_digit).take(6).collect::<String>()},
                               "recipients": [{"address": phone("5")}], "requested_at": herald_core::util::now_ms()})
            },
        },
        Case {
            sim: "dingtalk",
            provider: "dingtalk-sim",
            transient: ("-1", "系统繁忙"),
            permanent: ("400102", "bot is stopped"),
            switch: ("300005", "token is not exist"),
            backup: "dingtalk-backup",
            alert: ("310000", "sign not match"),
            limited: ("130101", "send too fast, exceed 20 times per minute"),
            after_timeout: "unknown",
            body: |tag| {
                json!({"app_id": "demo", "channel": "DINGTALK", "content": {"text": tag},
                               "recipients": [{"address": "-"}], "requested_at": herald_core::util::now_ms()})
            },
        },
        Case {
            sim: "feishu",
            provider: "feishu-sim",
            transient: ("11232", "frequency limited"),
            permanent: ("19024", "Key Words Not Found"),
            switch: ("19022", "Ip Not Allowed"),
            backup: "feishu-backup",
            alert: ("19021", "sign match fail"),
            limited: ("9499", "too many request"),
            after_timeout: "unknown",
            body: |tag| {
                json!({"app_id": "demo", "channel": "FEISHU", "content": {"text": tag},
                               "recipients": [{"address": "-"}], "requested_at": herald_core::util::now_ms()})
            },
        },
        Case {
            sim: "wecom_robot",
            provider: "wecom-robot-sim",
            transient: ("-1", "system busy"),
            permanent: ("40008", "invalid message type"),
            switch: ("93000", "invalid webhook url"),
            backup: "wecom-app-sim",
            alert: ("44004", "empty content"),
            limited: ("45009", "api freq out of limit"),
            after_timeout: "unknown",
            body: |tag| {
                json!({"app_id": "demo", "channel": "WECOM", "content": {"text": tag},
                               "recipients": [{"address": "@all"}], "requested_at": herald_core::util::now_ms()})
            },
        },
        Case {
            sim: "wechat",
            provider: "wechat-sim",
            transient: ("-1", "system busy"),
            permanent: ("40037", "invalid template_id"),
            switch: ("48001", "api unauthorized"),
            backup: "wechat-backup",
            alert: ("47003", "argument invalid! data.thing1.value invalid"),
            limited: ("45009", "reach max api daily quota limit"),
            // WeChat dedups on client_msg_id (= message id): resending is safe, and delivers.
            after_timeout: "delivered",
            body: |tag| {
                json!({"app_id": "demo", "channel": "WECHAT", "template": "order_shipped",
                               "params": {"order": tag}, "recipients": [{"address": "oMATRIXUSER001"}],
                               "requested_at": herald_core::util::now_ms()})
            },
        },
    ];
    for c in &cases {
        matrix_row(&run, c, api).await;
    }
    run.stop();
}

/// One provider's row of the matrix through a running Herald: success, transient → retry →
/// delivered, permanent → failed with the provider's code, rate-limited → slowed → delivered,
/// switch provider, alert, and a timeout → the channel's unknown-outcome policy with the
/// provider reached exactly once.
async fn matrix_row(run: &Run, c: &Case, api: u16) {
    // Success.
    let ok = run.send((c.body)(&unique("ok"))).await.remove(0);
    let v = run
        .until(&ok, "delivered", &format!("{} delivered", c.sim))
        .await;
    assert_eq!(v["provider"], c.provider, "{v}");
    if c.sim == "wechat" {
        // WeChat revokes the access token: the next message is still delivered, in one
        // attempt, with a fresh token.
        let tokens = run.sim_log("wechat").await["tokens_issued"]
            .as_i64()
            .unwrap_or(0);
        run.http
            .post(format!("{}/_control/wechat/revoke", sim_url()))
            .send()
            .await
            .unwrap();
        let again = run.send((c.body)(&unique("tok"))).await.remove(0);
        let v = run
            .until(&again, "delivered", "WeChat after token revocation")
            .await;
        assert_eq!(v["attempts"], 1, "{v}");
        assert_eq!(
            run.sim_log("wechat").await["tokens_issued"]
                .as_i64()
                .unwrap(),
            tokens + 1
        );
    }
    // A transient error: retried by the rules, then delivered.
    let v = scripted_error(run, c, c.transient, "delivered").await;
    assert_eq!(v["attempts"], 2, "{}: {v}", c.sim);
    // A permanent error: failed with the provider's code, not retried.
    let v = scripted_error(run, c, c.permanent, "failed").await;
    assert_eq!(v["attempts"], 1, "{}: {v}", c.sim);
    // The provider's rate limit: slowed down through the delay tier, then delivered.
    let v = scripted_error(run, c, c.limited, "delivered").await;
    let path = format!("/v1/messages/{}", v["message_id"].as_str().unwrap());
    let v = eventually(Duration::from_secs(30), "both attempts projected", || {
        let path = path.clone();
        async move {
            let v = api_json(&path, api).await?;
            (v["delivery_attempts"].as_array()?.len() == 2).then_some(v)
        }
    })
    .await;
    let first = &v["delivery_attempts"][0];
    assert_eq!(first["outcome"], "RATE_LIMITED", "{}: {v}", c.sim);
    assert_eq!(first["response_code"], c.limited.0, "{}: {v}", c.sim);
    assert!(timeline_has(&v, "retry_scheduled"), "{}: {v}", c.sim);
    // An error the rules answer with switch_provider: the next provider sends it.
    let v = scripted_error(run, c, c.switch, "delivered").await;
    assert_eq!(v["provider"], c.backup, "{}: {v}", c.sim);
    assert_eq!(v["attempts"], 2, "{}: {v}", c.sim);
    // An error the rules answer with alert: failed, and the operator is told (signed).
    let v = scripted_error(run, c, c.alert, "failed").await;
    let al = v["message_id"].as_str().unwrap().to_owned();
    run.alerted(&al, c.alert.0, "send_failure").await;
    // A timeout after the request left: unknown, handled by the channel's policy.
    let before = run.sim_log(c.sim).await["accepted"]
        .as_array()
        .map_or(0, Vec::len);
    run.fault(c.sim, json!({"kind": "timeout", "ms": 3000}))
        .await;
    let u = run.send((c.body)(&unique("u"))).await.remove(0);
    let path = format!("/v1/messages/{u}");
    let v = eventually(Duration::from_secs(60), "timeout handled", || {
        let path = path.clone();
        async move {
            let v = api_json(&path, api).await?;
            (v["status"] == c.after_timeout && reason_codes(&v).contains(&"timeout".to_owned()))
                .then_some(v)
        }
    })
    .await;
    let after = run.sim_log(c.sim).await["accepted"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(
        after,
        before + 1,
        "{}: the provider got it exactly once: {v}",
        c.sim
    );
}

/// Twenty SMS to different numbers, same template and params, through `provider` (its
/// simulator `sim`) with batching configured by `edit`: fewer calls than messages, and each
/// message delivered by its own number's receipt.
async fn sms_batch_through_the_pipeline(
    name: &str,
    (api, admin): (u16, u16),
    edit: impl Fn(String) -> String,
    sim: &str,
    provider: &str,
) -> Run {
    let cfg = std::env::temp_dir().join(format!("herald-channels-{name}.toml"));
    let base = std::fs::read_to_string(config_path()).unwrap();
    let text = edit(base.clone());
    assert_ne!(text, base, "config layout changed");
    std::fs::write(&cfg, text).unwrap();
    let run = Run::attach(api, Herald::start(&cfg, &herald_env(api, admin))).await;
    run.provider_ready(sim, provider).await;
    let before = run.sim_log(sim).await["requests"].as_u64().unwrap_or(0);
    let phones: Vec<String> = (0..20)
        .map(|i| format!("1391{:07}", (herald_core::util::now_ms() + i) % 10_000_000))
        .collect();
    let mut body = sms("");
    body["recipients"] = phones.iter().map(|p| json!({"address": p})).collect();
    let ids = run.send(body).await;
    for id in &ids {
        // Delivered by each number's receipt (Aliyun `<BizId>/<phone>`, Tencent `SerialNo`).
        let v = run
            .until(id, "delivered", "batched SMS delivered by receipt")
            .await;
        assert_eq!(v["attempts"], 1, "{v}");
        assert_eq!(v["provider"], provider, "{v}");
    }
    let calls = run.sim_log(sim).await["requests"].as_u64().unwrap() - before;
    assert!(
        calls < ids.len() as u64,
        "{} messages in {calls} calls",
        ids.len()
    );
    run
}

#[tokio::test(flavor = "multi_thread")]
async fn aliyun_sends_many_messages_per_call_with_send_batch_sms() {
    let _serial = SERIAL.lock().await;
    let aliyun = "endpoint = \"http://127.0.0.1:18100/aliyun\"\n";
    let run = sms_batch_through_the_pipeline(
        "batchsms",
        (18_520, 19_920),
        |t| t.replacen(aliyun, &format!("{aliyun}batch_max = 100\n"), 1),
        "aliyun",
        "aliyun-sim",
    )
    .await;
    let batched = run.sim_log("aliyun").await["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["batch"] == true)
        .count();
    assert!(batched >= 2, "SendBatchSms carried them: {batched}");
    run.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn tencent_sends_many_numbers_per_call_sharing_template_params() {
    let _serial = SERIAL.lock().await;
    // Tencent first (Aliyun moved to a later priority group), up to 200 numbers per call.
    let aliyun = "endpoint = \"http://127.0.0.1:18100/aliyun\"\npriority = 0\n";
    let tencent = "endpoint = \"http://127.0.0.1:18100/tencent\"\n";
    let run = sms_batch_through_the_pipeline(
        "tencent-batch",
        (18_560, 19_960),
        |t| {
            t.replacen(
                aliyun,
                "endpoint = \"http://127.0.0.1:18100/aliyun\"\npriority = 2\n",
                1,
            )
            .replacen(tencent, &format!("{tencent}batch_max = 200\n"), 1)
        },
        "tencent",
        "tencent-sim",
    )
    .await;
    run.stop();
}

/// Undelivered receipts meet the `callback_failure` rules: `switch_provider` resends through the
/// next provider, `retry` resends through the same one later, `alert` tells the operator, and no
/// rule lets the receipt stand. Receipts count toward the provider's health: a provider that
/// takes every call but delivers nothing is skipped by routing until its breaker lets it back.
#[tokio::test(flavor = "multi_thread")]
async fn undelivered_receipts_meet_the_callback_rules_and_count_toward_provider_health() {
    let _serial = SERIAL.lock().await;
    let cfg = std::env::temp_dir().join("herald-channels-callback-rules.toml");
    let breaker =
        "breaker = { failure_rate = 0.5, min_calls = 5, window_secs = 10, open_secs = 15 }";
    let base = std::fs::read_to_string(config_path()).unwrap();
    assert!(base.contains(breaker), "config layout changed");
    // aliyun-sim's breaker: the rule cases below (4 receipts) cannot open it, the next five
    // undelivered ones do; it lets traffic back after 3 s (the next test finds it closed).
    let text = base.replacen(
        breaker,
        "breaker = { failure_rate = 0.5, min_calls = 8, window_secs = 60, open_secs = 3 }",
        1,
    ) + r#"
[[rules]]
name = "validity expired at the SMSC: retry once"
scene = "callback_failure"
channel = "SMS"
error_codes = ["EXPIRED"]
action = "retry"
action_config = { max_retry = 1, delay_seconds = 1 }
priority = 20

[[rules]]
name = "blacklisted number: alert"
scene = "callback_failure"
error_codes = ["DB:0141"]
action = "alert"
action_config = { webhook_url = "http://127.0.0.1:18100/_alerts", secret_env = "HERALD_SIM_ALERT_SECRET" }
priority = 30
"#;
    std::fs::write(&cfg, text).unwrap();
    let (api, admin) = (18_540, 19_940);
    let run = Run::attach(api, Herald::start(&cfg, &herald_env(api, admin))).await;
    run.provider_ready("aliyun", "aliyun-sim").await;
    let undelivered =
        |code: &str| json!({"kind": "undelivered", "code": code, "message": "simulated"});

    // switch_provider (ops/herald.toml's receipt rule): Aliyun accepts, its receipt says the
    // carrier rejected it; Tencent delivers. The message is never `undelivered` on the way.
    run.fault("aliyun", undelivered("REJECTD")).await;
    let switched = run.send(sms(&phone("1"))).await.remove(0);
    let v = run
        .until(&switched, "delivered", "switched after the receipt")
        .await;
    assert_eq!(v["provider"], "tencent-sim", "{v}");
    assert_eq!(v["attempts"], 2, "{v}");
    assert!(!timeline_has(&v, "undelivered"), "{v}");
    assert!(reason_codes(&v).contains(&"REJECTD".to_owned()), "{v}");
    let tencent = run.sim_log("tencent").await;
    assert!(
        tencent["accepted"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["session_context"] == switched.as_str()),
        "Tencent sent it: {tencent}"
    );

    // retry: the same provider again after the rule's delay.
    run.fault("aliyun", undelivered("EXPIRED")).await;
    let retried = run.send(sms(&phone("2"))).await.remove(0);
    let v = run
        .until(&retried, "delivered", "retried after the receipt")
        .await;
    assert_eq!(v["provider"], "aliyun-sim", "{v}");
    assert_eq!(v["attempts"], 2, "{v}");
    assert!(timeline_has(&v, "retry_scheduled"), "{v}");
    let calls = run.sim_log("aliyun").await["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["out_id"] == retried.as_str())
        .count();
    assert_eq!(calls, 2, "Aliyun got it twice, once per attempt");

    // alert: the receipt stands (`undelivered`) and the operator gets a signed alert.
    run.fault("aliyun", undelivered("DB:0141")).await;
    let alerted = run.send(sms(&phone("3"))).await.remove(0);
    let v = run
        .until(&alerted, "undelivered", "undelivered with an alert")
        .await;
    assert_eq!(v["attempts"], 1, "{v}");
    let alerts_path = format!("{}/_log/alerts", sim_url());
    let alert = eventually(Duration::from_secs(30), "the callback alert", || {
        let (url, id) = (alerts_path.clone(), alerted.clone());
        async move {
            let log: Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
            log["accepted"]
                .as_array()?
                .iter()
                .find(|a| a["message_id"] == id.as_str())
                .cloned()
        }
    })
    .await;
    assert_eq!(alert["type"], "herald.callback_failure.alert", "{alert}");
    assert_eq!(alert["response_code"], "DB:0141", "{alert}");
    assert_eq!(alert["rule"], "blacklisted number: alert", "{alert}");

    // Provider health: five more undelivered receipts in the window (no rule matches them:
    // each stands) open aliyun-sim's receipt breaker; routing skips it…
    for _ in 0..5 {
        run.fault("aliyun", undelivered("UNDELIV")).await;
    }
    let mut five = sms("");
    five["recipients"] = (4..9)
        .map(|i| json!({"address": phone(&i.to_string())}))
        .collect();
    for id in run.send(five).await {
        let v = run.until(&id, "undelivered", "undelivered, no rule").await;
        assert_eq!(v["provider"], "aliyun-sim", "{v}");
        assert_eq!(v["attempts"], 1, "{v}");
    }
    let skipped = run
        .sms_delivered_by("tencent-sim", "routing skips aliyun-sim")
        .await;
    assert_eq!(
        skipped["attempts"], 1,
        "routed past it, not failed over: {skipped}"
    );
    // …until its open period ends and receipts say it delivers again.
    let back = run
        .sms_delivered_by("aliyun-sim", "aliyun-sim routed again")
        .await;
    assert_eq!(back["attempts"], 1, "{back}");
    run.stop();
}

/// Rules that switch or alert on one Huawei code each (the Huawei test puts Huawei in front
/// for SMS, Tencent then Aliyun behind it).
const HUAWEI_EXTRA: &str = r#"
[[rules]]
name = "huawei: app key no longer valid, switch"
scene = "send_failure"
error_codes = ["E000102"]
action = "switch_provider"
priority = 5

[[rules]]
name = "huawei: template deactivated, alert"
scene = "send_failure"
error_codes = ["E200030"]
action = "alert"
action_config = { webhook_url = "http://127.0.0.1:18100/_alerts", secret_env = "HERALD_SIM_ALERT_SECRET" }
priority = 5
"#;

/// The Huawei row of the provider matrix (PROVIDERS-MORE.md §4), WSSE-authenticated, and a
/// receipt moving a message `sent` → `undelivered` with the operator's code.
#[tokio::test(flavor = "multi_thread")]
async fn huawei_sms_through_the_pipeline() {
    let _serial = SERIAL.lock().await;
    let run = start_edited(
        "huawei",
        (18_560, 19_960),
        sms_first("huawei", 9),
        HUAWEI_EXTRA,
    )
    .await;
    let api = run.api;
    run.provider_ready("tencent", "tencent-sim").await;
    let case = Case {
        sim: "huawei",
        provider: "huawei-sim",
        transient: ("E000000", "系统异常"),
        permanent: ("E200028", "模板变量校验失败"),
        switch: ("E000102", "app_key无效"),
        backup: "tencent-sim",
        alert: ("E200030", "模板未激活"),
        limited: ("E200015", "待发送短信数量太大"),
        // The report names the message (`extend`): the receipt settles what the lost answer
        // left open, and nothing is sent twice.
        after_timeout: "delivered",
        body: |tag| {
            json!({"app_id": "demo", "channel": "SMS", "template": "verify_code", "priority": "HIGH",
                   "params": {"code": tag.chars().filter(char::is_ascii_digit).take(6).collect::<String>()},
                   "recipients": [{"address": phone("7")}], "requested_at": herald_core::util::now_ms()})
        },
    };
    matrix_row(&run, &case, api).await;
    // The request the simulator took: the template id, the positional parameters, the message
    // id in `extend`, the number in international form.
    let id = run
        .send(json!({"app_id": "demo", "channel": "SMS", "template": "verify_code", "priority": "HIGH",
                     "params": {"code": "424242"}, "recipients": [{"address": phone("8")}],
                     "requested_at": herald_core::util::now_ms()}))
        .await
        .remove(0);
    let v = run.until(&id, "delivered", "huawei delivered").await;
    assert!(
        timeline_has(&v, "sent"),
        "sent, then delivered by the report: {v}"
    );
    let log = run.sim_log("huawei").await;
    let taken = log["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["extend"] == id.as_str())
        .cloned()
        .expect("the simulator took it");
    assert_eq!(taken["template_id"], "8ff55eac1d0b478ab3c06c3c6a492300");
    assert_eq!(taken["params"], json!(["424242"]));
    assert!(taken["to"].as_str().unwrap().starts_with("+86"));
    unreached_is_undelivered(&run, "huawei undelivered", "UNDELIV").await;
    run.stop();
}

/// The FCM test's additions to ops/herald.toml: a second project's provider (same simulator)
/// to switch to, and rules that switch or alert on one FCM code each.
const FCM_EXTRA: &str = r#"
[[providers]]
code = "fcm-backup"
kind = "fcm"
endpoint = "http://127.0.0.1:18100/fcm"
priority = 1
timeout_ms = 2000
credentials_env = { service_account = "HERALD_SIM_FCM_SERVICE_ACCOUNT" }

[[rules]]
name = "fcm: the token belongs to another project's app, switch"
scene = "send_failure"
error_codes = ["SENDER_ID_MISMATCH"]
action = "switch_provider"
priority = 5

[[rules]]
name = "fcm: the APNs key in Firebase is wrong, alert"
scene = "send_failure"
error_codes = ["THIRD_PARTY_AUTH_ERROR"]
action = "alert"
action_config = { webhook_url = "http://127.0.0.1:18100/_alerts", secret_env = "HERALD_SIM_ALERT_SECRET" }
priority = 5
"#;

fn push(token: &str, body: &str) -> Value {
    json!({"app_id": "demo", "channel": "PUSH", "template": "push_notice", "priority": "HIGH",
           "params": {"title": "Your order", "body": body},
           "recipients": [{"address": token}], "requested_at": herald_core::util::now_ms()})
}

/// The FCM row of the provider matrix (PROVIDERS-MORE.md §1), and a dead device token: the
/// provider's `UNREGISTERED` fails the message, marks the token, and the next message to it is
/// suppressed before any provider is called; the app reads the token and revives it.
#[tokio::test(flavor = "multi_thread")]
async fn fcm_push_through_the_pipeline_and_dead_tokens_are_suppressed() {
    let _serial = SERIAL.lock().await;
    let run = start_edited("fcm", (18_620, 19_620), |t| t, FCM_EXTRA).await;
    let api = run.api;
    run.provider_ready("fcm", "fcm-sim").await;
    let case = Case {
        sim: "fcm",
        provider: "fcm-sim",
        transient: ("UNAVAILABLE", "The service is currently unavailable."),
        permanent: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
        switch: ("SENDER_ID_MISMATCH", "SenderId mismatch"),
        backup: "fcm-backup",
        alert: (
            "THIRD_PARTY_AUTH_ERROR",
            "Auth error from APNS or Web Push Service",
        ),
        limited: (
            "QUOTA_EXCEEDED",
            "Quota exceeded for quota metric 'Send requests'",
        ),
        // No receipts and no idempotency key: a lost answer is `unknown`, never resent.
        after_timeout: "unknown",
        body: |tag| push(&format!("device-{tag}"), tag),
    };
    matrix_row(&run, &case, api).await;

    // What FCM took: the notification from the template, the message id as collapse key.
    let tag = unique("taken");
    let id = run
        .send(push(&format!("device-{tag}"), &tag))
        .await
        .remove(0);
    let v = run.until(&id, "delivered", "fcm delivered").await;
    assert_eq!(v["provider"], "fcm-sim");
    let log = run.sim_log("fcm").await;
    let taken = log["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["token"] == format!("device-{tag}").as_str())
        .cloned()
        .expect("FCM took it");
    assert_eq!(
        taken["notification"],
        json!({"title": "Your order", "body": tag})
    );
    assert_eq!(taken["collapse_key"], id.as_str());
    // Push is a channel of the stats like any other.
    let stats = api_json(
        &format!(
            "/v1/stats?from={}&group_by=channel",
            herald_core::util::now_ms() - 600_000
        ),
        api,
    )
    .await
    .unwrap();
    let row = stats["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "push")
        .cloned()
        .unwrap_or_else(|| panic!("a push row: {stats}"));
    assert!(row["delivered"].as_i64().unwrap() >= 1, "{row}");

    // A token FCM no longer knows.
    let since = herald_core::util::now_ms() - 1;
    let dead = format!("unregistered-{}", unique("t"));
    let first = run.send(push(&dead, "one")).await.remove(0);
    let v = run.until(&first, "failed", "UNREGISTERED fails").await;
    assert!(reason_codes(&v).contains(&"UNREGISTERED".to_owned()), "{v}");
    assert_eq!(v["attempts"], 1, "not retried: {v}");
    let listed = eventually(Duration::from_secs(10), "the dead token listed", || {
        let path = format!("/v1/device-tokens/dead?since={since}");
        let dead = dead.clone();
        async move {
            let v = api_json(&path, api).await?;
            v["tokens"]
                .as_array()?
                .iter()
                .find(|t| t["token"] == dead.as_str())
                .cloned()
        }
    })
    .await;
    assert_eq!(
        (
            &listed["channel"],
            &listed["reason_code"],
            &listed["message_id"],
            &listed["provider"]
        ),
        (
            &json!("push"),
            &json!("UNREGISTERED"),
            &json!(first),
            &json!("fcm-sim")
        )
    );
    let calls = run.sim_log("fcm").await["requests"].as_u64().unwrap();
    let second = run.send(push(&dead, "two")).await.remove(0);
    let v = run
        .until(&second, "suppressed", "a dead token suppressed")
        .await;
    assert!(
        reason_codes(&v).contains(&"device_token_dead".to_owned()),
        "{v}"
    );
    assert_eq!(
        run.sim_log("fcm").await["requests"].as_u64().unwrap(),
        calls,
        "FCM was not called for a dead token"
    );
    // Revived by the app: the next message is sent again (and FCM still refuses it).
    let path = format!("/v1/device-tokens/dead/PUSH/{dead}");
    let resp = signed("DELETE", &path, b"", api).send().await.unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["revived"], true, "{body}");
    let third = run.send(push(&dead, "three")).await.remove(0);
    let v = run
        .until(&third, "failed", "sent again after revival")
        .await;
    assert!(reason_codes(&v).contains(&"UNREGISTERED".to_owned()), "{v}");
    run.stop();
}

/// The 掌榕网 row of the provider matrix (PROVIDERS-MORE.md §3), and its report moving a
/// message `sent` → `undelivered` with the operator's code.
#[tokio::test(flavor = "multi_thread")]
async fn zrwinfo_sms_through_the_pipeline() {
    let _serial = SERIAL.lock().await;
    let run = start_edited("zrwinfo", (18_640, 19_640), sms_first("zrwinfo", 10), "").await;
    let api = run.api;
    let token = herald_simulators::credential("HERALD_SIM_CALLBACK_TOKEN");
    run.sim_put(
        "/_control/zrwinfo/receipts",
        json!({"url": format!("http://127.0.0.1:{}/callbacks/zrwinfo-sim/{token}", api + 1)}),
    )
    .await;
    run.provider_ready("tencent", "tencent-sim").await;
    run.provider_ready("zrwinfo", "zrwinfo-sim").await;
    let case = Case {
        sim: "zrwinfo",
        provider: "zrwinfo-sim",
        transient: ("503", ""),
        permanent: ("9023", "手机号码已被列入黑名单"),
        switch: ("9010", "余额不足"),
        backup: "tencent-sim",
        alert: ("9016", "无效的签名或签名ID"),
        limited: ("9024", "手机号码超频"),
        // The lost answer's smUuid is unknown: the message stays `sent` (held for a receipt
        // that cannot be matched), never resent.
        after_timeout: "sent",
        body: |tag| {
            json!({"app_id": "demo", "channel": "SMS", "template": "verify_code", "priority": "HIGH",
                   "params": {"code": tag.chars().filter(char::is_ascii_digit).take(6).collect::<String>()},
                   "recipients": [{"address": phone("6")}], "requested_at": herald_core::util::now_ms()})
        },
    };
    matrix_row(&run, &case, api).await;
    // The request the platform took: template, content, the number without a prefix.
    let number = phone("5");
    let id = run
        .send(json!({"app_id": "demo", "channel": "SMS", "template": "verify_code", "priority": "HIGH",
                     "params": {"code": "424242"}, "recipients": [{"address": format!("+86{number}")}],
                     "requested_at": herald_core::util::now_ms()}))
        .await
        .remove(0);
    let v = run.until(&id, "delivered", "zrwinfo delivered").await;
    assert!(
        timeline_has(&v, "sent"),
        "sent, then delivered by the report: {v}"
    );
    let log = run.sim_log("zrwinfo").await;
    let taken = log["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["mobile"] == number.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("the simulator took {number}: {log}"));
    assert_eq!(taken["template_id"], "100001");
    assert_eq!(taken["content"], "424242");
    assert_eq!(taken["sign"], "【Herald】");
    unreached_is_undelivered(&run, "zrwinfo undelivered", "MK:0001").await;
    run.stop();
}

/// The APNs test's additions to ops/herald.toml: a second provider of the same team (it shares
/// the provider token), and rules that switch or alert on one APNs reason each.
const APNS_EXTRA: &str = r#"
[[providers]]
code = "apns-backup"
kind = "apns"
endpoint = "http://127.0.0.1:18100/apns"
priority = 1
timeout_ms = 2000
credentials_env = { auth_key = "HERALD_SIM_APNS_AUTH_KEY" }
settings = { team_id = "SIMTEAM001", key_id = "SIMKEY0001", topic = "io.herald.sim" }

[[rules]]
name = "apns: this provider's key was revoked, switch"
scene = "send_failure"
error_codes = ["InvalidProviderToken"]
action = "switch_provider"
priority = 5

[[rules]]
name = "apns: sandbox and production mixed up, alert"
scene = "send_failure"
error_codes = ["BadCertificateEnvironment"]
action = "alert"
action_config = { webhook_url = "http://127.0.0.1:18100/_alerts", secret_env = "HERALD_SIM_ALERT_SECRET" }
priority = 5
"#;

/// An APNs address: `apns:` and 64 hex characters, starting with `prefix`.
fn apns_device(prefix: &str) -> String {
    let hex = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    format!("apns:{prefix}{}", &hex[prefix.len()..])
}

/// The APNs row of the provider matrix (PROVIDERS-MORE.md §2) over HTTP/2; mobile push routed by
/// platform (an `apns:` address never reaches FCM, a bare token never APNs); a 410
/// `Unregistered` token suppressed afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn apns_push_through_the_pipeline_over_http2() {
    let _serial = SERIAL.lock().await;
    // Apple counts provider-token updates per team: forget the tokens of earlier runs.
    reqwest::Client::new()
        .post(format!("{}/_control/apns/revoke", sim_url()))
        .send()
        .await
        .unwrap();
    let run = start_edited("apns", (18_660, 19_660), |t| t, APNS_EXTRA).await;
    let api = run.api;
    run.provider_ready("apns", "apns-sim").await;
    let case = Case {
        sim: "apns",
        provider: "apns-sim",
        transient: ("ServiceUnavailable", ""),
        permanent: ("BadDeviceToken", ""),
        switch: ("InvalidProviderToken", ""),
        backup: "apns-backup",
        alert: ("BadCertificateEnvironment", ""),
        limited: ("TooManyRequests", ""),
        after_timeout: "unknown",
        body: |tag| push(&apns_device(""), tag),
    };
    matrix_row(&run, &case, api).await;
    let log = run.sim_log("apns").await;
    assert_eq!(
        log["tokens_issued"], 1,
        "one provider token for both providers: {log}"
    );
    assert!(
        log["accepted"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["http"] == "HTTP/2")
    );
    // Routed by platform: each address to its own service.
    let (fcm_before, apns_before) = (
        run.sim_log("fcm").await["accepted"]
            .as_array()
            .map_or(0, Vec::len),
        run.sim_log("apns").await["accepted"]
            .as_array()
            .map_or(0, Vec::len),
    );
    let to_fcm = run
        .send(push(&format!("device-{}", unique("f")), "f"))
        .await
        .remove(0);
    let to_apns = run.send(push(&apns_device(""), "a")).await.remove(0);
    let v = run.until(&to_fcm, "delivered", "a bare token by FCM").await;
    assert_eq!(v["provider"], "fcm-sim");
    let v = run
        .until(&to_apns, "delivered", "an apns: token by APNs")
        .await;
    assert_eq!(v["provider"], "apns-sim");
    assert_eq!(
        run.sim_log("fcm").await["accepted"]
            .as_array()
            .map_or(0, Vec::len),
        fcm_before + 1
    );
    assert_eq!(
        run.sim_log("apns").await["accepted"]
            .as_array()
            .map_or(0, Vec::len),
        apns_before + 1
    );
    // 410 Unregistered: failed, the token dead, the next message suppressed.
    let dead = apns_device("dead");
    let first = run.send(push(&dead, "one")).await.remove(0);
    let v = run.until(&first, "failed", "Unregistered fails").await;
    assert!(reason_codes(&v).contains(&"Unregistered".to_owned()), "{v}");
    let second = run.send(push(&dead, "two")).await.remove(0);
    let v = run
        .until(&second, "suppressed", "a dead APNs token suppressed")
        .await;
    assert!(
        reason_codes(&v).contains(&"device_token_dead".to_owned()),
        "{v}"
    );
    run.stop();
}

/// The JPush test's additions to ops/herald.toml: a backup app (same simulator) and rules.
const JPUSH_EXTRA: &str = r#"
[[providers]]
code = "jpush-backup"
kind = "jpush"
endpoint = "http://127.0.0.1:18100/jpush"
priority = 1
timeout_ms = 2000
credentials_env = { app_key = "HERALD_SIM_JPUSH_APP_KEY", master_secret = "HERALD_SIM_JPUSH_MASTER_SECRET" }

[[rules]]
name = "jpush: this app key is no longer valid, switch"
scene = "send_failure"
error_codes = ["1008"]
action = "switch_provider"
priority = 5

[[rules]]
name = "jpush: authentication failed, alert"
scene = "send_failure"
error_codes = ["1004"]
action = "alert"
action_config = { webhook_url = "http://127.0.0.1:18100/_alerts", secret_env = "HERALD_SIM_ALERT_SECRET" }
priority = 5
"#;

/// The JPush row of the provider matrix (PROVIDERS-MORE.md §5.2), and an inactive registration
/// id (1011) suppressed afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn jpush_through_the_pipeline() {
    let _serial = SERIAL.lock().await;
    let run = start_edited("jpush", (18_680, 19_680), |t| t, JPUSH_EXTRA).await;
    let api = run.api;
    run.provider_ready("jpush", "jpush-sim").await;
    let case = Case {
        sim: "jpush",
        provider: "jpush-sim",
        transient: ("1000", "Server Internal Error"),
        permanent: ("1003", "Parameter value is invalid"),
        switch: ("1008", "app_key is invalid"),
        backup: "jpush-backup",
        alert: ("1004", "Authen failed"),
        limited: ("2002", "Request times over the limit"),
        after_timeout: "unknown",
        body: |tag| push(&format!("jpush:{}", unique("rid")), tag),
    };
    matrix_row(&run, &case, api).await;
    let dead = format!("jpush:inactive-{}", unique("r"));
    let first = run.send(push(&dead, "one")).await.remove(0);
    let v = run.until(&first, "failed", "1011 fails").await;
    assert!(reason_codes(&v).contains(&"1011".to_owned()), "{v}");
    let second = run.send(push(&dead, "two")).await.remove(0);
    let v = run
        .until(&second, "suppressed", "an inactive id suppressed")
        .await;
    assert!(
        reason_codes(&v).contains(&"device_token_dead".to_owned()),
        "{v}"
    );
    run.stop();
}
