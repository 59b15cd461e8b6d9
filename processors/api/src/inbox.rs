//! In-app inbox (CONTRACT.md §2 `GET /v1/inbox/{user}` + live stream): the rows the send stage's
//! `inapp` provider stores, read and marked read per app and user, and pushed live over
//! Server-Sent Events. One `LISTEN herald_inbox` connection per API process fans notifications
//! out to the connected streams; each stream re-reads its user's rows newer than the last one it
//! sent, so a missed notification only delays, never loses, a message.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use herald_domain::inbox::{self, CHANNEL as INBOX_CHANNEL, Item};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_postgres::Client;

use crate::{ApiError, ApiState, App, Signed, db_err};

/// Inbox notifications (`<app>/<user>`) for this process's streams.
pub type Notifications = broadcast::Sender<String>;

/// Listens for inbox notifications on a dedicated connection, reconnecting when it drops.
pub fn listen(url: String) -> Notifications {
    let (tx, _) = broadcast::channel(1024);
    let out = tx.clone();
    tokio::spawn(async move {
        loop {
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((client, mut conn)) => {
                    // The connection is driven by its own task (which is where notifications
                    // arrive); the client is kept while it runs.
                    let forward = out.clone();
                    let driver = tokio::spawn(async move {
                        let mut messages =
                            futures::stream::poll_fn(move |cx| conn.poll_message(cx)).boxed();
                        while let Some(m) = messages.next().await {
                            match m {
                                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                    let _ = forward.send(n.payload().to_owned());
                                }
                                Ok(_) => {}
                                Err(_) => break,
                            }
                        }
                    });
                    let listen = format!("LISTEN {INBOX_CHANNEL}");
                    if client.batch_execute(&listen).await.is_ok() {
                        let _ = driver.await;
                    } else {
                        driver.abort();
                    }
                    drop(client);
                }
                Err(e) => tracing::warn!(error = %e, "inbox listener cannot connect"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    tx
}

#[derive(Debug, Deserialize)]
pub struct InboxQuery {
    #[serde(default)]
    pub cursor: Option<String>,
    #[serde(default)]
    pub limit: Option<i64>,
    #[serde(default)]
    pub unread: Option<bool>,
}

fn item_json(i: &Item) -> Value {
    json!({
        "message_id": i.message_id,
        "title": i.title,
        "body": i.body,
        "created_at": i.created_ms,
        "read": i.read_ms.is_some(),
        "read_at": i.read_ms,
    })
}

/// `GET /v1/inbox/{user}`: newest first, paginated by `cursor` (`<created_ms>:<message_id>`),
/// optionally `unread=true` only; with the unread count.
pub async fn list(
    State(state): State<Arc<ApiState>>,
    Path(user): Path<String>,
    Query(q): Query<InboxQuery>,
    App(app): App,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let (cur_ms, cur_id) = crate::parse_cursor(q.cursor.as_deref())?;
    let unread_only = q.unread.unwrap_or(false);
    let db = state.db().await.map_err(db_err)?;
    let rows = inbox::page(
        &**db,
        &app,
        &user,
        unread_only,
        (cur_ms, &cur_id),
        limit + 1,
    )
    .await
    .map_err(db_err)?;
    let more = rows.len() as i64 > limit;
    let page: Vec<Value> = rows.iter().take(limit as usize).map(item_json).collect();
    let next = more
        .then(|| {
            page.last().map(|m| {
                format!(
                    "{}:{}",
                    m["created_at"],
                    m["message_id"].as_str().unwrap_or_default()
                )
            })
        })
        .flatten();
    let unread = inbox::unread(&**db, &app, &user).await.map_err(db_err)?;
    Ok(
        Json(json!({"user": user, "unread": unread, "messages": page, "next_cursor": next}))
            .into_response(),
    )
}

/// `POST /v1/inbox/{user}/{message_id}/read`: idempotent.
pub async fn mark_read(
    State(state): State<Arc<ApiState>>,
    Path((user, id)): Path<(String, String)>,
    Signed { app, .. }: Signed,
) -> Result<Response, ApiError> {
    let db = state.db().await.map_err(db_err)?;
    if !inbox::mark_read(&**db, &app, &user, &id)
        .await
        .map_err(db_err)?
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "message_not_found",
            format!("no inbox message {id} for {user}"),
        ));
    }
    Ok(Json(json!({"message_id": id, "read": true})).into_response())
}

async fn newer(
    db: &Client,
    app: &str,
    user: &str,
    after: (i64, String),
) -> Result<Vec<Value>, tokio_postgres::Error> {
    let rows = inbox::newer(db, app, user, (after.0, &after.1), 500).await?;
    Ok(rows.iter().map(item_json).collect())
}

/// `GET /v1/inbox/{user}/stream`: Server-Sent Events, one `message` event per new inbox row
/// (from the moment of connecting, or after `Last-Event-ID` = `<ms>:<id>` when resuming).
pub async fn stream(
    State(state): State<Arc<ApiState>>,
    Path(user): Path<String>,
    headers: HeaderMap,
    App(app): App,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Live streams hold a connection and a task each: bounded per app.
    let max = state.deps.config.api.max_streams_per_app;
    let slot = state.streams.acquire(&app, max).ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
            format!("app {app} has {max} live streams open"),
        )
    })?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.split_once(':'))
        .and_then(|(ms, id)| Some((ms.parse::<i64>().ok()?, id.to_owned())));
    let start = resume.unwrap_or((herald_core::util::now_ms(), String::new()));
    let mut rx = state.inbox.subscribe();
    let key = format!("{app}/{user}");
    let state2 = state.clone();
    let s = async_stream(move |tx| async move {
        let _slot = slot;
        let mut last = start;
        loop {
            let rows = match state2.db().await {
                Ok(db) => newer(&db, &app, &user, last.clone())
                    .await
                    .map_err(herald_core::db::PoolFailure::from),
                Err(e) => Err(e),
            };
            match rows {
                Ok(rows) => {
                    for m in rows {
                        let id = format!(
                            "{}:{}",
                            m["created_at"],
                            m["message_id"].as_str().unwrap_or_default()
                        );
                        last = (
                            m["created_at"].as_i64().unwrap_or_default(),
                            m["message_id"].as_str().unwrap_or_default().to_owned(),
                        );
                        let ev = Event::default().event("message").id(id).data(m.to_string());
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "inbox stream read"),
            }
            // Wake on our user's notification; re-read every 15 s regardless.
            let wait = async {
                loop {
                    match rx.recv().await {
                        Ok(k) if k == key => return,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => {
                            futures::future::pending::<()>().await
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(15), wait).await;
            if tx.is_closed() {
                return;
            }
        }
    });
    Ok(Sse::new(s).keep_alive(KeepAlive::default()))
}

/// Live streams per app.
#[derive(Default)]
pub struct StreamSlots {
    open: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// One open stream; closing it (dropping) frees the slot.
pub struct StreamSlot {
    slots: Arc<StreamSlots>,
    app: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.app) {
            *n = n.saturating_sub(1);
        }
    }
}

impl StreamSlots {
    /// A slot for one more of `app`'s streams, unless it holds `max` already.
    pub fn acquire(self: &Arc<Self>, app: &str, max: usize) -> Option<StreamSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(app.to_owned()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            slots: self.clone(),
            app: app.to_owned(),
        })
    }
}

/// A stream fed by a task through a bounded channel (the task stops when the client goes).
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream_from(rx)
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Event, Infallible>>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
