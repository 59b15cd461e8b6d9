//! The webhook outbox against the stack's real PostgreSQL: two dispatchers of one kind (two
//! notify processes) on one backlog post every row exactly once, and a row goes to the URL its
//! destination has when it is posted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use herald_domain::outbox::{self, Dispatcher, Endpoint, Kind, Row};
use tokio_util::sync::CancellationToken;

mod common;
use common::{connect, fresh_database};

type Seen = Arc<Mutex<HashMap<String, u32>>>;

/// A loopback receiver that takes a while per post (so two dispatchers overlap) and counts the
/// posts per `webhook-id`. Its port.
async fn receiver(seen: Seen) -> u16 {
    async fn take(State(seen): State<Seen>, headers: HeaderMap) -> &'static str {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let id = headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        *seen.lock().unwrap().entry(id).or_default() += 1;
        "ok"
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(take))
        .with_state(seen);
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_dispatchers_on_one_backlog_post_every_row_once() {
    let url = fresh_database("outbox").await;
    let mut db = connect(&url).await;
    herald_domain::schema::migrate(&mut db).await.unwrap();
    let seen: Seen = Arc::default();
    let port = receiver(seen.clone()).await;
    let rows: Vec<Row> = (0..300)
        .map(|i| Row {
            id: format!("m-{i}"),
            destination: "shop".into(),
            payload: format!("{{\"n\":{i}}}"),
        })
        .collect();
    assert_eq!(
        outbox::enqueue(&db, Kind::Status, &rows).await.unwrap(),
        300
    );
    // Enqueued again (a batch processed twice): nothing new.
    assert_eq!(outbox::enqueue(&db, Kind::Status, &rows).await.unwrap(), 0);

    let guard = herald_core::netguard::Guard::new(&[format!("127.0.0.1:{port}")]);
    let endpoints: HashMap<String, Endpoint> = [(
        "shop".to_owned(),
        Endpoint {
            url: format!("http://127.0.0.1:{port}/hook"),
            key: b"a key of thirty-two bytes or so!".to_vec(),
        },
    )]
    .into();
    let stop = CancellationToken::new();
    for _ in 0..2 {
        Dispatcher::new(
            Kind::Status,
            endpoints.clone(),
            &guard,
            Duration::from_secs(5),
        )
        .unwrap()
        .spawn(
            herald_core::db::Db::connect(&url).await.unwrap(),
            stop.clone(),
        );
    }
    let started = Instant::now();
    loop {
        let left: i64 = db
            .query_one(
                "SELECT count(*) FROM webhook_outbox WHERE delivered_at IS NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{left} rows still undelivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Anything posted twice would have been posted by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 300, "every row posted");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "posted more than once: {twice:?}");
    let attempts: i64 = db
        .query_one("SELECT sum(attempts) FROM webhook_outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 300, "one attempt per row");
}

/// Finding 19 of issue 23: a row names its destination, not a URL, so an alert queued before
/// its rule's URL changed goes to the new URL (after a restart with the new configuration),
/// not the old one for a day.
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_row_goes_to_the_url_its_destination_has_when_posted() {
    let url = fresh_database("outbox_url").await;
    let mut db = connect(&url).await;
    herald_domain::schema::migrate(&mut db).await.unwrap();
    let (old, new): (Seen, Seen) = (Arc::default(), Arc::default());
    let (old_port, new_port) = (receiver(old.clone()).await, receiver(new.clone()).await);
    let row = Row {
        id: "alert-1".into(),
        destination: "page the on-call".into(),
        payload: "{}".into(),
    };
    outbox::enqueue(&db, Kind::Alert, std::slice::from_ref(&row))
        .await
        .unwrap();
    let guard = herald_core::netguard::Guard::new(&[
        format!("127.0.0.1:{old_port}"),
        format!("127.0.0.1:{new_port}"),
    ]);
    // The configuration now names the new URL for the rule.
    let endpoints: HashMap<String, Endpoint> = [(
        row.destination.clone(),
        Endpoint {
            url: format!("http://127.0.0.1:{new_port}/hook"),
            key: b"k".to_vec(),
        },
    )]
    .into();
    let stop = CancellationToken::new();
    Dispatcher::new(Kind::Alert, endpoints, &guard, Duration::from_secs(5))
        .unwrap()
        .spawn(
            herald_core::db::Db::connect(&url).await.unwrap(),
            stop.clone(),
        );
    let started = Instant::now();
    while new.lock().unwrap().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(30), "not posted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    assert!(old.lock().unwrap().is_empty(), "nothing to the old URL");
    let columns: Vec<String> = db
        .query(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'webhook_outbox'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        !columns.iter().any(|c| c == "url"),
        "no URL is kept: {columns:?}"
    );
}
