//! Feishu/Lark bot signature (PROVIDERS.md §5), pinned by the documented derived vector.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use herald_core::sign::hmac_sha256;

/// Feishu/Lark bot: base64(HMAC-SHA256(key = "<ts_s>\n<secret>", msg = "")) — key and message
/// the other way round from DingTalk.
pub fn feishu_sign(timestamp_secs: i64, secret: &str) -> String {
    B64.encode(hmac_sha256(
        format!("{timestamp_secs}\n{secret}").as_bytes(),
        b"",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_vector() {
        assert_eq!(
            feishu_sign(1599360473, "demo"),
            "l1N0gAcBjdwBvGm1xMjOF0XSyaLRpR7tuO5dHfhAYc8="
        );
    }
}
