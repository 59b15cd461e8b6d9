//! Tracing: one message's trace followed across every stage in an OTLP receiver. The caller's
//! W3C `traceparent` is taken by the gateway and travels in the record headers (Kafka, and
//! Redis Streams) through accept, render, route and send to the provider call and to the
//! delivery event the projector applies; each span is a child of the one before.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use herald_tests::otlp::{Received, Receiver};
use herald_tests::*;
use serde_json::json;

/// The stages a message's spans pass through, in order, each the parent of the next.
const CHAIN: [&str; 6] = [
    "POST /v1/messages",
    "accept",
    "render",
    "route",
    "send",
    "provider call",
];

/// The spans of the trace once every stage's is there, including the projector's span for the
/// delivery event (written by send).
fn complete(spans: &[Received]) -> bool {
    let by_name: BTreeMap<&str, &Received> = spans.iter().map(|s| (s.name.as_str(), s)).collect();
    let Some(send) = by_name.get("send") else {
        return false;
    };
    CHAIN.iter().all(|n| by_name.contains_key(n))
        && spans
            .iter()
            .any(|s| s.name == "projector" && s.parent == send.span_id)
}

async fn one_message_is_one_trace(transport: &str, api: u16, admin: u16) {
    let otlp = Receiver::start().await;
    let cfg = std::env::temp_dir().join(format!("herald-tracing-{transport}.toml"));
    std::fs::copy(config_path(), &cfg).unwrap();
    let mut env = herald_env(api, admin);
    env.push(("HERALD_TRANSPORT", transport.to_owned()));
    env.push(("HERALD_OTLP_ENDPOINT", otlp.url.clone()));
    env.push(("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()));
    let _herald = Herald::start(&cfg, &env);
    api_up(api).await;

    // The caller's trace.
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let caller_span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let tag = unique("traced");
    let body = serde_json::to_vec(&json!({
        "app_id": "demo", "channel": "EMAIL", "template": "welcome",
        "params": {"product": "Herald"}, "priority": "HIGH",
        "recipients": [{"address": format!("{tag}@example.com"), "params": {"name": "Trace"}}]
    }))
    .unwrap();
    let resp = signed("POST", "/v1/messages", &body, api)
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let v: serde_json::Value = resp.json().await.unwrap();
    let id = v["message_ids"][0].as_str().unwrap().to_owned();
    await_status(api, &id, "delivered").await;

    let spans = eventually(Duration::from_secs(30), "every stage's span", || {
        let spans = otlp.trace(&trace_id);
        async move { complete(&spans).then_some(spans) }
    })
    .await;
    let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let one = |name: &str| -> &Received {
        let found: Vec<&Received> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one {name} span in {names:?}");
        found[0]
    };

    // The gateway's span is the caller's child; each stage's is the child of the one before.
    let gateway = one(CHAIN[0]);
    assert_eq!(
        gateway.parent, caller_span,
        "the gateway continues the caller's trace"
    );
    assert_eq!(gateway.kind, 2, "server span");
    assert_eq!(gateway.attrs["http.response.status_code"], "202");
    for pair in CHAIN.windows(2) {
        assert_eq!(
            one(pair[1]).parent,
            one(pair[0]).span_id,
            "{} follows {}",
            pair[1],
            pair[0]
        );
    }
    let call = one("provider call");
    assert_eq!(call.kind, 3, "client span");
    assert_eq!(call.attrs["herald.message_id"], id);
    assert_eq!(call.attrs["herald.outcome"], "SUCCEEDED");
    assert_eq!(call.attrs["herald.channel"], "email");
    let accept = one("accept");
    assert_eq!(accept.kind, 5, "consumer span");
    assert_eq!(accept.attrs["herald.stage"], "accept");
    // Every span hangs off the trace's tree: no stage started a trace of its own.
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for s in &spans {
        assert!(
            s.parent == caller_span || ids.contains(s.parent.as_str()),
            "{} ({}) has a parent outside the trace",
            s.name,
            s.span_id
        );
        assert_eq!(s.service, "herald");
        assert_ne!(s.status, 2, "{} failed", s.name);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_message_is_one_trace_across_every_stage_on_kafka() {
    one_message_is_one_trace("kafka", 18_740, 19_940).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_message_is_one_trace_across_every_stage_on_redis_streams() {
    one_message_is_one_trace("redis", 18_760, 19_960).await;
}
