//! Huawei Cloud SMS request authentication (PROVIDERS-MORE.md §4.3, §4.4): WSSE UsernameToken
//! (`batchSendSms/v1`'s classic scheme) and the API Gateway's AK/SK `SDK-HMAC-SHA256` signing
//! (also how Huawei signs status-report pushes when 推送AKSK鉴权 is on).

use std::collections::BTreeMap;

use base64::Engine;
use herald_core::sign::{hmac_sha256, pct, sha256_hex};

/// The `Authorization` header of a WSSE request.
pub const WSSE_AUTHORIZATION: &str = r#"WSSE realm="SDP",profile="UsernameToken",type="Appkey""#;

/// `PasswordDigest` = Base64 of the lowercase **hex text** of SHA-256(Nonce + Created +
/// AppSecret): the form of the official header example (which decodes to 64 hex characters) and
/// of the current official demos.
pub fn password_digest(nonce: &str, created: &str, app_secret: &str) -> String {
    let hex = sha256_hex(format!("{nonce}{created}{app_secret}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(hex)
}

/// The `X-WSSE` header.
pub fn x_wsse(app_key: &str, app_secret: &str, nonce: &str, created: &str) -> String {
    format!(
        "UsernameToken Username=\"{app_key}\",PasswordDigest=\"{}\",Nonce=\"{nonce}\",Created=\"{created}\"",
        password_digest(nonce, created, app_secret)
    )
}

/// `X-Sdk-Date` format: `YYYYMMDDTHHMMSSZ` (UTC).
pub fn sdk_date(unix_secs: i64) -> String {
    jiff::Timestamp::from_second(unix_secs)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .strftime("%Y%m%dT%H%M%SZ")
        .to_string()
}

/// Parses [`sdk_date`]'s format back to Unix seconds.
pub fn parse_sdk_date(s: &str) -> Option<i64> {
    let t = jiff::civil::DateTime::strptime("%Y%m%dT%H%M%SZ", s).ok()?;
    t.to_zoned(jiff::tz::TimeZone::UTC)
        .ok()
        .map(|z| z.timestamp().as_second())
}

/// One request as `SDK-HMAC-SHA256` signs it.
pub struct AkSk<'a> {
    pub method: &'a str,
    /// The path as sent (`/sms/batchSendSms/v1`); signed with a trailing `/`.
    pub path: &'a str,
    /// Query parameters, decoded.
    pub query: &'a [(String, String)],
    /// The signed headers, lowercase names → values (must hold `x-sdk-date`).
    pub headers: &'a BTreeMap<String, String>,
    pub body: &'a [u8],
}

impl AkSk<'_> {
    pub fn canonical_request(&self) -> String {
        let mut uri: String = self.path.split('/').map(pct).collect::<Vec<_>>().join("/");
        if !uri.ends_with('/') {
            uri.push('/');
        }
        let mut query: Vec<(String, String)> =
            self.query.iter().map(|(k, v)| (pct(k), pct(v))).collect();
        query.sort();
        let query: Vec<String> = query.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        let headers: String = self
            .headers
            .iter()
            .map(|(k, v)| format!("{k}:{}\n", v.trim()))
            .collect();
        let signed: Vec<&str> = self.headers.keys().map(String::as_str).collect();
        format!(
            "{}\n{uri}\n{}\n{headers}\n{}\n{}",
            self.method,
            query.join("&"),
            signed.join(";"),
            sha256_hex(self.body)
        )
    }

    pub fn signature(&self, secret_key: &str) -> String {
        let date = self
            .headers
            .get("x-sdk-date")
            .map(String::as_str)
            .unwrap_or_default();
        let to_sign = format!(
            "SDK-HMAC-SHA256\n{date}\n{}",
            sha256_hex(self.canonical_request().as_bytes())
        );
        hex::encode(hmac_sha256(secret_key.as_bytes(), to_sign.as_bytes()))
    }

    /// The `Authorization` header.
    pub fn authorization(&self, access_key: &str, secret_key: &str) -> String {
        let signed: Vec<&str> = self.headers.keys().map(String::as_str).collect();
        format!(
            "SDK-HMAC-SHA256 Access={access_key}, SignedHeaders={}, Signature={}",
            signed.join(";"),
            self.signature(secret_key)
        )
    }
}

/// The parts of an `SDK-HMAC-SHA256` `Authorization` header (`, ` or `,` between them).
pub fn parse_authorization(h: &str) -> Option<(String, Vec<String>, String)> {
    let rest = h.strip_prefix("SDK-HMAC-SHA256 ")?;
    let mut access = None;
    let mut signed = None;
    let mut sig = None;
    for part in rest.split(',').map(str::trim) {
        match part.split_once('=')? {
            ("Access", v) => access = Some(v.to_owned()),
            ("SignedHeaders", v) => signed = Some(v.split(';').map(str::to_owned).collect()),
            ("Signature", v) => sig = Some(v.to_owned()),
            _ => {}
        }
    }
    Some((access?, signed?, sig?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [DERIVED] in PROVIDERS-MORE.md §4.3, and the official example's digest, which decodes
    /// to hex text.
    #[test]
    fn sign_wsse_password_digest_is_base64_of_the_hex_digest() {
        assert_eq!(
            password_digest(
                "66C92B11FF8A425FB8D4CCFE0ED9ED1F",
                "2018-02-12T15:30:20Z",
                "testAppSecret"
            ),
            "ZGVkZDliMTJhZDEyODA0NWU4ZjE1MmM0ZDhmZDVhMjAyZWQ2NDdmNmIwOGU1Y2FiZTY5NDVhY2QwMjdmY2ZkNA=="
        );
        let official = base64::engine::general_purpose::STANDARD
            .decode("NDA1MWIwNjI2ZTkyNWFlM2FhMTE5NDE1YTk5NjU1YWE4NjNlZTY1MmRhYzkxZGViNzczZjdjMjkzZWQ4ZjAwNA==")
            .unwrap();
        assert_eq!(
            String::from_utf8(official).unwrap(),
            "4051b0626e925ae3aa119415a99655aa863ee652dac91deb773f7c293ed8f004"
        );
        let h = x_wsse("key", "secret", "n1", "2024-01-01T00:00:00Z");
        assert!(h.starts_with("UsernameToken Username=\"key\",PasswordDigest=\""));
    }

    /// [OFFICIAL VECTOR] of Huawei's API signing guide (PROVIDERS-MORE.md §4.4).
    #[test]
    fn sign_aksk_official_vector() {
        let headers: BTreeMap<String, String> = [
            ("content-type", "application/json"),
            ("host", "service.region.example.com"),
            ("x-sdk-date", "20191115T033655Z"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let query = [
            (
                "marker".to_owned(),
                "13551d6b-755d-4757-b956-536f674975c0".to_owned(),
            ),
            ("limit".to_owned(), "2".to_owned()),
        ];
        let req = AkSk {
            method: "GET",
            path: "/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs",
            query: &query,
            headers: &headers,
            body: b"",
        };
        assert_eq!(
            req.canonical_request(),
            "GET\n/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs/\n\
             limit=2&marker=13551d6b-755d-4757-b956-536f674975c0\n\
             content-type:application/json\nhost:service.region.example.com\n\
             x-sdk-date:20191115T033655Z\n\ncontent-type;host;x-sdk-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(req.canonical_request().as_bytes()),
            "b25362e603ee30f4f25e7858e8a7160fd36e803bb2dfe206278659d71a9bcd7a"
        );
        assert_eq!(
            req.signature("MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc"),
            "7be6668032f70418fcc22abc52071e57aff61b84a1d2381bb430d6870f4f6ebe"
        );
        let auth = req.authorization(
            "QTWAOYTTINDUT2QVKYUC",
            "MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc",
        );
        let (ak, signed, sig) = parse_authorization(&auth).unwrap();
        assert_eq!(ak, "QTWAOYTTINDUT2QVKYUC");
        assert_eq!(signed, ["content-type", "host", "x-sdk-date"]);
        assert_eq!(
            sig,
            "7be6668032f70418fcc22abc52071e57aff61b84a1d2381bb430d6870f4f6ebe"
        );
        // Huawei's own push example writes no space after the commas.
        assert!(
            parse_authorization(
                "SDK-HMAC-SHA256 Access=a,SignedHeaders=host;x-sdk-date,Signature=s"
            )
            .is_some()
        );
    }

    /// [DERIVED] SMS-shaped fixture (PROVIDERS-MORE.md §4.4).
    #[test]
    fn sign_aksk_sms_fixture() {
        let headers: BTreeMap<String, String> = [
            ("content-type", "application/x-www-form-urlencoded"),
            ("host", "smsapi.cn-north-4.myhuaweicloud.com"),
            ("x-sdk-date", "20240101T000000Z"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let body = "from=8824032015014&to=%2B8613800000000&templateId=8ff55eac1d0b478ab3c06c3c6a492300&templateParas=%5B%22369751%22%5D&signature=%E5%8D%8E%E4%B8%BA%E4%BA%91";
        let req = AkSk {
            method: "POST",
            path: "/sms/batchSendSms/v1",
            query: &[],
            headers: &headers,
            body: body.as_bytes(),
        };
        assert_eq!(
            sha256_hex(body.as_bytes()),
            "e200233890eae47c60f8310d8f37ce22bb84adc5ec02dcd3f4b8658a66e41ad0"
        );
        assert_eq!(
            sha256_hex(req.canonical_request().as_bytes()),
            "4157d9d39555449294fbdc3c568e845cdeb6698c3fce0f4f2c26e2d1111054ce"
        );
        assert_eq!(
            req.signature("testSecretKey"),
            "29c7deb07ba2c545bd0b6a5e6ac459fa5f93b7f45479d4d7a18488b0ab65ca6e"
        );
    }

    #[test]
    fn sdk_dates_round_trip() {
        assert_eq!(sdk_date(1_573_789_015), "20191115T033655Z");
        assert_eq!(parse_sdk_date("20191115T033655Z"), Some(1_573_789_015));
        assert_eq!(parse_sdk_date("2019-11-15"), None);
    }
}
