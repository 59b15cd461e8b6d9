//! Signature building blocks shared by the provider signers (the providers crate, one signer per
//! provider folder), the simulators that check them and Herald's own signed requests: RFC 3986
//! encoding, SHA-256 and HMAC-SHA256, constant-time comparison, the UTC time formats providers
//! sign.

use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
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

/// HMAC-SHA256 of `msg` under `key`.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_formats_are_utc() {
        assert_eq!(iso8601_utc(1499827339), "2017-07-12T02:42:19Z");
        assert_eq!(parse_iso8601_utc("2017-07-12T02:42:19Z"), Some(1499827339));
        assert_eq!(parse_iso8601_utc("yesterday"), None);
        // Just before midnight UTC is still the same day in UTC, whatever the local zone.
        assert_eq!(utc_date(1551139199), "2019-02-25");
        assert!(ct_eq("abc", "abc") && !ct_eq("abc", "abd") && !ct_eq("abc", "ab"));
    }
}
