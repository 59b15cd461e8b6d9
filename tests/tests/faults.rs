//! Faults of the dependencies (ARCHITECTURE.md §4.1, "nothing is lost"): PostgreSQL crashes and
//! comes back while Herald runs. Every stage pauses while it is down and resumes by itself —
//! no operator action, no Herald restart — and `/health` tells the truth throughout.

use std::time::Duration;

use herald_tests::*;
use serde_json::{Value, json};

/// One Herald at a time: they share the stage groups, and one test restarts PostgreSQL.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn send_email(api: u16, what: &str) -> String {
    let to = format!("{}@example.com", unique(what));
    let body = serde_json::to_vec(&json!({"channel": "EMAIL", "template": "welcome",
        "params": {"name": "Ada", "product": "Herald"}, "recipients": [{"address": to}]}))
    .unwrap();
    let v: Value = eventually(
        Duration::from_secs(60),
        "the gateway takes a request",
        || {
            let body = body.clone();
            async move {
                let r = signed("POST", "/v1/messages", &body, api)
                    .send()
                    .await
                    .ok()?;
                (r.status().as_u16() == 202).then_some(())?;
                r.json().await.ok()
            }
        },
    )
    .await;
    v["message_ids"][0].as_str().unwrap().to_owned()
}

async fn delivered(api: u16, id: &str, what: &str) {
    let path = format!("/v1/messages/{id}");
    eventually(Duration::from_secs(90), what, || {
        let path = path.clone();
        async move {
            let v = api_json(&path, api).await?;
            (v["status"] == "delivered").then_some(())
        }
    })
    .await;
}

async fn health(url: &str) -> (u16, Value) {
    match reqwest::get(url).await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

#[tokio::test]
async fn every_connection_carries_the_statement_timeout() {
    let db = herald_core::runtime::connect_postgres(&postgres())
        .await
        .expect("postgres (scripts/stack up)");
    let row = db.query_one("SHOW statement_timeout", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "30s");
    // And it bites: a statement past it is canceled by the server (a transient error).
    let cancel = db
        .batch_execute("SET statement_timeout = 200; SELECT pg_sleep(2)")
        .await
        .unwrap_err();
    assert_eq!(
        cancel.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
    assert!(matches!(
        herald_core::worker::StageError::postgres("t", cancel),
        herald_core::worker::StageError::Transient(_)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_crash_and_restart_needs_no_operator_action() {
    let _serial = SERIAL.lock().await;
    let (api, admin) = (18_570, 19_970);
    let cfg = std::env::temp_dir().join("herald-faults-pg.toml");
    std::fs::copy(config_path(), &cfg).unwrap();
    let mut herald = Herald::start(&cfg, &herald_env(api, admin));
    let before = send_email(api, "before").await;
    delivered(api, &before, "a message before the crash").await;
    let ready = format!("http://127.0.0.1:{admin}/health/ready");
    assert_eq!(health(&ready).await.0, 200);

    // A request to publish straight to Kafka while PostgreSQL is down (encoded now: the
    // stack's registry keeps its schemas in PostgreSQL).
    let during = herald_schemas::SendRequested {
        request_id: unique("during"),
        app_id: "demo".into(),
        idempotency_key: None,
        channel: herald_schemas::Channel::Email,
        template: Some("welcome".into()),
        params: [("name", "Ada"), ("product", "Herald")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        recipients: vec![herald_schemas::Recipient {
            address: format!("{}@example.com", unique("during")),
            params: Default::default(),
            timezone: None,
        }],
        content: None,
        send_at: None,
        priority: herald_schemas::Priority::Normal,
        expires_at: None,
        metadata: Default::default(),
        requested_at: herald_core::util::now_ms(),
    };
    let encoded = encode_requests(std::slice::from_ref(&during)).await;

    // PostgreSQL dies the way a crash kills it, stays down a few seconds, and comes back.
    let stack = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack");
    let restart = std::thread::spawn(move || {
        std::process::Command::new(stack)
            .args(["restart-postgres", "4"])
            .status()
            .expect("scripts/stack restart-postgres")
    });
    // While it is down, readiness says so (and names PostgreSQL); liveness does not flap.
    let (code, body) = eventually(Duration::from_secs(10), "readiness DOWN", || {
        let ready = ready.clone();
        async move {
            let (c, b) = health(&ready).await;
            (c == 503).then_some((c, b))
        }
    })
    .await;
    assert_eq!(code, 503);
    assert_eq!(body["services"]["postgres"]["status"], "DOWN", "{body}");
    let (live, _) = health(&format!("http://127.0.0.1:{admin}/health/live")).await;
    assert_eq!(live, 200);
    // The registry keeps its schemas in PostgreSQL too, and answers 500 while it cannot read
    // them: a process meeting a schema id for the first time now must wait, not take the id
    // for unknown and dead-letter a good record (what a chaos run caught).
    let schema_id = u32::from_be_bytes(encoded[0].payload[1..5].try_into().unwrap());
    let fresh = herald_core::codec::RegistryResolver::new(&registry()).unwrap();
    let refused = eventually(Duration::from_secs(10), "the registry failing", || {
        let fresh = &fresh;
        async move {
            use herald_core::codec::SchemaResolver;
            fresh.fetch(schema_id).await.err()
        }
    })
    .await;
    assert!(
        refused.is_transient(),
        "a registry that cannot read its store is waited for: {refused}"
    );
    // A request published straight to Kafka while PostgreSQL is down waits; it is not ended.
    publish_records("kafka", encoded).await;
    assert!(restart.join().unwrap().success(), "postgres restarted");

    // Back: the gateway, every stage and the projector reconnect on their own.
    let after = send_email(api, "after").await;
    delivered(
        api,
        &after,
        "a message after the restart, with no Herald restart",
    )
    .await;
    eventually(Duration::from_secs(30), "readiness UP again", || {
        let ready = ready.clone();
        async move { (health(&ready).await.0 == 200).then_some(()) }
    })
    .await;
    let (code, body) = health(&format!("http://127.0.0.1:{api}/health")).await;
    assert_eq!(code, 200, "{body}");
    let id = herald_core::util::message_id("demo", &during.request_id, 0);
    delivered(api, &id, "the message published during the outage").await;
    // No stage took the outage for a bad record.
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let isolated: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("herald_stage_poison_records_total"))
        .collect();
    assert!(isolated.is_empty(), "{isolated:?}");
    herald.signal("TERM");
    assert!(herald.wait_exit(Duration::from_secs(20)).is_some());
}

/// What PostgreSQL holds of the projector's positions.
async fn projector_offsets(db: &tokio_postgres::Client) -> Vec<(String, i32, i64)> {
    db.query(
        "SELECT topic, partition, next_offset FROM projector_offsets",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_projector_projects_again_what_postgresql_lost() {
    let _serial = SERIAL.lock().await;
    let (api, admin) = (18_575, 19_975);
    let cfg = std::env::temp_dir().join("herald-faults-projector.toml");
    std::fs::copy(config_path(), &cfg).unwrap();
    let db = herald_core::runtime::connect_postgres(&postgres())
        .await
        .expect("postgres (scripts/stack up)");
    let mut herald = Herald::start(&cfg, &herald_env(api, admin));
    let first = send_email(api, "kept").await;
    delivered(api, &first, "a message projected before the loss").await;
    let kept = projector_offsets(&db).await;

    let lost = send_email(api, "lost").await;
    delivered(api, &lost, "a message whose rows PostgreSQL will lose").await;
    herald.signal("TERM");
    assert!(herald.wait_exit(Duration::from_secs(20)).is_some());

    // PostgreSQL loses every projector commit after `kept` (what an asynchronous commit lost in
    // a crash looks like), while Kafka's committed offsets are already past them.
    db.execute("DELETE FROM projector_offsets", &[])
        .await
        .unwrap();
    for (topic, partition, next) in &kept {
        db.execute(
            "INSERT INTO projector_offsets (topic, partition, next_offset) VALUES ($1, $2, $3)",
            &[topic, partition, next],
        )
        .await
        .unwrap();
    }
    for table in ["message_events", "delivery_attempts", "messages"] {
        db.execute(
            &format!("DELETE FROM {table} WHERE message_id = $1"),
            &[&lost],
        )
        .await
        .unwrap();
    }

    // On start, the projector moves its consumer back to the stored positions.
    let _herald = Herald::start(&cfg, &herald_env(api, admin));
    delivered(api, &lost, "the lost rows, projected again").await;
    // The topics are replayed in batches of their own: the row can say `delivered` a moment
    // before the earlier steps' events are back.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let events = loop {
        let events: i64 = db
            .query_one(
                "SELECT count(*) FROM message_events WHERE message_id = $1",
                &[&lost],
            )
            .await
            .unwrap()
            .get(0);
        if events >= 4 || std::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(events >= 4, "the whole timeline is back: {events} events");
    let v = api_json(&format!("/v1/messages/{first}"), api)
        .await
        .unwrap();
    assert_eq!(v["status"], "delivered", "{v}");
}

/// Mails at the SMTP server for message `id`.
fn mails_with(id: &str) -> usize {
    mails_for(&[id.to_owned()]).get(id).map_or(0, |m| m.0)
}

const REFUSE_OUTCOMES: &str = "
CREATE OR REPLACE FUNCTION herald_test_refuse_outcomes() RETURNS trigger AS $$
BEGIN
  IF NEW.outcome IS NOT NULL AND OLD.outcome IS NULL THEN
    RAISE EXCEPTION 'not now (test)' USING ERRCODE = '57P03';
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS herald_test_refuse_outcomes ON send_ledger;
CREATE TRIGGER herald_test_refuse_outcomes BEFORE UPDATE ON send_ledger
  FOR EACH ROW EXECUTE FUNCTION herald_test_refuse_outcomes();";

const ACCEPT_OUTCOMES: &str = "DROP TRIGGER IF EXISTS herald_test_refuse_outcomes ON send_ledger";

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_the_ledger_cannot_record_yet_is_kept_until_it_can() {
    let _serial = SERIAL.lock().await;
    let (api, admin) = (18_580, 19_980);
    let cfg = std::env::temp_dir().join("herald-faults-ledger.toml");
    std::fs::copy(config_path(), &cfg).unwrap();
    let db = herald_core::runtime::connect_postgres(&postgres())
        .await
        .expect("postgres (scripts/stack up)");
    let _herald = Herald::start(&cfg, &herald_env(api, admin));
    let warm = send_email(api, "warm").await;
    delivered(api, &warm, "a first message (the ledger exists)").await;

    // PostgreSQL refuses, for a while, to record outcomes (as it does while shutting down).
    db.batch_execute(REFUSE_OUTCOMES).await.unwrap();
    let body = tokio::spawn(async move {
        let id = send_email(api, "refused").await;
        eventually(Duration::from_secs(60), "the mail is sent", || {
            let id = id.clone();
            async move { (mails_with(&id) == 1).then_some(()) }
        })
        .await;
        // The call was made and its answer is held: the send stage retries the refused write.
        let metrics = format!("http://127.0.0.1:{admin}/metrics");
        eventually(Duration::from_secs(30), "a refused outcome write", || {
            let metrics = metrics.clone();
            async move {
                let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
                text.lines()
                    .any(|l| {
                        l.starts_with("herald_stage_errors_total") && l.contains("ledger_finish")
                    })
                    .then_some(())
            }
        })
        .await;
        id
    })
    .await;
    db.batch_execute(ACCEPT_OUTCOMES).await.unwrap();
    let id = body.unwrap();

    delivered(
        api,
        &id,
        "the held answer, recorded once PostgreSQL takes it",
    )
    .await;
    let outcomes: Vec<Option<String>> = db
        .query(
            "SELECT outcome FROM send_ledger WHERE message_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(outcomes.len(), 1, "one attempt: {outcomes:?}");
    assert!(
        outcomes[0].as_deref().is_some_and(|o| o != "unknown"),
        "{outcomes:?}"
    );
    assert_eq!(mails_with(&id), 1, "sent exactly once");
}

/// An alert endpoint that accepts connections and answers nothing until `answer` is set; then
/// it answers 200 and records each `webhook-id` it was sent.
struct AlertSink {
    answer: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ids: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl AlertSink {
    fn start(port: u16) -> AlertSink {
        use std::io::{BufRead, BufReader, Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let sink = AlertSink {
            answer: Default::default(),
            accepted: Default::default(),
            ids: Default::default(),
        };
        let (answer, accepted, ids) =
            (sink.answer.clone(), sink.accepted.clone(), sink.ids.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                accepted.fetch_add(1, Ordering::SeqCst);
                if !answer.load(Ordering::SeqCst) {
                    held.push(stream); // never answered
                    continue;
                }
                let mut reader = BufReader::new(stream);
                let (mut len, mut id) = (0usize, None);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if lower.starts_with("webhook-id:") {
                        id = line.split_once(':').map(|(_, v)| v.trim().to_owned());
                    }
                }
                let mut body = vec![0; len];
                let _ = reader.read_exact(&mut body);
                if let Some(id) = id {
                    ids.lock().unwrap().insert(id);
                }
                let _ = reader.get_mut().write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        });
        sink
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_alert_endpoint_never_slows_sending_and_alerts_arrive_later() {
    use std::sync::atomic::Ordering;
    let _serial = SERIAL.lock().await;
    let sink = AlertSink::start(18_199);
    let (api, admin) = (18_585, 19_985);
    let cfg = std::env::temp_dir().join("herald-faults-alerts.toml");
    let text = std::fs::read_to_string(config_path()).unwrap();
    let text = text.replacen(
        "webhook_url = \"http://127.0.0.1:18100/_alerts\"",
        "webhook_url = \"http://127.0.0.1:18199/alerts\"",
        1,
    );
    assert!(text.contains("18199/alerts"), "config layout changed");
    std::fs::write(&cfg, text).unwrap();
    let mut env = herald_env(api, admin);
    env.push(("HERALD_OUTBOUND_ALLOW", "127.0.0.1:18199".to_owned()));
    let _herald = Herald::start(&cfg, &env);
    let warm = send_email(api, "warm").await;
    delivered(api, &warm, "a first message").await;

    // Six SMS the provider refuses with the code the alert rule watches.
    let http = reqwest::Client::new();
    let fault =
        json!({"kind": "error", "code": "isv.SMS_SIGNATURE_ILLEGAL", "message": "签名不合法"});
    let r = http
        .post(format!("{}/_control/aliyun/faults", sim_url()))
        .json(&json!(vec![fault; 6]))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    // HIGH: a code is exempt from the SMS quiet hours of ops/herald.toml (22:00–08:00 Shanghai),
    // which would otherwise hold these messages whenever the suite runs after 14:00 UTC.
    let mut ids = Vec::new();
    for i in 0..6 {
        let n = herald_core::util::now_ms() % 10_000_000;
        let body = serde_json::to_vec(&json!({"channel": "SMS", "template": "verify_code",
            "params": {"code": "482913"}, "priority": "HIGH",
            "recipients": [{"address": format!("139{n:07}{i}")}]}))
        .unwrap();
        let r = signed("POST", "/v1/messages", &body, api)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        let v: Value = r.json().await.unwrap();
        ids.push(v["message_ids"][0].as_str().unwrap().to_owned());
    }
    // Every message ends while the alert endpoint has answered nothing (each alert call would
    // wait out its timeout, three times, if it were made in the send path).
    for id in &ids {
        let path = format!("/v1/messages/{id}");
        eventually(Duration::from_secs(60), "failed, the alert pending", || {
            let path = path.clone();
            async move {
                let v = api_json(&path, api).await?;
                (v["status"] == "failed").then_some(())
            }
        })
        .await;
    }
    assert!(sink.ids.lock().unwrap().is_empty());

    // The endpoint comes back: the outbox delivers each alert.
    sink.answer.store(true, Ordering::SeqCst);
    eventually(Duration::from_secs(60), "every alert delivered", || async {
        let got = sink.ids.lock().unwrap().clone();
        ids.iter()
            .all(|id| got.iter().any(|w| w.contains(id.as_str())))
            .then_some(())
    })
    .await;
    assert!(sink.accepted.load(Ordering::SeqCst) >= 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_purges_what_expired_and_nothing_an_unfinished_message_needs() {
    let _serial = SERIAL.lock().await;
    // Every table exists once Herald has run.
    let (api, admin) = (18_590, 19_990);
    let cfg = std::env::temp_dir().join("herald-faults-retention.toml");
    std::fs::copy(config_path(), &cfg).unwrap();
    {
        let _herald = Herald::start(&cfg, &herald_env(api, admin));
        let warm = send_email(api, "warm").await;
        delivered(api, &warm, "a first message").await;
    }
    let db = herald_core::runtime::connect_postgres(&postgres())
        .await
        .expect("postgres (scripts/stack up)");
    let (done, open, fresh) = (unique("rt-done"), unique("rt-open"), unique("rt-fresh"));
    for (id, status, age) in [
        (&done, "delivered", "100 days"),
        (&open, "sent", "100 days"),
        (&fresh, "delivered", "1 day"),
    ] {
        db.execute(
            "INSERT INTO messages (message_id, request_id, app_id, channel, status, status_rank,
                                   created_at, updated_at)
             VALUES ($1, $1, 'demo', 'SMS', $2, 5, now() - ($3::text)::interval, now() - ($3::text)::interval)",
            &[id, &status, &age],
        )
        .await
        .unwrap();
        db.execute(
            "INSERT INTO message_events (event_id, message_id, status, at, stage, attempt)
             VALUES ($1, $1, $2, now() - ($3::text)::interval, 'send', 0)",
            &[id, &status, &age],
        )
        .await
        .unwrap();
        db.execute(
            "INSERT INTO delivery_attempts (message_id, attempt, outcome, status, at)
             VALUES ($1, 1, 'succeeded', $2, now() - ($3::text)::interval)",
            &[id, &status, &age],
        )
        .await
        .unwrap();
        db.execute(
            "INSERT INTO send_ledger (message_id, attempt, provider, claimed_at, started_at, finished_at)
             VALUES ($1, 1, 'aliyun-sim', now() - ($2::text)::interval, now() - ($2::text)::interval, now() - ($2::text)::interval)",
            &[id, &age],
        )
        .await
        .unwrap();
    }
    let (gate_old, gate_scheduled) = (unique("rt-gate-old"), unique("rt-gate-sched"));
    db.execute(
        "INSERT INTO message_gate (message_id, state, at) VALUES
           ($1, 'canceled', now() - interval '800 days'), ($2, 'canceled', now() - interval '40 days')",
        &[&gate_old, &gate_scheduled],
    )
    .await
    .unwrap();
    let (key_old, key_new) = (unique("rt-key-old"), unique("rt-key-new"));
    db.execute(
        "INSERT INTO request_keys (app_id, key, request_id, source, at) VALUES
           ('demo', $1, 'r1', 'kafka', now() - interval '8 days'), ('demo', $2, 'r2', 'kafka', now() - interval '1 day')",
        &[&key_old, &key_new],
    )
    .await
    .unwrap();
    let (alert_sent, alert_pending) = (unique("rt-alert-sent"), unique("rt-alert-pending"));
    db.execute(
        "INSERT INTO webhook_outbox (kind, id, destination, payload, created_at, delivered_at) VALUES
           ('alert', $1, 'r', '{}', now() - interval '9 days', now() - interval '8 days'),
           ('alert', $2, 'r', '{}', now() - interval '1 day', NULL)",
        &[&alert_sent, &alert_pending],
    )
    .await
    .unwrap();

    let retention = herald_core::config::RetentionConfig {
        batch_rows: 2, // several small statements per table
        ..Default::default()
    };
    herald_domain::retention::round(
        &postgres(),
        &retention,
        herald_domain::retention::DOMAIN_PURGES,
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();

    let count = |sql: &'static str, id: String| {
        let db = &db;
        async move {
            let n: i64 = db.query_one(sql, &[&id]).await.unwrap().get(0);
            n
        }
    };
    let messages = "SELECT count(*) FROM messages WHERE message_id = $1";
    let events = "SELECT count(*) FROM message_events WHERE message_id = $1";
    let attempts = "SELECT count(*) FROM delivery_attempts WHERE message_id = $1";
    let ledger = "SELECT count(*) FROM send_ledger WHERE message_id = $1";
    let gate = "SELECT count(*) FROM message_gate WHERE message_id = $1";
    let keys = "SELECT count(*) FROM request_keys WHERE key = $1";
    let alerts = "SELECT count(*) FROM webhook_outbox WHERE id = $1";
    // Expired and finished: gone, with its timeline, attempts and ledger.
    for sql in [messages, events, attempts, ledger] {
        assert_eq!(count(sql, done.clone()).await, 0, "{sql} for {done}");
    }
    // Old but unfinished (held for a receipt), and recent: kept.
    for id in [&open, &fresh] {
        for sql in [messages, events, attempts, ledger] {
            assert_eq!(count(sql, id.clone()).await, 1, "{sql} for {id}");
        }
    }
    assert_eq!(count(gate, gate_old).await, 0);
    assert_eq!(
        count(gate, gate_scheduled).await,
        1,
        "a cancel outlives the furthest schedule"
    );
    assert_eq!(count(keys, key_old).await, 0);
    assert_eq!(count(keys, key_new).await, 1);
    assert_eq!(count(alerts, alert_sent).await, 0);
    assert_eq!(count(alerts, alert_pending).await, 1);
}

/// Waits until message `id` has `status`; its JSON.
async fn until_status(api: u16, id: &str, status: &str, within: Duration) -> Value {
    let path = format!("/v1/messages/{id}");
    eventually(within, &format!("{id} {status}"), || {
        let path = path.clone();
        async move {
            let v = api_json(&path, api).await?;
            (v["status"] == status).then_some(v)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receipt_that_never_comes_ends_the_wait_unknown() {
    let _serial = SERIAL.lock().await;
    let (api, admin) = (18_587, 19_987);
    let cfg = std::env::temp_dir().join("herald-faults-receipts.toml");
    let text = std::fs::read_to_string(config_path()).unwrap().replacen(
        "unknown_outcome = \"hold_for_receipt\"",
        "unknown_outcome = \"hold_for_receipt\"\nreceipt_timeout_secs = 6",
        1,
    );
    assert!(
        text.contains("receipt_timeout_secs = 6"),
        "config layout changed"
    );
    std::fs::write(&cfg, text).unwrap();
    let _herald = Herald::start(&cfg, &herald_env(api, admin));
    let http = reqwest::Client::new();
    let token = herald_simulators::credential("HERALD_SIM_CALLBACK_TOKEN");
    let warm = send_email(api, "warm-receipts").await;
    delivered(api, &warm, "a first message").await;
    let url = format!("http://127.0.0.1:{}/callbacks/aliyun-sim/{token}", api + 1);
    let r = http
        .put(format!("{}/_control/aliyun/receipts", sim_url()))
        .json(&json!({ "url": url }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    // HIGH: exempt from the SMS quiet hours, whatever the hour the suite runs at.
    let sms = |tag: u64| {
        let n = herald_core::util::now_ms() % 10_000_000;
        serde_json::to_vec(&json!({"channel": "SMS", "template": "verify_code",
            "params": {"code": "482913"}, "priority": "HIGH",
            "recipients": [{"address": format!("138{n:07}{tag}")}]}))
        .unwrap()
    };
    let post = |body: Vec<u8>| async move {
        let r = signed("POST", "/v1/messages", &body, api)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        let v: Value = r.json().await.unwrap();
        v["message_ids"][0].as_str().unwrap().to_owned()
    };

    // Accepted by the provider, and its receipt never comes: `sent`, then `unknown` with the
    // reason, once the channel's receipt timeout has passed.
    let r = http
        .post(format!("{}/_control/aliyun/faults", sim_url()))
        .json(&json!([{"kind": "no_receipt"}]))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let silent = post(sms(1)).await;
    until_status(api, &silent, "sent", Duration::from_secs(60)).await;
    let v = until_status(api, &silent, "unknown", Duration::from_secs(40)).await;
    let codes: Vec<&str> = v["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"]["code"].as_str())
        .collect();
    assert!(codes.contains(&"receipt_timeout"), "{v}");
    assert_eq!(v["attempts"], 1, "never resent: {v}");

    // One whose receipt comes is delivered, and stays so past the deadline: the receipt ended
    // its wait.
    let heard = post(sms(2)).await;
    until_status(api, &heard, "delivered", Duration::from_secs(30)).await;
    let db = herald_core::runtime::connect_postgres(&postgres())
        .await
        .unwrap();
    let waiting = |id: String| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT count(*) FROM receipt_waits WHERE message_id = $1 AND NOT received",
                &[&id],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    assert_eq!(
        waiting(heard.clone()).await,
        0,
        "the receipt ended the wait"
    );
    assert_eq!(
        waiting(silent.clone()).await,
        0,
        "the deadline ended the wait"
    );
    tokio::time::sleep(Duration::from_secs(12)).await;
    let v = api_json(&format!("/v1/messages/{heard}"), api)
        .await
        .unwrap();
    assert_eq!(v["status"], "delivered", "{v}");
    assert!(
        !v.to_string().contains("receipt_timeout"),
        "no deadline for a message whose receipt came: {v}"
    );
}

/// Issue 29 (a Redis chaos run left 1,000 messages pending for ever), replayed in the order that
/// run met its faults: a batch of rendered messages is handed to a route worker that then dies
/// (the test reads them as that worker and never acknowledges), Redis is SIGKILLed and comes
/// back from its append-only file, and the route stage is started again while the schema
/// registry is down. The route stage must wait for the registry instead of exiting (a stage
/// that exits at start stays down wherever nothing restarts it: that is how the chaos run lost
/// its route workers), and take the dead worker's entries over once they are `claim_idle` old.
/// Every message ends delivered; nothing stays pending.
#[tokio::test(flavor = "multi_thread")]
async fn redis_entries_of_a_dead_worker_are_taken_over_after_redis_and_registry_restarts() {
    let _serial = SERIAL.lock().await;
    let (api, admin, route_admin) = (18_590, 19_990, 19_991);
    let cfg = std::env::temp_dir().join("herald-faults-redis.toml");
    let text = std::fs::read_to_string(config_path()).unwrap().replacen(
        "[redis]\n",
        "[redis]\nclaim_idle_secs = 3\n",
        1,
    );
    assert!(
        text.contains("claim_idle_secs = 3"),
        "config layout changed"
    );
    std::fs::write(&cfg, text).unwrap();
    let mut env = herald_env(api, admin);
    env.push(("HERALD_TRANSPORT", "redis".into()));
    // Every stage but route, in one process.
    let _rest = Herald::start_with(
        &cfg,
        &env,
        &[
            "--stages",
            "accept,render,send,delay,projector,api,callback,notify",
        ],
        "rest.",
    );
    api_up(api).await;
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(send_email(api, "held").await);
    }
    for id in &ids {
        eventually(Duration::from_secs(90), "rendered", || async move {
            let v = api_json(&format!("/v1/messages/{id}"), api).await?;
            (v["status"] == "rendered").then_some(())
        })
        .await;
    }

    // A route worker takes the batch and dies before acknowledging it.
    let redis = redis::Client::open(redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let dead = unique("route-dead");
    let _: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("herald.rendered")
        .arg("herald-route")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await;
    let mut taken = 0usize;
    loop {
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("herald-route")
            .arg(&dead)
            .arg("COUNT")
            .arg(10_000)
            .arg("STREAMS")
            .arg("herald.rendered")
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        let n: usize = reply.map_or(0, |r| r.keys.iter().map(|k| k.ids.len()).sum());
        if n == 0 {
            break;
        }
        taken += n;
    }
    assert!(taken >= ids.len(), "the dead worker took {taken} entries");
    drop(conn);

    // Redis dies as a crash kills it and comes back from its append-only file (written every
    // second: wait for the hand-over to be in it).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let stack = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack");
    assert!(
        std::process::Command::new(&stack)
            .args(["restart-redis", "2"])
            .status()
            .unwrap()
            .success()
    );
    let pending_of = |consumer: String| async move {
        let mut conn = redis::Client::open(redis_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let consumers: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg("herald.rendered")
            .arg("herald-route")
            .query_async(&mut conn)
            .await
            .unwrap();
        consumers
            .iter()
            .find(|c| {
                c.get("name")
                    .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                    .as_deref()
                    == Some(consumer.as_str())
            })
            .and_then(|c| c.get("pending"))
            .and_then(|v| redis::from_redis_value_ref::<i64>(v).ok())
            .unwrap_or(0)
    };
    let stranded = pending_of(dead.clone()).await;
    assert!(
        stranded >= ids.len() as i64,
        "after the restart the dead worker still holds its entries ({stranded})"
    );

    // The registry dies; the route stage starts while it is away.
    let registry_back = std::thread::spawn(move || {
        std::process::Command::new(&stack)
            .args(["restart-registry", "8"])
            .status()
            .unwrap()
            .success()
    });
    eventually(Duration::from_secs(10), "the registry is down", || async {
        reqwest::get(format!("{}/subjects", registry()))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let mut route_env = herald_env(api, route_admin);
    route_env.push(("HERALD_TRANSPORT", "redis".into()));
    let mut route = Herald::start_with(&cfg, &route_env, &["--stages", "route"], "route.");
    assert!(registry_back.join().unwrap(), "the registry came back");
    assert_eq!(
        route.wait_exit(Duration::from_secs(3)),
        None,
        "the route stage exited while the registry was away"
    );

    for id in &ids {
        delivered(api, id, "a message the dead worker held").await;
    }
    assert_eq!(
        pending_of(dead).await,
        0,
        "the dead worker's entries were taken over"
    );
    let metrics = reqwest::get(format!("http://127.0.0.1:{route_admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("herald_start_retries_total{dependency=\"registry and topics\"}"),
        "the route stage waited for the registry"
    );
    eventually(
        Duration::from_secs(30),
        "the oldest pending entry's age reported",
        || async move {
            let m = reqwest::get(format!("http://127.0.0.1:{route_admin}/metrics"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            m.lines()
                .any(|l| {
                    l.starts_with("herald_stage_pending_oldest_seconds{")
                        && l.contains("group=\"herald-route\"")
                })
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        route.wait_exit(Duration::from_millis(10)),
        None,
        "route still runs"
    );
}
