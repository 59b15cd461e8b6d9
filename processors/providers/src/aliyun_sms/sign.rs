//! Aliyun request signatures (PROVIDERS.md §1): RPC "V2" (HMAC-SHA1 over the canonical query)
//! and ACS3-HMAC-SHA256. Pinned by Aliyun's official vectors (tests below); the simulator checks
//! requests with the same code.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use herald_core::sign::{hmac_sha256, pct, sha256_hex};
use hmac::{Hmac, Mac};
use sha1::Sha1;

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
}
