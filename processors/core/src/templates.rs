//! Versioned templates in PostgreSQL: the one store every stage and every process reads.
//! Templates from the config file are seeded at start (a version already stored is kept);
//! `PUT /v1/templates/{code}` adds the next version. Render workers (and accept, and the gateway,
//! which check that a template exists) reload when the store changes, checking at most once a
//! second, so every worker renders with the same versions.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::config::TemplateConfig;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS templates (
    code text NOT NULL,
    version int NOT NULL,
    body text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (code, version)
)";

fn to_json(t: &TemplateConfig) -> String {
    serde_json::to_string(t).unwrap_or_default()
}

/// Stores the config file's templates (versions already stored are left alone).
pub async fn seed(db: &Client, templates: &[TemplateConfig]) -> Result<(), tokio_postgres::Error> {
    for t in templates {
        db.execute(
            "INSERT INTO templates (code, version, body) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&t.code, &t.version, &to_json(t)],
        )
        .await?;
    }
    Ok(())
}

/// Every stored version of every template.
pub async fn load_all(db: &Client) -> Result<Vec<TemplateConfig>, tokio_postgres::Error> {
    let rows = db
        .query("SELECT body FROM templates ORDER BY code, version", &[])
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| serde_json::from_str(r.get::<_, &str>(0)).ok())
        .collect())
}

/// The latest (or a given) version of one template.
pub async fn get(
    db: &Client,
    code: &str,
    version: Option<i32>,
) -> Result<Option<TemplateConfig>, tokio_postgres::Error> {
    let row = db
        .query_opt(
            "SELECT body FROM templates WHERE code = $1 AND ($2::int IS NULL OR version = $2)
             ORDER BY version DESC LIMIT 1",
            &[&code, &version],
        )
        .await?;
    Ok(row.and_then(|r| serde_json::from_str(r.get::<_, &str>(0)).ok()))
}

/// Stores `t` as the next version of its code; answers it with its version set.
pub async fn put(
    db: &mut Client,
    mut t: TemplateConfig,
) -> Result<TemplateConfig, tokio_postgres::Error> {
    let tx = db.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 11))",
        &[&t.code],
    )
    .await?;
    let next: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) + 1 FROM templates WHERE code = $1",
            &[&t.code],
        )
        .await?
        .get(0);
    t.version = next;
    tx.execute(
        "INSERT INTO templates (code, version, body) VALUES ($1, $2, $3)",
        &[&t.code, &t.version, &to_json(&t)],
    )
    .await?;
    tx.commit().await?;
    Ok(t)
}

/// A change marker of the store: (row count, newest row time).
async fn stamp(db: &Client) -> Result<(i64, Option<f64>), tokio_postgres::Error> {
    let r = db
        .query_one(
            "SELECT count(*), extract(epoch from max(created_at))::float8 FROM templates",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

/// A process's view of the store, refreshed at most once a second.
pub struct Watch {
    db: Client,
    stamp: Option<(i64, Option<f64>)>,
    checked: Option<Instant>,
}

impl Watch {
    pub fn new(db: Client) -> Watch {
        Watch {
            db,
            stamp: None,
            checked: None,
        }
    }

    /// The templates when they changed since the last call (always on the first call).
    pub async fn changed(&mut self) -> Result<Option<Vec<TemplateConfig>>, tokio_postgres::Error> {
        if self
            .checked
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return Ok(None);
        }
        self.checked = Some(Instant::now());
        let now = stamp(&self.db).await?;
        if self.stamp == Some(now) {
            return Ok(None);
        }
        let all = load_all(&self.db).await?;
        self.stamp = Some(now);
        Ok(Some(all))
    }
}
