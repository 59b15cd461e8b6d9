//! App authentication (CONTRACT.md §2): HMAC-SHA256 over
//! `METHOD\nPATH_AND_QUERY\nTIMESTAMP\nNONCE\nSHA256_HEX(body)`, timestamps within the window,
//! nonces used once per app within the window.

use std::collections::HashMap;
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

#[derive(Debug, PartialEq, Eq)]
pub enum AuthError {
    Missing(&'static str),
    UnknownApp,
    StaleTimestamp,
    ReusedNonce,
    BadSignature,
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing(_) => "missing_auth_header",
            AuthError::UnknownApp => "unknown_app",
            AuthError::StaleTimestamp => "stale_timestamp",
            AuthError::ReusedNonce => "reused_nonce",
            AuthError::BadSignature => "bad_signature",
        }
    }
}

pub fn string_to_sign(
    method: &str,
    path_and_query: &str,
    ts: &str,
    nonce: &str,
    body: &[u8],
) -> String {
    format!(
        "{method}\n{path_and_query}\n{ts}\n{nonce}\n{}",
        hex::encode(Sha256::digest(body))
    )
}

pub fn sign(
    secret: &str,
    method: &str,
    path_and_query: &str,
    ts: &str,
    nonce: &str,
    body: &[u8],
) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("any key length"));
    mac.update(string_to_sign(method, path_and_query, ts, nonce, body).as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Remembers nonces for the signature window. Per process: several API instances need a shared
/// store (Redis `SET NX EX`) to refuse a nonce replayed against another instance.
#[derive(Default)]
pub struct NonceCache {
    seen: Mutex<HashMap<(String, String), i64>>,
}

impl NonceCache {
    /// True if the nonce is new (and records it).
    pub fn insert(&self, app: &str, nonce: &str, now: i64, window: i64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() > 100_000 {
            seen.retain(|_, exp| *exp > now);
        }
        let key = (app.to_owned(), nonce.to_owned());
        if seen.get(&key).is_some_and(|exp| *exp > now) {
            return false;
        }
        seen.insert(key, now + 2 * window);
        true
    }
}

/// Records nonces, one statement for many concurrent requests: for each `(app, nonce)`, true
/// when it is new (false when another process or request already used it within the window,
/// including an earlier entry of the same batch). Expired nonces are purged now and then.
pub async fn remember_nonces(
    db: &tokio_postgres::Client,
    nonces: &[(String, String)],
    window_secs: i64,
) -> Result<Vec<bool>, tokio_postgres::Error> {
    static ROWS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let before = ROWS.fetch_add(nonces.len() as u64, std::sync::atomic::Ordering::Relaxed);
    if before / 1000 != (before + nonces.len() as u64) / 1000 || before == 0 {
        db.execute("DELETE FROM api_nonces WHERE expires_at < now()", &[])
            .await?;
    }
    // A pair twice in one batch: the first is the request that used it.
    let mut first = std::collections::HashSet::new();
    let once: Vec<bool> = nonces.iter().map(|k| first.insert(k)).collect();
    let (apps, keys): (Vec<&str>, Vec<&str>) = nonces
        .iter()
        .zip(&once)
        .filter(|(_, once)| **once)
        .map(|((a, n), _)| (a.as_str(), n.as_str()))
        .unzip();
    let secs = (2 * window_secs) as f64;
    let fresh: std::collections::HashSet<(String, String)> = db
        .query(
            "INSERT INTO api_nonces (app_id, nonce, expires_at)
             SELECT a, n, now() + make_interval(secs => $3)
               FROM unnest($1::text[], $2::text[]) AS t(a, n)
             ON CONFLICT (app_id, nonce) DO UPDATE SET expires_at = EXCLUDED.expires_at
             WHERE api_nonces.expires_at < now()
             RETURNING app_id, nonce",
            &[&apps, &keys, &secs],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(nonces
        .iter()
        .zip(once)
        .map(|(k, once)| once && fresh.contains(k))
        .collect())
}

pub struct Request<'a> {
    pub app: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub nonce: Option<&'a str>,
    pub signature: Option<&'a str>,
    pub method: &'a str,
    pub path_and_query: &'a str,
    pub body: &'a [u8],
}

/// Verifies a request; the app id on success.
pub fn verify(
    req: &Request<'_>,
    secret_of: impl Fn(&str) -> Option<String>,
    nonces: &NonceCache,
    now_secs: i64,
    window_secs: i64,
) -> Result<String, AuthError> {
    let app = req.app.ok_or(AuthError::Missing("X-Herald-App"))?;
    let ts = req
        .timestamp
        .ok_or(AuthError::Missing("X-Herald-Timestamp"))?;
    let nonce = req.nonce.ok_or(AuthError::Missing("X-Herald-Nonce"))?;
    let sig = req
        .signature
        .ok_or(AuthError::Missing("X-Herald-Signature"))?;
    let secret = secret_of(app).ok_or(AuthError::UnknownApp)?;
    let t: i64 = ts.parse().map_err(|_| AuthError::StaleTimestamp)?;
    if (now_secs - t).abs() > window_secs {
        return Err(AuthError::StaleTimestamp);
    }
    let want = sign(&secret, req.method, req.path_and_query, ts, nonce, req.body);
    // Constant-time comparison through the MAC verifier.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("any key length"));
    mac.update(string_to_sign(req.method, req.path_and_query, ts, nonce, req.body).as_bytes());
    let given = hex::decode(sig).map_err(|_| AuthError::BadSignature)?;
    if mac.verify_slice(&given).is_err() {
        debug_assert_ne!(want, sig);
        return Err(AuthError::BadSignature);
    }
    if !nonces.insert(app, nonce, now_secs, window_secs) {
        return Err(AuthError::ReusedNonce);
    }
    Ok(app.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(sig: &'a str, ts: &'a str, nonce: &'a str) -> Request<'a> {
        Request {
            app: Some("shop"),
            timestamp: Some(ts),
            nonce: Some(nonce),
            signature: Some(sig),
            method: "GET",
            path_and_query: "/v1/messages/m1",
            body: b"",
        }
    }

    #[test]
    fn accepts_good_and_refuses_stale_reused_and_forged() {
        let secret = |a: &str| (a == "shop").then(|| "s3cret".to_owned());
        let nonces = NonceCache::default();
        let sig = sign("s3cret", "GET", "/v1/messages/m1", "1000", "n1", b"");
        assert_eq!(
            verify(&req(&sig, "1000", "n1"), secret, &nonces, 1010, 300),
            Ok("shop".into())
        );
        assert_eq!(
            verify(&req(&sig, "1000", "n1"), secret, &nonces, 1010, 300),
            Err(AuthError::ReusedNonce)
        );
        let sig2 = sign("s3cret", "GET", "/v1/messages/m1", "1000", "n2", b"");
        assert_eq!(
            verify(&req(&sig2, "1000", "n2"), secret, &nonces, 1400, 300),
            Err(AuthError::StaleTimestamp)
        );
        let forged = sign("wrong", "GET", "/v1/messages/m1", "1000", "n3", b"");
        assert_eq!(
            verify(&req(&forged, "1000", "n3"), secret, &nonces, 1000, 300),
            Err(AuthError::BadSignature)
        );
        // A forged attempt does not burn the nonce for the real caller.
        let real = sign("s3cret", "GET", "/v1/messages/m1", "1000", "n3", b"");
        assert!(verify(&req(&real, "1000", "n3"), secret, &nonces, 1000, 300).is_ok());
    }
}
