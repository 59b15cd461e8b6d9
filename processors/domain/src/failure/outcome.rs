//! The consequence of the rules' decision on one attempt, written once for both scenes: the send
//! stage (a call failed) and the callback stage (a receipt said undelivered). Pure: the records
//! it leads to are built by [`super::next_attempt`] and the alert by [`super::alert`].

use herald_schemas::Reason;

use super::Next;
use super::rules::{Decision, annotate};

/// What a decision leads to.
#[derive(Debug)]
pub struct Consequence {
    /// The decision's name as events carry it: a retry through another provider is
    /// `switch_provider`.
    pub name: &'static str,
    /// The attempt's reason as recorded, annotated with the rule that decided.
    pub reason: Option<Reason>,
    /// The next attempt, now or after a delay.
    pub next: Option<Next>,
    /// The operator alert to send, by the rule that called for it.
    pub alert: Option<String>,
}

/// The consequence of `decision` for an attempt through `provider` that ended with `reason`.
pub fn consequence(decision: &Decision, reason: Option<Reason>, provider: &str) -> Consequence {
    let reason = annotate(reason, decision);
    let name = match decision {
        Decision::Retry { provider: p, .. } if p != provider => "switch_provider",
        d => d.label(),
    };
    let alert = match decision {
        Decision::Alert { rule } => Some(rule.clone()),
        _ => None,
    };
    Consequence {
        name,
        next: decision.next(reason.clone()),
        reason,
        alert,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn reason() -> Option<Reason> {
        Some(Reason::new("E1", "refused"))
    }

    fn retry(provider: &str) -> Decision {
        Decision::Retry {
            delay: Duration::from_secs(2),
            provider: provider.into(),
            kind: "aliyun_sms".into(),
            rule: "r".into(),
        }
    }

    #[test]
    fn a_retry_names_its_provider_and_carries_the_annotated_reason() {
        let same = consequence(&retry("a"), reason(), "a");
        assert_eq!(same.name, "retry");
        let next = same.next.unwrap();
        assert_eq!(
            (next.provider.as_str(), next.delay),
            ("a", Duration::from_secs(2))
        );
        assert_eq!(
            next.reason.unwrap().message,
            "refused [rule: r; retry]",
            "the delayed attempt records why"
        );
        assert!(same.alert.is_none());

        let other = consequence(&retry("b"), reason(), "a");
        assert_eq!(other.name, "switch_provider");
        assert_eq!(other.next.unwrap().provider, "b");
    }

    #[test]
    fn terminal_decisions_have_no_next_attempt_and_alerts_name_their_rule() {
        let fail = consequence(&Decision::Fail { rule: "f".into() }, reason(), "a");
        assert_eq!(fail.name, "fail");
        assert!(fail.next.is_none() && fail.alert.is_none());
        assert_eq!(fail.reason.unwrap().message, "refused [rule: f; fail]");

        let alert = Decision::Alert {
            rule: "page".into(),
        };
        let c = consequence(&alert, reason(), "a");
        assert_eq!(c.alert.as_deref(), Some("page"));
        assert!(c.next.is_none());

        for d in [
            Decision::Done,
            Decision::Unknown,
            Decision::HoldForReceipt,
            Decision::Expired,
        ] {
            let c = consequence(&d, reason(), "a");
            assert_eq!(c.reason, reason(), "{d:?} leaves the reason as it was");
            assert!(c.next.is_none() && c.alert.is_none());
        }
    }
}
