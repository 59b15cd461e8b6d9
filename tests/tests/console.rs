//! The operators' console in a real browser: Debian's headless Chromium driven through its
//! WebDriver (chromedriver, installed by `scripts/stack`) against a Herald on the real stack.
//! An operator logs in (a wrong password is refused), finds a message sent by `herald demo` and
//! reads its timeline, watches the overview's chart data change after a send, cancels a
//! scheduled message, edits a template and sees the preview (then publishes it), and redrives a
//! dead letter; the audit log shows each change; a viewer cannot change anything; a change
//! without the session's CSRF token or from another origin is refused; logout ends the session
//! for good. `herald dlq` lists, shows and redrives through the same code. A screenshot of every
//! page is written to `target/console-screenshots/` (the test prints the folder).
//!
//! Failed logins are throttled per name and per client address (429 with `Retry-After`, the
//! right password refused during a lock) and audited, over plain HTTP from two loopback
//! addresses.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use herald_tests::*;
use serde_json::{Value, json};

const ADMIN_PASSWORD: &str = "admin-password-for-tests";
const VIEWER_PASSWORD: &str = "viewer-password-for-tests";

struct Driver(Child);

impl Drop for Driver {
    /// Ends chromedriver and the browsers it started (its process group), even when the test
    /// failed before closing the session.
    fn drop(&mut self) {
        // `--` first: procps-ng 4.0.2's kill reads `kill -KILL -PGID` as `kill(-1, SIGKILL)`,
        // which (as root) ends every process on the machine.
        let _ = Command::new("kill")
            .args(["-KILL", "--"])
            .arg(format!("-{}", self.0.id()))
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hash(password: &str) -> String {
    console_hash(password)
}

fn shots() -> PathBuf {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/console-screenshots"
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "{name}: a PNG");
    std::fs::write(shots().join(format!("{name}.png")), png).unwrap();
}

/// An element's text; found again if the page was replaced between finding and reading it.
async fn text(c: &Client, css: &str) -> String {
    eventually(Duration::from_secs(15), css, || async move {
        c.find(Locator::Css(css)).await.ok()?.text().await.ok()
    })
    .await
}

/// Clicks, then waits until the page the click leads to is loaded (its URL passes `arrived`).
async fn click_to(c: &Client, css: &str, arrived: impl Fn(&str) -> bool) {
    click(c, css).await;
    eventually(Duration::from_secs(15), "the next page", || async {
        let url = c.current_url().await.ok()?.to_string();
        arrived(&url).then_some(())
    })
    .await;
}

/// The confirmation a change's page shows, once it has loaded.
async fn flash(c: &Client) -> String {
    eventually(
        Duration::from_secs(15),
        "the page's confirmation",
        || async move { c.find(Locator::Css("#flash")).await.ok()?.text().await.ok() },
    )
    .await
}

async fn exists(c: &Client, css: &str) -> bool {
    c.find(Locator::Css(css)).await.is_ok()
}

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.expect("script")
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
}

async fn fill(c: &Client, css: &str, value: &str) {
    let el = c
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"));
    el.clear().await.unwrap();
    el.send_keys(value).await.unwrap();
}

async fn login(c: &Client, base: &str, name: &str, password: &str) {
    c.goto(&format!("{base}/login")).await.unwrap();
    fill(c, "#name", name).await;
    fill(c, "#password", password).await;
    click(c, "#login-submit").await;
    // The form's answer has loaded: another page, or the form again saying why.
    eventually(
        Duration::from_secs(15),
        "the login answered",
        || async move {
            let url = c.current_url().await.ok()?;
            (url.path() != "/login" || url.query().is_some_and(|q| q.contains("failed")))
                .then_some(())
        },
    )
    .await;
}

async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_works_through_the_console_in_a_real_browser() {
    let (api, admin, console, driver_port) = (18_780, 19_980, 18_790, 18_795);
    let cfg = std::env::temp_dir().join("herald-console.toml");
    std::fs::copy(config_path(), &cfg).unwrap();
    let mut env = herald_env(api, admin);
    env.push(("HERALD_CONSOLE_LISTEN", format!("127.0.0.1:{console}")));
    env.push(("HERALD_CONSOLE_ADMIN_HASH", hash(ADMIN_PASSWORD)));
    env.push(("HERALD_CONSOLE_VIEWER_HASH", hash(VIEWER_PASSWORD)));
    let _herald = Herald::start(&cfg, &env);
    let chromedriver = std::env::var("HERALD_CHROMEDRIVER").unwrap_or("chromedriver".into());
    let _driver = Driver(
        Command::new(&chromedriver)
            .arg(format!("--port={driver_port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{chromedriver}: {e} (scripts/stack installs chromium-driver)")
            }),
    );
    eventually(
        Duration::from_secs(60),
        "console and WebDriver up",
        || async { (port_open(console).await && port_open(driver_port).await).then_some(()) },
    )
    .await;
    let base = format!("http://127.0.0.1:{console}");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"binary": std::env::var("HERALD_CHROMIUM").unwrap_or("/usr/bin/chromium".into()),
               "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                        "--disable-gpu", "--window-size=1366,900", "--lang=en-US"]}),
    );
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{driver_port}"))
        .await
        .expect("a Chromium session through chromedriver");
    // Elements of a page that is still loading are waited for (up to 5 s).
    c.update_timeouts(fantoccini::wd::TimeoutConfiguration::new(
        None,
        None,
        Some(Duration::from_secs(5)),
    ))
    .await
    .unwrap();
    println!("screenshots: {}", shots().display());

    // Not logged in: the login form. A wrong password is refused.
    c.goto(&format!("{base}/messages")).await.unwrap();
    assert!(c.current_url().await.unwrap().path() == "/login");
    shot(&c, "login").await;
    login(&c, &base, "admin", "not-the-password").await;
    assert!(
        exists(&c, "#login-failed").await,
        "a wrong password is refused"
    );
    login(&c, &base, "admin", ADMIN_PASSWORD).await;
    assert_eq!(c.current_url().await.unwrap().path(), "/");
    let before: Value = serde_json::from_str(&text_raw(&c, "overview-data").await).unwrap();

    // A message sent by `herald demo`, found by its recipient, and its timeline.
    let tag = unique("console");
    let out = Command::new(herald_bin())
        .arg("-c")
        .arg(&cfg)
        .args(["demo", "--count", "1", "--template", "welcome", "--to"])
        .arg(format!("{tag}{{i}}@example.com"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(out.status.success(), "herald demo: {out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let demo_id = stdout
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("herald demo prints request and message ids")
        .to_owned();
    await_status(api, &demo_id, "delivered").await;
    c.goto(&format!("{base}/messages")).await.unwrap();
    fill(&c, "#q", &format!("{tag}0@example.com")).await;
    click_to(&c, "#search-submit", |u| u.contains("?q=")).await;
    let found = text(&c, "#messages").await;
    assert!(found.contains(&demo_id), "found by recipient: {found}");
    shot(&c, "messages").await;
    click(&c, ".message-link").await;
    assert_eq!(text(&c, "#message-id").await, demo_id);
    let timeline = text(&c, "#timeline").await;
    for status in ["accepted", "rendered", "routed", "delivered"] {
        assert!(
            timeline.contains(status),
            "{status} in the timeline: {timeline}"
        );
    }
    assert!(text(&c, "#attempts").await.contains("smtp-local"));
    assert!(
        !exists(&c, "#cancel").await,
        "a delivered message cannot be canceled"
    );
    shot(&c, "message").await;
    c.goto(&format!(
        "{base}/requests/{}",
        request_of(api, &demo_id).await
    ))
    .await
    .unwrap();
    shot(&c, "request").await;

    // The overview's chart data changes after sending (the page refreshes itself).
    c.goto(&base).await.unwrap();
    assert!(
        exists(&c, "#chart canvas").await,
        "the chart is drawn (uPlot canvas)"
    );
    let shown: i64 = text_raw_json(&c).await["total"].as_i64().unwrap();
    assert!(shown > before["total"].as_i64().unwrap());
    let webhook = send_message(
        api,
        &json!({"app_id": "demo", "channel": "EMAIL", "template": "welcome",
                "params": {"product": "Herald"},
                "recipients": [{"address": format!("{tag}-ov@example.com"), "params": {"name": "Ov"}}]}),
    )
    .await;
    await_status(api, &webhook, "delivered").await;
    eventually(Duration::from_secs(30), "the overview refreshes", || {
        let c = c.clone();
        async move { (text_raw_json(&c).await["total"].as_i64()? > shown).then_some(()) }
    })
    .await;
    let email_points: i64 = text_raw_json(&c).await["series"]["channels"]["email"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_i64)
        .sum();
    assert!(email_points > 0, "the e-mail series has points");
    assert!(
        text_raw_json(&c).await["p99"]["email"]
            .as_array()
            .is_some_and(|v| v.iter().any(Value::is_number)),
        "the latency series has points"
    );
    assert!(exists(&c, "#latency-chart canvas").await);
    shot(&c, "overview").await;

    // Cancel a scheduled message.
    let later = herald_core::util::now_ms() + 600_000;
    let scheduled = send_message(
        api,
        &json!({"app_id": "demo", "channel": "EMAIL", "template": "welcome", "send_at": later,
                "params": {"product": "Herald"},
                "recipients": [{"address": format!("{tag}-later@example.com"), "params": {"name": "L"}}]}),
    )
    .await;
    await_status(api, &scheduled, "scheduled").await;
    c.goto(&format!("{base}/messages/{scheduled}"))
        .await
        .unwrap();
    click(&c, "#cancel").await;
    assert!(
        flash(&c).await.contains("1 canceled"),
        "the cancel is confirmed"
    );
    await_status(api, &scheduled, "canceled").await;
    c.goto(&format!("{base}/messages/{scheduled}"))
        .await
        .unwrap();
    assert_eq!(text(&c, "#message-status").await, "canceled");
    assert!(text(&c, "#timeline").await.contains("canceled"));

    // Edit a template and see the preview; publish it as the next version.
    let code = format!("console-{}", &tag[tag.len() - 8..]);
    let put = serde_json::to_vec(&json!({"channel": "EMAIL", "subject": "Hi {{ name }}",
        "text": "Hello {{ name }}"}))
    .unwrap();
    let resp = signed("PUT", &format!("/v1/templates/{code}"), &put, api)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    c.goto(&format!("{base}/templates")).await.unwrap();
    assert!(text(&c, "#templates").await.contains(&code));
    shot(&c, "templates").await;
    c.goto(&format!("{base}/templates/{code}?app=demo"))
        .await
        .unwrap();
    fill(&c, "#subject", "Welcome {{ name }}, from the console").await;
    fill(&c, "#params", r#"{"name": "<Ann>"}"#).await;
    eventually(Duration::from_secs(15), "the preview", || {
        let c = c.clone();
        async move {
            let s = c
                .find(Locator::Css("#preview-subject"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            (s == "Welcome <Ann>, from the console").then_some(())
        }
    })
    .await;
    shot(&c, "template").await;
    // A missing parameter shows the render error, as render would fail the message.
    fill(&c, "#params", "{}").await;
    eventually(Duration::from_secs(15), "the preview's error", || {
        let c = c.clone();
        async move { exists(&c, "#preview-error").await.then_some(()) }
    })
    .await;
    fill(&c, "#params", r#"{"name": "Ann"}"#).await;
    click(&c, "#publish").await;
    eventually(Duration::from_secs(15), "published", || {
        let c = c.clone();
        async move {
            let f = c
                .find(Locator::Css("#flash"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            f.contains("published version 2").then_some(())
        }
    })
    .await;
    let v = api_json(&format!("/v1/templates/{code}"), api)
        .await
        .unwrap();
    assert_eq!(v["version"], 2);
    assert_eq!(v["subject"], "Welcome {{ name }}, from the console");
    // A test send of the published version goes through the pipeline.
    fill(&c, "#test-address", &format!("{tag}-test@example.com")).await;
    fill(&c, "#test-params", r#"{"name": "Tess"}"#).await;
    click(&c, "#test-send-submit").await;
    // The page before (after publishing) shows a confirmation too: wait for this one.
    let sent = eventually(
        Duration::from_secs(15),
        "the test send's confirmation",
        || async {
            let f = c
                .find(Locator::Css("#flash"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            f.starts_with("test message").then_some(f)
        },
    )
    .await;
    let test_id = sent
        .strip_prefix("test message ")
        .and_then(|r| r.strip_suffix(" sent"))
        .unwrap_or_else(|| panic!("test send: {sent}"))
        .to_owned();
    await_status(api, &test_id, "delivered").await;
    let mails = mails_for(std::slice::from_ref(&test_id));
    assert!(
        mails
            .values()
            .any(|(_, m)| m.contains("Welcome Tess, from the console")),
        "the test message carries the published subject: {mails:?}"
    );

    // Redrive a dead letter.
    let garbage = format!("not avro at all {tag}").into_bytes();
    publish_records(
        "kafka",
        vec![herald_core::transport::OutRecord {
            topic: herald_schemas::topics::REQUESTS.into(),
            key: Some(tag.clone().into_bytes()),
            payload: garbage.clone(),
            headers: vec![],
        }],
    )
    .await;
    let (db, conn) = tokio_postgres::connect(&postgres(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let letter = eventually(Duration::from_secs(60), "the dead letter projected", || {
        let (db, garbage) = (&db, garbage.clone());
        async move {
            db.query_opt(
                "SELECT event_id FROM dead_letters WHERE payload = $1 ORDER BY at LIMIT 1",
                &[&garbage],
            )
            .await
            .ok()?
            .map(|r| r.get::<_, String>(0))
        }
    })
    .await;
    c.goto(&format!("{base}/dead-letters")).await.unwrap();
    assert!(
        text(&c, "#dead-letters")
            .await
            .contains("herald.requests.v1")
    );
    shot(&c, "dead-letters").await;
    c.goto(&format!("{base}/dead-letters/{letter}"))
        .await
        .unwrap();
    assert!(exists(&c, "#decode-error").await, "shown as undecodable");
    assert!(text(&c, "#raw").await.contains(&tag), "the original bytes");
    click(&c, "#redrive").await;
    assert!(
        flash(&c).await.contains("redriven to herald.requests.v1"),
        "redriven"
    );
    assert!(text(&c, "#redrives").await.starts_with('1'));
    shot(&c, "dead-letter").await;
    // The redriven bytes went through accept again (and, still garbage, came back).
    eventually(
        Duration::from_secs(60),
        "the redriven record consumed again",
        || {
            let (db, garbage) = (&db, garbage.clone());
            async move {
                let n: i64 = db
                    .query_one(
                        "SELECT count(*) FROM dead_letters WHERE payload = $1",
                        &[&garbage],
                    )
                    .await
                    .ok()?
                    .get(0);
                (n >= 2).then_some(())
            }
        },
    )
    .await;

    // `herald dlq` over the same code.
    let dlq = |args: &[&str]| {
        let out = Command::new(herald_bin())
            .arg("-c")
            .arg(&cfg)
            .arg("dlq")
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        assert!(out.status.success(), "herald dlq {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(dlq(&["list", "--stage", "accept", "--limit", "500"]).contains(&letter));
    let shown: Value = serde_json::from_str(&dlq(&["show", &letter])).unwrap();
    assert_eq!(shown["source_topic"], "herald.requests.v1");
    assert!(shown["decoded"]["undecodable"].is_string());
    assert!(dlq(&["redrive", &letter, "--operator", "cli-test"]).contains("redriven"));
    assert!(dlq(&["resolve", &letter, "--operator", "cli-test"]).contains("resolved"));
    assert!(
        !dlq(&["list", "--limit", "500"]).contains(&letter),
        "resolved: off the list"
    );

    // Every change is in the audit log.
    c.goto(&format!("{base}/audit")).await.unwrap();
    let audit = text(&c, "#audit").await;
    for action in [
        "login",
        "message.cancel",
        "template.publish",
        "template.test_send",
        "dead_letter.redrive",
        "dead_letter.resolve",
    ] {
        assert!(audit.contains(action), "{action} in the audit log: {audit}");
    }
    assert!(audit.contains("cli-test"), "the CLI's redrive is audited");
    shot(&c, "audit").await;
    // An opt-out added in the console.
    c.goto(&format!("{base}/opt-outs")).await.unwrap();
    let opted = format!("{tag}-out@example.com");
    fill(&c, "#opt-out-form input[name=address]", &opted).await;
    click(&c, "#opt-out-form button").await;
    assert_eq!(flash(&c).await, "opted out");
    assert!(text(&c, "#opt-outs").await.contains(&opted));
    for (page, name) in [
        ("/providers", "providers"),
        ("/apps", "apps"),
        ("/opt-outs", "opt-outs"),
    ] {
        c.goto(&format!("{base}{page}")).await.unwrap();
        assert!(exists(&c, &format!("#{name}")).await, "{page}");
        shot(&c, name).await;
        if name == "providers" {
            let listed = text(&c, "#providers").await;
            // Every configured provider, mobile push's and the new SMS providers' included.
            for code in [
                "smtp-local",
                "fcm-sim",
                "apns-sim",
                "jpush-sim",
                "zrwinfo-sim",
            ] {
                assert!(listed.contains(code), "{code} on the providers page");
            }
        }
    }
    c.goto(&format!("{base}/audit")).await.unwrap();
    assert!(text(&c, "#audit").await.contains("opt_out.add"));

    // Changes need the session's CSRF token and the same origin.
    let cookie = c
        .get_all_cookies()
        .await
        .unwrap()
        .into_iter()
        .find(|k| k.name() == "herald_console")
        .expect("the session cookie")
        .value()
        .to_owned();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let post = |path: &str, form: &str, origin: Option<&str>| {
        let mut r = http
            .post(format!("{base}{path}"))
            .header("cookie", format!("herald_console={cookie}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_owned());
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    let target = format!("/dead-letters/{letter}/redrive");
    assert_eq!(
        post(&target, "csrf=wrong", None).await.unwrap().status(),
        403
    );
    let token = text_raw_csrf(&c).await;
    assert_eq!(
        post(
            &target,
            &format!("csrf={token}"),
            Some("http://evil.example")
        )
        .await
        .unwrap()
        .status(),
        403
    );

    // Logout ends the session: the old cookie no longer opens a page.
    click(&c, "#logout").await;
    eventually(Duration::from_secs(15), "back at the login form", || {
        let c = c.clone();
        async move { (c.current_url().await.ok()?.path() == "/login").then_some(()) }
    })
    .await;
    let after = http
        .get(format!("{base}/messages"))
        .header("cookie", format!("herald_console={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 303, "redirected to the login form");

    // A viewer reads but changes nothing.
    login(&c, &base, "viewer", VIEWER_PASSWORD).await;
    c.goto(&format!("{base}/dead-letters/{letter}"))
        .await
        .unwrap();
    assert!(!exists(&c, "#redrive").await);
    c.goto(&format!("{base}/audit")).await.unwrap();
    assert!(
        js(&c, "return document.body.innerText")
            .await
            .as_str()
            .unwrap()
            .contains("Forbidden")
    );
    c.close().await.unwrap();
}

/// One login form post from `http` (which does not follow redirects).
async fn post_login(
    http: &reqwest::Client,
    base: &str,
    name: &str,
    password: &str,
) -> reqwest::Response {
    // Form-encoded by hand (every byte but [A-Za-z0-9-] escaped).
    let enc = |v: &str| -> String {
        v.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    http.post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("name={}&password={}", enc(name), enc(password)))
        .send()
        .await
        .expect("the console answers")
}

/// A loopback HTTP client whose connections come from `ip` (any 127.x address is this host).
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(Some(ip.parse().unwrap()))
        .build()
        .unwrap()
}

fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a Retry-After in seconds: {:?}", r.headers()))
}

/// Failed logins are throttled before the password is checked: after five wrong passwords a
/// name answers 429 with `Retry-After`, even to its right password and from another address;
/// an address that failed ten times (across names) is refused for any name; another address
/// still logs in. Every failure and every lock is in the audit log with the name and the
/// address, and no password is; `herald_console_logins_total` counts the refusals.
#[tokio::test(flavor = "multi_thread")]
async fn failed_logins_are_throttled_per_name_and_per_client_and_audited() {
    let (api, admin_port, console) = (18_870, 19_870, 18_875);
    // Operator names of this run only, so that other runs' audit rows do not count here.
    let tag = unique("throttle");
    let (admin, viewer) = (format!("{tag}-admin"), format!("{tag}-viewer"));
    let base_cfg = std::fs::read_to_string(config_path()).unwrap();
    let cfg_text = base_cfg
        .replacen(
            "name = \"admin\"\nrole = \"admin\"",
            &format!("name = \"{admin}\"\nrole = \"admin\""),
            1,
        )
        .replacen(
            "name = \"viewer\"\nrole = \"viewer\"",
            &format!("name = \"{viewer}\"\nrole = \"viewer\""),
            1,
        );
    assert_eq!(
        cfg_text.matches(&tag).count(),
        2,
        "ops/herald.toml's console operators moved"
    );
    let cfg = std::env::temp_dir().join("herald-console-throttle.toml");
    std::fs::write(&cfg, cfg_text).unwrap();
    let mut env = herald_env(api, admin_port);
    env.push(("HERALD_CONSOLE_LISTEN", format!("127.0.0.1:{console}")));
    env.push(("HERALD_CONSOLE_ADMIN_HASH", hash(ADMIN_PASSWORD)));
    env.push(("HERALD_CONSOLE_VIEWER_HASH", hash(VIEWER_PASSWORD)));
    let _herald = Herald::start_with(&cfg, &env, &["--stages", "console"], "");
    eventually(Duration::from_secs(60), "console up", || async {
        port_open(console).await.then_some(())
    })
    .await;
    let (db, conn) = tokio_postgres::connect(&postgres(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let base = format!("http://127.0.0.1:{console}");
    let here = client_from("127.0.0.1");
    let elsewhere = client_from("127.0.0.2");

    // Five wrong passwords are refused as usual; the sixth attempt is not even checked.
    for i in 1..=5 {
        let r = post_login(&here, &base, &admin, &format!("wrong-password-{i}")).await;
        assert_eq!(r.status(), 303, "wrong password {i}");
        assert_eq!(r.headers()["location"], "/login?failed=true");
    }
    let r = post_login(&here, &base, &admin, "wrong-password-6").await;
    assert_eq!(r.status(), 429, "the sixth attempt is throttled");
    let wait = retry_after(&r);
    assert!(
        (1..=60).contains(&wait),
        "a first lock of at most a minute: {wait}"
    );
    let page = r.text().await.unwrap();
    assert!(
        page.contains("id=\"login-throttled\"") && page.contains("Too many failed logins"),
        "the form says why: {page}"
    );
    // The right password waits for the lock too, from this address and from another.
    for (client, from) in [(&here, "here"), (&elsewhere, "elsewhere")] {
        let r = post_login(client, &base, &admin, ADMIN_PASSWORD).await;
        assert_eq!(
            r.status(),
            429,
            "the right password during the lock, {from}"
        );
        assert!(retry_after(&r) >= 1);
        assert!(r.headers().get("set-cookie").is_none(), "no session");
    }

    // The same address trying other names: five more failures make ten, and then even a
    // name that never failed is refused from here.
    let sprayed: Vec<String> = (1..=5).map(|i| format!("{tag}-nobody-{i}")).collect();
    for name in &sprayed {
        let r = post_login(&here, &base, name, "a-guess").await;
        assert_eq!(r.status(), 303, "{name}");
    }
    let r = post_login(&here, &base, &viewer, VIEWER_PASSWORD).await;
    assert_eq!(r.status(), 429, "the address is locked for every name");
    assert!((1..=60).contains(&retry_after(&r)));

    // Another operator at another address logs in and works.
    let r = post_login(&elsewhere, &base, &viewer, VIEWER_PASSWORD).await;
    assert_eq!(r.status(), 303, "the viewer logs in from elsewhere");
    assert_eq!(r.headers()["location"], "/");
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(cookie.starts_with("herald_console="), "{cookie}");
    let page = elsewhere
        .get(format!("{base}/messages"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200, "the viewer reads the messages page");

    // The audit log: every failure and each lock, with the name and the address.
    let rows = db
        .query(
            "SELECT action, target, detail FROM console_audit \
             WHERE target LIKE $1 || '-%' ORDER BY id",
            &[&tag],
        )
        .await
        .unwrap();
    let rows: Vec<(String, String, Value)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let of = |action: &str, target: &str| -> Vec<&Value> {
        rows.iter()
            .filter(|(a, t, _)| a == action && t == target)
            .map(|(_, _, d)| d)
            .collect()
    };
    let failed = of("login.failed", &admin);
    assert_eq!(failed.len(), 5, "five failures of {admin}: {rows:?}");
    assert!(
        failed.iter().all(|d| d["client"] == "127.0.0.1"),
        "{failed:?}"
    );
    assert_eq!(
        failed[4]["locked_name_secs"], 60,
        "the fifth locked the name"
    );
    for name in &sprayed {
        let f = of("login.failed", name);
        assert_eq!(f.len(), 1, "{name}: {rows:?}");
        assert_eq!(f[0]["known_operator"], false);
    }
    let locked = of("login.throttled", &admin);
    assert_eq!(locked.len(), 1, "one row per lock: {rows:?}");
    assert_eq!(locked[0]["by"], "name");
    assert_eq!(locked[0]["client"], "127.0.0.1");
    let locked = of("login.throttled", &viewer);
    assert_eq!(locked.len(), 1, "{rows:?}");
    assert_eq!(locked[0]["by"], "client");
    let logins = of("login", &viewer);
    assert_eq!(logins.len(), 1);
    assert_eq!(logins[0]["client"], "127.0.0.2");
    let all = format!("{rows:?}");
    for secret in ["wrong-password", "a-guess", ADMIN_PASSWORD, VIEWER_PASSWORD] {
        assert!(!all.contains(secret), "no password in the audit log");
    }

    // The refusals are counted: the sixth try, the right password twice, the sprayed viewer.
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |outcome: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "herald_console_logins_total{{outcome=\"{outcome}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(count("throttled"), 4.0, "{metrics}");
    assert_eq!(count("failed"), 10.0);
    assert_eq!(count("ok"), 1.0);
}

/// The `#overview-data` block's text.
async fn text_raw(c: &Client, id: &str) -> String {
    js(
        c,
        &format!("return document.getElementById('{id}').textContent"),
    )
    .await
    .as_str()
    .unwrap_or_default()
    .to_owned()
}

async fn text_raw_json(c: &Client) -> Value {
    serde_json::from_str(&text_raw(c, "overview-data").await).unwrap_or(Value::Null)
}

/// The session's CSRF token, as the page carries it.
async fn text_raw_csrf(c: &Client) -> String {
    js(c, "return document.querySelector('input[name=csrf]').value")
        .await
        .as_str()
        .unwrap()
        .to_owned()
}

async fn request_of(api: u16, id: &str) -> String {
    api_json(&format!("/v1/messages/{id}"), api).await.unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_owned()
}
