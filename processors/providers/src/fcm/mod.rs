//! Firebase Cloud Messaging, HTTP v1 (PROVIDERS-MORE.md §1), channel `PUSH`: one
//! `POST {endpoint}/v1/projects/{project}/messages:send` per message, authorised by an access
//! token from the service account ([`auth`]: RS256 assertion → token, cached for the process,
//! refreshed five minutes before it expires, dropped and fetched again once when FCM answers
//! 401 without an FCM error).
//!
//! The recipient is the registration token. Subject and text become the notification's title
//! and body, `provider_params` the `data` map. Every message carries its id as Android
//! `collapse_key` and notification `tag` and as APNs `apns-collapse-id`, so a copy can only
//! replace its original on the device, and the message's `expires_at` as Android `ttl` and
//! `apns-expiration` (a late code is worse than none). HIGH priority is Android `HIGH`.
//!
//! Errors are classified on the FCM error code (`details[].errorCode`) first, the HTTP status
//! after: `UNREGISTERED` is permanent and marks the device token dead (later sends to it are
//! suppressed by the route stage and the app reads it at `GET /v1/device-tokens/dead`);
//! `INVALID_ARGUMENT`, `SENDER_ID_MISMATCH`, `THIRD_PARTY_AUTH_ERROR`, 401/403 permanent;
//! `QUOTA_EXCEEDED` / 429 rate-limited; `UNAVAILABLE`, `INTERNAL`, `UNSPECIFIED_ERROR`, 5xx
//! transient. FCM has no delivery receipts: accepted by FCM is `delivered`.
//!
//! Config: `endpoint` (`https://fcm.googleapis.com`); credential `service_account` (the key
//! file's JSON; its `token_uri` is where tokens come from); settings `project_id` (default: the
//! service account's), `validate_only` (`true`: FCM validates, delivers nothing).

pub mod auth;

use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_core::util::now_ms;
use herald_schemas::{DeliveryOutcome, MessageRouted, Priority, Reason};
use serde_json::{Value, json};

use crate::http::{http_client, json_call, provider_error};
use crate::settings::Needs;
use crate::token::TokenCache;
use crate::{CallResult, Context, Kind, Provider, ProviderError};

pub const KIND: Kind = Kind {
    name: "fcm",
    channel: herald_schemas::Channel::Push,
    check: |p| Fcm::new(p).map(drop),
    build: |p, _: &Context| Ok(Box::new(Fcm::new(p)?)),
    receipts: None,
    accepts: |a| crate::push_platform(a).0 == PLATFORM,
};

/// The push platform FCM serves: bare tokens and `fcm:<token>`.
pub const PLATFORM: &str = "fcm";
/// FCM's longest time to live (4 weeks).
const MAX_TTL_SECS: i64 = 2_419_200;
/// The FCM error code that means the device token is gone for good.
pub const UNREGISTERED: &str = "UNREGISTERED";

pub struct Fcm {
    client: reqwest::Client,
    send_url: String,
    signer: Option<auth::Signer>,
    validate_only: bool,
    code: String,
    tokens: TokenCache,
}

impl Fcm {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let mut n = Needs::new(p);
        let base = n.endpoint();
        let account = n.credential("service_account");
        let signer = if account.is_empty() {
            None
        } else {
            match auth::Signer::from_json(&account) {
                Ok(s) => Some(s),
                Err(e) => {
                    n.problem(e);
                    None
                }
            }
        };
        let project = n.setting_or(
            "project_id",
            signer
                .as_ref()
                .map_or("", |s| s.account.project_id.as_str()),
        );
        let validate_only = match n.setting_or("validate_only", "false").as_str() {
            "true" => true,
            "false" => false,
            _ => {
                n.problem("settings.validate_only must be true or false");
                false
            }
        };
        n.done()?;
        Ok(Fcm {
            client: http_client(p)?,
            send_url: format!(
                "{base}/v1/projects/{}/messages:send",
                herald_core::sign::pct(&project)
            ),
            signer,
            validate_only,
            code: p.code.clone(),
            tokens: TokenCache::default(),
        })
    }

    async fn token(&self) -> Result<String, CallResult> {
        let Some(signer) = &self.signer else {
            return Err(provider_error(
                DeliveryOutcome::FailedPermanent,
                "invalid_service_account",
                "no service account",
            ));
        };
        self.tokens
            .get(&self.code, || {
                auth::fetch_token(&self.client, signer, now_ms() / 1000)
            })
            .await
    }
}

/// The `messages:send` body for one message.
pub fn body(m: &MessageRouted, validate_only: bool, now: i64) -> Value {
    let id = &m.header.message_id;
    let mut message = json!({
        "token": crate::push_platform(&m.recipient.address).1,
        "android": {
            "collapse_key": id,
            "priority": if m.priority == Priority::High { "HIGH" } else { "NORMAL" },
        },
        "apns": {"headers": {"apns-collapse-id": id}},
    });
    let (title, text) = (&m.content.subject, crate::http::plain_text(m));
    if title.is_some() || !text.is_empty() {
        let mut notification = json!({});
        if let Some(t) = title {
            notification["title"] = json!(t);
        }
        if !text.is_empty() {
            notification["body"] = json!(text);
        }
        message["notification"] = notification;
        message["android"]["notification"] = json!({ "tag": id });
    }
    if !m.content.provider_params.is_empty() {
        message["data"] = json!(m.content.provider_params);
    }
    if let Some(expires) = m.expires_at {
        let ttl = ((expires - now) / 1000).clamp(0, MAX_TTL_SECS);
        message["android"]["ttl"] = json!(format!("{ttl}s"));
        message["apns"]["headers"]["apns-expiration"] = json!((expires / 1000).to_string());
    }
    let mut body = json!({ "message": message });
    if validate_only {
        body["validate_only"] = json!(true);
    }
    body
}

/// The FCM error code of an error answer (`details[]` of type FcmError), if any.
fn fcm_error_code(v: &Value) -> Option<&str> {
    v["error"]["details"].as_array()?.iter().find_map(|d| {
        d["@type"]
            .as_str()
            .is_some_and(|t| t.ends_with("google.firebase.fcm.v1.FcmError"))
            .then(|| d["errorCode"].as_str())
            .flatten()
    })
}

/// Classifies an answer: the FCM error code first, the HTTP status after.
pub fn classify(status: u16, v: &Value) -> CallResult {
    if status == 200 {
        return CallResult::ok("200", v["name"].as_str().map(str::to_owned));
    }
    let fcm = fcm_error_code(v);
    let canonical = v["error"]["status"].as_str();
    let message = v["error"]["message"].as_str().unwrap_or_default();
    let code = fcm
        .or(canonical)
        .map_or_else(|| status.to_string(), str::to_owned);
    let outcome = match (fcm, status) {
        (Some("QUOTA_EXCEEDED"), _) | (None, 429) => DeliveryOutcome::RateLimited,
        (Some("UNAVAILABLE" | "INTERNAL" | "UNSPECIFIED_ERROR"), _) => {
            DeliveryOutcome::FailedTransient
        }
        (Some(_), _) => DeliveryOutcome::FailedPermanent,
        (None, 500.. | 408) => DeliveryOutcome::FailedTransient,
        (None, _) => DeliveryOutcome::FailedPermanent,
    };
    CallResult::fail(
        outcome,
        Some(code.clone()),
        Reason::new(code, format!("FCM HTTP {status}: {message}")),
    )
}

impl Provider for Fcm {
    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let body = body(m, self.validate_only, now_ms());
            let mut refreshed = false;
            loop {
                let token = match self.token().await {
                    Ok(t) => t,
                    Err(r) => return r,
                };
                let (status, v) = match json_call(
                    self.client
                        .post(&self.send_url)
                        .bearer_auth(&token)
                        .json(&body),
                )
                .await
                {
                    Ok(answer) => answer,
                    Err(r) => return r,
                };
                // A token FCM no longer takes (revoked, expired early): FCM refused the call,
                // nothing was sent; fetch a fresh one once.
                if status == 401 && fcm_error_code(&v).is_none() && !refreshed {
                    self.tokens.invalidate(&token).await;
                    refreshed = true;
                    continue;
                }
                return classify(status, &v);
            }
        })
    }

    fn dead_address(&self, r: &CallResult) -> bool {
        r.response_code.as_deref() == Some(UNREGISTERED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_on_the_fcm_code_first() {
        let err = |status: u16, fcm: Option<&str>, canonical: &str| {
            let mut e = json!({"error": {"code": status, "message": "m", "status": canonical}});
            if let Some(code) = fcm {
                e["error"]["details"] = json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}]);
            }
            classify(status, &e)
        };
        use DeliveryOutcome::*;
        for (r, outcome, code) in [
            (
                err(404, Some("UNREGISTERED"), "NOT_FOUND"),
                FailedPermanent,
                "UNREGISTERED",
            ),
            (
                err(400, Some("INVALID_ARGUMENT"), "INVALID_ARGUMENT"),
                FailedPermanent,
                "INVALID_ARGUMENT",
            ),
            (
                err(403, Some("SENDER_ID_MISMATCH"), "PERMISSION_DENIED"),
                FailedPermanent,
                "SENDER_ID_MISMATCH",
            ),
            (
                err(401, Some("THIRD_PARTY_AUTH_ERROR"), "UNAUTHENTICATED"),
                FailedPermanent,
                "THIRD_PARTY_AUTH_ERROR",
            ),
            (
                err(429, Some("QUOTA_EXCEEDED"), "RESOURCE_EXHAUSTED"),
                RateLimited,
                "QUOTA_EXCEEDED",
            ),
            (
                err(503, Some("UNAVAILABLE"), "UNAVAILABLE"),
                FailedTransient,
                "UNAVAILABLE",
            ),
            (
                err(500, Some("INTERNAL"), "INTERNAL"),
                FailedTransient,
                "INTERNAL",
            ),
            (err(500, None, "INTERNAL"), FailedTransient, "INTERNAL"),
            (
                err(403, None, "PERMISSION_DENIED"),
                FailedPermanent,
                "PERMISSION_DENIED",
            ),
            (classify(502, &json!({})), FailedTransient, "502"),
        ] {
            assert_eq!(
                (r.outcome, r.response_code.as_deref()),
                (outcome, Some(code))
            );
        }
        let ok = classify(200, &json!({"name": "projects/p/messages/0:1"}));
        assert_eq!(ok.outcome, Succeeded);
        assert_eq!(
            ok.provider_message_id.as_deref(),
            Some("projects/p/messages/0:1")
        );
    }

    #[test]
    fn the_body_targets_the_token_and_collapses_copies() {
        let mut m = MessageRouted {
            header: herald_schemas::EventHeader {
                event_id: "e".into(),
                event_time: 0,
                stage: "route".into(),
                trace_id: "t".into(),
                message_id: "m-1".into(),
                request_id: "r".into(),
                app_id: "a".into(),
                channel: herald_schemas::Channel::Push,
                attempt: 1,
                metadata: Default::default(),
            },
            recipient: herald_schemas::Recipient {
                address: "tok-123".into(),
                params: Default::default(),
                timezone: None,
            },
            priority: Priority::High,
            expires_at: None,
            template: None,
            template_version: None,
            content: Default::default(),
            provider: "fcm".into(),
            provider_kind: "fcm".into(),
            tried_providers: vec![],
            due_at: None,
        };
        m.content.subject = Some("Hi".into());
        m.content.text = Some("Body".into());
        m.content.provider_params = [("k".to_owned(), "v".to_owned())].into();
        m.expires_at = Some(1_000_000 + 90_500);
        let b = body(&m, false, 1_000_000);
        assert_eq!(
            b,
            json!({"message": {
                "token": "tok-123",
                "notification": {"title": "Hi", "body": "Body"},
                "data": {"k": "v"},
                "android": {"collapse_key": "m-1", "priority": "HIGH", "ttl": "90s",
                            "notification": {"tag": "m-1"}},
                "apns": {"headers": {"apns-collapse-id": "m-1", "apns-expiration": "1090"}},
            }})
        );
        m.content = Default::default();
        m.expires_at = None;
        m.priority = Priority::Normal;
        let b = body(&m, true, 0);
        assert!(b["message"].get("notification").is_none());
        assert_eq!(b["validate_only"], true);
        assert_eq!(b["message"]["android"]["priority"], "NORMAL");
    }
}
