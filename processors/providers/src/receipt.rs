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
    /// with a NUL, a control character or past [`MAX_ID`] matches nothing we sent and is refused
    /// (kept, it would fail every lookup and be pushed again for ever); the code and description
    /// lose their NULs and are cut to [`MAX_CODE`] and [`MAX_MESSAGE`] characters.
    pub fn checked(mut self) -> Result<Report, String> {
        for id in [&self.message_id, &self.provider_message_id]
            .into_iter()
            .flatten()
        {
            if id.is_empty() || id.chars().count() > MAX_ID || id.chars().any(char::is_control) {
                return Err(format!(
                    "report id {:?} is empty, longer than {MAX_ID} characters or holds a control character",
                    id.chars().take(MAX_ID).collect::<String>()
                ));
            }
        }
        if self.message_id.is_none() && self.provider_message_id.is_none() {
            return Err("report names no message".into());
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
    fn a_report_with_an_unusable_id_is_refused() {
        for id in ["p\u{0}1", "", "p\n1", &"p".repeat(MAX_ID + 1)] {
            assert!(report(id, "E", "m").checked().is_err(), "{id:?}");
        }
        let mut none = report("p", "E", "m");
        none.provider_message_id = None;
        assert!(none.checked().is_err());
        assert!(report(&"p".repeat(MAX_ID), "E", "m").checked().is_ok());
    }
}
