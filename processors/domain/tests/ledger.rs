//! The attempt ledger against the stack's real PostgreSQL: two copies of one attempt, routed to
//! two providers (a transport that lost an acknowledgement routes a message again), make one
//! call, and everything said of the attempt afterwards names the provider called.

use herald_domain::failure::CallResult;
use herald_domain::ledger::{self, ClaimKey, Prior, StartKey};

mod common;
use common::{connect, fresh_database};

fn key<'a>(message_id: &'a str, provider: &'a str) -> ClaimKey<'a> {
    ClaimKey {
        message_id,
        attempt: 1,
        provider,
        request_id: "r",
        app_id: "demo",
        channel: "SMS",
    }
}

fn start<'a>(message_id: &'a str, provider: &'a str, routed: &'a [u8]) -> StartKey<'a> {
    StartKey {
        message_id,
        attempt: 1,
        provider,
        routed: Some(routed),
    }
}

#[tokio::test]
async fn two_copies_routed_to_two_providers_make_one_call_named_for_the_provider_called() {
    let url = fresh_database("ledger").await;
    let mut db = connect(&url).await;
    herald_domain::schema::migrate(&mut db).await.unwrap();

    // The first copy (routed to aliyun) claims the attempt and dies before starting it.
    let first = ledger::claim(&db, &[key("m1", "aliyun")]).await.unwrap();
    assert_eq!(first, [Prior::Fresh]);
    // The second copy (routed again, to tencent) finds it claimed, not started: it is fresh,
    // and the copy that marks it started is the one that calls.
    let second = ledger::claim(&db, &[key("m1", "tencent")]).await.unwrap();
    assert_eq!(second, [Prior::Fresh]);
    let started = ledger::start(&db, &[start("m1", "tencent", b"tencent copy")])
        .await
        .unwrap();
    assert!(started.contains(&("m1".to_owned(), 1)));
    // The first copy, come back, may not start it again.
    let again = ledger::start(&db, &[start("m1", "aliyun", b"aliyun copy")])
        .await
        .unwrap();
    assert!(again.is_empty(), "an attempt is started once");

    // While the call is out, a third copy is told it may have happened, with tencent.
    let during = ledger::claim(&db, &[key("m1", "aliyun")]).await.unwrap();
    assert_eq!(
        during,
        [Prior::InFlight {
            provider: Some("tencent".into())
        }]
    );

    let result = CallResult::ok("Ok", Some("tencent-serial-1".into()));
    ledger::finish(&db, &[("m1".into(), 1, result.clone(), 12)], &[None])
        .await
        .unwrap();
    // A late copy routed to aliyun is answered from the ledger, under tencent.
    let late = ledger::claim(&db, &[key("m1", "aliyun")]).await.unwrap();
    assert_eq!(
        late,
        [Prior::Finished {
            result,
            latency: 12,
            provider: "tencent".into()
        }]
    );
    // Tencent's receipt finds the attempt; aliyun has none.
    let tencent = ledger::receipt_candidates(&db, "tencent", &[], &["tencent-serial-1"])
        .await
        .unwrap();
    assert_eq!(tencent.len(), 1);
    assert_eq!(
        tencent[0].routed.as_deref(),
        Some(&b"tencent copy"[..]),
        "a resend after tencent's receipt starts from the copy tencent was called with"
    );
    let aliyun = ledger::receipt_candidates(&db, "aliyun", &["m1"], &["tencent-serial-1"])
        .await
        .unwrap();
    assert!(aliyun.is_empty());

    // A copy that keeps nothing (no receipt rule could act on its provider's receipts) and
    // starts an attempt another copy claimed leaves no other provider's copy behind.
    ledger::claim(&db, &[key("m2", "aliyun")]).await.unwrap();
    let none = StartKey {
        routed: None,
        ..start("m2", "tencent", b"")
    };
    ledger::start(&db, &[none]).await.unwrap();
    let result = CallResult::ok("Ok", Some("tencent-serial-2".into()));
    ledger::finish(&db, &[("m2".into(), 1, result, 9)], &[None])
        .await
        .unwrap();
    let m2 = ledger::receipt_candidates(&db, "tencent", &["m2"], &[])
        .await
        .unwrap();
    assert_eq!(m2.len(), 1);
    assert_eq!(m2[0].routed, None, "aliyun's copy is not kept for tencent");
}
