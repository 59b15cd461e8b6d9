//! Verification codes end to end (`POST /v1/verifications`, `…/{id}/check`), against the real
//! stack: a code sent by e-mail (template and plain text) and by SMS (the Aliyun simulator) is
//! accepted once; wrong codes, or the right code for another purpose or destination, are counted
//! and lock the code out; a resend keeps the count and supersedes the old code; an expired code
//! is refused; sends per destination are limited (cooldown, hourly); two concurrent right checks
//! pass once. And the code is nowhere at rest or in transit: not in any PostgreSQL table, not in
//! any Kafka record Herald wrote during the test (payloads, keys, headers), not in Herald's log.

use std::collections::HashSet;
use std::time::Duration;

use herald_tests::*;
use serde_json::{Value, json};

const API: u16 = 18_830;
const ADMIN: u16 = 19_730;

struct Run {
    http: reqwest::Client,
    /// The API port of the Herald under test.
    api: u16,
    /// Every code seen, for the leak search.
    codes: Vec<String>,
}

impl Run {
    async fn post(&self, path: &str, body: &Value) -> (u16, Value, Option<String>) {
        self.post_as("demo", SECRET, path, body).await
    }

    async fn post_as(
        &self,
        app: &str,
        secret: &str,
        path: &str,
        body: &Value,
    ) -> (u16, Value, Option<String>) {
        let bytes = serde_json::to_vec(body).unwrap();
        let resp = signed_with(&self.http, app, secret, "POST", path, &bytes, self.api)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let retry = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        (status, resp.json().await.unwrap_or(Value::Null), retry)
    }

    /// Starts a verification, which must be accepted; the answer.
    async fn start(&self, body: Value) -> Value {
        let (status, v, _) = self.post("/v1/verifications", &body).await;
        assert_eq!(status, 202, "POST /v1/verifications {body}: {v}");
        assert_eq!(v["status"], "pending");
        v
    }

    /// Starts a verification as `app` once the resend interval has passed (polling while the
    /// answer is `verification_cooldown`); the answer.
    async fn start_after_cooldown(&self, app: &str, body: Value) -> Value {
        let secret = if app == OTHER_APP {
            OTHER_SECRET
        } else {
            SECRET
        };
        eventually(Duration::from_secs(10), "a send after the interval", || {
            let body = body.clone();
            async move {
                let (status, v, _) = self.post_as(app, secret, "/v1/verifications", &body).await;
                assert!(
                    status == 202 || v["error"]["code"] == "verification_cooldown",
                    "{body}: {status} {v}"
                );
                (status == 202).then_some(v)
            }
        })
        .await
    }

    async fn check(&self, id: &str, body: Value) -> Value {
        let (status, v, _) = self
            .post(&format!("/v1/verifications/{id}/check"), &body)
            .await;
        assert_eq!(status, 200, "check {body}: {v}");
        v
    }

    /// The code an e-mail verification delivered (from the SMTP server's mailbox).
    async fn mailed_code(&mut self, started: &Value, len: usize) -> String {
        let mid = started["message_id"].as_str().unwrap().to_owned();
        await_status(self.api, &mid, "delivered").await;
        let mail = eventually(Duration::from_secs(30), "the mail", || {
            let mid = mid.clone();
            async move { mails_for(std::slice::from_ref(&mid)).remove(&mid) }
        })
        .await;
        assert_eq!(mail.0, 1, "one mail");
        assert!(!mail.1.contains("hseal"), "the code is opened in the mail");
        let code = digits_after(&mail.1, "code is ", len)
            .unwrap_or_else(|| panic!("a {len}-digit code in the mail: {}", mail.1));
        self.codes.push(code.clone());
        code
    }

    /// The code an SMS verification delivered (as the Aliyun simulator took it).
    async fn texted_code(&mut self, started: &Value) -> String {
        let mid = started["message_id"].as_str().unwrap().to_owned();
        let entry = eventually(Duration::from_secs(60), "the SMS at the simulator", || {
            let (http, mid) = (self.http.clone(), mid.clone());
            async move {
                let log: Value = http
                    .get(format!("{}/_log/aliyun", sim_url()))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                log["accepted"]
                    .as_array()?
                    .iter()
                    .find(|e| e["out_id"] == mid.as_str())
                    .cloned()
            }
        })
        .await;
        let params: Value =
            serde_json::from_str(entry["template_param"].as_str().unwrap()).unwrap();
        let code = params["code"].as_str().unwrap().to_owned();
        assert!(code.bytes().all(|b| b.is_ascii_digit()), "{code}");
        self.codes.push(code.clone());
        code
    }
}

fn digits_after(text: &str, marker: &str, len: usize) -> Option<String> {
    let at = text.find(marker)? + marker.len();
    let digits: String = text[at..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    (digits.len() == len).then_some(digits)
}

/// `ops/herald.toml` with its `[verifications]` section replaced by `verifications` and `extra`
/// appended, written to the temporary directory as `name`.
fn config_with(name: &str, verifications: &str, extra: &str) -> std::path::PathBuf {
    let cfg = std::env::temp_dir().join(name);
    let text = std::fs::read_to_string(config_path()).unwrap();
    let section = text.find("[verifications]").unwrap();
    let end = section + text[section..].find("\n\n").unwrap();
    let text = format!(
        "{}[verifications]\n{verifications}{}{extra}",
        &text[..section],
        &text[end..]
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// A code that is not `code` (same length).
fn wrong(code: &str) -> String {
    code.chars()
        .map(|c| char::from(b'0' + ((c as u8 - b'0' + 1) % 10)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verification_codes_are_single_use_limited_and_never_stored() {
    let started_at = herald_core::util::now_ms();
    // Long codes, so the leak search cannot match by chance; short intervals, so the test runs
    // in seconds.
    let cfg = config_with(
        "herald-verifications.toml",
        "code_length = 10\nttl_secs = 300\nmax_attempts = 5\nresend_interval_secs = 2\n\
         max_sends_per_hour = 4\nmax_sends_per_day = 10\n",
        "",
    );
    let herald = Herald::start(&cfg, &herald_env(API, ADMIN));
    api_up(API).await;
    let mut run = Run {
        http: reqwest::Client::new(),
        api: API,
        codes: Vec::new(),
    };
    let tag = unique("otp");
    let addr = |name: &str| format!("{tag}-{name}@example.com");

    // Refused before anything is sent.
    for (body, code) in [
        (
            json!({"purpose": "login", "channel": "INAPP", "to": "user-1"}),
            "channel_not_allowed",
        ),
        (
            json!({"purpose": "login", "channel": "SMS", "to": "13900000000"}),
            "template_required",
        ),
        (
            json!({"purpose": "login", "channel": "EMAIL", "to": addr("x"), "params": {"code": "1"}}),
            "reserved_param",
        ),
        (
            json!({"purpose": "log in!", "channel": "EMAIL", "to": addr("x")}),
            "invalid_purpose",
        ),
        (
            json!({"purpose": "login", "channel": "EMAIL", "to": addr("x"), "code_length": 3}),
            "invalid_code_length",
        ),
        (
            json!({"purpose": "login", "channel": "EMAIL", "to": addr("x"), "ttl_secs": 100000}),
            "invalid_ttl",
        ),
        (
            json!({"purpose": "login", "channel": "EMAIL", "to": "not-an-address"}),
            "invalid_recipient",
        ),
    ] {
        let (status, v, _) = run.post("/v1/verifications", &body).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some(code)),
            "{body}: {v}"
        );
    }
    let (status, _, _) = run
        .post(
            "/v1/verifications/no-such-id/check",
            &json!({"code": "1234"}),
        )
        .await;
    assert_eq!(status, 404);

    // 1. A code by e-mail with a template: wrong codes and the right code for another purpose
    //    or destination are counted; the right one passes once.
    let a = run
        .start(
            json!({"purpose": "login", "channel": "EMAIL", "to": addr("a"),
                      "template": "verify_email", "params": {"product": "Herald"}}),
        )
        .await;
    let a_id = a["id"].as_str().unwrap();
    assert_eq!(a["max_attempts"], 5);
    let code_a = run.mailed_code(&a, 10).await;
    let read = api_json(&format!("/v1/verifications/{a_id}"), API)
        .await
        .unwrap();
    assert_eq!(read["status"], "pending");
    assert!(!read.to_string().contains(&code_a));
    let v = run.check(a_id, json!({"code": wrong(&code_a)})).await;
    assert_eq!(
        (
            v["valid"].as_bool(),
            v["status"].as_str(),
            v["attempts_left"].as_i64()
        ),
        (Some(false), Some("pending"), Some(4))
    );
    let v = run
        .check(a_id, json!({"code": code_a, "purpose": "reset_password"}))
        .await;
    assert_eq!(
        (v["valid"].as_bool(), v["attempts_left"].as_i64()),
        (Some(false), Some(3)),
        "another purpose: {v}"
    );
    let v = run
        .check(a_id, json!({"code": code_a, "to": addr("someone-else")}))
        .await;
    assert_eq!(
        (v["valid"].as_bool(), v["attempts_left"].as_i64()),
        (Some(false), Some(2)),
        "another destination: {v}"
    );
    let v = run
        .check(
            a_id,
            json!({"code": code_a, "purpose": "login", "to": addr("a")}),
        )
        .await;
    assert_eq!(
        (v["valid"].as_bool(), v["status"].as_str()),
        (Some(true), Some("approved")),
        "{v}"
    );
    let v = run.check(a_id, json!({"code": code_a})).await;
    assert_eq!(
        (v["valid"].as_bool(), v["status"].as_str()),
        (Some(false), Some("used")),
        "single use: {v}"
    );

    // 2. Resend: within the interval refused (429, Retry-After); after it a new code that
    //    supersedes the old one and keeps its wrong checks; the budget spent, the code is dead
    //    and no new one is sent until the last expires.
    let b1 = run
        .start(json!({"purpose": "login", "channel": "EMAIL", "to": addr("b")}))
        .await;
    let b1_id = b1["id"].as_str().unwrap();
    let (status, v, retry) = run
        .post(
            "/v1/verifications",
            &json!({"purpose": "login", "channel": "EMAIL", "to": addr("b")}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (429, Some("verification_cooldown")),
        "{v}"
    );
    assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok_and(|s| (1..=2).contains(&s))));
    let code_b1 = run.mailed_code(&b1, 10).await;
    for left in [4, 3] {
        let v = run.check(b1_id, json!({"code": wrong(&code_b1)})).await;
        assert_eq!(v["attempts_left"].as_i64(), Some(left));
    }
    let b2 = eventually(
        Duration::from_secs(10),
        "the resend after the interval",
        || {
            let run = &run;
            let tag = addr("b");
            async move {
                let (status, v, _) = run
                    .post(
                        "/v1/verifications",
                        &json!({"purpose": "login", "channel": "EMAIL", "to": tag}),
                    )
                    .await;
                (status == 202).then_some(v)
            }
        },
    )
    .await;
    assert_eq!(b2["attempts"], 2, "a resend keeps the wrong checks: {b2}");
    let b2_id = b2["id"].as_str().unwrap();
    let code_b2 = run.mailed_code(&b2, 10).await;
    assert_ne!(code_b1, code_b2);
    let v = run.check(b1_id, json!({"code": code_b1})).await;
    assert_eq!(
        (v["valid"].as_bool(), v["status"].as_str()),
        (Some(false), Some("superseded")),
        "{v}"
    );
    for (left, status) in [(2, "pending"), (1, "pending"), (0, "max_attempts_reached")] {
        let v = run.check(b2_id, json!({"code": wrong(&code_b2)})).await;
        assert_eq!(
            (v["attempts_left"].as_i64(), v["status"].as_str()),
            (Some(left), Some(status)),
            "{v}"
        );
    }
    let v = run.check(b2_id, json!({"code": code_b2})).await;
    assert_eq!(
        (v["valid"].as_bool(), v["status"].as_str()),
        (Some(false), Some("max_attempts_reached")),
        "locked out: {v}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, v, retry) = run
        .post(
            "/v1/verifications",
            &json!({"purpose": "login", "channel": "EMAIL", "to": addr("b")}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (429, Some("verification_locked")),
        "{v}"
    );
    assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok_and(|s| s > 200)));
    // Another purpose for the same destination is its own budget.
    let b3 = run
        .start(json!({"purpose": "change_email", "channel": "EMAIL", "to": addr("b")}))
        .await;
    assert_eq!(b3["attempts"], 0);
    run.mailed_code(&b3, 10).await;

    // 3. Expired: refused even with the right code, and not counted.
    let c = run
        .start(json!({"purpose": "login", "channel": "EMAIL", "to": addr("c"), "ttl_secs": 6}))
        .await;
    let code_c = run.mailed_code(&c, 10).await;
    let wait = c["expires_at"].as_i64().unwrap() - herald_core::util::now_ms() + 500;
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
    let v = run
        .check(c["id"].as_str().unwrap(), json!({"code": code_c}))
        .await;
    assert_eq!(
        (
            v["valid"].as_bool(),
            v["status"].as_str(),
            v["attempts"].as_i64()
        ),
        (Some(false), Some("expired"), Some(0)),
        "{v}"
    );

    // 4. Two concurrent right checks: exactly one passes.
    let d = run
        .start(json!({"purpose": "pay", "channel": "EMAIL", "to": addr("d"), "code_length": 8}))
        .await;
    let code_d = run.mailed_code(&d, 8).await;
    let d_id = d["id"].as_str().unwrap();
    let body = json!({"code": code_d});
    let (x, y) = tokio::join!(run.check(d_id, body.clone()), run.check(d_id, body.clone()));
    let valid: Vec<bool> = [&x, &y]
        .iter()
        .map(|v| v["valid"].as_bool().unwrap())
        .collect();
    assert_eq!(valid.iter().filter(|v| **v).count(), 1, "{x} {y}");

    // 5. Sends per destination per hour: the 5th within the hour is refused.
    let e_to = addr("e");
    for i in 0..4 {
        let e = eventually(Duration::from_secs(10), "a send after the interval", || {
            let (run, to) = (&run, e_to.clone());
            async move {
                let (status, v, _) = run
                    .post(
                        "/v1/verifications",
                        &json!({"purpose": format!("p{i}"), "channel": "EMAIL", "to": to}),
                    )
                    .await;
                (status == 202).then_some(v)
            }
        })
        .await;
        run.mailed_code(&e, 10).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, v, retry) = run
        .post(
            "/v1/verifications",
            &json!({"purpose": "p5", "channel": "EMAIL", "to": e_to}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (429, Some("too_many_verifications")),
        "{v}"
    );
    assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok_and(|s| s > 3000)));

    // 6. By SMS with the provider's registered template: the code reaches the provider's
    //    template parameters, and passes.
    let phone = {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        format!("1390{:07}", n % 10_000_000)
    };
    let token = herald_simulators::credential("HERALD_SIM_CALLBACK_TOKEN");
    let receipts = format!("http://127.0.0.1:{}/callbacks/aliyun-sim/{token}", API + 1);
    let r = run
        .http
        .put(format!("{}/_control/aliyun/receipts", sim_url()))
        .json(&json!({ "url": receipts }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let s = run
        .start(
            json!({"purpose": "login", "channel": "SMS", "to": phone, "template": "verify_code"}),
        )
        .await;
    let code_s = run.texted_code(&s).await;
    assert_eq!(code_s.len(), 10);
    let v = run
        .check(s["id"].as_str().unwrap(), json!({"code": code_s}))
        .await;
    assert_eq!(v["valid"], true, "{v}");
    await_status(API, s["message_id"].as_str().unwrap(), "delivered").await;

    // The code is nowhere Herald keeps or passes things: no table, no record, no log line.
    let codes: HashSet<String> = run.codes.iter().cloned().collect();
    assert!(codes.len() >= 9);
    let (db, conn) = tokio_postgres::connect(&postgres(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let tables: Vec<String> = db
        .query(
            "SELECT table_name FROM information_schema.tables
             WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tables.iter().any(|t| t == "verifications"));
    // Each code as text, and as the hex PostgreSQL shows bytea in (a payload kept as bytes).
    let wanted: Vec<String> = codes
        .iter()
        .flat_map(|c| [c.clone(), hex::encode(c)])
        .collect();
    for table in &tables {
        let n: i64 = db
            .query_one(
                &format!(
                    "SELECT count(*) FROM (SELECT t::text AS row FROM {table} t) r, unnest($1::text[]) c
                     WHERE strpos(r.row, c) > 0"
                ),
                &[&wanted],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "a code in table {table}");
    }
    let needles: Vec<&[u8]> = codes.iter().map(|c| c.as_bytes()).collect();
    let (scanned, hits) = scan_topics_since(started_at, &needles);
    assert!(scanned > 0, "records were scanned");
    assert!(hits.is_empty(), "codes in records: {hits:?}");
    // Stopped cleanly: a killed process could leave a Kafka transaction open.
    drop(run);
    let mut herald = herald;
    herald.signal("TERM");
    assert_eq!(herald.wait_exit(Duration::from_secs(60)), Some(0));
    let log = std::fs::read_to_string(cfg.with_extension("log")).unwrap();
    assert!(!log.is_empty());
    for code in &codes {
        assert!(!log.contains(code.as_str()), "a code in Herald's log");
    }
}

const LIMITS_API: u16 = 18_850;
const LIMITS_ADMIN: u16 = 19_750;
const OTHER_APP: &str = "otp-other";
const OTHER_SECRET: &str = "otp-other-test-secret";

/// The rules that key on a destination (cooldown, hourly limit, wrong-check budget) see one
/// destination however it is written, and one app's sends never use up another's; codes are not
/// sent to group chats unless the operator lists the channel; and a wrong check made while a
/// resend is in flight is counted on the new code.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_destination_rules_follow_the_normalised_destination_and_the_app() {
    // A large budget, so the resend race below never spends it; the default channels.
    let cfg = config_with(
        "herald-verification-limits.toml",
        "code_length = 8\nttl_secs = 300\nmax_attempts = 100\nresend_interval_secs = 2\n\
         max_sends_per_hour = 3\nmax_sends_per_day = 10\n",
        &format!(
            "\n[[apps]]\nid = \"{OTHER_APP}\"\nsecret_env = \"HERALD_APP_OTP_OTHER_SECRET\"\n"
        ),
    );
    let mut env = herald_env(LIMITS_API, LIMITS_ADMIN);
    env.push(("HERALD_APP_OTP_OTHER_SECRET", OTHER_SECRET.to_owned()));
    let herald = Herald::start(&cfg, &env);
    api_up(LIMITS_API).await;
    let mut run = Run {
        http: reqwest::Client::new(),
        api: LIMITS_API,
        codes: Vec::new(),
    };
    let tag = unique("norm");
    let refused_with = |v: (u16, Value, Option<String>), code: &str| {
        assert_eq!(
            (v.0, v.1["error"]["code"].as_str()),
            (429, Some(code)),
            "{}",
            v.1
        );
    };

    // 1. One mailbox written two ways: one cooldown, one wrong-check budget, one code.
    let upper = format!("Victim-{tag}@example.com");
    let lower = format!("victim-{tag}@EXAMPLE.com");
    let e1 = run
        .start(json!({"purpose": "login", "channel": "EMAIL", "to": upper}))
        .await;
    let e1_id = e1["id"].as_str().unwrap().to_owned();
    for left in [99, 98] {
        let v = run.check(&e1_id, json!({"code": "00000000"})).await;
        assert_eq!(v["attempts_left"].as_i64(), Some(left), "{v}");
    }
    refused_with(
        run.post(
            "/v1/verifications",
            &json!({"purpose": "login", "channel": "EMAIL", "to": lower}),
        )
        .await,
        "verification_cooldown",
    );
    let e2 = run
        .start_after_cooldown(
            "demo",
            json!({"purpose": "login", "channel": "EMAIL", "to": lower}),
        )
        .await;
    assert_eq!(e2["attempts"], 2, "the budget is the mailbox's: {e2}");
    let code_e2 = run.mailed_code(&e2, 8).await;
    let v = run.check(&e1_id, json!({"code": code_e2})).await;
    assert_eq!(v["status"], "superseded", "{v}");
    // Checked against the mailbox however the caller writes it.
    let v = run
        .check(
            e2["id"].as_str().unwrap(),
            json!({"code": code_e2, "to": format!("VICTIM-{tag}@Example.Com")}),
        )
        .await;
    assert_eq!(v["valid"], true, "{v}");

    // 2. One phone number written three ways (E.164, with the country code but no +, national):
    //    one cooldown, one budget, one hourly limit. Numbers that are not a phone are refused.
    let national = {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        format!("1391{:07}", n % 10_000_000)
    };
    let sms = |to: String| json!({"purpose": "login", "channel": "SMS", "to": to, "template": "verify_code"});
    for bad in ["1391234567", "+999123456789"] {
        let (status, v, _) = run.post("/v1/verifications", &sms(bad.to_owned())).await;
        assert_eq!(
            (
                status,
                v["error"]["code"].as_str(),
                v["error"]["field"].as_str()
            ),
            (400, Some("invalid_recipient"), Some("to")),
            "{bad}: {v}"
        );
    }
    let p1 = run.start(sms(format!("+86{national}"))).await;
    let v = run
        .check(p1["id"].as_str().unwrap(), json!({"code": "00000000"}))
        .await;
    assert_eq!(v["attempts_left"].as_i64(), Some(99), "{v}");
    refused_with(
        run.post("/v1/verifications", &sms(format!("86{national}")))
            .await,
        "verification_cooldown",
    );
    let p2 = run
        .start_after_cooldown("demo", sms(national.clone()))
        .await;
    assert_eq!(p2["attempts"], 1, "the budget is the number's: {p2}");
    run.start_after_cooldown("demo", sms(format!("86{national}")))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    refused_with(
        run.post("/v1/verifications", &sms(format!("0086{national}")))
            .await,
        "too_many_verifications",
    );

    // 3. One app spending its hourly sends to a destination leaves another app's untouched.
    let shared = format!("shared-{tag}@example.com");
    let mail = |purpose: &str| json!({"purpose": purpose, "channel": "EMAIL", "to": shared});
    for i in 0..3 {
        run.start_after_cooldown("demo", mail(&format!("p{i}")))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    refused_with(
        run.post("/v1/verifications", &mail("p3")).await,
        "too_many_verifications",
    );
    let (status, v, _) = run
        .post_as(OTHER_APP, OTHER_SECRET, "/v1/verifications", &mail("p0"))
        .await;
    assert_eq!(status, 202, "another app's code: {v}");
    assert_eq!(v["attempts"], 0, "another app's budget: {v}");
    // Its own cooldown applies to it.
    refused_with(
        run.post_as(OTHER_APP, OTHER_SECRET, "/v1/verifications", &mail("p1"))
            .await,
        "verification_cooldown",
    );

    // 4. Channels whose providers post to group chats (robots) are refused unless listed.
    for channel in ["DINGTALK", "FEISHU", "WECOM"] {
        let (status, v, _) = run
            .post(
                "/v1/verifications",
                &json!({"purpose": "login", "channel": channel, "to": "-"}),
            )
            .await;
        assert_eq!(
            (
                status,
                v["error"]["code"].as_str(),
                v["error"]["field"].as_str()
            ),
            (400, Some("group_channel_not_allowed"), Some("channel")),
            "{channel}: {v}"
        );
    }

    // 5. Wrong checks of the current code while a resend is in flight: each one counted is
    //    carried to the new code (none lost between reading the count and superseding).
    let race = format!("race-{tag}@example.com");
    let body = json!({"purpose": "login", "channel": "EMAIL", "to": race});
    let r1 = run.start(body.clone()).await;
    let r1_id = r1["id"].as_str().unwrap().to_owned();
    for _ in 0..2 {
        run.check(&r1_id, json!({"code": "00000000"})).await;
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // Six checkers at once keep the code's row busy for the whole resend.
    let resending = std::sync::atomic::AtomicBool::new(true);
    let hammer = || async {
        let mut counted = 0;
        for _ in 0..15 {
            if !resending.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let v = run.check(&r1_id, json!({"code": "00000000"})).await;
            assert_eq!(v["valid"], false);
            if v["status"] == "pending" || v["status"] == "max_attempts_reached" {
                counted += 1;
            }
        }
        counted
    };
    let resend = async {
        let v = run.start(body.clone()).await;
        resending.store(false, std::sync::atomic::Ordering::Relaxed);
        v
    };
    let checkers = futures::future::join_all((0..6).map(|_| hammer()));
    let (r2, counts) = tokio::join!(resend, checkers);
    let counted = 2 + counts.iter().sum::<i64>();
    let old = api_json(&format!("/v1/verifications/{r1_id}"), LIMITS_API)
        .await
        .unwrap();
    let new = api_json(
        &format!("/v1/verifications/{}", r2["id"].as_str().unwrap()),
        LIMITS_API,
    )
    .await
    .unwrap();
    assert_eq!(old["status"], "superseded", "{old}");
    assert_eq!(old["attempts"], counted, "every wrong check counted: {old}");
    assert_eq!(
        new["attempts"], counted,
        "every wrong check carried to the new code: {new}"
    );

    // The client's idle connections closed first: shutdown need not wait for them.
    drop(run);
    let mut herald = herald;
    herald.signal("TERM");
    assert_eq!(herald.wait_exit(Duration::from_secs(60)), Some(0));
}

/// Every Kafka record written since `since_ms` (every topic but the broker's own, aborted
/// transactions included): how many were scanned, and where a needle occurs in a key, a payload
/// or a header.
fn scan_topics_since(since_ms: i64, needles: &[&[u8]]) -> (usize, Vec<String>) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("leak-scan"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let mut from = rdkafka::TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| !t.name().starts_with("__")) {
        for p in t.partitions() {
            from.add_partition_offset(t.name(), p.id(), rdkafka::Offset::Offset(since_ms))
                .unwrap();
        }
    }
    let starts = consumer
        .offsets_for_times(from, Duration::from_secs(10))
        .unwrap();
    let mut assign = rdkafka::TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for e in starts.elements() {
        let (_, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(10))
            .unwrap();
        if let rdkafka::Offset::Offset(start) = e.offset()
            && start < high
        {
            assign
                .add_partition_offset(e.topic(), e.partition(), rdkafka::Offset::Offset(start))
                .unwrap();
            ends.insert((e.topic().to_owned(), e.partition()), high);
        }
    }
    consumer.assign(&assign).unwrap();
    let found = |hay: &[u8]| {
        needles
            .iter()
            .any(|n| hay.windows(n.len()).any(|w| w == *n))
    };
    let (mut scanned, mut hits) = (0, Vec::new());
    let mut done = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while done.len() < ends.len() {
        assert!(std::time::Instant::now() < deadline, "scan timed out");
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                scanned += 1;
                let mut texts = vec![m.payload().unwrap_or_default(), m.key().unwrap_or_default()];
                if let Some(h) = m.headers() {
                    texts.extend(h.iter().filter_map(|h| h.value));
                }
                if texts.iter().any(|t| found(t)) {
                    hits.push(format!("{}/{}@{}", m.topic(), m.partition(), m.offset()));
                }
                let key = (m.topic().to_owned(), m.partition());
                if m.offset() + 1 >= ends[&key] {
                    done.insert(key);
                }
            }
            Some(Err(e)) => panic!("scan: {e}"),
            None => {
                // The last offsets may be transaction markers: done once the position is there.
                if let Ok(pos) = consumer.position() {
                    for e in pos.elements() {
                        let key = (e.topic().to_owned(), e.partition());
                        if let rdkafka::Offset::Offset(o) = e.offset()
                            && ends.get(&key).is_some_and(|end| o >= *end)
                        {
                            done.insert(key);
                        }
                    }
                }
            }
        }
    }
    (scanned, hits)
}
