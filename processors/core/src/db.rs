//! A PostgreSQL connection that comes back: a stage holds a [`Db`] and calls [`Db::ensure`] at
//! the start of each batch, so after a PostgreSQL restart the next batch reconnects (the failed
//! one is retried by the worker with back-off) — the stage pauses while PostgreSQL is down and
//! resumes by itself. Every connection carries the statement timeout
//! ([`crate::runtime::STATEMENT_TIMEOUT_MS`]) and the session settings its owner asked for.

use std::ops::{Deref, DerefMut};

use tokio_postgres::Client;

use crate::runtime::connect_postgres;
use crate::worker::StageError;

pub struct Db {
    url: String,
    client: Client,
    /// Run after every (re)connect, e.g. `SET synchronous_commit = off`.
    session: Option<String>,
}

impl Db {
    pub async fn connect(url: &str) -> Result<Db, tokio_postgres::Error> {
        Ok(Db {
            url: url.to_owned(),
            client: connect_postgres(url).await?,
            session: None,
        })
    }

    /// Applies `sql` to this session now and after every reconnect.
    pub async fn with_session(mut self, sql: &str) -> Result<Db, tokio_postgres::Error> {
        self.client.batch_execute(sql).await?;
        self.session = Some(sql.to_owned());
        Ok(self)
    }

    /// Reconnects when the connection was lost; true when it did (state derived from the old
    /// session may be stale). A failure is transient: the batch is retried.
    pub async fn ensure(&mut self) -> Result<bool, StageError> {
        self.reconnect_if_closed()
            .await
            .map_err(|e| StageError::postgres("reconnect", e))
    }

    /// [`Db::ensure`] with the driver's error.
    pub async fn reconnect_if_closed(&mut self) -> Result<bool, tokio_postgres::Error> {
        if !self.client.is_closed() {
            return Ok(false);
        }
        let client = connect_postgres(&self.url).await?;
        if let Some(sql) = &self.session {
            client.batch_execute(sql).await?;
        }
        self.client = client;
        tracing::info!("postgres connection re-established");
        Ok(true)
    }
}

impl Deref for Db {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for Db {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// A connection shared by concurrent handlers (the API): [`SharedDb::get`] hands out the live
/// client, reconnecting first when the connection was lost.
pub struct SharedDb {
    url: String,
    current: tokio::sync::RwLock<std::sync::Arc<Client>>,
}

impl SharedDb {
    pub async fn connect(url: &str) -> Result<SharedDb, tokio_postgres::Error> {
        Ok(SharedDb {
            url: url.to_owned(),
            current: tokio::sync::RwLock::new(std::sync::Arc::new(connect_postgres(url).await?)),
        })
    }

    /// From a connection already made (and migrated).
    pub fn from_db(db: Db) -> SharedDb {
        SharedDb {
            url: db.url,
            current: tokio::sync::RwLock::new(std::sync::Arc::new(db.client)),
        }
    }

    pub async fn get(&self) -> Result<std::sync::Arc<Client>, tokio_postgres::Error> {
        let c = self.current.read().await.clone();
        if !c.is_closed() {
            return Ok(c);
        }
        let mut w = self.current.write().await;
        if w.is_closed() {
            *w = std::sync::Arc::new(connect_postgres(&self.url).await?);
            tracing::info!("postgres connection re-established");
        }
        Ok(w.clone())
    }
}
