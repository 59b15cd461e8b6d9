//! Herald's PostgreSQL schema as versioned migrations (`processors/domain/migrations/V*.sql`,
//! embedded at build time, run by refinery), applied by `herald setup` and by every stage at
//! start. One process migrates at a time (a session advisory lock): stages starting together in
//! one or several processes never race. A change to a table is a new `V<n>__<what>.sql`; files
//! already released are never edited (refinery refuses a database whose applied migrations
//! differ from the embedded ones).

use herald_core::runtime::{Deps, pg_error};
use herald_core::worker::StageError;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The advisory lock key migrations hold.
const LOCK: i64 = 7_262_646;

/// Brings the database to the newest schema. Returns the versions it applied (none when it was
/// up to date).
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<Vec<i32>, String> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK])
        .await
        .map_err(pg_error)?;
    let report = embedded::migrations::runner()
        .run_async(client)
        .await
        .map_err(|e| format!("migration: {e}"));
    // A failed unlock leaves the lock to the session's end (the connection is dropped soon).
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK])
        .await;
    Ok(report?
        .applied_migrations()
        .iter()
        .map(|m| m.version())
        .collect())
}

/// Brings the database to schema version `version` only (tests of a migration start from the
/// version before it).
pub async fn migrate_to(
    client: &mut tokio_postgres::Client,
    version: i32,
) -> Result<Vec<i32>, String> {
    let report = embedded::migrations::runner()
        .set_target(refinery::Target::Version(version))
        .run_async(client)
        .await
        .map_err(|e| format!("migration: {e}"))?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.version())
        .collect())
}

/// The newest schema version this build knows.
pub fn latest() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}

/// A stage's database connection, after bringing the schema up to date. PostgreSQL going away
/// meanwhile is waited out like at connect ([`herald_core::runtime::starting`]); a migration
/// PostgreSQL refuses (or applied migrations that differ from this build's) is fatal.
pub async fn migrated(deps: &Deps) -> Result<herald_core::db::Db, StageError> {
    herald_core::runtime::starting("postgres schema", || async {
        let mut db = deps.stage_db().await?;
        match migrate(&mut db).await {
            Ok(_) => Ok(db),
            Err(e) if db.is_closed() => Err(StageError::Transient(format!("schema: {e}"))),
            Err(e) => Err(StageError::Fatal(format!("schema: {e}"))),
        }
    })
    .await
}
