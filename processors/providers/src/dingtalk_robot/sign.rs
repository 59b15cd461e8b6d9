//! DingTalk robot signature (PROVIDERS.md §3), pinned by the documented derived vector.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use herald_core::sign::hmac_sha256;

/// DingTalk robot: base64(HMAC-SHA256(key = secret, msg = "<ts_ms>\n<secret>")).
pub fn dingtalk_sign(timestamp_ms: i64, secret: &str) -> String {
    B64.encode(hmac_sha256(
        secret.as_bytes(),
        format!("{timestamp_ms}\n{secret}").as_bytes(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_vector() {
        let d = dingtalk_sign(1599360473000, "this is secret");
        assert_eq!(d, "hXZTWifRGHclNuZSKxoXc//sh51SWfVfRIhcdeKs63I=");
        assert_eq!(
            herald_core::sign::pct(&d),
            "hXZTWifRGHclNuZSKxoXc%2F%2Fsh51SWfVfRIhcdeKs63I%3D"
        );
    }
}
