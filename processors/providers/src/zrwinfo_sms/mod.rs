//! 掌榕网 (Zrwinfo) SMS on `api.1cloudsp.com` (PROVIDERS-MORE.md §3): a form POST per message to
//! the documented single send `/api/v2/single_send` (`accesskey` and `secret` in the form: the
//! documented scheme has no signature), or, with `auth = "token"`, to `/api/v2/send` with the
//! 2.0 token (`token` = MD5 hex of secret + random + timestamp, no secret on the wire).
//! `content` is the template's variables joined by `##`, in the order of their keys (`1`, `2`, …).
//! The platform splits `content` on `##` (and, per the reference client, on `$$`), so a variable
//! that holds either separator, or puts `#` next to a joining `##` (making `###`), would
//! move the other variables or add one: such a message is refused before any call, permanently,
//! with `invalid_parameter` (no escape is documented).
//! `{"code":"0", "smUuid"}` is accepted; any other `code` is an error from the (secondary) code
//! table; a bare HTTP error is classed by its status (5xx transient), which is then the code;
//! a timeout is unknown.
//! Delivery reports are form pushes (`smUuid`, `mobile`, `deliverResult`, `batchId`) to the
//! callback stage, moving the message `sent` → `delivered` / `undelivered`.
//!
//! What the official pages leave open, and what Herald assumes (README, "Channels and
//! providers"): error answers come with HTTP 200 and a non-`"0"` code (as the reference client
//! reads them); the code table is a third-party copy; `9024` (number over its frequency) is
//! rate-limited, every other code permanent; the report's acknowledgement is
//! `{"code":"0","msg":"SUCCESS"}`; a report names the send by `smUuid` (single send) or
//! `batchId` (token send).
//!
//! Config: `endpoint` (default [`DEFAULT_ENDPOINT`], `https://api.1cloudsp.com`: the official page
//! says "HTTP(S)", and the default `plain` auth puts the account secret in the form, so it never
//! goes over plain HTTP unless an operator names an `http://` endpoint, as the simulator's tests
//! do); credentials `access_key`, `secret`, `callback_token`; settings `sign` (the signature text
//! `【…】` or its id), `auth` (`plain` | `token`). Templates need `provider_template` (the
//! `templateId`).

use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_core::sign::pct;
use herald_core::util::now_ms;
use herald_schemas::{DeliveryOutcome, MessageRouted, Reason};
use md5::{Digest, Md5};

use crate::http::{http_client, provider_error, read_capped, transport_failure};
use crate::settings::Needs;
use crate::tencent_sms::template_param_set;
use crate::{CallResult, Context, Kind, Provider, ProviderError};

pub mod receipt;

pub const KIND: Kind = Kind {
    name: "zrwinfo_sms",
    channel: herald_schemas::Channel::Sms,
    check: |p| ZrwinfoSms::new(p).map(drop),
    build: |p, _: &Context| Ok(Box::new(ZrwinfoSms::new(p)?)),
    receipts: Some(crate::Receipts {
        parse: receipt::parse,
        ack: receipt::ack,
    }),
    accepts: crate::any_address,
};

pub const SINGLE_SEND: &str = "/api/v2/single_send";
pub const SEND: &str = "/api/v2/send";
/// The documented separator of template variables in `content`.
pub const SEPARATOR: &str = "##";
/// The separator the reference client says the platform also splits `content` on.
pub const OTHER_SEPARATOR: &str = "$$";
/// Where requests go when the config names no endpoint: HTTPS, since the default `plain` auth
/// sends the account secret in the form.
pub const DEFAULT_ENDPOINT: &str = "https://api.1cloudsp.com";

pub struct ZrwinfoSms {
    client: reqwest::Client,
    endpoint: String,
    access_key: String,
    secret: String,
    sign: String,
    token_auth: bool,
}

/// The 2.0 scheme's token: lowercase hex MD5 of secret + random + timestamp (ms), as strings.
pub fn token(secret: &str, random: &str, timestamp_ms: i64) -> String {
    let mut h = Md5::new();
    h.update(secret.as_bytes());
    h.update(random.as_bytes());
    h.update(timestamp_ms.to_string().as_bytes());
    hex::encode(h.finalize())
}

/// The `content` field: the template's variables in key order, joined by `##`; or, when a
/// variable would change how the platform splits it, why not (naming the variables' keys, never
/// their values). A variable may not hold `##` or `$$`, nor start with `#` (unless first) or end
/// with `#` (unless last), where joining would make `###`.
pub fn content(params: &std::collections::HashMap<String, String>) -> Result<String, String> {
    let values = template_param_set(params);
    let last = values.len().saturating_sub(1);
    let splitting = |i: usize, v: &str| {
        v.contains(SEPARATOR)
            || v.contains(OTHER_SEPARATOR)
            || (i > 0 && v.starts_with('#'))
            || (i < last && v.ends_with('#'))
    };
    if values.iter().enumerate().any(|(i, v)| splitting(i, v)) {
        // Keys in the order of `values` (the same order template_param_set sorts by).
        let mut keys: Vec<&str> = params.keys().map(String::as_str).collect();
        keys.sort_by(|a, b| match (a.parse::<u32>(), b.parse::<u32>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => a.cmp(b),
        });
        let bad: Vec<&str> = keys
            .iter()
            .enumerate()
            .filter(|(i, k)| splitting(*i, &params[**k]))
            .map(|(_, k)| *k)
            .collect();
        return Err(format!(
            "template variables {bad:?} would shift 掌榕网's variables (content joins them with \
             {SEPARATOR}; a variable may not hold {SEPARATOR} or {OTHER_SEPARATOR}, nor put # next \
             to a separator)"
        ));
    }
    Ok(values.join(SEPARATOR))
}

impl ZrwinfoSms {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let mut n = Needs::new(p);
        let endpoint = if p.endpoint.is_empty() {
            DEFAULT_ENDPOINT.to_owned()
        } else {
            n.endpoint()
        };
        let access_key = n.credential("access_key");
        let secret = n.credential("secret");
        let sign = n.setting("sign");
        let token_auth = match n.setting_or("auth", "plain").as_str() {
            "plain" => false,
            "token" => true,
            other => {
                n.problem(format!("auth {other:?} is not plain or token"));
                false
            }
        };
        n.done()?;
        Ok(ZrwinfoSms {
            client: http_client(p)?,
            endpoint,
            access_key,
            secret,
            sign,
            token_auth,
        })
    }

    /// The form body and the path it goes to.
    fn form(&self, m: &MessageRouted, template: &str, content: String) -> (String, &'static str) {
        let mut fields = vec![
            ("accesskey", self.access_key.clone()),
            ("sign", self.sign.clone()),
            ("templateId", template.to_owned()),
            (
                "mobile",
                m.recipient
                    .address
                    .trim()
                    .trim_start_matches("+86")
                    .to_owned(),
            ),
            ("content", content),
        ];
        let path = if self.token_auth {
            let random = uuid::Uuid::new_v4().simple().to_string();
            let timestamp = now_ms();
            fields.push(("timestamp", timestamp.to_string()));
            fields.push(("token", token(&self.secret, &random, timestamp)));
            fields.push(("random", random));
            SEND
        } else {
            fields.push(("secret", self.secret.clone()));
            SINGLE_SEND
        };
        let body = fields
            .iter()
            .map(|(k, v)| format!("{k}={}", pct(v)))
            .collect::<Vec<_>>()
            .join("&");
        (body, path)
    }
}

/// The class of a 掌榕网 code (the secondary table, PROVIDERS-MORE.md §3.5).
fn outcome_of(code: &str) -> DeliveryOutcome {
    match code {
        // The number is over its frequency limit.
        "9024" => DeliveryOutcome::RateLimited,
        _ => DeliveryOutcome::FailedPermanent,
    }
}

/// An answer, classified: `code` `"0"` with `smUuid` (single) or `batchId` (send) is accepted;
/// any other code is the provider's error; a 5xx without a code is transient.
pub fn classify(status: u16, v: &serde_json::Value) -> CallResult {
    let code = match &v["code"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    let msg = v["msg"].as_str().unwrap_or_default();
    // No code for system errors or overload is documented: a bare HTTP error (a gateway's
    // page) is classed by its status, which is then the code.
    if code.is_empty() || status != 200 {
        let outcome = match status {
            429 => DeliveryOutcome::RateLimited,
            500.. | 408 => DeliveryOutcome::FailedTransient,
            _ => DeliveryOutcome::FailedPermanent,
        };
        let code = if code.is_empty() {
            status.to_string()
        } else {
            code
        };
        return provider_error(outcome, &code, &format!("HTTP {status} {msg}"));
    }
    if code == "0" {
        let id = v["smUuid"]
            .as_str()
            .or_else(|| v["batchId"].as_str())
            .filter(|s| !s.is_empty());
        return match id {
            Some(id) => CallResult::ok("0", Some(id.to_owned())),
            // Accepted, with nothing to match its report with.
            None => provider_error(
                DeliveryOutcome::Unknown,
                "missing_sm_uuid",
                "accepted without an smUuid",
            ),
        };
    }
    provider_error(outcome_of(&code), &code, msg)
}

impl Provider for ZrwinfoSms {
    fn has_receipts(&self) -> bool {
        true
    }

    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let Some(template) = crate::http::provider_template(m) else {
                return CallResult::fail(
                    DeliveryOutcome::FailedPermanent,
                    None,
                    Reason::new(
                        "missing_provider_template",
                        "掌榕网 SMS needs the template's provider_template (templateId)",
                    ),
                );
            };
            let content = match content(&m.content.provider_params) {
                Ok(c) => c,
                Err(e) => {
                    return CallResult::fail(
                        DeliveryOutcome::FailedPermanent,
                        None,
                        Reason::new("invalid_parameter", e),
                    );
                }
            };
            let (body, path) = self.form(m, &template, content);
            let req = self
                .client
                .post(format!("{}{path}", self.endpoint))
                .header(
                    "content-type",
                    "application/x-www-form-urlencoded;charset=utf-8",
                )
                .body(body);
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => return transport_failure(e),
            };
            let status = resp.status().as_u16();
            match read_capped(resp).await {
                Ok(body) => match serde_json::from_slice(&body) {
                    Ok(v) => classify(status, &v),
                    Err(_) => classify(status, &serde_json::Value::Null),
                },
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
    fn the_token_matches_the_derived_fixture() {
        // [DERIVED] PROVIDERS-MORE.md §3.3.
        assert_eq!(
            token("testSecret", "23rfsdf332", 1_465_227_303_037),
            "4b71432919155ca9620aaaa7ad6262db"
        );
    }

    #[test]
    fn content_is_the_variables_in_order_joined_by_two_hashes() {
        // The official example: template `{1}您好,您的订单于{2}已通过{3}发货,运单号{4}`.
        let params = [
            ("1", "先生"),
            ("2", "9:40"),
            ("3", "快递公司"),
            ("4", "1234567"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(content(&params).unwrap(), "先生##9:40##快递公司##1234567");
    }

    fn params(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_variable_that_would_move_the_separators_is_refused() {
        for v in ["zz##b", "##", "zz$$b", "#zz", "zz#", "#", "zz###b"] {
            let err = content(&params(&[("1", "ok"), ("2", v), ("3", "ok")])).unwrap_err();
            assert!(err.contains(r#"["2"]"#), "{v}: {err}");
            assert!(
                !err.contains("zz"),
                "the value stays out of the reason: {err}"
            );
        }
        // A lone `#` or `$` inside a variable cannot form a separator, nor a `#` at the very
        // start or end of the content.
        assert_eq!(
            content(&params(&[
                ("1", "#1"),
                ("2", "a#b"),
                ("3", "$5"),
                ("4", "x$#")
            ]))
            .unwrap(),
            "#1##a#b##$5##x$#"
        );
        let err = content(&params(&[("1", "a#"), ("2", "b"), ("10", "#c")])).unwrap_err();
        assert!(err.contains(r#"["1", "10"]"#), "{err}");
    }

    /// A provider whose endpoint is a loopback listener counting its connections.
    async fn provider_at_counter(
        endpoint: Option<String>,
    ) -> (ZrwinfoSms, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((_s, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let mut p: ProviderConfig = serde_json::from_value(json!({
            "code": "zrwinfo",
            "kind": "zrwinfo_sms",
            "endpoint": endpoint.unwrap_or_else(|| format!("http://{addr}")),
            "timeout_ms": 500,
            "settings": {"sign": "【Herald】"},
        }))
        .unwrap();
        p.credentials = [("access_key", "k"), ("secret", "s")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        (ZrwinfoSms::new(&p).unwrap(), seen)
    }

    fn sms(pairs: &[(&str, &str)]) -> MessageRouted {
        MessageRouted {
            header: herald_schemas::EventHeader {
                event_id: "e".into(),
                event_time: 0,
                stage: "route".into(),
                trace_id: "t".into(),
                message_id: "m-1".into(),
                request_id: "r".into(),
                app_id: "a".into(),
                channel: herald_schemas::Channel::Sms,
                attempt: 1,
                metadata: Default::default(),
            },
            recipient: herald_schemas::Recipient {
                address: "13800000001".into(),
                params: Default::default(),
                timezone: None,
            },
            priority: herald_schemas::Priority::High,
            expires_at: None,
            template: None,
            template_version: None,
            content: herald_schemas::RenderedContent {
                provider_template: Some("100002".into()),
                provider_params: params(pairs),
                ..Default::default()
            },
            provider: "zrwinfo".into(),
            provider_kind: "zrwinfo_sms".into(),
            tried_providers: vec![],
            due_at: None,
        }
    }

    #[tokio::test]
    async fn an_injected_separator_is_refused_before_any_call() {
        let (p, seen) = provider_at_counter(None).await;
        let r = p
            .send(&sms(&[("1", "先生"), ("2", "9:40##x"), ("3", "y")]), 1)
            .await;
        assert_eq!(r.outcome, DeliveryOutcome::FailedPermanent);
        assert_eq!(r.response_code, None, "no provider answered");
        assert_eq!(r.reason.unwrap().code, "invalid_parameter");
        // The listener would have counted a connection by now had the call been made; prove it
        // counts by making one that is (its answer is lost: the listener never replies).
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 0);
        let made = p.send(&sms(&[("1", "先生")]), 1).await;
        assert_eq!(made.outcome, DeliveryOutcome::Unknown, "{made:?}");
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_endpoint_is_https_unless_configured() {
        let (p, _) = provider_at_counter(Some(String::new())).await;
        assert_eq!(p.endpoint, DEFAULT_ENDPOINT);
        assert!(DEFAULT_ENDPOINT.starts_with("https://"));
        let (p, _) = provider_at_counter(Some("http://127.0.0.1:18100/zrwinfo/".into())).await;
        assert_eq!(p.endpoint, "http://127.0.0.1:18100/zrwinfo");
    }

    #[test]
    fn answers_are_classified() {
        let ok = classify(
            200,
            &json!({"code": "0", "msg": "SUCCESS", "smUuid": "10000_1_0_13700000000_1_NKWkEcS_1"}),
        );
        assert_eq!(ok.outcome, DeliveryOutcome::Succeeded);
        assert_eq!(
            ok.provider_message_id.as_deref(),
            Some("10000_1_0_13700000000_1_NKWkEcS_1")
        );
        let batch = classify(200, &json!({"code": "0", "msg": "ok", "batchId": "b-1"}));
        assert_eq!(batch.provider_message_id.as_deref(), Some("b-1"));
        assert_eq!(
            classify(200, &json!({"code": "0"})).outcome,
            DeliveryOutcome::Unknown
        );
        let limited = classify(200, &json!({"code": "9024", "msg": "手机号码超频"}));
        assert_eq!(limited.outcome, DeliveryOutcome::RateLimited);
        let bad = classify(200, &json!({"code": "9017", "msg": "无效的模板ID"}));
        assert_eq!(
            (bad.outcome, bad.reason.unwrap().code.as_str()),
            (DeliveryOutcome::FailedPermanent, "9017")
        );
        assert_eq!(
            classify(200, &json!({"code": 9006, "msg": "x"}))
                .response_code
                .as_deref(),
            Some("9006")
        );
        let bare = classify(503, &serde_json::Value::Null);
        assert_eq!(
            (bare.outcome, bare.reason.unwrap().code.as_str()),
            (DeliveryOutcome::FailedTransient, "503")
        );
        assert_eq!(
            classify(200, &serde_json::Value::Null).outcome,
            DeliveryOutcome::FailedPermanent
        );
    }
}
