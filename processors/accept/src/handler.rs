//! Pure accept logic: a request in, one planned message per recipient out. No I/O.

use std::collections::{HashMap, HashSet};

use herald_core::util::{event_id, message_id};
use herald_domain::validate::{self, Limits, Problem};
use herald_schemas::{
    EventHeader, MessageAccepted, MessageFailed, Reason, Recipient, SendRequested,
};

/// What accept needs to know from the operator's config.
#[derive(Debug, Clone)]
pub struct AcceptPolicy {
    pub limits: Limits,
    /// Known templates: (owning app, code); app "" is shared by every app.
    pub templates: HashSet<(String, String)>,
    /// Configured apps: a request for any other app is refused.
    pub apps: HashSet<String>,
}

/// The plan for one request.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// The request cannot be attributed to messages (its identifiers are unusable, its app is
    /// not configured, it names more recipients than allowed): a dead letter with this reason,
    /// nothing else.
    Refused(Reason),
    /// The request as a whole is invalid: a dead letter, and every recipient's message fails
    /// with this reason (so `GET /v1/messages/{id}` answers `failed`, not 404).
    Rejected(Reason, Vec<MessageFailed>),
    /// One entry per recipient, in recipient order.
    Messages(Vec<Planned>),
}

#[derive(Debug, PartialEq)]
pub enum Planned {
    Accepted(Box<MessageAccepted>),
    /// This recipient is invalid; the others go on.
    Failed(Box<MessageFailed>),
}

/// Problems that leave nothing to attribute a failure to.
fn refused(p: &Problem) -> bool {
    matches!(
        p.field.as_str(),
        "request_id" | "app_id" | "idempotency_key"
    ) || p.code == "too_many_recipients"
}

pub fn plan(req: &SendRequested, policy: &AcceptPolicy, trace_id: &str, now: i64) -> Plan {
    let header = |i: usize, fact: &str, metadata: HashMap<String, String>| {
        let mid = message_id(&req.app_id, &req.request_id, i);
        EventHeader {
            event_id: event_id(&mid, fact, 0),
            event_time: now,
            stage: "accept".into(),
            trace_id: herald_core::trace::trace_id_of(trace_id),
            message_id: mid,
            request_id: req.request_id.clone(),
            app_id: req.app_id.clone(),
            channel: req.channel,
            attempt: 0,
            metadata,
        }
    };
    let whole = validate::request(req, &policy.limits, now).and_then(|()| match &req.template {
        Some(t)
            if !policy.templates.contains(&(req.app_id.clone(), t.clone()))
                && !policy.templates.contains(&(String::new(), t.clone())) =>
        {
            Err(Problem {
                code: "unknown_template",
                message: format!("template {t:?} is not defined"),
                field: "template".into(),
            })
        }
        _ => Ok(()),
    });
    let whole = if whole.as_ref().is_err_and(refused) {
        whole
    } else if !policy.apps.contains(&req.app_id) {
        Err(Problem {
            code: "unknown_app",
            message: format!("app {:?} is not configured", req.app_id),
            field: "app_id".into(),
        })
    } else {
        whole
    };
    if let Err(p) = whole {
        if refused(&p) {
            return Plan::Refused(p.reason());
        }
        // The metadata may be what is wrong: failure events carry none.
        let failed = (0..req.recipients.len())
            .map(|i| MessageFailed {
                header: header(i, "failed", HashMap::new()),
                provider: None,
                reason: p.reason(),
            })
            .collect();
        return Plan::Rejected(p.reason(), failed);
    }

    let messages = req
        .recipients
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if let Err(p) = validate::recipient(req, i, r, &policy.limits) {
                return Planned::Failed(Box::new(MessageFailed {
                    header: header(i, "failed", req.metadata.clone()),
                    provider: None,
                    reason: p.reason(),
                }));
            }
            let mut params: HashMap<String, String> = req.params.clone();
            params.extend(r.params.clone());
            Planned::Accepted(Box::new(MessageAccepted {
                header: header(i, "accepted", req.metadata.clone()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use herald_schemas::{Channel, Content, Priority};

    fn policy() -> AcceptPolicy {
        AcceptPolicy {
            limits: Limits {
                max_recipients: 3,
                max_message_bytes: 1000,
                max_request_bytes: 100_000,
            },
            templates: HashSet::from([(String::new(), "welcome".to_owned())]),
            apps: HashSet::from(["shop".to_owned()]),
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
    fn whole_request_problems_fail_every_message_with_a_reason() {
        let cases: Vec<(SendRequested, &str)> = vec![
            (
                {
                    let mut r = req(&["a@x.io", "b@x.io"]);
                    r.template = Some("nope".into());
                    r
                },
                "unknown_template",
            ),
            (
                {
                    let mut r = req(&["a@x.io", "b@x.io"]);
                    r.template = None;
                    r
                },
                "no_content",
            ),
            (
                {
                    let mut r = req(&["a@x.io", "b@x.io"]);
                    r.send_at = Some(i64::MAX);
                    r
                },
                "invalid_send_at",
            ),
            (
                {
                    let mut r = req(&["a@x.io", "b@x.io"]);
                    r.metadata.insert("m".into(), "\0".into());
                    r
                },
                "invalid_character",
            ),
        ];
        for (r, code) in cases {
            match plan(&r, &policy(), "t", 0) {
                Plan::Rejected(reason, failed) => {
                    assert_eq!(reason.code, code);
                    assert_eq!(failed.len(), 2, "{code}: one failure per recipient");
                    assert!(
                        failed
                            .iter()
                            .all(|f| f.reason.code == code && f.header.metadata.is_empty())
                    );
                }
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
    fn requests_that_name_no_usable_message_are_refused() {
        let cases: Vec<(SendRequested, &str)> = vec![
            (req(&[]), "no_recipients"),
            (req(&["a@x.io"; 4]), "too_many_recipients"),
            (
                {
                    let mut r = req(&["a@x.io"]);
                    r.request_id = "r\0".into();
                    r
                },
                "invalid_identifier",
            ),
            (
                {
                    let mut r = req(&["a@x.io"]);
                    r.app_id = "elsewhere".into();
                    r
                },
                "unknown_app",
            ),
        ];
        for (r, code) in cases {
            match plan(&r, &policy(), "t", 0) {
                Plan::Refused(reason) if reason.code == code => {}
                Plan::Rejected(reason, failed) if code == "no_recipients" => {
                    assert_eq!(reason.code, code);
                    assert!(failed.is_empty());
                }
                other => panic!("{code}: {other:?}"),
            }
        }
    }

    #[test]
    fn oversized_payload_fails_the_message() {
        let mut r = req(&["a@x.io"]);
        r.recipients[0]
            .params
            .insert("blob".into(), "x".repeat(2000));
        let Plan::Messages(p) = plan(&r, &policy(), "t", 0) else {
            panic!()
        };
        let Planned::Failed(f) = &p[0] else { panic!() };
        assert_eq!(f.reason.code, "payload_too_large");
    }

    #[test]
    fn a_nul_in_an_address_fails_only_that_recipient() {
        let Plan::Messages(p) = plan(&req(&["a@x.io", "b\0@x.io"]), &policy(), "t", 0) else {
            panic!()
        };
        assert!(matches!(p[0], Planned::Accepted(_)));
        let Planned::Failed(f) = &p[1] else { panic!() };
        assert_eq!(f.reason.code, "invalid_recipient");
        assert!(f.reason.message.starts_with("recipients[1].address"));
    }
}
