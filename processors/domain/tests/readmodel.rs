//! The read model's writes against the stack's real PostgreSQL (`scripts/stack up`), in a
//! database of their own: a fact that brings nothing new (a delay-tier hop re-reading the same
//! `scheduled` event, a redelivered event) leaves the message row as it was — no new row version,
//! no WAL — while a fact that moves the status still does.

use herald_domain::readmodel::{self, projection::Fact};
use herald_domain::schema::migrate;
use herald_schemas::{Channel, EventHeader};
use tokio_postgres::{Client, NoTls};

mod common;
use common::{base_url, connect};

/// A migrated database of this test's own (dropped and created again on each run).
async fn database() -> Client {
    let admin = connect(&base_url()).await;
    for sql in [
        "DROP DATABASE IF EXISTS herald_readmodel_test",
        "CREATE DATABASE herald_readmodel_test",
    ] {
        admin.simple_query(sql).await.unwrap();
    }
    let mut cfg: tokio_postgres::Config = base_url().parse().unwrap();
    cfg.dbname("herald_readmodel_test");
    let (mut client, conn) = cfg.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    migrate(&mut client).await.unwrap();
    client
}

fn fact(event: &str, status: &str, at: i64) -> Fact {
    let header = EventHeader {
        event_id: event.into(),
        event_time: at,
        stage: "accept".into(),
        trace_id: "t".into(),
        message_id: "m-1".into(),
        request_id: "r-1".into(),
        app_id: "demo".into(),
        channel: Channel::Email,
        attempt: 0,
        metadata: Default::default(),
    };
    let mut f = Fact::new(&header, status);
    f.recipient_masked = Some("a***@***om".into());
    f
}

/// The message row's version (xmin changes with every write of the row).
async fn version(db: &Client) -> (String, String) {
    let row = db
        .query_one(
            "SELECT xmin::text, status FROM messages WHERE message_id = 'm-1'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn write(db: &mut Client, facts: &[Fact]) {
    let tx = db.transaction().await.unwrap();
    readmodel::write(&tx, facts, None).await.unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_fact_that_brings_nothing_new_writes_no_row_version() {
    let mut db = database().await;
    write(&mut db, &[fact("e-accepted", "accepted", 1_000)]).await;
    write(&mut db, &[fact("e-scheduled", "scheduled", 2_000)]).await;
    let before = version(&db).await;
    assert_eq!(before.1, "scheduled");

    // The same `scheduled` event read again from the next delay tier, twice.
    write(&mut db, &[fact("e-scheduled", "scheduled", 2_000)]).await;
    write(&mut db, &[fact("e-scheduled", "scheduled", 2_000)]).await;
    assert_eq!(version(&db).await, before, "a hop rewrote the message row");

    // A status that moves up is still written, and a lower one read late still is not.
    write(&mut db, &[fact("e-sent", "sent", 3_000)]).await;
    let after = version(&db).await;
    assert_eq!(after.1, "sent");
    assert_ne!(after.0, before.0);
    write(&mut db, &[fact("e-accepted", "accepted", 1_000)]).await;
    assert_eq!(
        version(&db).await,
        after,
        "a late lower status changes nothing"
    );

    // An earlier copy of the same status (read out of order) moves updated_at back: written.
    write(&mut db, &[fact("e-sent-early", "sent", 2_500)]).await;
    assert_ne!(version(&db).await.0, after.0);
    let updated: f64 = db
        .query_one(
            "SELECT extract(epoch FROM updated_at)::float8 FROM messages WHERE message_id = 'm-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(updated, 2.5);
}

/// Two terminal facts of one message at one instant, written in separate batches in either
/// order (the topics read in either order), end as the same row: the fixed precedence decides.
#[tokio::test]
async fn terminal_facts_of_one_instant_end_the_same_whatever_the_order() {
    let mut db = connect(&common::fresh_database("readmodel_precedence").await).await;
    migrate(&mut db).await.unwrap();
    let with_id = |id: &str, event: &str, status: &str| {
        let mut f = fact(event, status, 1_700_000_000_123);
        f.message_id = id.into();
        f
    };
    write(&mut db, &[with_id("m-a", "a1", "unknown")]).await;
    write(&mut db, &[with_id("m-a", "a2", "delivered")]).await;
    write(&mut db, &[with_id("m-b", "b1", "delivered")]).await;
    write(&mut db, &[with_id("m-b", "b2", "unknown")]).await;
    for id in ["m-a", "m-b"] {
        let status: String = db
            .query_one("SELECT status FROM messages WHERE message_id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(status, "delivered", "{id}");
    }
}
