//! Provider request signatures (../shared/PROVIDERS.md), shared by the senders and by the
//! simulators that check them. Each is pinned by the provider's official test vector where one is
//! published, and by the documented derived vector otherwise (tests below).

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// RFC 3986: everything but `A-Z a-z 0-9 - _ . ~` is `%XX` (uppercase hex); space is `%20`.
const RFC3986: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

pub fn pct(s: &str) -> String {
    utf8_percent_encode(s, RFC3986).to_string()
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable!("any key length"));
    mac.update(msg);
    mac.finalize().into_bytes().to_vec()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Constant-time string comparison for signatures.
pub fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// `yyyy-MM-ddTHH:mm:ssZ` in UTC (Aliyun `Timestamp`, `x-acs-date`).
pub fn iso8601_utc(unix_secs: i64) -> String {
    jiff::Timestamp::from_second(unix_secs)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Parses [`iso8601_utc`]'s format back to Unix seconds.
pub fn parse_iso8601_utc(s: &str) -> Option<i64> {
    s.parse::<jiff::Timestamp>().ok().map(|t| t.as_second())
}

/// `YYYY-MM-DD` of a Unix time in UTC (Tencent's credential scope date).
pub fn utc_date(unix_secs: i64) -> String {
    jiff::Timestamp::from_second(unix_secs)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .strftime("%Y-%m-%d")
        .to_string()
}

/// Aliyun RPC "V2" canonicalized query: params (without `Signature`) sorted by name, RFC 3986.
pub fn aliyun_canonical_query(params: &BTreeMap<String, String>) -> String {
    params
        .iter()
        .filter(|(k, _)| k.as_str() != "Signature")
        .map(|(k, v)| format!("{}={}", pct(k), pct(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// `METHOD&%2F&pct(canonical query)`: the server echoes this on `SignatureDoesNotMatch`.
pub fn aliyun_rpc_string_to_sign(method: &str, params: &BTreeMap<String, String>) -> String {
    format!(
        "{method}&{}&{}",
        pct("/"),
        pct(&aliyun_canonical_query(params))
    )
}

/// Aliyun RPC V2: base64(HMAC-SHA1(secret + "&", StringToSign)).
pub fn aliyun_rpc_signature(
    method: &str,
    params: &BTreeMap<String, String>,
    access_key_secret: &str,
) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(format!("{access_key_secret}&").as_bytes())
        .unwrap_or_else(|_| unreachable!("any key length"));
    mac.update(aliyun_rpc_string_to_sign(method, params).as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

/// Aliyun ACS3-HMAC-SHA256 pieces for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Acs3 {
    pub signed_headers: String,
    pub hashed_canonical_request: String,
    pub signature: String,
}

/// Signs an ACS3 request. `headers` are the signed ones (`host`, `content-type`, `x-acs-*`);
/// names are lowercased here, values trimmed.
pub fn acs3_sign(
    method: &str,
    canonical_query: &str,
    headers: &BTreeMap<String, String>,
    body: &[u8],
    access_key_secret: &str,
) -> Acs3 {
    let lower: BTreeMap<String, &str> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim()))
        .collect();
    let canonical_headers: String = lower.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed_headers = lower.keys().cloned().collect::<Vec<_>>().join(";");
    let canonical_request = [
        method,
        "/",
        canonical_query,
        &canonical_headers,
        &signed_headers,
        &sha256_hex(body),
    ]
    .join("\n");
    let hashed = sha256_hex(canonical_request.as_bytes());
    let signature = hex::encode(hmac_sha256(
        access_key_secret.as_bytes(),
        format!("ACS3-HMAC-SHA256\n{hashed}").as_bytes(),
    ));
    Acs3 {
        signed_headers,
        hashed_canonical_request: hashed,
        signature,
    }
}

/// Query string in ACS3 canonical form (sorted, RFC 3986), also usable as the URL query.
pub fn acs3_canonical_query(params: &BTreeMap<String, String>) -> String {
    aliyun_canonical_query(params)
}

/// Tencent Cloud TC3-HMAC-SHA256. `headers` holds at least the signed ones by lowercase name;
/// their values are lowercased and trimmed for the canonical form, as the service does.
pub struct Tc3<'a> {
    pub secret_key: &'a str,
    pub service: &'a str,
    pub timestamp: i64,
    pub signed_headers: &'a [&'a str],
    pub headers: &'a BTreeMap<String, String>,
    pub payload: &'a [u8],
}

impl Tc3<'_> {
    pub fn hashed_canonical_request(&self) -> String {
        let canonical_headers: String = self
            .signed_headers
            .iter()
            .map(|n| {
                let v = self.headers.get(*n).map(|v| v.trim()).unwrap_or_default();
                format!("{n}:{}\n", v.to_lowercase())
            })
            .collect();
        let cr = [
            "POST",
            "/",
            "",
            &canonical_headers,
            &self.signed_headers.join(";"),
            &sha256_hex(self.payload),
        ]
        .join("\n");
        sha256_hex(cr.as_bytes())
    }

    pub fn credential_scope(&self) -> String {
        format!("{}/{}/tc3_request", utc_date(self.timestamp), self.service)
    }

    pub fn signature(&self) -> String {
        let date = utc_date(self.timestamp);
        let sts = format!(
            "TC3-HMAC-SHA256\n{}\n{}\n{}",
            self.timestamp,
            self.credential_scope(),
            self.hashed_canonical_request()
        );
        let k_date = hmac_sha256(
            format!("TC3{}", self.secret_key).as_bytes(),
            date.as_bytes(),
        );
        let k_service = hmac_sha256(&k_date, self.service.as_bytes());
        let k_signing = hmac_sha256(&k_service, b"tc3_request");
        hex::encode(hmac_sha256(&k_signing, sts.as_bytes()))
    }

    pub fn authorization(&self, secret_id: &str) -> String {
        format!(
            "TC3-HMAC-SHA256 Credential={secret_id}/{}, SignedHeaders={}, Signature={}",
            self.credential_scope(),
            self.signed_headers.join(";"),
            self.signature()
        )
    }
}

/// DingTalk robot: base64(HMAC-SHA256(key = secret, msg = "<ts_ms>\n<secret>")).
pub fn dingtalk_sign(timestamp_ms: i64, secret: &str) -> String {
    B64.encode(hmac_sha256(
        secret.as_bytes(),
        format!("{timestamp_ms}\n{secret}").as_bytes(),
    ))
}

/// Feishu/Lark bot: base64(HMAC-SHA256(key = "<ts_s>\n<secret>", msg = "")) — key and message
/// the other way round from DingTalk.
pub fn feishu_sign(timestamp_secs: i64, secret: &str) -> String {
    B64.encode(hmac_sha256(
        format!("{timestamp_secs}\n{secret}").as_bytes(),
        b"",
    ))
}

/// WeChat server verification: hex SHA1 of the sorted concatenation of token, timestamp, nonce.
pub fn wechat_server_signature(token: &str, timestamp: &str, nonce: &str) -> String {
    let mut parts = [token, timestamp, nonce];
    parts.sort_unstable();
    hex::encode(Sha1::digest(parts.concat().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn aliyun_rpc_official_vector() {
        let p = map(&[
            ("AccessKeyId", "testId"),
            ("Action", "SendSms"),
            ("Format", "XML"),
            ("OutId", "123"),
            ("PhoneNumbers", "15300000001"),
            ("RegionId", "cn-hangzhou"),
            ("SignName", "阿里云短信测试专用"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", "45e25e9b-0a6f-4070-8c85-2956eda1b466"),
            ("SignatureVersion", "1.0"),
            ("TemplateCode", "SMS_71390007"),
            ("TemplateParam", r#"{"customer":"test"}"#),
            ("Timestamp", "2017-07-12T02:42:19Z"),
            ("Version", "2017-05-25"),
        ]);
        assert_eq!(
            aliyun_canonical_query(&p),
            "AccessKeyId=testId&Action=SendSms&Format=XML&OutId=123&PhoneNumbers=15300000001&RegionId=cn-hangzhou&SignName=%E9%98%BF%E9%87%8C%E4%BA%91%E7%9F%AD%E4%BF%A1%E6%B5%8B%E8%AF%95%E4%B8%93%E7%94%A8&SignatureMethod=HMAC-SHA1&SignatureNonce=45e25e9b-0a6f-4070-8c85-2956eda1b466&SignatureVersion=1.0&TemplateCode=SMS_71390007&TemplateParam=%7B%22customer%22%3A%22test%22%7D&Timestamp=2017-07-12T02%3A42%3A19Z&Version=2017-05-25"
        );
        assert!(
            aliyun_rpc_string_to_sign("GET", &p)
                .starts_with("GET&%2F&AccessKeyId%3DtestId%26Action%3DSendSms")
        );
        let sig = aliyun_rpc_signature("GET", &p, "testSecret");
        assert_eq!(sig, "zJDF+Lrzhj/ThnlvIToysFRq6t4=");
        assert_eq!(pct(&sig), "zJDF%2BLrzhj%2FThnlvIToysFRq6t4%3D");
        // The method is signed.
        assert_ne!(aliyun_rpc_signature("POST", &p, "testSecret"), sig);
    }

    #[test]
    fn acs3_official_vector_and_sms_fixture() {
        let empty = sha256_hex(b"");
        let h = map(&[
            ("host", "ecs.cn-shanghai.aliyuncs.com"),
            ("x-acs-action", "RunInstances"),
            ("x-acs-content-sha256", &empty),
            ("x-acs-date", "2023-10-26T10:22:32Z"),
            ("x-acs-signature-nonce", "3156853299f313e23d1673dc12e1703d"),
            ("x-acs-version", "2014-05-26"),
        ]);
        let s = acs3_sign(
            "POST",
            "ImageId=win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd&RegionId=cn-shanghai",
            &h,
            b"",
            "YourAccessKeySecret",
        );
        assert_eq!(
            s.hashed_canonical_request,
            "7ea06492da5221eba5297e897ce16e55f964061054b7695beedaac1145b1e259"
        );
        assert_eq!(
            s.signature,
            "06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
        );
        assert_eq!(
            s.signed_headers,
            "host;x-acs-action;x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version"
        );

        // Derived SendSms fixture.
        let q = acs3_canonical_query(&map(&[
            ("PhoneNumbers", "13800000000"),
            ("SignName", "阿里云"),
            ("TemplateCode", "SMS_123456789"),
            ("TemplateParam", r#"{"code":"1234"}"#),
        ]));
        assert_eq!(
            q,
            "PhoneNumbers=13800000000&SignName=%E9%98%BF%E9%87%8C%E4%BA%91&TemplateCode=SMS_123456789&TemplateParam=%7B%22code%22%3A%221234%22%7D"
        );
        let h = map(&[
            ("host", "dysmsapi.aliyuncs.com"),
            ("x-acs-action", "SendSms"),
            ("x-acs-content-sha256", &empty),
            ("x-acs-date", "2024-01-01T00:00:00Z"),
            ("x-acs-signature-nonce", "0123456789abcdef0123456789abcdef"),
            ("x-acs-version", "2017-05-25"),
        ]);
        let s = acs3_sign("POST", &q, &h, b"", "testSecret");
        assert_eq!(
            s.hashed_canonical_request,
            "4c6ad2aa33ac8c100668f1206a209da3639d53cbc271e7e44174e2ae5ebd2f6a"
        );
        assert_eq!(
            s.signature,
            "262a95fc53d23f98db29fa3fac7d2ff052ab7f8a05c874b22aeb704b4514f63a"
        );
    }

    #[test]
    fn tc3_official_vectors_all_revisions_and_sms_fixture() {
        let payload =
            br#"{"Limit": 1, "Filters": [{"Values": ["\u672a\u547d\u540d"], "Name": "instance-name"}]}"#;
        assert_eq!(
            sha256_hex(payload),
            "35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064"
        );
        let headers = map(&[
            ("content-type", "application/json; charset=utf-8"),
            ("host", "cvm.tencentcloudapi.com"),
            ("x-tc-action", "DescribeInstances"),
        ]);
        let t = |secret: &'static str, signed: &'static [&'static str]| Tc3 {
            secret_key: secret,
            service: "cvm",
            timestamp: 1551113065,
            signed_headers: signed,
            headers: &headers,
            payload,
        };
        let old = t(
            "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE",
            &["content-type", "host"],
        );
        assert_eq!(
            old.hashed_canonical_request(),
            "5ffe6a04c0664d6b969fab9a13bdab201d63ee709638e2749d62a09ca18d7031"
        );
        assert_eq!(
            old.authorization("AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE"),
            "TC3-HMAC-SHA256 Credential=AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE/2019-02-25/cvm/tc3_request, SignedHeaders=content-type;host, Signature=72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"
        );
        const WITH_ACTION: &[&str] = &["content-type", "host", "x-tc-action"];
        let middle = t("Gu5t9xGARNpq86cd98joQYCN3*******", WITH_ACTION);
        assert_eq!(
            middle.hashed_canonical_request(),
            "7019a55be8395899b900fb5564e4200d984910f34794a27cb3fb7d10ff6a1e84"
        );
        assert_eq!(
            middle.signature(),
            "be4f67d323c78ab9acb7395e43c0dbcf822a9cfac32fea2449a7bc7726b770a3"
        );
        let current = t("********************************", WITH_ACTION);
        assert_eq!(
            current.signature(),
            "10b1a37a7301a02ca19a647ad722d5e43b4b3cff309d421d85b46093f6ab6c4f"
        );

        // Derived SMS fixture.
        let body = r#"{"PhoneNumberSet":["+8613800000000"],"SmsSdkAppId":"1400006666","SignName":"腾讯云","TemplateId":"1110","TemplateParamSet":["4370"]}"#;
        let headers = map(&[
            ("content-type", "application/json; charset=utf-8"),
            ("host", "sms.tencentcloudapi.com"),
            ("x-tc-action", "SendSms"),
        ]);
        let sms = Tc3 {
            secret_key: "testSecretKey",
            service: "sms",
            timestamp: 1700000000,
            signed_headers: WITH_ACTION,
            headers: &headers,
            payload: body.as_bytes(),
        };
        assert_eq!(sms.credential_scope(), "2023-11-14/sms/tc3_request");
        assert_eq!(
            sms.signature(),
            "6027827c31988ba5cfbc67cdbbedd9f4cc8297e9c641a7092cf0507667d013ea"
        );
    }

    #[test]
    fn robot_derived_vectors() {
        let d = dingtalk_sign(1599360473000, "this is secret");
        assert_eq!(d, "hXZTWifRGHclNuZSKxoXc//sh51SWfVfRIhcdeKs63I=");
        assert_eq!(
            pct(&d),
            "hXZTWifRGHclNuZSKxoXc%2F%2Fsh51SWfVfRIhcdeKs63I%3D"
        );
        assert_eq!(
            feishu_sign(1599360473, "demo"),
            "l1N0gAcBjdwBvGm1xMjOF0XSyaLRpR7tuO5dHfhAYc8="
        );
    }

    #[test]
    fn time_formats_are_utc() {
        assert_eq!(iso8601_utc(1499827339), "2017-07-12T02:42:19Z");
        assert_eq!(parse_iso8601_utc("2017-07-12T02:42:19Z"), Some(1499827339));
        assert_eq!(parse_iso8601_utc("yesterday"), None);
        // Just before midnight UTC is still the same day in UTC, whatever the local zone.
        assert_eq!(utc_date(1551139199), "2019-02-25");
        assert!(ct_eq("abc", "abc") && !ct_eq("abc", "abd") && !ct_eq("abc", "ab"));
        assert_eq!(wechat_server_signature("b", "a", "c").len(), 40);
    }
}
