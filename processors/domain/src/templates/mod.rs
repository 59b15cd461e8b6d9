//! Versioned templates in PostgreSQL: the one store every stage and every process reads.
//! Templates from the config file are seeded at start (a version already stored is kept);
//! `PUT /v1/templates/{code}` adds the next version. Render workers (and accept, and the gateway,
//! which check that a template exists) reload when the store changes, checking at most once a
//! second, so every worker renders with the same versions.
//!
//! The store is bounded ([`herald_core::config::TemplateStoreConfig`]): a template's size, the
//! versions kept per code (older ones are deleted as new ones are stored), the codes per app.
//! Watchers hold only what renders — the newest version of each (app, code) — and read only
//! the rows added since they last looked (plus a full reload every few minutes).

pub mod compile;
pub mod sandbox;

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use herald_core::config::{TemplateConfig, TemplateStoreConfig};

fn to_json(t: &TemplateConfig) -> String {
    serde_json::to_string(t).unwrap_or_default()
}

fn owner(t: &TemplateConfig) -> &str {
    t.app.as_deref().unwrap_or("")
}

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

/// Stores the config file's templates (versions already stored are left alone).
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

/// A stored template from a row of (app_id, body); the shared owner "" is no app.
fn from_row(r: &tokio_postgres::Row) -> Option<TemplateConfig> {
    let mut t: TemplateConfig = serde_json::from_str(r.get::<_, &str>(1)).ok()?;
    let app: String = r.get(0);
    t.app = (!app.is_empty()).then_some(app);
    Some(t)
}

/// Every text a template carries (subject, bodies, provider template and parameters): what the
/// store measures and what may hold no NUL.
pub fn texts(t: &TemplateConfig) -> impl Iterator<Item = &String> {
    [
        &t.subject,
        &t.text,
        &t.html,
        &t.markdown,
        &t.provider_template,
    ]
    .into_iter()
    .flatten()
    .chain(t.provider_params.iter().flat_map(|(k, v)| [k, v]))
    .chain(t.provider_templates.iter().flat_map(|(k, v)| [k, v]))
}

/// Every stored version of every template, of every app.
pub async fn load_all(db: &Client) -> Result<Vec<TemplateConfig>, tokio_postgres::Error> {
    let rows = db
        .query(
            "SELECT app_id, body FROM templates ORDER BY app_id, code, version",
            &[],
        )
        .await?;
    Ok(rows.iter().filter_map(from_row).collect())
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
    Ok(row.as_ref().and_then(from_row))
}

/// Why a template was not stored.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    #[error("the template is {size} bytes, over the store's limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("app {app} already has {max} template codes, the store's limit")]
    TooManyCodes { app: String, max: usize },
    #[error("{}", herald_core::runtime::pg_error_ref(.0))]
    Db(#[from] tokio_postgres::Error),
}

/// A template's size as the store bounds it: its subject, texts and provider fields.
pub fn size(t: &TemplateConfig) -> usize {
    texts(t).map(String::len).sum()
}

/// Why a submitted template (`PUT /v1/templates/{code}`, the console's publish) is refused
/// before the store is asked.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refusal {
    #[error("template codes are [A-Za-z0-9_.-]{{1,128}}")]
    Code,
    #[error("a template cannot contain a NUL character")]
    Nul,
    #[error("no content")]
    Empty,
    #[error("the template is {size} bytes, over the store's limit of {max}")]
    TooLarge { size: usize, max: usize },
    /// It would not compile in the render stage's compiler.
    #[error("{0}")]
    Invalid(String),
}

impl Refusal {
    /// The error code the API answers it with.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Code => "invalid_code",
            Refusal::Nul => "invalid_character",
            Refusal::Empty => "empty_template",
            Refusal::TooLarge { .. } => "template_too_large",
            Refusal::Invalid(_) => "invalid_template",
        }
    }
}

/// Whether `code` is a template code: `[A-Za-z0-9_.-]{1,128}`.
pub fn valid_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= 128
        && code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

/// The one check of a submitted template, for every way one is submitted: its code, no NUL in
/// any text, some content, within the store's size, and compiling in the render stage's
/// compiler (a template that would not render is refused now, not after a 202).
pub fn checked(t: TemplateConfig, bounds: &TemplateStoreConfig) -> Result<TemplateConfig, Refusal> {
    if !valid_code(&t.code) {
        return Err(Refusal::Code);
    }
    if texts(&t).any(|v| v.contains('\0')) {
        return Err(Refusal::Nul);
    }
    if !t.has_content() {
        return Err(Refusal::Empty);
    }
    if let Err(PutError::TooLarge { size, max }) = check_size(&t, bounds) {
        return Err(Refusal::TooLarge { size, max });
    }
    compile::Templates::compile(std::slice::from_ref(&t)).map_err(Refusal::Invalid)?;
    Ok(t)
}

/// Refuses a template over the store's size limit.
pub fn check_size(t: &TemplateConfig, bounds: &TemplateStoreConfig) -> Result<(), PutError> {
    let size = size(t);
    if size > bounds.max_bytes {
        return Err(PutError::TooLarge {
            size,
            max: bounds.max_bytes,
        });
    }
    Ok(())
}

/// Stores `t` as `app`'s next version of its code (numbered after the shared versions too, so
/// the app's view only ever moves forward); answers it with its version set. Within the store's
/// bounds: its size, the app's number of codes; versions of the code older than the newest
/// `versions_kept` are deleted.
pub async fn put(
    db: &mut Client,
    app: &str,
    mut t: TemplateConfig,
    bounds: &TemplateStoreConfig,
) -> Result<TemplateConfig, PutError> {
    check_size(&t, bounds)?;
    t.app = Some(app.to_owned());
    let tx = db.transaction().await?;
    // One writer per app at a time: the code count below cannot be raced past.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1::text, 11))",
        &[&app],
    )
    .await?;
    let known: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM templates WHERE app_id = $1 AND code = $2)",
            &[&app, &t.code],
        )
        .await?
        .get(0);
    if !known {
        let codes: i64 = tx
            .query_one(
                "SELECT count(DISTINCT code) FROM templates WHERE app_id = $1",
                &[&app],
            )
            .await?
            .get(0);
        if codes as usize >= bounds.codes_per_app {
            return Err(PutError::TooManyCodes {
                app: app.to_owned(),
                max: bounds.codes_per_app,
            });
        }
    }
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
    let keep = i32::try_from(bounds.versions_kept).unwrap_or(i32::MAX);
    tx.execute(
        "DELETE FROM templates WHERE app_id = $1 AND code = $2 AND version <= $3::int - $4::int",
        &[&app, &t.code, &t.version, &keep],
    )
    .await?;
    tx.commit().await?;
    Ok(t)
}

/// The newest version of each (app, code) stored since `since` (Unix seconds; all with `None`),
/// with a few seconds of overlap: a transaction that committed after a later one started is not
/// missed.
async fn latest_since(
    db: &Client,
    since: Option<f64>,
) -> Result<Vec<TemplateConfig>, tokio_postgres::Error> {
    let rows = db
        .query(
            "SELECT DISTINCT ON (app_id, code) app_id, body FROM templates
             WHERE $1::float8 IS NULL OR created_at > to_timestamp($1::float8) - interval '10 seconds'
             ORDER BY app_id, code, version DESC",
            &[&since],
        )
        .await?;
    Ok(rows.iter().filter_map(from_row).collect())
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

/// How often a watcher reads the whole store again (what renders of it), whatever changed.
const FULL_RELOAD: Duration = Duration::from_secs(600);

/// A process's view of the store, refreshed at most once a second: the newest version of each
/// (app, code), read incrementally.
pub struct Watch {
    db: herald_core::db::Db,
    stamp: Option<(i64, Option<f64>)>,
    checked: Option<Instant>,
    /// (app, code) → its newest version.
    latest: std::collections::HashMap<(String, String), TemplateConfig>,
    /// The newest row time read so far, and when the whole store was last read.
    seen: Option<f64>,
    full_at: Option<Instant>,
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
            latest: Default::default(),
            seen: None,
            full_at: None,
        }
    }

    /// The templates (the newest version of each) when they changed since the last call
    /// (always on the first call).
    pub async fn changed(
        &mut self,
    ) -> Result<Option<Vec<TemplateConfig>>, herald_core::db::PoolFailure> {
        if self.db.reconnect_if_closed().await? {
            self.full_at = None;
        }
        if self
            .checked
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return Ok(None);
        }
        self.checked = Some(Instant::now());
        let now = stamp(&self.db).await?;
        let full = self.full_at.is_none_or(|t| t.elapsed() >= FULL_RELOAD);
        if self.stamp == Some(now) && !full {
            return Ok(None);
        }
        let rows = latest_since(&self.db, if full { None } else { self.seen }).await?;
        let mut changed = full && self.stamp.is_none();
        if full {
            let fresh: std::collections::HashMap<_, _> = rows
                .into_iter()
                .map(|t| ((owner(&t).to_owned(), t.code.clone()), t))
                .collect();
            changed |= fresh.len() != self.latest.len()
                || fresh
                    .iter()
                    .any(|(k, t)| self.latest.get(k).is_none_or(|o| o.version != t.version));
            self.latest = fresh;
            self.full_at = Some(Instant::now());
        } else {
            for t in rows {
                let key = (owner(&t).to_owned(), t.code.clone());
                if self.latest.get(&key).is_none_or(|o| o.version < t.version) {
                    self.latest.insert(key, t);
                    changed = true;
                }
            }
        }
        self.stamp = Some(now);
        self.seen = now.1;
        if !changed {
            return Ok(None);
        }
        let mut all: Vec<TemplateConfig> = self.latest.values().cloned().collect();
        all.sort_by(|a, b| (owner(a), &a.code).cmp(&(owner(b), &b.code)));
        Ok(Some(all))
    }
}
