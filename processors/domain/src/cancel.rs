//! Cancel and recall, as one use case for every caller: the API's
//! `POST /v1/messages/{id}/cancel` and `POST /v1/requests/{id}/cancel`, and the console's cancel
//! buttons. A message is canceled through the send gate ([`crate::gate`]) — atomically against
//! its first provider call — and a `MessageCanceled` is published to `herald.status` so its
//! status becomes `canceled`.
//!
//! Reads `messages` (through [`crate::readmodel`]) and `intake` (through [`crate::intake`]),
//! writes `message_gate` (through [`crate::gate`]); publishes `herald.status`.

use herald_core::codec::Codec;
use herald_core::db::SharedDb;
use herald_core::transport::Transport;
use herald_core::util::{event_id, now_ms};
use herald_core::worker::record;
use herald_schemas::{Channel, EventHeader, MessageCanceled, Reason, topics};

use crate::gate::{self, Cancel};

/// What a cancel names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Message,
    Request,
}

/// Why nothing was canceled.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No such message or request of the app.
    #[error("no {what} {id}")]
    NotFound { what: &'static str, id: String },
    /// Everything it names is already sent or final.
    #[error("nothing left to cancel: already sent or final")]
    TooLate,
    #[error("{0}")]
    Database(#[from] herald_core::db::PoolFailure),
    /// The event could not be encoded (the schema registry is away).
    #[error("{0}")]
    Registry(String),
    /// The event could not be published; the gate holds, so the message still never goes out
    /// and a cancel tried again publishes the same event.
    #[error("{0}")]
    Transport(String),
}

impl From<tokio_postgres::Error> for CancelError {
    fn from(e: tokio_postgres::Error) -> Self {
        CancelError::Database(e.into())
    }
}

/// What a cancel needs: the database, and how events are encoded and published.
pub struct Ports<'a> {
    pub db: &'a SharedDb,
    pub codec: &'a Codec,
    pub transport: &'a dyn Transport,
    /// The stage named in the events (`api`, `console`).
    pub stage: &'a str,
}

/// Whether a message in `status` has nothing left to cancel: a terminal status, or `sent` (the
/// provider has it).
fn settled(status: &str) -> bool {
    status == "sent" || crate::status::TERMINAL.contains(&status)
}

struct Target {
    message_id: String,
    request_id: String,
    channel: String,
    status: String,
}

/// Cancels a message or every message of a request of `app`: (canceled, too late). `why` is
/// the reason the events carry (who canceled).
pub async fn cancel(
    p: &Ports<'_>,
    key: Key,
    id: &str,
    app: &str,
    why: &str,
) -> Result<(usize, usize), CancelError> {
    let what = match key {
        Key::Message => "message",
        Key::Request => "request",
    };
    let (request_id, message_id) = match key {
        Key::Message => (None, Some(id)),
        Key::Request => (Some(id), None),
    };
    let db = p.db.get().await?;
    let mut targets: Vec<Target> =
        crate::readmodel::of_request_or_message(&**db, app, request_id, message_id)
            .await?
            .into_iter()
            .map(|m| Target {
                message_id: m.message_id,
                request_id: m.request_id,
                channel: m.channel,
                status: m.status,
            })
            .collect();
    if targets.is_empty() {
        // Accepted by the gateway, not projected yet: cancelable at once.
        let accepted = match key {
            Key::Message => crate::intake::message(&db, app, id)
                .await?
                .into_iter()
                .collect(),
            Key::Request => crate::intake::request(&db, app, id).await?,
        };
        targets = accepted
            .into_iter()
            .map(|a| Target {
                message_id: a.message_id,
                request_id: a.request_id,
                channel: a.channel,
                status: "accepted".into(),
            })
            .collect();
    }
    if targets.is_empty() {
        return Err(CancelError::NotFound {
            what,
            id: id.to_owned(),
        });
    }
    let open: Vec<&Target> = targets.iter().filter(|t| !settled(&t.status)).collect();
    let ids: Vec<String> = open.iter().map(|t| t.message_id.clone()).collect();
    let results = gate::cancel(&db, &ids).await?;
    drop(db);
    let now = now_ms();
    let mut recs = Vec::new();
    for (t, r) in open.iter().zip(&results) {
        if *r != Cancel::Canceled {
            continue;
        }
        let Some(channel) = Channel::ALL.into_iter().find(|c| c.as_str() == t.channel) else {
            continue;
        };
        let trace = herald_core::trace::new_root();
        let ev = MessageCanceled {
            header: EventHeader {
                event_id: event_id(&t.message_id, "canceled", 0),
                event_time: now,
                stage: p.stage.into(),
                trace_id: herald_core::trace::trace_id_of(&trace),
                message_id: t.message_id.clone(),
                request_id: t.request_id.clone(),
                app_id: app.to_owned(),
                channel,
                attempt: 0,
                metadata: Default::default(),
            },
            reason: Some(Reason::new("canceled", why)),
        };
        let rec = record(p.codec, topics::STATUS, &t.message_id, &trace, &ev)
            .await
            .map_err(|e| CancelError::Registry(e.to_string()))?;
        recs.push(rec);
    }
    let canceled = recs.len();
    if !recs.is_empty() {
        let publisher = p
            .transport
            .publisher()
            .map_err(|e| CancelError::Transport(e.to_string()))?;
        publisher
            .publish(recs)
            .await
            .map_err(|e| CancelError::Transport(e.to_string()))?;
    }
    if canceled == 0 {
        return Err(CancelError::TooLate);
    }
    Ok((canceled, targets.len() - canceled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sent_and_terminal_messages_have_nothing_to_cancel() {
        for s in ["sent", "delivered", "failed", "unknown", "canceled"] {
            assert!(settled(s), "{s}");
        }
        for s in [
            "accepted",
            "scheduled",
            "rendered",
            "routed",
            "retry_scheduled",
        ] {
            assert!(!settled(s), "{s}");
        }
    }
}
