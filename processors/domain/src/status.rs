//! The status vocabulary (CONTRACT.md §3) as one type. Events carry statuses as strings (the
//! Avro contract); everything in Herald that compares, ranks or lists them goes through here.

/// A message's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Accepted,
    Scheduled,
    Rendered,
    Routed,
    RetryScheduled,
    Sent,
    Delivered,
    Failed,
    Undelivered,
    Suppressed,
    Canceled,
    Expired,
    Unknown,
}

impl Status {
    pub const ALL: [Status; 13] = [
        Status::Accepted,
        Status::Scheduled,
        Status::Rendered,
        Status::Routed,
        Status::RetryScheduled,
        Status::Sent,
        Status::Delivered,
        Status::Failed,
        Status::Undelivered,
        Status::Suppressed,
        Status::Canceled,
        Status::Expired,
        Status::Unknown,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Scheduled => "scheduled",
            Status::Rendered => "rendered",
            Status::Routed => "routed",
            Status::RetryScheduled => "retry_scheduled",
            Status::Sent => "sent",
            Status::Delivered => "delivered",
            Status::Failed => "failed",
            Status::Undelivered => "undelivered",
            Status::Suppressed => "suppressed",
            Status::Canceled => "canceled",
            Status::Expired => "expired",
            Status::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// After a terminal status a message changes no more.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Delivered
                | Status::Failed
                | Status::Undelivered
                | Status::Suppressed
                | Status::Canceled
                | Status::Expired
                | Status::Unknown
        )
    }

    /// Rank in the read model: a message's row only moves to a higher rank, so a status never
    /// moves backwards. Terminal statuses share the top rank (the first terminal fact wins).
    /// `retry_scheduled` is a timeline event only (rank 0): the message stays `sent`.
    pub const fn rank(self) -> i16 {
        match self {
            Status::RetryScheduled => 0,
            Status::Accepted => 1,
            Status::Scheduled => 2,
            Status::Rendered => 3,
            Status::Routed => 4,
            Status::Sent => 5,
            _ => 6,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The terminal statuses by name (SQL filters, the read model's purge).
pub const TERMINAL: [&str; 7] = [
    Status::Delivered.as_str(),
    Status::Failed.as_str(),
    Status::Undelivered.as_str(),
    Status::Suppressed.as_str(),
    Status::Canceled.as_str(),
    Status::Expired.as_str(),
    Status::Unknown.as_str(),
];

/// The terminal statuses from the lowest precedence to the highest: which of two terminal facts
/// of one message recorded at the same instant the read model keeps (the earlier one wins
/// otherwise). Evidence beats its absence (`unknown` lowest), a provider's word beats
/// Herald's own decisions, and delivery beats everything.
pub const PRECEDENCE: [&str; 7] = [
    Status::Unknown.as_str(),
    Status::Suppressed.as_str(),
    Status::Canceled.as_str(),
    Status::Expired.as_str(),
    Status::Failed.as_str(),
    Status::Undelivered.as_str(),
    Status::Delivered.as_str(),
];

impl Status {
    /// Position in [`PRECEDENCE`] (0 for a status that is not terminal).
    pub fn precedence(self) -> usize {
        PRECEDENCE
            .iter()
            .position(|s| *s == self.as_str())
            .map_or(0, |p| p + 1)
    }
}

/// [`Status::rank`] of a status string; 0 for a string that names no status.
pub fn rank(s: &str) -> i16 {
    Status::parse(s).map_or(0, Status::rank)
}

/// Whether a status string names a terminal status.
pub fn is_terminal(s: &str) -> bool {
    Status::parse(s).is_some_and(Status::is_terminal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_round_trips_and_terminal_agrees() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(TERMINAL.contains(&s.as_str()), s.is_terminal());
            assert_eq!(s.is_terminal(), s.rank() == 6);
            assert_eq!(s.is_terminal(), s.precedence() > 0);
        }
        assert_eq!(Status::parse("bogus"), None);
        assert!(!is_terminal("bogus"));
    }
}
