//! Hostile input against the real stack (promises 5, 8 and 9): whatever a caller sends — through
//! the gateway or straight to Kafka — gets its refusal (a 4xx in the JSON error shape) or its
//! terminal `failed` / dead letter with the original bytes, and a normal message sent right
//! after it is still delivered. Tenants stay apart, replays count once, no secret leaves in a
//! reason, and caller-chosen destinations never reach loopback or private addresses.

use std::collections::HashMap;
use std::time::Duration;

use herald_core::codec::{Codec, RegistryResolver};
use herald_core::transport::Transport;
use herald_core::transport::kafka::{KafkaSettings, KafkaTransport};
use herald_core::util::message_id;
use herald_core::worker::record;
use herald_schemas::*;
use herald_tests::*;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{Value, json};

/// The tests here share consumer groups with the other pipeline tests: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A second tenant, with a daily quota of two messages.
const TENANT_B: &str = "tenant-b";
const TENANT_B_SECRET: &str = "tenant-b-secret-7f3a9c";

struct Run {
    api: u16,
    herald: Herald,
    log: std::path::PathBuf,
    http: reqwest::Client,
}

impl Run {
    async fn start(name: &str, api: u16, admin: u16) -> Run {
        let cfg = std::env::temp_dir().join(format!("herald-hostile-{name}.toml"));
        let mut text = std::fs::read_to_string(config_path()).unwrap().replacen(
            "[api]\n",
            "[api]\nheader_read_timeout_ms = 1000\nmax_streams_per_app = 2\n",
            1,
        );
        assert!(
            text.contains("header_read_timeout_ms"),
            "config layout changed"
        );
        text.push_str(&format!(
            "\n[[apps]]\nid = \"{TENANT_B}\"\nsecret_env = \"HERALD_APP_TENANT_B_SECRET\"\ndaily_quota = 2\n"
        ));
        std::fs::write(&cfg, text).unwrap();
        let mut env = herald_env(api, admin);
        env.push(("HERALD_APP_TENANT_B_SECRET", TENANT_B_SECRET.to_owned()));
        let herald = Herald::start(&cfg, &env);
        let run = Run {
            api,
            herald,
            log: cfg.with_extension("log"),
            http: reqwest::Client::new(),
        };
        let health = format!("http://127.0.0.1:{api}/health");
        eventually(Duration::from_secs(60), "the API answers", || {
            let (http, health) = (run.http.clone(), health.clone());
            async move { http.get(&health).send().await.ok().map(|_| ()) }
        })
        .await;
        run
    }

    fn stop(mut self) {
        self.herald.signal("TERM");
        assert!(self.herald.wait_exit(Duration::from_secs(20)).is_some());
    }

    /// POST /v1/messages as `app`: (status, body).
    async fn post_as(&self, app: &str, secret: &str, body: &[u8]) -> (u16, Value) {
        let resp = signed_as(app, secret, "POST", "/v1/messages", body, self.api)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, body: Value) -> (u16, Value) {
        self.post_as("demo", SECRET, &serde_json::to_vec(&body).unwrap())
            .await
    }

    /// Waits for message `id` to reach `status`.
    async fn until(&self, id: &str, status: &str, what: &str) -> Value {
        let path = format!("/v1/messages/{id}");
        let api = self.api;
        eventually(Duration::from_secs(60), what, || {
            let path = path.clone();
            async move {
                let v = api_json(&path, api).await?;
                (v["status"] == status).then_some(v)
            }
        })
        .await
    }

    /// A normal e-mail through the gateway is delivered (the mail reaches the SMTP server).
    async fn still_delivers(&self, what: &str) {
        let to = format!("{}@example.com", unique("after"));
        let (status, v) = self
            .post(json!({"channel": "EMAIL", "template": "welcome", "params": {"name": "Ada", "product": "Herald"},
                         "recipients": [{"address": to}]}))
            .await;
        assert_eq!(status, 202, "{v}");
        let id = v["message_ids"][0].as_str().unwrap().to_owned();
        self.until(&id, "delivered", &format!("a normal message after {what}"))
            .await;
    }
}

fn email(to: &str) -> Value {
    json!({"channel": "EMAIL", "template": "welcome", "params": {"name": "Ada", "product": "Herald"},
           "recipients": [{"address": to}]})
}

fn reason_code(v: &Value) -> Option<String> {
    v["timeline"].as_array()?.iter().rev().find_map(|e| {
        (e["status"] == "failed")
            .then(|| e["reason"]["code"].as_str().map(str::to_owned))
            .flatten()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_refuses_what_accept_would_reject_in_the_json_error_shape() {
    let _serial = SERIAL.lock().await;
    let run = Run::start("gateway", 18_520, 19_920).await;
    let rid = |tag: &str| unique(tag);
    let nul_rid = format!("{}\u{0}", rid("nul"));
    let big = "x".repeat(100 * 1024);
    let many: Vec<Value> = (0..1000)
        .map(|i| json!({"address": format!("fan{i}@example.com")}))
        .collect();
    let refused: Vec<(&str, Value, u16, &str)> = vec![
        (
            "a NUL in an e-mail address",
            email("ada\u{0}@example.com"),
            400,
            "invalid_recipient",
        ),
        (
            "a NUL in the request id",
            {
                let mut b = email("ada@example.com");
                b["request_id"] = json!(nul_rid);
                b
            },
            400,
            "invalid_identifier",
        ),
        (
            "a NUL in metadata",
            {
                let mut b = email("ada@example.com");
                b["metadata"] = json!({"k": "v\u{0}"});
                b
            },
            400,
            "invalid_character",
        ),
        (
            "a NUL in a shared param",
            {
                let mut b = email("ada@example.com");
                b["params"] = json!({"name": "A\u{0}da"});
                b
            },
            400,
            "invalid_character",
        ),
        (
            "no template and no content",
            json!({"channel": "EMAIL", "recipients": [{"address": "ada@example.com"}]}),
            400,
            "no_content",
        ),
        (
            "an SMS to not-a-phone",
            json!({"channel": "SMS", "template": "verify_code", "params": {"code": "1"},
                   "recipients": [{"address": "not-a-phone"}]}),
            400,
            "invalid_recipient",
        ),
        (
            "send_at ten years ahead",
            {
                let mut b = email("ada@example.com");
                b["send_at"] = json!(herald_core::util::now_ms() + 10 * 366 * 86_400_000);
                b
            },
            400,
            "invalid_send_at",
        ),
        (
            "an invalid time zone",
            json!({"channel": "EMAIL", "template": "welcome", "params": {"name": "A", "product": "P"},
                   "recipients": [{"address": "ada@example.com", "timezone": "Mars/Olympus"}]}),
            400,
            "invalid_timezone",
        ),
        (
            "a webhook to the admin port on loopback",
            json!({"channel": "WEBHOOK", "content": {"text": "x"},
                   "recipients": [{"address": "http://127.0.0.1:19920/metrics"}]}),
            400,
            "destination_not_allowed",
        ),
        (
            "a webhook to the cloud metadata address",
            json!({"channel": "WEBHOOK", "content": {"text": "x"},
                   "recipients": [{"address": "http://169.254.169.254/latest/meta-data"}]}),
            400,
            "destination_not_allowed",
        ),
        (
            "a webhook to localhost by name",
            json!({"channel": "WEBHOOK", "content": {"text": "x"},
                   "recipients": [{"address": "http://localhost:5432/"}]}),
            400,
            "destination_not_allowed",
        ),
        (
            "100 KiB of shared params copied into 1,000 messages",
            json!({"channel": "EMAIL", "template": "welcome", "params": {"name": "A", "blob": big},
                   "recipients": many}),
            413,
            "request_too_large",
        ),
        (
            "a template of another app",
            json!({"channel": "EMAIL", "template": "tenant_b_private",
                   "recipients": [{"address": "ada@example.com"}]}),
            400,
            "unknown_template",
        ),
    ];
    // Tenant B's private template exists (so the last case is about ownership, not existence).
    let tpl = serde_json::to_vec(&json!({"channel": "EMAIL", "text": "b's own"})).unwrap();
    let r = signed_as(
        TENANT_B,
        TENANT_B_SECRET,
        "PUT",
        "/v1/templates/tenant_b_private",
        &tpl,
        run.api,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let mut ids = Vec::new();
    for (what, mut body, want_status, want_code) in refused {
        let id = rid("refused");
        if body.get("request_id").is_none() {
            body["request_id"] = json!(id);
            ids.push(id);
        }
        let (status, v) = run.post(body).await;
        assert_eq!(status, want_status, "{what}: {v}");
        assert_eq!(v["error"]["code"], want_code, "{what}: {v}");
        assert!(v["error"]["message"].is_string(), "{what}: {v}");
    }
    // Errors axum itself answers are in the JSON shape too.
    let oversized = vec![b' '; 2 << 20];
    let (status, v) = run.post_as("demo", SECRET, &oversized).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{v}"
    );
    let r = run
        .http
        .get(format!("http://127.0.0.1:{}/v1/nowhere", run.api))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found");
    let r = run
        .http
        .delete(format!("http://127.0.0.1:{}/v1/messages", run.api))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "method_not_allowed");

    // A client that never finishes its headers is cut off (1 s in this config), and does not
    // hold the listener: other requests are served meanwhile.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", run.api))
            .await
            .unwrap();
        slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let r = run
            .http
            .get(format!("http://127.0.0.1:{}/health", run.api))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success() || r.status().as_u16() == 503);
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "a slow-header connection is closed by the server"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    // Live inbox streams are bounded per app (2 in this config): the third is refused, and a
    // slot comes back when a stream closes.
    let stream = || signed_get("/v1/inbox/someone/stream", run.api).send();
    let first = stream().await.unwrap();
    let second = stream().await.unwrap();
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = stream().await.unwrap();
    assert_eq!(third.status().as_u16(), 429);
    let v: Value = third.json().await.unwrap();
    assert_eq!(v["error"]["code"], "too_many_streams");
    drop(first);
    eventually(Duration::from_secs(30), "a stream slot freed", || async {
        (stream().await.ok()?.status().as_u16() == 200).then_some(())
    })
    .await;
    drop(second);

    // Nothing refused was published: once a later message is through, none of them exists.
    run.still_delivers("the refusals").await;
    for id in ids {
        let r = signed_get(&format!("/v1/requests/{id}"), run.api)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            404,
            "refused request {id} was published"
        );
    }
    run.stop();
}

/// Records published straight to a topic, as an outside producer would.
/// A record to produce: key, payload, headers.
type Raw = (String, Vec<u8>, Vec<(String, Vec<u8>)>);

async fn produce(topic: &str, recs: Vec<Raw>) {
    let transport = KafkaTransport::new(KafkaSettings::new(brokers()));
    transport
        .ensure_topics(&herald_core::runtime::all_topics(4))
        .await
        .unwrap();
    let out = recs
        .into_iter()
        .map(
            |(key, payload, headers)| herald_core::transport::OutRecord {
                topic: topic.to_owned(),
                key: Some(key.into_bytes()),
                payload,
                headers,
            },
        )
        .collect();
    transport.publisher().unwrap().publish(out).await.unwrap();
}

fn request(app: &str, rid: &str, channel: Channel, addresses: &[&str]) -> SendRequested {
    SendRequested {
        request_id: rid.to_owned(),
        app_id: app.to_owned(),
        idempotency_key: None,
        channel,
        template: None,
        params: HashMap::new(),
        recipients: addresses
            .iter()
            .map(|a| Recipient {
                address: (*a).to_owned(),
                params: HashMap::new(),
                timezone: None,
            })
            .collect(),
        content: Some(Content {
            subject: Some("hostile".into()),
            text: Some("hello".into()),
            ..Default::default()
        }),
        send_at: None,
        priority: Priority::Normal,
        expires_at: None,
        metadata: HashMap::new(),
        requested_at: herald_core::util::now_ms(),
    }
}

/// Every dead letter on the topic: (original key, reason code, original payload).
fn dead_letters(codec: &Codec) -> Vec<(Vec<u8>, String, Option<Vec<u8>>)> {
    let rt = tokio::runtime::Handle::current();
    topic_records(topics::DEAD_LETTERS)
        .into_iter()
        .filter_map(|payload| {
            let dl =
                tokio::task::block_in_place(|| rt.block_on(codec.decode::<DeadLettered>(&payload)))
                    .ok()?;
            Some((dl.key.unwrap_or_default(), dl.reason.code, dl.payload))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_records_on_kafka_end_failed_or_dead_lettered_and_nothing_stalls() {
    let _serial = SERIAL.lock().await;
    let run = Run::start("kafka", 18_530, 19_930).await;
    let codec = Codec::new(std::sync::Arc::new(
        RegistryResolver::new(&registry()).unwrap(),
    ));
    let enc = |r: &SendRequested| {
        let codec = &codec;
        let r = r.clone();
        async move {
            record(codec, topics::REQUESTS, &r.request_id, "t", &r)
                .await
                .unwrap()
                .payload
        }
    };
    let ok_to = format!("{}@example.com", unique("fine"));
    let nul_addr = request(
        "demo",
        &unique("nul-addr"),
        Channel::Email,
        &[&ok_to, "bad\u{0}@example.com"],
    );
    let mut no_content = request("demo", &unique("empty"), Channel::Email, &["a@example.com"]);
    no_content.content = None;
    let not_a_phone = request("demo", &unique("phone"), Channel::Sms, &["not-a-phone"]);
    let unknown_app = request(
        "intruder",
        &unique("intruder"),
        Channel::Email,
        &["a@example.com"],
    );
    let nul_rid = request(
        "demo",
        &format!("{}\u{0}", unique("nulrid")),
        Channel::Email,
        &["a@example.com"],
    );
    let addresses: Vec<String> = (0..1000).map(|i| format!("fan{i}@example.com")).collect();
    let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let mut fan_out = request("demo", &unique("fanout"), Channel::Email, &refs);
    fan_out.params.insert("blob".into(), "x".repeat(100 * 1024));
    let loopback_hook = request(
        "demo",
        &unique("ssrf"),
        Channel::Webhook,
        &["http://127.0.0.1:9/internal"],
    );
    // An outside producer copies the gateway's quota header: tenant B's quota is two messages.
    let forged = request(
        TENANT_B,
        &unique("forged"),
        Channel::Email,
        &["a@example.com", "b@example.com", "c@example.com"],
    );

    let mut recs = Vec::new();
    for r in [
        &nul_addr,
        &no_content,
        &not_a_phone,
        &unknown_app,
        &nul_rid,
        &fan_out,
        &loopback_hook,
    ] {
        recs.push((r.request_id.clone(), enc(r).await, Vec::new()));
    }
    recs.push((
        forged.request_id.clone(),
        enc(&forged).await,
        vec![(
            herald_domain::quota::COUNTED_HEADER.to_owned(),
            b"1".to_vec(),
        )],
    ));
    let nul_rid_bytes = recs[4].1.clone();
    // Framed for a schema id the registry (answering normally) has never issued.
    let no_schema_key = unique("noschema");
    recs.push((
        no_schema_key.clone(),
        [&[0u8, 0x7f, 0xff, 0x00, 0x01][..], b"\x02\x04ab"].concat(),
        Vec::new(),
    ));
    produce(topics::REQUESTS, recs).await;

    // A poison record on an internal topic: PostgreSQL refuses its address in the route stage's
    // policy query. It is isolated and failed; the records around it go on.
    let poison_id = message_id("demo", &unique("poison"), 0);
    let poison = MessageRendered {
        header: EventHeader {
            event_id: unique("ev"),
            event_time: herald_core::util::now_ms(),
            stage: "render".into(),
            trace_id: "t".into(),
            message_id: poison_id.clone(),
            request_id: unique("poison-req"),
            app_id: "demo".into(),
            channel: Channel::Email,
            attempt: 0,
            metadata: HashMap::new(),
        },
        recipient: Recipient {
            address: "p\u{0}@example.com".into(),
            params: HashMap::new(),
            timezone: None,
        },
        priority: Priority::Normal,
        expires_at: None,
        template: None,
        template_version: None,
        content: RenderedContent {
            text: Some("poison".into()),
            ..Default::default()
        },
        due_at: None,
    };
    let poison_bytes = record(&codec, topics::RENDERED, "p", "t", &poison)
        .await
        .unwrap()
        .payload;
    produce(
        topics::RENDERED,
        vec![("p".into(), poison_bytes, Vec::new())],
    )
    .await;

    // Terminal states with machine-readable reasons.
    let mid = |r: &SendRequested, i: usize| message_id(&r.app_id, &r.request_id, i);
    run.until(
        &mid(&nul_addr, 0),
        "delivered",
        "the good recipient of a request with a NUL address",
    )
    .await;
    let cases = [
        (mid(&nul_addr, 1), "invalid_recipient"),
        (mid(&no_content, 0), "no_content"),
        (mid(&not_a_phone, 0), "invalid_recipient"),
        (mid(&fan_out, 999), "request_too_large"),
        (mid(&loopback_hook, 0), "destination_not_allowed"),
        (poison_id.clone(), "refused_by_dependency"),
    ];
    for (id, code) in cases {
        let v = run.until(&id, "failed", code).await;
        assert_eq!(reason_code(&v).as_deref(), Some(code), "{v}");
    }
    // Tenant B's own message, read as tenant B: the forged header did not skip its quota.
    let path = format!("/v1/messages/{}", mid(&forged, 0));
    let v = eventually(Duration::from_secs(60), "quota_exceeded", || {
        let path = path.clone();
        async move {
            let v = api_json_as(TENANT_B, TENANT_B_SECRET, &path, run.api).await?;
            (v["status"] == "failed").then_some(v)
        }
    })
    .await;
    assert_eq!(reason_code(&v).as_deref(), Some("quota_exceeded"), "{v}");
    // Refused whole: dead letters with the original bytes.
    let letters = eventually(Duration::from_secs(60), "dead letters", || {
        let codec = &codec;
        let (a, b) = (unknown_app.request_id.clone(), nul_rid.request_id.clone());
        let c = no_schema_key.clone();
        async move {
            let all = dead_letters(codec);
            let find = |key: &str, code: &str| {
                all.iter()
                    .find(|(k, c, _)| k.as_slice() == key.as_bytes() && c == code)
                    .cloned()
            };
            Some((
                find(&a, "unknown_app")?,
                find(&b, "invalid_identifier")?,
                find(&c, "unknown_schema")?,
            ))
        }
    })
    .await;
    assert_eq!(
        letters.1.2.as_deref(),
        Some(nul_rid_bytes.as_slice()),
        "original bytes kept"
    );

    run.still_delivers("hostile records on Kafka").await;
    run.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_stay_apart_and_a_202_is_true_at_once_and_replays_count_once() {
    let _serial = SERIAL.lock().await;
    let run = Run::start("tenants", 18_540, 19_940).await;
    let api = run.api;

    // Templates: B's own "welcome" shadows the shared one for B only.
    let put = |app: &'static str, secret: &'static str, code: &str, text: &str| {
        let body = serde_json::to_vec(&json!({"channel": "EMAIL", "text": text})).unwrap();
        signed_as(
            app,
            secret,
            "PUT",
            &format!("/v1/templates/{code}"),
            &body,
            api,
        )
        .send()
    };
    let r = put(TENANT_B, TENANT_B_SECRET, "welcome", "B's welcome")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let mine = api_json_as(TENANT_B, TENANT_B_SECRET, "/v1/templates/welcome", api)
        .await
        .unwrap();
    assert_eq!(mine["text"], "B's welcome");
    let demo = api_json("/v1/templates/welcome", api).await.unwrap();
    assert_ne!(
        demo["text"], "B's welcome",
        "another app's template is not visible: {demo}"
    );
    let private = unique("bprivate");
    let r = put(TENANT_B, TENANT_B_SECRET, &private, "secret plan")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = signed_get(&format!("/v1/templates/{private}"), api)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        404,
        "demo cannot read tenant B's template"
    );
    // A NUL never reaches the template store.
    let r = put("demo", SECRET, &unique("nul"), "a\u{0}b")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // A template that builds a huge string (forty doublings) fails its own message in the
    // render sandbox; the render stage, and every other app's mail, go on.
    let mut bomb = "{% set v0 = name %}".to_owned();
    for i in 1..=40 {
        bomb.push_str(&format!("{{% set v{i} = v{} ~ v{} %}}", i - 1, i - 1));
    }
    bomb.push_str("{{ v40 | length }}");
    let code = unique("bomb");
    let r = put("demo", SECRET, &code, &bomb).await.unwrap();
    assert_eq!(r.status().as_u16(), 201);
    // Render workers pick the template up within a second: until then it is unknown to them.
    let mut reason = None;
    for _ in 0..5 {
        let mut body = email(&format!("{}@example.com", unique("bomb")));
        body["template"] = json!(code);
        let (status, v) = run.post(body).await;
        assert_eq!(status, 202, "{v}");
        let id = v["message_ids"][0].as_str().unwrap().to_owned();
        let failed = run.until(&id, "failed", "the template bomb").await;
        reason = reason_code(&failed);
        if reason.as_deref() != Some("unknown_template") {
            break;
        }
    }
    assert_eq!(reason.as_deref(), Some("render_resource_limit"));
    run.still_delivers("a template bomb").await;

    // Scheduled, then read and canceled at once: the answers are true before the projector.
    let mut body = email(&format!("{}@example.com", unique("later")));
    body["send_at"] = json!(herald_core::util::now_ms() + 60_000);
    let (status, v) = run.post(body).await;
    assert_eq!(status, 202, "{v}");
    let id = v["message_ids"][0].as_str().unwrap().to_owned();
    let rid = v["request_id"].as_str().unwrap().to_owned();
    let r = signed_get(&format!("/v1/messages/{id}"), api)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "readable at once");
    let v: Value = r.json().await.unwrap();
    assert!(
        ["accepted", "scheduled"].contains(&v["status"].as_str().unwrap()),
        "{v}"
    );
    let r = signed("POST", &format!("/v1/requests/{rid}/cancel"), b"", api)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "cancelable at once");
    run.until(&id, "canceled", "the canceled scheduled message")
        .await;

    // An idempotency key reserved by a gateway that died before publishing is not lost.
    let db = {
        let (c, conn) = tokio_postgres::connect(&postgres(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    };
    let key = unique("idem");
    db.execute(
        "INSERT INTO request_keys (app_id, key, request_id, source, at)
         VALUES ('demo', $1, 'never-published', 'api-pending', now() - interval '2 minutes')",
        &[&format!("idem:{key}")],
    )
    .await
    .unwrap();
    let bytes = serde_json::to_vec(&email(&format!("{}@example.com", unique("idem")))).unwrap();
    let r = signed("POST", "/v1/messages", &bytes, api)
        .header("Idempotency-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        202,
        "the stale reservation is taken over"
    );
    let v: Value = r.json().await.unwrap();
    run.until(
        v["message_ids"][0].as_str().unwrap(),
        "delivered",
        "the idempotent retry",
    )
    .await;

    // A signed receipt replayed with the same webhook-id counts once.
    let to = format!("{}@example.com", unique("rcpt"));
    let (_, v) = run.post(email(&to)).await;
    let id = v["message_ids"][0].as_str().unwrap().to_owned();
    run.until(&id, "delivered", "mail for the receipt").await;
    let receipt = json!({"message_id": id, "status": "delivered", "code": "250"}).to_string();
    let key = herald_core::util::webhook_key(CALLBACK_SECRET);
    let wid = unique("wh");
    let mut answers = Vec::new();
    for _ in 0..2 {
        let ts = herald_core::util::now_ms() / 1000;
        let sig = herald_core::util::standard_webhook_signature(&key, &wid, ts, receipt.as_bytes());
        let r = run
            .http
            .post(format!("http://127.0.0.1:{}/callbacks/smtp-local", api + 1))
            .header("webhook-id", &wid)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(receipt.clone())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v = r.json::<Value>().await.unwrap();
        assert_eq!(status, 200, "{v}");
        answers.push(v);
    }
    assert_eq!(answers[0]["duplicate"], Value::Null, "{answers:?}");
    assert_eq!(
        answers[1]["duplicate"], true,
        "the replay is acknowledged, not taken"
    );
    run.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_leaves_in_a_reason_topic_table_answer_or_log() {
    let _serial = SERIAL.lock().await;
    let run = Run::start("secrets", 18_550, 19_950).await;
    // A number of its own (frequency caps and dedup remember numbers across runs).
    let phone = format!(
        "139{:08}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            % 100_000_000
    );
    // Every provider whose URL, path or query carries a credential or token times out once.
    let sends = [
        (
            "dingtalk",
            json!({"channel": "DINGTALK", "content": {"text": "t"}, "recipients": [{"address": "-"}]}),
        ),
        (
            "feishu",
            json!({"channel": "FEISHU", "content": {"text": "t"}, "recipients": [{"address": "-"}]}),
        ),
        (
            "wecom_robot,wecom_app",
            json!({"channel": "WECOM", "content": {"text": "t"}, "recipients": [{"address": "@all"}]}),
        ),
        (
            "wechat",
            json!({"channel": "WECHAT", "template": "order_shipped", "params": {"order": "1"},
                          "recipients": [{"address": "oLEAKUSER001"}]}),
        ),
        (
            "aliyun,tencent",
            json!({"channel": "SMS", "template": "verify_code", "params": {"code": "123456"},
                          "priority": "HIGH", "recipients": [{"address": phone}]}),
        ),
    ];
    let mut ids = Vec::new();
    let faults = |sims: &'static str, add: bool| {
        let http = run.http.clone();
        async move {
            for sim in sims.split(',') {
                let url = format!("{}/_control/{sim}/faults", sim_url());
                let r = if add {
                    http.post(url)
                        .json(&json!([{"kind": "timeout", "ms": 3000}]))
                } else {
                    http.delete(url)
                };
                assert!(r.send().await.unwrap().status().is_success());
            }
        }
    };
    for (sim, body) in sends {
        faults(sim, false).await;
        faults(sim, true).await;
        let (status, v) = run.post(body).await;
        assert_eq!(status, 202, "{sim}: {v}");
        ids.push((sim, v["message_ids"][0].as_str().unwrap().to_owned()));
    }
    let mut answers = String::new();
    for (sim, id) in &ids {
        let v = eventually(
            Duration::from_secs(60),
            &format!("{sim} failed once"),
            || {
                let path = format!("/v1/messages/{id}");
                async move {
                    let v = api_json(&path, run.api).await?;
                    v["delivery_attempts"]
                        .as_array()?
                        .iter()
                        .any(|a| !a["reason_code"].is_null())
                        .then_some(v)
                }
            },
        )
        .await;
        answers.push_str(&v.to_string());
    }
    for (sim, _) in &ids {
        faults(sim, false).await;
    }
    let secrets: Vec<String> = herald_simulators::CREDENTIALS
        .iter()
        .map(|(k, _)| herald_simulators::credential(k))
        .filter(|v| v.len() >= 6)
        .chain([
            SECRET.to_owned(),
            SERVER_SECRET.to_owned(),
            TENANT_B_SECRET.to_owned(),
        ])
        .collect();
    let leaks = |what: &str, text: &str| {
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "{what} carries the secret {s:?}"
            );
        }
        for q in ["access_token=", "corpsecret=", "key=sim", "AccessKeyId="] {
            assert!(!text.contains(q), "{what} carries a signed query ({q})");
        }
    };
    leaks("an API answer", &answers);
    // Every text column of every table.
    let (db, conn) = tokio_postgres::connect(&postgres(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let tables = db
        .query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .await
        .unwrap();
    for t in tables {
        let name: String = t.get(0);
        let rows = db
            .query(&format!("SELECT t::text FROM \"{name}\" t"), &[])
            .await
            .unwrap();
        let text: String = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        leaks(&format!("table {name}"), &text);
    }
    // Every record of the public output topics and the status topic.
    for topic in [
        topics::DELIVERIES,
        topics::STATUS,
        topics::DEAD_LETTERS,
        topics::RECEIPTS,
    ] {
        leaks(&format!("topic {topic}"), &topic_text(topic));
    }
    leaks("the log", &std::fs::read_to_string(&run.log).unwrap());
    run.stop();
}

/// Every record of `topic` (all partitions, from the start), as lossy text.
fn topic_text(topic: &str) -> String {
    topic_records(topic)
        .iter()
        .map(|p| String::from_utf8_lossy(p) + "\n")
        .collect()
}

/// The payload of every record of `topic` (all partitions, from the start to the current end).
fn topic_records(topic: &str) -> Vec<Vec<u8>> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("topic-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in md.topics()[0].partitions() {
        let (lo, hi) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .unwrap();
        if hi > lo {
            tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Offset(lo))
                .unwrap();
            ends.insert(p.id(), hi);
        }
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let start = std::time::Instant::now();
    while !ends.is_empty() && start.elapsed() < Duration::from_secs(120) {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        if m.offset() + 1 >= ends.get(&m.partition()).copied().unwrap_or(0) {
            ends.remove(&m.partition());
        }
        out.push(m.payload().unwrap_or_default().to_vec());
    }
    out
}
