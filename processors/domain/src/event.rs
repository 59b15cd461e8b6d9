//! The events that state a message's status, as one enum with one decode. The projector (the
//! read model) and the notify stage (status webhooks) both read statuses from these; each used
//! to decode them on its own.

use herald_core::codec::Codec;
use herald_core::transport::{InRecord, OutRecord};
use herald_core::worker::{StageError, dead_letter};
use herald_schemas::{
    DelayPurpose, DelayScheduled, DeliveryAttempted, EventHeader, MessageAccepted, MessageCanceled,
    MessageFailed, MessageRendered, MessageRouted, MessageSuppressed, Reason, ReceiptReceived,
};

use crate::status::Status;

/// An event that states a status of its message.
#[derive(Debug, Clone)]
pub enum StatusEvent {
    Accepted(MessageAccepted),
    Scheduled(DelayScheduled),
    Rendered(MessageRendered),
    Routed(MessageRouted),
    Attempted(DeliveryAttempted),
    Receipt(ReceiptReceived),
    Suppressed(MessageSuppressed),
    Canceled(MessageCanceled),
    Failed(MessageFailed),
}

/// What to do with a record whose type cannot be read at all (not Herald's wire format, an
/// unknown schema id). One stage dead-letters it; the others skip it so it is dead-lettered once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    DeadLetter,
    Skip,
}

impl StatusEvent {
    /// Decodes a record: `Ok(None)` for a record that states no status (another event type, an
    /// empty record) or one that was dead-lettered into `out` (undecodable bytes); `Err` only
    /// for a transient failure (the registry is unreachable), so the batch is retried.
    pub async fn decode(
        codec: &Codec,
        stage: &str,
        input: &InRecord,
        out: &mut Vec<OutRecord>,
        unreadable: Unreadable,
    ) -> Result<Option<StatusEvent>, StageError> {
        let Some(payload) = input.payload.as_deref() else {
            return Ok(None);
        };
        let name = match codec.event_name(payload).await {
            Ok(n) => n,
            Err(e) if e.is_transient() => return Err(StageError::Transient(e.to_string())),
            Err(e) => {
                if unreadable == Unreadable::DeadLetter {
                    let reason = Reason::new(e.code(), e.to_string());
                    out.push(dead_letter(codec, stage, input, reason, None, None).await?);
                }
                return Ok(None);
            }
        };
        macro_rules! decode_as {
            ($variant:ident, $t:ty) => {
                match codec.decode::<$t>(payload).await {
                    Ok(v) => StatusEvent::$variant(v),
                    Err(e) if e.is_transient() => {
                        return Err(StageError::Transient(e.to_string()));
                    }
                    Err(e) => {
                        let reason = Reason::new(e.code(), e.to_string());
                        out.push(dead_letter(codec, stage, input, reason, None, None).await?);
                        return Ok(None);
                    }
                }
            };
        }
        use herald_schemas::Event as _;
        Ok(Some(match name.as_str() {
            MessageAccepted::FULL_NAME => decode_as!(Accepted, MessageAccepted),
            DelayScheduled::FULL_NAME => decode_as!(Scheduled, DelayScheduled),
            MessageRendered::FULL_NAME => decode_as!(Rendered, MessageRendered),
            MessageRouted::FULL_NAME => decode_as!(Routed, MessageRouted),
            DeliveryAttempted::FULL_NAME => decode_as!(Attempted, DeliveryAttempted),
            ReceiptReceived::FULL_NAME => decode_as!(Receipt, ReceiptReceived),
            MessageSuppressed::FULL_NAME => decode_as!(Suppressed, MessageSuppressed),
            MessageCanceled::FULL_NAME => decode_as!(Canceled, MessageCanceled),
            MessageFailed::FULL_NAME => decode_as!(Failed, MessageFailed),
            _ => return Ok(None),
        }))
    }

    pub fn header(&self) -> &EventHeader {
        match self {
            StatusEvent::Accepted(e) => &e.header,
            StatusEvent::Scheduled(e) => &e.header,
            StatusEvent::Rendered(e) => &e.header,
            StatusEvent::Routed(e) => &e.header,
            StatusEvent::Attempted(e) => &e.header,
            StatusEvent::Receipt(e) => &e.header,
            StatusEvent::Suppressed(e) => &e.header,
            StatusEvent::Canceled(e) => &e.header,
            StatusEvent::Failed(e) => &e.header,
        }
    }

    /// The status this event gives its message, as the read model records it. A receipt after
    /// which the `callback_failure` rules sent the message again (`retry`, `switch_provider`)
    /// leaves it `sent` until the next attempt's outcome. Statuses events carry as strings are
    /// passed through as they are (a string that names no [`Status`] ranks lowest).
    pub fn status(&self) -> &str {
        match self {
            StatusEvent::Accepted(_) => Status::Accepted.as_str(),
            StatusEvent::Scheduled(e) => match e.purpose {
                DelayPurpose::ScheduledSend => Status::Scheduled.as_str(),
                DelayPurpose::Retry => Status::RetryScheduled.as_str(),
            },
            StatusEvent::Rendered(_) => Status::Rendered.as_str(),
            StatusEvent::Routed(_) => Status::Routed.as_str(),
            StatusEvent::Attempted(e) => &e.status,
            StatusEvent::Receipt(e) => match e.decision.as_deref() {
                Some("retry" | "switch_provider") => Status::Sent.as_str(),
                _ => &e.status,
            },
            StatusEvent::Suppressed(e) => &e.status,
            StatusEvent::Canceled(_) => Status::Canceled.as_str(),
            StatusEvent::Failed(_) => Status::Failed.as_str(),
        }
    }

    /// The provider the event names, if any.
    pub fn provider(&self) -> Option<&str> {
        match self {
            StatusEvent::Routed(e) => Some(&e.provider),
            StatusEvent::Attempted(e) => e.provider.as_deref(),
            StatusEvent::Receipt(e) => Some(&e.provider),
            StatusEvent::Failed(e) => e.provider.as_deref(),
            _ => None,
        }
    }

    /// Why the message is in this status, where the event says.
    pub fn reason(&self) -> Option<&Reason> {
        match self {
            StatusEvent::Scheduled(e) => e.reason.as_ref(),
            StatusEvent::Attempted(e) => e.reason.as_ref(),
            StatusEvent::Receipt(e) => e.reason.as_ref(),
            StatusEvent::Suppressed(e) => Some(&e.reason),
            StatusEvent::Canceled(e) => e.reason.as_ref(),
            StatusEvent::Failed(e) => Some(&e.reason),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use herald_schemas::Channel;

    use super::*;

    fn receipt(status: &str, decision: Option<&str>) -> StatusEvent {
        StatusEvent::Receipt(ReceiptReceived {
            header: EventHeader {
                event_id: "e".into(),
                event_time: 0,
                stage: "callback".into(),
                trace_id: "t".into(),
                message_id: "m".into(),
                request_id: "r".into(),
                app_id: "a".into(),
                channel: Channel::Sms,
                attempt: 1,
                metadata: Default::default(),
            },
            provider: "aliyun".into(),
            status: status.into(),
            provider_status_code: "DELIVRD".into(),
            provider_message_id: None,
            reason: None,
            reported_at: 0,
            decision: decision.map(str::to_owned),
        })
    }

    /// Both the read model and the status webhooks read a receipt's status here: an undelivered
    /// receipt the rules answered with another attempt is not terminal (the status webhook used
    /// to announce `undelivered` for a message that was then delivered).
    #[test]
    fn a_receipt_the_rules_retried_leaves_the_message_sent() {
        assert_eq!(receipt("delivered", None).status(), "delivered");
        assert_eq!(receipt("undelivered", Some("fail")).status(), "undelivered");
        assert_eq!(receipt("undelivered", Some("retry")).status(), "sent");
        assert_eq!(
            receipt("undelivered", Some("switch_provider")).status(),
            "sent"
        );
        assert!(!crate::status::is_terminal(
            receipt("undelivered", Some("retry")).status()
        ));
        assert_eq!(receipt("delivered", None).provider(), Some("aliyun"));
    }
}
