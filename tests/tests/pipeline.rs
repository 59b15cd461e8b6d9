//! The walking skeleton on the real stack: an Avro `SendRequested` produced through the schema
//! registry travels accept → render → route → send (SMTP) → deliveries → projector → read API.

use std::collections::HashMap;
use std::time::Duration;

use herald_core::util::{message_id, now_ms};
use herald_schemas::{Channel, Priority, Recipient, SendRequested};
use herald_tests::*;

/// The pipeline tests share the fixed topic names and consumer groups: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn request(to: &str, name: &str) -> SendRequested {
    SendRequested {
        request_id: unique("req"),
        app_id: "demo".into(),
        idempotency_key: None,
        channel: Channel::Email,
        template: Some("welcome".into()),
        params: HashMap::from([("product".into(), "Herald".into())]),
        recipients: vec![Recipient {
            address: to.into(),
            params: HashMap::from([("name".into(), name.into())]),
            timezone: None,
        }],
        content: None,
        send_at: None,
        priority: Priority::Normal,
        expires_at: None,
        metadata: HashMap::new(),
        requested_at: now_ms(),
    }
}

async fn db() -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(&postgres(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn an_email_is_delivered_and_its_status_read_back_then_sigterm_drains() {
    email_end_to_end("kafka", 18_080, 19_464).await
}

#[tokio::test(flavor = "multi_thread")]
async fn on_redis_streams_an_email_is_delivered_and_its_status_read_back_then_sigterm_drains() {
    email_end_to_end("redis", 18_090, 19_474).await
}

async fn email_end_to_end(transport: &str, api: u16, admin: u16) {
    let _serial = SERIAL.lock().await;
    // A copy of the repo's config beside its log file.
    let cfg = std::env::temp_dir().join(format!("herald-e2e-{transport}.toml"));
    std::fs::copy(config_path(), &cfg).unwrap();
    let mut env = herald_env(api, admin);
    env.push(("HERALD_TRANSPORT", transport.to_owned()));
    let mut herald = Herald::start(&cfg, &env);

    let req = request("ada@example.com", "Ada");
    let mid = message_id("demo", &req.request_id, 0);
    publish_on(transport, std::slice::from_ref(&req)).await;

    let body: serde_json::Value = eventually(
        Duration::from_secs(90),
        "message delivered via the read API",
        || async {
            let resp = signed_get(&format!("/v1/messages/{mid}"), api)
                .send()
                .await
                .ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let v: serde_json::Value = resp.json().await.ok()?;
            // Facts come from several topics: wait until the projector has them all.
            let steps = v["timeline"].as_array()?.len();
            (v["status"] == "delivered" && steps >= 4).then_some(v)
        },
    )
    .await;
    assert_eq!(body["provider"], "smtp-local");
    assert_eq!(body["template"], "welcome");
    assert_eq!(body["template_version"], 1);
    assert_eq!(body["recipient"], "ad***@***om", "addresses are masked");
    let timeline: Vec<String> = body["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap().to_owned())
        .collect();
    for s in ["accepted", "rendered", "routed", "delivered"] {
        assert!(
            timeline.contains(&s.to_owned()),
            "{s} missing from timeline {timeline:?}"
        );
    }

    // The mail really reached the SMTP server, rendered.
    let mails = mails_for(std::slice::from_ref(&mid));
    let (count, text) = mails.get(&mid).expect("mail at the SMTP server");
    assert_eq!(*count, 1);
    assert!(
        text.contains("Welcome to Herald, Ada"),
        "rendered subject missing:\n{text}"
    );

    // The request's status: its one message, counted by status.
    let path = format!("/v1/requests/{}", req.request_id);
    let status: serde_json::Value = api_json(&path, api).await.expect("API answer");
    assert_eq!(status["total"], 1, "{status}");
    assert_eq!(status["counts"]["delivered"], 1, "{status}");
    assert_eq!(status["messages"][0]["message_id"], mid.as_str());
    assert!(status["next_cursor"].is_null());
    let missing = signed_get("/v1/requests/no-such-request", api)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // A batch request: five recipients, read back two at a time.
    let mut batch = request("b0@example.com", "B");
    batch.recipients = (0..5)
        .map(|i| Recipient {
            address: format!("b{i}@example.com"),
            params: HashMap::from([("name".into(), format!("B{i}"))]),
            timezone: None,
        })
        .collect();
    publish_on(transport, std::slice::from_ref(&batch)).await;
    let base = format!("/v1/requests/{}", batch.request_id);
    eventually(Duration::from_secs(60), "the batch delivered", || {
        let base = base.clone();
        async move {
            let v: serde_json::Value = api_json(&base, api).await?;
            (v["counts"]["delivered"] == 5).then_some(())
        }
    })
    .await;
    let (mut seen, mut cursor) = (Vec::new(), None::<String>);
    for _ in 0..5 {
        let path = match &cursor {
            Some(c) => format!("{base}?limit=2&cursor={c}"),
            None => format!("{base}?limit=2"),
        };
        let page: serde_json::Value = api_json(&path, api).await.expect("API answer");
        assert_eq!(page["total"], 5);
        seen.extend(
            page["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["message_id"].as_str().unwrap().to_owned()),
        );
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    let want: std::collections::BTreeSet<String> = (0..5)
        .map(|i| message_id("demo", &batch.request_id, i))
        .collect();
    assert_eq!(seen.len(), 5, "pages overlap or miss: {seen:?}");
    assert_eq!(
        seen.into_iter().collect::<std::collections::BTreeSet<_>>(),
        want
    );

    // A provider receipt through the callback endpoint: verified, published, projected; a late
    // `undelivered` lands in the timeline but never moves `delivered` backwards.
    // (The SMTP relay's bounce webhook: smtp-local has a callback secret.)
    let callback = format!("http://127.0.0.1:{}/callbacks/smtp-local", api + 1);
    let receipt = serde_json::json!({
        "message_id": mid, "request_id": req.request_id, "app_id": "demo", "channel": "EMAIL",
        "status": "undelivered", "code": "MAILBOX_FULL", "attempt": 1
    })
    .to_string();
    let key = herald_core::util::webhook_key(CALLBACK_SECRET);
    let ts = now_ms() / 1000;
    // Standard Webhooks ids are unique per receipt (a repeated one is a replay, taken once).
    let wid = format!("rcpt-{mid}");
    let post = |sig: String| {
        reqwest::Client::new()
            .post(&callback)
            .header("webhook-id", &wid)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(receipt.clone())
            .send()
    };
    let forged = post("v1,AAAA".into()).await.unwrap();
    assert_eq!(forged.status(), 401, "an unsigned receipt must be refused");
    let sig = herald_core::util::standard_webhook_signature(&key, &wid, ts, receipt.as_bytes());
    let ok = post(sig).await.unwrap();
    assert_eq!(ok.status(), 200, "{}", ok.text().await.unwrap_or_default());
    let after: serde_json::Value = eventually(
        Duration::from_secs(30),
        "receipt in the timeline",
        || async {
            let v: serde_json::Value = api_json(&format!("/v1/messages/{mid}"), api).await?;
            let has = v["timeline"]
                .as_array()?
                .iter()
                .any(|e| e["status"] == "undelivered");
            has.then_some(v)
        },
    )
    .await;
    assert_eq!(
        after["status"], "delivered",
        "a status never moves backwards"
    );

    // Unauthenticated reads are refused.
    let resp = reqwest::get(format!("http://127.0.0.1:{api}/v1/messages/{mid}"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "missing_auth_header");

    // Metrics are exported on the admin port.
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("herald_stage_records_in_total"),
        "{metrics}"
    );

    herald.signal("TERM");
    assert_eq!(
        herald.wait_exit(Duration::from_secs(10)),
        Some(0),
        "SIGTERM must drain and exit 0 within 10 s"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_flow_loses_nothing_and_sends_nothing_twice() {
    kill_mid_flow("kafka", 18_180, 19_564).await
}

#[tokio::test(flavor = "multi_thread")]
async fn on_redis_streams_sigkill_mid_flow_loses_nothing_and_sends_nothing_twice() {
    kill_mid_flow("redis", 18_190, 19_574).await
}

async fn kill_mid_flow(transport: &str, api: u16, admin: u16) {
    let _serial = SERIAL.lock().await;
    let cfg = std::env::temp_dir().join(format!("herald-kill-{transport}.toml"));
    std::fs::copy(config_path(), &cfg).unwrap();
    let mut env = herald_env(api, admin);
    env.push(("HERALD_TRANSPORT", transport.to_owned()));
    // The restarted process must be the same worker (same consumer name, same transactional id).
    let instance = unique("kill");
    env.retain(|(k, _)| *k != "HERALD_INSTANCE");
    env.push(("HERALD_INSTANCE", instance));
    let mut herald = Herald::start(&cfg, &env);

    let n = 1500;
    let tag = unique("k");
    let reqs: Vec<SendRequested> = (0..n)
        .map(|i| request(&format!("kill{i}-{tag}@example.com"), &format!("n{i}")))
        .collect();
    let ids: Vec<String> = reqs
        .iter()
        .map(|r| message_id("demo", &r.request_id, 0))
        .collect();
    let db = db().await;
    let terminal = |ids: Vec<String>| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT count(*) FROM messages WHERE message_id = ANY($1) AND status_rank = 6",
                &[&ids],
            )
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0)
        }
    };
    let ledger = |sql: &'static str, ids: Vec<String>| {
        let db = &db;
        async move {
            db.query_one(sql, &[&ids])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(0)
        }
    };
    const STARTED: &str =
        "SELECT count(*) FROM send_ledger WHERE message_id = ANY($1) AND started_at IS NOT NULL";
    const FINISHED: &str =
        "SELECT count(*) FROM send_ledger WHERE message_id = ANY($1) AND outcome IS NOT NULL";
    publish_on(transport, &reqs).await;
    // Kill while provider calls are being made (the ledger marks each wave as it starts).
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while ledger(STARTED, ids.clone()).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no provider call started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    herald.signal("KILL");
    assert!(herald.wait_exit(Duration::from_secs(5)).is_some());
    let done_at_kill = ledger(FINISHED, ids.clone()).await;
    assert!(
        done_at_kill < n as i64,
        "the kill came after the flow ended: nothing was tested"
    );

    let _restarted = Herald::start(&cfg, &env);
    eventually(
        Duration::from_secs(180),
        "every message terminal after restart",
        || {
            let ids = ids.clone();
            let t = &terminal;
            async move { (t(ids).await == n as i64).then_some(()) }
        },
    )
    .await;

    let rows = db
        .query(
            "SELECT message_id, status FROM messages WHERE message_id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap();
    let statuses: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mails = mails_for(&ids);
    for id in &ids {
        let status = &statuses[id];
        let sent = mails.get(id).map_or(0, |m| m.0);
        assert!(sent <= 1, "{id} was sent {sent} times");
        match status.as_str() {
            "delivered" => assert_eq!(sent, 1, "{id} delivered but no mail"),
            // A call cut by the kill: recorded as unknown, never silently resent.
            "unknown" => {}
            other => panic!("{id} ended {other}"),
        }
    }
    let delivered = statuses.values().filter(|s| *s == "delivered").count();
    eprintln!(
        "killed with {done_at_kill}/{n} done; after restart {delivered} delivered, {} unknown",
        n - delivered
    );

    // Exactly-once between topics (Kafka transactions in accept, render and route): read with
    // read_committed, every message appears exactly once in each stage's output topic, although
    // the process was killed mid-batch.
    if transport == "kafka" {
        let keys: std::collections::HashSet<String> = (0..n)
            .map(|i| format!("kill{i}-{tag}@example.com"))
            .collect();
        for topic in [
            herald_schemas::topics::ACCEPTED,
            herald_schemas::topics::RENDERED,
            "herald.dispatch.email",
        ] {
            let counts = committed_counts(topic, &keys);
            assert_eq!(counts.len(), n, "{topic}: every message present");
            let dup: Vec<_> = counts.iter().filter(|(_, c)| **c != 1).take(5).collect();
            assert!(
                dup.is_empty(),
                "{topic}: duplicates after the kill: {dup:?}"
            );
        }
    }
}

/// Committed records per key in a topic (read_committed, from the beginning to the current end).
fn committed_counts(
    topic: &str,
    keys: &std::collections::HashSet<String>,
) -> HashMap<String, usize> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("eos-check"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in md.topics()[0].partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .unwrap();
        if high > low {
            tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Offset(low))
                .unwrap();
            ends.insert(p.id(), high);
        }
    }
    consumer.assign(&tpl).unwrap();
    let mut counts = HashMap::new();
    let mut done = std::collections::HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while done.len() < ends.len() && std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                if let Some(k) = m.key().and_then(|k| std::str::from_utf8(k).ok())
                    && keys.contains(k)
                {
                    *counts.entry(k.to_owned()).or_insert(0) += 1;
                }
                // Transaction markers take offsets too: reaching the end is "position >= high".
                if m.offset() + 1 >= ends[&m.partition()] {
                    done.insert(m.partition());
                }
            }
            Some(Err(e)) => panic!("{topic}: {e}"),
            None => {
                // Idle: check positions (the last records may be control markers).
                if let Ok(pos) = consumer.position() {
                    for e in pos.elements() {
                        if let rdkafka::Offset::Offset(o) = e.offset()
                            && o >= ends.get(&e.partition()).copied().unwrap_or(0)
                        {
                            done.insert(e.partition());
                        }
                    }
                }
            }
        }
    }
    assert!(done.len() == ends.len(), "{topic}: did not reach the end");
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn every_stage_binary_starts_alone_and_drains_on_sigterm() {
    let _serial = SERIAL.lock().await;
    for (i, stage) in [
        "accept",
        "render",
        "route",
        "send",
        "delay",
        "projector",
        "api",
        "callback",
        "notify",
    ]
    .iter()
    .enumerate()
    {
        let bin = herald_bin().with_file_name(format!("herald-{stage}"));
        assert!(bin.exists(), "{} missing", bin.display());
        let admin = 19_700 + i as u16;
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("--config")
            .arg(config_path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        for (k, v) in herald_env(18_300 + 2 * i as u16, admin) {
            cmd.env(k, v);
        }
        let mut child = Herald {
            child: cmd.spawn().expect("spawn stage binary"),
        };
        eventually(
            Duration::from_secs(60),
            &format!("herald-{stage} /health"),
            || async move {
                let r = reqwest::get(format!("http://127.0.0.1:{admin}/health"))
                    .await
                    .ok()?;
                r.status().is_success().then_some(())
            },
        )
        .await;
        child.signal("TERM");
        assert_eq!(
            child.wait_exit(Duration::from_secs(10)),
            Some(0),
            "herald-{stage} did not drain and exit 0"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scheduled_email_waits_in_the_delay_tier_and_is_sent_on_time() {
    let _serial = SERIAL.lock().await;
    let (api, admin) = (18_280, 19_664);
    let cfg = std::env::temp_dir().join("herald-scheduled.toml");
    std::fs::copy(config_path(), &cfg).unwrap();
    let mut herald = Herald::start(&cfg, &herald_env(api, admin));

    // Warm the pipeline first (topics, consumer groups, transactional ids on a fresh broker), so
    // the timing below measures the delay tier, not start-up.
    let warm = request("warm@example.com", "Warm");
    let warm_id = message_id("demo", &warm.request_id, 0);
    publish_on("kafka", std::slice::from_ref(&warm)).await;
    eventually(Duration::from_secs(90), "warm-up message delivered", || {
        let path = format!("/v1/messages/{warm_id}");
        async move {
            let v: serde_json::Value = api_json(&path, api).await?;
            (v["status"] == "delivered").then_some(())
        }
    })
    .await;

    let mut req = request("later@example.com", "Later");
    let send_at = now_ms() + 4_000;
    req.send_at = Some(send_at);
    let mid = message_id("demo", &req.request_id, 0);
    publish_on("kafka", std::slice::from_ref(&req)).await;

    // Held: nothing reaches the SMTP server before its time.
    while now_ms() < send_at - 200 {
        assert!(
            mails_for(std::slice::from_ref(&mid)).is_empty(),
            "sent before its time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let done: serde_json::Value = eventually(
        Duration::from_secs(60),
        "delivered after send_at",
        || async {
            let v: serde_json::Value = api_json(&format!("/v1/messages/{mid}"), api).await?;
            (v["status"] == "delivered").then_some(v)
        },
    )
    .await;
    let delivered_at = event_at(&done, "delivered").expect("delivered in the timeline");
    assert!(
        delivered_at >= send_at,
        "sent {} ms early",
        send_at - delivered_at
    );
    // Fired within 1 s of its time: the delay tier released it and render took it by then.
    let rendered_at = event_at(&done, "rendered").expect("rendered in the timeline");
    assert!(
        (send_at..send_at + 1_000).contains(&rendered_at),
        "fired {} ms after its time",
        rendered_at - send_at
    );
    // Released when due (the delay stage's unit tests pin the exact step); the margin here covers
    // render, route and the SMTP call after release on a loaded two-core box.
    assert!(
        delivered_at - send_at < 3_000,
        "sent {} ms late",
        delivered_at - send_at
    );
    assert_eq!(
        mails_for(std::slice::from_ref(&mid)).get(&mid).map(|m| m.0),
        Some(1)
    );

    let timeline: Vec<&str> = done["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["status"].as_str())
        .collect();
    assert!(
        timeline.contains(&"scheduled"),
        "no scheduled step in {timeline:?}"
    );

    herald.signal("TERM");
    assert_eq!(herald.wait_exit(Duration::from_secs(10)), Some(0));
}
