//! Operators: login, sessions, roles, CSRF.
//!
//! A login is throttled before its password is checked (per name and per client, see
//! [`crate::throttle`]): a locked one gets 429 with `Retry-After`. The check itself runs on the
//! console's own verification pool ([`crate::verify_pool`]). Every failed and every throttled
//! attempt is in the audit log with the name tried and the client's address (throttled ones
//! once per lock), never the password.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::{ConnectInfo, Form, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use base64::Engine;
use herald_core::config::CONSOLE_ROLES;
use herald_core::telemetry::names;
use serde::Deserialize;
use sha2::Digest;

use crate::Console;
use crate::throttle::{self, Locks, Throttled};

const COOKIE: &str = "herald_console";

/// An argon2id hash (PHC string) of `password`, for an operator's `password_hash_env`.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn digest(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Equal without a timing difference that depends on where they differ.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// A refused request: its status and why.
#[derive(Debug)]
pub struct Refusal(pub StatusCode, pub String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Html(format!("<p>{}</p>", html_escape(&self.1)))).into_response()
    }
}

/// The logged-in operator of a request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Operator {
    pub name: String,
    pub role: String,
    pub csrf: String,
}

impl Operator {
    fn rank(&self) -> usize {
        CONSOLE_ROLES
            .iter()
            .position(|r| *r == self.role)
            .unwrap_or(0)
    }

    /// 403 unless the operator's role is `role` or above.
    pub fn must_be(&self, role: &str) -> Result<(), Refusal> {
        let needed = CONSOLE_ROLES.iter().position(|r| *r == role).unwrap_or(2);
        if self.rank() >= needed {
            Ok(())
        } else {
            Err(Refusal(
                StatusCode::FORBIDDEN,
                format!(
                    "Forbidden: this needs the {role} role; {} is {}.",
                    self.name, self.role
                ),
            ))
        }
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// A request without a live session: pages go to the login form, changes get 401.
pub struct LoggedOut(bool);

impl IntoResponse for LoggedOut {
    fn into_response(self) -> Response {
        if self.0 {
            Redirect::to("/login").into_response()
        } else {
            (StatusCode::UNAUTHORIZED, "log in first").into_response()
        }
    }
}

impl FromRequestParts<Arc<Console>> for Operator {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Arc<Console>,
    ) -> Result<Self, Self::Rejection> {
        let page = parts.method == axum::http::Method::GET;
        let Some(id) = cookie_value(&parts.headers) else {
            return Err(LoggedOut(page).into_response());
        };
        let db = console
            .db
            .get()
            .await
            .map_err(|e| unavailable(&e.to_string()))?;
        let row = db
            .query_opt(
                "SELECT operator, role, csrf FROM console_sessions \
                 WHERE id_hash = $1 AND expires_at > now()",
                &[&digest(&id)],
            )
            .await
            .map_err(|e| unavailable(&e.to_string()))?;
        let Some(row) = row else {
            return Err(LoggedOut(page).into_response());
        };
        let op = Operator {
            name: row.get(0),
            role: row.get(1),
            csrf: row.get(2),
        };
        // An operator removed from the config, or given another role, is logged out.
        let configured = console
            .deps()
            .config
            .console
            .operators
            .iter()
            .any(|o| o.name == op.name && o.role == op.role);
        if !configured {
            return Err(LoggedOut(page).into_response());
        }
        if !page && parts.method != axum::http::Method::HEAD {
            same_origin(&parts.headers).map_err(IntoResponse::into_response)?;
            let sent = parts
                .headers
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            // Forms carry the token as a field instead; pages::Change checks it.
            if let Some(sent) = sent
                && !same(&sent, &op.csrf)
            {
                return Err((StatusCode::FORBIDDEN, "CSRF token mismatch").into_response());
            }
        }
        Ok(op)
    }
}

pub fn unavailable(e: &str) -> Response {
    tracing::warn!(error = %e, "console: database");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "PostgreSQL is unavailable; try again shortly",
    )
        .into_response()
}

/// Refuses a cross-site change: a browser says where a request comes from in `Origin` and
/// `Sec-Fetch-Site`.
fn same_origin(headers: &HeaderMap) -> Result<(), Refusal> {
    let refuse = || Refusal(StatusCode::FORBIDDEN, "cross-site request refused".into());
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return Err(refuse());
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let bare = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if bare != Some(host) {
            return Err(refuse());
        }
    }
    Ok(())
}

/// A form's CSRF field against the session's token.
pub fn check_csrf(op: &Operator, token: &str) -> Result<(), Refusal> {
    if same(token, &op.csrf) {
        Ok(())
    } else {
        Err(Refusal(StatusCode::FORBIDDEN, "CSRF token mismatch".into()))
    }
}

#[derive(Deserialize)]
pub struct LoginQuery {
    #[serde(default)]
    failed: bool,
}

pub async fn login_page(
    State(console): State<Arc<Console>>,
    Query(q): Query<LoginQuery>,
) -> Response {
    login_form(&console, q.failed, None, false)
}

/// The login form, saying why the last attempt did not get in.
fn login_form(console: &Console, failed: bool, wait: Option<String>, busy: bool) -> Response {
    crate::pages::render(
        console,
        "login.html",
        minijinja::context! { failed => failed, wait => wait, busy => busy },
    )
}

#[derive(Deserialize)]
pub struct LoginForm {
    pub(crate) name: String,
    pub(crate) password: String,
}

/// The address a request came from (`herald_core::serve` records it for every connection).
pub struct Client(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // Without it (a router served elsewhere) every client shares one counter: stricter,
        // never looser.
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
        Ok(Client(ip))
    }
}

/// An attempt counted as in flight by the throttle; one that ends without a verdict (the
/// verifier was busy, the client went away mid-check) is taken back when this is dropped.
struct InFlight<'a> {
    console: &'a Console,
    name: &'a str,
    client: IpAddr,
    open: bool,
}

impl InFlight<'_> {
    fn failed(mut self) -> Locks {
        self.open = false;
        self.console
            .throttle()
            .failed(self.name, self.client, Instant::now())
    }

    fn succeeded(mut self) {
        self.open = false;
        self.console
            .throttle()
            .succeeded(self.name, self.client, Instant::now());
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.open {
            self.console
                .throttle()
                .abandoned(self.name, self.client, Instant::now());
        }
    }
}

/// Whether `password` is the one `hash` (a PHC string) was made from. Without a hash (an unknown
/// name, an operator without one) it is checked against a hash of nothing, so that the answer
/// takes as long, and is no. Runs on the verification pool, never on the runtime.
fn verify(hash: Option<&str>, password: &str) -> bool {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let decoy = DECOY.get_or_init(|| hash_password(&random_token()).unwrap_or_default());
    let ok = PasswordHash::new(hash.unwrap_or(decoy)).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    });
    ok && hash.is_some()
}

fn logins(outcome: &'static str) {
    metrics::counter!(names::CONSOLE_LOGINS, "outcome" => outcome).increment(1);
}

/// A login attempt's audit row (never the password). The login answers either way: an audit
/// log that is down must not let more guesses through, nor lock operators out.
async fn audit_attempt(console: &Console, name: &str, action: &str, detail: serde_json::Value) {
    let written = match console.db.get().await {
        Ok(db) => herald_domain::dead_letters::audit(&**db, name, action, name, &detail)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = written {
        tracing::warn!(error = %e, action, "console audit not written");
    }
}

/// "45 seconds", "3 minutes".
fn wait_text(secs: u64) -> String {
    match secs {
        1 => "a second".into(),
        s if s < 90 => format!("{s} seconds"),
        s => format!("{} minutes", s.div_ceil(60)),
    }
}

/// 429 with `Retry-After` and the form saying how long to wait. Audited once per lock: refusals
/// cost no argon2 run, so writing a row for each would hand a flood the database instead.
async fn throttled(console: &Console, name: &str, client: IpAddr, t: Throttled) -> Response {
    logins("throttled");
    let secs = t.lock.retry_after_secs;
    if t.lock.first {
        tracing::warn!(%name, %client, by = t.by.as_str(), retry_after_secs = secs,
            "console login throttled");
        audit_attempt(
            console,
            name,
            "login.throttled",
            serde_json::json!({"client": client.to_string(), "by": t.by.as_str(),
                               "retry_after_secs": secs}),
        )
        .await;
    }
    let mut resp = login_form(console, false, Some(wait_text(secs)), false);
    *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

pub async fn login(
    State(console): State<Arc<Console>>,
    Client(client): Client,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if let Err(r) = same_origin(&headers) {
        return r.into_response();
    }
    // Names are counted, logged and audited by their first NAME_CHARS chars.
    let name = throttle::name_key(&f.name);
    // Throttled before any argon2 run: a locked name or client costs nothing to refuse.
    let begun = console.throttle().begin(&name, client, Instant::now());
    if let Err(t) = begun {
        return throttled(&console, &name, client, t).await;
    }
    let attempt = InFlight {
        console: &console,
        name: &name,
        client,
        open: true,
    };
    let cfg = &console.deps().config.console;
    let operator = cfg.operators.iter().find(|o| o.name == f.name);
    let hash = operator
        .map(|o| o.password_hash.clone())
        .filter(|h| !h.is_empty());
    let password = f.password;
    let Ok(ok) = console
        .verifier
        .run(move || verify(hash.as_deref(), &password))
        .await
    else {
        drop(attempt);
        logins("busy");
        tracing::warn!(%client, "console login: verification pool busy");
        let mut resp = login_form(&console, false, None, true);
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
        return resp;
    };
    let Some(op) = operator.filter(|_| ok) else {
        let locks = attempt.failed();
        logins("failed");
        tracing::warn!(%name, %client, locked_name = locks.name.is_some(),
            locked_client = locks.client.is_some(), "console login refused");
        audit_attempt(
            &console,
            &name,
            "login.failed",
            serde_json::json!({"client": client.to_string(), "known_operator": operator.is_some(),
                               "locked_name_secs": locks.name.map(|d| d.as_secs()),
                               "locked_client_secs": locks.client.map(|d| d.as_secs())}),
        )
        .await;
        return Redirect::to("/login?failed=true").into_response();
    };
    attempt.succeeded();
    logins("ok");
    let id = random_token();
    let db = match console.db.get().await {
        Ok(db) => db,
        Err(e) => return unavailable(&e.to_string()),
    };
    let hours = cfg.session_hours as f64;
    let created = db
        .execute(
            "INSERT INTO console_sessions (id_hash, operator, role, csrf, expires_at) \
             VALUES ($1, $2, $3, $4, now() + make_interval(hours => $5::float8::int))",
            &[&digest(&id), &op.name, &op.role, &random_token(), &hours],
        )
        .await;
    if let Err(e) = created {
        return unavailable(&e.to_string());
    }
    let _ = herald_domain::dead_letters::audit(
        &**db,
        &op.name,
        "login",
        &op.name,
        &serde_json::json!({"client": client.to_string()}),
    )
    .await;
    let mut cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        cfg.session_hours * 3600
    );
    if cfg.secure_cookie {
        cookie.push_str("; Secure");
    }
    let mut resp = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Deserialize)]
pub struct CsrfForm {
    csrf: String,
}

pub async fn logout(
    State(console): State<Arc<Console>>,
    op: Operator,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(r) = check_csrf(&op, &f.csrf) {
        return r.into_response();
    }
    if let (Some(id), Ok(db)) = (cookie_value(&headers), console.db.get().await) {
        let _ = db
            .execute(
                "DELETE FROM console_sessions WHERE id_hash = $1",
                &[&digest(&id)],
            )
            .await;
        let _ = herald_domain::dead_letters::audit(
            &**db,
            &op.name,
            "logout",
            &op.name,
            &serde_json::json!({}),
        )
        .await;
    }
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("herald_console=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    resp
}

/// Expired sessions are deleted every ten minutes, and forgotten login counters dropped.
pub fn spawn_session_purge(console: Arc<Console>, stop: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(600)) => {}
            }
            console.throttle().purge(Instant::now());
            if let Ok(db) = console.db.get().await {
                let _ = db
                    .execute("DELETE FROM console_sessions WHERE expires_at < now()", &[])
                    .await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hashed_password_verifies_and_another_does_not() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        let parsed = PasswordHash::new(&h).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        assert!(
            Argon2::default()
                .verify_password(b"battery staple", &parsed)
                .is_err()
        );
    }

    #[test]
    fn cross_site_changes_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8090"));
        assert!(same_origin(&h).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8090"),
        );
        assert!(same_origin(&h).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(same_origin(&h).is_err());
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(same_origin(&h).is_err());
        assert!(same("a", "a") && !same("a", "b"));
    }
}
