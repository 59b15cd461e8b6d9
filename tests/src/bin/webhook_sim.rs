//! Webhook provider simulator: verifies each request's Standard Webhooks signature like a real
//! receiver (401 otherwise), dedupes on `webhook-id`, and records request → arrival latency from
//! the `metadata.sent_ms` the demo/bench requests carry. `GET /stats` reports.
//!
//! Usage: webhook_sim --port 18099 --secret whsec_…

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use herald_core::util::{now_ms, standard_webhook_verify, webhook_key};

#[derive(Default)]
struct Stats {
    ids: HashSet<String>,
    duplicates: u64,
    rejected: u64,
    latencies_ms: Vec<i64>,
    first_ms: Option<i64>,
    last_ms: i64,
}

struct Sim {
    key: Vec<u8>,
    stats: Mutex<Stats>,
}

async fn hook(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let now = now_ms();
    let mut s = sim.stats.lock().unwrap_or_else(|p| p.into_inner());
    if !standard_webhook_verify(
        &sim.key,
        &h("webhook-id"),
        &h("webhook-timestamp"),
        &h("webhook-signature"),
        &body,
        now / 1000,
        300,
    ) {
        s.rejected += 1;
        return StatusCode::UNAUTHORIZED;
    }
    if !s.ids.insert(h("webhook-id")) {
        s.duplicates += 1;
        return StatusCode::OK;
    }
    let sent = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v["metadata"]["sent_ms"]
                .as_str()
                .and_then(|x| x.parse::<i64>().ok())
        });
    if let Some(sent) = sent {
        s.latencies_ms.push(now - sent);
    }
    s.first_ms.get_or_insert(now);
    s.last_ms = now;
    StatusCode::OK
}

async fn stats(State(sim): State<Arc<Sim>>) -> Json<serde_json::Value> {
    let s = sim.stats.lock().unwrap_or_else(|p| p.into_inner());
    let mut l = s.latencies_ms.clone();
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
    };
    Json(serde_json::json!({
        "count": s.ids.len(),
        "duplicates": s.duplicates,
        "rejected": s.rejected,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": l.last(),
        "first_ms": s.first_ms,
        "last_ms": s.last_ms,
    }))
}

/// Forgets everything received (between benchmark phases).
async fn reset(State(sim): State<Arc<Sim>>) -> StatusCode {
    *sim.stats.lock().unwrap_or_else(|p| p.into_inner()) = Stats::default();
    StatusCode::OK
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut port = 18099u16;
    let mut secret = String::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().unwrap_or_default().parse()?,
            "--secret" => secret = args.next().unwrap_or_default(),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let sim = Arc::new(Sim {
        key: webhook_key(&secret),
        stats: Mutex::default(),
    });
    let app = Router::new()
        .route("/hook", post(hook))
        .route("/stats", get(stats))
        .route("/reset", post(reset))
        .with_state(sim);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("webhook simulator on 127.0.0.1:{port}");
    axum::serve(listener, app).await?;
    Ok(())
}
