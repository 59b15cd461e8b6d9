//! Shared helpers for the integration tests. They run against the real stack started by
//! `scripts/stack up` (Kafka, Apicurio, PostgreSQL, Redis, SMTP); `scripts/test` exports the
//! addresses below.

pub mod otlp;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::codec::{Codec, RegistryResolver};
use herald_core::transport::Transport;
use herald_core::transport::kafka::{KafkaSettings, KafkaTransport};
use herald_core::transport::redis::{RedisSettings, RedisTransport};
use herald_core::util::now_ms;
use herald_core::worker::record;
use herald_schemas::{SendRequested, topics};

pub fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

pub fn brokers() -> String {
    env("HERALD_KAFKA_BROKERS", "127.0.0.1:9092")
}

pub fn registry() -> String {
    env(
        "HERALD_REGISTRY_URL",
        "http://127.0.0.1:8081/apis/ccompat/v7",
    )
}

pub fn postgres() -> String {
    env(
        "HERALD_POSTGRES_URL",
        "host=127.0.0.1 port=55432 user=herald dbname=herald",
    )
}

pub fn redis_url() -> String {
    env("HERALD_REDIS_URL", "redis://127.0.0.1:56379")
}

pub fn maildir() -> PathBuf {
    PathBuf::from(env(
        "HERALD_MAILDIR",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../.stack/mail"),
    ))
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid_like())
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:x}{:x}{:x}",
        t,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Mails at the SMTP server whose Message-ID is one of ours: (count, last text) per message id.
pub fn mails_for(ids: &[String]) -> std::collections::HashMap<String, (usize, String)> {
    let wanted: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut out: std::collections::HashMap<String, (usize, String)> =
        std::collections::HashMap::new();
    for dir in ["new", "cur"] {
        let Ok(entries) = std::fs::read_dir(maildir().join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            let id = text
                .lines()
                .take_while(|l| !l.is_empty())
                .find(|l| l.to_ascii_lowercase().starts_with("message-id:"))
                .and_then(|l| l.split_once('<'))
                .and_then(|(_, rest)| rest.split_once("@herald>"))
                .map(|(id, _)| id.trim().to_owned());
            if let Some(id) = id.filter(|id| wanted.contains(id.as_str())) {
                let entry = out.entry(id).or_insert((0, String::new()));
                entry.0 += 1;
                entry.1 = text;
            }
        }
    }
    out
}

/// The `herald` binary built by `cargo build -p herald` (scripts/test builds it first).
pub fn herald_bin() -> PathBuf {
    std::env::var("HERALD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/debug/herald"
            ))
        })
}

/// A running `herald run` process, killed on drop.
pub struct Herald {
    pub child: Child,
}

impl Herald {
    pub fn start(config: &std::path::Path, envs: &[(&str, String)]) -> Herald {
        Herald::start_with(config, envs, &[], "")
    }

    /// With extra `run` arguments (e.g. `--stages route`) and a log-file suffix.
    pub fn start_with(
        config: &std::path::Path,
        envs: &[(&str, String)],
        run_args: &[&str],
        log_suffix: &str,
    ) -> Herald {
        let bin = herald_bin();
        assert!(
            bin.exists(),
            "{} missing: run `cargo build -p herald` first",
            bin.display()
        );
        let log = std::fs::File::create(config.with_extension(format!("{log_suffix}log")))
            .expect("log file");
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(config)
            .arg("run")
            .args(run_args)
            // tracing writes to stdout: keep both streams in the log.
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Herald {
            child: cmd.spawn().expect("spawn herald"),
        }
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits for exit; the exit code, or None after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// --- Herald process, publishing and signed API reads, shared by the pipeline tests ----------

pub const SECRET: &str = "pipeline-test-secret";
/// The server secret Herald runs with in tests (`HERALD_SERVER_SECRET`).
pub const SERVER_SECRET: &str = "test-server-secret-0123456789";

/// The secret receipts to the `smtp-local` and `webhook-sim` callbacks are signed with
/// (`HERALD_CALLBACK_SECRET`): never the one Herald signs outgoing webhooks with.
pub const CALLBACK_SECRET: &str = "whsec_aGVyYWxkLXRlc3QtY2FsbGJhY2stc2VjcmV0LTAxMjM=";

pub fn config_path() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/herald.toml"))
}

pub fn herald_env(api: u16, admin: u16) -> Vec<(&'static str, String)> {
    vec![
        ("HERALD_KAFKA_BROKERS", brokers()),
        ("HERALD_REGISTRY_URL", registry()),
        ("HERALD_POSTGRES_URL", postgres()),
        ("HERALD_REDIS_URL", redis_url()),
        ("HERALD_API_LISTEN", format!("127.0.0.1:{api}")),
        ("HERALD_ADMIN_LISTEN", format!("127.0.0.1:{admin}")),
        ("HERALD_CALLBACK_LISTEN", format!("127.0.0.1:{}", api + 1)),
        ("HERALD_APP_DEMO_SECRET", SECRET.to_owned()),
        ("HERALD_SERVER_SECRET", SERVER_SECRET.to_owned()),
        (
            "HERALD_WEBHOOK_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned(),
        ),
        ("HERALD_CALLBACK_SECRET", CALLBACK_SECRET.to_owned()),
        ("HERALD_INSTANCE", unique("it")),
        ("RUST_LOG", "info,rdkafka=warn".to_owned()),
    ]
    .into_iter()
    // The provider simulators' credentials, which ops/herald.toml names.
    .chain(
        herald_simulators::CREDENTIALS
            .iter()
            .map(|(k, _)| (*k, herald_simulators::credential(k))),
    )
    .collect()
}

/// When a message's timeline first reached `status` (Unix ms), from `GET /v1/messages/{id}`.
pub fn event_at(message: &serde_json::Value, status: &str) -> Option<i64> {
    message["timeline"]
        .as_array()?
        .iter()
        .find(|e| e["status"] == status)?["at"]
        .as_i64()
}

/// The provider simulators started by `scripts/stack`.
pub fn sim_url() -> String {
    env("HERALD_SIM_URL", "http://127.0.0.1:18100")
}

/// A signed JSON request to the API, as the demo app.
pub fn signed(method: &str, path: &str, body: &[u8], api: u16) -> reqwest::RequestBuilder {
    signed_as("demo", SECRET, method, path, body, api)
}

/// A signed JSON request to the API, as `app` with `secret`.
pub fn signed_as(
    app: &str,
    secret: &str,
    method: &str,
    path: &str,
    body: &[u8],
    api: u16,
) -> reqwest::RequestBuilder {
    signed_with(
        &reqwest::Client::new(),
        app,
        secret,
        method,
        path,
        body,
        api,
    )
}

/// [`signed_as`] on a given client (building one loads the system's certificates: a long-lived
/// caller keeps one).
pub fn signed_with(
    client: &reqwest::Client,
    app: &str,
    secret: &str,
    method: &str,
    path: &str,
    body: &[u8],
    api: u16,
) -> reqwest::RequestBuilder {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let req = client.request(m, format!("http://127.0.0.1:{api}{path}"));
    sign_headers(req, app, secret, method, path, body).body(body.to_vec())
}

/// Adds the gateway's signature headers (a fresh nonce, now) for `body` to a request.
pub fn sign_headers(
    req: reqwest::RequestBuilder,
    app: &str,
    secret: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> reqwest::RequestBuilder {
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};
    let ts = (now_ms() / 1000).to_string();
    let nonce = unique("n");
    let sts = format!(
        "{method}\n{path}\n{ts}\n{nonce}\n{}",
        hex::encode(Sha256::digest(body))
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(sts.as_bytes());
    req.header("content-type", "application/json")
        .header("X-Herald-App", app)
        .header("X-Herald-Timestamp", ts)
        .header("X-Herald-Nonce", nonce)
        .header(
            "X-Herald-Signature",
            hex::encode(mac.finalize().into_bytes()),
        )
}

pub async fn publish_on(kind: &str, reqs: &[SendRequested]) {
    publish_records(kind, encode_requests(reqs).await).await;
}

/// Send requests as records for `herald.requests.v1`, encoded through the registry.
pub async fn encode_requests(reqs: &[SendRequested]) -> Vec<herald_core::transport::OutRecord> {
    let codec = Codec::new(Arc::new(RegistryResolver::new(&registry()).unwrap()));
    let mut recs = Vec::new();
    for r in reqs {
        recs.push(
            record(&codec, topics::REQUESTS, &r.request_id, "trace-it", r)
                .await
                .expect("encode through the registry"),
        );
    }
    recs
}

/// Publishes encoded records (the registry is not needed any more).
pub async fn publish_records(kind: &str, recs: Vec<herald_core::transport::OutRecord>) {
    let transport: Box<dyn Transport> = if kind == "redis" {
        Box::new(RedisTransport::new(RedisSettings::new(redis_url())).unwrap())
    } else {
        Box::new(KafkaTransport::new(KafkaSettings::new(brokers())))
    };
    // The herald process creates them too; on a fresh broker the test may get there first.
    transport
        .ensure_topics(&herald_core::runtime::all_topics(4))
        .await
        .expect("topics");
    transport
        .publisher()
        .unwrap()
        .publish(recs)
        .await
        .expect("publish");
}

pub fn signed_get(path: &str, api: u16) -> reqwest::RequestBuilder {
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};
    let ts = (now_ms() / 1000).to_string();
    let nonce = unique("n");
    let sts = format!(
        "GET\n{path}\n{ts}\n{nonce}\n{}",
        hex::encode(Sha256::digest(b""))
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(sts.as_bytes());
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{api}{path}"))
        .header("X-Herald-App", "demo")
        .header("X-Herald-Timestamp", ts)
        .header("X-Herald-Nonce", nonce)
        .header(
            "X-Herald-Signature",
            hex::encode(mac.finalize().into_bytes()),
        )
}

/// A signed read of the API as JSON; `None` on any transport or decode problem (callers poll).
pub async fn api_json_as(
    app: &str,
    secret: &str,
    path: &str,
    api: u16,
) -> Option<serde_json::Value> {
    signed_as(app, secret, "GET", path, b"", api)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

pub async fn api_json(path: &str, api: u16) -> Option<serde_json::Value> {
    signed_get(path, api).send().await.ok()?.json().await.ok()
}

/// Waits (up to 60 s) for a started Herald's API to answer.
pub async fn api_up(api: u16) {
    eventually(Duration::from_secs(60), "the API answers", || async move {
        reqwest::get(format!("http://127.0.0.1:{api}/health"))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

/// `POST /v1/messages` as the demo app, which must answer 202; the first message id.
pub async fn send_message(api: u16, body: &serde_json::Value) -> String {
    let bytes = serde_json::to_vec(body).unwrap();
    let resp = signed("POST", "/v1/messages", &bytes, api)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202, "POST /v1/messages");
    let v: serde_json::Value = resp.json().await.unwrap();
    v["message_ids"][0].as_str().unwrap().to_owned()
}

/// Waits (up to 90 s) until the read API shows message `id` in `status`.
pub async fn await_status(api: u16, id: &str, status: &str) {
    eventually(Duration::from_secs(90), status, || async move {
        let v = api_json(&format!("/v1/messages/{id}"), api).await?;
        (v["status"] == status).then_some(())
    })
    .await;
}

/// An `application/x-www-form-urlencoded` body (every byte but `[A-Za-z0-9-_.~]` escaped).
pub fn form_body(pairs: &[(&str, &str)]) -> String {
    let enc = |v: &str| -> String {
        v.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// An argon2id hash of `password` made by `herald console hash-password` (for
/// `[[console.operators]]` in tests).
pub fn console_hash(password: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(herald_bin())
        .args(["console", "hash-password"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("herald console hash-password");
    writeln!(child.stdin.take().expect("stdin"), "{password}").expect("password written");
    let out = child.wait_with_output().expect("hash-password ends");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}
