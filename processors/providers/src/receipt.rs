//! Receipt pushes (delivery reports a provider POSTs to the callback stage), provider-neutral.
//! Each provider that pushes receipts has a `receipt` module in its folder with its parser and
//! its acknowledgement; the callback stage looks each report's message up in the send ledger by
//! the ids Herald gave the provider.

/// One delivery report.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Herald's message id when the provider echoes it (Aliyun `out_id`).
    pub message_id: Option<String>,
    /// The provider's id for the send (`biz_id`, `sid`).
    pub provider_message_id: Option<String>,
    pub delivered: bool,
    pub code: String,
    pub message: String,
}

/// Longest provider or message id a report may carry (ids Herald issues are far shorter).
pub const MAX_ID: usize = 128;
/// Longest status code a report keeps.
pub const MAX_CODE: usize = 64;
/// Longest description a report keeps.
pub const MAX_MESSAGE: usize = 512;

impl Report {
    /// The report as Herald keeps it, or why it cannot be used. A provider's bytes reach
    /// PostgreSQL and the status topics from here, and PostgreSQL refuses a NUL in text: an id
    /// that is empty, holds a control character or is longer than [`MAX_ID`] matches nothing we
    /// sent and is dropped (kept, it would fail every lookup and be pushed again for ever); a
    /// report left with no usable id is refused. The code and description lose their NULs and
    /// are cut to [`MAX_CODE`] and [`MAX_MESSAGE`] characters.
    pub fn checked(mut self) -> Result<Report, String> {
        let usable = |id: &String| {
            !id.is_empty() && id.chars().count() <= MAX_ID && !id.chars().any(char::is_control)
        };
        let shown = |id: &Option<String>| {
            id.as_deref()
                .map(|i| i.chars().take(MAX_ID).collect::<String>())
        };
        let given = (shown(&self.message_id), shown(&self.provider_message_id));
        self.message_id = self.message_id.filter(usable);
        self.provider_message_id = self.provider_message_id.filter(usable);
        if self.message_id.is_none() && self.provider_message_id.is_none() {
            return Err(format!(
                "report names no usable id (ids are 1 to {MAX_ID} characters without control characters): {given:?}"
            ));
        }
        self.code = scrub(&self.code, MAX_CODE);
        self.message = scrub(&self.message, MAX_MESSAGE);
        Ok(self)
    }
}

/// `s` without NULs, at most `max` characters.
fn scrub(s: &str, max: usize) -> String {
    s.chars().filter(|c| *c != '\0').take(max).collect()
}

/// A provider's receipt push format.
pub struct Receipts {
    /// Parses one push (a body may hold many reports).
    pub parse: fn(&[u8]) -> Result<Vec<Report>, String>,
    /// The body the provider expects when a push was taken.
    pub ack: fn() -> serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: &str, code: &str, message: &str) -> Report {
        Report {
            message_id: None,
            provider_message_id: Some(id.into()),
            delivered: false,
            code: code.into(),
            message: message.into(),
        }
    }

    #[test]
    fn a_report_loses_nul_bytes_and_overlong_text() {
        let r = report("p-1", "E\0RR", &"x\0".repeat(1000))
            .checked()
            .unwrap();
        assert_eq!(r.code, "ERR");
        assert_eq!(r.message.len(), MAX_MESSAGE);
        assert!(!r.message.contains('\0'));
        let long = report("p-1", &"c".repeat(200), "").checked().unwrap();
        assert_eq!(long.code.len(), MAX_CODE);
    }

    #[test]
    fn a_report_with_no_usable_id_is_refused_and_an_unusable_one_dropped() {
        for id in ["p\u{0}1", "", "p\n1", &"p".repeat(MAX_ID + 1)] {
            assert!(report(id, "E", "m").checked().is_err(), "{id:?}");
            // Beside a usable message id, the unusable provider id is dropped.
            let mut both = report(id, "E", "m");
            both.message_id = Some("m-1".into());
            let r = both.checked().unwrap();
            assert_eq!(
                (r.message_id.as_deref(), r.provider_message_id),
                (Some("m-1"), None)
            );
        }
        let mut none = report("p", "E", "m");
        none.provider_message_id = None;
        assert!(none.checked().is_err());
        assert!(report(&"p".repeat(MAX_ID), "E", "m").checked().is_ok());
    }
}
