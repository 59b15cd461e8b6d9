//! "May this provider take this message now?" — asked one way by the route stage (to pick a
//! provider), the send stage (where a failed call's rule moves the message on) and the callback
//! stage (where an undelivered receipt's rule moves it on): the provider is configured (the
//! callers ask only among their channel's providers), its kind reaches the address (mobile push: the token's platform), and its breaker is
//! closed, in this process and as the other processes last wrote it.

use std::collections::HashMap;

use super::breaker::{Breakers, OpenSet};

/// Whether a provider kind can deliver to an address (the provider registry answers).
pub trait Reach: Sync {
    fn accepts(&self, kind: &str, address: &str) -> bool;
}

/// The providers one message may go to now.
pub struct Eligible<'a> {
    /// Provider code → kind, for the providers configured.
    kinds: &'a HashMap<String, String>,
    reach: &'a dyn Reach,
    /// This process's breakers, where it keeps some (send: calls; callback: receipts).
    breakers: Option<&'a Breakers>,
    /// The breakers every process wrote (`provider_health`), as last read.
    open: &'a OpenSet,
}

impl<'a> Eligible<'a> {
    pub fn new(
        kinds: &'a HashMap<String, String>,
        reach: &'a dyn Reach,
        open: &'a OpenSet,
    ) -> Self {
        Eligible {
            kinds,
            reach,
            breakers: None,
            open,
        }
    }

    /// Also asks this process's own breakers.
    pub fn with_breakers(mut self, breakers: &'a Breakers) -> Self {
        self.breakers = Some(breakers);
        self
    }

    /// Configured, and its kind reaches `address`: what is left when every breaker is open.
    pub fn reaches(&self, provider: &str, address: &str) -> bool {
        self.kinds
            .get(provider)
            .is_some_and(|kind| self.reach.accepts(kind, address))
    }

    /// Reaches `address` and no breaker of it is open.
    pub fn now(&self, provider: &str, address: &str) -> bool {
        self.reaches(provider, address)
            && !self.open.is_open(provider)
            && self.breakers.is_none_or(|b| b.available(provider))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Push tokens: "ios:" ones only for apns, everything else for fcm; sms takes digits.
    struct Kinds;
    impl Reach for Kinds {
        fn accepts(&self, kind: &str, address: &str) -> bool {
            match kind {
                "apns" => address.starts_with("ios:"),
                "fcm" => !address.starts_with("ios:"),
                "sms" => address.chars().all(|c| c.is_ascii_digit()),
                _ => false,
            }
        }
    }

    fn kinds() -> HashMap<String, String> {
        [("a", "apns"), ("f", "fcm"), ("s1", "sms"), ("s2", "sms")]
            .into_iter()
            .map(|(c, k)| (c.to_owned(), k.to_owned()))
            .collect()
    }

    #[test]
    fn a_provider_is_eligible_when_configured_reaching_the_address_and_not_open() {
        let kinds = kinds();
        let open = OpenSet::with_open(["s2"]);
        let e = Eligible::new(&kinds, &Kinds, &open);
        assert!(e.now("a", "ios:tok") && !e.now("f", "ios:tok"));
        assert!(e.now("f", "android-tok") && !e.now("a", "android-tok"));
        assert!(!e.now("unknown", "123"), "not configured");
        assert!(e.now("s1", "13800000000"));
        assert!(
            !e.now("s2", "13800000000"),
            "open as another process wrote it"
        );
        assert!(
            e.reaches("s2", "13800000000"),
            "still reaches when every breaker is open"
        );
    }
}
