//! Google service-account OAuth 2.0 for FCM (PROVIDERS-MORE.md §1.2): the service-account JSON
//! gives an RS256-signed JWT assertion (`iss` = client_email, `scope`, `aud` = token_uri, one
//! hour), exchanged at `token_uri` for an access token that every send of the project shares.

use herald_schemas::DeliveryOutcome;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use crate::CallResult;
use crate::http::{provider_error, read_capped};

/// The FCM scope (the narrower of the two accepted).
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Google allows assertions of at most one hour.
pub const ASSERTION_SECS: i64 = 3600;
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The fields of a service-account key file Herald uses.
#[derive(Debug, Clone, Deserialize)]
pub struct ServiceAccount {
    #[serde(rename = "type")]
    pub kind: String,
    pub project_id: String,
    #[serde(default)]
    pub private_key_id: Option<String>,
    pub private_key: String,
    pub client_email: String,
    pub token_uri: String,
}

/// A service account ready to sign: its key parsed once.
pub struct Signer {
    pub account: ServiceAccount,
    key: EncodingKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("client_email", &self.account.client_email)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
}

impl Signer {
    /// Reads a service-account key file's JSON; every problem named (never the key itself).
    pub fn from_json(text: &str) -> Result<Signer, String> {
        let account: ServiceAccount = serde_json::from_str(text)
            .map_err(|e| format!("service account JSON: {}", json_problem(&e)))?;
        if account.kind != "service_account" {
            return Err(format!(
                "service account JSON: type is {:?}, not \"service_account\"",
                account.kind
            ));
        }
        for (name, v) in [
            ("project_id", &account.project_id),
            ("client_email", &account.client_email),
            ("token_uri", &account.token_uri),
        ] {
            if v.trim().is_empty() {
                return Err(format!("service account JSON: {name} is empty"));
            }
        }
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes())
            .map_err(|_| "service account JSON: private_key is not an RSA PEM key".to_owned())?;
        Ok(Signer { account, key })
    }

    /// The signed assertion for `now` (Unix seconds).
    pub fn assertion(&self, now: i64) -> Result<String, CallResult> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.account.private_key_id.clone();
        let claims = Claims {
            iss: &self.account.client_email,
            scope: SCOPE,
            aud: &self.account.token_uri,
            iat: now,
            exp: now + ASSERTION_SECS,
        };
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| {
            provider_error(
                DeliveryOutcome::FailedPermanent,
                "invalid_service_account",
                &format!("signing the token assertion: {e}"),
            )
        })
    }
}

/// Where a JSON problem is, without echoing the (secret) text around it.
fn json_problem(e: &serde_json::Error) -> String {
    format!(
        "{:?} error at line {} column {}",
        e.classify(),
        e.line(),
        e.column()
    )
}

/// Exchanges an assertion for an access token: `(token, expires_in)`. The endpoint's refusals
/// (`invalid_grant`: a wrong or deleted key, a clock off) are permanent for these credentials;
/// network errors and 5xx are transient. Nothing was sent yet either way.
pub async fn fetch_token(
    client: &reqwest::Client,
    signer: &Signer,
    now: i64,
) -> Result<(String, u64), CallResult> {
    let assertion = signer.assertion(now)?;
    let body = format!(
        "grant_type={}&assertion={}",
        herald_core::sign::pct(GRANT_TYPE),
        herald_core::sign::pct(&assertion)
    );
    let transient = |m: String| {
        provider_error(
            DeliveryOutcome::FailedTransient,
            "token_unavailable",
            &format!("access token fetch: {m}"),
        )
    };
    let resp = client
        .post(&signer.account.token_uri)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .map_err(|e| transient(e.without_url().to_string()))?;
    let status = resp.status().as_u16();
    let bytes = read_capped(resp).await?;
    let v: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        // A gateway's error page: transient when the endpoint is in trouble; a wrong
        // `token_uri` (404 …) is the operator's to fix.
        Err(_) if matches!(status, 408 | 429 | 500..) => {
            return Err(transient(format!("HTTP {status}, not JSON")));
        }
        Err(_) => {
            return Err(provider_error(
                DeliveryOutcome::FailedPermanent,
                "token_endpoint_error",
                &format!("access token fetch: HTTP {status}, not JSON (is token_uri right?)"),
            ));
        }
    };
    if status == 200
        && let Some(t) = v["access_token"].as_str().filter(|t| !t.is_empty())
    {
        return Ok((t.to_owned(), v["expires_in"].as_u64().unwrap_or(3599)));
    }
    let code = v["error"].as_str().unwrap_or("token_error");
    let description = v["error_description"].as_str().unwrap_or_default();
    let outcome = match status {
        429 => DeliveryOutcome::RateLimited,
        500.. => DeliveryOutcome::FailedTransient,
        _ => DeliveryOutcome::FailedPermanent,
    };
    Err(provider_error(
        outcome,
        code,
        &format!("access token fetch: HTTP {status} {code}: {description}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    /// RFC 7515 Appendix A.2's RSA key (the JWK printed there, as PKCS#8 PEM).
    const RFC7515_A2_PEM: &str = include_str!("testdata/rfc7515-a2.pem");
    const RFC7515_A2_INPUT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ";
    const RFC7515_A2_SIGNATURE: &str = "cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqvhJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw";

    fn account(key: &str) -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": "example-project",
            "private_key_id": "test-key-id",
            "private_key": key,
            "client_email": "herald-test@example-project.iam.gserviceaccount.com",
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string()
    }

    #[test]
    fn rs256_signs_the_rfc7515_a2_vector_exactly() {
        // [OFFICIAL VECTOR] PKCS#1 v1.5 is deterministic: the RFC's signature, byte for byte.
        let key = EncodingKey::from_rsa_pem(RFC7515_A2_PEM.as_bytes()).unwrap();
        let sig = jsonwebtoken::crypto::sign(RFC7515_A2_INPUT.as_bytes(), &key, Algorithm::RS256)
            .unwrap();
        assert_eq!(sig, RFC7515_A2_SIGNATURE);
    }

    #[test]
    fn the_google_shaped_assertion_matches_the_derived_fixture() {
        // [DERIVED] PROVIDERS-MORE.md §1.2: the same key, Google's header and claims as compact
        // JSON in that key order.
        let key = EncodingKey::from_rsa_pem(RFC7515_A2_PEM.as_bytes()).unwrap();
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT","kid":"test-key-id"}"#);
        let claims = URL_SAFE_NO_PAD.encode(
            r#"{"iss":"herald-test@example-project.iam.gserviceaccount.com","scope":"https://www.googleapis.com/auth/firebase.messaging","aud":"https://oauth2.googleapis.com/token","iat":1700000000,"exp":1700003600}"#,
        );
        let sig = jsonwebtoken::crypto::sign(
            format!("{header}.{claims}").as_bytes(),
            &key,
            Algorithm::RS256,
        )
        .unwrap();
        assert_eq!(
            sig,
            "KBSvYtuFfKZktHuziTNHYWYZh21rY6aubR0navGj5uOX342D9xcqoiTM4g8k7GmtcB7RSq1Lpo2MglQOG105smGY_u_MWFFEKldm9mJMDsp47mSUuEEu5EMaHHDkgVoIiCwqPf67lAfmrq_XZ54MGKpdn_I-CWmQcXH_TUqoAwQjzcMwFhPAIzZ5-naGF8ueiqWbiZeEUSAHX_ynOQ-yDXZ_SyHC2fuPc4tIgPorDkCA-tLtdqWJBmz3YQMm-_LyRW975y8W5H_MelPNMvQ1zaq09R1agoAQ_jixR4vNLZK1LE6vY3gPOmQJtR77gCm-Pj99J3d_xt6sTm75ahpijA"
        );
    }

    #[test]
    fn the_assertion_carries_googles_claims_and_verifies() {
        let signer = Signer::from_json(&account(RFC7515_A2_PEM)).unwrap();
        let jwt = signer.assertion(1_700_000_000).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["kid"], "test-key-id");
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(
            claims,
            serde_json::json!({
                "iss": "herald-test@example-project.iam.gserviceaccount.com",
                "scope": SCOPE, "aud": "https://oauth2.googleapis.com/token",
                "iat": 1_700_000_000, "exp": 1_700_003_600,
            })
        );
        // The signature verifies under the key's public half.
        let public = jsonwebtoken::DecodingKey::from_rsa_components(
            "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ",
            "AQAB",
        )
        .unwrap();
        assert!(
            jsonwebtoken::crypto::verify(
                parts[2],
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
                &public,
                Algorithm::RS256
            )
            .unwrap()
        );
    }

    #[test]
    fn a_bad_service_account_is_named_without_its_secret() {
        for (text, needle) in [
            ("{", "service account JSON"),
            (
                &account("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"),
                "private_key is not an RSA PEM key",
            ),
            (
                &account(RFC7515_A2_PEM).replace("service_account", "authorized_user"),
                "not \"service_account\"",
            ),
        ] {
            let e = Signer::from_json(text).unwrap_err();
            assert!(e.contains(needle), "{e}");
            assert!(!e.contains("MII"), "{e}");
        }
    }
}
