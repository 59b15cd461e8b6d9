//! Access-token discipline for WeCom app messages and WeChat Official Accounts: one cached token
//! per provider, shared by every worker in the process, fetched by one caller at a time,
//! refreshed before it expires, and dropped when the provider says it is invalid or expired
//! (40001 / 40014 / 42001) so the next call fetches a fresh one. A failed token fetch happens
//! before anything was sent, so it is never an unknown outcome.

use std::future::Future;
use std::time::{Duration, Instant};

use herald_schemas::DeliveryOutcome;

use crate::CallResult;
use crate::http::provider_error;

/// Error codes meaning "this token is no good": drop it and fetch again.
pub const TOKEN_ERRORS: [i64; 3] = [40001, 40014, 42001];

struct Cached {
    token: String,
    refresh_at: Instant,
}

#[derive(Default)]
pub struct TokenCache {
    state: tokio::sync::Mutex<Option<Cached>>,
}

impl TokenCache {
    /// The cached token, or a fresh one from `fetch` (`(token, expires_in seconds)`).
    pub async fn get<F, Fut>(&self, provider: &str, fetch: F) -> Result<String, CallResult>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(String, u64), CallResult>>,
    {
        let mut g = self.state.lock().await;
        if let Some(c) = g.as_ref()
            && c.refresh_at > Instant::now()
        {
            return Ok(c.token.clone());
        }
        let (token, expires_in) = fetch().await?;
        metrics::counter!(herald_core::telemetry::names::TOKEN_FETCHES, "provider" => provider.to_owned())
            .increment(1);
        // Refresh five minutes early (both providers pre-rotate within that window).
        let ttl = Duration::from_secs(expires_in.saturating_sub(300).max(30));
        *g = Some(Cached {
            token: token.clone(),
            refresh_at: Instant::now() + ttl,
        });
        Ok(token)
    }

    /// Drops `token` if it is still the cached one (another worker may have replaced it).
    pub async fn invalidate(&self, token: &str) {
        let mut g = self.state.lock().await;
        if g.as_ref().is_some_and(|c| c.token == token) {
            *g = None;
        }
    }
}

/// Makes a call that needs a token: when the answer says the token is invalid or expired, the
/// token is dropped and the call made once more with a fresh one (the provider refused the
/// first, so nothing was sent). Answers the final JSON body.
pub async fn call_with_token<TF, TFut, CF, CFut>(
    cache: &TokenCache,
    token: TF,
    call: CF,
) -> Result<serde_json::Value, CallResult>
where
    TF: Fn() -> TFut,
    TFut: Future<Output = Result<String, CallResult>>,
    CF: Fn(String) -> CFut,
    CFut: Future<Output = Result<serde_json::Value, CallResult>>,
{
    let mut tries = 0;
    loop {
        let t = token().await?;
        let v = call(t.clone()).await?;
        tries += 1;
        match crate::http::errcode(&v) {
            Some((code, _)) if TOKEN_ERRORS.contains(&code) && tries < 2 => {
                cache.invalidate(&t).await;
            }
            _ => return Ok(v),
        }
    }
}

/// Reads a token answer `{"access_token": …, "expires_in": …}` or its error envelope.
pub async fn fetch_token(req: reqwest::RequestBuilder) -> Result<(String, u64), CallResult> {
    let failed = |e: reqwest::Error| {
        provider_error(
            DeliveryOutcome::FailedTransient,
            "token_unavailable",
            &format!("access token fetch: {e}"),
        )
    };
    let resp = req.send().await.map_err(|e| failed(e.without_url()))?;
    let body = crate::http::read_capped(resp).await?;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        provider_error(
            DeliveryOutcome::FailedTransient,
            "token_unavailable",
            &format!("access token fetch: {e}"),
        )
    })?;
    if let Some(t) = v.get("access_token").and_then(|t| t.as_str()) {
        let exp = v.get("expires_in").and_then(|e| e.as_u64()).unwrap_or(7200);
        return Ok((t.to_owned(), exp));
    }
    let code = v.get("errcode").and_then(|c| c.as_i64()).unwrap_or(-1);
    let msg = v.get("errmsg").and_then(|m| m.as_str()).unwrap_or_default();
    let outcome = match code {
        -1 => DeliveryOutcome::FailedTransient,
        45009 => DeliveryOutcome::RateLimited,
        _ => DeliveryOutcome::FailedPermanent,
    };
    Err(provider_error(
        outcome,
        &code.to_string(),
        &format!("access token fetch: {msg}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn caches_refetches_after_invalidation_and_ignores_stale_invalidations() {
        let cache = TokenCache::default();
        let n = AtomicUsize::new(0);
        let fetch = || async {
            let i = n.fetch_add(1, Ordering::SeqCst);
            Ok((format!("t{i}"), 7200))
        };
        assert_eq!(cache.get("p", fetch).await.unwrap(), "t0");
        assert_eq!(cache.get("p", fetch).await.unwrap(), "t0");
        cache.invalidate("t0").await;
        assert_eq!(cache.get("p", fetch).await.unwrap(), "t1");
        // Someone still holding t0 reports it bad: t1 stays.
        cache.invalidate("t0").await;
        assert_eq!(cache.get("p", fetch).await.unwrap(), "t1");
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }
}
