//! Fuzz targets (see the crate's `lib.rs`): each runs `FUZZ_CASES` generated cases and prints
//! `fuzz: target=<name> cases=<n> crashes=<c>`. A panic anywhere is a crash and fails the test.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use herald_core::codec::{Codec, MemoryResolver};
use herald_core::config::TemplateConfig;
use herald_domain::validate::{self, Limits};
use herald_schemas::*;
use proptest::collection::{hash_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x4845_5241_4c44)
}

/// Runs `check` over `cases()` values of `strategy`; prints the target's line.
fn fuzz<S: Strategy>(
    target: &str,
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        rng_seed: RngSeed::Fixed(seed()),
        failure_persistence: None,
        max_shrink_iters: 2_000,
        ..Config::default()
    });
    let n = AtomicU64::new(0);
    let result = runner.run(&strategy, |v| {
        n.fetch_add(1, Ordering::Relaxed);
        check(v)
    });
    let crashes = u64::from(result.is_err());
    println!(
        "fuzz: target={target} cases={} crashes={crashes}",
        n.load(Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("{target}: {e}");
    }
}

/// Strings a hostile caller would send: NUL and control characters, odd Unicode, long runs.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9@.+:/_-]{0,24}",
        2 => any::<String>(),
        1 => "[\\x00-\\x1f\\x7f]{1,4}",
        1 => "[a-z]{0,4}\\x00[a-z]{0,4}",
        1 => (0usize..3000).prop_map(|n| "x".repeat(n)),
    ]
}

fn channel() -> impl Strategy<Value = Channel> {
    prop::sample::select(Channel::ALL.to_vec())
}

fn strings() -> impl Strategy<Value = HashMap<String, String>> {
    hash_map(hostile(), hostile(), 0..4)
}

fn request() -> impl Strategy<Value = SendRequested> {
    (
        (
            hostile(),
            prop_oneof![Just("demo".to_owned()), hostile()],
            proptest::option::of(hostile()),
            channel(),
        ),
        (
            proptest::option::of(prop_oneof![Just("welcome".to_owned()), hostile()]),
            strings(),
        ),
        vec(
            (
                hostile(),
                strings(),
                proptest::option::of(prop_oneof![Just("Asia/Shanghai".to_owned()), hostile()]),
            ),
            0..5,
        ),
        proptest::option::of((
            proptest::option::of(hostile()),
            proptest::option::of(hostile()),
        )),
        (
            proptest::option::of(any::<i64>()),
            proptest::option::of(any::<i64>()),
            strings(),
            any::<i64>(),
        ),
    )
        .prop_map(
            |(
                (rid, app, idem, channel),
                (template, params),
                recipients,
                content,
                (send_at, expires_at, metadata, requested_at),
            )| {
                SendRequested {
                    request_id: rid,
                    app_id: app,
                    idempotency_key: idem,
                    channel,
                    template,
                    params,
                    recipients: recipients
                        .into_iter()
                        .map(|(address, params, timezone)| Recipient {
                            address,
                            params,
                            timezone,
                        })
                        .collect(),
                    content: content.map(|(subject, text)| Content {
                        subject,
                        text,
                        ..Default::default()
                    }),
                    send_at,
                    priority: Priority::Normal,
                    expires_at,
                    metadata,
                    requested_at,
                }
            },
        )
}

// --- Avro decode of every input topic -----------------------------------------------------

struct AvroFixture {
    rt: tokio::runtime::Runtime,
    codec: Codec,
    /// Registered writer ids, one per event type.
    ids: Vec<u32>,
    /// A valid `SendRequested` record to mutate.
    sample: Vec<u8>,
}

static AVRO: LazyLock<AvroFixture> = LazyLock::new(|| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let codec = Codec::new(Arc::new(MemoryResolver::default()));
    let t = "fuzz";
    let (ids, sample) = rt.block_on(async {
        let ids = vec![
            codec.schema_id::<SendRequested>(t).await.unwrap(),
            codec.schema_id::<MessageAccepted>(t).await.unwrap(),
            codec.schema_id::<MessageRendered>(t).await.unwrap(),
            codec.schema_id::<MessageRouted>(t).await.unwrap(),
            codec.schema_id::<DelayScheduled>(t).await.unwrap(),
            codec.schema_id::<DeliveryAttempted>(t).await.unwrap(),
            codec.schema_id::<ReceiptReceived>(t).await.unwrap(),
            codec.schema_id::<MessageFailed>(t).await.unwrap(),
            codec.schema_id::<MessageCanceled>(t).await.unwrap(),
            codec.schema_id::<MessageSuppressed>(t).await.unwrap(),
            codec.schema_id::<DeadLettered>(t).await.unwrap(),
        ];
        let mut req = SendRequested {
            request_id: "r".into(),
            app_id: "demo".into(),
            idempotency_key: Some("k".into()),
            channel: Channel::Email,
            template: Some("welcome".into()),
            params: HashMap::from([("name".into(), "Ada".into())]),
            recipients: vec![Recipient {
                address: "a@x.io".into(),
                params: HashMap::new(),
                timezone: Some("UTC".into()),
            }],
            content: None,
            send_at: Some(1),
            priority: Priority::High,
            expires_at: Some(2),
            metadata: HashMap::from([("m".into(), "v".into())]),
            requested_at: 3,
        };
        req.content = Some(Content {
            subject: Some("s".into()),
            ..Default::default()
        });
        let sample = codec.encode(t, &req).await.unwrap();
        (ids, sample)
    });
    AvroFixture {
        rt,
        codec,
        ids,
        sample,
    }
});

/// Decodes `bytes` as every event type, its header and its name: none may panic.
fn decode_all(bytes: &[u8]) {
    let f = &*AVRO;
    f.rt.block_on(async {
        let c = &f.codec;
        let _ = c.event_name(bytes).await;
        let _ = c.header(bytes).await;
        let _ = c.decode::<SendRequested>(bytes).await;
        let _ = c.decode::<MessageAccepted>(bytes).await;
        let _ = c.decode::<MessageRendered>(bytes).await;
        let _ = c.decode::<MessageRouted>(bytes).await;
        let _ = c.decode::<DelayScheduled>(bytes).await;
        let _ = c.decode::<DeliveryAttempted>(bytes).await;
        let _ = c.decode::<ReceiptReceived>(bytes).await;
        let _ = c.decode::<MessageFailed>(bytes).await;
        let _ = c.decode::<MessageCanceled>(bytes).await;
        let _ = c.decode::<MessageSuppressed>(bytes).await;
        let _ = c.decode::<DeadLettered>(bytes).await;
    });
}

#[test]
fn avro_decode_of_every_input_topic() {
    let strategy = (
        0usize..3,
        any::<prop::sample::Index>(),
        vec(any::<u8>(), 0..256),
        vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        proptest::option::of(any::<prop::sample::Index>()),
    );
    fuzz("avro", strategy, |(shape, which, body, flips, cut)| {
        let f = &*AVRO;
        let bytes = match shape {
            // Arbitrary bytes.
            0 => body,
            // A valid frame naming a real schema, then arbitrary bytes.
            1 => {
                let id = f.ids[which.index(f.ids.len())];
                let mut b = vec![0u8];
                b.extend_from_slice(&id.to_be_bytes());
                b.extend_from_slice(&body);
                b
            }
            // A valid record, mutated and maybe truncated.
            _ => {
                let mut b = f.sample.clone();
                for (at, v) in flips {
                    let i = 5 + at.index(b.len() - 5);
                    b[i] = v;
                }
                if let Some(c) = cut {
                    b.truncate(c.index(b.len() + 1));
                }
                b
            }
        };
        decode_all(&bytes);
        Ok(())
    });
}

// --- The gateway: JSON body, validation, and authentication headers ------------------------

fn limits() -> Limits {
    Limits {
        max_recipients: 4,
        max_message_bytes: 4096,
        max_request_bytes: 8192,
    }
}

#[test]
fn gateway_json_body_and_validation() {
    let strategy = prop_oneof![
        vec(any::<u8>(), 0..256).prop_map(|b| (b, None)),
        request().prop_map(|r| (Vec::new(), Some(r))),
    ];
    let policy = herald_accept::handler::AcceptPolicy {
        limits: limits(),
        templates: HashSet::from([(String::new(), "welcome".to_owned())]),
        apps: HashSet::from(["demo".to_owned()]),
    };
    fuzz("gateway", strategy, |(raw, req)| {
        let _ = serde_json::from_slice::<herald_api::SendBody>(&raw);
        let Some(req) = req else { return Ok(()) };
        let now = 1_700_000_000_000;
        // The JSON the gateway would take parses back to the same request.
        if let Ok(text) = serde_json::to_vec(&req) {
            let _ = serde_json::from_slice::<herald_api::SendBody>(&text);
        }
        let gateway = validate::all(&req, &limits(), now);
        let known_template = req.template.as_deref().is_none_or(|t| t == "welcome");
        let plan = herald_accept::handler::plan(&req, &policy, "t", now);
        // One validation: what the gateway lets through (for a known app and template),
        // accept takes whole, every recipient.
        if gateway.is_ok() && known_template && req.app_id == "demo" {
            match plan {
                herald_accept::handler::Plan::Messages(m) => {
                    for p in m {
                        prop_assert!(
                            matches!(p, herald_accept::handler::Planned::Accepted(_)),
                            "accept failed a recipient the gateway took: {p:?}"
                        );
                    }
                }
                other => prop_assert!(false, "accept rejected what the gateway took: {other:?}"),
            }
        }
        Ok(())
    });
}

#[test]
fn gateway_authentication_headers() {
    let strategy = (
        proptest::option::of(hostile()),
        proptest::option::of(prop_oneof![
            hostile(),
            any::<i64>().prop_map(|t| t.to_string())
        ]),
        proptest::option::of(hostile()),
        proptest::option::of(hostile()),
        hostile(),
        vec(any::<u8>(), 0..64),
    );
    let nonces = herald_api::auth::NonceCache::default();
    fuzz("auth", strategy, |(app, ts, nonce, sig, path, body)| {
        let req = herald_api::auth::Request {
            app: app.as_deref(),
            timestamp: ts.as_deref(),
            nonce: nonce.as_deref(),
            signature: sig.as_deref(),
            method: "POST",
            path_and_query: &path,
            body: &body,
        };
        let secret = |a: &str| (a == "demo").then(|| "s3cret".to_owned());
        let r = herald_api::auth::verify(&req, secret, &nonces, 1_700_000_000, 300);
        prop_assert!(r.is_err() || app.as_deref() == Some("demo"));
        Ok(())
    });
}

// --- Provider callbacks ----------------------------------------------------------------

fn json_like() -> impl Strategy<Value = Vec<u8>> {
    let key = prop::sample::select(vec![
        "phone_number",
        "success",
        "biz_id",
        "out_id",
        "err_code",
        "err_msg",
        "report_time",
        "mobile",
        "report_status",
        "errmsg",
        "description",
        "sid",
        "user_receive_time",
        "message_id",
        "status",
        "code",
        "attempt",
        "provider_message_id",
        "reported_at",
    ]);
    let value = prop_oneof![
        hostile().prop_map(serde_json::Value::String),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<bool>().prop_map(|b| serde_json::json!(b)),
        Just(serde_json::Value::Null),
    ];
    vec(hash_map(key, value, 0..8), 0..4).prop_map(|objs| {
        let arr: Vec<serde_json::Value> = objs
            .into_iter()
            .map(|o| {
                serde_json::Value::Object(o.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            })
            .collect();
        if arr.len() == 1 {
            serde_json::to_vec(&arr[0]).unwrap_or_default()
        } else {
            serde_json::to_vec(&arr).unwrap_or_default()
        }
    })
}

#[test]
fn provider_callback_parsers() {
    let strategy = prop_oneof![vec(any::<u8>(), 0..256), json_like()];
    fuzz("callbacks", strategy, |body| {
        let _ = herald_providers::aliyun_sms::receipt::parse(&body);
        let _ = herald_providers::tencent_sms::receipt::parse(&body);
        let _ = herald_callback::parse_generic(&body);
        Ok(())
    });
}

// --- Templates -------------------------------------------------------------------------

fn template_source() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("{{ ".to_owned()),
        Just(" }}".to_owned()),
        Just("{% ".to_owned()),
        Just(" %}".to_owned()),
        Just("for i in range(100000)".to_owned()),
        Just("endfor".to_owned()),
        Just("if name".to_owned()),
        Just("endif".to_owned()),
        Just("name".to_owned()),
        Just("blob".to_owned()),
        Just("|upper".to_owned()),
        Just("|join(blob)".to_owned()),
        Just(" ~ ".to_owned()),
        Just(" * ".to_owned()),
        Just("macro m()".to_owned()),
        Just("m()".to_owned()),
        Just("endmacro".to_owned()),
        Just("set x = ".to_owned()),
        Just("include 'x'".to_owned()),
        Just("{% set blob = blob ~ blob ~ blob %}".to_owned()),
        Just("{{ blob * 1000 }}".to_owned()),
        Just("(".to_owned()),
        Just(")".to_owned()),
        "[a-z0-9 ]{0,4}",
        any::<String>(),
    ];
    // Rarely (each costs a render child), a ladder that alone needs far more memory than the
    // child may use.
    let token = prop_oneof![
        2000 => token,
        1 => Just("{% set blob = blob ~ blob %}".repeat(24)),
    ];
    vec(token, 0..24).prop_map(|t| t.concat())
}

#[test]
fn templates_compile_and_render() {
    let accepted = MessageAccepted {
        header: EventHeader {
            event_id: "e".into(),
            event_time: 0,
            stage: "accept".into(),
            trace_id: "t".into(),
            message_id: "m".into(),
            request_id: "r".into(),
            app_id: "demo".into(),
            channel: Channel::Email,
            attempt: 0,
            metadata: HashMap::new(),
        },
        recipient: Recipient {
            address: "a@x.io".into(),
            params: HashMap::new(),
            timezone: None,
        },
        recipient_index: 0,
        template: Some("t".into()),
        params: HashMap::from([
            ("name".into(), "Ada".into()),
            ("blob".into(), "x".repeat(1000)),
        ]),
        content: None,
        send_at: None,
        priority: Priority::Normal,
        expires_at: None,
        requested_at: 0,
    };
    // Renders run where the stage runs them: in a memory-limited child (herald-render, built
    // beside this test), so a template that exhausts memory kills a child, never the fuzzer.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let program = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("herald-render"))
        .unwrap();
    assert!(
        program.exists(),
        "build the binaries first: {}",
        program.display()
    );
    let limits = herald_render::sandbox::Limits {
        memory_bytes: 256 << 20,
        fuel: 20_000,
    };
    let sandbox = std::sync::Mutex::new(
        runtime
            .block_on(herald_render::sandbox::Sandbox::start(
                program,
                limits,
                Vec::new(),
            ))
            .unwrap(),
    );
    let exhausted = AtomicU64::new(0);
    fuzz(
        "templates",
        (template_source(), template_source()),
        |(text, html)| {
            let t = TemplateConfig {
                code: "t".into(),
                app: None,
                channel: Channel::Email,
                version: 1,
                subject: None,
                text: Some(text),
                html: Some(html),
                markdown: None,
                provider_template: None,
                provider_params: BTreeMap::new(),
                provider_templates: BTreeMap::new(),
            };
            let mut sandbox = sandbox.lock().unwrap();
            if runtime.block_on(sandbox.load(vec![t])).is_err() {
                return Ok(()); // does not compile: refused when stored
            }
            let rendered = runtime
                .block_on(sandbox.render(&[&accepted]))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(rendered.len(), 1);
            match &rendered[0] {
                Ok((_, c)) => {
                    let size = c.text.as_ref().map_or(0, String::len)
                        + c.html.as_ref().map_or(0, String::len);
                    prop_assert!(size <= 2 * herald_domain::templates::compile::MAX_RENDERED_BYTES);
                }
                Err(reason) if reason.code == "render_resource_limit" => {
                    exhausted.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {}
            }
            Ok(())
        },
    );
    println!(
        "fuzz: target=templates sandbox_exhausted={}",
        exhausted.load(Ordering::Relaxed)
    );
}

// --- The console's forms and the template store ------------------------------------------

/// A form body: raw bytes, or `name=value` pairs of the form's own field names (and others)
/// with hostile values, percent-encoded as a browser would, or not.
fn form_body() -> impl Strategy<Value = Vec<u8>> {
    let name = prop_oneof![
        prop::sample::select(vec![
            "csrf", "app", "channel", "subject", "text", "html", "markdown", "params", "address",
            "action", "name", "password",
        ])
        .prop_map(str::to_owned),
        hostile(),
    ];
    let value = prop_oneof![
        hostile(),
        template_source(),
        prop::sample::select(vec![
            "EMAIL",
            "sms",
            "demo",
            "add",
            "remove",
            "13800138000",
            "a@example.com",
            "{\"name\": \"Ann\"}",
            "{",
            "[]",
        ])
        .prop_map(str::to_owned),
    ];
    prop_oneof![
        1 => vec(any::<u8>(), 0..256),
        4 => (vec((name, value), 0..10), any::<bool>()).prop_map(|(pairs, encode)| {
            if encode {
                let pairs: Vec<(String, String)> = pairs;
                serde_urlencoded::to_string(&pairs).unwrap_or_default().into_bytes()
            } else {
                pairs
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("&")
                    .into_bytes()
            }
        }),
    ]
}

/// Every console form (login, the template editor's preview and publish, a test send, an
/// opt-out change) parsed as its handler parses it and checked as it checks it: never a panic,
/// and what is accepted holds what the API would accept (a template that compiles within the
/// store's size and has no NUL; an opt-out address in its normal form).
#[test]
fn console_forms() {
    let strategy = (
        prop::sample::select(herald_console::forms::FORMS.to_vec()),
        prop_oneof![Just("welcome".to_owned()), hostile()],
        form_body(),
    );
    fuzz("console_forms", strategy, |(form, code, body)| {
        if let Ok(out) = herald_console::forms::check(form, &code, &body) {
            prop_assert!(!out.contains('\0'), "{form}: NUL accepted: {out:?}");
            if form == "edit" {
                prop_assert!(
                    herald_domain::templates::valid_code(&code),
                    "edit accepted code {code:?}"
                );
            }
        }
        Ok(())
    });
}

fn template_body() -> impl Strategy<Value = Vec<u8>> {
    let text = prop_oneof![template_source(), hostile()];
    let fields = (
        prop::sample::select(vec![
            "EMAIL",
            "SMS",
            "WECHAT",
            "PUSH",
            "email",
            "carrier-pigeon",
        ]),
        proptest::option::of(text.clone()),
        proptest::option::of(text.clone()),
        proptest::option::of(text),
        proptest::option::of(hostile()),
        hash_map(hostile(), hostile(), 0..3),
        prop::sample::select(vec!["", "code", "version", "app", "extra"]),
    )
        .prop_map(
            |(channel, subject, text, html, provider_template, params, extra)| {
                let mut v = serde_json::json!({"channel": channel, "subject": subject,
                "text": text, "html": html, "provider_template": provider_template,
                "provider_params": params});
                if !extra.is_empty() {
                    v[extra] = serde_json::json!(1);
                }
                serde_json::to_vec(&v).unwrap_or_default()
            },
        );
    prop_oneof![1 => vec(any::<u8>(), 0..256), 4 => fields]
}

/// `PUT /v1/templates/{code}`'s body as the API checks it before the store is asked: never a
/// panic, a refusal is a 4xx, and what is accepted is within the store's bounds — a valid code,
/// no NUL in any text, no larger than `max_bytes`, and compiling.
#[test]
fn template_store() {
    let bounds = herald_core::config::TemplateStoreConfig {
        max_bytes: 2_048,
        ..Default::default()
    };
    let strategy = (
        prop_oneof![Just("welcome".to_owned()), hostile()],
        template_body(),
    );
    fuzz("template_store", strategy, |(code, body)| {
        match herald_api::templates::submitted(&code, &body, &bounds) {
            Ok(t) => {
                prop_assert!(herald_domain::templates::valid_code(&t.code), "{t:?}");
                prop_assert!(herald_domain::templates::size(&t) <= bounds.max_bytes);
                prop_assert!(
                    !herald_domain::templates::texts(&t).any(|s| s.contains('\0')),
                    "NUL stored: {t:?}"
                );
                prop_assert!(t.has_content());
            }
            Err(e) => prop_assert!(e.status().is_client_error(), "{}", e.code()),
        }
        Ok(())
    });
}
