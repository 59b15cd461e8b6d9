//! `herald`: runs any set of stages in one process (the local default), plus operations commands.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use herald_core::config::Config;
use herald_core::runtime::Deps;
use herald_core::telemetry;
use herald_core::transport::OutRecord;
use herald_core::util::{now_ms, random_id};
use herald_core::worker::record;
use herald_schemas::{Channel, Content, Priority, Recipient, SendRequested, topics};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

const STAGES: [&str; 10] = [
    "accept",
    "render",
    "route",
    "send",
    "delay",
    "projector",
    "api",
    "callback",
    "notify",
    "console",
];

#[derive(Parser)]
#[command(name = "herald", about = "Herald multi-channel message push platform")]
struct Cli {
    /// Config file (TOML). Environment overrides apply on top.
    #[arg(long, short, global = true, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct DemoArgs {
    #[arg(long, default_value_t = 3)]
    count: usize,
    #[arg(long, default_value = "EMAIL")]
    channel: String,
    /// Recipient address; `{i}` is replaced by the message number.
    #[arg(long, default_value = "user{i}@example.com")]
    to: String,
    #[arg(long, default_value = "welcome")]
    template: String,
    #[arg(long, default_value = "demo")]
    app: String,
    /// Requests per publish batch.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Requests per second, published every 50 ms (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: usize,
    /// Recipients per request (a campaign: `--count 1 --recipients 10000`); `{i}` in `--to`
    /// counts recipients across requests.
    #[arg(long, default_value_t = 1)]
    recipients: usize,
    /// Schedule each request this many ms after it is published (`send_at`); its `sent_ms`
    /// metadata is then the due time, so the webhook simulator measures lateness.
    #[arg(long, default_value_t = 0)]
    delay_ms: i64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run stages (comma-separated, or `all`) until SIGTERM.
    Run {
        #[arg(long, default_value = "all")]
        stages: String,
        /// Where the callback endpoints listen.
        #[arg(long, default_value = "127.0.0.1:8090", env = "HERALD_CALLBACK_LISTEN")]
        callback_listen: String,
    },
    /// Create topics and register schemas (idempotent).
    Setup,
    /// Check a config and list every problem.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Publish demo requests (Avro, through the registry) to herald.requests.v1.
    Demo(DemoArgs),
    /// Drop the read model (messages, timeline) and replay every topic into it from the start.
    /// Stop the projector first; it rebuilds the tables when it starts again.
    Rebuild,
    /// Dead letters (projected from herald.dead-letters.v1): list, show decoded, redrive to the
    /// topic they came from, mark resolved. The console's dead-letter page runs the same code.
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
    },
    /// The web console: `hash-password` reads a password on stdin and prints the argon2 hash
    /// to put in an operator's `password_hash_env` variable.
    Console {
        #[command(subcommand)]
        cmd: ConsoleCmd,
    },
    /// Signed GET against the read API as an app (e.g. `herald get /v1/messages/<id>`).
    Get {
        path: String,
        #[arg(long, default_value = "demo")]
        app: String,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    Validate,
}

#[derive(Subcommand)]
enum DlqCmd {
    /// The newest dead letters (unresolved, unless --all).
    List {
        #[arg(long)]
        stage: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// One dead letter, its payload decoded through the registry.
    Show { id: String },
    /// Publishes the original bytes again to the topic they came from.
    Redrive {
        id: String,
        /// Who, for the audit log.
        #[arg(long, env = "USER", default_value = "cli")]
        operator: String,
    },
    /// Marks it handled.
    Resolve {
        id: String,
        #[arg(long, env = "USER", default_value = "cli")]
        operator: String,
    },
}

#[derive(Subcommand)]
enum ConsoleCmd {
    HashPassword,
}

async fn dlq(deps: &Deps, cmd: DlqCmd) -> anyhow::Result<()> {
    use herald_domain::dead_letters as dl;
    let db = deps.postgres().await?;
    match cmd {
        DlqCmd::List {
            stage,
            reason,
            all,
            limit,
        } => {
            let rows = dl::list(&db, &dl::Filter { stage, reason, all }, limit).await?;
            for d in &rows {
                println!(
                    "{}\t{}\t{}\t{}[{}]@{}\t{}\t{} B\tredriven {}{}",
                    d.event_id,
                    herald_core::util::format_ms(d.at_ms),
                    d.stage,
                    d.source_topic,
                    d.source_partition,
                    d.source_offset,
                    d.reason_code,
                    d.size,
                    d.redrives,
                    d.resolved_by
                        .as_ref()
                        .map(|b| format!("\tresolved by {b}"))
                        .unwrap_or_default()
                );
            }
            eprintln!("{} dead letter(s)", rows.len());
        }
        DlqCmd::Show { id } => {
            let d = dl::get(&db, &id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no dead letter {id}"))?;
            let decoded = match d.payload.as_deref() {
                Some(p) => match deps.codec.to_json(p).await {
                    Ok((name, v)) => serde_json::json!({"type": name, "value": v}),
                    Err(e) => serde_json::json!({"undecodable": e.to_string()}),
                },
                None => serde_json::Value::Null,
            };
            let mut v = serde_json::to_value(&d)?;
            v["decoded"] = decoded;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        DlqCmd::Redrive { id, operator } => {
            let publisher = deps.transport.publisher()?;
            let d = dl::redrive(&db, &*publisher, &deps.codec, &id, &operator).await?;
            println!(
                "redriven {id} to {} ({} time(s) in all)",
                d.source_topic, d.redrives
            );
        }
        DlqCmd::Resolve { id, operator } => {
            dl::resolve(&db, &id, &operator).await?;
            println!("resolved {id}");
        }
    }
    Ok(())
}

async fn setup(deps: &Deps) -> anyhow::Result<()> {
    herald_core::cli::setup(deps)
        .await
        .map_err(anyhow::Error::msg)?;
    let applied = herald_domain::schema::migrate(&mut deps.postgres().await?)
        .await
        .map_err(anyhow::Error::msg)?;
    println!(
        "schema at version {} (applied now: {applied:?})",
        herald_domain::schema::latest()
    );
    Ok(())
}

/// `herald rebuild`: empties the projector's tables and rewinds its consumer group, so the next
/// projector start replays every event. Rows are upserts whose result does not depend on the
/// order events arrive in, so the rebuilt tables equal the old ones (a test compares them).
/// The emptying commits only once the rewind succeeded: while a projector still holds the group,
/// nothing changes and the command says so.
async fn rebuild(deps: &Deps) -> anyhow::Result<()> {
    let mut db = deps.postgres().await?;
    let tx = db.transaction().await?;
    herald_domain::readmodel::empty(&tx).await?;
    let group = deps.spec(herald_projector::STAGE, vec![], false).group;
    deps.transport
        .rewind(&group, &herald_projector::input_topics())
        .await
        .map_err(|e| {
            anyhow::anyhow!("rewind {group} (stop every projector first; nothing changed): {e}")
        })?;
    tx.commit().await?;
    println!("read model emptied and {group} rewound: start the projector to replay");
    Ok(())
}

async fn run(deps: Deps, stages: &str, callback_listen: String) -> anyhow::Result<()> {
    let wanted: Vec<&str> = if stages == "all" {
        STAGES.to_vec()
    } else {
        stages.split(',').map(str::trim).collect()
    };
    for s in &wanted {
        if !STAGES.contains(s) {
            bail!("unknown stage {s:?}; stages are {}", STAGES.join(", "));
        }
    }
    let shutdown = herald_core::shutdown::on_signals();
    herald_core::cli::setup_when_ready(&deps)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    herald_core::memory::spawn_trimmer(std::time::Duration::from_secs(2), shutdown.clone());
    let tracker = tokio_util::task::TaskTracker::new();
    let failed = CancellationToken::new();
    let spawn = |name: &'static str,
                 fut: futures::future::BoxFuture<'static, Result<(), String>>| {
        let (failed, shutdown) = (failed.clone(), shutdown.clone());
        tracker.spawn(async move {
            if let Err(e) = fut.await {
                error!(stage = name, error = %e, "stage failed; stopping");
                failed.cancel();
                shutdown.cancel();
            }
        });
    };
    let d = deps.clone();
    let sd = shutdown.clone();
    spawn(
        "admin",
        Box::pin(async move {
            herald_core::cli::serve_admin(d, sd)
                .await
                .map_err(|e| e.to_string())
        }),
    );
    for s in wanted {
        let (d, sd) = (deps.clone(), shutdown.clone());
        let cl = callback_listen.clone();
        let fut: futures::future::BoxFuture<'static, Result<(), String>> = match s {
            "accept" => {
                Box::pin(async move { herald_accept::run(d, sd).await.map_err(|e| e.to_string()) })
            }
            "render" => {
                Box::pin(async move { herald_render::run(d, sd).await.map_err(|e| e.to_string()) })
            }
            "route" => {
                Box::pin(async move { herald_route::run(d, sd).await.map_err(|e| e.to_string()) })
            }
            "send" => {
                Box::pin(async move { herald_send::run(d, sd).await.map_err(|e| e.to_string()) })
            }
            "delay" => {
                Box::pin(async move { herald_delay::run(d, sd).await.map_err(|e| e.to_string()) })
            }
            "notify" => {
                Box::pin(async move { herald_notify::run(d, sd).await.map_err(|e| e.to_string()) })
            }
            "projector" => Box::pin(async move {
                herald_projector::run(d, sd)
                    .await
                    .map_err(|e| e.to_string())
            }),
            "api" => {
                Box::pin(async move { herald_api::run(d, sd).await.map_err(|e| e.to_string()) })
            }
            "console" => {
                Box::pin(async move { herald_console::run(d, sd).await.map_err(|e| e.to_string()) })
            }
            _ => Box::pin(async move {
                herald_callback::run(d, cl, sd)
                    .await
                    .map_err(|e| e.to_string())
            }),
        };
        spawn(s_static(s), fut);
    }
    tracker.close();
    shutdown.cancelled().await;
    info!("draining");
    if tokio::time::timeout(Duration::from_secs(8), tracker.wait())
        .await
        .is_err()
    {
        bail!("stages did not drain within 8 s");
    }
    if failed.is_cancelled() {
        bail!("a stage failed");
    }
    info!("stopped cleanly");
    Ok(())
}

fn s_static(s: &str) -> &'static str {
    STAGES.iter().find(|x| **x == s).copied().unwrap_or("stage")
}

async fn demo(deps: &Deps, args: DemoArgs) -> anyhow::Result<()> {
    let DemoArgs {
        count,
        channel,
        to,
        template,
        app,
        batch,
        rate,
        recipients,
        delay_ms,
    } = args;
    let per = recipients.max(1);
    let channel = Channel::parse(&channel).with_context(|| format!("unknown channel {channel}"))?;
    setup(deps).await?;
    let publisher = deps.transport.publisher()?;
    // Paced: a slice of the rate every 50 ms, each request stamped when its slice goes out.
    let chunk = if rate > 0 {
        (rate / 20).max(1)
    } else {
        batch.max(1)
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    let mut i = 0;
    while i < count {
        if rate > 0 {
            tick.tick().await;
        }
        let mut pending: Vec<OutRecord> = Vec::with_capacity(chunk);
        for i in i..(i + chunk).min(count) {
            let request_id = random_id();
            let now = now_ms();
            let req = SendRequested {
                request_id: request_id.clone(),
                app_id: app.clone(),
                idempotency_key: None,
                channel,
                template: (!template.is_empty()).then(|| template.clone()),
                params: [
                    ("name".to_owned(), format!("user {i}")),
                    ("product".to_owned(), "Herald".to_owned()),
                ]
                .into(),
                recipients: (0..per)
                    .map(|j| Recipient {
                        address: to.replace("{i}", &(i * per + j).to_string()),
                        params: Default::default(),
                        timezone: None,
                    })
                    .collect(),
                content: template.is_empty().then(|| Content {
                    subject: Some("Hello".into()),
                    text: Some(format!("Hello from Herald #{i}")),
                    ..Default::default()
                }),
                send_at: (delay_ms > 0).then_some(now + delay_ms),
                priority: Priority::Normal,
                expires_at: None,
                metadata: [("sent_ms".to_owned(), (now + delay_ms.max(0)).to_string())].into(),
                requested_at: now,
            };
            pending.push(
                record(
                    &deps.codec,
                    topics::REQUESTS,
                    &request_id,
                    &random_id(),
                    &req,
                )
                .await?,
            );
            println!(
                "{} {}",
                request_id,
                herald_core::util::message_id(&app, &request_id, 0)
            );
        }
        i += pending.len();
        publisher.publish(pending).await?;
    }
    Ok(())
}

async fn api_get(deps: &Deps, path: &str, app: &str) -> anyhow::Result<()> {
    let secret = deps
        .config
        .apps
        .iter()
        .find(|a| a.id == app)
        .map(|a| a.secret.clone())
        .with_context(|| format!("app {app} is not configured"))?;
    let ts = (now_ms() / 1000).to_string();
    let nonce = random_id();
    let sig = herald_api::auth::sign(&secret, "GET", path, &ts, &nonce, b"");
    let url = format!("http://{}{path}", deps.config.api.listen);
    let resp = reqwest::Client::new()
        .get(&url)
        .header("X-Herald-App", app)
        .header("X-Herald-Timestamp", ts)
        .header("X-Herald-Nonce", nonce)
        .header("X-Herald-Signature", sig)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    println!("{}", resp.text().await?);
    if !status.is_success() {
        bail!("HTTP {status}");
    }
    Ok(())
}

fn main() {
    // A render child (see herald_render::sandbox) serves renders and exits here.
    herald_render::sandbox::serve_if_child();
    // Before any thread exists (the runtime's workers would each take a malloc arena).
    herald_core::memory::limit_arenas();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herald: tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async_main());
}

async fn async_main() {
    telemetry::init_tracing();
    let cli = Cli::parse();
    let result = async {
        if let Cmd::Console {
            cmd: ConsoleCmd::HashPassword,
        } = cli.cmd
        {
            let mut password = String::new();
            std::io::stdin().read_line(&mut password)?;
            let password = password.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(
                password.len() >= 12,
                "use a password of at least 12 characters"
            );
            println!(
                "{}",
                herald_console::hash_password(password).map_err(anyhow::Error::msg)?
            );
            return Ok(());
        }
        let cfg = Config::load(cli.config.as_deref(), &herald_providers::REGISTRY)?;
        if let Cmd::Config {
            cmd: ConfigCmd::Validate,
        } = cli.cmd
        {
            println!(
                "config OK: {} apps, {} providers, {} templates",
                cfg.apps.len(),
                cfg.providers.len(),
                cfg.templates.len()
            );
            return Ok(());
        }
        telemetry::metrics_handle();
        // Flushed (bounded) when the command ends.
        let _exporting = herald_core::trace::install(&cfg.tracing).map_err(anyhow::Error::msg)?;
        let deps = Deps::new(cfg)?;
        match cli.cmd {
            Cmd::Run {
                stages,
                callback_listen,
            } => run(deps, &stages, callback_listen).await,
            Cmd::Setup => setup(&deps).await,
            Cmd::Demo(args) => demo(&deps, args).await,
            Cmd::Config { .. } => Ok(()),
            Cmd::Get { path, app } => api_get(&deps, &path, &app).await,
            Cmd::Rebuild => rebuild(&deps).await,
            Cmd::Dlq { cmd } => dlq(&deps, cmd).await,
            Cmd::Console { .. } => Ok(()),
        }
    }
    .await;
    if let Err(e) = result {
        eprintln!("herald: {e:#}");
        std::process::exit(1);
    }
}
