//! The gateway's group-committed nonce store against the stack's real PostgreSQL (`scripts/stack
//! up`, schema migrated by any Herald start or `herald setup`): one statement answers many
//! requests, and each nonce is fresh exactly once — within a batch, across batches, per app.

use herald_api::auth::remember_nonces;

async fn db() -> tokio_postgres::Client {
    let url = std::env::var("HERALD_POSTGRES_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=55432 user=herald dbname=herald".into());
    let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL up (scripts/stack up)");
    tokio::spawn(conn);
    herald_domain::schema::migrate(&mut client)
        .await
        .expect("schema");
    client
}

#[tokio::test]
async fn each_nonce_is_fresh_once_within_a_batch_across_batches_and_per_app() {
    let db = db().await;
    let n = |s: &str| format!("{s}-{}", herald_core::util::now_ms());
    let (a, b) = (n("nonce-a"), n("nonce-b"));
    let pair = |app: &str, nonce: &str| (app.to_owned(), nonce.to_owned());
    let first = remember_nonces(
        &db,
        &[
            pair("shop", &a),
            pair("shop", &a),
            pair("shop", &b),
            pair("crm", &a),
        ],
        300,
    )
    .await
    .unwrap();
    assert_eq!(
        first,
        [true, false, true, true],
        "the second use in one batch is refused"
    );
    let again = remember_nonces(&db, &[pair("shop", &b), pair("crm", &b)], 300)
        .await
        .unwrap();
    assert_eq!(
        again,
        [false, true],
        "used before: refused; another app's: its own"
    );
    assert!(remember_nonces(&db, &[], 300).await.unwrap().is_empty());
}
