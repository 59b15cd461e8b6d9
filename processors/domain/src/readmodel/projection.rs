//! Pure projection logic: an event → the status fact it states; facts folded per message so one
//! batch writes each row once. A status never moves backwards (CONTRACT.md §3).

use std::collections::HashMap;

use herald_schemas::{EventHeader, Reason};

use crate::status::Status;
pub use crate::status::rank;

/// One status fact about one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Fact {
    pub event_id: String,
    pub message_id: String,
    pub request_id: String,
    pub app_id: String,
    pub channel: String,
    pub status: String,
    pub at: i64,
    pub stage: String,
    pub attempt: i32,
    pub provider: Option<String>,
    pub reason: Option<Reason>,
    pub recipient_masked: Option<String>,
    /// SHA-256 of the raw address: receiver history without storing the address.
    pub recipient_key: Option<String>,
    pub template: Option<String>,
    pub template_version: Option<i32>,
    pub provider_code: Option<String>,
    pub latency_ms: Option<i64>,
    /// Set on delivery attempts: the classified outcome.
    pub outcome: Option<String>,
}

impl Fact {
    pub fn new(h: &EventHeader, status: &str) -> Fact {
        Fact {
            event_id: h.event_id.clone(),
            message_id: h.message_id.clone(),
            request_id: h.request_id.clone(),
            app_id: h.app_id.clone(),
            channel: h.channel.as_str().to_owned(),
            status: status.to_owned(),
            at: h.event_time,
            stage: h.stage.clone(),
            attempt: h.attempt,
            provider: None,
            reason: None,
            recipient_masked: None,
            recipient_key: None,
            template: None,
            template_version: None,
            provider_code: None,
            latency_ms: None,
            outcome: None,
        }
    }
}

impl Fact {
    /// The fact without NUL characters, which PostgreSQL refuses in text: one NUL from a
    /// provider's answer or receipt would fail the batch's transaction again and again, and
    /// every message behind it would wait in its last status.
    pub fn without_nul(mut self) -> Fact {
        fn clean(s: &mut String) {
            if s.contains('\0') {
                s.retain(|c| c != '\0');
            }
        }
        for s in [
            &mut self.event_id,
            &mut self.message_id,
            &mut self.request_id,
            &mut self.app_id,
            &mut self.channel,
            &mut self.status,
            &mut self.stage,
        ] {
            clean(s);
        }
        for s in [
            &mut self.provider,
            &mut self.recipient_masked,
            &mut self.recipient_key,
            &mut self.template,
            &mut self.provider_code,
            &mut self.outcome,
        ]
        .into_iter()
        .flatten()
        {
            clean(s);
        }
        if let Some(r) = &mut self.reason {
            clean(&mut r.code);
            clean(&mut r.message);
        }
        self
    }
}

/// The row a batch writes for one message: the highest-ranked fact, with every field any fact
/// of the batch knew.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRow {
    pub message_id: String,
    pub request_id: String,
    pub app_id: String,
    pub channel: String,
    pub status: String,
    pub rank: i16,
    pub provider: Option<String>,
    pub attempts: i32,
    pub recipient_masked: Option<String>,
    pub recipient_key: Option<String>,
    pub template: Option<String>,
    pub template_version: Option<i32>,
    pub latency_ms: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

pub fn fold(facts: &[Fact]) -> Vec<MessageRow> {
    let mut rows: HashMap<&str, MessageRow> = HashMap::new();
    let mut order = Vec::new();
    for f in facts {
        let r = rows.entry(&f.message_id).or_insert_with(|| {
            order.push(f.message_id.as_str());
            MessageRow {
                message_id: f.message_id.clone(),
                request_id: f.request_id.clone(),
                app_id: f.app_id.clone(),
                channel: f.channel.clone(),
                status: f.status.clone(),
                rank: 0,
                provider: None,
                attempts: 0,
                recipient_masked: None,
                recipient_key: None,
                template: None,
                template_version: None,
                latency_ms: None,
                created_at: f.at,
                updated_at: f.at,
            }
        });
        // Order-independent (so a rebuild reproduces the rows whatever order the topics are
        // replayed in): a higher rank wins; at equal rank the earlier fact wins; at the same
        // instant the higher precedence (the same rule as the table's upsert).
        let fr = rank(&f.status);
        let precedence = |s: &str| Status::parse(s).map_or(0, Status::precedence);
        if fr > r.rank
            || (fr == r.rank && f.at < r.updated_at)
            || (fr == r.rank
                && f.at == r.updated_at
                && precedence(&f.status) > precedence(&r.status))
        {
            r.rank = fr;
            r.status = f.status.clone();
            r.updated_at = f.at;
        }
        r.created_at = r.created_at.min(f.at);
        if f.provider.is_some() && f.attempt >= r.attempts {
            r.provider = f.provider.clone();
        }
        if f.latency_ms.is_some() && f.attempt >= r.attempts {
            r.latency_ms = f.latency_ms;
        }
        r.attempts = r.attempts.max(f.attempt);
        r.recipient_masked = r.recipient_masked.take().or(f.recipient_masked.clone());
        r.template = r.template.take().or(f.template.clone());
        r.template_version = r.template_version.or(f.template_version);
        r.recipient_key = r.recipient_key.take().or(f.recipient_key.clone());
    }
    order.into_iter().filter_map(|m| rows.remove(m)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_schemas::Channel;

    fn fact(status: &str, at: i64) -> Fact {
        let h = EventHeader {
            event_id: format!("e-{status}"),
            event_time: at,
            stage: "s".into(),
            trace_id: "t".into(),
            message_id: "m".into(),
            request_id: "r".into(),
            app_id: "a".into(),
            channel: Channel::Email,
            attempt: 0,
            metadata: Default::default(),
        };
        Fact::new(&h, status)
    }

    #[test]
    fn status_never_moves_backwards_whatever_the_order() {
        let mut routed = fact("routed", 3);
        routed.provider = Some("p".into());
        let facts = vec![fact("delivered", 5), routed, fact("accepted", 1)];
        let rows = fold(&facts);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].status, "delivered");
        assert_eq!(rows[0].provider.as_deref(), Some("p"));
        assert_eq!(rows[0].created_at, 1);
    }

    #[test]
    fn first_terminal_state_wins() {
        let rows = fold(&[fact("failed", 5), fact("delivered", 6)]);
        assert_eq!(rows[0].status, "failed");
    }

    #[test]
    fn a_fact_loses_every_nul_postgres_would_refuse() {
        let mut f = fact("undelivered", 1);
        f.provider_code = Some("5.1.1\u{0}".into());
        f.reason = Some(Reason::new("E\u{0}1", "bad\u{0}box"));
        f.provider = Some("p\u{0}".into());
        let f = f.without_nul();
        assert_eq!(f.provider_code.as_deref(), Some("5.1.1"));
        assert_eq!(f.provider.as_deref(), Some("p"));
        let r = f.reason.unwrap();
        assert_eq!((r.code.as_str(), r.message.as_str()), ("E1", "badbox"));
    }

    /// Two terminal facts of one instant (a receipt and a deadline, topics read in either
    /// order): the fixed precedence decides, so every order folds to the same row.
    #[test]
    fn terminal_facts_of_one_instant_fold_the_same_in_every_order() {
        use crate::status::TERMINAL;
        for a in TERMINAL {
            for b in TERMINAL {
                let one = fold(&[fact(a, 7), fact(b, 7)]);
                let other = fold(&[fact(b, 7), fact(a, 7)]);
                assert_eq!(one[0].status, other[0].status, "{a} / {b}");
                let want = if Status::parse(a).unwrap().precedence()
                    >= Status::parse(b).unwrap().precedence()
                {
                    a
                } else {
                    b
                };
                assert_eq!(one[0].status, want, "{a} / {b}");
            }
        }
        assert_eq!(
            fold(&[fact("unknown", 7), fact("delivered", 7)])[0].status,
            "delivered"
        );
    }
}
