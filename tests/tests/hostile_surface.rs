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
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(herald_bin())
        .args(["console", "hash-password"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("herald console hash-password");
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
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
            .body(form_body(&[("name", "admin"), ("password", ADMIN_PASSWORD)]))
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
    assert!(ok.contains("id=\"preview-text\">Hi &lt;b&gt;Ann&lt;/b&gt;<"), "{ok}");
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
    let again = run.preview(&session, "Hello {{ name }}", r#"{"name": "Bo"}"#).await;
    assert!(again.contains("Hello Bo"), "{again}");
    run.still_delivers("after-preview").await;
    let _ = run.admin;
    run.stop();
}
