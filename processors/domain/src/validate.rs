//! One validation of a send request, used by the HTTP gateway (which refuses with a 4xx and
//! publishes nothing) and by the accept stage (which fails the request or the recipient with the
//! same machine-readable code for requests published straight to Kafka). Promise 5: whatever
//! accept would reject, the gateway refuses first.
//!
//! What is checked: identifiers and addresses carry no control characters; no string anywhere
//! carries a NUL (PostgreSQL text cannot hold it); each address fits its channel; schedule and
//! expiry are in range; and sizes are bounded where input drives them: recipients, metadata, each
//! message's payload, and the total bytes the request fans out into (shared params, content and
//! metadata are copied into every message).

use std::collections::HashMap;

use herald_schemas::{Channel, Reason, Recipient, SendRequested};

use herald_core::config::PipelineConfig;

/// Longest accepted scheduling horizon (and expiry).
pub const MAX_SCHEDULE_AHEAD_MS: i64 = 366 * 24 * 3600 * 1000;
/// Longest identifier (request id, app id, idempotency key, template code).
pub const MAX_ID_BYTES: usize = 256;
/// Longest address.
pub const MAX_ADDRESS_BYTES: usize = 512;
/// Largest `metadata` (it travels in every event of every message).
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Size bounds, from the pipeline config.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_recipients: usize,
    /// Largest payload of one message: shared and own params, content, metadata.
    pub max_message_bytes: usize,
    /// Largest total of all messages a request fans out into.
    pub max_request_bytes: usize,
}

impl Limits {
    pub fn from_config(p: &PipelineConfig) -> Limits {
        Limits {
            max_recipients: p.max_recipients,
            max_message_bytes: p.max_message_bytes,
            max_request_bytes: p.max_request_bytes,
        }
    }
}

/// What is wrong with a request: a machine-readable code, a text, and the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub code: &'static str,
    pub message: String,
    pub field: String,
}

impl Problem {
    fn new(code: &'static str, field: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            code,
            message: message.into(),
            field: field.into(),
        }
    }

    /// As a failure reason: `<field>: <message>`.
    pub fn reason(&self) -> Reason {
        Reason::new(self.code, format!("{}: {}", self.field, self.message))
    }
}

type Checked = Result<(), Problem>;

/// An identifier: present, bounded, printable.
fn identifier(field: &str, v: &str, required: bool) -> Checked {
    if required && v.trim().is_empty() {
        return Err(Problem::new("invalid_identifier", field, "is empty"));
    }
    if v.len() > MAX_ID_BYTES {
        return Err(Problem::new(
            "invalid_identifier",
            field,
            format!("longer than {MAX_ID_BYTES} bytes"),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(Problem::new(
            "invalid_identifier",
            field,
            "contains control characters",
        ));
    }
    Ok(())
}

/// Free text: anything but NUL.
fn text(field: &str, v: &str) -> Checked {
    if v.contains('\0') {
        return Err(Problem::new(
            "invalid_character",
            field,
            "contains a NUL character",
        ));
    }
    Ok(())
}

/// A string map: keys printable, values free text.
fn map(field: &str, m: &HashMap<String, String>) -> Checked {
    for (k, v) in m {
        if k.is_empty() || k.chars().any(char::is_control) {
            return Err(Problem::new(
                "invalid_character",
                field,
                format!("key {k:?} is empty or contains control characters"),
            ));
        }
        text(&format!("{field}.{k}"), v)?;
    }
    Ok(())
}

fn map_bytes(m: &HashMap<String, String>) -> usize {
    m.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// Bytes every message of the request carries whatever its recipient.
fn shared_bytes(req: &SendRequested) -> usize {
    map_bytes(&req.params)
        + map_bytes(&req.metadata)
        + req.content.as_ref().map_or(0, |c| {
            [&c.subject, &c.text, &c.html, &c.markdown]
                .iter()
                .map(|s| s.as_ref().map_or(0, String::len))
                .sum()
        })
        + req.template.as_ref().map_or(0, String::len)
}

fn recipient_bytes(r: &Recipient) -> usize {
    map_bytes(&r.params) + r.address.len() + r.timezone.as_ref().map_or(0, String::len)
}

/// Problems of the request as a whole: no message can be made of it.
pub fn request(req: &SendRequested, limits: &Limits, now_ms: i64) -> Checked {
    identifier("request_id", &req.request_id, true)?;
    identifier("app_id", &req.app_id, true)?;
    if let Some(k) = &req.idempotency_key {
        identifier("idempotency_key", k, false)?;
    }
    if let Some(t) = &req.template {
        identifier("template", t, true)?;
    }
    if req.recipients.is_empty() {
        return Err(Problem::new("no_recipients", "recipients", "is empty"));
    }
    if req.recipients.len() > limits.max_recipients {
        return Err(Problem::new(
            "too_many_recipients",
            "recipients",
            format!(
                "{} recipients, at most {}",
                req.recipients.len(),
                limits.max_recipients
            ),
        ));
    }
    map("params", &req.params)?;
    map("metadata", &req.metadata)?;
    if map_bytes(&req.metadata) > MAX_METADATA_BYTES {
        return Err(Problem::new(
            "payload_too_large",
            "metadata",
            format!("larger than {MAX_METADATA_BYTES} bytes"),
        ));
    }
    let content = req.content.as_ref();
    if let Some(c) = content {
        for (name, v) in [
            ("subject", &c.subject),
            ("text", &c.text),
            ("html", &c.html),
            ("markdown", &c.markdown),
        ] {
            if let Some(v) = v {
                text(&format!("content.{name}"), v)?;
            }
        }
    }
    let has_content = content.is_some_and(|c| {
        c.subject.is_some() || c.text.is_some() || c.html.is_some() || c.markdown.is_some()
    });
    if req.template.is_none() && !has_content {
        return Err(Problem::new(
            "no_content",
            "template",
            "neither template nor content is set",
        ));
    }
    if let Some(at) = req.send_at {
        if at < 0 {
            return Err(Problem::new("invalid_send_at", "send_at", "is negative"));
        }
        if at > now_ms.saturating_add(MAX_SCHEDULE_AHEAD_MS) {
            return Err(Problem::new(
                "invalid_send_at",
                "send_at",
                "is more than a year ahead",
            ));
        }
    }
    if let Some(exp) = req.expires_at {
        if exp < 0 || exp > now_ms.saturating_add(2 * MAX_SCHEDULE_AHEAD_MS) {
            return Err(Problem::new(
                "invalid_expires_at",
                "expires_at",
                "is out of range",
            ));
        }
        if req.send_at.is_some_and(|at| exp <= at) {
            return Err(Problem::new(
                "invalid_expires_at",
                "expires_at",
                "is not after send_at",
            ));
        }
    }
    if req.requested_at < 0 {
        return Err(Problem::new(
            "invalid_requested_at",
            "requested_at",
            "is negative",
        ));
    }
    let shared = shared_bytes(req);
    let total = req
        .recipients
        .iter()
        .map(|r| shared + recipient_bytes(r))
        .fold(0usize, usize::saturating_add);
    if total > limits.max_request_bytes {
        return Err(Problem::new(
            "request_too_large",
            "recipients",
            format!(
                "the request fans out into {total} bytes of messages, at most {}",
                limits.max_request_bytes
            ),
        ));
    }
    Ok(())
}

/// Problems of one recipient: its message fails alone, the others go on.
pub fn recipient(
    req: &SendRequested,
    index: usize,
    r: &Recipient,
    limits: &Limits,
) -> Result<(), Problem> {
    let field = format!("recipients[{index}]");
    address(req.channel, &r.address).map_err(|mut p| {
        p.field = format!("{field}.address");
        p
    })?;
    map(&format!("{field}.params"), &r.params)?;
    if let Some(tz) = &r.timezone
        && (identifier(&format!("{field}.timezone"), tz, true).is_err()
            || jiff::tz::TimeZone::get(tz).is_err())
    {
        return Err(Problem::new(
            "invalid_timezone",
            format!("{field}.timezone"),
            format!("{tz:?} is not an IANA time zone"),
        ));
    }
    let size = shared_bytes(req) + recipient_bytes(r);
    if size > limits.max_message_bytes {
        return Err(Problem::new(
            "payload_too_large",
            field,
            format!("{size} bytes, at most {}", limits.max_message_bytes),
        ));
    }
    Ok(())
}

/// Every problem of the request, whole or per recipient: what the gateway refuses.
pub fn all(req: &SendRequested, limits: &Limits, now_ms: i64) -> Checked {
    request(req, limits, now_ms)?;
    for (i, r) in req.recipients.iter().enumerate() {
        recipient(req, i, r, limits)?;
    }
    Ok(())
}

/// The platform a mobile push address names, and its device token: `apns:<hex token>`,
/// `jpush:<registration id>`, `fcm:<token>`, or a bare token (FCM's; FCM tokens may hold `:`
/// themselves, so only a known platform name counts as a prefix).
pub fn push_platform(address: &str) -> (&str, &str) {
    let a = address.trim();
    match a.split_once(':') {
        Some((p @ ("apns" | "fcm" | "jpush"), token)) => (p, token),
        _ => ("fcm", a),
    }
}

/// Checks a recipient address for its channel (the field is filled in by the caller).
pub fn address(channel: Channel, address: &str) -> Checked {
    let a = address.trim();
    let bad = |m: &str| Err(Problem::new("invalid_recipient", "address", m.to_owned()));
    if a.is_empty() {
        return bad("empty address");
    }
    if address.len() > MAX_ADDRESS_BYTES {
        return bad("address longer than 512 bytes");
    }
    if address.chars().any(char::is_control) {
        return bad("control characters in address");
    }
    match channel {
        Channel::Email => {
            let Some((local, domain)) = a.rsplit_once('@') else {
                return bad("not an e-mail address (no @)");
            };
            if local.is_empty()
                || domain.is_empty()
                || !domain.contains('.')
                || domain.starts_with('.')
                || domain.ends_with('.')
                || a.chars().any(char::is_whitespace)
                || a.contains(['<', '>', ',', ';', '"', '\\'])
            {
                return bad("not an e-mail address");
            }
            Ok(())
        }
        Channel::Sms => {
            let digits = a.strip_prefix('+').unwrap_or(a);
            if (6..=15).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit()) {
                Ok(())
            } else {
                bad("not a phone number (E.164: optional + and 6 to 15 digits)")
            }
        }
        Channel::Webhook => match reqwest::Url::parse(a) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
                if u.username() != "" || u.password().is_some() {
                    bad("webhook URLs carry no credentials")
                } else {
                    Ok(())
                }
            }
            _ => bad("not an http(s) URL"),
        },
        // Device tokens: printable ASCII; an APNs token is hex.
        Channel::Push => {
            let (platform, token) = push_platform(a);
            if token.is_empty() || !a.bytes().all(|b| b.is_ascii_graphic()) {
                bad("not a device token (printable ASCII without spaces)")
            } else if platform == "apns"
                && (token.len() % 2 != 0 || !token.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                bad("not an APNs device token (apns: and hex)")
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_schemas::{Content, Priority};

    fn limits() -> Limits {
        Limits {
            max_recipients: 3,
            max_message_bytes: 1000,
            max_request_bytes: 2500,
        }
    }

    fn req(addresses: &[&str]) -> SendRequested {
        SendRequested {
            request_id: "r1".into(),
            app_id: "shop".into(),
            idempotency_key: None,
            channel: Channel::Email,
            template: Some("welcome".into()),
            params: HashMap::from([("name".into(), "all".into())]),
            recipients: addresses
                .iter()
                .map(|a| Recipient {
                    address: (*a).into(),
                    params: HashMap::new(),
                    timezone: None,
                })
                .collect(),
            content: None,
            send_at: None,
            priority: Priority::Normal,
            expires_at: None,
            metadata: HashMap::new(),
            requested_at: 0,
        }
    }

    fn code(r: &SendRequested) -> Option<&'static str> {
        all(r, &limits(), 0).err().map(|p| p.code)
    }

    #[test]
    fn a_nul_anywhere_and_control_characters_in_identifiers_are_refused() {
        let ok = req(&["a@x.io"]);
        assert_eq!(code(&ok), None);
        type Mutation = fn(&mut SendRequested);
        let cases: Vec<(Mutation, &str)> = vec![
            (|r| r.request_id = "r\0".into(), "invalid_identifier"),
            (|r| r.app_id = "a\nb".into(), "invalid_identifier"),
            (
                |r| r.idempotency_key = Some("k\0".into()),
                "invalid_identifier",
            ),
            (|r| r.template = Some("t\u{7}".into()), "invalid_identifier"),
            (
                |r| r.recipients[0].address = "a\0@x.io".into(),
                "invalid_recipient",
            ),
            (
                |r| {
                    r.params.insert("k".into(), "v\0".into());
                },
                "invalid_character",
            ),
            (
                |r| {
                    r.metadata.insert("m".into(), "\0".into());
                },
                "invalid_character",
            ),
            (
                |r| {
                    r.recipients[0].params.insert("k".into(), "\0".into());
                },
                "invalid_character",
            ),
            (
                |r| {
                    r.content = Some(Content {
                        text: Some("a\0".into()),
                        ..Default::default()
                    })
                },
                "invalid_character",
            ),
            (
                |r| r.recipients[0].timezone = Some("Mars/Olympus".into()),
                "invalid_timezone",
            ),
        ];
        for (mutate, want) in cases {
            let mut r = ok.clone();
            mutate(&mut r);
            assert_eq!(code(&r), Some(want), "{r:?}");
        }
        // Newlines and tabs are fine in free text.
        let mut r = ok.clone();
        r.params.insert("k".into(), "line\n\tline".into());
        assert_eq!(code(&r), None);
    }

    #[test]
    fn whole_request_problems() {
        let mut r = req(&[]);
        assert_eq!(code(&r), Some("no_recipients"));
        r = req(&["a@x.io"; 4]);
        assert_eq!(code(&r), Some("too_many_recipients"));
        r = req(&["a@x.io"]);
        r.template = None;
        assert_eq!(code(&r), Some("no_content"));
        r.content = Some(Content::default());
        assert_eq!(code(&r), Some("no_content"));
        r = req(&["a@x.io"]);
        r.send_at = Some(i64::MAX);
        assert_eq!(code(&r), Some("invalid_send_at"));
        r.send_at = Some(-1);
        assert_eq!(code(&r), Some("invalid_send_at"));
        r.send_at = Some(10);
        r.expires_at = Some(5);
        assert_eq!(code(&r), Some("invalid_expires_at"));
        r.send_at = None;
        r.expires_at = Some(i64::MAX);
        assert_eq!(code(&r), Some("invalid_expires_at"));
    }

    #[test]
    fn fan_out_and_message_sizes_are_bounded() {
        // Shared params are copied into every message: three recipients of ~900 bytes each is
        // over the 2500-byte request bound though each message fits.
        let mut r = req(&["a@x.io", "b@x.io", "c@x.io"]);
        r.params.insert("blob".into(), "x".repeat(890));
        assert_eq!(code(&r), Some("request_too_large"));
        r.recipients.truncate(2);
        assert_eq!(code(&r), None);
        r.metadata.insert("m".into(), "y".repeat(200));
        assert_eq!(code(&r), Some("payload_too_large"));
        let mut r = req(&["a@x.io"]);
        r.metadata
            .insert("m".into(), "y".repeat(MAX_METADATA_BYTES));
        assert_eq!(code(&r), Some("payload_too_large"));
    }

    #[test]
    fn addresses_per_channel() {
        assert!(address(Channel::Sms, "+8613800000000").is_ok());
        assert!(address(Channel::Sms, "not-a-phone").is_err());
        assert!(address(Channel::Webhook, "https://h.example/x").is_ok());
        assert!(address(Channel::Webhook, "ftp://h").is_err());
        assert!(address(Channel::Webhook, "https://user:pw@h.example/").is_err());
        assert!(address(Channel::Push, "dGVzdA:APA91b-x_y").is_ok());
        assert!(address(Channel::Push, "two words").is_err());
        assert!(address(Channel::Push, "tökén").is_err());
        assert!(address(Channel::Push, "apns:0a1b").is_ok());
        assert!(address(Channel::Push, "apns:0a1").is_err());
        assert!(address(Channel::Push, "apns:zz").is_err());
        assert!(address(Channel::Push, "jpush:").is_err());
        assert_eq!(push_platform("dXyz:APA91b"), ("fcm", "dXyz:APA91b"));
        assert_eq!(push_platform(" jpush:1a2 "), ("jpush", "1a2"));
        assert!(address(Channel::Email, "a b@x.io").is_err());
        assert!(address(Channel::Email, "a@x.io>, b@y.io").is_err());
        assert!(address(Channel::Wecom, "user\u{0}1").is_err());
        assert!(address(Channel::Inapp, "user-1").is_ok());
    }
}
