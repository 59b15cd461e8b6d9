//! 极光 JPush Push API v3 (PROVIDERS-MORE.md §5.2), channel `PUSH`, addresses
//! `jpush:<registration id>`. Chosen over Getui for its documented auth (HTTP Basic, with an
//! official example pinned below) and its official HTTP status spec; Getui's token exchange and
//! its 30000-series codes are only partly documented.
//!
//! One `POST {endpoint}/v3/push` per message: `platform` `all`, `audience.registration_id` the
//! one device; a title or body becomes `notification` (`alert`, Android `title`, `extras` =
//! `provider_params`), otherwise an in-app `message` carrying the parameters; `options`:
//! `time_to_live` from `expires_at`, `apns_production`, `sendno` (from the message id).
//!
//! Answers: 200 `{"sendno","msg_id"}` (no receipts: accepted is `delivered`); errors are a
//! non-200 status with `{"error":{"code","message"}}`: `1011` (the audience matched no active
//! user) is permanent and marks the registration id dead; `1000`, `1030` and 5xx transient;
//! `2002` and 429 rate-limited; the rest permanent.
//!
//! Config: `endpoint` (`https://api.jpush.cn`); credentials `app_key`, `master_secret`; settings
//! `apns_production` (`true` default | `false`), `validate_only` (`true`: `/v3/push/validate`).

use base64::Engine;
use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_core::util::now_ms;
use herald_schemas::{DeliveryOutcome, MessageRouted, Reason};
use serde_json::{Value, json};

use crate::http::{http_client, json_call};
use crate::settings::Needs;
use crate::{CallResult, Context, Kind, Provider, ProviderError};

pub const KIND: Kind = Kind {
    name: "jpush",
    channel: herald_schemas::Channel::Push,
    check: |p| Jpush::new(p).map(drop),
    build: |p, _: &Context| Ok(Box::new(Jpush::new(p)?)),
    receipts: None,
    accepts: |a| crate::push_platform(a).0 == PLATFORM,
};

pub const PLATFORM: &str = "jpush";
/// The code for an audience that matched no (active) device.
pub const NO_TARGET: &str = "1011";

pub struct Jpush {
    client: reqwest::Client,
    url: String,
    authorization: String,
    apns_production: bool,
}

/// `Basic base64(appKey:masterSecret)`.
pub fn authorization(app_key: &str, master_secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{app_key}:{master_secret}"))
    )
}

fn flag(n: &mut Needs, name: &str, default: &str) -> bool {
    match n.setting_or(name, default).as_str() {
        "true" => true,
        "false" => false,
        _ => {
            n.problem(format!("settings.{name} must be true or false"));
            false
        }
    }
}

impl Jpush {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let mut n = Needs::new(p);
        let base = n.endpoint();
        let app_key = n.credential("app_key");
        let master_secret = n.credential("master_secret");
        let apns_production = flag(&mut n, "apns_production", "true");
        let validate_only = flag(&mut n, "validate_only", "false");
        n.done()?;
        Ok(Jpush {
            client: http_client(p)?,
            url: format!(
                "{base}/v3/push{}",
                if validate_only { "/validate" } else { "" }
            ),
            authorization: authorization(&app_key, &master_secret),
            apns_production,
        })
    }
}

/// The push body for one message.
pub fn body(m: &MessageRouted, apns_production: bool, now: i64) -> Value {
    let (_, rid) = crate::push_platform(&m.recipient.address);
    let text = crate::http::plain_text(m);
    let extras = json!(m.content.provider_params);
    // A number the answer echoes: from the message id, so an answer names its message.
    let sendno = m
        .header
        .message_id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
        % 2_147_483_647;
    let mut body = json!({
        "platform": "all",
        "audience": {"registration_id": [rid]},
        "options": {"apns_production": apns_production, "sendno": sendno},
    });
    if m.content.subject.is_some() || !text.is_empty() {
        let mut android = json!({ "extras": extras });
        if let Some(t) = &m.content.subject {
            android["title"] = json!(t);
        }
        body["notification"] = json!({
            "alert": text,
            "android": android,
            "ios": {"alert": text, "sound": "default", "extras": extras},
        });
    } else {
        body["message"] = json!({"msg_content": extras.to_string(), "extras": extras});
    }
    if let Some(expires) = m.expires_at {
        body["options"]["time_to_live"] = json!(((expires - now) / 1000).max(0));
    }
    body
}

/// An answer, classified on JPush's code first, the HTTP status after.
pub fn classify(status: u16, v: &Value) -> CallResult {
    if status == 200
        && let Some(id) = v["msg_id"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| v["msg_id"].as_i64().map(|n| n.to_string()))
    {
        return CallResult::ok("200", Some(id));
    }
    let code = v["error"]["code"].as_i64().map(|c| c.to_string());
    let message = v["error"]["message"].as_str().unwrap_or_default();
    let outcome = match (code.as_deref(), status) {
        (Some("2002"), _) | (_, 429) => DeliveryOutcome::RateLimited,
        (Some("1000" | "1030"), _) | (None, 500.. | 408) => DeliveryOutcome::FailedTransient,
        (None, 200) => DeliveryOutcome::Unknown,
        _ => DeliveryOutcome::FailedPermanent,
    };
    let code = code.unwrap_or_else(|| status.to_string());
    CallResult::fail(
        outcome,
        Some(code.clone()),
        Reason::new(code, format!("JPush HTTP {status}: {message}")),
    )
}

impl Provider for Jpush {
    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let body = body(m, self.apns_production, now_ms());
            match json_call(
                self.client
                    .post(&self.url)
                    .header("authorization", &self.authorization)
                    .json(&body),
            )
            .await
            {
                Ok((status, v)) => classify(status, &v),
                Err(r) => r,
            }
        })
    }

    fn dead_address(&self, r: &CallResult) -> bool {
        r.response_code.as_deref() == Some(NO_TARGET)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_matches_the_official_example() {
        // [OFFICIAL VECTOR] JPush REST overview.
        assert_eq!(
            authorization("7d431e42dfa6a6d693ac2d04", "5e987ac6d2e04d95a9d8f0d1"),
            "Basic N2Q0MzFlNDJkZmE2YTZkNjkzYWMyZDA0OjVlOTg3YWM2ZDJlMDRkOTVhOWQ4ZjBkMQ=="
        );
    }

    #[test]
    fn answers_are_classified() {
        use DeliveryOutcome::*;
        let ok = classify(200, &json!({"sendno": "18", "msg_id": "1828256757"}));
        assert_eq!(
            (ok.outcome, ok.provider_message_id.as_deref()),
            (Succeeded, Some("1828256757"))
        );
        let err = |status: u16, code: i64| {
            classify(status, &json!({"error": {"code": code, "message": "m"}}))
        };
        for (r, outcome, code) in [
            (err(400, 1011), FailedPermanent, "1011"),
            (err(401, 1004), FailedPermanent, "1004"),
            (err(400, 1003), FailedPermanent, "1003"),
            (err(500, 1000), FailedTransient, "1000"),
            (err(503, 1030), FailedTransient, "1030"),
            (err(429, 2002), RateLimited, "2002"),
            (classify(502, &Value::Null), FailedTransient, "502"),
        ] {
            assert_eq!(
                (r.outcome, r.response_code.as_deref()),
                (outcome, Some(code))
            );
        }
    }
}
