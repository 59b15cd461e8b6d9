//! In-app inbox: the message becomes a row in PostgreSQL's `inbox` table (read through
//! `GET /v1/inbox/{user}`), and a `NOTIFY herald_inbox` wakes connected live streams. Storing the
//! row is the delivery; inserting is idempotent on the message id.
//!
//! Config: no endpoint or credentials; the recipient address is the app's user id.

use futures::future::BoxFuture;
use herald_core::config::ProviderConfig;
use herald_schemas::{DeliveryOutcome, MessageRouted, Reason};
use tokio::sync::OnceCell;

use crate::{CallResult, Context, Kind, Provider, ProviderError};

pub const KIND: Kind = Kind {
    name: "inapp",
    channel: herald_schemas::Channel::Inapp,
    check: |p| Inapp::new(p).map(drop),
    build: |p, cx: &Context| Ok(Box::new(Inapp::new(p)?.with_postgres(cx.postgres_url))),
    receipts: None,
    accepts: crate::any_address,
};

pub struct Inapp {
    url: String,
    /// Reconnects after a PostgreSQL restart.
    db: OnceCell<herald_core::db::SharedDb>,
}

impl Inapp {
    pub fn new(p: &ProviderConfig) -> Result<Self, ProviderError> {
        Ok(Inapp {
            url: p.settings.get("postgres_url").cloned().unwrap_or_default(),
            db: OnceCell::new(),
        })
    }

    /// Set by the send stage: the inbox lives in Herald's own database.
    pub fn with_postgres(mut self, url: &str) -> Self {
        if self.url.is_empty() {
            self.url = url.to_owned();
        }
        self
    }

    /// The inbox table is the send stage's schema (migrated at its start).
    async fn db(&self) -> Result<herald_core::db::Pooled, String> {
        let shared = self
            .db
            .get_or_try_init(|| async {
                herald_core::db::SharedDb::connect(&self.url)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await?;
        shared.get().await.map_err(|e| e.to_string())
    }
}

impl Provider for Inapp {
    fn send<'a>(&'a self, m: &'a MessageRouted, _attempt: i32) -> BoxFuture<'a, CallResult> {
        Box::pin(async move {
            let db = match self.db().await {
                Ok(db) => db,
                Err(e) => {
                    return CallResult::fail(
                        DeliveryOutcome::FailedTransient,
                        None,
                        Reason::new("inbox_unavailable", e),
                    );
                }
            };
            let body = crate::http::plain_text(m);
            let r = herald_domain::inbox::store(
                &**db,
                &m.header.message_id,
                &m.header.app_id,
                &m.recipient.address,
                m.content.subject.as_deref(),
                &body,
            )
            .await;
            match r {
                Ok(_) => CallResult::ok("stored", Some(m.header.message_id.clone())),
                Err(e) => CallResult::fail(
                    DeliveryOutcome::FailedTransient,
                    None,
                    Reason::new("inbox_unavailable", herald_core::runtime::pg_error(e)),
                ),
            }
        })
    }
}
