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

fn cn() -> herald_domain::destination::Region {
    herald_domain::destination::Region::parse("CN").unwrap()
}

async fn db() -> tokio_postgres::Client {
    let url = std::env::var("HERALD_POSTGRES_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=55432 user=herald dbname=herald".into());
    let mut db = herald_core::runtime::connect_postgres(&url)
        .await
        .expect("PostgreSQL up (scripts/stack up)");
    herald_domain::schema::migrate(&mut db).await.unwrap();
    db
}

/// Issue 23 finding 3: the frequency cap and opt-outs key on the normalised number, so
/// `13800138000`, `+8613800138000` and `8613800138000` are one recipient: one cap, and an
/// opt-out of one spelling holds for the others (also one stored before normalisation).
#[tokio::test]
async fn every_spelling_of_a_number_shares_one_frequency_cap_and_one_opt_out() {
    let mut db = db().await;
    let mut p: PolicyConfig = toml::from_str("channel = \"SMS\"").unwrap();
    p.frequency_cap = Some(FrequencyCap {
        max: 2,
        window_secs: 3600,
    });
    let policies = HashMap::from([(Channel::Sms, p)]);
    let national = format!("139{:08}", uuid::Uuid::new_v4().as_u128() % 100_000_000);
    let spellings = [
        national.clone(),
        format!("+86{national}"),
        format!("86{national}"),
    ];
    let msgs: Vec<MessageRendered> = spellings
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut m = rendered(&uuid::Uuid::new_v4().to_string(), a);
            m.content.text = Some(format!("message {i}"));
            m
        })
        .collect();
    let refs: Vec<&MessageRendered> = msgs.iter().collect();
    let verdicts = policy::stateful(&mut db, &refs, &policies, cn())
        .await
        .unwrap();
    assert_eq!(verdicts[..2], [Verdict::Send, Verdict::Send]);
    assert!(
        matches!(
            verdicts[2],
            Verdict::Suppress {
                policy: "frequency_cap",
                ..
            }
        ),
        "the third spelling is the third message to one phone: {verdicts:?}"
    );

    // Opted out as `+86…` (how the API and console store it now), or written in a national form
    // before normalisation: every spelling of the number finds either.
    let other = format!("138{:08}", uuid::Uuid::new_v4().as_u128() % 100_000_000);
    let normal = herald_domain::opt_out::address(Channel::Sms, &other, cn()).unwrap();
    assert_eq!(normal, format!("+86{other}"));
    let spell = |n: &str| herald_domain::destination::spellings(Channel::Sms, n, cn());
    herald_domain::opt_out::set(&db, "demo", "sms", &normal, &spell(&normal), true)
        .await
        .unwrap();
    let legacy = format!("137{:08}", uuid::Uuid::new_v4().as_u128() % 100_000_000);
    db.execute(
        "INSERT INTO opt_outs (app_id, channel, address) VALUES ('demo', 'sms', $1)",
        &[&legacy],
    )
    .await
    .unwrap();
    let out = [
        rendered(&uuid::Uuid::new_v4().to_string(), &other),
        rendered(&uuid::Uuid::new_v4().to_string(), &format!("86{other}")),
        rendered(&uuid::Uuid::new_v4().to_string(), &legacy),
        rendered(&uuid::Uuid::new_v4().to_string(), &format!("+86{legacy}")),
    ];
    let refs: Vec<&MessageRendered> = out.iter().collect();
    let verdicts = policy::stateful(&mut db, &refs, &HashMap::new(), cn())
        .await
        .unwrap();
    for (v, m) in verdicts.iter().zip(&out) {
        assert!(
            matches!(
                v,
                Verdict::Suppress {
                    policy: "opt_out",
                    ..
                }
            ),
            "{}: {v:?}",
            m.recipient.address
        );
    }
    // Opting back in clears it, and clears the row stored in the national form before.
    herald_domain::opt_out::set(&db, "demo", "sms", &normal, &spell(&normal), false)
        .await
        .unwrap();
    let legacy_normal = format!("+86{legacy}");
    herald_domain::opt_out::set(
        &db,
        "demo",
        "sms",
        &legacy_normal,
        &spell(&legacy_normal),
        false,
    )
    .await
    .unwrap();
    let back = policy::stateful(&mut db, &[&out[0], &out[2], &out[3]], &HashMap::new(), cn())
        .await
        .unwrap();
    assert!(back.iter().all(|v| *v == Verdict::Send), "{back:?}");
}

#[tokio::test]
async fn a_message_delivered_twice_in_one_batch_is_not_its_own_duplicate() {
    let mut db = db().await;
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
    let verdicts = policy::stateful(&mut db, &[&a, &a, &b], &policies, cn())
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
    let again = policy::stateful(&mut db, &[&a], &policies, cn())
        .await
        .unwrap();
    assert_eq!(again[0], Verdict::Send);
}
