//! Tencent Cloud TC3-HMAC-SHA256 (PROVIDERS.md §2), pinned by every revision of Tencent's
//! official example (tests below); the simulator checks requests with the same code.

use std::collections::BTreeMap;

use herald_core::sign::{hmac_sha256, sha256_hex, utc_date};

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
}
