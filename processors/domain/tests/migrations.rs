//! Versioned migrations against the stack's real PostgreSQL (`scripts/stack up`), each test in a
//! database of its own: a database an early Herald created (before tenancy, receipt breakers and
//! the widened keys; no migration history) is brought forward with its rows, a fresh one gets
//! the whole schema, migrating again applies nothing, and processes starting together do not
//! race.

use herald_domain::schema::{latest, migrate};
use tokio_postgres::Client;

mod common;
use common::{connect, fresh_database};

async fn columns(db: &Client, table: &str) -> Vec<String> {
    db.query(
        "SELECT column_name FROM information_schema.columns WHERE table_name = $1 ORDER BY 1",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn primary_key(db: &Client, table: &str) -> Vec<String> {
    db.query(
        "SELECT a.attname FROM pg_index i
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
         WHERE i.indrelid = $1::text::regclass AND i.indisprimary ORDER BY a.attname",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

const TABLES: [&str; 18] = [
    "templates",
    "request_keys",
    "app_usage",
    "intake",
    "message_gate",
    "messages",
    "message_events",
    "delivery_attempts",
    "projector_offsets",
    "inbox",
    "opt_outs",
    "api_nonces",
    "policy_hits",
    "send_ledger",
    "provider_health",
    "webhook_outbox",
    "receipt_waits",
    "receipt_ids",
];

#[tokio::test]
async fn a_database_from_an_early_release_is_brought_forward_with_its_rows() {
    let url = fresh_database("old").await;
    let mut db = connect(&url).await;
    // What an early Herald created at start: no tenancy on templates, one-column timeline key,
    // no recipient key or latency on messages, a ledger without the columns receipts and
    // resends need, breakers without the receipt signal.
    db.batch_execute(
        "CREATE TABLE templates (code text NOT NULL, version int NOT NULL, body text NOT NULL,
             created_at timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY (code, version));
         INSERT INTO templates (code, version, body) VALUES ('welcome', 1, '{}');
         CREATE TABLE messages (message_id text PRIMARY KEY, request_id text NOT NULL,
             app_id text NOT NULL, channel text NOT NULL, recipient_masked text,
             status text NOT NULL, status_rank smallint NOT NULL, provider text,
             attempts int NOT NULL DEFAULT 0, template text, template_version int,
             created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL);
         INSERT INTO messages VALUES ('m1', 'r1', 'shop', 'EMAIL', 'a***@x', 'delivered', 6,
             'smtp', 1, NULL, NULL, now(), now());
         CREATE TABLE message_events (event_id text PRIMARY KEY, message_id text NOT NULL,
             status text NOT NULL, at timestamptz NOT NULL, stage text NOT NULL, provider text,
             attempt int NOT NULL, reason_code text, reason_message text);
         CREATE INDEX message_events_message ON message_events (message_id);
         INSERT INTO message_events VALUES ('e1', 'm1', 'accepted', now(), 'accept', NULL, 0,
             NULL, NULL);
         CREATE TABLE send_ledger (message_id text NOT NULL, attempt int NOT NULL,
             provider text NOT NULL, claimed_at timestamptz NOT NULL DEFAULT now(),
             finished_at timestamptz, outcome text, response_code text,
             provider_message_id text, reason_code text, reason_message text,
             latency_ms bigint, PRIMARY KEY (message_id, attempt));
         INSERT INTO send_ledger (message_id, attempt, provider, outcome)
             VALUES ('m1', 1, 'smtp', 'SUCCEEDED');
         CREATE TABLE provider_health (provider text PRIMARY KEY, open_until timestamptz,
             failure_rate double precision NOT NULL DEFAULT 0,
             updated_at timestamptz NOT NULL DEFAULT now());",
    )
    .await
    .unwrap();

    let applied = migrate(&mut db).await.unwrap();
    assert_eq!(applied, (1..=latest()).collect::<Vec<_>>());

    assert_eq!(
        primary_key(&db, "templates").await,
        ["app_id", "code", "version"]
    );
    let shared: String = db
        .query_one("SELECT app_id FROM templates WHERE code = 'welcome'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shared, "", "a template from before tenancy is shared");
    assert_eq!(
        primary_key(&db, "message_events").await,
        ["event_id", "message_id"]
    );
    for c in ["recipient_key", "latency_ms"] {
        assert!(
            columns(&db, "messages").await.contains(&c.to_owned()),
            "{c}"
        );
    }
    for c in ["started_at", "request_id", "app_id", "channel", "routed"] {
        assert!(
            columns(&db, "send_ledger").await.contains(&c.to_owned()),
            "{c}"
        );
    }
    for c in ["receipts_open_until", "receipts_failure_rate"] {
        assert!(
            columns(&db, "provider_health")
                .await
                .contains(&c.to_owned()),
            "{c}"
        );
    }
    let rows: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM messages) + (SELECT count(*) FROM message_events)
                  + (SELECT count(*) FROM send_ledger)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 3, "every row survives");
    for t in TABLES {
        assert!(!columns(&db, t).await.is_empty(), "table {t} missing");
    }
    assert_eq!(migrate(&mut db).await.unwrap(), Vec::<i32>::new());
}

#[tokio::test]
async fn processes_starting_together_migrate_a_fresh_database_once() {
    let url = fresh_database("fresh").await;
    let mut runs = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        runs.push(tokio::spawn(async move {
            let mut db = connect(&url).await;
            migrate(&mut db).await
        }));
    }
    let mut applied = Vec::new();
    for r in runs {
        applied.extend(r.await.unwrap().unwrap());
    }
    assert_eq!(
        applied,
        (1..=latest()).collect::<Vec<_>>(),
        "each version once"
    );
    let db = connect(&url).await;
    for t in TABLES {
        assert!(!columns(&db, t).await.is_empty(), "table {t} missing");
    }
}

/// (kind, id, destination, payload, attempts, delivered, last error)
type OutboxRow = (String, String, String, String, i32, bool, Option<String>);

/// V5 carries what the two outboxes it replaces held into `webhook_outbox` — pending, delivered
/// and given-up rows, attempts and errors — and drops them.
#[tokio::test]
async fn the_two_outboxes_are_carried_into_one() {
    let url = fresh_database("outboxes").await;
    let mut db = connect(&url).await;
    assert_eq!(
        herald_domain::schema::migrate_to(&mut db, 4).await.unwrap(),
        [1, 2, 3, 4]
    );
    db.batch_execute(
        "INSERT INTO alert_outbox (id, rule, url, payload, attempts, last_error)
             VALUES ('a-1', 'page', 'http://127.0.0.1:9/old', '{\"n\":1}', 3, 'HTTP 500');
         INSERT INTO alert_outbox (id, rule, url, payload, delivered_at)
             VALUES ('a-2', 'page', 'http://127.0.0.1:9/old', '{\"n\":2}', now());
         INSERT INTO status_notifications (message_id, app_id, payload)
             VALUES ('m-1', 'shop', '{\"status\":\"delivered\"}');",
    )
    .await
    .unwrap();
    assert_eq!(
        migrate(&mut db).await.unwrap(),
        (5..=latest()).collect::<Vec<_>>()
    );
    let rows: Vec<OutboxRow> = db
        .query(
            "SELECT kind, id, destination, payload, attempts, delivered_at IS NOT NULL, last_error
             FROM webhook_outbox ORDER BY kind, id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
            )
        })
        .collect();
    let row = |k: &str, id: &str, to: &str, p: &str, n: i32, done: bool, e: Option<&str>| {
        (
            k.to_owned(),
            id.to_owned(),
            to.to_owned(),
            p.to_owned(),
            n,
            done,
            e.map(str::to_owned),
        )
    };
    assert_eq!(
        rows,
        [
            row(
                "alert",
                "a-1",
                "page",
                "{\"n\":1}",
                3,
                false,
                Some("HTTP 500")
            ),
            row("alert", "a-2", "page", "{\"n\":2}", 0, true, None),
            row(
                "status",
                "m-1",
                "shop",
                "{\"status\":\"delivered\"}",
                0,
                false,
                None
            ),
        ]
    );
    for gone in ["alert_outbox", "status_notifications"] {
        assert!(columns(&db, gone).await.is_empty(), "{gone} dropped");
    }
}
