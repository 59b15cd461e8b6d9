//! Health as operators and orchestrators need it: `/health/live` answers while the process
//! serves (liveness: restart me if this fails), `/health/ready` and `/health` check each
//! dependency truthfully — the transport (Kafka or Redis), the schema registry and PostgreSQL —
//! and answer 503 with the one that is down (readiness: send me no work now).

use std::time::Duration;

use serde_json::{Value, json};

use crate::db::SharedDb;
use crate::runtime::Deps;

/// Each dependency's state: (all up, `{status, services: {name: {status, error?}}}`).
pub async fn check(deps: &Deps, pg: &SharedDb, http: &reqwest::Client) -> (bool, Value) {
    let limit = Duration::from_secs(3);
    let transport = tokio::time::timeout(limit, deps.transport.ping())
        .await
        .map_err(|_| "timed out".to_owned())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let registry = tokio::time::timeout(
        limit,
        http.get(format!(
            "{}/subjects",
            deps.config.registry.url.trim_end_matches('/')
        ))
        .send(),
    )
    .await
    .map_err(|_| "timed out".to_owned())
    .and_then(|r| r.map_err(|e| e.without_url().to_string()))
    .and_then(|r| {
        if r.status().is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", r.status()))
        }
    });
    let postgres = tokio::time::timeout(limit, async {
        let db = pg.get().await?;
        db.simple_query("SELECT 1").await?;
        Ok::<_, crate::db::PoolFailure>(())
    })
    .await
    .map_err(|_| "timed out".to_owned())
    .and_then(|r| r.map_err(|e| e.to_string()));
    let one = |r: &Result<(), String>| match r {
        Ok(()) => json!({"status": "UP"}),
        Err(e) => json!({"status": "DOWN", "error": e}),
    };
    let all = transport.is_ok() && registry.is_ok() && postgres.is_ok();
    let body = json!({
        "status": if all { "UP" } else { "DOWN" },
        "services": {
            deps.transport.kind(): one(&transport),
            "registry": one(&registry),
            "postgres": one(&postgres),
        }
    });
    (all, body)
}

/// An axum answer for [`check`]'s result.
pub fn answer(ok: bool, body: Value) -> axum::response::Response {
    use axum::response::IntoResponse;
    let code = if ok {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

/// `/health/live`: the process answers.
pub async fn live() -> axum::response::Response {
    answer(true, json!({"status": "UP"}))
}
