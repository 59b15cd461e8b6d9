//! What every process entry point does: load config, connect, create topics and register schemas,
//! serve `/metrics` and `/health` on the admin port, run until SIGTERM, exit non-zero on failure.

use std::time::Duration;

use axum::routing::get;
use futures::future::BoxFuture;
use herald_schemas::{Channel, Priority, SendRequested, topics};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::runtime::{Deps, all_topics};
use crate::telemetry;
use crate::worker::StageError;

/// Creates missing topics and registers the schemas (idempotent).
pub async fn setup(deps: &Deps) -> Result<(), String> {
    deps.transport
        .ensure_topics(&all_topics(deps.config.kafka.partitions))
        .await
        .map_err(|e| format!("creating topics: {e}"))?;
    // Registering at start-up (CONTRACT.md §1) also surfaces a broken registry early.
    let probe = SendRequested {
        request_id: String::new(),
        app_id: String::new(),
        idempotency_key: None,
        channel: Channel::Email,
        template: None,
        params: Default::default(),
        recipients: vec![],
        content: None,
        send_at: None,
        priority: Priority::Normal,
        expires_at: None,
        metadata: Default::default(),
        requested_at: 0,
    };
    deps.codec
        .encode(topics::REQUESTS, &probe)
        .await
        .map_err(|e| format!("registering schemas: {e}"))?;
    Ok(())
}

/// [`setup`], waiting while the registry or the transport is away (a registry restarting, or
/// answering 500 while its own database restarts): a stage started then waits instead of
/// exiting (see [`crate::runtime::starting`]).
pub async fn setup_when_ready(deps: &Deps) -> Result<(), StageError> {
    crate::runtime::starting("registry and topics", || async {
        setup(deps).await.map_err(StageError::Transient)
    })
    .await
}

/// Serves `/metrics` (Prometheus text), `/health/live` (the process answers) and `/health` =
/// `/health/ready` (each dependency: transport, registry, PostgreSQL) until `shutdown`.
pub async fn serve_admin(deps: Deps, shutdown: CancellationToken) -> Result<(), StageError> {
    let handle = telemetry::metrics_handle();
    let listen = deps.config.admin.listen.clone();
    // Connected lazily: the admin port answers (DOWN) while PostgreSQL is unreachable.
    let pg = std::sync::Arc::new(tokio::sync::OnceCell::<crate::db::SharedDb>::new());
    let http = reqwest::Client::new();
    let ready = move || {
        let (deps, pg, http) = (deps.clone(), pg.clone(), http.clone());
        async move {
            match pg
                .get_or_try_init(|| crate::db::SharedDb::connect(&deps.config.postgres.url))
                .await
            {
                Ok(db) => {
                    let (ok, body) = crate::health::check(&deps, db, &http).await;
                    crate::health::answer(ok, body)
                }
                Err(e) => crate::health::answer(
                    false,
                    serde_json::json!({"status": "DOWN", "services": {"postgres": {"status": "DOWN", "error": e.to_string()}}}),
                ),
            }
        }
    };
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let h = handle.clone();
                async move { h.render() }
            }),
        )
        .route("/health", get(ready.clone()))
        .route("/health/ready", get(ready))
        .route("/health/live", get(crate::health::live));
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| StageError::Fatal(format!("admin listen {listen}: {e}")))?;
    info!(%listen, "admin (/metrics, /health) listening");
    // The same bounds as every listener (header and body time, connections); scrapes and
    // probes are few.
    let limits = crate::serve::Limits {
        max_connections: 64,
        ..Default::default()
    };
    crate::serve::serve(listener, app, limits, shutdown)
        .await
        .map_err(|e| StageError::Fatal(format!("admin: {e}")))
}

/// A stage's run function.
pub type StageFn = fn(Deps, CancellationToken) -> BoxFuture<'static, Result<(), StageError>>;

/// The `main` of a single-stage binary: `herald-<stage> [--config FILE]` (or `HERALD_CONFIG`).
/// `kinds` is the providers crate's registry (the config's provider kinds are checked at load).
pub fn stage_main(
    stage: &'static str,
    kinds: &'static dyn crate::config::ProviderKinds,
    run: StageFn,
) -> std::process::ExitCode {
    crate::memory::limit_arenas();
    telemetry::init_tracing();
    let mut args = std::env::args().skip(1);
    let mut path = std::env::var("HERALD_CONFIG").ok();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "-c" => path = args.next(),
            _ => {
                eprintln!("usage: herald-{stage} [--config FILE]");
                return std::process::ExitCode::from(2);
            }
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herald-{stage}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = runtime.block_on(async {
        let config = Config::load(path.as_deref().map(std::path::Path::new), kinds)
            .map_err(|e| e.to_string())?;
        telemetry::metrics_handle();
        let _exporting = crate::trace::install(&config.tracing)?;
        let deps = Deps::new(config).map_err(|e| e.to_string())?;
        let shutdown = crate::shutdown::on_signals();
        setup_when_ready(&deps).await.map_err(|e| e.to_string())?;
        crate::memory::spawn_trimmer(Duration::from_secs(2), shutdown.clone());
        let admin = tokio::spawn(serve_admin(deps.clone(), shutdown.clone()));
        let outcome = run(deps, shutdown.clone()).await;
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), admin).await;
        outcome.map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald-{stage}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
