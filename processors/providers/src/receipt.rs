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

/// A provider's receipt push format.
pub struct Receipts {
    /// Parses one push (a body may hold many reports).
    pub parse: fn(&[u8]) -> Result<Vec<Report>, String>,
    /// The body the provider expects when a push was taken.
    pub ack: fn() -> serde_json::Value,
}
