//! One form per destination for every rule that keys on where a message goes (verification
//! codes' cooldown, send limits and wrong-check budget today; the SMS frequency cap and opt-outs
//! can take it up): `Victim@example.com` and `victim@EXAMPLE.com` are one mailbox, and
//! `+8613800138000`, `8613800138000`, `008613800138000` and `13800138000` one phone. A rule keyed
//! on the caller's spelling gives each spelling its own budget.
//!
//! [`normalise`] is the one normalisation; [`Keyer::key`] the one key built from it (the
//! recipient key, an HMAC under the server secret, of the normalised form). What is delivered
//! stays the address the caller wrote: providers take their own national forms.

use std::str::FromStr;

use herald_schemas::Channel;

use crate::validate::{self, Problem};

/// The region a phone number without a country code belongs to (ISO 3166-1 alpha-2, `CN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region(phonenumber::country::Id);

impl Region {
    /// The region of an ISO 3166-1 alpha-2 code (any case) that has phone numbering metadata.
    pub fn parse(code: &str) -> Option<Region> {
        phonenumber::country::Id::from_str(&code.trim().to_ascii_uppercase())
            .ok()
            .map(Region)
    }

    /// The configured `[verifications] default_region` (validated when the configuration is
    /// loaded; `CN` should it not be one).
    pub fn configured(cfg: &herald_core::config::Config) -> Region {
        Region::parse(&cfg.verifications.default_region)
            .unwrap_or(Region(phonenumber::country::Id::CN))
    }
}

/// `address` (for `channel`) in the form every per-destination rule keys on, or why it is not
/// an address of that channel (`field` names where it came from, e.g. `to`):
///
/// - EMAIL: lower-cased whole. Domains are case-insensitive (RFC 5321 §2.4); local parts may in
///   theory not be, but no mailbox provider in use treats `Victim` and `victim` as two people,
///   and a limit that did would hand one person two budgets.
/// - SMS: E.164 (`+8613800138000`), numbers without a country code read in `region`; a number
///   the numbering plan does not allow is refused.
/// - WEBHOOK: the URL as parsed (scheme and host lower-cased, default port dropped).
/// - Others (user ids, openids, device tokens, robot mentions): as written, trimmed; they are
///   case-sensitive identifiers.
///
/// Every address is first checked as the gateway checks recipients ([`validate::address`]).
pub fn normalise(
    channel: Channel,
    address: &str,
    region: Region,
    field: &str,
) -> Result<String, Problem> {
    validate::address(channel, address).map_err(|p| Problem {
        field: field.to_owned(),
        ..p
    })?;
    let a = address.trim();
    let bad = |message: &str| Problem {
        code: "invalid_recipient",
        message: message.to_owned(),
        field: field.to_owned(),
    };
    match channel {
        Channel::Email => Ok(a.to_lowercase()),
        Channel::Sms => {
            let number = phonenumber::parse(Some(region.0), a)
                .map_err(|e| bad(&format!("not a phone number: {e}")))?;
            if !phonenumber::is_valid(&number) {
                return Err(bad(&format!(
                    "not a valid phone number (numbers without a country code are read as {:?})",
                    region.0
                )));
            }
            Ok(number.format().mode(phonenumber::Mode::E164).to_string())
        }
        Channel::Webhook => reqwest::Url::parse(a)
            .map(String::from)
            .map_err(|_| bad("not an http(s) URL")),
        _ => Ok(a.to_owned()),
    }
}

/// The ways `normal` (a [`normalise`]d address) may have been written before addresses were
/// normalised, itself first: for a phone, its E.164 form, the same without `+`, with `00`, and
/// its national forms in `region`; for any other channel, itself. Opt-outs stored before
/// normalisation are found and cleared by these.
pub fn spellings(channel: Channel, normal: &str, region: Region) -> Vec<String> {
    let mut out = vec![normal.to_owned()];
    if channel != Channel::Sms {
        return out;
    }
    let Ok(number) = phonenumber::parse(Some(region.0), normal) else {
        return out;
    };
    let digits = |s: String| s.chars().filter(char::is_ascii_digit).collect::<String>();
    let code = number.code().value();
    let national = number.national().value().to_string();
    for s in [
        format!("{code}{national}"),
        format!("00{code}{national}"),
        national,
        digits(
            number
                .format()
                .mode(phonenumber::Mode::National)
                .to_string(),
        ),
    ] {
        if !s.is_empty() && !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// The key of a destination: the recipient key (HMAC under the server secret) of its
/// [`normalise`]d form, so no table holds the address itself.
#[derive(Clone, Copy)]
pub struct Keyer<'a> {
    pub server_secret: &'a str,
    pub region: Region,
}

impl std::fmt::Debug for Keyer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyer")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Keyer<'_> {
    pub fn key(&self, channel: Channel, address: &str, field: &str) -> Result<String, Problem> {
        let normal = normalise(channel, address, self.region, field)?;
        Ok(herald_core::util::recipient_key(
            self.server_secret,
            &normal,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cn() -> Region {
        Region::parse("CN").unwrap()
    }

    fn norm(channel: Channel, a: &str) -> Result<String, Problem> {
        normalise(channel, a, cn(), "to")
    }

    #[test]
    fn a_normal_number_has_the_spellings_it_was_written_in() {
        let s = spellings(Channel::Sms, "+8613800138000", cn());
        for want in [
            "+8613800138000",
            "8613800138000",
            "008613800138000",
            "13800138000",
        ] {
            assert!(s.contains(&want.to_owned()), "{want}: {s:?}");
        }
        let uk = spellings(Channel::Sms, "+447700900123", Region::parse("GB").unwrap());
        assert!(uk.contains(&"07700900123".to_owned()), "{uk:?}");
        assert_eq!(spellings(Channel::Email, "a@b.c", cn()), ["a@b.c"]);
    }

    #[test]
    fn regions_are_iso_codes_in_any_case() {
        assert_eq!(Region::parse("cn"), Region::parse("CN"));
        assert!(Region::parse(" US ").is_some());
        assert_eq!(Region::parse("XX"), None);
        assert_eq!(Region::parse(""), None);
    }

    #[test]
    fn one_mailbox_is_one_destination_whatever_its_case() {
        for a in [
            "Victim@example.com",
            "victim@EXAMPLE.com",
            " VICTIM@Example.Com ",
        ] {
            assert_eq!(
                norm(Channel::Email, a).as_deref(),
                Ok("victim@example.com"),
                "{a}"
            );
        }
        assert_ne!(
            norm(Channel::Email, "victim@example.com"),
            norm(Channel::Email, "victim2@example.com")
        );
    }

    #[test]
    fn one_phone_is_one_destination_in_e164_whatever_its_form() {
        for a in [
            "+8613800138000",
            "8613800138000",
            "008613800138000",
            "13800138000",
            " 13800138000",
        ] {
            assert_eq!(
                norm(Channel::Sms, a).as_deref(),
                Ok("+8613800138000"),
                "{a}"
            );
        }
        // Another country's number keeps its own code; the region only reads national forms.
        assert_eq!(
            norm(Channel::Sms, "+447911123456").as_deref(),
            Ok("+447911123456")
        );
        let us = Region::parse("US").unwrap();
        assert_eq!(
            normalise(Channel::Sms, "6502530000", us, "to").as_deref(),
            Ok("+16502530000")
        );
    }

    #[test]
    fn what_is_not_a_phone_number_is_refused_with_its_field() {
        for a in [
            "1380013800",      // a digit short
            "+86138001380001", // a digit long
            "+999123456789",   // no such country code
            "12345",
            "138-0013-8000", // the gateway takes digits only
            "",
        ] {
            let p = normalise(Channel::Sms, a, cn(), "to").unwrap_err();
            assert_eq!(
                (p.code, p.field.as_str()),
                ("invalid_recipient", "to"),
                "{a}"
            );
        }
        let p = normalise(Channel::Email, "no-at-sign", cn(), "recipients[2].address").unwrap_err();
        assert_eq!(
            (p.code, p.field.as_str()),
            ("invalid_recipient", "recipients[2].address")
        );
    }

    #[test]
    fn urls_are_parsed_and_identifiers_kept_as_written() {
        assert_eq!(
            norm(Channel::Webhook, "HTTPS://Hooks.Example.com:443/a?b=1").as_deref(),
            Ok("https://hooks.example.com/a?b=1")
        );
        assert_eq!(norm(Channel::Wechat, " oAbC123 ").as_deref(), Ok("oAbC123"));
        assert_eq!(norm(Channel::Wecom, "ZhangSan").as_deref(), Ok("ZhangSan"));
    }

    #[test]
    fn the_key_is_the_same_for_every_spelling_and_holds_no_address() {
        let keyer = Keyer {
            server_secret: "server-secret-of-at-least-16",
            region: cn(),
        };
        let a = keyer.key(Channel::Sms, "+8613800138000", "to").unwrap();
        assert_eq!(keyer.key(Channel::Sms, "13800138000", "to").unwrap(), a);
        assert!(!a.contains("13800138000"));
        assert_eq!(
            keyer.key(Channel::Email, "Victim@example.com", "to"),
            keyer.key(Channel::Email, "victim@EXAMPLE.com", "to")
        );
    }
}
