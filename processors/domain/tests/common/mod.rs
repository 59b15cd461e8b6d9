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

/// A new empty database; its connection string.
#[allow(dead_code)] // not every test file of this crate needs one
pub async fn fresh_database(name: &str) -> String {
    let admin = connect(&base_url()).await;
    // Fixed names: the next run drops what this one left.
    let db = format!("herald_test_{name}");
    // One statement each: neither may run inside a transaction block.
    for sql in [
        format!("DROP DATABASE IF EXISTS {db}"),
        format!("CREATE DATABASE {db}"),
    ] {
        admin.simple_query(&sql).await.unwrap();
    }
    let mut cfg: tokio_postgres::Config = base_url().parse().unwrap();
    cfg.dbname(&db);
    let host = match &cfg.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[allow(unreachable_patterns)]
        _ => "127.0.0.1".into(),
    };
    format!(
        "host={host} port={} user={} dbname={db}",
        cfg.get_ports().first().copied().unwrap_or(5432),
        cfg.get_user().unwrap_or("herald")
    )
}
