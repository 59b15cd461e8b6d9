//! One contract, two transports: the same tests run against the real Kafka and the real Redis
//! started by `scripts/stack up`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use herald_core::transport::kafka::{KafkaSettings, KafkaTransport};
use herald_core::transport::redis::{RedisSettings, RedisTransport};
use herald_core::transport::{Delivery, OutRecord, Source, SourceSpec, TopicSpec, Transport};
use herald_tests::{brokers, redis_url, unique};

fn kafka() -> Arc<dyn Transport> {
    Arc::new(KafkaTransport::new(KafkaSettings::new(brokers())))
}

fn redis() -> Arc<dyn Transport> {
    let mut s = RedisSettings::new(redis_url());
    s.claim_idle = Duration::from_millis(1500);
    Arc::new(RedisTransport::new(s).expect("redis client"))
}

async fn topic(t: &Arc<dyn Transport>, partitions: i32) -> String {
    let name = unique("contract");
    t.ensure_topics(&[TopicSpec {
        name: name.clone(),
        partitions,
        compact: false,
    }])
    .await
    .expect("create topic");
    name
}

fn rec(topic: &str, key: &str, value: String) -> OutRecord {
    OutRecord {
        topic: topic.into(),
        key: Some(key.as_bytes().to_vec()),
        payload: value.into_bytes(),
        headers: vec![("h".into(), b"v".to_vec())],
    }
}

fn spec(group: &str, topic: &str, instance: &str) -> SourceSpec {
    let mut s = SourceSpec::new(group, vec![topic.to_owned()]);
    s.instance = instance.into();
    s.max_batch = 50;
    s.max_wait = Duration::from_millis(200);
    s
}

/// Polls until a non-empty batch arrives (bounded).
async fn first_batch(
    source: &mut Box<dyn Source>,
    limit: Duration,
) -> Vec<herald_core::transport::InRecord> {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        let b = source.poll().await.expect("poll");
        if !b.is_empty() {
            return b;
        }
    }
    panic!("nothing redelivered within {limit:?}");
}

/// Polls (and commits when `commit`) until `n` records were seen or the limit passes.
async fn drain(source: &mut Box<dyn Source>, n: usize, commit: bool) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < n && tokio::time::Instant::now() < deadline {
        let batch = source.poll().await.expect("poll");
        for r in &batch {
            assert_eq!(r.header("h"), Some(&b"v"[..]), "headers survive the trip");
            seen.push((
                String::from_utf8(r.key.clone().unwrap_or_default()).unwrap(),
                String::from_utf8(r.payload.clone().unwrap_or_default()).unwrap(),
            ));
        }
        if commit && !batch.is_empty() {
            source.commit(vec![]).await.expect("commit");
        }
    }
    seen
}

async fn publish_consume_ack(t: Arc<dyn Transport>) {
    let topic = topic(&t, 2).await;
    let recs = (0..100)
        .map(|i| rec(&topic, &format!("k{}", i % 7), format!("v{i}")))
        .collect();
    t.publisher().unwrap().publish(recs).await.expect("publish");
    let group = unique("g");
    let mut s = t.source(spec(&group, &topic, "a")).await.unwrap();
    let seen = drain(&mut s, 100, true).await;
    assert_eq!(seen.iter().map(|x| &x.1).collect::<HashSet<_>>().len(), 100);
    s.close().await;
    // Acknowledged: a new consumer in the group sees nothing more.
    let mut s = t.source(spec(&group, &topic, "a")).await.unwrap();
    let again = s.poll().await.unwrap();
    let again2 = s.poll().await.unwrap();
    assert!(
        again.is_empty() && again2.is_empty(),
        "acknowledged records came back: {}",
        again.len() + again2.len()
    );
    s.close().await;
}

async fn per_key_order(t: Arc<dyn Transport>) {
    let topic = topic(&t, 3).await;
    let recs = (0..300)
        .map(|i| rec(&topic, &format!("key{}", i % 3), format!("{i}")))
        .collect();
    t.publisher().unwrap().publish(recs).await.expect("publish");
    let mut s = t.source(spec(&unique("g"), &topic, "a")).await.unwrap();
    let seen = drain(&mut s, 300, true).await;
    assert_eq!(seen.len(), 300);
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for (k, v) in seen {
        let v: i64 = v.parse().unwrap();
        if let Some(prev) = last.insert(k.clone(), v) {
            assert!(v > prev, "key {k}: {v} after {prev}");
        }
    }
    s.close().await;
}

async fn redelivery_after_consumer_dies(t: Arc<dyn Transport>) {
    let topic = topic(&t, 1).await;
    let recs = (0..20).map(|i| rec(&topic, "k", format!("v{i}"))).collect();
    t.publisher().unwrap().publish(recs).await.expect("publish");
    let group = unique("g");
    let mut dying = t.source(spec(&group, &topic, "dies")).await.unwrap();
    let taken = drain(&mut dying, 20, false).await;
    assert_eq!(taken.len(), 20);
    drop(dying); // no ack, no goodbye
    // Another worker of the group gets every unacknowledged record.
    let mut other = t.source(spec(&group, &topic, "survivor")).await.unwrap();
    let got = first_batch(&mut other, Duration::from_secs(45)).await;
    let mut values: HashSet<String> = got
        .iter()
        .map(|r| String::from_utf8(r.payload.clone().unwrap()).unwrap())
        .collect();
    other.commit(vec![]).await.unwrap();
    values.extend(
        drain(&mut other, 20 - values.len(), true)
            .await
            .into_iter()
            .map(|x| x.1),
    );
    assert_eq!(values.len(), 20);
    other.close().await;
}

async fn no_loss_across_restart(t: Arc<dyn Transport>) {
    let topic = topic(&t, 2).await;
    let recs = (0..200)
        .map(|i| rec(&topic, &format!("k{}", i % 5), format!("v{i}")))
        .collect();
    t.publisher().unwrap().publish(recs).await.expect("publish");
    let group = unique("g");
    let mut first = t.source(spec(&group, &topic, "w")).await.unwrap();
    let mut all: HashSet<String> = drain(&mut first, 100, true)
        .await
        .into_iter()
        .map(|x| x.1)
        .collect();
    first.close().await;
    let mut second = t.source(spec(&group, &topic, "w")).await.unwrap();
    all.extend(
        drain(&mut second, 200 - all.len(), true)
            .await
            .into_iter()
            .map(|x| x.1),
    );
    assert_eq!(all.len(), 200, "records lost across a restart");
    second.close().await;
}

/// Outputs are published together with the acknowledgement of their input.
async fn outputs_commit_with_inputs(t: Arc<dyn Transport>) {
    let input = topic(&t, 1).await;
    let output = topic(&t, 1).await;
    t.publisher()
        .unwrap()
        .publish(vec![rec(&input, "k", "in".into())])
        .await
        .unwrap();
    let mut s = t.source(spec(&unique("g"), &input, "a")).await.unwrap();
    let got = drain(&mut s, 1, false).await;
    assert_eq!(got.len(), 1);
    s.commit(vec![rec(&output, "k", "out".into())])
        .await
        .unwrap();
    let mut reader = t.source(spec(&unique("g"), &output, "r")).await.unwrap();
    assert_eq!(
        drain(&mut reader, 1, true).await,
        vec![("k".to_owned(), "out".to_owned())]
    );
    s.close().await;
    reader.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_publish_consume_ack() {
    publish_consume_ack(kafka()).await
}
#[tokio::test(flavor = "multi_thread")]
async fn redis_publish_consume_ack() {
    publish_consume_ack(redis()).await
}
#[tokio::test(flavor = "multi_thread")]
async fn kafka_per_key_order() {
    per_key_order(kafka()).await
}
#[tokio::test(flavor = "multi_thread")]
async fn redis_per_key_order() {
    per_key_order(redis()).await
}
#[tokio::test(flavor = "multi_thread")]
async fn kafka_redelivery_after_consumer_dies() {
    redelivery_after_consumer_dies(kafka()).await
}
#[tokio::test(flavor = "multi_thread")]
async fn redis_redelivery_after_consumer_dies() {
    redelivery_after_consumer_dies(redis()).await
}
#[tokio::test(flavor = "multi_thread")]
async fn kafka_no_loss_across_restart() {
    no_loss_across_restart(kafka()).await
}
#[tokio::test(flavor = "multi_thread")]
async fn redis_no_loss_across_restart() {
    no_loss_across_restart(redis()).await
}
#[tokio::test(flavor = "multi_thread")]
async fn kafka_outputs_commit_with_inputs() {
    outputs_commit_with_inputs(kafka()).await
}
#[tokio::test(flavor = "multi_thread")]
async fn redis_outputs_commit_with_inputs() {
    outputs_commit_with_inputs(redis()).await
}

/// Kafka exactly-once: a transaction's outputs are invisible to a `read_committed` reader until
/// the transaction (which also holds the input offsets) commits.
#[tokio::test(flavor = "multi_thread")]
async fn kafka_transactional_outputs_invisible_until_commit() {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let t = KafkaTransport::new(KafkaSettings::new(brokers()));
    let tt: Arc<dyn Transport> = kafka();
    let input = topic(&tt, 1).await;
    let output = topic(&tt, 1).await;
    tt.publisher()
        .unwrap()
        .publish(vec![rec(&input, "k", "in".into())])
        .await
        .unwrap();
    let mut sp = spec(&unique("g"), &input, &unique("tx"));
    sp.delivery = Delivery::ExactlyOnce;
    let mut source = t.kafka_source(sp).await.unwrap();
    let mut batch = Vec::new();
    for _ in 0..150 {
        batch = Source::poll(&mut source).await.unwrap();
        if !batch.is_empty() {
            break;
        }
    }
    assert_eq!(batch.len(), 1);
    source
        .stage_outputs(&[rec(&output, "k", "out".into())])
        .await
        .unwrap();

    let reader = |isolation: &str| {
        let c: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", unique("reader"))
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", isolation)
            .create()
            .unwrap();
        c.subscribe(&[&output]).unwrap();
        c
    };
    let committed = reader("read_committed");
    let uncommitted = reader("read_uncommitted");
    // The record is in the log (an uncommitted reader sees it) …
    let seen = tokio::time::timeout(Duration::from_secs(20), uncommitted.recv()).await;
    assert!(matches!(seen, Ok(Ok(_))), "output was not written");
    // … but a read_committed reader does not, until the commit.
    let early = tokio::time::timeout(Duration::from_secs(3), committed.recv()).await;
    assert!(early.is_err(), "read_committed saw an uncommitted output");
    source.finish_transaction().await.unwrap();
    let after = tokio::time::timeout(Duration::from_secs(20), committed.recv()).await;
    assert!(matches!(after, Ok(Ok(_))), "committed output not visible");
}
