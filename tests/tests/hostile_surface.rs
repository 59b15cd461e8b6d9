//! Hostile input against the surface added after the first hostile suite (issue 23): the
//! console's template preview, the template store, slow clients on every listener. Each case
//! is tried against a Herald on the real stack the way an attacker would, and is followed by a
//! normal message that must still be delivered.

use std::time::{Duration, Instant};

use herald_tests::*;
use serde_json::json;

const ADMIN_PASSWORD: &str = "admin-password-for-hostile-tests";

/// One Herald at a time (they share the stage groups).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn hash(password: &str) -> String {
    console_hash(password)
}

struct Run {
    api: u16,
    admin: u16,
    console: u16,
    herald: Herald,
    http: reqwest::Client,
}

impl Run {
    /// A Herald with its console, configured by `edit` (applied to ops/herald.toml's text).
    async fn start(name: &str, (api, admin, console): (u16, u16, u16), edit: &str) -> Run {
        let cfg = std::env::temp_dir().join(format!("herald-hostile-surface-{name}.toml"));
        let mut text = std::fs::read_to_string(config_path()).unwrap();
        text.push_str(edit);
        std::fs::write(&cfg, text).unwrap();
        let mut env = herald_env(api, admin);
        env.push(("HERALD_CONSOLE_LISTEN", format!("127.0.0.1:{console}")));
        env.push(("HERALD_CONSOLE_ADMIN_HASH", hash(ADMIN_PASSWORD)));
        env.push(("HERALD_CONSOLE_VIEWER_HASH", hash("viewer-unused-here")));
        let herald = Herald::start(&cfg, &env);
        api_up(api).await;
        let run = Run {
            api,
            admin,
            console,
            herald,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        };
        eventually(Duration::from_secs(60), "the console answers", || async {
            run.http
                .get(run.url("/health"))
                .send()
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        run
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.console)
    }

    /// Logs in as the admin: (session cookie, CSRF token).
    async fn login(&self) -> (String, String) {
        let r = self
            .http
            .post(self.url("/login"))
            .header("Origin", self.url(""))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_body(&[
                ("name", "admin"),
                ("password", ADMIN_PASSWORD),
            ]))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_redirection(), "login: {}", r.status());
        let cookie = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| v.split(';').next().filter(|c| c.contains('=')))
            .expect("a session cookie")
            .to_owned();
        let page = self
            .http
            .get(self.url("/templates/welcome"))
            .header("Cookie", &cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let csrf = page
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .expect("the page's CSRF token")
            .to_owned();
        (cookie, csrf)
    }

    /// Previews `text` with `params` (JSON) in the console: the HTML fragment answered.
    async fn preview(&self, session: &(String, String), text: &str, params: &str) -> String {
        let r = self
            .http
            .post(self.url("/templates/hostile/preview"))
            .header("Cookie", &session.0)
            .header("Origin", self.url(""))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_body(&[
                ("csrf", session.1.as_str()),
                ("app", ""),
                ("channel", "EMAIL"),
                ("subject", "Preview"),
                ("text", text),
                ("html", ""),
                ("markdown", ""),
                ("params", params),
            ]))
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "preview answered");
        r.text().await.unwrap()
    }

    /// A normal e-mail through the gateway, delivered.
    async fn still_delivers(&self, what: &str) {
        let body = json!({"channel": "EMAIL", "template": "welcome",
            "params": {"name": "Ada", "product": "Herald"},
            "recipients": [{"address": format!("{}@example.com", unique(what))}]});
        let id = send_message(self.api, &body).await;
        await_status(self.api, &id, "delivered").await;
    }

    /// The Herald process's peak resident memory (VmHWM), in bytes.
    fn peak_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.herald.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM")
            * 1024
    }

    fn stop(mut self) {
        self.herald.signal("TERM");
        assert!(self.herald.wait_exit(Duration::from_secs(20)).is_some());
    }
}

/// Twenty-two assignments, each doubling the last: 4 GiB from a 1 KiB parameter.
fn doubling() -> String {
    let mut src = "{% set v0 = blob %}".to_owned();
    for i in 1..=22 {
        src.push_str(&format!("{{% set v{i} = v{} ~ v{} %}}", i - 1, i - 1));
    }
    src.push_str("{{ v22 | length }}");
    src
}

/// Finding 1: a console preview renders in the render stage's memory-limited child, never in
/// Herald's process. A template that doubles a string into gigabytes kills only that child
/// (the preview says so), Herald's own peak memory stays where it was, the child is started
/// again for the next preview, and messages are still delivered.
#[tokio::test(flavor = "multi_thread")]
async fn a_console_preview_of_a_hostile_template_exhausts_only_the_render_child() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::start("preview", (18_610, 19_610, 18_615), "").await;
    let session = run.login().await;

    let ok = run
        .preview(&session, "Hi {{ name }}", r#"{"name": "<b>Ann</b>"}"#)
        .await;
    assert!(
        ok.contains("id=\"preview-text\">Hi &lt;b&gt;Ann&lt;/b&gt;<"),
        "{ok}"
    );
    let missing = run.preview(&session, "Hi {{ name }}", "{}").await;
    assert!(missing.contains("id=\"preview-error\""), "{missing}");

    let before = run.peak_rss();
    let started = Instant::now();
    let params = json!({"blob": "x".repeat(1024)}).to_string();
    let bomb = run.preview(&session, &doubling(), &params).await;
    assert!(
        bomb.contains("id=\"preview-error\"") && bomb.contains("render_resource_limit"),
        "{bomb}"
    );
    let grown = run.peak_rss().saturating_sub(before);
    println!(
        "hostile preview: answered in {:.1} s, Herald's peak RSS grew {} MiB",
        started.elapsed().as_secs_f64(),
        grown >> 20
    );
    assert!(
        grown < 256 << 20,
        "Herald's own peak memory grew {} MiB: the preview rendered in-process",
        grown >> 20
    );
    assert!(
        run.herald.child.try_wait().unwrap().is_none(),
        "Herald still runs"
    );
    // The next preview gets a new child.
    let again = run
        .preview(&session, "Hello {{ name }}", r#"{"name": "Bo"}"#)
        .await;
    assert!(again.contains("Hello Bo"), "{again}");
    run.still_delivers("after-preview").await;
    let _ = run.admin;
    run.stop();
}

/// Sends a request's headers (declaring a 200-byte body) to `port`, then trickles its body a
/// byte every 300 ms for up to 8 s: the raw answer and when it came.
async fn trickle(port: u16, path: &str, content_type: &str) -> (String, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let started = Instant::now();
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n\
             Content-Length: 200\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        for _ in 0..27 {
            if wr.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut answer)).await;
    let took = started.elapsed();
    writer.abort();
    (String::from_utf8_lossy(&answer).into_owned(), took)
}

/// Finding 7: no listener lets a client hold a connection by trickling its body. The gateway,
/// the provider-callback listener and the console each answer a body still arriving after
/// `body_read_timeout_ms` (1 s here) with 408 `body_timeout` and close the connection, long
/// before the trickle would have ended; then a normal message is delivered.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_trickled_a_byte_at_a_time_is_cut_off_on_every_listener() {
    let _serial = SERIAL.lock().await;
    let (api, admin, console) = (18_620, 19_620, 18_625);
    // The body bound from the config, shortened for the test.
    let cfg_text = std::fs::read_to_string(config_path()).unwrap().replacen(
        "[api]\n",
        "[api]\nbody_read_timeout_ms = 1000\n",
        1,
    );
    assert!(
        cfg_text.contains("body_read_timeout_ms = 1000"),
        "config layout changed"
    );
    let cfg = std::env::temp_dir().join("herald-hostile-surface-slow.toml");
    std::fs::write(&cfg, cfg_text).unwrap();
    let mut env = herald_env(api, admin);
    env.push(("HERALD_CONSOLE_LISTEN", format!("127.0.0.1:{console}")));
    env.push(("HERALD_CONSOLE_ADMIN_HASH", hash(ADMIN_PASSWORD)));
    env.push(("HERALD_CONSOLE_VIEWER_HASH", hash("viewer-unused-here")));
    let mut herald = Herald::start(&cfg, &env);
    api_up(api).await;
    eventually(
        Duration::from_secs(60),
        "the console answers",
        || async move {
            reqwest::get(format!("http://127.0.0.1:{console}/health"))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    let token = herald_simulators::credential("HERALD_SIM_CALLBACK_TOKEN");
    for (port, path, content_type) in [
        (api, "/v1/messages".to_owned(), "application/json"),
        (
            api + 1,
            format!("/callbacks/aliyun-sim/{token}"),
            "application/json",
        ),
        (
            console,
            "/login".to_owned(),
            "application/x-www-form-urlencoded",
        ),
    ] {
        let (answer, took) = trickle(port, &path, content_type).await;
        println!("trickled body to :{port}{path}: answered in {took:?}");
        assert!(answer.starts_with("HTTP/1.1 408"), "{port}{path}: {answer}");
        assert!(answer.contains("body_timeout"), "{port}{path}: {answer}");
        assert!(took < Duration::from_secs(5), "{port}{path}: held {took:?}");
    }
    let body = json!({"channel": "EMAIL", "template": "welcome",
        "params": {"name": "Ada", "product": "Herald"},
        "recipients": [{"address": format!("{}@example.com", unique("after-slow"))}]});
    let id = send_message(api, &body).await;
    await_status(api, &id, "delivered").await;
    herald.signal("TERM");
    assert!(herald.wait_exit(Duration::from_secs(20)).is_some());
}

/// Finding 2: the template store is bounded. A template over `max_bytes` is refused (413
/// `template_too_large`), only the newest `versions_kept` versions of a code are kept, an app
/// cannot own more than `codes_per_app` codes (409 `too_many_templates`), and storing is rate
/// limited per app (429 with `Retry-After`). The newest version still renders a message, and a
/// normal message is delivered after all of it.
#[tokio::test(flavor = "multi_thread")]
async fn the_template_store_is_bounded_in_size_versions_codes_and_rate() {
    let _serial = SERIAL.lock().await;
    let app = unique("tstore").replace('-', "_");
    let secret = "template-store-app-secret-1";
    let edit = format!(
        "\n[template_store]\nmax_bytes = 4096\nversions_kept = 3\ncodes_per_app = 4\nputs_per_minute = 20\n\
         \n[[apps]]\nid = \"{app}\"\nsecret_env = \"HERALD_APP_TSTORE_SECRET\"\n"
    );
    let cfg = std::env::temp_dir().join("herald-hostile-surface-store.toml");
    let mut text = std::fs::read_to_string(config_path()).unwrap();
    text.push_str(&edit);
    std::fs::write(&cfg, text).unwrap();
    let (api, admin) = (18_630, 19_630);
    let mut env = herald_env(api, admin);
    env.push(("HERALD_APP_TSTORE_SECRET", secret.to_owned()));
    let mut herald = Herald::start(&cfg, &env);
    api_up(api).await;
    let put = |code: String, text: String| {
        let app = app.clone();
        async move {
            let body = serde_json::to_vec(&json!({"channel": "EMAIL", "subject": "S",
                "text": text}))
            .unwrap();
            let r = signed_as(
                &app,
                secret,
                "PUT",
                &format!("/v1/templates/{code}"),
                &body,
                api,
            )
            .send()
            .await
            .unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            (status, v, retry)
        }
    };

    // Too large: refused with its size, nothing stored.
    let (status, v, _) = put("big".into(), "x".repeat(8 * 1024)).await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["error"]["code"], "template_too_large", "{v}");

    // Six versions of one code: the newest three are kept, the newest renders.
    for i in 1..=6 {
        let (status, v, _) = put("kept".into(), format!("version {i} for {{{{ name }}}}")).await;
        assert_eq!(status, 201, "{v}");
        assert_eq!(v["version"], i, "{v}");
    }
    let db = herald_core::runtime::connect_postgres(&postgres())
        .await
        .unwrap();
    let versions: Vec<i32> = db
        .query(
            "SELECT version FROM templates WHERE app_id = $1 AND code = 'kept' ORDER BY version",
            &[&app],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [4, 5, 6]);
    let body = serde_json::to_vec(&json!({"channel": "EMAIL", "template": "kept",
        "params": {"name": "Ada"},
        "recipients": [{"address": format!("{}@example.com", unique("kept"))}]}))
    .unwrap();
    let r = signed_as(&app, secret, "POST", "/v1/messages", &body, api)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let id = r.json::<serde_json::Value>().await.unwrap()["message_ids"][0]
        .as_str()
        .unwrap()
        .to_owned();
    eventually(
        Duration::from_secs(90),
        "the newest version renders",
        || {
            let (app, id) = (app.clone(), id.clone());
            async move {
                let r = signed_as(&app, secret, "GET", &format!("/v1/messages/{id}"), b"", api)
                    .send()
                    .await
                    .ok()?;
                let v: serde_json::Value = r.json().await.ok()?;
                (v["status"] == "delivered").then_some(())
            }
        },
    )
    .await;
    let row: Option<i32> = db
        .query_one(
            "SELECT template_version FROM messages WHERE message_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(row, Some(6), "rendered with the newest version");

    // Codes per app: four in all ("kept" and three more), the fifth refused.
    for c in ["c1", "c2", "c3"] {
        let (status, v, _) = put(c.into(), "Hello".into()).await;
        assert_eq!(status, 201, "{v}");
    }
    let (status, v, _) = put("c4".into(), "Hello".into()).await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "too_many_templates", "{v}");
    // A new version of a code the app has is still fine.
    assert_eq!(put("c1".into(), "Hello again".into()).await.0, 201);

    // The rate: 20 a minute, of which 12 are spent; the rest go, then 429 with Retry-After.
    let mut limited = None;
    for i in 0..20 {
        let (status, v, retry) = put("c2".into(), format!("Hello {i}")).await;
        if status == 429 {
            assert_eq!(v["error"]["code"], "rate_limited", "{v}");
            limited = retry;
            break;
        }
        assert_eq!(status, 201, "{v}");
    }
    let retry: u64 = limited.expect("429 within the minute").parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");

    let body = json!({"channel": "EMAIL", "template": "welcome",
        "params": {"name": "Ada", "product": "Herald"},
        "recipients": [{"address": format!("{}@example.com", unique("after-store"))}]});
    let id = send_message(api, &body).await;
    await_status(api, &id, "delivered").await;
    herald.signal("TERM");
    assert!(herald.wait_exit(Duration::from_secs(20)).is_some());
}

/// Finding 8: ops/herald.toml verifies receipts with a secret of its own, and `herald config
/// validate` refuses a callback secret equal to a secret Herald signs outgoing webhooks with
/// (every receiver of those webhooks could forge receipts for any message).
#[test]
fn a_callback_secret_shared_with_outgoing_webhooks_is_refused() {
    let validate = |callback: &str| {
        let mut cmd = std::process::Command::new(herald_bin());
        cmd.arg("-c")
            .arg(config_path())
            .args(["config", "validate"])
            .envs(herald_env(18_640, 19_640))
            .env("HERALD_CALLBACK_SECRET", callback);
        cmd.output().expect("herald config validate")
    };
    let ok = validate(CALLBACK_SECRET);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let webhook = herald_env(18_640, 19_640)
        .into_iter()
        .find(|(k, _)| *k == "HERALD_WEBHOOK_SECRET")
        .map(|(_, v)| v)
        .unwrap();
    let shared = validate(&webhook);
    assert!(!shared.status.success(), "a shared secret was accepted");
    let text = String::from_utf8_lossy(&shared.stderr).into_owned()
        + &String::from_utf8_lossy(&shared.stdout);
    assert!(
        text.contains("callback_secret is the secret providers.webhook-sim signs"),
        "{text}"
    );
}

/// Finding 11: dead device tokens page by a unique cursor. Five tokens marked in the same
/// microsecond, read two at a time: every one comes exactly once (paging by `since` = the last
/// `at` skipped the ones sharing its millisecond). A cursor that is not one is a 400.
#[tokio::test(flavor = "multi_thread")]
async fn dead_device_tokens_page_without_skipping_tokens_that_share_a_time() {
    let _serial = SERIAL.lock().await;
    let (api, admin) = (18_650, 19_650);
    let cfg = std::env::temp_dir().join("herald-hostile-surface-tokens.toml");
    std::fs::copy(config_path(), &cfg).unwrap();
    let mut herald = Herald::start(&cfg, &herald_env(api, admin));
    api_up(api).await;
    let db = herald_core::runtime::connect_postgres(&postgres())
        .await
        .unwrap();
    // A time of their own, far ahead of any other test's marks.
    let year = 2090 + (herald_core::util::now_ms() % 50) as i32;
    let tag = unique("tok");
    let mut want: Vec<String> = (0..5).map(|i| format!("{tag}-{i}")).collect();
    for t in &want {
        db.execute(
            "INSERT INTO dead_device_tokens (app_id, channel, token, provider, reason_code, message_id, at)
             VALUES ('demo', 'PUSH', $1, 'fcm-sim', 'UNREGISTERED', 'm', make_timestamptz($2, 1, 1, 0, 0, 0.123456))",
            &[t, &year],
        )
        .await
        .unwrap();
    }
    let since = (year as i64 - 1970) * 365 * 86_400_000;
    let mut got = Vec::new();
    let mut path = format!("/v1/device-tokens/dead?since={since}&limit=2");
    for _ in 0..10 {
        let v = api_json(&path, api).await.expect("a page");
        for t in v["tokens"].as_array().unwrap() {
            got.push(t["token"].as_str().unwrap().to_owned());
        }
        match v["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/device-tokens/dead?cursor={c}&limit=2"),
            None => break,
        }
    }
    got.sort();
    want.sort();
    assert_eq!(got, want, "every token once");
    let r = signed_get("/v1/device-tokens/dead?cursor=not-a-cursor", api)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_cursor", "{v}");
    db.execute(
        "DELETE FROM dead_device_tokens WHERE token LIKE $1",
        &[&format!("{tag}-%")],
    )
    .await
    .unwrap();
    herald.signal("TERM");
    assert!(herald.wait_exit(Duration::from_secs(20)).is_some());
}

/// Finding 9: the dead-letter topic is public, so a redrive trusts neither a dead letter's
/// `source_topic` nor its payload. A forged letter that names a topic its stage does not read
/// (accept → a dispatch topic) is refused, and so is one whose payload is no message Herald
/// accepted for its app (send → a dispatch topic, bytes of the forger's choosing); nothing is
/// published. (The console test redrives a real dead letter of accept's.)
#[test]
fn a_forged_dead_letter_is_not_redriven() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt
        .block_on(herald_core::runtime::connect_postgres(&postgres()))
        .unwrap();
    let forge = |stage: &str, topic: &str| {
        let id = unique("forged");
        rt.block_on(db.execute(
            "INSERT INTO dead_letters (event_id, at, stage, source_topic, source_partition, \
             source_offset, record_key, payload, reason_code, reason_message, message_id, request_id) \
             VALUES ($1, now(), $2, $3, 0, 0, NULL, $4, 'x', 'forged', NULL, NULL)",
            &[&id, &stage, &topic, &b"\x00\x00\x00\x00\x01forged bytes".to_vec()],
        ))
        .unwrap();
        id
    };
    let redrive = |id: &str| {
        let out = std::process::Command::new(herald_bin())
            .arg("-c")
            .arg(config_path())
            .args(["dlq", "redrive", id, "--operator", "hostile-test"])
            .envs(herald_env(18_660, 19_660))
            .output()
            .expect("herald dlq redrive");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout),
        )
    };
    let wrong_topic = forge("accept", "herald.dispatch.sms");
    let (ok, text) = redrive(&wrong_topic);
    assert!(!ok, "{text}");
    assert!(
        text.contains("which its stage accept does not read"),
        "{text}"
    );
    let not_ours = forge("send", "herald.dispatch.sms");
    let (ok, text) = redrive(&not_ours);
    assert!(!ok, "{text}");
    assert!(
        text.contains("carries no message Herald accepted"),
        "{text}"
    );
    for id in [&wrong_topic, &not_ours] {
        let n: i32 = rt
            .block_on(db.query_one(
                "SELECT redrives FROM dead_letters WHERE event_id = $1",
                &[id],
            ))
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "nothing was redriven");
    }
}

/// Finding 15: a receipt's bytes never stall the status tables, and a receipt counts once.
/// A signed receipt whose code holds a NUL is taken (PostgreSQL refuses NUL in text: kept, the
/// projector's transaction failed for ever and every later message stayed where it was); one
/// whose message id holds a NUL is a 400, not an endless 503. The same undelivered receipt
/// pushed four times (fresh `webhook-id`s: a provider's retries) counts once toward the
/// provider's receipt breaker, which would open at three failures.
#[tokio::test(flavor = "multi_thread")]
async fn a_receipt_with_a_nul_byte_or_pushed_again_neither_stalls_nor_counts_twice() {
    let _serial = SERIAL.lock().await;
    let (api, admin) = (18_690, 19_690);
    let cfg = std::env::temp_dir().join("herald-hostile-surface-receipts.toml");
    let base = std::fs::read_to_string(config_path()).unwrap();
    let smtp = "code = \"smtp-local\"\nkind = \"smtp\"\n";
    assert!(base.contains(smtp), "config layout changed");
    let text = base.replacen(
        smtp,
        &format!(
            "{smtp}breaker = {{ failure_rate = 0.5, min_calls = 3, window_secs = 120, open_secs = 120 }}\n"
        ),
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    let mut herald = Herald::start(&cfg, &herald_env(api, admin));
    api_up(api).await;
    let mail = |to: &str| {
        json!({"channel": "EMAIL", "template": "welcome",
            "params": {"name": "Ada", "product": "Herald"},
            "recipients": [{"address": format!("{}@example.com", unique(to))}]})
    };
    let id = send_message(api, &mail("nul-receipt")).await;
    await_status(api, &id, "delivered").await;

    let http = reqwest::Client::new();
    let key = herald_core::util::webhook_key(CALLBACK_SECRET);
    let push = |body: String| {
        let (http, key) = (http.clone(), key.clone());
        async move {
            let wid = unique("wh");
            let ts = herald_core::util::now_ms() / 1000;
            let sig =
                herald_core::util::standard_webhook_signature(&key, &wid, ts, body.as_bytes());
            let r = http
                .post(format!("http://127.0.0.1:{}/callbacks/smtp-local", api + 1))
                .header("webhook-id", &wid)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", sig)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let bounced = json!({"message_id": id, "status": "undelivered", "code": "5.1.1\u{0}NUL"});
    for _ in 0..4 {
        let (status, v) = push(bounced.to_string()).await;
        assert_eq!(status, 200, "{v}");
    }
    let forged = json!({"message_id": format!("{id}\u{0}x"), "status": "undelivered", "code": "X"});
    let (status, v) = push(forged.to_string()).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "invalid_body", "{v}");

    // The status tables still move: a normal message is delivered after them.
    let after = send_message(api, &mail("after-nul")).await;
    await_status(api, &after, "delivered").await;
    let timeline = api_json(&format!("/v1/messages/{id}"), api).await.unwrap();
    assert!(
        timeline.to_string().contains("5.1.1NUL"),
        "the receipt is projected without its NUL: {timeline}"
    );
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let open = metrics.lines().find(|l| {
        l.starts_with("herald_send_breaker_open")
            && l.contains("\"smtp-local\"")
            && l.contains("\"receipts\"")
    });
    assert!(
        open.is_none_or(|l| l.ends_with(" 0")),
        "one receipt pushed four times is one failure: {open:?}"
    );
    herald.signal("TERM");
    assert!(herald.wait_exit(Duration::from_secs(20)).is_some());
}
