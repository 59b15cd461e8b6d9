//! PostgreSQL connections that come back, from a pool (deadpool-postgres). A stage worker holds
//! a [`Db`] (one pooled connection) and calls [`Db::ensure`] at the start of each batch, so after
//! a PostgreSQL restart the next batch takes a fresh connection (the failed one is retried by the
//! worker with back-off) — the stage pauses while PostgreSQL is down and resumes by itself.
//! Concurrent handlers (the API; the in-app sender) each hold a [`SharedDb`]: a handler takes a
//! connection from it for as long as it needs one; broken connections are never handed out
//! again. Every
//! connection carries the statement timeout ([`crate::runtime::STATEMENT_TIMEOUT_MS`]) and
//! the session settings its owner asked for.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::Client;

use crate::worker::StageError;

/// A connection taken from a [`SharedDb`]; derefs to the client.
pub type Pooled = Object;

/// Connections a [`SharedDb`] keeps at most (the API's concurrent queries).
pub const SHARED_POOL_SIZE: usize = 16;

/// Longest wait for a connection: creating one (PostgreSQL away) or a free one (all busy).
const WAIT: Duration = Duration::from_secs(10);

/// A pool whose connections carry the statement timeout and a connect timeout.
fn pool(url: &str, size: usize) -> Result<Pool, tokio_postgres::Error> {
    let cfg = crate::runtime::postgres_config(url)?;
    let manager = Manager::from_config(
        cfg,
        tokio_postgres::NoTls,
        ManagerConfig {
            // A closed connection is never handed out; a live one is not re-checked by a query.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(WAIT))
        .create_timeout(Some(WAIT))
        .build()
        .expect("a pool with a runtime and no hooks always builds"))
}

/// The pool's error: the driver's when PostgreSQL answered, else the pool's own.
fn pool_error(e: deadpool_postgres::PoolError) -> PoolFailure {
    match e {
        deadpool_postgres::PoolError::Backend(e) => PoolFailure::Postgres(e),
        other => PoolFailure::Pool(other.to_string()),
    }
}

/// A PostgreSQL failure: the server or driver said no, or the pool gave up waiting. Displays
/// the server's message.
#[derive(Debug, thiserror::Error)]
pub enum PoolFailure {
    #[error("{}", crate::runtime::pg_error_ref(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres pool: {0}")]
    Pool(String),
}

pub struct Db {
    pool: Pool,
    client: Object,
    /// Run after every (re)connect, e.g. `SET synchronous_commit = off`.
    session: Option<String>,
}

impl Db {
    pub async fn connect(url: &str) -> Result<Db, PoolFailure> {
        // Room for the replacement while a broken connection is still held.
        let pool = pool(url, 2).map_err(PoolFailure::Postgres)?;
        let client = pool.get().await.map_err(pool_error)?;
        Ok(Db {
            pool,
            client,
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
            .map_err(|e| StageError::Transient(format!("postgres reconnect: {e}")))
    }

    /// [`Db::ensure`] with the pool's error.
    pub async fn reconnect_if_closed(&mut self) -> Result<bool, PoolFailure> {
        if !self.client.is_closed() {
            return Ok(false);
        }
        // The broken connection leaves the pool for good once replaced.
        let client = loop {
            match self.pool.get().await {
                Ok(c) if c.is_closed() => drop(Object::take(c)),
                Ok(c) => break c,
                Err(e) => return Err(pool_error(e)),
            }
        };
        if let Some(sql) = &self.session {
            client
                .batch_execute(sql)
                .await
                .map_err(PoolFailure::Postgres)?;
        }
        let old = std::mem::replace(&mut self.client, client);
        drop(Object::take(old));
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

/// A pool shared by concurrent handlers (the API): [`SharedDb::get`] hands out a live
/// connection for the handler's queries. Clones share the pool.
#[derive(Clone)]
pub struct SharedDb {
    pool: Pool,
}

impl SharedDb {
    pub async fn connect(url: &str) -> Result<SharedDb, PoolFailure> {
        let shared = SharedDb {
            pool: pool(url, SHARED_POOL_SIZE).map_err(PoolFailure::Postgres)?,
        };
        // Fail early (a wrong URL) rather than at the first request.
        drop(shared.get().await?);
        Ok(shared)
    }

    pub async fn get(&self) -> Result<Pooled, PoolFailure> {
        loop {
            let c = self.pool.get().await.map_err(pool_error)?;
            if !c.is_closed() {
                return Ok(c);
            }
            drop(Object::take(c));
        }
    }
}
