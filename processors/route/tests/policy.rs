//! The stateful policies (dedup, frequency caps) against the real PostgreSQL of the stack
//! (`scripts/stack up`; `HERALD_POSTGRES_URL`).

use std::collections::HashMap;

use herald_core::config::{FrequencyCap, PolicyConfig};
use herald_route::policy::{self, Verdict};
use herald_schemas::{Channel, EventHeader, MessageRendered, Priority, Recipient, RenderedContent};

fn rendered(id: &str, phone: &str) -> MessageRendered {
    MessageRendered {
        header: EventHeader {
            event_id: uuid::Uuid::new_v4().to_string(),
            event_time: 0,
            stage: "render".into(),
            trace_id: "t".into(),
            message_id: id.into(),
            request_id: "r".into(),
            app_id: "demo".into(),
            channel: Channel::Sms,
            attempt: 0,
            metadata: HashMap::new(),
        },
        recipient: Recipient {
            address: phone.into(),
            params: HashMap::new(),
            timezone: None,
        },
        priority: Priority::Normal,
        expires_at: None,
        template: None,
        template_version: None,
        content: RenderedContent {
            text: Some("Your code is 1.".into()),
            ..Default::default()
        },
        due_at: None,
    }
}

#[tokio::test]
async fn a_message_delivered_twice_in_one_batch_is_not_its_own_duplicate() {
    let url = std::env::var("HERALD_POSTGRES_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=55432 user=herald dbname=herald".into());
    let mut db = herald_core::runtime::connect_postgres(&url)
        .await
        .expect("PostgreSQL up (scripts/stack up)");
    herald_domain::schema::migrate(&mut db).await.unwrap();
    let mut p: PolicyConfig = toml::from_str("channel = \"SMS\"").unwrap();
    p.dedup_window_secs = Some(60);
    p.frequency_cap = Some(FrequencyCap {
        max: 3,
        window_secs: 3600,
    });
    let policies = HashMap::from([(Channel::Sms, p)]);
    let phone = format!("139{:08}", uuid::Uuid::new_v4().as_u128() % 100_000_000);
    let id = uuid::Uuid::new_v4().to_string();
    let twin = uuid::Uuid::new_v4().to_string();
    let (a, b) = (rendered(&id, &phone), rendered(&twin, &phone));
    // The same message twice (a redelivery beside its first copy), then another message with
    // the same content: the copies are one message, sent; the other one is the duplicate.
    let verdicts = policy::stateful(&mut db, &[&a, &a, &b], &policies)
        .await
        .unwrap();
    assert_eq!(verdicts[0], Verdict::Send);
    assert_eq!(verdicts[1], Verdict::Send, "{verdicts:?}");
    assert!(
        matches!(
            verdicts[2],
            Verdict::Suppress {
                code: "duplicate_content",
                ..
            }
        ),
        "{verdicts:?}"
    );
    // Redelivered alone later, it is still not a duplicate of itself.
    let again = policy::stateful(&mut db, &[&a], &policies).await.unwrap();
    assert_eq!(again[0], Verdict::Send);
}
