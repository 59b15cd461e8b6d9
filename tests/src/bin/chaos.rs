//! `herald-chaos`: the chaos run behind `scripts/chaos` (issue "Faults lose nothing").
//!
//! Every stage runs in its own process (`herald-<stage>`, two instances each of route and
//! send). Messages over e-mail, SMS (both providers, with receipts), webhook and in-app are
//! published through the HTTP gateway and straight to the transport, some scheduled and some of
//! those canceled, plus a few undecodable records. Meanwhile stage processes are killed with
//! SIGKILL at random moments and started again, one Kafka broker is killed and restarted,
//! PostgreSQL is stopped as a crash stops it and restarted, and the registry is restarted. Then
//! the run waits for quiescence and checks what the issue asks: every message terminal, nothing
//! called twice, nothing canceled sent, every `unknown` explained by the ledger, the read model
//! equal to a rebuild of it, and no dead letters but the injected ones. Loopback only; bounded
//! in count (`CHAOS_MESSAGES`, `CHAOS_KILLS`) and time (`CHAOS_MAX_MINUTES`).
//!
//! Prints a table and, last, one line:
//! `chaos: messages=… kills=… broker_restarts=… pg_restarts=… lost=… sent_twice=… unknown=… unexplained=… rebuild_equal=yes|no`

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use herald_core::transport::{OutRecord, SourceSpec, Transport};
use herald_core::util::{message_id, now_ms};
use herald_domain::status::TERMINAL;
use herald_schemas::{Channel, Priority, Recipient, SendRequested, topics};
use herald_tests::*;
use serde_json::{Value, json};
use tokio::sync::Mutex;

const API: u16 = 18_800;
const STAGES: [&str; 11] = [
    "accept",
    "render",
    "route",
    "route",
    "send",
    "send",
    "delay",
    "projector",
    "api",
    "callback",
    "notify",
];
const PER_REQUEST: usize = 50;
const POISON: usize = 3;

fn opt<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// SplitMix64: a seeded sequence (the run is reproducible in its choices, not its timing).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Proc {
    stage: &'static str,
    instance: String,
    admin: u16,
    child: Option<Child>,
}

struct Fleet {
    bins: PathBuf,
    config: PathBuf,
    logs: PathBuf,
    transport: String,
    procs: Vec<Proc>,
    /// Processes that ended without being killed (instance and exit status). A stage must
    /// outlive its dependencies' faults — wait for them, not exit — since nothing here
    /// restarts it; each one found fails the run.
    exited: Vec<String>,
}

impl Fleet {
    fn env(&self, p: &Proc) -> Vec<(&'static str, String)> {
        let mut env = herald_env(API, p.admin);
        env.retain(|(k, _)| *k != "HERALD_INSTANCE" && *k != "RUST_LOG");
        env.push(("HERALD_INSTANCE", p.instance.clone()));
        env.push(("HERALD_TRANSPORT", self.transport.clone()));
        env.push(("RUST_LOG", "warn,rdkafka=error".into()));
        env
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let p = &self.procs[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("chaos-{}.log", p.instance)))?;
        let mut cmd = Command::new(self.bins.join(format!("herald-{}", p.stage)));
        cmd.arg("--config")
            .arg(&self.config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null());
        for (k, v) in self.env(p) {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn herald-{}", p.stage))?;
        self.procs[i].child = Some(child);
        Ok(())
    }

    /// Notes every process that has ended on its own since the last look.
    fn note_exits(&mut self) {
        for p in &mut self.procs {
            if let Some(c) = &mut p.child
                && let Ok(Some(status)) = c.try_wait()
            {
                println!("chaos: {} exited by itself ({status})", p.instance);
                self.exited.push(format!("{} {status}", p.instance));
                p.child = None;
            }
        }
    }

    fn kill(&mut self, i: usize) {
        self.note_exits();
        if let Some(mut c) = self.procs[i].child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    fn stop_all(&mut self) {
        self.note_exits();
        for p in &mut self.procs {
            if let Some(c) = &p.child {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(c.id().to_string())
                    .status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for p in &mut self.procs {
            if let Some(mut c) = p.child.take() {
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A run that ends early (an error, a panic) leaves no stage process behind.
impl Drop for Fleet {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            self.kill(i);
        }
    }
}

fn stack(args: &[&str]) -> bool {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack");
    Command::new(script)
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// What one request holds and how it was sent.
struct Planned {
    req: SendRequested,
    via_gateway: bool,
    cancel: bool,
}

fn plan(seed: u64, run: u64, messages: usize, rng: &mut Rng) -> Vec<Planned> {
    let channels = [
        (Channel::Email, "welcome"),
        (Channel::Sms, "verify_code"),
        (Channel::Webhook, "ping"),
        (Channel::Inapp, "notice"),
    ];
    let params: HashMap<String, String> = [
        ("name", "Ada"),
        ("product", "Herald"),
        ("code", "482913"),
        ("title", "Chaos"),
        ("body", "still here"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let mut out = Vec::new();
    let mut phone = (seed % 90) * 1_000_000;
    for i in 0..messages.div_ceil(PER_REQUEST) {
        let (channel, template) = channels[i % channels.len()];
        let rid = format!("chaos-{seed}-{run}-{i}");
        let n = PER_REQUEST.min(messages - i * PER_REQUEST);
        let recipients = (0..n)
            .map(|j| {
                let address = match channel {
                    Channel::Email => format!("{rid}-{j}@example.com"),
                    Channel::Sms => {
                        phone += 1;
                        format!("139{phone:08}")
                    }
                    Channel::Webhook => format!("{}/_hooks/chaos-{seed}", sim_url()),
                    _ => format!("chaos-user-{seed}-{i}-{j}"),
                };
                Recipient {
                    address,
                    params: HashMap::new(),
                    timezone: None,
                }
            })
            .collect();
        let scheduled = rng.below(25) == 0;
        let via_gateway = i % 2 == 0;
        out.push(Planned {
            req: SendRequested {
                request_id: rid,
                app_id: "demo".into(),
                idempotency_key: None,
                channel,
                template: Some(template.into()),
                params: params.clone(),
                recipients,
                content: None,
                send_at: scheduled.then(|| now_ms() + 20_000),
                priority: Priority::Normal,
                expires_at: None,
                metadata: HashMap::new(),
                requested_at: now_ms(),
            },
            via_gateway,
            cancel: scheduled && via_gateway && rng.below(2) == 0,
        });
    }
    out
}

/// Publishes every planned request (retrying through the faults) and cancels the chosen ones.
async fn publish(planned: &[Planned], transport: &str) -> anyhow::Result<HashSet<String>> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let canceled = Arc::new(Mutex::new(HashSet::new()));
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let gateway = futures::stream::iter(planned.iter().filter(|p| p.via_gateway))
        .map(|p| {
            let http = http.clone();
            let canceled = canceled.clone();
            let accepted = accepted.clone();
            async move {
                let mut body = json!({
                    "request_id": p.req.request_id, "channel": p.req.channel,
                    "template": p.req.template, "params": p.req.params,
                    "recipients": p.req.recipients.iter().map(|r| json!({"address": r.address})).collect::<Vec<_>>(),
                });
                if let Some(at) = p.req.send_at {
                    body["send_at"] = json!(at);
                }
                let bytes = serde_json::to_vec(&body).unwrap_or_default();
                let deadline = Instant::now() + Duration::from_secs(300);
                loop {
                    let sent = signed_with(&http, "demo", SECRET, "POST", "/v1/messages", &bytes, API)
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status().is_success() => {
                            let n = accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                            if n.is_multiple_of(100) {
                                println!("chaos: {n} gateway requests accepted");
                            }
                            break;
                        }
                        Ok(r) => {
                            let status = r.status();
                            let text = r.text().await.unwrap_or_default();
                            let text: String = text.chars().take(200).collect();
                            if status.is_client_error() && status.as_u16() != 429 {
                                return Err(anyhow::anyhow!("gateway refused {}: {status} {text}", p.req.request_id));
                            }
                            println!("chaos: gateway answered {status}: {text}");
                        }
                        Err(e) => println!("chaos: gateway: {e}"),
                    }
                    if Instant::now() > deadline {
                        return Err(anyhow::anyhow!("gateway never took {}", p.req.request_id));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                if p.cancel {
                    let path = format!("/v1/requests/{}/cancel", p.req.request_id);
                    for _ in 0..60 {
                        let r = signed_with(&http, "demo", SECRET, "POST", &path, b"", API)
                            .send()
                            .await;
                        if r.is_ok_and(|r| r.status().is_success()) {
                            canceled.lock().await.insert(p.req.request_id.clone());
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(8);
    let direct = async {
        for chunk in planned
            .iter()
            .filter(|p| !p.via_gateway)
            .collect::<Vec<_>>()
            .chunks(20)
        {
            let reqs: Vec<SendRequested> = chunk.iter().map(|p| p.req.clone()).collect();
            let deadline = Instant::now() + Duration::from_secs(300);
            loop {
                let attempt = tokio::spawn({
                    let reqs = reqs.clone();
                    let transport = transport.to_owned();
                    async move { publish_records(&transport, encode_requests(&reqs).await).await }
                })
                .await;
                if attempt.is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("could not publish straight to the transport");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Ok(())
    };
    let (gw, direct): (Vec<anyhow::Result<()>>, anyhow::Result<()>) =
        tokio::join!(gateway.collect::<Vec<_>>(), direct);
    direct?;
    for r in gw {
        r?;
    }
    let c = canceled.lock().await.clone();
    Ok(c)
}

async fn inject_poison(transport: &str) {
    let recs: Vec<OutRecord> = (0..POISON)
        .map(|i| OutRecord {
            topic: topics::REQUESTS.into(),
            key: Some(format!("poison-{i}").into_bytes()),
            payload: b"\x00\x00\x00\x00\x01not avro at all".to_vec(),
            headers: Vec::new(),
        })
        .collect();
    publish_records(transport, recs).await;
}

/// Records on the dead-letter topic now (a fresh group reads it from the start), oldest first.
async fn dead_letters(transport: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let t: Box<dyn Transport> = if transport == "redis" {
        Box::new(herald_core::transport::redis::RedisTransport::new(
            herald_core::transport::redis::RedisSettings::new(redis_url()),
        )?)
    } else {
        Box::new(herald_core::transport::kafka::KafkaTransport::new(
            herald_core::transport::kafka::KafkaSettings::new(brokers()),
        ))
    };
    let mut spec = SourceSpec::new(unique("chaos-dlq"), vec![topics::DEAD_LETTERS.into()]);
    // Short polls (a Redis client's answer timeout is shorter than a long block).
    spec.max_wait = Duration::from_millis(200);
    let mut source = t.source(spec).await?;
    let mut letters = Vec::new();
    let mut empty = 0;
    while empty < 25 {
        let batch = source.poll().await?;
        if batch.is_empty() {
            empty += 1;
        } else {
            empty = 0;
            letters.extend(batch.into_iter().map(|r| r.payload.unwrap_or_default()));
        }
    }
    source.close().await;
    Ok(letters)
}

/// What a run that is not clean leaves to look at: each dead letter it did not inject (stage,
/// reason, key), printed, since CI shows only the output; and the simulators' logs, saved
/// beside the stage logs.
async fn explain_failure(letters: &[Vec<u8>], logs: &Path, seed: u64) {
    let codec = herald_core::codec::Codec::new(Arc::new(
        herald_core::codec::RegistryResolver::new(&registry()).expect("registry url"),
    ));
    for bytes in letters {
        match codec.decode::<herald_schemas::DeadLettered>(bytes).await {
            Ok(d) if d.key.as_deref().is_some_and(|k| k.starts_with(b"poison-")) => {}
            Ok(d) => println!(
                "chaos: dead letter from {} ({}@{}): {} {} key={}",
                d.stage,
                d.source_topic,
                d.source_offset,
                d.reason.code,
                d.reason.message,
                String::from_utf8_lossy(d.key.as_deref().unwrap_or_default())
            ),
            Err(e) => println!("chaos: a dead letter that does not decode: {e}"),
        }
    }
    for provider in ["aliyun", "tencent"] {
        let path = logs.join(format!("chaos-{seed}-sim-{provider}.json"));
        let log = sim_log(provider).await;
        match serde_json::to_vec(&log).map(|b| std::fs::write(&path, b)) {
            Ok(Ok(())) => println!(
                "chaos: {} calls to {provider} kept in {}",
                log.len(),
                path.display()
            ),
            _ => println!("chaos: could not keep {}", path.display()),
        }
    }
}

async fn statuses(db: &tokio_postgres::Client, like: &str) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(db
        .query(
            "SELECT status, count(*) FROM messages WHERE request_id LIKE $1 GROUP BY status ORDER BY status",
            &[&like],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

async fn checksum(db: &tokio_postgres::Client, like: &str) -> anyhow::Result<(String, String)> {
    let m: Option<String> = db
        .query_one(
            "SELECT md5(string_agg(message_id || ':' || status || ':' || attempts || ':' || coalesce(provider, ''), ',' ORDER BY message_id))
             FROM messages WHERE request_id LIKE $1",
            &[&like],
        )
        .await?
        .get(0);
    let e: Option<String> = db
        .query_one(
            "SELECT md5(string_agg(e.message_id || ':' || e.event_id || ':' || e.status, ',' ORDER BY e.message_id, e.event_id))
             FROM message_events e JOIN messages m USING (message_id) WHERE m.request_id LIKE $1",
            &[&like],
        )
        .await?
        .get(0);
    Ok((m.unwrap_or_default(), e.unwrap_or_default()))
}

/// For a failed run: what the read model and the ledger know of (up to ten) messages that never
/// ended, so the finding can be followed in the stage logs.
async fn explain_lost(db: &tokio_postgres::Client, like: &str) {
    let Ok(rows) = db
        .query(
            "SELECT message_id, status, channel FROM messages
             WHERE request_id LIKE $1 AND NOT (status = ANY($2)) ORDER BY message_id LIMIT 10",
            &[&like, &TERMINAL.to_vec()],
        )
        .await
    else {
        return;
    };
    for r in rows {
        let id: String = r.get(0);
        let status: String = r.get(1);
        let channel: String = r.get(2);
        println!("chaos: not terminal: {id} status={status} channel={channel}");
        let events = db
            .query(
                "SELECT status || ' ' || stage || ' attempt ' || attempt || coalesce(' ' || reason_code, ''), at::text FROM message_events WHERE message_id = $1 ORDER BY at",
                &[&id],
            )
            .await
            .unwrap_or_default();
        for e in events {
            println!(
                "chaos:   event {} at {}",
                e.get::<_, String>(0),
                e.get::<_, Option<String>>(1).unwrap_or_default()
            );
        }
        let ledger = db
            .query(
                "SELECT attempt, provider, claimed_at::text, started_at::text, finished_at::text, outcome
                 FROM send_ledger WHERE message_id = $1 ORDER BY attempt",
                &[&id],
            )
            .await
            .unwrap_or_default();
        for l in ledger {
            println!(
                "chaos:   ledger attempt={} provider={} claimed={} started={} finished={} outcome={}",
                l.get::<_, i32>(0),
                l.get::<_, String>(1),
                l.get::<_, Option<String>>(2).unwrap_or_default(),
                l.get::<_, Option<String>>(3).unwrap_or_default(),
                l.get::<_, Option<String>>(4).unwrap_or_default(),
                l.get::<_, Option<String>>(5).unwrap_or_default(),
            );
        }
    }
}

/// For a rebuild that differs: up to ten rows on each side of the difference.
async fn explain_rebuild(db: &tokio_postgres::Client, like: &str) {
    let queries = [
        (
            "live only",
            format!(
                "SELECT message_id || ' ' || status || ' attempts=' || attempts || ' ' || provider FROM chaos_before_messages
                 EXCEPT SELECT message_id || ' ' || status || ' attempts=' || attempts || ' ' || coalesce(provider, '') FROM messages WHERE request_id LIKE '{like}' LIMIT 10"
            ),
        ),
        (
            "rebuilt only",
            format!(
                "SELECT message_id || ' ' || status || ' attempts=' || attempts || ' ' || coalesce(provider, '') FROM messages WHERE request_id LIKE '{like}'
                 EXCEPT SELECT message_id || ' ' || status || ' attempts=' || attempts || ' ' || provider FROM chaos_before_messages LIMIT 10"
            ),
        ),
        (
            "event live only",
            "SELECT message_id || ' ' || event_id || ' ' || status FROM chaos_before_events
             EXCEPT SELECT e.message_id || ' ' || e.event_id || ' ' || e.status FROM message_events e
             WHERE e.message_id IN (SELECT message_id FROM chaos_before_messages) LIMIT 10"
                .to_owned(),
        ),
        (
            "event rebuilt only",
            "SELECT e.message_id || ' ' || e.event_id || ' ' || e.status FROM message_events e
             WHERE e.message_id IN (SELECT message_id FROM chaos_before_messages)
             EXCEPT SELECT message_id || ' ' || event_id || ' ' || status FROM chaos_before_events LIMIT 10"
                .to_owned(),
        ),
    ];
    for (what, sql) in queries {
        match db.query(&sql, &[]).await {
            Ok(rows) => {
                for r in rows {
                    println!("chaos: rebuild differs ({what}): {}", r.get::<_, String>(0));
                }
            }
            Err(e) => println!("chaos: rebuild comparison failed: {e}"),
        }
    }
}

async fn sim_log(provider: &str) -> Vec<Value> {
    let Ok(r) = reqwest::get(format!("{}/_log/{provider}", sim_url())).await else {
        return Vec::new();
    };
    let v: Value = r.json().await.unwrap_or(Value::Null);
    v["accepted"].as_array().cloned().unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let messages: usize = opt("CHAOS_MESSAGES", 100_000);
    let kills_wanted: usize = opt("CHAOS_KILLS", 10);
    let seed: u64 = opt("CHAOS_SEED", now_ms() as u64 % 1_000_000);
    let transport: String = opt("CHAOS_TRANSPORT", "kafka".to_owned());
    let max = Duration::from_secs(60 * opt("CHAOS_MAX_MINUTES", 60u64));
    let started = Instant::now();
    let mut rng = Rng(seed);
    println!("chaos: seed={seed} messages={messages} transport={transport}");

    // Both SMS providers in turn (same priority, equal weight).
    // An SMS whose call a kill cut is held for a receipt that may never come; the deadline must
    // outlast the providers' receipt retries (the simulators retry for about five minutes).
    let receipt_timeout: u64 = opt("CHAOS_RECEIPT_TIMEOUT_SECS", 400);
    let text = std::fs::read_to_string(config_path())?
        .replacen(
            "endpoint = \"http://127.0.0.1:18100/tencent\"\npriority = 1",
            "endpoint = \"http://127.0.0.1:18100/tencent\"\npriority = 0",
            1,
        )
        .replacen(
            "unknown_outcome = \"hold_for_receipt\"",
            &format!(
                "unknown_outcome = \"hold_for_receipt\"\nreceipt_timeout_secs = {receipt_timeout}"
            ),
            1,
        )
        // Everything shares two cores here (three brokers, eleven stage processes, the
        // simulators): 2 s provider timeouts would turn load into genuine `unknown` outcomes,
        // which are not what this run is about (a crash's). Providers are given 10 s.
        .replace("timeout_ms = 2000", "timeout_ms = 10000")
        // Quiet hours hold NORMAL SMS from 22:00 to 08:00 in Shanghai: a run must not depend on
        // the hour it starts at (the channels suite tests quiet hours with its own clock).
        .replacen(
            "quiet_hours = { start = \"22:00\", end = \"08:00\", mode = \"hold\", timezone = \"Asia/Shanghai\" }\n",
            "",
            1,
        );
    if text.contains("quiet_hours") {
        anyhow::bail!("config layout changed: the SMS quiet hours were not removed");
    }
    let config = std::env::temp_dir().join(format!("herald-chaos-{seed}.toml"));
    std::fs::write(&config, text)?;
    let bins = std::env::var("HERALD_BIN_DIR").map_or_else(
        |_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug")),
        PathBuf::from,
    );
    let logs = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.stack/logs"));
    let mut fleet = Fleet {
        bins,
        config,
        logs,
        transport: transport.clone(),
        procs: STAGES
            .iter()
            .enumerate()
            .map(|(i, s)| Proc {
                stage: s,
                instance: format!("chaos-{s}-{i}"),
                admin: 19_800 + i as u16,
                child: None,
            })
            .collect(),
        exited: Vec::new(),
    };
    let http = reqwest::Client::new();
    let _ = http.post(format!("{}/_reset", sim_url())).send().await;
    for i in 0..fleet.procs.len() {
        fleet.spawn(i)?;
    }
    // The API answers, and the SMS simulators push their receipts to the callback stage.
    let health = format!("http://127.0.0.1:{API}/health");
    eventually(Duration::from_secs(120), "the API", || {
        let health = health.clone();
        async move { reqwest::get(&health).await.ok().map(|_| ()) }
    })
    .await;
    // Counted once the stages have made the topics (on a fresh cluster they do not exist yet).
    let dlq_before: HashSet<Vec<u8>> = dead_letters(&transport).await?.into_iter().collect();
    let token = herald_simulators::credential("HERALD_SIM_CALLBACK_TOKEN");
    for (sim, code) in [("aliyun", "aliyun-sim"), ("tencent", "tencent-sim")] {
        let url = format!("http://127.0.0.1:{}/callbacks/{code}/{token}", API + 1);
        http.put(format!("{}/_control/{sim}/receipts", sim_url()))
            .json(&json!({ "url": url }))
            .send()
            .await?;
    }

    // Request ids unique to this run (a seed may be run again; replayed ids create nothing).
    let run = now_ms() as u64 % 1_000_000_000;
    let planned = plan(seed, run, messages, &mut rng);
    let fleet = Arc::new(std::sync::Mutex::new(fleet));
    // The faults, at random moments while traffic flows and drains.
    let mut actions: Vec<&str> = vec!["kill"; kills_wanted];
    actions.extend(["postgres", "registry"]);
    // The transport's own server dies too: a Kafka broker, or Redis (back from its
    // append-only file); counted as `broker_restarts`.
    actions.push(if transport == "kafka" {
        "broker"
    } else {
        "redis"
    });
    for i in (1..actions.len()).rev() {
        actions.swap(i, rng.below(i as u64 + 1) as usize);
    }
    // On the 3-node cluster one broker of three dies; on a single node, the one broker (all of
    // Kafka is away for a while).
    let nodes = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../.stack/kafka-nodes"
    ))
    .unwrap_or_default();
    let node = if nodes.trim() == "3" { "2" } else { "1" };
    println!("chaos: kafka nodes={}", if node == "2" { 3 } else { 1 });
    let chaos = {
        let fleet = fleet.clone();
        let mut rng = Rng(seed ^ 0xC4A0);
        tokio::task::spawn_blocking(move || {
            let (mut kills, mut brokers, mut pgs, mut registries) = (0, 0, 0, 0);
            for a in actions {
                std::thread::sleep(Duration::from_millis(2_000 + rng.below(4_000)));
                match a {
                    "kill" => {
                        let i = rng.below(STAGES.len() as u64) as usize;
                        let mut f = fleet.lock().unwrap_or_else(|p| p.into_inner());
                        f.kill(i);
                        println!("chaos: kill -9 {}", f.procs[i].instance);
                        drop(f);
                        std::thread::sleep(Duration::from_millis(500 + rng.below(2_500)));
                        let mut f = fleet.lock().unwrap_or_else(|p| p.into_inner());
                        if let Err(e) = f.spawn(i) {
                            println!("chaos: restart failed: {e}");
                        }
                        kills += 1;
                    }
                    "broker" => {
                        if stack(&["kill-broker", node]) {
                            println!("chaos: kill -9 kafka node {node}");
                            std::thread::sleep(Duration::from_secs(15));
                            if stack(&["start-broker", node]) {
                                brokers += 1;
                            }
                        }
                    }
                    "redis" => {
                        if stack(&["restart-redis", "5"]) {
                            println!("chaos: kill -9 redis");
                            brokers += 1;
                        }
                    }
                    "postgres" => {
                        if stack(&["restart-postgres", "5"]) {
                            pgs += 1;
                        }
                    }
                    _ => {
                        if stack(&["restart-registry", "3"]) {
                            registries += 1;
                        }
                    }
                }
            }
            (kills, brokers, pgs, registries)
        })
    };
    inject_poison(&transport).await;
    let canceled_requests = publish(&planned, &transport).await?;
    println!(
        "chaos: published {} requests in {:.0} s",
        planned.len(),
        started.elapsed().as_secs_f64()
    );
    let (kills, broker_restarts, pg_restarts, registry_restarts) = chaos.await?;

    // Quiescence: every message terminal, or no progress for two minutes past the receipt
    // deadline.
    let db = herald_core::runtime::connect_postgres(&postgres()).await?;
    let like = format!("chaos-{seed}-{run}-%");
    let (mut last, mut since) = (-1i64, Instant::now());
    loop {
        let st = statuses(&db, &like).await.unwrap_or_default();
        let terminal: i64 = st
            .iter()
            .filter(|(s, _)| TERMINAL.contains(&s.as_str()))
            .map(|(_, n)| n)
            .sum();
        if terminal as usize >= messages {
            break;
        }
        if terminal != last {
            (last, since) = (terminal, Instant::now());
        }
        // Held SMS end only at their receipt deadline: no progress meanwhile is no stall.
        if since.elapsed() > Duration::from_secs(120 + receipt_timeout) || started.elapsed() > max {
            println!("chaos: no quiescence ({terminal} of {messages} terminal)");
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let st = statuses(&db, &like).await?;
    println!("{:<12} {:>8}", "status", "messages");
    for (s, n) in &st {
        println!("{s:<12} {n:>8}");
    }
    let terminal: i64 = st
        .iter()
        .filter(|(s, _)| TERMINAL.contains(&s.as_str()))
        .map(|(_, n)| n)
        .sum();
    let lost = messages as i64 - terminal;
    if lost > 0 {
        explain_lost(&db, &like).await;
    }

    // Calls per message at every sink.
    let mut ids_by_address: HashMap<String, String> = HashMap::new();
    let mut canceled_ids = HashSet::new();
    let mut email_ids = Vec::new();
    for p in &planned {
        for (j, r) in p.req.recipients.iter().enumerate() {
            let mid = message_id("demo", &p.req.request_id, j);
            if canceled_requests.contains(&p.req.request_id) {
                canceled_ids.insert(mid.clone());
            }
            if p.req.channel == Channel::Email {
                email_ids.push(mid.clone());
            }
            ids_by_address.insert(r.address.clone(), mid);
        }
    }
    let mut calls: HashMap<String, usize> = HashMap::new();
    for (id, (n, _)) in mails_for(&email_ids) {
        *calls.entry(id).or_default() += n;
    }
    for e in sim_log("aliyun").await {
        if let Some(id) = e["out_id"].as_str() {
            *calls.entry(id.to_owned()).or_default() += 1;
        }
    }
    for e in sim_log("tencent").await {
        for n in e["numbers"].as_array().into_iter().flatten() {
            let phone = n.as_str().unwrap_or_default().trim_start_matches("+86");
            if let Some(id) = ids_by_address.get(phone) {
                *calls.entry(id.clone()).or_default() += 1;
            }
        }
    }
    for e in sim_log(&format!("hooks-chaos-{seed}")).await {
        let body: Value =
            serde_json::from_str(e["body"].as_str().unwrap_or("{}")).unwrap_or_default();
        if let Some(id) = body["message_id"].as_str() {
            *calls.entry(id.to_owned()).or_default() += 1;
        }
    }
    let sent_twice = calls.values().filter(|n| **n > 1).count();
    let canceled_sent = canceled_ids
        .iter()
        .filter(|id| calls.contains_key(*id))
        .count();

    // Every `unknown` explained by a call in flight at a kill: started, never finished.
    let unknown: Vec<String> = db
        .query(
            "SELECT message_id FROM messages WHERE request_id LIKE $1 AND status = 'unknown'",
            &[&like],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let explained: i64 = db
        .query_one(
            "SELECT count(DISTINCT message_id) FROM send_ledger
             WHERE message_id = ANY($1) AND started_at IS NOT NULL
               AND (outcome IS NULL OR reason_code = 'interrupted')",
            &[&unknown],
        )
        .await?
        .get(0);
    let unexplained = unknown.len() as i64 - explained;

    // The read model equals a rebuild of it.
    // The read model settles first: redeliveries after the last kill may still add facts
    // (the same outcome again, a receipt pushed twice) after every message is terminal, and a
    // receipt wait still open ends with its own fact at its deadline.
    let waits_open = Instant::now();
    while waits_open.elapsed() < Duration::from_secs(receipt_timeout + 60) {
        let open: i64 = db
            .query_one(
                "SELECT count(*) FROM receipt_waits w JOIN send_ledger l USING (message_id, attempt)
                 WHERE NOT w.received AND l.request_id LIKE $1",
                &[&like],
            )
            .await
            .map_or(0, |r| r.get(0));
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let mut before = checksum(&db, &like).await?;
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(180) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let now = checksum(&db, &like).await?;
        if now == before {
            break;
        }
        before = now;
    }
    // Kept to show the differences should the rebuild not equal it.
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS chaos_before_messages, chaos_before_events;
         CREATE TABLE chaos_before_messages AS
           SELECT message_id, status, attempts, coalesce(provider, '') AS provider FROM messages
           WHERE request_id LIKE '{like}';
         CREATE TABLE chaos_before_events AS
           SELECT e.message_id, e.event_id, e.status FROM message_events e JOIN messages m USING (message_id)
           WHERE m.request_id LIKE '{like}'"
    ))
    .await?;
    let projector = STAGES.iter().position(|s| *s == "projector").unwrap_or(7);
    let config = {
        let mut f = fleet.lock().unwrap_or_else(|p| p.into_inner());
        f.kill(projector);
        f.config.clone()
    };
    let mut rebuild =
        Command::new(std::env::var("HERALD_BIN").map_or_else(|_| herald_bin(), PathBuf::from));
    rebuild.arg("-c").arg(&config).arg("rebuild");
    for (k, v) in herald_env(API, 19_899) {
        rebuild.env(k, v);
    }
    rebuild.env("HERALD_TRANSPORT", &transport);
    // The killed projector stays a group member until its session times out: retry until the
    // group is empty.
    let mut rebuilt = false;
    for _ in 0..24 {
        if rebuild.status().is_ok_and(|s| s.success()) {
            rebuilt = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    fleet
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .spawn(projector)?;
    let mut rebuild_equal = false;
    if rebuilt {
        let deadline = Instant::now() + Duration::from_secs(600);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let now = checksum(&db, &like).await.unwrap_or_default();
            if now == before {
                rebuild_equal = true;
                break;
            }
        }
        if !rebuild_equal {
            explain_rebuild(&db, &like).await;
        }
    }
    let dlq_after = dead_letters(&transport).await?;
    // By content (each letter has its own event id and time): a fresh group reads the
    // topic's partitions in no fixed order.
    let new_letters: Vec<Vec<u8>> = dlq_after
        .into_iter()
        .filter(|l| !dlq_before.contains(l))
        .collect();
    let unexpected_dead = new_letters.len() as i64 - POISON as i64;
    let exited = {
        let mut f = fleet.lock().unwrap_or_else(|p| p.into_inner());
        f.stop_all();
        f.exited.len()
    };

    println!(
        "chaos: registry_restarts={registry_restarts} canceled_sent={canceled_sent} \
         dead_letters_unexpected={unexpected_dead} exited_by_itself={exited} elapsed_s={:.0}",
        started.elapsed().as_secs_f64()
    );
    println!(
        "chaos: messages={messages} kills={kills} broker_restarts={broker_restarts} \
         pg_restarts={pg_restarts} lost={lost} sent_twice={sent_twice} unknown={} \
         unexplained={unexplained} rebuild_equal={}",
        unknown.len(),
        if rebuild_equal { "yes" } else { "no" }
    );
    let ok = lost == 0
        && sent_twice == 0
        && unexplained == 0
        && rebuild_equal
        && canceled_sent == 0
        && unexpected_dead == 0
        && exited == 0;
    if !ok {
        let logs = fleet.lock().unwrap_or_else(|p| p.into_inner()).logs.clone();
        explain_failure(&new_letters, &logs, seed).await;
    }
    std::process::exit(if ok { 0 } else { 1 });
}
