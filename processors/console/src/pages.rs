//! The pages.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use herald_core::config::TemplateConfig;
use herald_domain::cancel::Key;
use herald_schemas::Channel;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Console;
use crate::auth::{Operator, Refusal, check_csrf, unavailable};
use crate::forms::{self, Edit, OptOutChange, TestSend};
use herald_domain::readmodel::operator as reads;

/// Renders a page; an error in a template is a 500 with the reason in the log.
pub fn render(console: &Console, name: &str, ctx: minijinja::Value) -> Response {
    match console.pages.get_template(name).and_then(|t| t.render(ctx)) {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(page = name, error = %e, "console page");
            (StatusCode::INTERNAL_SERVER_ERROR, "page error").into_response()
        }
    }
}

/// `{{ x | ts }}`: Unix ms as UTC time.
pub fn format_ms(v: minijinja::Value) -> String {
    let Some(ms) = i64::try_from(v).ok() else {
        return String::new();
    };
    herald_core::util::format_ms(ms)
}

fn page(console: &Console, name: &str, op: &Operator, section: &str, data: Value) -> Response {
    render(
        console,
        name,
        minijinja::context! {
            op => minijinja::Value::from_serialize(op),
            section => section,
            data => minijinja::Value::from_serialize(&data),
        },
    )
}

macro_rules! db {
    ($console:expr) => {
        match $console.db.get().await {
            Ok(db) => db,
            Err(e) => return unavailable(&e.to_string()),
        }
    };
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return unavailable(&e.to_string()),
        }
    };
}

/// A change: the form's CSRF token, and the role it needs.
fn allowed(op: &Operator, csrf: &str, role: &str) -> Result<(), Refusal> {
    check_csrf(op, csrf)?;
    op.must_be(role)
}

/// Back to a template's page with a message.
fn template_page(code: &str, app: &str, msg: &str) -> Response {
    flash_to(
        &format!("/templates/{}?app={}", url_encode(code), url_encode(app)),
        msg,
    )
}

fn flash_to(path: &str, msg: &str) -> Response {
    let q: String = url_encode(msg);
    let sep = if path.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{path}{sep}flash={q}")).into_response()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Deserialize, Default)]
pub struct Window {
    #[serde(default)]
    minutes: Option<i32>,
}

fn minutes(w: &Window) -> i32 {
    w.minutes.unwrap_or(60).clamp(5, 24 * 60)
}

pub async fn overview(
    State(console): State<Arc<Console>>,
    op: Operator,
    Query(w): Query<Window>,
) -> Response {
    let db = db!(console);
    let data = tri!(reads::overview(&**db, minutes(&w)).await);
    page(&console, "overview.html", &op, "overview", data)
}

/// The overview's numbers as JSON (the page refreshes from it every few seconds).
pub async fn overview_data(
    State(console): State<Arc<Console>>,
    _op: Operator,
    Query(w): Query<Window>,
) -> Response {
    let db = db!(console);
    Json(tri!(reads::overview(&**db, minutes(&w)).await)).into_response()
}

#[derive(Deserialize, Default)]
pub struct Search {
    #[serde(default)]
    q: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    channel: String,
    #[serde(default)]
    flash: Option<String>,
}

fn some(s: &str) -> Option<&str> {
    Some(s.trim()).filter(|s| !s.is_empty())
}

pub async fn messages(
    State(console): State<Arc<Console>>,
    op: Operator,
    Query(s): Query<Search>,
) -> Response {
    let db = db!(console);
    let secret = &console.deps().config.security.secret;
    let rows =
        tri!(reads::search(&**db, secret, &s.q, some(&s.status), some(&s.channel), 200).await);
    let statuses: Vec<&str> = herald_domain::status::Status::ALL
        .iter()
        .map(|s| s.as_str())
        .collect();
    let channels: Vec<&str> = Channel::ALL.iter().map(|c| c.as_str()).collect();
    page(
        &console,
        "messages.html",
        &op,
        "messages",
        json!({"q": s.q, "status": s.status, "channel": s.channel, "rows": rows,
               "statuses": statuses, "channels": channels, "flash": s.flash}),
    )
}

#[derive(Deserialize, Default)]
pub struct Flash {
    #[serde(default)]
    flash: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

pub async fn message(
    State(console): State<Arc<Console>>,
    op: Operator,
    Path(id): Path<String>,
    Query(f): Query<Flash>,
) -> Response {
    let db = db!(console);
    let Some(mut m) = tri!(reads::message(&**db, &id).await) else {
        return (StatusCode::NOT_FOUND, Html("<p>No such message.</p>")).into_response();
    };
    m["flash"] = json!(f.flash);
    page(&console, "message.html", &op, "messages", m)
}

#[derive(Deserialize)]
pub struct Change {
    csrf: String,
}

async fn cancel(console: &Console, op: &Operator, key: Key, id: &str, app: &str) -> String {
    let why = format!("canceled in the console by {}", op.name);
    let (target, action) = match key {
        Key::Message => (format!("message {id}"), "message.cancel"),
        Key::Request => (format!("request {id}"), "request.cancel"),
    };
    let deps = console.deps();
    let ports = herald_domain::cancel::Ports {
        db: &console.db,
        codec: &deps.codec,
        transport: deps.transport.as_ref(),
        stage: crate::STAGE,
    };
    let result = herald_domain::cancel::cancel(&ports, key, id, app, &why).await;
    let (msg, detail) = match &result {
        Ok((canceled, too_late)) => (
            format!("{target}: {canceled} canceled, {too_late} too late"),
            json!({"canceled": canceled, "too_late": too_late}),
        ),
        Err(e) => {
            let code = match e {
                herald_domain::cancel::CancelError::NotFound { .. } => "not_found",
                herald_domain::cancel::CancelError::TooLate => "too_late",
                _ => "unavailable",
            };
            (
                format!("{target}: not canceled ({code}: {e})"),
                json!({"error": code}),
            )
        }
    };
    if let Ok(db) = console.db.get().await {
        let _ = herald_domain::dead_letters::audit(&**db, &op.name, action, id, &detail).await;
    }
    msg
}

async fn app_of(console: &Console, key: Key, id: &str) -> Option<String> {
    let db = console.db.get().await.ok()?;
    reads::owner(&**db, key, id).await.ok()?
}

pub async fn cancel_message(
    State(console): State<Arc<Console>>,
    op: Operator,
    Path(id): Path<String>,
    Form(f): Form<Change>,
) -> Response {
    if let Err(r) = allowed(&op, &f.csrf, "operator") {
        return r.into_response();
    }
    let Some(app) = app_of(&console, Key::Message, &id).await else {
        return (StatusCode::NOT_FOUND, "no such message").into_response();
    };
    let msg = cancel(&console, &op, Key::Message, &id, &app).await;
    flash_to(&format!("/messages/{}", url_encode(&id)), &msg)
}

pub async fn request(
    State(console): State<Arc<Console>>,
    op: Operator,
    Path(id): Path<String>,
    Query(f): Query<Flash>,
) -> Response {
    let db = db!(console);
    let mut data = tri!(reads::request(&**db, &id, f.status.as_deref().and_then(some)).await);
    data["flash"] = json!(f.flash);
    data["status"] = json!(f.status);
    page(&console, "request.html", &op, "messages", data)
}

pub async fn cancel_request(
    State(console): State<Arc<Console>>,
    op: Operator,
    Path(id): Path<String>,
    Form(f): Form<Change>,
) -> Response {
    if let Err(r) = allowed(&op, &f.csrf, "operator") {
        return r.into_response();
    }
    let Some(app) = app_of(&console, Key::Request, &id).await else {
        return (StatusCode::NOT_FOUND, "no such request").into_response();
    };
    let msg = cancel(&console, &op, Key::Request, &id, &app).await;
    flash_to(&format!("/requests/{}", url_encode(&id)), &msg)
}

/// The metrics this process has recorded, by name, as (labels, value) — for the providers page.
fn local_metrics(prefix: &str) -> Vec<(String, String, f64)> {
    let text = herald_core::telemetry::metrics_handle().render();
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            Some((
                name.to_owned(),
                labels.trim_end_matches('}').to_owned(),
                value.parse().ok()?,
            ))
        })
        .collect()
}

pub async fn providers(State(console): State<Arc<Console>>, op: Operator) -> Response {
    let db = db!(console);
    let health = tri!(reads::provider_health(&**db).await);
    let attempts = tri!(reads::provider_attempts(&**db).await);
    let cfg = &console.deps().config;
    let configured: Vec<Value> = cfg
        .providers
        .iter()
        .map(|p| {
            let state = health.iter().find(|h| h["provider"] == p.code.as_str());
            json!({
                "code": p.code, "kind": p.kind,
                "channel": p.channel.map(|c| c.as_str()),
                "priority": p.priority, "weight": p.weight,
                "rate_limit_per_sec": p.rate_limit_per_sec, "timeout_ms": p.timeout_ms,
                "secrets": p.credentials_env.values().collect::<Vec<_>>(),
                "health": state,
            })
        })
        .collect();
    let waits: Vec<Value> = local_metrics("herald_send_rate_limit_wait_seconds_sum")
        .into_iter()
        .map(|(_, labels, v)| json!({"labels": labels, "seconds": v}))
        .collect();
    let receipts: Vec<Value> = local_metrics(herald_core::telemetry::names::RECEIPTS)
        .into_iter()
        .map(|(_, labels, v)| json!({"labels": labels, "count": v}))
        .collect();
    page(
        &console,
        "providers.html",
        &op,
        "providers",
        json!({"providers": configured, "attempts": attempts, "waits": waits,
               "receipts": receipts}),
    )
}

pub async fn dead_letters(
    State(console): State<Arc<Console>>,
    op: Operator,
    Query(f): Query<herald_domain::dead_letters::Filter>,
) -> Response {
    let db = db!(console);
    let rows = tri!(herald_domain::dead_letters::list(&**db, &f, 200).await);
    page(
        &console,
        "dead_letters.html",
        &op,
        "dead-letters",
        json!({"rows": rows, "stage": f.stage, "reason": f.reason, "all": f.all}),
    )
}

pub async fn dead_letter(
    State(console): State<Arc<Console>>,
    op: Operator,
    Path(id): Path<String>,
    Query(f): Query<Flash>,
) -> Response {
    let db = db!(console);
    let Some(d) = tri!(herald_domain::dead_letters::get(&**db, &id).await) else {
        return (StatusCode::NOT_FOUND, Html("<p>No such dead letter.</p>")).into_response();
    };
    let decoded = match d.payload.as_deref() {
        Some(p) => match console.deps().codec.to_json(p).await {
            Ok((name, v)) => json!({"type": name,
                "json": serde_json::to_string_pretty(&v).unwrap_or_default()}),
            Err(e) => json!({"error": e.to_string()}),
        },
        None => json!({"error": "no payload"}),
    };
    let preview: String = d
        .payload
        .as_deref()
        .map(|p| String::from_utf8_lossy(&p[..p.len().min(2048)]).into_owned())
        .unwrap_or_default();
    page(
        &console,
        "dead_letter.html",
        &op,
        "dead-letters",
        json!({"d": d, "decoded": decoded, "raw": preview, "flash": f.flash}),
    )
}

pub async fn redrive(
    State(console): State<Arc<Console>>,
    op: Operator,
    Path(id): Path<String>,
    Form(f): Form<Change>,
) -> Response {
    if let Err(r) = allowed(&op, &f.csrf, "operator") {
        return r.into_response();
    }
    let db = db!(console);
    let publisher = tri!(console.deps().transport.publisher());
    let codec = &console.deps().codec;
    let msg = match herald_domain::dead_letters::redrive(&**db, &*publisher, codec, &id, &op.name)
        .await
    {
        Ok(d) => format!(
            "redriven to {} ({} times in all)",
            d.source_topic, d.redrives
        ),
        Err(e) => format!("not redriven: {e}"),
    };
    flash_to(&format!("/dead-letters/{}", url_encode(&id)), &msg)
}

pub async fn resolve(
    State(console): State<Arc<Console>>,
    op: Operator,
    Path(id): Path<String>,
    Form(f): Form<Change>,
) -> Response {
    if let Err(r) = allowed(&op, &f.csrf, "operator") {
        return r.into_response();
    }
    let db = db!(console);
    let msg = match herald_domain::dead_letters::resolve(&**db, &id, &op.name).await {
        Ok(()) => "resolved".to_owned(),
        Err(e) => format!("not resolved: {e}"),
    };
    flash_to(&format!("/dead-letters/{}", url_encode(&id)), &msg)
}

pub async fn templates(State(console): State<Arc<Console>>, op: Operator) -> Response {
    let db = db!(console);
    let all = tri!(herald_domain::templates::load_all(&db).await);
    let mut latest: BTreeMap<(String, String), &TemplateConfig> = BTreeMap::new();
    let mut versions: BTreeMap<(String, String), usize> = BTreeMap::new();
    for t in &all {
        let k = (t.code.clone(), t.app.clone().unwrap_or_default());
        *versions.entry(k.clone()).or_default() += 1;
        if latest.get(&k).is_none_or(|o| o.version < t.version) {
            latest.insert(k, t);
        }
    }
    let rows: Vec<Value> = latest
        .iter()
        .map(|((code, app), t)| {
            json!({"code": code, "app": app, "channel": t.channel.as_str(),
                   "version": t.version, "versions": versions[&(code.clone(), app.clone())]})
        })
        .collect();
    page(
        &console,
        "templates.html",
        &op,
        "templates",
        json!({"rows": rows}),
    )
}

#[derive(Deserialize, Default)]
pub struct TemplateQuery {
    #[serde(default)]
    app: String,
    #[serde(default)]
    version: Option<i32>,
    #[serde(default)]
    diff: Option<i32>,
    #[serde(default)]
    flash: Option<String>,
}

/// Line diff of two texts (`-` / `+` / ` ` per line), by longest common subsequence.
fn diff(a: &str, b: &str) -> Vec<(char, String)> {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let (n, m) = (a.len().min(2000), b.len().min(2000));
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out.push((' ', a[i].to_owned()));
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] > lcs[i + 1][j]) {
            out.push(('+', b[j].to_owned()));
            j += 1;
        } else {
            out.push(('-', a[i].to_owned()));
            i += 1;
        }
    }
    out
}

pub async fn template(
    State(console): State<Arc<Console>>,
    op: Operator,
    Path(code): Path<String>,
    Query(q): Query<TemplateQuery>,
) -> Response {
    let db = db!(console);
    let versions: Vec<Value> = tri!(reads::template_versions(&**db, &code).await)
        .into_iter()
        .filter(|v| v["app"] == q.app.as_str())
        .collect();
    let Some(current) = versions
        .iter()
        .find(|v| q.version.is_none_or(|n| v["version"] == n))
        .cloned()
    else {
        return (StatusCode::NOT_FOUND, Html("<p>No such template.</p>")).into_response();
    };
    let Ok(t) = serde_json::from_str::<TemplateConfig>(current["body"].as_str().unwrap_or("{}"))
    else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "stored template does not parse",
        )
            .into_response();
    };
    let differences = q.diff.and_then(|other| {
        let o = versions.iter().find(|v| v["version"] == other)?;
        let pretty = |s: &str| {
            serde_json::from_str::<Value>(s)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok())
                .unwrap_or_default()
        };
        Some(
            diff(
                &pretty(o["body"].as_str().unwrap_or("")),
                &pretty(current["body"].as_str().unwrap_or("")),
            )
            .into_iter()
            .map(|(k, l)| json!({"kind": k.to_string(), "line": l}))
            .collect::<Vec<_>>(),
        )
    });
    let sample: BTreeMap<String, String> = sample_params(&t);
    page(
        &console,
        "template.html",
        &op,
        "templates",
        json!({"code": code, "app": q.app, "t": t, "version": current["version"],
               "versions": versions.iter().map(|v| json!({"version": v["version"],
                   "created_ms": v["created_ms"]})).collect::<Vec<_>>(),
               "diff": differences, "diff_from": q.diff,
               "sample": serde_json::to_string_pretty(&sample).unwrap_or_default(),
               "flash": q.flash}),
    )
}

/// Sample parameters for a template: each `{{ name }}` it uses, with a placeholder value.
fn sample_params(t: &TemplateConfig) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for text in [&t.subject, &t.text, &t.html, &t.markdown]
        .into_iter()
        .flatten()
    {
        let mut rest = text.as_str();
        while let Some(at) = rest.find("{{") {
            rest = &rest[at + 2..];
            let name: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.entry(name.clone())
                    .or_insert_with(|| format!("<{name}>"));
            }
        }
    }
    out
}

/// The provider fields of `prev` (the version an edit replaces) on `t`, which the form has none of.
fn keep_provider_fields(t: &mut TemplateConfig, prev: TemplateConfig) {
    if t.channel != prev.channel {
        return;
    }
    t.provider_template = prev.provider_template;
    t.provider_params = prev.provider_params;
    t.provider_templates = prev.provider_templates;
}

/// Renders the edited template against the sample parameters through the render stage's
/// compiler and renderer (strict about missing parameters, HTML escaped): an HTML fragment.
pub async fn preview(
    State(_console): State<Arc<Console>>,
    op: Operator,
    Path(code): Path<String>,
    Form(e): Form<Edit>,
) -> Response {
    if let Err(r) = check_csrf(&op, &e.csrf) {
        return r.into_response();
    }
    let bounds = &_console.deps().config.template_store;
    let out = match preview_text(&code, &e, bounds).await {
        Ok(v) => v,
        Err(msg) => json!({"error": msg}),
    };
    let esc = |v: &Value| {
        v.as_str()
            .unwrap_or("")
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let html = if out.get("error").is_some() {
        format!(
            "<div class=\"error\" id=\"preview-error\">{}</div>",
            esc(&out["error"])
        )
    } else {
        format!(
            "<dl id=\"preview-result\"><dt>Subject</dt><dd id=\"preview-subject\">{}</dd>\
             <dt>Text</dt><dd><pre id=\"preview-text\">{}</pre></dd>\
             <dt>HTML (source)</dt><dd><pre id=\"preview-html\">{}</pre></dd></dl>",
            esc(&out["subject"]),
            esc(&out["text"]),
            esc(&out["html"])
        )
    };
    Html(html).into_response()
}

/// The console's render child. A preview renders what an app stored (`PUT /v1/templates`) or an
/// operator typed, so it runs where the render stage's renders run: in a memory-limited child
/// process (`herald_render::sandbox`), never in Herald's own — a template that builds a huge
/// string kills the child, which is started again, and the preview says so. One child per
/// process; previews take turns.
static PREVIEWS: tokio::sync::Mutex<Option<herald_domain::templates::sandbox::Sandbox>> =
    tokio::sync::Mutex::const_new(None);

/// Longest a preview waits for its turn at the render child before answering "busy".
const PREVIEW_TURN: std::time::Duration = std::time::Duration::from_secs(5);

async fn preview_text(
    code: &str,
    e: &Edit,
    bounds: &herald_core::config::TemplateStoreConfig,
) -> Result<Value, String> {
    use herald_domain::templates::sandbox::{Limits, Sandbox};
    let (t, m) = forms::preview_input(code, e, bounds)?;
    let mut child = tokio::time::timeout(PREVIEW_TURN, PREVIEWS.lock())
        .await
        .map_err(|_| "the preview renderer is busy with another preview; try again".to_owned())?;
    if child.is_none() {
        let program = Sandbox::current_exe().map_err(|e| e.to_string())?;
        *child = Some(
            Sandbox::start(program, Limits::default(), Vec::new())
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let Some(sandbox) = child.as_mut() else {
        return Err("no preview renderer".into());
    };
    sandbox.load(vec![t]).await.map_err(|e| e.to_string())?;
    let rendered = sandbox.render(&[&m]).await.map_err(|e| e.to_string())?;
    let (_, c) = rendered
        .into_iter()
        .next()
        .ok_or("the preview renderer answered nothing")?
        .map_err(|r| format!("{}: {}", r.code, r.message))?;
    Ok(json!({"subject": c.subject, "text": c.text, "html": c.html, "markdown": c.markdown}))
}

/// Publishes the edited template as the next version (admin), after the same checks as
/// `PUT /v1/templates/{code}`.
pub async fn publish(
    State(console): State<Arc<Console>>,
    op: Operator,
    Path(code): Path<String>,
    Form(e): Form<Edit>,
) -> Response {
    if let Err(r) = allowed(&op, &e.csrf, "admin") {
        return r.into_response();
    }
    let back = |msg: &str| template_page(&code, &e.app, msg);
    let bounds = &console.deps().config.template_store;
    let mut t = match forms::edited(&code, &e, bounds) {
        Ok(t) => t,
        Err(m) => return back(&format!("not published: {m}")),
    };
    let mut db = tri!(console.deps().postgres().await);
    // The form edits the texts; what the provider needs (an SMS or WeChat template id and its
    // parameters) is carried over from the version it replaces, or SMS sent with the new
    // version would fail with missing_provider_template.
    if let Some(prev) = tri!(herald_domain::templates::get(&db, &e.app, &code, None).await) {
        keep_provider_fields(&mut t, prev);
    }
    let stored = match herald_domain::templates::put(&mut db, &e.app, t, bounds).await {
        Ok(s) => s,
        Err(herald_domain::templates::PutError::Db(e)) => return unavailable(&e.to_string()),
        Err(m) => return back(&format!("not published: {m}")),
    };
    let _ = herald_domain::dead_letters::audit(
        &db,
        &op.name,
        "template.publish",
        &code,
        &json!({"app": e.app, "version": stored.version}),
    )
    .await;
    back(&format!("published version {}", stored.version))
}

/// Sends the template's latest version to one address as an app (operator): a real request
/// through the pipeline, marked in its metadata, validated as the gateway validates.
pub async fn test_send(
    State(console): State<Arc<Console>>,
    op: Operator,
    Path(code): Path<String>,
    Form(f): Form<TestSend>,
) -> Response {
    if let Err(r) = allowed(&op, &f.csrf, "operator") {
        return r.into_response();
    }
    let back = |msg: &str| template_page(&code, &f.app, msg);
    let cfg = &console.deps().config;
    // A shared template is sent as the first configured app.
    let Some(app) = cfg
        .apps
        .iter()
        .map(|a| a.id.as_str())
        .find(|a| f.app.is_empty() || *a == f.app)
    else {
        return back("not sent: no such app");
    };
    let db = db!(console);
    let Some(t) = tri!(herald_domain::templates::get(&db, app, &code, None).await) else {
        return back("not sent: no such template");
    };
    let limits = herald_domain::validate::Limits::from_config(&cfg.pipeline);
    let now = herald_core::util::now_ms();
    let req = match forms::test_request(&f, app, &code, t.channel, &op.name, &limits, now) {
        Ok(r) => r,
        Err(e) => return back(&format!("not sent: {e}")),
    };
    let trace = herald_core::trace::new_root();
    let rec = match herald_core::worker::record(
        &console.deps().codec,
        herald_schemas::topics::REQUESTS,
        &req.request_id,
        &trace,
        &req,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return unavailable(&e.to_string()),
    };
    let publisher = tri!(console.deps().transport.publisher());
    tri!(publisher.publish(vec![rec]).await);
    let id = herald_core::util::message_id(app, &req.request_id, 0);
    let _ = herald_domain::dead_letters::audit(
        &**db,
        &op.name,
        "template.test_send",
        &code,
        &json!({"app": app, "message_id": id,
                "to": herald_core::util::mask_address(&req.recipients[0].address)}),
    )
    .await;
    back(&format!("test message {id} sent"))
}

pub async fn apps(State(console): State<Arc<Console>>, op: Operator) -> Response {
    let db = db!(console);
    let usage = tri!(reads::app_usage(&**db).await);
    let rows: Vec<Value> = console
        .deps()
        .config
        .apps
        .iter()
        .map(|a| {
            let u = usage.iter().find(|u| u.0 == a.id);
            let used = u.map_or(0, |u| u.1);
            json!({"id": a.id, "daily_quota": a.daily_quota, "used_today": used,
                   "used_ratio": a.daily_quota.filter(|q| *q > 0).map(|q| used as f64 / q as f64),
                   "rate_limit_per_sec": a.rate_limit_per_sec, "status_url": a.status_url,
                   "webhook_due": u.map_or(0, |u| u.2), "webhook_failing": u.map_or(0, |u| u.3),
                   "secret_env": a.secret_env})
        })
        .collect();
    page(&console, "misc.html", &op, "apps", json!({"apps": rows}))
}

#[derive(Deserialize, Default)]
pub struct OptOutQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    flash: Option<String>,
}

pub async fn opt_outs(
    State(console): State<Arc<Console>>,
    op: Operator,
    Query(q): Query<OptOutQuery>,
) -> Response {
    let db = db!(console);
    let rows = tri!(reads::opt_outs(&**db, &q.q).await);
    let apps: Vec<&str> = console
        .deps()
        .config
        .apps
        .iter()
        .map(|a| a.id.as_str())
        .collect();
    let channels: Vec<&str> = Channel::ALL.iter().map(|c| c.as_str()).collect();
    page(
        &console,
        "misc.html",
        &op,
        "opt-outs",
        json!({"opt_outs": rows, "q": q.q, "apps": apps, "channels": channels, "flash": q.flash}),
    )
}

pub async fn opt_out_change(
    State(console): State<Arc<Console>>,
    op: Operator,
    Form(f): Form<OptOutChange>,
) -> Response {
    if let Err(r) = allowed(&op, &f.csrf, "operator") {
        return r.into_response();
    }
    let cfg = &console.deps().config;
    let apps: Vec<&str> = cfg.apps.iter().map(|a| a.id.as_str()).collect();
    let region = herald_domain::destination::Region::configured(cfg);
    let (channel, address, out) = match forms::opt_out(&f, &apps, region) {
        Ok(v) => v,
        Err(e) => return flash_to("/opt-outs", &format!("not changed: {e}")),
    };
    let mut spellings = herald_domain::destination::spellings(channel, &address, region);
    spellings.push(f.address.trim().to_owned());
    let db = db!(console);
    tri!(
        herald_domain::opt_out::set(&**db, &f.app, channel.as_str(), &address, &spellings, out)
            .await
    );
    let _ = herald_domain::dead_letters::audit(
        &**db,
        &op.name,
        if out { "opt_out.add" } else { "opt_out.remove" },
        &herald_core::util::mask_address(&address),
        &json!({"app": f.app, "channel": channel.as_str()}),
    )
    .await;
    flash_to("/opt-outs", if out { "opted out" } else { "opted back in" })
}

pub async fn audit(State(console): State<Arc<Console>>, op: Operator) -> Response {
    if let Err(r) = op.must_be("admin") {
        return r.into_response();
    }
    let db = db!(console);
    let rows = tri!(reads::audit(&**db).await);
    page(&console, "misc.html", &op, "audit", json!({"audit": rows}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_marks_removed_and_added_lines() {
        let d = diff("a\nb\nc", "a\nx\nc");
        let kinds: String = d.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, " -+ ");
    }

    fn edited(code: &str, e: &Edit) -> Result<TemplateConfig, String> {
        forms::edited(code, e, &Default::default())
    }

    #[test]
    fn a_published_edit_keeps_the_provider_template_it_replaces() {
        let mut prev = edited("verify_code", &edit("SMS", "Your code is {{ code }}")).unwrap();
        prev.provider_template = Some("SMS_123".into());
        prev.provider_params = [("code".to_owned(), "{{ code }}".to_owned())].into();
        let mut t = edited("verify_code", &edit("SMS", "Code: {{ code }}")).unwrap();
        keep_provider_fields(&mut t, prev.clone());
        assert_eq!(t.provider_template.as_deref(), Some("SMS_123"));
        assert_eq!(t.provider_params, prev.provider_params);
        assert_eq!(t.text.as_deref(), Some("Code: {{ code }}"));
        // Another channel's provider fields do not apply.
        let mut mail = edited("verify_code", &edit("EMAIL", "Code: {{ code }}")).unwrap();
        keep_provider_fields(&mut mail, prev);
        assert!(mail.provider_template.is_none());
    }

    fn edit(channel: &str, text: &str) -> Edit {
        Edit {
            csrf: String::new(),
            app: String::new(),
            channel: channel.into(),
            subject: String::new(),
            text: text.into(),
            html: String::new(),
            markdown: String::new(),
            params: String::new(),
        }
    }

    #[test]
    fn sample_params_name_what_the_template_uses() {
        let e = Edit {
            csrf: String::new(),
            app: String::new(),
            channel: "sms".into(),
            subject: "{{ a }} and {{b}}".into(),
            text: String::new(),
            html: String::new(),
            markdown: String::new(),
            params: String::new(),
        };
        let t = edited("t", &e).unwrap();
        assert_eq!(sample_params(&t).keys().collect::<Vec<_>>(), ["a", "b"]);
    }
}
