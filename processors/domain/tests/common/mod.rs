//! What the PostgreSQL tests of this crate share: the stack's connection string and a client.

use tokio_postgres::{Client, NoTls};

pub fn base_url() -> String {
    std::env::var("HERALD_POSTGRES_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=55432 user=herald dbname=herald".into())
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("PostgreSQL up (scripts/stack up)");
    tokio::spawn(conn);
    client
}
