//! Verification codes (`POST /v1/verifications`, `…/{id}/check`): generated from the operating
//! system's CSPRNG, stored only as a keyed MAC bound to the app, purpose and destination,
//! time-limited, single use, with a wrong-check budget a resend does not reset (every check
//! counted, even one made while a resend is on its way), and each app's sends per destination
//! limited (cooldown, hourly, daily). Destinations are keyed in their normalised form
//! ([`crate::destination`]): one mailbox or phone however it is written.
//!
//! The code itself is never stored and never travels in clear: the request Herald publishes
//! carries it **sealed** (ChaCha20-Poly1305 under a key derived from the server secret, the
//! request id as associated data) as the template parameter `code`, so the requests topic, the
//! stages' topics, dead letters and the send ledger hold only ciphertext. The send stage opens
//! the seal in its copy of the message right before the provider call ([`open_content`]); what
//! it records and publishes afterwards is built from the sealed message.

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload, rand_core::RngCore};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio_postgres::Client;

/// What a sealed code looks like inside a text: this prefix, then [`SEALED_HEX`] hex digits.
/// Hex only, so no template escaping (HTML, Markdown, JSON, URL) changes it.
pub const SEAL_PREFIX: &str = "hseal1";
/// Nonce (12) + the padded code (1 length byte + 10) + tag (16), hex.
const SEALED_HEX: usize = 2 * (12 + 11 + 16);
/// Longest code (Twilio's range is 4–10).
pub const MAX_CODE_LEN: usize = 10;
pub const MIN_CODE_LEN: usize = 4;

/// The template parameter that carries the (sealed) code, and the one with its lifetime.
pub const CODE_PARAM: &str = "code";
pub const TTL_MINUTES_PARAM: &str = "ttl_minutes";

/// Keys derived from the server secret: one seals codes in transit, one MACs them at rest.
#[derive(Clone)]
pub struct Keys {
    seal: Key,
    mac: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys([redacted])")
    }
}

fn derive(secret: &str, purpose: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(purpose);
    mac.finalize().into_bytes().into()
}

impl Keys {
    pub fn new(server_secret: &str) -> Keys {
        Keys {
            seal: derive(server_secret, b"herald/verification/seal/v1").into(),
            mac: derive(server_secret, b"herald/verification/mac/v1"),
        }
    }

    /// The code sealed for the request `request_id`: [`SEAL_PREFIX`] + hex.
    pub fn seal(&self, request_id: &str, code: &str) -> String {
        let mut padded = [0u8; 1 + MAX_CODE_LEN];
        let n = code.len().min(MAX_CODE_LEN);
        padded[0] = n as u8;
        padded[1..=n].copy_from_slice(&code.as_bytes()[..n]);
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = ChaCha20Poly1305::new(&self.seal)
            .encrypt(
                &nonce,
                Payload {
                    msg: &padded,
                    aad: request_id.as_bytes(),
                },
            )
            .unwrap_or_else(|_| unreachable!("encrypting a short buffer cannot fail"));
        let mut out = String::with_capacity(SEAL_PREFIX.len() + SEALED_HEX);
        out.push_str(SEAL_PREFIX);
        out.push_str(&hex::encode(nonce));
        out.push_str(&hex::encode(sealed));
        out
    }

    /// The code inside one sealed token (prefix included), if it was sealed for `request_id`
    /// with this key.
    fn open_token(&self, request_id: &str, token: &str) -> Option<String> {
        let bytes = hex::decode(token.strip_prefix(SEAL_PREFIX)?).ok()?;
        let (nonce, sealed) = bytes.split_at_checked(12)?;
        let plain = ChaCha20Poly1305::new(&self.seal)
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: request_id.as_bytes(),
                },
            )
            .ok()?;
        let n = usize::from(*plain.first()?);
        let code = plain.get(1..=n)?;
        std::str::from_utf8(code).ok().map(str::to_owned)
    }

    /// `text` with every token sealed for `request_id` replaced by its code; `None` when it has
    /// none (the common case costs one substring search). A token that does not open (another
    /// key, another request, altered) is left as it is.
    pub fn open_text(&self, request_id: &str, text: &str) -> Option<String> {
        text.find(SEAL_PREFIX)?;
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        let mut opened = false;
        while let Some(at) = rest.find(SEAL_PREFIX) {
            out.push_str(&rest[..at]);
            let candidate = &rest[at..];
            let end = SEAL_PREFIX.len() + SEALED_HEX;
            match candidate
                .get(..end)
                .and_then(|t| self.open_token(request_id, t))
            {
                Some(code) => {
                    out.push_str(&code);
                    opened = true;
                    rest = &candidate[end..];
                }
                None => {
                    out.push_str(SEAL_PREFIX);
                    rest = &candidate[SEAL_PREFIX.len()..];
                }
            }
        }
        out.push_str(rest);
        opened.then_some(out)
    }

    /// The MAC a code is stored as: bound to the app, the purpose and the destination (its
    /// recipient key), so a code issued for one never passes for another.
    pub fn code_mac(&self, app: &str, purpose: &str, destination_key: &str, code: &str) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.mac)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        for part in [app, purpose, destination_key, code] {
            // Length-prefixed: no two different tuples give the same input.
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac.finalize().into_bytes().to_vec()
    }
}

/// Opens every sealed code in a rendered message's content (texts and provider parameters),
/// for the provider call only. False when there was none.
pub fn open_content(
    keys: &Keys,
    request_id: &str,
    content: &mut herald_schemas::RenderedContent,
) -> bool {
    let mut opened = false;
    for text in [
        &mut content.subject,
        &mut content.text,
        &mut content.html,
        &mut content.markdown,
    ]
    .into_iter()
    .flatten()
    {
        if let Some(t) = keys.open_text(request_id, text) {
            *text = t;
            opened = true;
        }
    }
    for v in content.provider_params.values_mut() {
        if let Some(t) = keys.open_text(request_id, v) {
            *v = t;
            opened = true;
        }
    }
    opened
}

/// Whether a rendered message carries a sealed code (cheap: substring searches).
pub fn sealed_in(content: &herald_schemas::RenderedContent) -> bool {
    [
        &content.subject,
        &content.text,
        &content.html,
        &content.markdown,
    ]
    .into_iter()
    .flatten()
    .chain(content.provider_params.values())
    .any(|t| t.contains(SEAL_PREFIX))
}

/// A code of `len` decimal digits, each uniform (rejection sampling on the CSPRNG's bytes).
pub fn generate_code(len: usize) -> String {
    let mut code = String::with_capacity(len);
    let mut buf = [0u8; 16];
    while code.len() < len {
        OsRng.fill_bytes(&mut buf);
        for b in buf {
            // 250 = 25 × 10: bytes 250..=255 would favour 0–5.
            if b < 250 && code.len() < len {
                code.push(char::from(b'0' + b % 10));
            }
        }
    }
    code
}

/// Compares two MACs in constant time.
pub fn same_mac(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// A new verification to record before its code is sent.
pub struct New<'a> {
    pub id: &'a str,
    pub app_id: &'a str,
    pub purpose: &'a str,
    pub channel: &'a str,
    /// The destination's key ([`crate::destination::Keyer::key`]: of its normalised form), so
    /// every spelling of one mailbox or phone meets the same limits and budget.
    pub destination_key: &'a str,
    pub destination_masked: &'a str,
    pub code_mac: &'a [u8],
    pub message_id: &'a str,
    pub ttl_secs: i64,
}

/// The limits a new verification meets.
pub struct Limits {
    pub max_attempts: i32,
    pub resend_interval_secs: i64,
    pub max_sends_per_hour: i64,
    pub max_sends_per_day: i64,
}

/// Why no new code is sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// This app sent to this destination less than the resend interval ago.
    Cooldown { retry_after_secs: i64 },
    /// This app's hourly or daily limit for this destination.
    TooManySends { retry_after_secs: i64 },
    /// The wrong-check budget of this app, purpose and destination is spent until the last
    /// code expires.
    Locked { retry_after_secs: i64 },
}

/// The reserved verification: when it expires, and the wrong checks it starts with (carried
/// from the code it will replace).
#[derive(Debug)]
pub struct Created {
    pub expires_at_ms: i64,
    pub attempts: i32,
}

/// Reserves a verification before its code is published, atomically with the limits: sends of
/// one app to one destination are serialised by an advisory lock, and the resend interval and
/// the hourly and daily counts are those of this app and destination (another app's sends
/// never use them up). The latest code of the same app, purpose and destination is locked and
/// its wrong checks carried (a resend buys no more guesses; a spent budget refuses new codes
/// until the last one expires), but it stays valid: the new row is `sending`, uncheckable, until
/// [`published`] swaps the two once the code is out. If publishing fails, [`unsent`] drops the
/// new row and the old code is still the user's.
pub async fn create(
    db: &mut Client,
    v: &New<'_>,
    limits: &Limits,
) -> Result<Result<Created, Refused>, tokio_postgres::Error> {
    let tx = db.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2, 1213353046))",
        &[&v.app_id, &v.destination_key],
    )
    .await?;
    let row = tx
        .query_one(
            "SELECT
               COALESCE(ceil(EXTRACT(EPOCH FROM max(created_at) + make_interval(secs => $3::bigint) - now()))::bigint, 0),
               count(*) FILTER (WHERE created_at > now() - interval '1 hour'),
               COALESCE(ceil(EXTRACT(EPOCH FROM min(created_at) FILTER (WHERE created_at > now() - interval '1 hour')
                                  + interval '1 hour' - now()))::bigint, 0),
               count(*),
               COALESCE(ceil(EXTRACT(EPOCH FROM min(created_at) + interval '1 day' - now()))::bigint, 0)
             FROM verifications
             WHERE app_id = $1 AND destination_key = $2 AND status <> 'unsent'
               AND created_at > now() - interval '1 day'",
            &[&v.app_id, &v.destination_key, &limits.resend_interval_secs],
        )
        .await?;
    let (cooldown, hour, hour_wait, day, day_wait): (i64, i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if cooldown > 0 {
        return Ok(Err(Refused::Cooldown {
            retry_after_secs: cooldown,
        }));
    }
    if hour >= limits.max_sends_per_hour {
        return Ok(Err(Refused::TooManySends {
            retry_after_secs: hour_wait.max(1),
        }));
    }
    if day >= limits.max_sends_per_day {
        return Ok(Err(Refused::TooManySends {
            retry_after_secs: day_wait.max(1),
        }));
    }
    // The latest published code of this app, purpose and destination still valid, locked: a
    // check of it in flight finishes first, so the count read here is its count.
    let prior = tx
        .query_opt(
            "SELECT status, attempts,
                    GREATEST(ceil(EXTRACT(EPOCH FROM expires_at - now()))::bigint, 1)
             FROM verifications
             WHERE app_id = $1 AND purpose = $2 AND destination_key = $3 AND expires_at > now()
               AND status IN ('pending', 'approved', 'max_attempts_reached')
             ORDER BY created_at DESC LIMIT 1
             FOR UPDATE",
            &[&v.app_id, &v.purpose, &v.destination_key],
        )
        .await?;
    let mut attempts = 0;
    if let Some(p) = prior {
        let (status, tried, left): (String, i32, i64) = (p.get(0), p.get(1), p.get(2));
        if status != "approved" {
            if tried >= limits.max_attempts {
                return Ok(Err(Refused::Locked {
                    retry_after_secs: left,
                }));
            }
            attempts = tried;
        }
    }
    // clock_timestamp(): rows of one destination are ordered as the lock let them in.
    let expires: i64 = tx
        .query_one(
            "INSERT INTO verifications (id, app_id, purpose, channel, destination_key,
                 destination_masked, code_mac, status, attempts, max_attempts, message_id,
                 created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'sending', $8, $9, $10, clock_timestamp(),
                     now() + make_interval(secs => $11::bigint))
             RETURNING (EXTRACT(EPOCH FROM expires_at) * 1000)::bigint",
            &[
                &v.id,
                &v.app_id,
                &v.purpose,
                &v.channel,
                &v.destination_key,
                &v.destination_masked,
                &v.code_mac,
                &attempts,
                &limits.max_attempts,
                &v.message_id,
                &v.ttl_secs,
            ],
        )
        .await?
        .get(0);
    tx.commit().await?;
    Ok(Ok(Created {
        expires_at_ms: expires,
        attempts,
    }))
}

/// The code reserved by [`create`] is published: it becomes checkable and supersedes the older
/// live codes of its app, purpose and destination. Those are locked first, so every wrong check
/// they took while the code was on its way (counted on them under the same row lock) is carried
/// over: the new code starts with the highest count among them and itself. The new code's view
/// after it (`max_attempts_reached` if those checks spent the budget); `None` when it was not
/// `sending` any more.
pub async fn published(db: &mut Client, id: &str) -> Result<Option<View>, tokio_postgres::Error> {
    let tx = db.transaction().await?;
    let older = tx
        .query(
            "SELECT o.id, o.attempts FROM verifications o
               JOIN verifications n ON n.id = $1
             WHERE o.app_id = n.app_id AND o.purpose = n.purpose
               AND o.destination_key = n.destination_key AND o.created_at < n.created_at
               AND o.expires_at > now() AND o.status IN ('pending', 'max_attempts_reached')
             ORDER BY o.created_at, o.id
             FOR UPDATE OF o",
            &[&id],
        )
        .await?;
    let ids: Vec<String> = older.iter().map(|r| r.get(0)).collect();
    let carried: i32 = older.iter().map(|r| r.get(1)).max().unwrap_or(0);
    tx.execute(
        "UPDATE verifications SET status = 'superseded', decided_at = now()
         WHERE id = ANY($1) AND status = 'pending'",
        &[&ids],
    )
    .await?;
    let sql = format!(
        "UPDATE verifications SET attempts = GREATEST(attempts, $2),
             status = CASE WHEN GREATEST(attempts, $2) >= max_attempts
                           THEN 'max_attempts_reached' ELSE 'pending' END,
             decided_at = CASE WHEN GREATEST(attempts, $2) >= max_attempts THEN now() END
         WHERE id = $1 AND status = 'sending'
         RETURNING {VIEW_COLUMNS}"
    );
    let row = tx.query_opt(&sql, &[&id, &carried]).await?;
    tx.commit().await?;
    Ok(row.as_ref().map(view))
}

/// The code was never published (the transport refused it): it does not count against the
/// destination's limits and cannot be checked. The code it was to replace stays valid, with its
/// wrong checks.
pub async fn unsent(db: &Client, id: &str) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "UPDATE verifications SET status = 'unsent', decided_at = now() WHERE id = $1",
        &[&id],
    )
    .await?;
    Ok(())
}

/// A verification as the API shows it (never its MAC).
#[derive(Debug, Clone, serde::Serialize)]
pub struct View {
    pub id: String,
    pub purpose: String,
    pub channel: String,
    pub to: String,
    /// `pending`, `approved`, `max_attempts_reached`, `expired`, `superseded`, `unsent`,
    /// `sending` (published but never made checkable: the database failed right after), and
    /// `used` as a check's answer for an approved one.
    pub status: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub message_id: String,
    pub created_at: i64,
    pub expires_at: i64,
}

const VIEW_COLUMNS: &str = "id, purpose, channel, destination_masked, status, attempts,
    max_attempts, message_id, (EXTRACT(EPOCH FROM created_at) * 1000)::bigint,
    (EXTRACT(EPOCH FROM expires_at) * 1000)::bigint, expires_at <= now(), code_mac,
    destination_key";

fn view(r: &tokio_postgres::Row) -> View {
    let mut status: String = r.get(4);
    if status == "pending" && r.get::<_, bool>(10) {
        status = "expired".into();
    }
    View {
        id: r.get(0),
        purpose: r.get(1),
        channel: r.get(2),
        to: r.get(3),
        status,
        attempts: r.get(5),
        max_attempts: r.get(6),
        message_id: r.get(7),
        created_at: r.get(8),
        expires_at: r.get(9),
    }
}

/// One verification of `app`.
pub async fn get(db: &Client, app: &str, id: &str) -> Result<Option<View>, tokio_postgres::Error> {
    let sql = format!("SELECT {VIEW_COLUMNS} FROM verifications WHERE id = $1 AND app_id = $2");
    Ok(db.query_opt(&sql, &[&id, &app]).await?.as_ref().map(view))
}

/// A check's answer: the verification after it, and whether this check approved it.
#[derive(Debug)]
pub struct Checked {
    pub view: View,
    pub approved: bool,
}

/// Checks a code. The row is locked for the check, so two concurrent right answers cannot both
/// pass, and a resend reading its count waits for it; a wrong one (or one for another purpose or
/// destination) spends one of the budget, and the last one kills the code. An approved,
/// superseded, expired, dead or not yet published code is never approved (and does not count).
/// `claimed` is the purpose and destination the caller expects, if it names them: they are part
/// of the MAC, the destination in its normalised form (an address that is not one of the
/// code's channel never matches). `None`: no such verification for this app.
pub async fn check(
    db: &mut Client,
    keys: &Keys,
    keyer: &crate::destination::Keyer<'_>,
    app: &str,
    id: &str,
    code: &str,
    claimed: (Option<&str>, Option<&str>),
) -> Result<Option<Checked>, tokio_postgres::Error> {
    let tx = db.transaction().await?;
    let sql = format!(
        "SELECT {VIEW_COLUMNS} FROM verifications WHERE id = $1 AND app_id = $2 FOR UPDATE"
    );
    let Some(row) = tx.query_opt(&sql, &[&id, &app]).await? else {
        return Ok(None);
    };
    let mut v = view(&row);
    if v.status != "pending" {
        if v.status == "approved" {
            v.status = "used".into();
        }
        return Ok(Some(Checked {
            view: v,
            approved: false,
        }));
    }
    let stored: Vec<u8> = row.get(11);
    let purpose = claimed.0.unwrap_or(&v.purpose);
    let destination = match claimed.1 {
        None => Some(row.get::<_, String>(12)),
        Some(to) => herald_schemas::Channel::parse(&v.channel)
            .and_then(|channel| keyer.key(channel, to, "to").ok()),
    };
    let right =
        destination.is_some_and(|d| same_mac(&stored, &keys.code_mac(app, purpose, &d, code)));
    if right {
        tx.execute(
            "UPDATE verifications SET status = 'approved', decided_at = now() WHERE id = $1",
            &[&id],
        )
        .await?;
        v.status = "approved".into();
    } else {
        v.attempts += 1;
        if v.attempts >= v.max_attempts {
            v.status = "max_attempts_reached".into();
        }
        tx.execute(
            "UPDATE verifications SET attempts = $2, status = $3,
                 decided_at = CASE WHEN $3 = 'pending' THEN NULL ELSE now() END
             WHERE id = $1",
            &[&id, &v.attempts, &v.status],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Some(Checked {
        view: v,
        approved: right,
    }))
}

/// Verifications are kept two days past their expiry (the daily send limit looks back one).
pub const PURGE: crate::retention::Purge = crate::retention::Purge {
    table: "verifications",
    third: crate::retention::Third::None,
    days: |_| 2,
    sql: "DELETE FROM verifications WHERE ctid IN (
            SELECT ctid FROM verifications
            WHERE expires_at < now() - make_interval(days => $2::int)
            LIMIT $1)",
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_code_opens_only_for_its_request_and_key() {
        let keys = Keys::new("server-secret-of-at-least-16");
        let token = keys.seal("req-1", "0123456789");
        assert!(token.starts_with(SEAL_PREFIX));
        assert_eq!(token.len(), SEAL_PREFIX.len() + SEALED_HEX);
        assert!(!token.contains("0123456789"));
        let text = format!("Your code is {token}. <b>{token}</b>");
        assert_eq!(
            keys.open_text("req-1", &text).as_deref(),
            Some("Your code is 0123456789. <b>0123456789</b>")
        );
        // Another request, another key, an altered token: left as it is.
        assert_eq!(keys.open_text("req-2", &text), None);
        assert_eq!(
            Keys::new("another-server-secret!!").open_text("req-1", &text),
            None
        );
        let mut altered = token.clone();
        altered.replace_range(20..21, if &token[20..21] == "0" { "1" } else { "0" });
        assert_eq!(keys.open_text("req-1", &altered), None);
        // Plain texts, a bare or cut prefix.
        assert_eq!(keys.open_text("req-1", "no code here"), None);
        assert_eq!(keys.open_text("req-1", "hseal1"), None);
        assert_eq!(keys.open_text("req-1", &token[..40]), None);
        // Two seals of one code differ (random nonce).
        assert_ne!(keys.seal("req-1", "1234"), keys.seal("req-1", "1234"));
    }

    #[test]
    fn rendered_content_is_opened_in_texts_and_provider_params() {
        let keys = Keys::new("server-secret-of-at-least-16");
        let t = keys.seal("r", "424242");
        let mut c = herald_schemas::RenderedContent {
            subject: Some("Code".into()),
            text: Some(format!("code {t}")),
            provider_params: [("code".to_owned(), t.clone())].into(),
            ..Default::default()
        };
        assert!(open_content(&keys, "r", &mut c));
        assert_eq!(c.text.as_deref(), Some("code 424242"));
        assert_eq!(c.provider_params["code"], "424242");
        assert!(!open_content(&keys, "r", &mut c));
    }

    #[test]
    fn codes_are_digits_of_the_asked_length_and_spread_evenly() {
        let mut counts = [0u32; 10];
        for _ in 0..2000 {
            let c = generate_code(10);
            assert_eq!(c.len(), 10);
            for b in c.bytes() {
                assert!(b.is_ascii_digit());
                counts[usize::from(b - b'0')] += 1;
            }
        }
        // 20,000 digits, each expected 2,000 times (the bound is over 6 standard deviations).
        for n in counts {
            assert!((1700..2300).contains(&n), "{counts:?}");
        }
        assert_ne!(generate_code(6), generate_code(6));
    }

    #[test]
    fn the_mac_binds_app_purpose_destination_and_code() {
        let keys = Keys::new("server-secret-of-at-least-16");
        let m = keys.code_mac("app", "login", "dest", "123456");
        assert!(same_mac(
            &m,
            &keys.code_mac("app", "login", "dest", "123456")
        ));
        for other in [
            keys.code_mac("app2", "login", "dest", "123456"),
            keys.code_mac("app", "reset", "dest", "123456"),
            keys.code_mac("app", "login", "dest2", "123456"),
            keys.code_mac("app", "login", "dest", "123457"),
            // Length prefixes: moving a character between parts changes the MAC.
            keys.code_mac("ap", "plogin", "dest", "123456"),
        ] {
            assert!(!same_mac(&m, &other));
        }
        assert!(!same_mac(&m, &m[..31]));
    }
}
