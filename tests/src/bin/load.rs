//! Load driver for `scripts/bench`: signed `POST /v1/messages` requests from many concurrent
//! connections, as an app's servers would send them. Each request is single-recipient and carries
//! `metadata.sent_ms`, from which the webhook simulator measures request → provider call (inline
//! e-mail content carries `sent_ms=` in its text for the same measure at the mail server).
//!
//! Usage: load --api 127.0.0.1:8080 --count 20000 --conns 64 --channel WEBHOOK
//!             --to 'http://127.0.0.1:18099/hook' [--template ping] [--app demo]
//! (`{i}` in `--to` is the request's number; no `--template`: inline subject and text.)
//! The app's secret comes from `HERALD_APP_DEMO_SECRET` (or `--secret-env NAME`).
//! Prints one line: `load: requests= accepted= refused= secs= req_per_s= p50_ms= p99_ms=` (the
//! gateway's answer time) and the first refusals.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use herald_core::util::now_ms;
use herald_tests::{sign_headers, unique};
use serde_json::json;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.windows(2)
        .find(|w| w[0] == name)
        .map_or_else(|| default.to_owned(), |w| w[1].clone())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let api = arg(&args, "--api", "127.0.0.1:8080");
    let count: usize = arg(&args, "--count", "10000").parse()?;
    let conns: usize = arg(&args, "--conns", "64").parse()?;
    let channel = arg(&args, "--channel", "WEBHOOK");
    let to = arg(&args, "--to", "http://127.0.0.1:18099/hook");
    let template = arg(&args, "--template", "");
    let app = arg(&args, "--app", "demo");
    let secret_env = arg(&args, "--secret-env", "HERALD_APP_DEMO_SECRET");
    let secret = std::env::var(&secret_env)
        .map_err(|_| anyhow::anyhow!("{secret_env}: the app's secret, not set"))?;

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(conns)
        .http1_only()
        .build()?;
    let url = format!("http://{api}/v1/messages");
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (client, url, next) = (client.clone(), url.clone(), next.clone());
        let (channel, to, template, app, secret) = (
            channel.clone(),
            to.clone(),
            template.clone(),
            app.clone(),
            secret.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut took = Vec::new();
            let mut refused = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let sent = now_ms();
                let mut body = json!({
                    "channel": channel,
                    "recipients": [{"address": to.replace("{i}", &i.to_string())}],
                    "params": {"name": format!("user {i}"), "product": "Herald"},
                    "metadata": {"sent_ms": sent.to_string()},
                    "request_id": unique("load"),
                });
                if template.is_empty() {
                    // `sent_ms=` in the text: the bench finds it in the mail that arrives.
                    let text = format!("Hello #{i}\nsent_ms={sent}\n");
                    body["content"] = json!({"subject": "Hello", "text": text});
                } else {
                    body["template"] = json!(template);
                }
                let body = serde_json::to_vec(&body).expect("JSON");
                let t = Instant::now();
                let r = sign_headers(
                    client.post(&url),
                    &app,
                    &secret,
                    "POST",
                    "/v1/messages",
                    &body,
                )
                .body(body)
                .send()
                .await;
                took.push(t.elapsed().as_secs_f64() * 1000.0);
                match r {
                    Ok(r) if r.status().as_u16() == 202 => {}
                    Ok(r) => refused.push(format!(
                        "{} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => refused.push(e.to_string()),
                }
            }
            (took, refused)
        }));
    }
    let (mut took, mut refused) = (Vec::new(), Vec::new());
    for t in tasks {
        let (a, b) = t.await?;
        took.extend(a);
        refused.extend(b);
    }
    let secs = started.elapsed().as_secs_f64();
    took.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        took.get(((took.len() as f64 * p) as usize).min(took.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "load: requests={count} accepted={} refused={} secs={secs:.2} req_per_s={:.0} p50_ms={:.1} p99_ms={:.1}",
        count - refused.len(),
        refused.len(),
        count as f64 / secs,
        pct(0.50),
        pct(0.99),
    );
    for r in refused.iter().take(5) {
        println!("load: refused: {r}");
    }
    Ok(())
}
