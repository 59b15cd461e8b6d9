//! Every sender against its simulator, in process: the senders sign and shape requests so the
//! simulators (which check them like the real services) accept them, and every documented
//! answer class is classified as the rules expect. Pipeline-level flows are in `channels.rs`.

use std::collections::HashMap;
use std::time::Duration;

use herald_core::config::Config;
use herald_providers::{Context, Provider, REGISTRY};
use herald_schemas::{
    Channel, DeliveryOutcome, EventHeader, MessageRouted, Priority, Recipient, RenderedContent,
};
use herald_simulators::{CREDENTIALS, Sim, credential};
use serde_json::{Value, json};

struct Peer {
    base: String,
    http: reqwest::Client,
}

impl Peer {
    async fn start() -> Peer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(
                listener,
                herald_simulators::router(Sim::new(HashMap::new())),
            )
            .await
            .unwrap();
        });
        Peer {
            base,
            http: reqwest::Client::new(),
        }
    }

    async fn faults(&self, provider: &str, faults: Value) {
        let r = self
            .http
            .post(format!("{}/_control/{provider}/faults", self.base))
            .json(&faults)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    async fn limit(&self, provider: &str, per_minute: u32) {
        self.http
            .put(format!("{}/_control/{provider}/limit", self.base))
            .json(&json!({ "per_minute": per_minute }))
            .send()
            .await
            .unwrap();
    }

    async fn revoke(&self, provider: &str) {
        self.http
            .post(format!("{}/_control/{provider}/revoke", self.base))
            .send()
            .await
            .unwrap();
    }

    async fn log(&self, provider: &str) -> Value {
        self.http
            .get(format!("{}/_log/{provider}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// A provider built from config text (endpoint paths relative to the simulator).
    fn provider(&self, toml: &str, wrong_secret: bool) -> Box<dyn Provider> {
        self.provider_with(toml, |k| {
            (wrong_secret && (k.ends_with("SECRET") || k.ends_with("SECRET_KEY")))
                .then(|| "wrong".into())
        })
    }

    /// A provider built from config text, with `env` answering first for the variables it
    /// knows (then the simulators' credentials, pointed at this simulator).
    fn provider_with(&self, toml: &str, env: impl Fn(&str) -> Option<String>) -> Box<dyn Provider> {
        let text = toml.replace("{base}", &self.base);
        let mut cfg = Config::parse(&text).unwrap();
        cfg.apply_env(|k| {
            if k == "HERALD_SERVER_SECRET" {
                return Some(herald_tests::SERVER_SECRET.into());
            }
            if let Some(v) = env(k) {
                return Some(v);
            }
            // A credential naming the shared simulator (the service account's token_uri)
            // names this one.
            CREDENTIALS
                .iter()
                .any(|(v, _)| *v == k)
                .then(|| credential(k).replace("http://127.0.0.1:18100", &self.base))
        });
        cfg.validate(&REGISTRY).unwrap();
        let guard = herald_core::netguard::Guard::new(&cfg.security.outbound_allow);
        let cx = Context {
            postgres_url: "",
            guard: &guard,
        };
        REGISTRY.build(&cfg.providers[0], &cx).unwrap()
    }
}

fn message(channel: Channel, address: &str, content: RenderedContent) -> MessageRouted {
    let id = format!("m-{}", herald_core::util::random_id());
    MessageRouted {
        header: EventHeader {
            event_id: "e".into(),
            event_time: 0,
            stage: "route".into(),
            trace_id: "t".into(),
            message_id: id,
            request_id: "r".into(),
            app_id: "demo".into(),
            channel,
            attempt: 1,
            metadata: Default::default(),
        },
        recipient: Recipient {
            address: address.into(),
            params: Default::default(),
            timezone: None,
        },
        priority: Priority::High,
        expires_at: None,
        template: Some("code".into()),
        template_version: Some(1),
        content,
        provider: "p".into(),
        provider_kind: "k".into(),
        tried_providers: vec![],
        due_at: None,
    }
}

fn sms_content(template: &str, params: &[(&str, &str)]) -> RenderedContent {
    RenderedContent {
        text: Some("Your code is 1234".into()),
        provider_template: Some(template.into()),
        provider_params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn text(t: &str) -> RenderedContent {
    RenderedContent {
        text: Some(t.into()),
        ..Default::default()
    }
}

const ALIYUN: &str = r#"
[[providers]]
code = "aliyun"
kind = "aliyun_sms"
endpoint = "{base}/aliyun"
timeout_ms = 1000
credentials_env = { access_key_id = "HERALD_SIM_ALIYUN_KEY_ID", access_key_secret = "HERALD_SIM_ALIYUN_KEY_SECRET" }
settings = { sign_name = "Herald", signature = "SIG" }
"#;

#[tokio::test]
async fn aliyun_v2_and_acs3_signatures_are_accepted_and_answers_classified() {
    let sim = Peer::start().await;
    for sig in ["v2", "acs3"] {
        let p = sim.provider(&ALIYUN.replace("SIG", sig), false);
        let m = message(
            Channel::Sms,
            "13800000001",
            sms_content("SMS_1001", &[("code", "1234")]),
        );
        let r = p.send(&m, 1).await;
        assert_eq!(r.outcome, DeliveryOutcome::Succeeded, "{sig}: {r:?}");
        assert!(
            r.provider_message_id.as_deref().unwrap().contains("^0/"),
            "BizId/phone"
        );
        let log = sim.log("aliyun").await;
        let last = log["accepted"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(
            last["out_id"],
            m.header.message_id.as_str(),
            "OutId carries the message id"
        );
        assert_eq!(last["template_param"], r#"{"code":"1234"}"#);

        // A wrong secret is refused by the simulator's signature check: permanent.
        let bad = sim
            .provider(&ALIYUN.replace("SIG", sig), true)
            .send(&m, 1)
            .await;
        assert_eq!(bad.outcome, DeliveryOutcome::FailedPermanent);
        assert_eq!(bad.reason.unwrap().code, "SignatureDoesNotMatch", "{sig}");
    }
    let p = sim.provider(&ALIYUN.replace("SIG", "v2"), false);
    let sms = |to: &str| message(Channel::Sms, to, sms_content("SMS_1001", &[("code", "1")]));
    // Real validation: an invalid number.
    let r = p.send(&sms("12345"), 1).await;
    assert_eq!(r.outcome, DeliveryOutcome::FailedPermanent);
    assert_eq!(r.reason.unwrap().code, "isv.MOBILE_NUMBER_ILLEGAL");
    // Scripted answers.
    sim.faults("aliyun", json!([
        {"kind": "error", "code": "isv.BUSINESS_LIMIT_CONTROL", "message": "触发分钟级流控Permits:1"},
        {"kind": "error", "code": "isp.SYSTEM_ERROR"},
        {"kind": "timeout", "ms": 3000},
    ])).await;
    assert_eq!(
        p.send(&sms("13800000002"), 1).await.outcome,
        DeliveryOutcome::RateLimited
    );
    assert_eq!(
        p.send(&sms("13800000003"), 1).await.outcome,
        DeliveryOutcome::FailedTransient
    );
    let before = sim.log("aliyun").await["accepted"]
        .as_array()
        .unwrap()
        .len();
    let t = p.send(&sms("13800000004"), 1).await;
    assert_eq!(
        t.outcome,
        DeliveryOutcome::Unknown,
        "a timeout after the request left is unknown"
    );
    // ... and the simulator did take it: resending blindly would send twice.
    assert_eq!(
        sim.log("aliyun").await["accepted"]
            .as_array()
            .unwrap()
            .len(),
        before + 1
    );
    // A per-number limit answers BUSINESS_LIMIT_CONTROL.
    sim.limit("aliyun", 1).await;
    assert_eq!(
        p.send(&sms("13800000005"), 1).await.outcome,
        DeliveryOutcome::Succeeded
    );
    assert_eq!(
        p.send(&sms("13800000005"), 1).await.outcome,
        DeliveryOutcome::RateLimited
    );
}

const TENCENT: &str = r#"
[[providers]]
code = "tencent"
kind = "tencent_sms"
endpoint = "{base}/tencent"
timeout_ms = 1000
credentials_env = { secret_id = "HERALD_SIM_TENCENT_SECRET_ID", secret_key = "HERALD_SIM_TENCENT_SECRET_KEY" }
settings = { sdk_app_id = "1400006666", sign_name = "Herald" }
"#;

#[tokio::test]
async fn tencent_tc3_is_accepted_and_per_number_answers_classified() {
    let sim = Peer::start().await;
    let p = sim.provider(TENCENT, false);
    let m = message(
        Channel::Sms,
        "+8613800000001",
        sms_content("1110", &[("1", "4370"), ("2", "5")]),
    );
    let r = p.send(&m, 1).await;
    assert_eq!(r.outcome, DeliveryOutcome::Succeeded, "{r:?}");
    assert!(r.provider_message_id.unwrap().starts_with("2433:"));
    let log = sim.log("tencent").await;
    assert_eq!(
        log["accepted"][0]["session_context"],
        m.header.message_id.as_str()
    );
    assert_eq!(log["accepted"][0]["params"], json!(["4370", "5"]));

    let bad = sim.provider(TENCENT, true).send(&m, 1).await;
    assert_eq!(bad.reason.unwrap().code, "AuthFailure.SignatureFailure");
    assert_eq!(
        p.send(&message(Channel::Sms, "+861", sms_content("1110", &[])), 1)
            .await
            .reason
            .unwrap()
            .code,
        "InvalidParameterValue.IncorrectPhoneNumber"
    );
    let no_template = p
        .send(&message(Channel::Sms, "+8613800000001", text("x")), 1)
        .await;
    assert_eq!(
        no_template.reason.unwrap().code,
        "missing_provider_template"
    );
    sim.faults("tencent", json!([
        {"kind": "error", "code": "LimitExceeded.PhoneNumberThirtySecondLimit", "message": "30 s"},
        {"kind": "error", "code": "InternalError.Timeout"},
        {"kind": "error", "code": "FailedOperation.PhoneNumberInBlacklist", "message": "blacklisted"},
    ])).await;
    assert_eq!(p.send(&m, 2).await.outcome, DeliveryOutcome::RateLimited);
    assert_eq!(
        p.send(&m, 3).await.outcome,
        DeliveryOutcome::FailedTransient
    );
    let black = p.send(&m, 4).await;
    assert_eq!(black.outcome, DeliveryOutcome::FailedPermanent);
    assert_eq!(
        black.reason.unwrap().code,
        "FailedOperation.PhoneNumberInBlacklist"
    );
}

const HUAWEI: &str = r#"
[[providers]]
code = "huawei"
kind = "huawei_sms"
endpoint = "{base}/huawei"
timeout_ms = 1000
credentials_env = { app_key = "HERALD_SIM_HUAWEI_APP_KEY", app_secret = "HERALD_SIM_HUAWEI_APP_SECRET" }
settings = { from = "8824032015014", signature = "Herald", auth = "{auth}" }
"#;

#[tokio::test]
async fn huawei_wsse_and_aksk_are_accepted_and_answers_classified() {
    let sim = Peer::start().await;
    let template = "8ff55eac1d0b478ab3c06c3c6a492300";
    let m = message(
        Channel::Sms,
        "13800000001",
        sms_content(template, &[("1", "369751")]),
    );
    for auth in ["wsse", "aksk"] {
        let cfg = HUAWEI.replace("{auth}", auth);
        let p = sim.provider(&cfg, false);
        let r = p.send(&m, 1).await;
        assert_eq!(r.outcome, DeliveryOutcome::Succeeded, "{auth}: {r:?}");
        assert!(r.provider_message_id.unwrap().contains('_'), "{auth}");
        // A wrong secret: the simulator recomputes the digest or signature and refuses it.
        let bad = sim.provider(&cfg, true).send(&m, 1).await;
        assert_eq!(bad.outcome, DeliveryOutcome::FailedPermanent, "{auth}");
        let want = if auth == "wsse" { "E000105" } else { "E000045" };
        assert_eq!(bad.reason.unwrap().code, want);
    }
    let log = sim.log("huawei").await;
    let first = &log["accepted"][0];
    assert_eq!(first["to"], "+8613800000001");
    assert_eq!(first["extend"], m.header.message_id.as_str());
    assert_eq!(first["params"], json!(["369751"]));
    let p = sim.provider(&HUAWEI.replace("{auth}", "wsse"), false);
    // A number that is not digits fails the whole request.
    let bad_number = p
        .send(
            &message(Channel::Sms, "+86138-0000", sms_content(template, &[])),
            1,
        )
        .await;
    assert_eq!(bad_number.reason.unwrap().code, "E000503");
    let no_template = p
        .send(&message(Channel::Sms, "13800000001", text("x")), 1)
        .await;
    assert_eq!(
        no_template.reason.unwrap().code,
        "missing_provider_template"
    );
    sim.faults(
        "huawei",
        json!([
            {"kind": "error", "code": "E200015", "message": "待发送短信数量太大"},
            {"kind": "error", "code": "E000000", "message": "系统异常"},
            {"kind": "error", "code": "E200028", "message": "模板变量校验失败"},
            {"kind": "error", "code": "E000110", "message": "Created out of window"},
        ]),
    )
    .await;
    assert_eq!(p.send(&m, 2).await.outcome, DeliveryOutcome::RateLimited);
    assert_eq!(
        p.send(&m, 3).await.outcome,
        DeliveryOutcome::FailedTransient
    );
    let permanent = p.send(&m, 4).await;
    assert_eq!(permanent.outcome, DeliveryOutcome::FailedPermanent);
    assert_eq!(permanent.reason.unwrap().code, "E200028");
    assert_eq!(
        p.send(&m, 5).await.outcome,
        DeliveryOutcome::FailedTransient
    );
}

#[tokio::test]
async fn tencent_batches_numbers_sharing_template_and_params_into_one_call() {
    let sim = Peer::start().await;
    let p = sim.provider(
        &TENCENT.replace("timeout_ms = 1000", "timeout_ms = 1000\nbatch_max = 200"),
        false,
    );
    assert_eq!(p.batch_max(), 200);
    let same = || sms_content("1110", &[("1", "4370")]);
    let msgs = [
        message(Channel::Sms, "+8613800001001", same()),
        message(Channel::Sms, "13800001002", same()),
        // Rejected by number (Tencent answers per number): only this one fails.
        message(Channel::Sms, "+861", same()),
        // The same number again: a second call, never twice in one PhoneNumberSet.
        message(Channel::Sms, "13800001001", same()),
        // Other params: another call.
        message(
            Channel::Sms,
            "13800001003",
            sms_content("1110", &[("1", "9999")]),
        ),
        message(Channel::Sms, "13800001004", text("no template")),
    ];
    let items: Vec<(&MessageRouted, i32)> = msgs.iter().map(|m| (m, 1)).collect();
    let rs = p.send_batch(&items).await;
    let outcomes: Vec<DeliveryOutcome> = rs.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [
            DeliveryOutcome::Succeeded,
            DeliveryOutcome::Succeeded,
            DeliveryOutcome::FailedPermanent,
            DeliveryOutcome::Succeeded,
            DeliveryOutcome::Succeeded,
            DeliveryOutcome::FailedPermanent,
        ],
        "{rs:?}"
    );
    assert_eq!(
        rs[2].reason.as_ref().unwrap().code,
        "InvalidParameterValue.IncorrectPhoneNumber"
    );
    assert_eq!(
        rs[5].reason.as_ref().unwrap().code,
        "missing_provider_template"
    );
    // Each message has its own number's SerialNo (the receipt key).
    let serials: std::collections::HashSet<_> = [0, 1, 3, 4]
        .iter()
        .map(|i| rs[*i].provider_message_id.clone().unwrap())
        .collect();
    assert_eq!(serials.len(), 4);
    let log = sim.log("tencent").await;
    // Three calls: {1001, 1002, +861}, {1001 again}, {1003}.
    assert_eq!(log["requests"], 3, "{log}");
    let first = log["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["numbers"] == json!(["+8613800001002"]))
        .unwrap();
    assert_eq!(first["params"], json!(["4370"]));
    assert_eq!(first["session_context"], msgs[0].header.message_id.as_str());
}

#[tokio::test]
async fn robots_sign_and_their_limits_become_rate_limited() {
    let sim = Peer::start().await;
    let ding = r#"
[[providers]]
code = "ding"
kind = "dingtalk_robot"
endpoint = "{base}/dingtalk/robot/send"
credentials_env = { access_token = "HERALD_SIM_DINGTALK_TOKEN", secret = "HERALD_SIM_DINGTALK_SECRET" }
"#;
    let feishu = format!(
        r#"
[[providers]]
code = "feishu"
kind = "feishu_bot"
endpoint = "{{base}}/feishu/open-apis/bot/v2/hook/{}"
credentials_env = {{ secret = "HERALD_SIM_FEISHU_SECRET" }}
"#,
        credential("HERALD_SIM_FEISHU_HOOK")
    );
    let wecom = r#"
[[providers]]
code = "wecom"
kind = "wecom_robot"
endpoint = "{base}/wecom/cgi-bin/webhook/send"
credentials_env = { key = "HERALD_SIM_WECOM_KEY" }
"#;
    let md = RenderedContent {
        subject: Some("Alert".into()),
        markdown: Some("## disk full".into()),
        ..Default::default()
    };
    for (toml, name, limit_code) in [
        (ding, "dingtalk", "130101"),
        (feishu.as_str(), "feishu", "9499"),
        (wecom, "wecom_robot", "45009"),
    ] {
        let p = sim.provider(toml, false);
        let ok = p
            .send(&message(Channel::Dingtalk, "13800000000", text("hello")), 1)
            .await;
        assert_eq!(ok.outcome, DeliveryOutcome::Succeeded, "{name}: {ok:?}");
        assert_eq!(
            p.send(&message(Channel::Dingtalk, "@all", md.clone()), 1)
                .await
                .outcome,
            DeliveryOutcome::Succeeded,
            "{name} markdown"
        );
        let log = sim.log(name).await;
        assert_eq!(log["accepted"].as_array().unwrap().len(), 2, "{name}");
        if name != "wecom_robot" {
            // No key to get wrong for WeCom robots: a wrong signing secret is refused.
            let bad = sim
                .provider(toml, true)
                .send(&message(Channel::Dingtalk, "-", text("x")), 1)
                .await;
            assert_eq!(bad.outcome, DeliveryOutcome::FailedPermanent, "{name}");
        }
        sim.limit(name, 2).await;
        let limited = p
            .send(&message(Channel::Dingtalk, "-", text("third")), 1)
            .await;
        assert_eq!(
            limited.outcome,
            DeliveryOutcome::RateLimited,
            "{name}: {limited:?}"
        );
        assert_eq!(limited.reason.unwrap().code, limit_code);
    }
}

#[tokio::test]
async fn token_apis_refresh_transparently_on_expiry() {
    let sim = Peer::start().await;
    let wecom = sim.provider(r#"
[[providers]]
code = "wecom-app"
kind = "wecom_app"
endpoint = "{base}/wecom"
credentials_env = { corp_id = "HERALD_SIM_WECOM_CORP_ID", corp_secret = "HERALD_SIM_WECOM_CORP_SECRET" }
settings = { agent_id = "1000002" }
"#, false);
    let wechat = sim.provider(r#"
[[providers]]
code = "wechat"
kind = "wechat_oa"
endpoint = "{base}/wechat"
credentials_env = { app_id = "HERALD_SIM_WECHAT_APP_ID", app_secret = "HERALD_SIM_WECHAT_APP_SECRET" }
"#, false);
    let tpl = sms_content(
        "TPL_order_shipped",
        &[("thing1", "Parcel"), ("url", "https://example.com/o/1")],
    );
    for (p, name, to, content) in [
        (&wecom, "wecom_app", "zhangsan", text("hi")),
        (&wechat, "wechat", "oABCDEFGHIJ123", tpl.clone()),
    ] {
        let m = message(Channel::Wecom, to, content.clone());
        assert_eq!(
            p.send(&m, 1).await.outcome,
            DeliveryOutcome::Succeeded,
            "{name}"
        );
        let m2 = message(Channel::Wecom, to, content.clone());
        assert_eq!(
            p.send(&m2, 1).await.outcome,
            DeliveryOutcome::Succeeded,
            "{name}"
        );
        assert_eq!(
            sim.log(name).await["tokens_issued"],
            1,
            "{name}: the token is cached"
        );
        // The provider revokes the token: the next message still succeeds, with a new token.
        sim.revoke(name).await;
        let m3 = message(Channel::Wecom, to, content.clone());
        let r = p.send(&m3, 1).await;
        assert_eq!(r.outcome, DeliveryOutcome::Succeeded, "{name}: {r:?}");
        let log = sim.log(name).await;
        assert_eq!(log["tokens_issued"], 2, "{name}");
        assert_eq!(log["rejected"], 1, "{name}: one call refused with 42001");
        assert_eq!(log["accepted"].as_array().unwrap().len(), 3, "{name}");
        sim.faults(name, json!([{"kind": "error", "code": "45009", "message": "api freq out of limit"}, {"kind": "error", "code": "-1", "message": "system busy"}])).await;
        assert_eq!(
            p.send(&message(Channel::Wecom, to, content.clone()), 1)
                .await
                .outcome,
            DeliveryOutcome::RateLimited
        );
        assert_eq!(
            p.send(&message(Channel::Wecom, to, content.clone()), 1)
                .await
                .outcome,
            DeliveryOutcome::FailedTransient
        );
    }
    let all_invalid = wecom
        .send(&message(Channel::Wecom, "unknown-user", text("x")), 1)
        .await;
    assert_eq!(all_invalid.reason.unwrap().code, "81013");
    let unsubscribed = wechat
        .send(&message(Channel::Wechat, "ounsub-000001", tpl.clone()), 1)
        .await;
    assert_eq!(unsubscribed.reason.unwrap().code, "43004");
    let log = sim.log("wechat").await;
    let first = &log["accepted"][0];
    assert_eq!(first["url"], "https://example.com/o/1");
    assert_eq!(first["data"]["thing1"]["value"], "Parcel");
    assert!(
        first["client_msg_id"].as_str().unwrap().starts_with("m-"),
        "client_msg_id = message id"
    );

    // Same message resent (e.g. after an unknown outcome): WeChat dedups on client_msg_id.
    let m = message(Channel::Wechat, "oDEDUPE00001", tpl.clone());
    wechat.send(&m, 1).await;
    let before = sim.log("wechat").await["accepted"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(wechat.send(&m, 2).await.outcome, DeliveryOutcome::Succeeded);
    assert_eq!(
        sim.log("wechat").await["accepted"]
            .as_array()
            .unwrap()
            .len(),
        before
    );
}

#[tokio::test]
async fn token_fetch_failure_is_not_an_unknown_outcome() {
    let sim = Peer::start().await;
    let p = sim.provider(r#"
[[providers]]
code = "wechat"
kind = "wechat_oa"
endpoint = "{base}/wechat"
credentials_env = { app_id = "HERALD_SIM_WECHAT_APP_ID", app_secret = "HERALD_SIM_WECHAT_APP_SECRET" }
"#, true);
    let r = p
        .send(
            &message(
                Channel::Wechat,
                "oABCDEFGHIJ123",
                sms_content("T", &[("a", "b")]),
            ),
            1,
        )
        .await;
    assert_eq!(r.outcome, DeliveryOutcome::FailedPermanent, "{r:?}");
    assert_eq!(r.reason.unwrap().code, "40125");
}

/// A throwaway CA and a leaf for localhost / 127.0.0.1 (CA:FALSE, serverAuth: what rustls and
/// OpenSSL accept), written to `dir`.
fn make_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let ok = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl")
            .success();
        assert!(ok, "openssl {args:?}");
    };
    std::fs::write(
        dir.join("leaf.ext"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Herald Test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ]);
}

struct SmtpPeer(std::process::Child);

impl Drop for SmtpPeer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn smtp_peer(dir: &std::path::Path, port: u16, implicit: bool) -> SmtpPeer {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/smtp_server.py");
    let mut cmd = std::process::Command::new("/usr/bin/python3");
    cmd.arg(script)
        .args(["--port", &port.to_string()])
        .arg("--maildir")
        .arg(dir.join(format!("mail-{port}")))
        .args(["--require-auth", "herald:s3cret"])
        .arg("--tls-cert")
        .arg(dir.join("leaf.pem"))
        .arg("--tls-key")
        .arg(dir.join("leaf.key"))
        .stdout(std::process::Stdio::null());
    if implicit {
        cmd.arg("--implicit-tls");
    }
    let peer = SmtpPeer(cmd.spawn().expect("python3 smtp peer"));
    herald_tests::eventually(Duration::from_secs(20), "smtp peer listening", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    peer
}

fn smtp_provider(port: u16, tls: &str, password: &str, ca: &std::path::Path) -> Box<dyn Provider> {
    let text = format!(
        r#"
[[providers]]
code = "smtp-tls"
kind = "smtp"
endpoint = "127.0.0.1:{port}"
from = "Herald <noreply@herald.local>"
tls = "{tls}"
timeout_ms = 5000
credentials_env = {{ username = "SMTP_USER", password = "SMTP_PASS" }}
settings = {{ tls_ca_file = "{}", tls_domain = "localhost" }}
"#,
        ca.display()
    );
    let mut cfg = Config::parse(&text).unwrap();
    let password = password.to_owned();
    cfg.apply_env(|k| match k {
        "HERALD_SERVER_SECRET" => Some(herald_tests::SERVER_SECRET.into()),
        "SMTP_USER" => Some("herald".into()),
        "SMTP_PASS" => Some(password.clone()),
        _ => None,
    });
    cfg.validate(&REGISTRY).unwrap();
    let guard = herald_core::netguard::Guard::new(&cfg.security.outbound_allow);
    let cx = Context {
        postgres_url: "",
        guard: &guard,
    };
    REGISTRY.build(&cfg.providers[0], &cx).unwrap()
}

fn mails(dir: &std::path::Path, port: u16) -> Vec<String> {
    let new = dir.join(format!("mail-{port}/new"));
    std::fs::read_dir(new)
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn smtp_with_required_starttls_implicit_tls_and_auth_against_a_real_server() {
    let dir = std::env::temp_dir().join(herald_tests::unique("smtp-tls"));
    std::fs::create_dir_all(&dir).unwrap();
    make_certs(&dir);
    let ca = dir.join("ca.pem");
    let (starttls_port, implicit_port) = (free_port(), free_port());
    let _a = smtp_peer(&dir, starttls_port, false).await;
    let _b = smtp_peer(&dir, implicit_port, true).await;
    let mail = RenderedContent {
        subject: Some("Welcome".into()),
        text: Some("Hello in text".into()),
        html: Some("<p>Hello in <b>HTML</b></p>".into()),
        ..Default::default()
    };

    let m = message(Channel::Email, "ada@example.com", mail.clone());
    let r = smtp_provider(starttls_port, "starttls", "s3cret", &ca)
        .send(&m, 1)
        .await;
    assert_eq!(r.outcome, DeliveryOutcome::Succeeded, "{r:?}");
    let got = mails(&dir, starttls_port);
    assert_eq!(got.len(), 1);
    assert!(
        got[0].contains(&m.header.message_id),
        "Message-ID carries the message id"
    );
    assert!(
        got[0].contains("multipart/alternative") && got[0].contains("text/html"),
        "{}",
        got[0]
    );

    // Nothing goes in clear to a server that requires STARTTLS.
    let plain = smtp_provider(starttls_port, "none", "s3cret", &ca)
        .send(&message(Channel::Email, "ada@example.com", mail.clone()), 1)
        .await;
    assert_eq!(plain.outcome, DeliveryOutcome::FailedPermanent, "{plain:?}");
    assert_eq!(mails(&dir, starttls_port).len(), 1, "nothing sent in clear");

    // A wrong password is a permanent failure with the server's code.
    let denied = smtp_provider(starttls_port, "starttls", "wrong", &ca)
        .send(&message(Channel::Email, "ada@example.com", mail.clone()), 1)
        .await;
    assert_eq!(
        denied.outcome,
        DeliveryOutcome::FailedPermanent,
        "{denied:?}"
    );
    assert_eq!(denied.response_code.as_deref(), Some("535"), "{denied:?}");
    assert_eq!(
        mails(&dir, starttls_port).len(),
        1,
        "refused mail never stored"
    );

    // Implicit TLS (port 465 style).
    let m = message(Channel::Email, "grace@example.com", mail.clone());
    let r = smtp_provider(implicit_port, "implicit", "s3cret", &ca)
        .send(&m, 1)
        .await;
    assert_eq!(r.outcome, DeliveryOutcome::Succeeded, "{r:?}");
    assert_eq!(mails(&dir, implicit_port).len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

const FCM: &str = r#"
[[providers]]
code = "fcm"
kind = "fcm"
endpoint = "{base}/fcm"
timeout_ms = 1000
credentials_env = { service_account = "HERALD_SIM_FCM_SERVICE_ACCOUNT" }
"#;

fn push(title: &str, body: &str) -> RenderedContent {
    RenderedContent {
        subject: Some(title.into()),
        text: Some(body.into()),
        provider_params: [("order".to_owned(), "42".to_owned())].into(),
        ..Default::default()
    }
}

/// FCM HTTP v1 against its simulator: the RS256 assertion is exchanged once for a token that
/// later sends reuse; a revoked token is replaced without failing the message; the body as
/// FCM takes it; each error class; a wrong key, another project and a dead token.
#[tokio::test]
async fn fcm_authenticates_with_a_service_account_and_classifies_answers() {
    let sim = Peer::start().await;
    let p = sim.provider(FCM, false);
    let mut m = message(Channel::Push, "device-token-1", push("Order", "Shipped"));
    m.expires_at = Some(herald_core::util::now_ms() + 600_000);
    for attempt in 1..=3 {
        let r = p.send(&m, attempt).await;
        assert_eq!(r.outcome, DeliveryOutcome::Succeeded, "{r:?}");
        assert!(
            r.provider_message_id
                .unwrap()
                .starts_with("projects/herald-sim/messages/0:")
        );
    }
    let log = sim.log("fcm").await;
    assert_eq!(log["tokens_issued"], 1, "one token for every send: {log}");
    let first = &log["accepted"][0];
    assert_eq!(first["token"], "device-token-1");
    assert_eq!(
        first["notification"],
        json!({"title": "Order", "body": "Shipped"})
    );
    assert_eq!(first["data"], json!({"order": "42"}));
    assert_eq!(first["collapse_key"], m.header.message_id.as_str());
    assert_eq!(first["tag"], m.header.message_id.as_str());
    assert_eq!(first["priority"], "HIGH");
    assert!(first["ttl"].as_str().unwrap().ends_with('s'));
    // The token is revoked: FCM answers 401, a fresh token is fetched, the message goes out.
    sim.revoke("fcm").await;
    assert_eq!(p.send(&m, 4).await.outcome, DeliveryOutcome::Succeeded);
    assert_eq!(sim.log("fcm").await["tokens_issued"], 2);
    // Scripted answers, each in FCM's shape and status.
    sim.faults(
        "fcm",
        json!([
            {"kind": "error", "code": "QUOTA_EXCEEDED"},
            {"kind": "error", "code": "UNAVAILABLE"},
            {"kind": "error", "code": "INTERNAL"},
            {"kind": "error", "code": "INVALID_ARGUMENT"},
            {"kind": "error", "code": "THIRD_PARTY_AUTH_ERROR"},
        ]),
    )
    .await;
    use DeliveryOutcome::*;
    for (outcome, code) in [
        (RateLimited, "QUOTA_EXCEEDED"),
        (FailedTransient, "UNAVAILABLE"),
        (FailedTransient, "INTERNAL"),
        (FailedPermanent, "INVALID_ARGUMENT"),
        (FailedPermanent, "THIRD_PARTY_AUTH_ERROR"),
    ] {
        let r = p.send(&m, 5).await;
        assert_eq!(
            (r.outcome, r.response_code.as_deref()),
            (outcome, Some(code))
        );
        assert!(!p.dead_address(&r));
    }
    // A token FCM no longer knows: permanent, and the token is dead.
    let gone = p
        .send(
            &message(Channel::Push, "unregistered-abc", push("a", "b")),
            1,
        )
        .await;
    assert_eq!(
        (gone.outcome, gone.response_code.as_deref()),
        (FailedPermanent, Some("UNREGISTERED"))
    );
    assert!(p.dead_address(&gone));
    let mismatch = p
        .send(
            &message(Channel::Push, "other-project-abc", push("a", "b")),
            1,
        )
        .await;
    assert_eq!(
        mismatch.response_code.as_deref(),
        Some("SENDER_ID_MISMATCH")
    );
    assert!(!p.dead_address(&mismatch));
    // A key the token endpoint does not know: refused, permanent, nothing sent.
    let other_key = p_with_key(
        &sim,
        include_str!("../../processors/providers/src/fcm/testdata/rfc7515-a2.pem"),
    );
    let r = other_key.send(&m, 1).await;
    assert_eq!(
        (r.outcome, r.response_code.as_deref()),
        (FailedPermanent, Some("invalid_grant")),
        "{r:?}"
    );
    // Another project than the service account's: 403 from FCM.
    let wrong_project = sim.provider(
        &FCM.replace(
            "credentials_env",
            "settings = { project_id = \"someone-else\" }\ncredentials_env",
        ),
        false,
    );
    let r = wrong_project.send(&m, 1).await;
    assert_eq!(
        (r.outcome, r.response_code.as_deref()),
        (FailedPermanent, Some("PERMISSION_DENIED")),
        "{r:?}"
    );
    let before = sim.log("fcm").await["accepted"].as_array().unwrap().len();
    assert_eq!(before, 4, "only the successful sends were taken");
}

/// An FCM provider whose service account signs with `key` (the simulator does not know it).
fn p_with_key(sim: &Peer, key: &str) -> Box<dyn Provider> {
    let mut account: Value = serde_json::from_str(herald_simulators::fcm::SERVICE_ACCOUNT).unwrap();
    account["private_key"] = json!(key);
    account["token_uri"] = json!(format!("{}/fcm/token", sim.base));
    let account = account.to_string();
    sim.provider_with(FCM, move |k| {
        (k == "HERALD_SIM_FCM_SERVICE_ACCOUNT").then(|| account.clone())
    })
}

const ZRWINFO: &str = r#"
[[providers]]
code = "zrwinfo"
kind = "zrwinfo_sms"
endpoint = "{base}/zrwinfo"
timeout_ms = 1000
credentials_env = { access_key = "HERALD_SIM_ZRWINFO_ACCESS_KEY", secret = "HERALD_SIM_ZRWINFO_SECRET" }
settings = { sign = "【Herald】", auth = "{auth}" }
"#;

/// 掌榕网 against its simulator: the plain single send and the 2.0 token send both taken (a
/// wrong secret refused either way); the content as the platform takes it; each class.
#[tokio::test]
async fn zrwinfo_plain_and_token_sends_are_accepted_and_answers_classified() {
    let sim = Peer::start().await;
    let m = message(
        Channel::Sms,
        "13800000002",
        sms_content("100001", &[("code", "369751")]),
    );
    for auth in ["plain", "token"] {
        let cfg = ZRWINFO.replace("{auth}", auth);
        let r = sim.provider(&cfg, false).send(&m, 1).await;
        assert_eq!(r.outcome, DeliveryOutcome::Succeeded, "{auth}: {r:?}");
        assert!(r.provider_message_id.is_some());
        let bad = sim.provider(&cfg, true).send(&m, 1).await;
        assert_eq!(
            (bad.outcome, bad.reason.unwrap().code.as_str()),
            (DeliveryOutcome::FailedPermanent, "9006"),
            "{auth}"
        );
    }
    let log = sim.log("zrwinfo").await;
    let taken = log["accepted"].as_array().unwrap();
    assert_eq!(taken.len(), 2);
    assert_eq!(taken[0]["auth"], "plain");
    assert_eq!(taken[1]["auth"], "token");
    assert_eq!(taken[0]["content"], "369751");
    assert_eq!(taken[0]["mobile"], "13800000002");
    let p = sim.provider(&ZRWINFO.replace("{auth}", "plain"), false);
    // The official four-variable example, in key order.
    let order = p
        .send(
            &message(
                Channel::Sms,
                "13800000003",
                sms_content(
                    "100002",
                    &[
                        ("1", "先生"),
                        ("2", "9:40"),
                        ("3", "快递公司"),
                        ("4", "1234567"),
                    ],
                ),
            ),
            1,
        )
        .await;
    assert_eq!(order.outcome, DeliveryOutcome::Succeeded, "{order:?}");
    assert_eq!(
        sim.log("zrwinfo").await["accepted"][2]["content"],
        "先生##9:40##快递公司##1234567"
    );
    // Refused by the platform's rules: variables that do not fit the template, a bad number.
    let wrong_count = p
        .send(
            &message(
                Channel::Sms,
                "13800000004",
                sms_content("100002", &[("1", "a")]),
            ),
            1,
        )
        .await;
    assert_eq!(wrong_count.reason.unwrap().code, "10006");
    let bad_number = p
        .send(
            &message(
                Channel::Sms,
                "+1-555-0100",
                sms_content("100001", &[("1", "1")]),
            ),
            1,
        )
        .await;
    assert_eq!(bad_number.reason.unwrap().code, "9003");
    sim.faults(
        "zrwinfo",
        json!([
            {"kind": "error", "code": "9024", "message": "手机号码超频"},
            {"kind": "error", "code": "503"},
            {"kind": "error", "code": "9010", "message": "余额不足"},
        ]),
    )
    .await;
    use DeliveryOutcome::*;
    for (outcome, code) in [
        (RateLimited, "9024"),
        (FailedTransient, "503"),
        (FailedPermanent, "9010"),
    ] {
        let r = p.send(&m, 2).await;
        assert_eq!(
            (r.outcome, r.reason.unwrap().code.as_str()),
            (outcome, code)
        );
    }
}

/// 掌榕网 joins variables with `##`: three variables, one holding `##`, would fill the
/// four-variable template (the simulator takes it, as the platform would) with shifted values.
/// Such a message is refused before any call; nothing reaches the simulator.
#[tokio::test]
async fn zrwinfo_refuses_a_variable_holding_a_separator_without_a_call() {
    let sim = Peer::start().await;
    for auth in ["plain", "token"] {
        let p = sim.provider(&ZRWINFO.replace("{auth}", auth), false);
        for smuggled in ["先生##9:40", "先生$$9:40", "先生#"] {
            let r = p
                .send(
                    &message(
                        Channel::Sms,
                        "13800000005",
                        sms_content(
                            "100002",
                            &[("1", smuggled), ("2", "快递公司"), ("3", "1234567")],
                        ),
                    ),
                    1,
                )
                .await;
            assert_eq!(
                (r.outcome, r.reason.unwrap().code.as_str()),
                (DeliveryOutcome::FailedPermanent, "invalid_parameter"),
                "{auth} {smuggled}"
            );
            assert_eq!(r.response_code, None, "no answer: no call");
        }
    }
    let log = sim.log("zrwinfo").await;
    assert_eq!(
        (&log["requests"], &log["rejected"]),
        (&json!(0), &json!(0)),
        "{log}"
    );
    assert_eq!(log["accepted"].as_array().map_or(0, Vec::len), 0, "{log}");
}

const APNS: &str = r#"
[[providers]]
code = "apns"
kind = "apns"
endpoint = "{base}/apns"
timeout_ms = 1000
credentials_env = { auth_key = "HERALD_SIM_APNS_AUTH_KEY" }
settings = { team_id = "SIMTEAM001", key_id = "SIMKEY0001", topic = "io.herald.sim" }
"#;

fn apns_token(prefix: &str) -> String {
    let hex = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    format!("apns:{prefix}{}", &hex[prefix.len()..])
}

/// APNs against its HTTP/2 simulator: the ES256 provider token is accepted and shared (one per
/// team in the process, however many providers); the request as APNs takes it; an HTTP/1.1
/// client is refused; a key APNs does not know, a bad token, a dead one, and each class.
#[tokio::test]
async fn apns_speaks_http2_with_a_shared_provider_token_and_classifies_answers() {
    let sim = Peer::start().await;
    let p = sim.provider(APNS, false);
    let device = apns_token("");
    let mut m = message(Channel::Push, &device, push("Order", "Shipped"));
    m.header.message_id = uuid::Uuid::new_v4().to_string();
    m.expires_at = Some(herald_core::util::now_ms() + 600_000);
    for attempt in 1..=2 {
        let r = p.send(&m, attempt).await;
        assert_eq!(r.outcome, DeliveryOutcome::Succeeded, "{r:?}");
        assert_eq!(
            r.provider_message_id.as_deref(),
            Some(m.header.message_id.as_str())
        );
    }
    // Another provider of the same team shares the token (Apple counts updates per team).
    let again = sim.provider(APNS, false);
    assert_eq!(again.send(&m, 3).await.outcome, DeliveryOutcome::Succeeded);
    let log = sim.log("apns").await;
    assert_eq!(log["tokens_issued"], 1, "{log}");
    let first = &log["accepted"][0];
    assert_eq!(first["http"], "HTTP/2");
    assert_eq!(first["token"], &device["apns:".len()..]);
    assert_eq!(
        first["payload"],
        json!({"aps": {"alert": {"title": "Order", "body": "Shipped"}}, "order": "42"})
    );
    assert_eq!(first["push_type"], "alert");
    assert_eq!(first["priority"], "10");
    assert_eq!(first["collapse_id"], m.header.message_id.as_str());
    assert!(first["expiration"].as_str().unwrap().parse::<i64>().is_ok());
    // A background push (no title or body) goes at priority 5.
    let quiet = p
        .send(
            &message(
                Channel::Push,
                &apns_token(""),
                RenderedContent {
                    provider_params: [("sync".to_owned(), "1".to_owned())].into(),
                    ..Default::default()
                },
            ),
            1,
        )
        .await;
    assert_eq!(quiet.outcome, DeliveryOutcome::Succeeded, "{quiet:?}");
    let bg = &sim.log("apns").await["accepted"][3];
    assert_eq!(
        (bg["push_type"].as_str(), bg["priority"].as_str()),
        (Some("background"), Some("5"))
    );
    assert_eq!(
        bg["payload"],
        json!({"aps": {"content-available": 1}, "sync": "1"})
    );
    // APNs speaks HTTP/2 only: an HTTP/1.1 request is refused.
    let h1 = reqwest::Client::new()
        .post(format!(
            "{}/apns/3/device/{}",
            sim.base,
            &device["apns:".len()..]
        ))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(h1.status().as_u16(), 505);
    // A token that is not a device token; one APNs says is gone.
    use DeliveryOutcome::*;
    let bad = p
        .send(&message(Channel::Push, "apns:xyz", push("a", "b")), 1)
        .await;
    assert_eq!(
        (bad.outcome, bad.response_code.as_deref()),
        (FailedPermanent, Some("BadDeviceToken"))
    );
    assert!(!p.dead_address(&bad));
    let gone = p
        .send(
            &message(Channel::Push, &apns_token("dead"), push("a", "b")),
            1,
        )
        .await;
    assert_eq!(
        (gone.outcome, gone.response_code.as_deref()),
        (FailedPermanent, Some("Unregistered"))
    );
    assert!(p.dead_address(&gone));
    sim.faults(
        "apns",
        json!([
            {"kind": "error", "code": "TooManyRequests"},
            {"kind": "error", "code": "ServiceUnavailable"},
            {"kind": "error", "code": "TooManyProviderTokenUpdates"},
            {"kind": "error", "code": "BadCertificateEnvironment"},
        ]),
    )
    .await;
    for (outcome, code) in [
        (RateLimited, "TooManyRequests"),
        (FailedTransient, "ServiceUnavailable"),
        (RateLimited, "TooManyProviderTokenUpdates"),
        (FailedPermanent, "BadCertificateEnvironment"),
    ] {
        let r = p.send(&m, 4).await;
        assert_eq!(
            (r.outcome, r.response_code.as_deref()),
            (outcome, Some(code))
        );
    }
    // A key the simulator does not know (another team's): refused before anything is sent.
    let stranger = sim.provider_with(&APNS.replace("SIMTEAM001", "OTHERTEAM1"), |k| {
        (k == "HERALD_SIM_APNS_AUTH_KEY").then(|| {
            include_str!("../../processors/providers/src/apns/testdata/rfc7515-a3.p8").to_owned()
        })
    });
    let r = stranger.send(&m, 1).await;
    assert_eq!(
        (r.outcome, r.response_code.as_deref()),
        (FailedPermanent, Some("InvalidProviderToken")),
        "{r:?}"
    );
}

const JPUSH: &str = r#"
[[providers]]
code = "jpush"
kind = "jpush"
endpoint = "{base}/jpush"
timeout_ms = 1000
credentials_env = { app_key = "HERALD_SIM_JPUSH_APP_KEY", master_secret = "HERALD_SIM_JPUSH_MASTER_SECRET" }
settings = { apns_production = "false" }
"#;

/// JPush against its simulator: Basic auth accepted (a wrong master secret refused), the
/// push as JPush takes it, a data-only message, an inactive registration id, each class.
#[tokio::test]
async fn jpush_basic_auth_is_accepted_and_answers_classified() {
    let sim = Peer::start().await;
    let p = sim.provider(JPUSH, false);
    let mut m = message(
        Channel::Push,
        "jpush:1a0018970a1f0e2f7c4",
        push("Order", "Shipped"),
    );
    m.expires_at = Some(herald_core::util::now_ms() + 600_000);
    let r = p.send(&m, 1).await;
    assert_eq!(r.outcome, DeliveryOutcome::Succeeded, "{r:?}");
    let taken = &sim.log("jpush").await["accepted"][0];
    assert_eq!(taken["registration_id"], json!(["1a0018970a1f0e2f7c4"]));
    assert_eq!(taken["notification"]["alert"], "Shipped");
    assert_eq!(taken["notification"]["android"]["title"], "Order");
    assert_eq!(
        taken["notification"]["android"]["extras"],
        json!({"order": "42"})
    );
    assert_eq!(taken["options"]["apns_production"], false);
    assert!(taken["options"]["time_to_live"].as_i64().unwrap() > 500);
    assert_eq!(
        r.provider_message_id.as_ref(),
        taken["msg_id"].as_str().map(str::to_owned).as_ref()
    );
    let data = p
        .send(
            &message(
                Channel::Push,
                "jpush:1a0018970a1f0e2f7c4",
                RenderedContent {
                    provider_params: [("sync".to_owned(), "1".to_owned())].into(),
                    ..Default::default()
                },
            ),
            1,
        )
        .await;
    assert_eq!(data.outcome, DeliveryOutcome::Succeeded);
    assert_eq!(
        sim.log("jpush").await["accepted"][1]["message"]["extras"],
        json!({"sync": "1"})
    );
    let wrong = sim
        .provider_with(JPUSH, |k| {
            (k == "HERALD_SIM_JPUSH_MASTER_SECRET").then(|| "wrong".into())
        })
        .send(&m, 1)
        .await;
    assert_eq!(
        (wrong.outcome, wrong.response_code.as_deref()),
        (DeliveryOutcome::FailedPermanent, Some("1004"))
    );
    let gone = p
        .send(
            &message(Channel::Push, "jpush:inactive-1", push("a", "b")),
            1,
        )
        .await;
    assert_eq!(
        (gone.outcome, gone.response_code.as_deref()),
        (DeliveryOutcome::FailedPermanent, Some("1011"))
    );
    assert!(p.dead_address(&gone));
    sim.faults(
        "jpush",
        json!([
            {"kind": "error", "code": "2002"},
            {"kind": "error", "code": "1000"},
            {"kind": "error", "code": "1008"},
        ]),
    )
    .await;
    use DeliveryOutcome::*;
    for (outcome, code) in [
        (RateLimited, "2002"),
        (FailedTransient, "1000"),
        (FailedPermanent, "1008"),
    ] {
        let r = p.send(&m, 2).await;
        assert_eq!(
            (r.outcome, r.response_code.as_deref()),
            (outcome, Some(code))
        );
        assert!(!p.dead_address(&r));
    }
}
