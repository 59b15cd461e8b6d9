//! The operators' web console: server-rendered pages on their own listener (`[console]`,
//! loopback by default), for people, not apps — an app's HMAC secret never reaches a browser.
//!
//! - Login: operators and their roles come from the config, each password as an argon2 hash in
//!   an environment variable. A session is a random id in an `HttpOnly`, `SameSite=Strict`
//!   cookie; PostgreSQL keeps only its hash, with an expiry, and logout deletes it.
//! - Failed logins are throttled per name and per client address (429 with `Retry-After`,
//!   checked before the password), audited, and passwords are checked on the console's own
//!   thread, off the runtime's blocking pool the stages share.
//! - Every change (cancel, redrive, resolve, template publish, opt-out) needs a role that may
//!   make it, passes a CSRF check (the session's token in the form or the `X-CSRF-Token` header,
//!   and a same-origin `Origin` / `Sec-Fetch-Site`), and is written to the audit log.
//! - Pages call the same domain code as the API (cancel, templates, dead letters), across
//!   apps; what they show comes from the domain's reads
//!   ([`herald_domain::readmodel::operator`]). Assets (htmx, uPlot) are vendored from npm,
//!   pinned by hash (`assets/vendor/SHA256SUMS`) and compiled in.
//!
//! - Reads: the read model and the domain's tables, through `herald_domain`.
//! - Writes: `herald.requests` (test sends), `herald.status` (cancels), redriven dead letters'
//!   topics; templates, opt-outs, dead-letter resolutions and the audit log through the domain.
//! - Tables: owns `console_sessions`.
//! - Promise: no change without a role, a CSRF check and an audit entry; a preview renders only
//!   in the memory-limited render child.

mod auth;
pub mod forms;
mod pages;
mod throttle;
mod verify_pool;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use herald_core::runtime::Deps;
use herald_core::worker::StageError;
use minijinja::Environment;
use tokio_util::sync::CancellationToken;

pub use auth::hash_password;

pub const STAGE: &str = "console";

pub struct Console {
    deps: Deps,
    /// The console's own connections (reads, sessions, audit, cancel).
    pub db: herald_core::db::SharedDb,
    pub pages: Environment<'static>,
    /// Failed logins per name and per client, in memory.
    throttle: Mutex<throttle::LoginThrottle>,
    /// Where passwords are checked: the console's own threads.
    verifier: verify_pool::VerifyPool,
}

impl Console {
    pub fn new(
        deps: Deps,
        db: herald_core::db::SharedDb,
        pages: Environment<'static>,
    ) -> std::io::Result<Console> {
        Ok(Console {
            deps,
            db,
            pages,
            throttle: Mutex::new(throttle::LoginThrottle::default()),
            verifier: verify_pool::VerifyPool::new(
                "console-argon2",
                verify_pool::THREADS,
                verify_pool::QUEUED,
                verify_pool::WAIT,
            )?,
        })
    }

    pub fn deps(&self) -> &Deps {
        &self.deps
    }

    /// Held only for a few map operations, never across an await.
    fn throttle(&self) -> MutexGuard<'_, throttle::LoginThrottle> {
        self.throttle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The page templates, compiled in.
const TEMPLATES: [(&str, &str); 12] = [
    ("base.html", include_str!("../templates/base.html")),
    ("login.html", include_str!("../templates/login.html")),
    ("overview.html", include_str!("../templates/overview.html")),
    ("messages.html", include_str!("../templates/messages.html")),
    ("message.html", include_str!("../templates/message.html")),
    ("request.html", include_str!("../templates/request.html")),
    (
        "providers.html",
        include_str!("../templates/providers.html"),
    ),
    (
        "dead_letters.html",
        include_str!("../templates/dead_letters.html"),
    ),
    (
        "dead_letter.html",
        include_str!("../templates/dead_letter.html"),
    ),
    (
        "templates.html",
        include_str!("../templates/templates.html"),
    ),
    ("template.html", include_str!("../templates/template.html")),
    ("misc.html", include_str!("../templates/misc.html")),
];

/// The static assets: (name served under `/assets/`, content type, bytes).
pub const ASSETS: [(&str, &str, &[u8]); 4] = [
    (
        "htmx-2.0.11.min.js",
        "text/javascript",
        include_bytes!("../assets/vendor/htmx-2.0.11.min.js"),
    ),
    (
        "uPlot-1.6.32.iife.min.js",
        "text/javascript",
        include_bytes!("../assets/vendor/uPlot-1.6.32.iife.min.js"),
    ),
    (
        "uPlot-1.6.32.min.css",
        "text/css",
        include_bytes!("../assets/vendor/uPlot-1.6.32.min.css"),
    ),
    (
        "console.js",
        "text/javascript",
        include_bytes!("../assets/console.js"),
    ),
];

/// The minijinja environment of the pages (auto-escaping HTML).
pub fn environment() -> Result<Environment<'static>, String> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.add_filter("ts", pages::format_ms);
    for (name, text) in TEMPLATES {
        env.add_template(name, text)
            .map_err(|e| format!("console template {name}: {e}"))?;
    }
    Ok(env)
}

async fn asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, ty, bytes)) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static(ty)),
                // Versioned names: cached for good.
                (
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=86400"),
                ),
            ],
            *bytes,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Security headers on every page: no framing, no sniffing, scripts only from here.
async fn harden(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
             img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/", get(pages::overview))
        .route("/overview/data", get(pages::overview_data))
        .route("/messages", get(pages::messages))
        .route("/messages/{id}", get(pages::message))
        .route("/messages/{id}/cancel", post(pages::cancel_message))
        .route("/requests/{id}", get(pages::request))
        .route("/requests/{id}/cancel", post(pages::cancel_request))
        .route("/providers", get(pages::providers))
        .route("/dead-letters", get(pages::dead_letters))
        .route("/dead-letters/{id}", get(pages::dead_letter))
        .route("/dead-letters/{id}/redrive", post(pages::redrive))
        .route("/dead-letters/{id}/resolve", post(pages::resolve))
        .route("/templates", get(pages::templates))
        .route(
            "/templates/{code}",
            get(pages::template).post(pages::publish),
        )
        .route("/templates/{code}/preview", post(pages::preview))
        .route("/templates/{code}/test-send", post(pages::test_send))
        .route("/apps", get(pages::apps))
        .route(
            "/opt-outs",
            get(pages::opt_outs).post(pages::opt_out_change),
        )
        .route("/audit", get(pages::audit))
        .route("/assets/{name}", get(asset))
        .route("/health", get(|| async { "ok" }))
        .layer(axum::middleware::from_fn(harden))
        .with_state(console)
}

/// The console stage: serves until `shutdown`. Without operators configured it stays off.
pub async fn run(deps: Deps, shutdown: CancellationToken) -> Result<(), StageError> {
    let operators = &deps.config.console.operators;
    for o in operators.iter().filter(|o| o.password_hash.is_empty()) {
        tracing::warn!(operator = %o.name, variable = %o.password_hash_env,
            "console operator without a password hash: cannot log in");
    }
    if operators.iter().all(|o| o.password_hash.is_empty()) {
        tracing::info!("console off: no operator with a password hash configured");
        shutdown.cancelled().await;
        return Ok(());
    }
    let pages = environment().map_err(StageError::Fatal)?;
    let listen = deps.config.console.listen.clone();
    // The console may start before any other stage: the schema is brought up to date first.
    drop(herald_domain::schema::migrated(&deps).await?);
    let db = deps.shared_db().await?;
    let console = Arc::new(
        Console::new(deps, db, pages)
            .map_err(|e| StageError::Fatal(format!("console verification threads: {e}")))?,
    );
    auth::spawn_session_purge(console.clone(), shutdown.clone());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| StageError::Fatal(format!("console listen {listen}: {e}")))?;
    tracing::info!(%listen, "console listening");
    let limits = console.deps().config.api.limits();
    herald_core::serve::serve(listener, router(console), limits, shutdown)
        .await
        .map_err(|e| StageError::Fatal(format!("console: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    /// The vendored files are exactly the pinned npm releases (SHA256SUMS, written when they
    /// were fetched with `npm pack`).
    #[test]
    fn vendored_assets_match_their_pinned_hashes() {
        let sums = include_str!("../assets/vendor/SHA256SUMS");
        let mut checked = 0;
        for line in sums.lines() {
            let (hash, name) = line.split_once("  ").expect("sha256sum format");
            let (_, _, bytes) = ASSETS
                .iter()
                .find(|(n, _, _)| *n == name)
                .unwrap_or_else(|| panic!("{name} is not served"));
            assert_eq!(hex::encode(sha2::Sha256::digest(bytes)), hash, "{name}");
            checked += 1;
        }
        assert_eq!(checked, 3);
    }

    #[test]
    fn every_page_template_compiles() {
        let env = environment().unwrap();
        for (name, _) in TEMPLATES {
            env.get_template(name).unwrap();
        }
    }
}
