//! Herald's plumbing. Every stage crate depends on this, on `herald-domain` (the rules) and on
//! `herald-schemas`, never on another stage.
//!
//! - [`transport`]: the consume/commit/publish interface and its Kafka and Redis Streams
//!   implementations (ARCHITECTURE.md §5).
//! - [`codec`]: Avro in the Confluent wire format behind a schema resolver.
//! - [`worker`]: the batch loop (consume → handle → commit) with rebuild-on-failure, and the
//!   dead-letter helpers that keep promise 5 (bad input never stops a stage).
//! - [`coalesce`]: group commit for concurrent callers (the gateway's per-request writes).
//! - [`config`], [`telemetry`], [`shutdown`], [`util`].

pub mod cli;
pub mod coalesce;
pub mod codec;
pub mod config;
pub mod db;
pub mod health;
pub mod memory;
pub mod netguard;
pub mod runtime;
pub mod serve;
pub mod shutdown;
pub mod sign;
pub mod telemetry;
pub mod trace;
pub mod transport;
pub mod util;
pub mod worker;

pub use herald_schemas as schemas;
