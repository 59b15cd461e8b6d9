//! Apple Push Notification service, HTTP/2 provider API with token auth (PROVIDERS-MORE.md §2),
//! channel `PUSH`, addresses `apns:<hex device token>`. One `POST {endpoint}/3/device/<token>`
//! per message over HTTP/2 only (prior knowledge: ALPN `h2` over TLS to Apple, h2c to a local
//! simulator), on connections kept open and reused.
//!
//! The provider token is an ES256 JWT (`kid` = Key ID, `iss` = Team ID, `iat`) signed with the
//! `.p8` key, minted once per process for each team and key (shared by every APNs provider of
//! the process) and reused for 50 minutes (Apple: refresh no more than
//! once every 20 minutes and no less than once an hour, counted per team); an
//! `ExpiredProviderToken` answer mints a fresh one and sends once more.
//!
//! Headers: `apns-topic` (the bundle id), `apns-push-type` (`alert` with a title or body, else
//! `background`), `apns-priority` (10 for HIGH alerts, else 5; background is always 5),
//! `apns-id` and `apns-collapse-id` (the message id: a copy replaces its original on the
//! device), `apns-expiration` (the message's `expires_at`). Payload: `aps.alert` {title, body},
//! or `aps.content-available` for a background push, plus `provider_params` as custom keys.
//!
//! Answers: 200 with `apns-id`; otherwise `{"reason"}` classed per Apple's table: 410
//! `Unregistered` / `ExpiredToken` permanent and the token dead; `TooManyRequests`,
//! `TooManyProviderTokenUpdates` rate-limited; 5xx, `IdleTimeout`, `Shutdown` transient; the
//! rest permanent. No receipts: accepted by APNs is `delivered`.
//!
//! 400 `BadDeviceToken` fails the message (permanent) but does not mark the token dead: Apple
//! answers it for a token of the other environment (a development token sent to production,
//! or the reverse) as well as for a malformed one, and the first is a configuration mistake
//! the operator fixes by pointing the provider at the right `endpoint` — the app's token is
//! fine, and suppressing it would lose every later message to that device.
//!
//! Config: `endpoint` (`https://api.push.apple.com`, or `https://api.sandbox.push.apple.com`);
//! credential `auth_key` (the `.p8` file's PEM); settings `team_id`, `key_id`, `topic`.

use std::sync::Mutex;

use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_core::util::now_ms;
use herald_schemas::{DeliveryOutcome, MessageRouted, Priority, Reason};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::http::{http_client_builder, provider_error, read_capped, transport_failure};
use crate::settings::Needs;
use crate::{CallResult, Context, Kind, Provider, ProviderError};

pub const KIND: Kind = Kind {
    name: "apns",
    channel: herald_schemas::Channel::Push,
    check: |p| Apns::new(p).map(drop),
    build: |p, _: &Context| Ok(Box::new(Apns::new(p)?)),
    receipts: None,
    accepts: |a| crate::push_platform(a).0 == PLATFORM,
};

pub const PLATFORM: &str = "apns";
/// A provider token is reused this long (Apple: between 20 and 60 minutes).
pub const TOKEN_REUSE_SECS: i64 = 50 * 60;

pub struct Apns {
    client: reqwest::Client,
    base: String,
    topic: String,
    team_id: String,
    key_id: String,
    key: Option<EncodingKey>,
}

/// The current provider token and its `iat` per (Team ID, Key ID), shared by every APNs
/// provider of the process: Apple counts token updates per team, so two providers of one team
/// minting their own would be refused (`TooManyProviderTokenUpdates`).
static TOKENS: Mutex<Vec<(TeamKey, (String, i64))>> = Mutex::new(Vec::new());

/// (Team ID, Key ID).
type TeamKey = (String, String);

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: i64,
}

/// An ES256 provider token: header `{"alg":"ES256","kid"}`, claims `{"iss","iat"}`, the
/// signature raw `r||s` (JWS).
pub fn provider_token(
    key: &EncodingKey,
    key_id: &str,
    team_id: &str,
    iat: i64,
) -> Result<String, String> {
    let mut header = Header::new(Algorithm::ES256);
    header.typ = None;
    header.kid = Some(key_id.to_owned());
    jsonwebtoken::encode(&header, &Claims { iss: team_id, iat }, key).map_err(|e| e.to_string())
}

impl Apns {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        let mut n = Needs::new(p);
        let base = n.endpoint();
        let pem = n.credential("auth_key");
        let key = if pem.is_empty() {
            None
        } else {
            match EncodingKey::from_ec_pem(pem.as_bytes()) {
                Ok(k) => Some(k),
                Err(_) => {
                    n.problem("credential auth_key is not a P-256 PEM key (the .p8 file)");
                    None
                }
            }
        };
        let team_id = n.setting("team_id");
        let key_id = n.setting("key_id");
        let topic = n.setting("topic");
        n.done()?;
        let client = http_client_builder(p)
            .http2_prior_knowledge()
            .build()
            .map_err(|e| ProviderError::one(p, e.to_string()))?;
        Ok(Apns {
            client,
            base,
            topic,
            team_id,
            key_id,
            key,
        })
    }

    /// The provider token: the current one while younger than [`TOKEN_REUSE_SECS`] (unless
    /// APNs called it expired), else a fresh one.
    fn token(&self, now: i64, expired: Option<&str>) -> Result<String, CallResult> {
        let mut all = TOKENS.lock().unwrap_or_else(|p| p.into_inner());
        let id = (self.team_id.clone(), self.key_id.clone());
        let slot = all.iter().position(|(k, _)| *k == id);
        if let Some((_, (t, iat))) = slot.map(|i| &all[i])
            && now - iat < TOKEN_REUSE_SECS
            && expired != Some(t.as_str())
        {
            return Ok(t.clone());
        }
        let key = self.key.as_ref().ok_or_else(|| {
            provider_error(
                DeliveryOutcome::FailedPermanent,
                "invalid_auth_key",
                "no auth key",
            )
        })?;
        let t = provider_token(key, &self.key_id, &self.team_id, now).map_err(|e| {
            provider_error(
                DeliveryOutcome::FailedPermanent,
                "invalid_auth_key",
                &format!("signing the provider token: {e}"),
            )
        })?;
        metrics::counter!(herald_core::telemetry::names::TOKEN_FETCHES, "provider" => "apns")
            .increment(1);
        match slot {
            Some(i) => all[i].1 = (t.clone(), now),
            None => all.push((id, (t.clone(), now))),
        }
        Ok(t)
    }
}

/// The payload: an alert with the title and body, or a background push; custom keys from
/// `provider_params`.
pub fn payload(m: &MessageRouted) -> (Value, bool) {
    let text = crate::http::plain_text(m);
    let alert = m.content.subject.is_some() || !text.is_empty();
    let mut body = serde_json::Map::new();
    for (k, v) in &m.content.provider_params {
        if k != "aps" {
            body.insert(k.clone(), json!(v));
        }
    }
    let aps = if alert {
        let mut a = serde_json::Map::new();
        if let Some(t) = &m.content.subject {
            a.insert("title".into(), json!(t));
        }
        if !text.is_empty() {
            a.insert("body".into(), json!(text));
        }
        json!({ "alert": a })
    } else {
        json!({ "content-available": 1 })
    };
    body.insert("aps".into(), aps);
    (Value::Object(body), alert)
}

/// An answer, classed per Apple's reason table.
pub fn classify(status: u16, reason: &str) -> CallResult {
    let outcome = match (status, reason) {
        (_, "TooManyRequests" | "TooManyProviderTokenUpdates") | (429, _) => {
            DeliveryOutcome::RateLimited
        }
        (_, "IdleTimeout" | "Shutdown" | "ServiceUnavailable" | "InternalServerError")
        | (500.., _) => DeliveryOutcome::FailedTransient,
        _ => DeliveryOutcome::FailedPermanent,
    };
    let code = if reason.is_empty() {
        status.to_string()
    } else {
        reason.to_owned()
    };
    CallResult::fail(
        outcome,
        Some(code.clone()),
        Reason::new(code, format!("APNs HTTP {status} {reason}")),
    )
}

impl Provider for Apns {
    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let (_, device) = crate::push_platform(&m.recipient.address);
            let (body, alert) = payload(m);
            let body = body.to_string();
            let id = &m.header.message_id;
            let priority = if alert && m.priority == Priority::High {
                "10"
            } else {
                "5"
            };
            let mut expired: Option<String> = None;
            loop {
                let token = match self.token(now_ms() / 1000, expired.as_deref()) {
                    Ok(t) => t,
                    Err(r) => return r,
                };
                let mut req = self
                    .client
                    .post(format!("{}/3/device/{device}", self.base))
                    .header("authorization", format!("bearer {token}"))
                    .header("apns-topic", &self.topic)
                    .header("apns-push-type", if alert { "alert" } else { "background" })
                    .header("apns-priority", priority)
                    .header("apns-collapse-id", id.as_str())
                    .header("content-type", "application/json");
                if uuid::Uuid::parse_str(id).is_ok() {
                    req = req.header("apns-id", id.as_str());
                }
                if let Some(expires) = m.expires_at {
                    req = req.header("apns-expiration", (expires / 1000).max(0).to_string());
                }
                let resp = match req.body(body.clone()).send().await {
                    Ok(r) => r,
                    Err(e) => return transport_failure(e),
                };
                let status = resp.status().as_u16();
                let apns_id = resp
                    .headers()
                    .get("apns-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let answer = match read_capped(resp).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                if status == 200 {
                    return CallResult::ok("200", apns_id.or_else(|| Some(id.clone())));
                }
                let reason = serde_json::from_slice::<Value>(&answer)
                    .ok()
                    .and_then(|v| v["reason"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                // APNs refused the token, so nothing was sent: mint a fresh one, once.
                if reason == "ExpiredProviderToken" && expired.is_none() {
                    expired = Some(token);
                    continue;
                }
                return classify(status, &reason);
            }
        })
    }

    fn dead_address(&self, r: &CallResult) -> bool {
        matches!(
            r.response_code.as_deref(),
            Some("Unregistered" | "ExpiredToken")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::DecodingKey;

    const A3_X: &str = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
    const A3_Y: &str = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";

    fn verifies(input: &str, sig: &str) -> bool {
        let key = DecodingKey::from_ec_components(A3_X, A3_Y).unwrap();
        jsonwebtoken::crypto::verify(sig, input.as_bytes(), &key, Algorithm::ES256).unwrap()
    }

    #[test]
    fn es256_verifies_the_rfc7515_a3_vector_and_the_derived_apns_token() {
        // [OFFICIAL VECTOR] RFC 7515 A.3 (ECDSA is randomised: a verifier test).
        assert!(verifies(
            "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ",
            "DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q"
        ));
        // [DERIVED] PROVIDERS-MORE.md §2.2: the APNs-shaped token, RFC 6979 signature.
        let input = "eyJhbGciOiJFUzI1NiIsImtpZCI6IkFCQzEyM0RFRkcifQ.eyJpc3MiOiJERUYxMjNHSElKIiwiaWF0IjoxNDM3MTc5MDM2fQ";
        assert!(verifies(
            input,
            "DsvSgkxE3Olsjv2UQ_kVzPZi7Xgx81ZbYtdqr58sck_g_b33F6HN3NJZHdVRZsxAvMBnCAFDZbXtUg5P1NtVBg"
        ));
        // A changed claim (another iat) no longer verifies.
        assert!(input.contains("MDM2"));
        assert!(!verifies(
            &input.replace("MDM2", "MDM3"),
            "DsvSgkxE3Olsjv2UQ_kVzPZi7Xgx81ZbYtdqr58sck_g_b33F6HN3NJZHdVRZsxAvMBnCAFDZbXtUg5P1NtVBg"
        ));
    }

    #[test]
    fn the_provider_token_has_apples_header_and_claims_and_verifies() {
        let key = EncodingKey::from_ec_pem(include_bytes!("testdata/rfc7515-a3.p8")).unwrap();
        let t = provider_token(&key, "ABC123DEFG", "DEF123GHIJ", 1_437_179_036).unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        // Compact JSON in Apple's order: the derived fixture's signing input exactly.
        assert_eq!(
            format!("{}.{}", parts[0], parts[1]),
            "eyJhbGciOiJFUzI1NiIsImtpZCI6IkFCQzEyM0RFRkcifQ.eyJpc3MiOiJERUYxMjNHSElKIiwiaWF0IjoxNDM3MTc5MDM2fQ"
        );
        // Raw r||s: 64 bytes.
        use base64::Engine;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[2])
            .unwrap();
        assert_eq!(sig.len(), 64);
        assert!(verifies(&format!("{}.{}", parts[0], parts[1]), parts[2]));
    }

    #[test]
    fn reasons_are_classed_per_apples_table() {
        use DeliveryOutcome::*;
        for (status, reason, outcome) in [
            (410, "Unregistered", FailedPermanent),
            (400, "BadDeviceToken", FailedPermanent),
            (403, "InvalidProviderToken", FailedPermanent),
            (413, "PayloadTooLarge", FailedPermanent),
            (429, "TooManyRequests", RateLimited),
            (429, "TooManyProviderTokenUpdates", RateLimited),
            (400, "IdleTimeout", FailedTransient),
            (500, "InternalServerError", FailedTransient),
            (503, "Shutdown", FailedTransient),
            (502, "", FailedTransient),
        ] {
            let r = classify(status, reason);
            assert_eq!(r.outcome, outcome, "{reason}");
        }
        assert_eq!(classify(502, "").response_code.as_deref(), Some("502"));
    }
}
