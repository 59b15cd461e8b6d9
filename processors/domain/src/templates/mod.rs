//! Versioned templates in PostgreSQL: the one store every stage and every process reads.
//! Templates from the config file are seeded at start (a version already stored is kept);
//! `PUT /v1/templates/{code}` adds the next version. Render workers (and accept, and the gateway,
//! which check that a template exists) reload when the store changes, checking at most once a
//! second, so every worker renders with the same versions.

pub mod compile;

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use herald_core::config::TemplateConfig;

fn to_json(t: &TemplateConfig) -> String {
    serde_json::to_string(t).unwrap_or_default()
}

fn owner(t: &TemplateConfig) -> &str {
    t.app.as_deref().unwrap_or("")
}

/// Stores the config file's templates (versions already stored are left alone).
/// A stage's connection for its template watch, with the configured templates stored (waiting
/// for PostgreSQL at start like [`crate::schema::migrated`]).
pub async fn seeded(
    deps: &herald_core::runtime::Deps,
) -> Result<herald_core::db::Db, herald_core::worker::StageError> {
    herald_core::runtime::starting("postgres templates", || async {
        let db = crate::schema::migrated(deps).await?;
        seed(&db, &deps.config.templates)
            .await
            .map_err(|e| herald_core::worker::StageError::postgres("templates", e))?;
        Ok(db)
    })
    .await
}

pub async fn seed(db: &Client, templates: &[TemplateConfig]) -> Result<(), tokio_postgres::Error> {
    for t in templates {
        db.execute(
            "INSERT INTO templates (app_id, code, version, body) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            &[&owner(t), &t.code, &t.version, &to_json(t)],
        )
        .await?;
    }
    Ok(())
}

/// Every stored version of every template, of every app.
pub async fn load_all(db: &Client) -> Result<Vec<TemplateConfig>, tokio_postgres::Error> {
    let rows = db
        .query(
            "SELECT app_id, body FROM templates ORDER BY app_id, code, version",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let mut t: TemplateConfig = serde_json::from_str(r.get::<_, &str>(1)).ok()?;
            let app: String = r.get(0);
            t.app = (!app.is_empty()).then_some(app);
            Some(t)
        })
        .collect())
}

/// The latest (or a given) version of template `code` as `app` sees it: its own, else the
/// shared one.
pub async fn get(
    db: &Client,
    app: &str,
    code: &str,
    version: Option<i32>,
) -> Result<Option<TemplateConfig>, tokio_postgres::Error> {
    let row = db
        .query_opt(
            "SELECT app_id, body FROM templates
             WHERE code = $1 AND app_id IN ($2, '') AND ($3::int IS NULL OR version = $3)
             ORDER BY app_id = $2 DESC, version DESC LIMIT 1",
            &[&code, &app, &version],
        )
        .await?;
    Ok(row.and_then(|r| {
        let mut t: TemplateConfig = serde_json::from_str(r.get::<_, &str>(1)).ok()?;
        let owner: String = r.get(0);
        t.app = (!owner.is_empty()).then_some(owner);
        Some(t)
    }))
}

/// Stores `t` as `app`'s next version of its code (numbered after the shared versions too, so
/// the app's view only ever moves forward); answers it with its version set.
pub async fn put(
    db: &mut Client,
    app: &str,
    mut t: TemplateConfig,
) -> Result<TemplateConfig, tokio_postgres::Error> {
    t.app = Some(app.to_owned());
    let tx = db.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 11))",
        &[&app, &t.code],
    )
    .await?;
    let next: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) + 1 FROM templates WHERE code = $1 AND app_id IN ($2, '')",
            &[&t.code, &app],
        )
        .await?
        .get(0);
    t.version = next;
    tx.execute(
        "INSERT INTO templates (app_id, code, version, body) VALUES ($1, $2, $3, $4)",
        &[&app, &t.code, &t.version, &to_json(&t)],
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
    db: herald_core::db::Db,
    stamp: Option<(i64, Option<f64>)>,
    checked: Option<Instant>,
}

impl Watch {
    /// Whether the template store answers now.
    pub async fn reachable(&self) -> bool {
        self.db.simple_query("SELECT 1").await.is_ok()
    }

    pub fn new(db: herald_core::db::Db) -> Watch {
        Watch {
            db,
            stamp: None,
            checked: None,
        }
    }

    /// The templates when they changed since the last call (always on the first call).
    pub async fn changed(
        &mut self,
    ) -> Result<Option<Vec<TemplateConfig>>, herald_core::db::PoolFailure> {
        self.db.reconnect_if_closed().await?;
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
