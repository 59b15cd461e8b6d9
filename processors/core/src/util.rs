//! Small shared helpers: clocks, deterministic ids, masking of personal data in logs.

use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

/// Namespace of Herald's deterministic (v5) ids.
const NS: Uuid = Uuid::from_u128(0x6865_7261_6c64_4000_8000_6865_7261_6c64);

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The id of recipient `index` of a request: the same request replayed yields the same ids.
pub fn message_id(app_id: &str, request_id: &str, index: usize) -> String {
    Uuid::new_v5(
        &NS,
        format!("msg\0{app_id}\0{request_id}\0{index}").as_bytes(),
    )
    .to_string()
}

/// A deterministic event id: the same fact about the same message is the same event.
pub fn event_id(message_id: &str, fact: &str, attempt: i32) -> String {
    Uuid::new_v5(
        &NS,
        format!("evt\0{message_id}\0{fact}\0{attempt}").as_bytes(),
    )
    .to_string()
}

/// Unix ms as `YYYY-MM-DD HH:MM:SS.mmm` UTC (empty if out of range).
pub fn format_ms(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S%.3f").to_string())
        .unwrap_or_default()
}

pub fn random_id() -> String {
    Uuid::new_v4().to_string()
}

/// Masks an address for logs and public read models, showing at most a third of it:
/// `a***@***om`, `+86***34`.
pub fn mask_address(addr: &str) -> String {
    let chars: Vec<char> = addr.chars().collect();
    let n = chars.len();
    // Shown characters: a sixth at each end, at most 4 each.
    let each = (n / 6).min(4);
    if let Some(at) = chars.iter().position(|c| *c == '@') {
        let head = each.min(at);
        let tail = each.min(n - at - 1);
        let shown_head: String = chars[..head].iter().collect();
        let shown_tail: String = chars[n - tail..].iter().collect();
        return format!("{shown_head}***@***{shown_tail}");
    }
    if each == 0 {
        return "***".into();
    }
    let head: String = chars[..each].iter().collect();
    let tail: String = chars[n - each..].iter().collect();
    format!("{head}***{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        assert_eq!(message_id("a", "r", 0), message_id("a", "r", 0));
        assert_ne!(message_id("a", "r", 0), message_id("a", "r", 1));
        assert_ne!(message_id("a", "r", 0), message_id("b", "r", 0));
        assert_eq!(event_id("m", "sent", 1), event_id("m", "sent", 1));
        assert_ne!(event_id("m", "sent", 1), event_id("m", "sent", 2));
    }

    #[test]
    fn masks_personal_data() {
        assert_eq!(mask_address("ada@example.com"), "ad***@***om");
        assert_eq!(mask_address("+8613800001234"), "+8***34");
        assert_eq!(mask_address("短"), "***");
        assert_eq!(mask_address("é@x"), "***@***");
        // Never more than a third of the address is shown.
        for a in [
            "ada@example.com",
            "+8613800001234",
            "user-12345",
            "someone.long@mail.example.org",
        ] {
            let shown = mask_address(a)
                .chars()
                .filter(|c| *c != '*' && *c != '@')
                .count();
            assert!(3 * shown <= a.chars().count(), "{a}: {}", mask_address(a));
        }
    }
}

/// Standard Webhooks: `whsec_<base64>` secrets carry the key base64-encoded; anything else is
/// used as is.
pub fn webhook_key(secret: &str) -> Vec<u8> {
    use base64::Engine;
    secret
        .strip_prefix("whsec_")
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// The key of a recipient in the read model: HMAC-SHA256 of the address under the server
/// secret (history lookups without storing addresses; unlike a bare hash, not reversible by
/// hashing every phone number).
pub fn recipient_key(server_secret: &str, address: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(server_secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(address.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Standard Webhooks signature: `v1,` + base64(HMAC-SHA256(key, "id.timestamp.body")).
pub fn standard_webhook_signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// Verifies a Standard Webhooks signature header (space-separated `v1,…` entries) and that the
/// timestamp is within `tolerance_secs` of `now_secs`.
pub fn standard_webhook_verify(
    key: &[u8],
    id: &str,
    timestamp: &str,
    header: &str,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: i64,
) -> bool {
    let Ok(ts) = timestamp.parse::<i64>() else {
        return false;
    };
    if id.is_empty() || (now_secs - ts).abs() > tolerance_secs {
        return false;
    }
    let want = standard_webhook_signature(key, id, ts, body);
    // Compare in constant time per candidate.
    header.split(' ').any(|cand| {
        cand.len() == want.len()
            && cand
                .bytes()
                .zip(want.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

#[cfg(test)]
mod webhook_tests {
    use super::*;

    #[test]
    fn standard_webhooks_reference_vector() {
        // PROVIDERS.md: the Standard Webhooks reference vector.
        let key = webhook_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        let sig =
            standard_webhook_signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(standard_webhook_verify(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            &format!("v1,bogus {sig}"),
            body,
            1614265330,
            300
        ));
        assert!(!standard_webhook_verify(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            &sig,
            body,
            1614265330 + 301,
            300
        ));
        assert!(!standard_webhook_verify(
            &key,
            "other",
            "1614265330",
            &sig,
            body,
            1614265330,
            300
        ));
    }
}
