//! Pure accept logic: a request in, one planned message per recipient out. No I/O.

use std::collections::{HashMap, HashSet};

use herald_core::util::{event_id, message_id};
use herald_schemas::{
    Channel, EventHeader, MessageAccepted, MessageFailed, Reason, Recipient, SendRequested,
};

/// What accept needs to know from the operator's config.
#[derive(Debug, Clone)]
pub struct AcceptPolicy {
    pub max_recipients: usize,
    /// Known template codes.
    pub templates: HashSet<String>,
    /// Largest payload (summed params and content) per message, bytes.
    pub max_payload_bytes: usize,
}

/// Longest accepted scheduling horizon.
const MAX_SCHEDULE_AHEAD_MS: i64 = 366 * 24 * 3600 * 1000;

/// The plan for one request.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// The request as a whole is invalid: nothing to send; dead-lettered with this reason.
    Rejected(Reason),
    /// One entry per recipient, in recipient order.
    Messages(Vec<Planned>),
}

#[derive(Debug, PartialEq)]
pub enum Planned {
    Accepted(Box<MessageAccepted>),
    /// This recipient is invalid; the others go on.
    Failed(Box<MessageFailed>),
}

pub fn plan(req: &SendRequested, policy: &AcceptPolicy, trace_id: &str, now: i64) -> Plan {
    if req.request_id.trim().is_empty() {
        return Plan::Rejected(Reason::new("invalid_request_id", "request_id is empty"));
    }
    if req.app_id.trim().is_empty() {
        return Plan::Rejected(Reason::new("invalid_app_id", "app_id is empty"));
    }
    if req.recipients.is_empty() {
        return Plan::Rejected(Reason::new("no_recipients", "recipients is empty"));
    }
    if req.recipients.len() > policy.max_recipients {
        return Plan::Rejected(Reason::new(
            "too_many_recipients",
            format!(
                "{} recipients, at most {}",
                req.recipients.len(),
                policy.max_recipients
            ),
        ));
    }
    match &req.template {
        Some(t) if !policy.templates.contains(t) => {
            return Plan::Rejected(Reason::new(
                "unknown_template",
                format!("template {t:?} is not defined"),
            ));
        }
        None if req.content.as_ref().is_none_or(|c| {
            c.subject.is_none() && c.text.is_none() && c.html.is_none() && c.markdown.is_none()
        }) =>
        {
            return Plan::Rejected(Reason::new(
                "no_content",
                "neither template nor content is set",
            ));
        }
        _ => {}
    }
    if let Some(at) = req.send_at
        && at > now + MAX_SCHEDULE_AHEAD_MS
    {
        return Plan::Rejected(Reason::new(
            "invalid_send_at",
            "send_at is more than a year ahead",
        ));
    }
    if let (Some(exp), Some(at)) = (req.expires_at, req.send_at)
        && exp <= at
    {
        return Plan::Rejected(Reason::new(
            "invalid_expires_at",
            "expires_at is not after send_at",
        ));
    }

    let shared_size: usize = req
        .params
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>()
        + req.content.as_ref().map_or(0, |c| {
            [&c.subject, &c.text, &c.html, &c.markdown]
                .iter()
                .map(|s| s.as_ref().map_or(0, String::len))
                .sum()
        });

    let messages = req
        .recipients
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mid = message_id(&req.app_id, &req.request_id, i);
            let header = EventHeader {
                event_id: event_id(&mid, "accepted", 0),
                event_time: now,
                stage: "accept".into(),
                trace_id: trace_id.to_owned(),
                message_id: mid,
                request_id: req.request_id.clone(),
                app_id: req.app_id.clone(),
                channel: req.channel,
                attempt: 0,
                metadata: req.metadata.clone(),
            };
            let size = shared_size
                + r.params
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>();
            let problem = validate_address(req.channel, &r.address).err().or_else(|| {
                (size > policy.max_payload_bytes).then(|| {
                    Reason::new(
                        "payload_too_large",
                        format!("{size} bytes, at most {}", policy.max_payload_bytes),
                    )
                })
            });
            if let Some(reason) = problem {
                let mut header = header;
                header.event_id = event_id(&header.message_id, "failed", 0);
                return Planned::Failed(Box::new(MessageFailed {
                    header,
                    provider: None,
                    reason: Reason::new(
                        reason.code,
                        format!("recipients[{i}].address: {}", reason.message),
                    ),
                }));
            }
            let mut params: HashMap<String, String> = req.params.clone();
            params.extend(r.params.clone());
            Planned::Accepted(Box::new(MessageAccepted {
                header,
                recipient: Recipient {
                    address: r.address.trim().to_owned(),
                    params: r.params.clone(),
                    timezone: r.timezone.clone(),
                },
                recipient_index: i as i32,
                template: req.template.clone(),
                params,
                content: req.content.clone(),
                send_at: req.send_at,
                priority: req.priority,
                expires_at: req.expires_at,
                requested_at: req.requested_at,
            }))
        })
        .collect();
    Plan::Messages(messages)
}

/// Checks a recipient address for its channel.
pub fn validate_address(channel: Channel, address: &str) -> Result<(), Reason> {
    let a = address.trim();
    let bad = |m: &str| Err(Reason::new("invalid_recipient", m.to_owned()));
    if a.is_empty() {
        return bad("empty address");
    }
    if a.len() > 512 {
        return bad("address longer than 512 bytes");
    }
    match channel {
        Channel::Email => {
            let Some((local, domain)) = a.rsplit_once('@') else {
                return bad("not an e-mail address (no @)");
            };
            if local.is_empty()
                || domain.is_empty()
                || !domain.contains('.')
                || a.chars().any(char::is_whitespace)
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
        Channel::Webhook => {
            if a.starts_with("https://") || a.starts_with("http://") {
                Ok(())
            } else {
                bad("not an http(s) URL")
            }
        }
        _ => {
            if a.chars().any(char::is_control) {
                bad("control characters in address")
            } else {
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_schemas::{Content, Priority};

    fn policy() -> AcceptPolicy {
        AcceptPolicy {
            max_recipients: 3,
            templates: HashSet::from(["welcome".to_owned()]),
            max_payload_bytes: 1000,
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
                    params: HashMap::from([("name".into(), "Ada".into())]),
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

    #[test]
    fn expands_recipients_with_deterministic_ids_and_merged_params() {
        let Plan::Messages(a) = plan(&req(&["a@x.io", "b@x.io"]), &policy(), "t", 5) else {
            panic!()
        };
        let Plan::Messages(b) = plan(&req(&["a@x.io", "b@x.io"]), &policy(), "t", 9) else {
            panic!()
        };
        assert_eq!(a.len(), 2);
        let ids = |p: &[Planned]| -> Vec<String> {
            p.iter()
                .map(|m| match m {
                    Planned::Accepted(m) => m.header.message_id.clone(),
                    Planned::Failed(m) => m.header.message_id.clone(),
                })
                .collect()
        };
        assert_eq!(ids(&a), ids(&b));
        assert_ne!(ids(&a)[0], ids(&a)[1]);
        let Planned::Accepted(m) = &a[0] else {
            panic!()
        };
        assert_eq!(
            m.params["name"], "Ada",
            "recipient params override shared ones"
        );
    }

    #[test]
    fn one_bad_recipient_fails_alone_with_its_index() {
        let Plan::Messages(p) = plan(&req(&["a@x.io", "not-an-address"]), &policy(), "t", 0) else {
            panic!()
        };
        assert!(matches!(p[0], Planned::Accepted(_)));
        let Planned::Failed(f) = &p[1] else {
            panic!("expected failure")
        };
        assert_eq!(f.reason.code, "invalid_recipient");
        assert!(f.reason.message.contains("recipients[1]"));
    }

    #[test]
    fn whole_request_problems_are_rejected_with_a_reason() {
        let cases: Vec<(SendRequested, &str)> = vec![
            (req(&[]), "no_recipients"),
            (req(&["a@x.io"; 4]), "too_many_recipients"),
            (
                {
                    let mut r = req(&["a@x.io"]);
                    r.template = Some("nope".into());
                    r
                },
                "unknown_template",
            ),
            (
                {
                    let mut r = req(&["a@x.io"]);
                    r.template = None;
                    r
                },
                "no_content",
            ),
            (
                {
                    let mut r = req(&["a@x.io"]);
                    r.send_at = Some(i64::MAX);
                    r
                },
                "invalid_send_at",
            ),
            (
                {
                    let mut r = req(&["a@x.io"]);
                    r.send_at = Some(10);
                    r.expires_at = Some(5);
                    r
                },
                "invalid_expires_at",
            ),
        ];
        for (r, code) in cases {
            match plan(&r, &policy(), "t", 0) {
                Plan::Rejected(reason) => assert_eq!(reason.code, code),
                other => panic!("{code}: {other:?}"),
            }
        }
        let mut inline = req(&["a@x.io"]);
        inline.template = None;
        inline.content = Some(Content {
            text: Some("hi".into()),
            ..Default::default()
        });
        assert!(matches!(
            plan(&inline, &policy(), "t", 0),
            Plan::Messages(_)
        ));
    }

    #[test]
    fn oversized_payload_fails_the_message() {
        let mut r = req(&["a@x.io"]);
        r.params.insert("blob".into(), "x".repeat(2000));
        let Plan::Messages(p) = plan(&r, &policy(), "t", 0) else {
            panic!()
        };
        let Planned::Failed(f) = &p[0] else { panic!() };
        assert_eq!(f.reason.code, "payload_too_large");
    }

    #[test]
    fn addresses_per_channel() {
        assert!(validate_address(Channel::Sms, "+8613800000000").is_ok());
        assert!(validate_address(Channel::Sms, "12ab").is_err());
        assert!(validate_address(Channel::Webhook, "https://h/x").is_ok());
        assert!(validate_address(Channel::Webhook, "ftp://h").is_err());
        assert!(validate_address(Channel::Email, "a b@x.io").is_err());
    }
}
