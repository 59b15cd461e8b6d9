//! The failure rule engine (CONTRACT.md §4 "rules"): after each provider answer, decide what
//! happens to the message. Rules are data, evaluated in ascending `priority`; the first whose
//! matchers all hold decides. When none matches, the defaults are: rate-limited → retry soon
//! (backpressure, not failure), transient → retry with backoff, permanent → fail. An unknown
//! outcome first goes through the channel's unknown-outcome policy.

use std::collections::HashMap;
use std::time::Duration;

use herald_core::config::{
    ActionConfig, Config, RuleAction, RuleConfig, RuleScene, UnknownOutcomePolicy,
};
use herald_schemas::{Channel, DeliveryOutcome, MessageRouted, Reason};

use super::{CallResult, Next};

/// What happens to a message after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The attempt succeeded: `sent` (receipt pending) or `delivered`.
    Done,
    /// Try again: after `delay`, through `provider` (the same one, or the next one).
    Retry {
        delay: Duration,
        provider: String,
        kind: String,
        rule: String,
    },
    /// Terminal `failed`.
    Fail { rule: String },
    /// Terminal `failed`, and the operator is told (the alert is addressed by its rule when it
    /// is posted: `alert::endpoints`).
    Alert { rule: String },
    /// Terminal `unknown`: the outcome cannot be known and the policy is not to resend.
    Unknown,
    /// The outcome is unknown; the message waits in `sent` for the provider's receipt.
    HoldForReceipt,
    /// The retry would land after `expires_at`: terminal `expired`.
    Expired,
}

impl Decision {
    /// Where and when the next attempt goes, if this decision calls for one (`reason` is
    /// recorded with a delayed attempt).
    pub fn next(&self, reason: Option<Reason>) -> Option<Next> {
        match self {
            Decision::Retry {
                delay,
                provider,
                kind,
                ..
            } => Some(Next {
                provider: provider.clone(),
                kind: kind.clone(),
                delay: *delay,
                reason,
            }),
            _ => None,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Decision::Done => "done",
            Decision::Retry { .. } => "retry",
            Decision::Fail { .. } => "fail",
            Decision::Alert { .. } => "alert",
            Decision::Unknown => "unknown",
            Decision::HoldForReceipt => "hold_for_receipt",
            Decision::Expired => "expired",
        }
    }
}

pub struct Rules {
    /// `send_failure` rules, by priority.
    rules: Vec<RuleConfig>,
    /// `callback_failure` rules (undelivered receipts), by priority.
    receipt_rules: Vec<RuleConfig>,
    /// Providers per channel in routing order: `(code, kind)`.
    order: HashMap<Channel, Vec<(String, String)>>,
    unknown: HashMap<Channel, UnknownOutcomePolicy>,
}

/// Default retry schedules when no rule matches.
const RATE_LIMITED_DEFAULT: (u32, f64, f64) = (8, 1.0, 2.0);
const TRANSIENT_DEFAULT: (u32, f64, f64) = (3, 5.0, 2.0);

impl Rules {
    pub fn new(cfg: &Config) -> Rules {
        let scene = |scene: RuleScene| {
            let mut v: Vec<RuleConfig> = cfg
                .rules
                .iter()
                .filter(|r| r.scene == scene)
                .cloned()
                .collect();
            v.sort_by_key(|r| r.priority);
            v
        };
        let order = Channel::ALL
            .iter()
            .map(|c| {
                let v = cfg
                    .providers_for(*c)
                    .iter()
                    .map(|p| (p.code.clone(), p.kind.as_str().to_owned()))
                    .collect();
                (*c, v)
            })
            .collect();
        let unknown = Channel::ALL
            .iter()
            .map(|c| (*c, cfg.unknown_outcome(*c)))
            .collect();
        Rules {
            rules: scene(RuleScene::SendFailure),
            receipt_rules: scene(RuleScene::CallbackFailure),
            order,
            unknown,
        }
    }

    fn matches(rule: &RuleConfig, m: &MessageRouted, r: &CallResult) -> bool {
        if rule.channel.is_some_and(|c| c != m.header.channel) {
            return false;
        }
        if !rule.provider.is_empty() && rule.provider != m.provider {
            return false;
        }
        let code = r.reason.as_ref().map(|x| x.code.as_str()).unwrap_or("");
        let response = r.response_code.as_deref().unwrap_or("");
        if !rule.error_codes.is_empty()
            && !rule.error_codes.iter().any(|c| c == code || c == response)
        {
            return false;
        }
        if !rule.error_keywords.is_empty() {
            let hay = format!(
                "{code} {response} {}",
                r.reason.as_ref().map(|x| x.message.as_str()).unwrap_or("")
            )
            .to_lowercase();
            if !rule
                .error_keywords
                .iter()
                .any(|k| hay.contains(&k.to_lowercase()))
            {
                return false;
            }
        }
        true
    }

    /// The next provider after `m.provider` in routing order that has not failed this message
    /// and that `available` accepts (open breakers are not).
    pub fn next_provider(
        &self,
        m: &MessageRouted,
        available: impl Fn(&str) -> bool,
    ) -> Option<(String, String)> {
        self.order
            .get(&m.header.channel)?
            .iter()
            .find(|(code, _)| {
                *code != m.provider && !m.tried_providers.contains(code) && available(code)
            })
            .cloned()
    }

    fn retry(
        m: &MessageRouted,
        attempt: i32,
        (max_retry, delay_seconds, backoff_rate): (u32, f64, f64),
        rule: &str,
    ) -> Decision {
        let retries_done = (attempt - 1).max(0) as u32;
        if retries_done >= max_retry {
            return Decision::Fail {
                rule: format!("{rule} (retries exhausted)"),
            };
        }
        let secs = delay_seconds * backoff_rate.powi(retries_done as i32);
        Decision::Retry {
            delay: Duration::from_secs_f64(secs.clamp(0.0, 86_400.0)),
            provider: m.provider.clone(),
            kind: m.provider_kind.clone(),
            rule: rule.to_owned(),
        }
    }

    /// Decides what follows attempt `attempt` of `m`, which ended with `r`, at time `now_ms`.
    pub fn decide(
        &self,
        m: &MessageRouted,
        attempt: i32,
        r: &CallResult,
        has_receipts: bool,
        now_ms: i64,
        available: impl Fn(&str) -> bool,
    ) -> Decision {
        if r.outcome == DeliveryOutcome::Succeeded {
            return Decision::Done;
        }
        if r.outcome == DeliveryOutcome::Unknown {
            match self
                .unknown
                .get(&m.header.channel)
                .copied()
                .unwrap_or_default()
            {
                UnknownOutcomePolicy::Fail => return Decision::Unknown,
                UnknownOutcomePolicy::HoldForReceipt if has_receipts => {
                    return Decision::HoldForReceipt;
                }
                UnknownOutcomePolicy::HoldForReceipt => return Decision::Unknown,
                UnknownOutcomePolicy::Resend => {}
            }
        }
        let decision = match self.rules.iter().find(|rule| Self::matches(rule, m, r)) {
            Some(rule) => self.apply(rule, m, attempt, available),
            None => match r.outcome {
                DeliveryOutcome::RateLimited => {
                    Self::retry(m, attempt, RATE_LIMITED_DEFAULT, "default: rate limited")
                }
                DeliveryOutcome::FailedTransient | DeliveryOutcome::Unknown => {
                    Self::retry(m, attempt, TRANSIENT_DEFAULT, "default: transient")
                }
                _ => Decision::Fail {
                    rule: "default: permanent".into(),
                },
            },
        };
        Self::unless_expired(decision, m, now_ms)
    }

    /// Whether an undelivered receipt for a message of `channel` sent through `provider` could
    /// meet a `callback_failure` rule: then the send stage keeps the message for a resend.
    pub fn may_act_on_receipt(&self, channel: Channel, provider: &str) -> bool {
        self.receipt_rules.iter().any(|r| {
            r.channel.is_none_or(|c| c == channel)
                && (r.provider.is_empty() || r.provider == provider)
        })
    }

    /// Decides what follows an undelivered receipt (`code`, `message`) for attempt `attempt` of
    /// `m`: the first matching `callback_failure` rule, or `None` (the receipt stands:
    /// `undelivered`). A retry that would land after `expires_at` is `Expired`.
    pub fn decide_receipt(
        &self,
        m: &MessageRouted,
        attempt: i32,
        code: &str,
        message: &str,
        now_ms: i64,
        available: impl Fn(&str) -> bool,
    ) -> Option<Decision> {
        let r = CallResult::fail(
            DeliveryOutcome::FailedPermanent,
            Some(code.to_owned()),
            Reason::new(code, message),
        );
        let rule = self
            .receipt_rules
            .iter()
            .find(|rule| Self::matches(rule, m, &r))?;
        Some(Self::unless_expired(
            self.apply(rule, m, attempt, available),
            m,
            now_ms,
        ))
    }

    /// A retry that would land after the message's `expires_at` becomes `Expired`.
    fn unless_expired(decision: Decision, m: &MessageRouted, now_ms: i64) -> Decision {
        match &decision {
            Decision::Retry { delay, .. }
                if m.expires_at
                    .is_some_and(|e| now_ms + delay.as_millis() as i64 >= e) =>
            {
                Decision::Expired
            }
            _ => decision,
        }
    }

    fn apply(
        &self,
        rule: &RuleConfig,
        m: &MessageRouted,
        attempt: i32,
        available: impl Fn(&str) -> bool,
    ) -> Decision {
        let a: &ActionConfig = &rule.action_config;
        match rule.action {
            RuleAction::Retry => Self::retry(
                m,
                attempt,
                (a.max_retry, a.delay_seconds, a.backoff_rate),
                &rule.name,
            ),
            RuleAction::SwitchProvider => match self.next_provider(m, available) {
                Some((provider, kind)) => Decision::Retry {
                    delay: Duration::ZERO,
                    provider,
                    kind,
                    rule: rule.name.clone(),
                },
                None => Decision::Fail {
                    rule: format!("{} (no other provider)", rule.name),
                },
            },
            RuleAction::Fail => Decision::Fail {
                rule: rule.name.clone(),
            },
            RuleAction::Alert => Decision::Alert {
                rule: rule.name.clone(),
            },
        }
    }
}

/// The reason recorded with a decision (the provider's own reason, annotated with the rule).
pub fn annotate(reason: Option<Reason>, decision: &Decision) -> Option<Reason> {
    let rule = match decision {
        Decision::Retry { rule, .. } | Decision::Fail { rule } | Decision::Alert { rule, .. } => {
            rule.as_str()
        }
        _ => return reason,
    };
    reason.map(|mut r| {
        r.message = format!("{} [rule: {rule}; {}]", r.message, decision.label());
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_schemas::{EventHeader, Priority, Recipient, RenderedContent};

    fn cfg(rules: &str) -> Config {
        let text = format!(
            r#"
            [[providers]]
            code = "ali"
            kind = "aliyun_sms"
            endpoint = "http://x"
            priority = 0
            [[providers]]
            code = "tc"
            kind = "tencent_sms"
            endpoint = "http://y"
            priority = 1
            {rules}
        "#
        );
        let mut c = Config::parse(&text).unwrap();
        c.apply_env(|_| Some("s".into()));
        // What validating against the providers' registry resolves: both kinds are SMS.
        for p in &mut c.providers {
            p.channel = Some(Channel::Sms);
        }
        c
    }

    fn msg(provider: &str, expires_at: Option<i64>) -> MessageRouted {
        MessageRouted {
            header: EventHeader {
                event_id: "e".into(),
                event_time: 0,
                stage: "route".into(),
                trace_id: "t".into(),
                message_id: "m".into(),
                request_id: "r".into(),
                app_id: "a".into(),
                channel: Channel::Sms,
                attempt: 1,
                metadata: Default::default(),
            },
            recipient: Recipient {
                address: "13800000000".into(),
                params: Default::default(),
                timezone: None,
            },
            priority: Priority::Normal,
            expires_at,
            template: None,
            template_version: None,
            content: RenderedContent::default(),
            provider: provider.into(),
            provider_kind: "aliyun_sms".into(),
            tried_providers: vec![],
            due_at: None,
        }
    }

    fn failed(outcome: DeliveryOutcome, code: &str, message: &str) -> CallResult {
        CallResult::fail(outcome, Some(code.into()), Reason::new(code, message))
    }

    #[test]
    fn first_matching_rule_by_priority_decides() {
        let rules = Rules::new(&cfg(r#"
            [[rules]]
            name = "limit -> switch"
            scene = "send_failure"
            error_codes = ["isv.BUSINESS_LIMIT_CONTROL"]
            action = "switch_provider"
            priority = 10
            [[rules]]
            name = "network retry"
            scene = "send_failure"
            channel = "SMS"
            error_keywords = ["TIMEOUT", "network"]
            action = "retry"
            action_config = { max_retry = 2, delay_seconds = 1, backoff_rate = 3 }
            priority = 20
            [[rules]]
            name = "catch all"
            scene = "send_failure"
            action = "fail"
            priority = 30
        "#));
        let m = msg("ali", None);
        let r = failed(
            DeliveryOutcome::FailedTransient,
            "isp.SYSTEM_ERROR",
            "network timeout",
        );
        assert_eq!(
            rules.decide(&m, 1, &r, true, 0, |_| true),
            Decision::Retry {
                delay: Duration::from_secs(1),
                provider: "ali".into(),
                kind: "aliyun_sms".into(),
                rule: "network retry".into()
            }
        );
        // Backoff: 1 s, then 3 s, then exhausted.
        assert!(
            matches!(rules.decide(&m, 2, &r, true, 0, |_| true), Decision::Retry { delay, .. } if delay == Duration::from_secs(3))
        );
        assert!(matches!(
            rules.decide(&m, 3, &r, true, 0, |_| true),
            Decision::Fail { .. }
        ));

        let limited = failed(
            DeliveryOutcome::RateLimited,
            "isv.BUSINESS_LIMIT_CONTROL",
            "触发分钟级流控",
        );
        assert!(
            matches!(rules.decide(&m, 1, &limited, true, 0, |_| true), Decision::Retry { ref provider, delay, .. } if provider == "tc" && delay.is_zero())
        );
        // Never back to a provider that failed, nor to an unavailable one.
        let mut on_tc = msg("tc", None);
        on_tc.tried_providers = vec!["ali".into()];
        assert!(matches!(
            rules.decide(&on_tc, 2, &limited, true, 0, |_| true),
            Decision::Fail { .. }
        ));
        assert!(matches!(
            rules.decide(&m, 1, &limited, true, 0, |c| c != "tc"),
            Decision::Fail { .. }
        ));

        let bad = failed(
            DeliveryOutcome::FailedPermanent,
            "isv.MOBILE_NUMBER_ILLEGAL",
            "bad",
        );
        assert_eq!(
            rules.decide(&m, 1, &bad, true, 0, |_| true),
            Decision::Fail {
                rule: "catch all".into()
            }
        );
    }

    #[test]
    fn defaults_unknown_policy_and_expiry() {
        let rules = Rules::new(&cfg(""));
        let m = msg("ali", None);
        assert!(matches!(
            rules.decide(
                &m,
                1,
                &failed(DeliveryOutcome::RateLimited, "x", "y"),
                true,
                0,
                |_| true
            ),
            Decision::Retry { .. }
        ));
        assert!(matches!(
            rules.decide(
                &m,
                1,
                &failed(DeliveryOutcome::FailedPermanent, "x", "y"),
                true,
                0,
                |_| true
            ),
            Decision::Fail { .. }
        ));
        let unknown = failed(DeliveryOutcome::Unknown, "timeout", "no answer");
        assert_eq!(
            rules.decide(&m, 1, &unknown, true, 0, |_| true),
            Decision::Unknown
        );
        assert_eq!(
            rules.decide(&m, 1, &CallResult::ok("OK", None), true, 0, |_| true),
            Decision::Done
        );

        let hold = Rules::new(&cfg(
            "[[policies]]\nchannel = \"SMS\"\nunknown_outcome = \"hold_for_receipt\"",
        ));
        assert_eq!(
            hold.decide(&m, 1, &unknown, true, 0, |_| true),
            Decision::HoldForReceipt
        );
        assert_eq!(
            hold.decide(&m, 1, &unknown, false, 0, |_| true),
            Decision::Unknown
        );
        let resend = Rules::new(&cfg(
            "[[policies]]\nchannel = \"SMS\"\nunknown_outcome = \"resend\"",
        ));
        assert!(matches!(
            resend.decide(&m, 1, &unknown, true, 0, |_| true),
            Decision::Retry { .. }
        ));

        // INAPP resends an unknown outcome by default (the inbox insert is keyed by the
        // message id); a policy may still say otherwise.
        let mut inbox = msg("inbox", None);
        inbox.header.channel = Channel::Inapp;
        assert!(matches!(
            rules.decide(&inbox, 1, &unknown, true, 0, |_| true),
            Decision::Retry { .. }
        ));
        let strict = Rules::new(&cfg(
            "[[policies]]\nchannel = \"INAPP\"\nunknown_outcome = \"fail\"",
        ));
        assert_eq!(
            strict.decide(&inbox, 1, &unknown, true, 0, |_| true),
            Decision::Unknown
        );

        // A retry due after expiry is not made.
        let expiring = msg("ali", Some(3_000));
        let transient = failed(DeliveryOutcome::FailedTransient, "x", "y");
        assert_eq!(
            rules.decide(&expiring, 1, &transient, true, 0, |_| true),
            Decision::Expired
        );
    }

    #[test]
    fn undelivered_receipts_meet_the_callback_failure_rules_only() {
        let rules = Rules::new(&cfg(r#"
            [[rules]]
            name = "carrier gateway fault: switch"
            scene = "callback_failure"
            provider = "ali"
            error_codes = ["MK:0005"]
            action = "switch_provider"
            priority = 10
            [[rules]]
            name = "handset off: retry later"
            scene = "callback_failure"
            channel = "SMS"
            error_keywords = ["undeliv"]
            action = "retry"
            action_config = { max_retry = 1, delay_seconds = 60 }
            priority = 20
            [[rules]]
            name = "anything else undelivered: alert"
            scene = "callback_failure"
            channel = "SMS"
            error_codes = ["MK:0001"]
            action = "alert"
            action_config = { webhook_url = "http://ops/alerts" }
            priority = 30
            [[rules]]
            name = "send failures are another scene"
            scene = "send_failure"
            error_codes = ["MK:0009"]
            action = "fail"
            priority = 1
        "#));
        let m = msg("ali", None);
        assert!(rules.may_act_on_receipt(Channel::Sms, "ali"));
        assert!(rules.may_act_on_receipt(Channel::Sms, "tc"));
        assert!(!rules.may_act_on_receipt(Channel::Email, "smtp"));
        assert!(
            matches!(rules.decide_receipt(&m, 1, "MK:0005", "gateway", 0, |_| true), Some(Decision::Retry { ref provider, delay, .. }) if provider == "tc" && delay.is_zero())
        );
        // Switching needs an available provider that has not had the message.
        assert!(matches!(
            rules.decide_receipt(&m, 1, "MK:0005", "gateway", 0, |c| c != "tc"),
            Some(Decision::Fail { .. })
        ));
        assert!(
            matches!(rules.decide_receipt(&m, 1, "UNDELIV", "用户短信未送达", 0, |_| true), Some(Decision::Retry { ref provider, delay, .. }) if provider == "ali" && delay == Duration::from_secs(60))
        );
        assert!(matches!(
            rules.decide_receipt(&m, 2, "UNDELIV", "", 0, |_| true),
            Some(Decision::Fail { .. })
        ));
        // A retry after the message's expiry is no retry.
        let short = msg("ali", Some(30_000));
        assert_eq!(
            rules.decide_receipt(&short, 1, "UNDELIV", "", 0, |_| true),
            Some(Decision::Expired)
        );
        assert!(matches!(
            rules.decide_receipt(&m, 1, "MK:0001", "", 0, |_| true),
            Some(Decision::Alert { ref rule }) if rule == "anything else undelivered: alert"
        ));
        // No callback rule matches: the receipt stands.
        assert_eq!(
            rules.decide_receipt(&m, 1, "MK:0009", "", 0, |_| true),
            None
        );
    }
}
