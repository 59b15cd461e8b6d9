//! Provider simulators: one HTTP server standing in for every provider Herald calls, checking
//! each request as the real service does (PROVIDERS.md: signatures, timestamps, nonces, required
//! fields, limits, error envelopes) and answering in the real formats. Test peers, also used by
//! the demo and the benchmarks.
//!
//! Paths: `/aliyun/`, `/tencent/`, `/dingtalk/robot/send`, `/feishu/open-apis/bot/v2/hook/{id}`,
//! `/wecom/cgi-bin/{webhook/send,gettoken,message/send}`,
//! `/wechat/cgi-bin/{stable_token,message/template/send}`, `/huawei/sms/batchSendSms/v1`,
//! `/fcm/token`, `/fcm/v1/projects/{project}/messages:send`,
//! `/zrwinfo/api/v2/{single_send,send}`, `/apns/3/device/{token}` (HTTP/2 only),
//! `/jpush/v3/push[/validate]`.
//!
//! Control (for tests): `POST /_control/{provider}/faults` appends scripted faults (each consumed
//! by the next request that passes authentication; `DELETE` drops what is left), `PUT /_control/{provider}/limit` sets a
//! per-minute limit, `POST /_control/{provider}/revoke` revokes the current access token,
//! `PUT /_control/{provider}/receipts` sets where receipts are pushed, `POST /_alerts` is an
//! operator endpoint for Herald's alert action,
//! `GET /_log/{provider}` lists accepted sends, `POST /_reset` clears everything.

pub mod aliyun;
pub mod apns;
pub mod fcm;
pub mod huawei;
pub mod jpush;
pub mod robots;
pub mod tencent;
pub mod weixin;
pub mod zrwinfo;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use herald_core::util::now_ms;
use serde::Deserialize;
use serde_json::{Value, json};

/// Credentials the simulators accept: `(environment variable, default)`. Herald's test and demo
/// configs name the same variables in `credentials_env`, so both sides agree.
pub const CREDENTIALS: &[(&str, &str)] = &[
    ("HERALD_SIM_ALIYUN_KEY_ID", "sim-aliyun-key"),
    ("HERALD_SIM_ALIYUN_KEY_SECRET", "sim-aliyun-secret"),
    ("HERALD_SIM_TENCENT_SECRET_ID", "AKIDsimtencent"),
    ("HERALD_SIM_TENCENT_SECRET_KEY", "sim-tencent-secret"),
    ("HERALD_SIM_HUAWEI_APP_KEY", "simHuaweiAppKey0001"),
    ("HERALD_SIM_HUAWEI_APP_SECRET", "sim-huawei-app-secret"),
    ("HERALD_SIM_DINGTALK_TOKEN", "sim-dingtalk-token"),
    ("HERALD_SIM_DINGTALK_SECRET", "SECsimdingtalk"),
    ("HERALD_SIM_FEISHU_HOOK", "0b6b5b3c-sim-feishu-hook"),
    ("HERALD_SIM_FEISHU_SECRET", "sim-feishu-secret"),
    ("HERALD_SIM_WECOM_KEY", "sim-wecom-robot-key"),
    ("HERALD_SIM_WECOM_CORP_ID", "wwsimcorp"),
    ("HERALD_SIM_WECOM_CORP_SECRET", "sim-wecom-corp-secret"),
    ("HERALD_SIM_WECHAT_APP_ID", "wxsimapp"),
    ("HERALD_SIM_WECHAT_APP_SECRET", "sim-wechat-app-secret"),
    ("HERALD_SIM_ZRWINFO_ACCESS_KEY", "simZrwinfoAccessKey"),
    ("HERALD_SIM_ZRWINFO_SECRET", "sim-zrwinfo-secret"),
    ("HERALD_SIM_APNS_AUTH_KEY", apns::AUTH_KEY),
    ("HERALD_SIM_JPUSH_APP_KEY", "7d431e42dfa6a6d693ac2d04"),
    ("HERALD_SIM_JPUSH_MASTER_SECRET", "sim-jpush-master-secret"),
    ("HERALD_SIM_CALLBACK_TOKEN", "sim-callback-token"),
    // A test key file: its private key is the simulator's registered service account.
    ("HERALD_SIM_FCM_SERVICE_ACCOUNT", fcm::SERVICE_ACCOUNT),
    (
        "HERALD_SIM_ALERT_SECRET",
        "whsec_c2ltLWFsZXJ0LXNlY3JldC0wMTIzNDU2Nzg5",
    ),
];

/// The value of a simulator credential (environment, else the default).
pub fn credential(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        CREDENTIALS
            .iter()
            .find(|(v, _)| *v == var)
            .map(|(_, d)| (*d).to_owned())
            .unwrap_or_default()
    })
}

/// A scripted misbehaviour, consumed by the next authenticated request to that provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Answer with the provider's error envelope carrying this code.
    Error {
        code: String,
        #[serde(default)]
        message: String,
    },
    /// Take the request (it counts as sent), then answer only after `ms`.
    Timeout { ms: u64 },
    /// Answer normally after `ms`.
    Slow { ms: u64 },
    /// Take the request and answer success; its delivery receipts (SMS) then report every
    /// number undelivered with this code.
    Undelivered {
        code: String,
        #[serde(default)]
        message: String,
    },
    /// Take the request and answer success; no receipt is ever pushed for it (SMS).
    NoReceipt,
}

impl Fault {
    /// The receipt code and message an `Undelivered` fault scripts.
    pub fn undelivered(fault: &Option<Fault>) -> Option<(String, String)> {
        match fault {
            Some(Fault::Undelivered { code, message }) => Some((code.clone(), message.clone())),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Inner {
    faults: HashMap<String, VecDeque<Fault>>,
    accepted: HashMap<String, Vec<Value>>,
    requests: HashMap<String, u64>,
    rejected: HashMap<String, u64>,
    /// Nonce → when it may be used again.
    nonces: HashMap<String, i64>,
    /// The nonces in the order they were seen, with when they expire.
    nonce_order: VecDeque<(i64, String)>,
    windows: HashMap<String, VecDeque<i64>>,
    limits: HashMap<String, (u32, i64)>,
    tokens: HashMap<String, Vec<String>>,
    serial: u64,
}

pub struct Sim {
    inner: Mutex<Inner>,
    http: reqwest::Client,
    /// Where SMS receipts are pushed (Herald's callback endpoint), per provider.
    receipt_urls: Mutex<HashMap<String, String>>,
}

impl Sim {
    pub fn new(receipt_urls: HashMap<String, String>) -> Arc<Sim> {
        Arc::new(Sim {
            inner: Mutex::new(Inner::default()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            receipt_urls: Mutex::new(receipt_urls),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn count_request(&self, provider: &str) {
        *self.lock().requests.entry(provider.into()).or_default() += 1;
    }

    pub fn count_rejected(&self, provider: &str) {
        *self.lock().rejected.entry(provider.into()).or_default() += 1;
    }

    pub fn next_fault(&self, provider: &str) -> Option<Fault> {
        self.lock().faults.get_mut(provider)?.pop_front()
    }

    pub fn record(&self, provider: &str, entry: Value) {
        self.lock()
            .accepted
            .entry(provider.into())
            .or_default()
            .push(entry);
    }

    /// A nonce not seen in the last `window_ms` (replays are refused).
    pub fn fresh_nonce(&self, provider: &str, nonce: &str, window_ms: i64) -> bool {
        let now = now_ms();
        let mut g = self.lock();
        // Forgotten as they expire, a few per call: a scan of every nonce of the window on
        // each call, under the lock every handler shares, made the simulators slower the
        // longer a chaos run went. (Kept in the order seen: with two window lengths a short
        // one may wait behind a long one; memory stays bounded by the longest window.)
        while let Some((expires, _)) = g.nonce_order.front() {
            if *expires > now {
                break;
            }
            if let Some((expires, key)) = g.nonce_order.pop_front()
                && g.nonces.get(&key) == Some(&expires)
            {
                g.nonces.remove(&key);
            }
        }
        let key = format!("{provider}/{nonce}");
        if g.nonces.get(&key).is_some_and(|expires| *expires > now) {
            return false;
        }
        g.nonces.insert(key.clone(), now + window_ms);
        g.nonce_order.push_back((now + window_ms, key));
        true
    }

    /// Sliding window (60 s unless a test shortened it): false when `key` is over its
    /// provider's limit.
    pub fn within_limit(&self, provider: &str, key: &str, default_per_minute: u32) -> bool {
        let now = now_ms();
        let mut g = self.lock();
        let (limit, window) = g
            .limits
            .get(provider)
            .copied()
            .unwrap_or((default_per_minute, 60_000));
        if limit == 0 {
            return true;
        }
        let w = g.windows.entry(format!("{provider}/{key}")).or_default();
        while w.front().is_some_and(|t| now - t >= window) {
            w.pop_front();
        }
        if w.len() >= limit as usize {
            return false;
        }
        w.push_back(now);
        true
    }

    pub fn next_serial(&self) -> u64 {
        let mut g = self.lock();
        g.serial += 1;
        g.serial
    }

    /// Issues (or returns the current) access token for a provider account.
    pub fn token(&self, provider: &str, fresh: bool) -> String {
        let mut g = self.lock();
        let tokens = g.tokens.entry(provider.into()).or_default();
        if fresh || tokens.last().is_none_or(|t| t.starts_with("revoked-")) {
            tokens.push(format!(
                "{provider}-token-{}",
                uuid::Uuid::new_v4().simple()
            ));
        }
        tokens.last().cloned().unwrap_or_default()
    }

    /// Records a token issued by the provider's own token endpoint (several stay live at once,
    /// as Google's do, until they expire or are revoked).
    pub fn issue(&self, provider: &str, token: String) {
        self.lock()
            .tokens
            .entry(provider.into())
            .or_default()
            .push(token);
    }

    /// Whether `token` was issued here and not revoked since.
    pub fn token_live(&self, provider: &str, token: &str) -> bool {
        self.lock().tokens.get(provider).is_some_and(|t| {
            t.iter()
                .rposition(|x| x == token)
                .is_some_and(|at| !t[at..].iter().any(|x| x.starts_with("revoked-")))
        })
    }

    /// Runs `f` on a provider's token list (providers with their own token rules).
    pub fn with_tokens<R>(&self, provider: &str, f: impl FnOnce(&mut Vec<String>) -> R) -> R {
        f(self.lock().tokens.entry(provider.into()).or_default())
    }

    /// Whether `token` was issued here at some point (then a refused one is "expired").
    pub fn token_known(&self, provider: &str, token: &str) -> bool {
        self.lock()
            .tokens
            .get(provider)
            .is_some_and(|t| t.iter().any(|x| x == token))
    }

    /// Whether `token` is the live one. Revoked and superseded tokens are refused.
    pub fn token_valid(&self, provider: &str, token: &str) -> bool {
        self.lock()
            .tokens
            .get(provider)
            .and_then(|t| t.last())
            .is_some_and(|t| t == token)
    }

    fn revoke(&self, provider: &str) {
        if let Some(t) = self.lock().tokens.get_mut(provider) {
            t.push(format!("revoked-{}", uuid::Uuid::new_v4().simple()));
        }
    }

    /// Pushes a receipt body to the provider's receipt URL in the background, retrying like the
    /// real platforms do (compressed: 1 s, 2 s, 4 s).
    pub fn push_receipt(self: &Arc<Self>, provider: &str, body: Value, delay: Duration) {
        self.push(provider, Push::Json(body), delay);
    }

    /// A receipt pushed as a form (Huawei's status reports).
    pub fn push_form_receipt(self: &Arc<Self>, provider: &str, body: String, delay: Duration) {
        self.push(provider, Push::Form(body), delay);
    }

    fn push(self: &Arc<Self>, provider: &str, body: Push, delay: Duration) {
        let url = self
            .receipt_urls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(provider)
            .cloned();
        let Some(url) = url else {
            return;
        };
        let sim = self.clone();
        let provider = provider.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            for wait in [1u64, 2, 4, 8, 15, 30, 60, 60, 60, 60, 0] {
                let req = sim.http.post(&url);
                let req = match &body {
                    Push::Json(v) => req.json(v),
                    Push::Form(f) => req
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(f.clone()),
                };
                let ok = req.send().await.is_ok_and(|r| r.status().is_success());
                if ok {
                    let recorded = match body {
                        Push::Json(v) => v,
                        Push::Form(f) => Value::String(f),
                    };
                    sim.record(&format!("{provider}-receipts"), recorded);
                    return;
                }
                if wait == 0 {
                    tracing::warn!(%provider, "receipt push gave up");
                    return;
                }
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
        });
    }
}

/// A receipt push's body.
enum Push {
    Json(Value),
    Form(String),
}

/// Applies a fault before the request is processed: an error to answer (`Err`), a slow answer
/// (slept here), or a timeout, answered as how long to hang *after* processing (`Ok(Some(ms))`):
/// the provider takes the request, the answer never comes in time. Handlers process before they
/// hang, so a client that gives up does not cancel the send.
pub async fn apply_fault(fault: Option<Fault>) -> Result<Option<u64>, (String, String)> {
    match fault {
        Some(Fault::Error { code, message }) => Err((code, message)),
        Some(Fault::Slow { ms }) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(None)
        }
        Some(Fault::Timeout { ms }) => Ok(Some(ms)),
        Some(Fault::Undelivered { .. } | Fault::NoReceipt) | None => Ok(None),
    }
}

/// The hang of a timeout fault, after processing.
pub async fn hang(ms: Option<u64>) {
    if let Some(ms) = ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

async fn add_faults(
    State(sim): State<Arc<Sim>>,
    Path(provider): Path<String>,
    Json(faults): Json<Vec<Fault>>,
) -> Json<Value> {
    let mut g = sim.lock();
    let q = g.faults.entry(provider).or_default();
    q.extend(faults);
    Json(json!({"queued": q.len()}))
}

/// Drops the faults still queued for a provider (a test cleaning up after itself).
async fn clear_faults(State(sim): State<Arc<Sim>>, Path(provider): Path<String>) -> Json<Value> {
    let dropped = sim.lock().faults.remove(&provider).map_or(0, |q| q.len());
    Json(json!({ "dropped": dropped }))
}

#[derive(Deserialize)]
struct Limit {
    per_minute: u32,
    /// Shortens the window for tests (default 60 s).
    #[serde(default)]
    window_ms: Option<i64>,
}

async fn set_limit(
    State(sim): State<Arc<Sim>>,
    Path(provider): Path<String>,
    Json(l): Json<Limit>,
) -> Json<Value> {
    sim.lock()
        .limits
        .insert(provider, (l.per_minute, l.window_ms.unwrap_or(60_000)));
    Json(json!({"ok": true}))
}

#[derive(Deserialize)]
struct ReceiptTarget {
    url: String,
}

async fn set_receipts(
    State(sim): State<Arc<Sim>>,
    Path(provider): Path<String>,
    Json(t): Json<ReceiptTarget>,
) -> Json<Value> {
    sim.receipt_urls
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(provider, t.url);
    Json(json!({"ok": true}))
}

/// A generic receiver for Herald's webhooks to apps (status callbacks): records the headers and
/// body under `hooks-<name>` for the test to verify; scripted faults (`hooks-<name>`) answer 500.
async fn hook(
    State(sim): State<Arc<Sim>>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    let log = format!("hooks-{name}");
    sim.count_request(&log);
    if let Err((_, _)) = apply_fault(sim.next_fault(&log)).await {
        return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
    }
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    sim.record(
        &log,
        json!({
            "webhook-id": h("webhook-id"),
            "webhook-timestamp": h("webhook-timestamp"),
            "webhook-signature": h("webhook-signature"),
            "body": String::from_utf8_lossy(&body),
        }),
    );
    axum::http::StatusCode::NO_CONTENT
}

/// An operator endpoint for Herald's `alert` rule action: verifies the Standard Webhooks
/// signature (secret `HERALD_SIM_ALERT_SECRET`) and records the alert under `alerts`.
async fn alert(
    State(sim): State<Arc<Sim>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let key = herald_core::util::webhook_key(&credential("HERALD_SIM_ALERT_SECRET"));
    let ok = herald_core::util::standard_webhook_verify(
        &key,
        &h("webhook-id"),
        &h("webhook-timestamp"),
        &h("webhook-signature"),
        &body,
        now_ms() / 1000,
        300,
    );
    if !ok {
        sim.count_rejected("alerts");
        return axum::http::StatusCode::UNAUTHORIZED;
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    sim.record("alerts", v);
    axum::http::StatusCode::NO_CONTENT
}

async fn revoke(State(sim): State<Arc<Sim>>, Path(provider): Path<String>) -> Json<Value> {
    sim.revoke(&provider);
    Json(json!({"ok": true}))
}

async fn log(State(sim): State<Arc<Sim>>, Path(provider): Path<String>) -> Json<Value> {
    let g = sim.lock();
    Json(json!({
        "accepted": g.accepted.get(&provider).cloned().unwrap_or_default(),
        "requests": g.requests.get(&provider).copied().unwrap_or_default(),
        "rejected": g.rejected.get(&provider).copied().unwrap_or_default(),
        "tokens_issued": g.tokens.get(&provider).map(|t| t.iter().filter(|t| !t.starts_with("revoked-")).count()).unwrap_or_default(),
    }))
}

async fn reset(State(sim): State<Arc<Sim>>) -> Json<Value> {
    *sim.lock() = Inner::default();
    Json(json!({"ok": true}))
}

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .merge(aliyun::routes())
        .merge(tencent::routes())
        .merge(huawei::routes())
        .merge(fcm::routes())
        .merge(zrwinfo::routes())
        .merge(apns::routes())
        .merge(jpush::routes())
        .merge(robots::routes())
        .merge(weixin::routes())
        .route(
            "/_control/{provider}/faults",
            post(add_faults).delete(clear_faults),
        )
        .route("/_control/{provider}/limit", put(set_limit))
        .route("/_control/{provider}/revoke", post(revoke))
        .route("/_control/{provider}/receipts", put(set_receipts))
        .route("/_alerts", post(alert))
        .route("/_hooks/{name}", post(hook))
        .route("/_log/{provider}", get(log))
        .route("/_reset", post(reset))
        .with_state(sim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_refused_within_its_window_and_forgotten_after() {
        let sim = Sim::new(HashMap::new());
        for n in ["s1", "s2", "s3"] {
            assert!(sim.fresh_nonce("p", n, 200));
        }
        assert!(sim.fresh_nonce("p", "long", 60_000));
        assert!(!sim.fresh_nonce("p", "long", 60_000), "a replay is refused");
        assert!(sim.fresh_nonce("q", "long", 60_000), "per provider");
        assert_eq!(sim.lock().nonces.len(), 5);
        std::thread::sleep(Duration::from_millis(250));
        // The next call forgets the expired ones (they were seen first), and they are usable
        // again; the long ones are still held.
        assert!(sim.fresh_nonce("p", "new", 60_000));
        assert_eq!(
            sim.lock().nonces.len(),
            3,
            "the three expired nonces are forgotten"
        );
        assert!(sim.fresh_nonce("p", "s1", 60_000), "expired: usable again");
        assert!(
            !sim.fresh_nonce("p", "long", 60_000),
            "the long one is still held"
        );
    }
}
