//! Herald's shared core. Every stage crate depends on this and on `herald-schemas`, never on
//! another stage.
//!
//! - [`transport`]: the consume/commit/publish interface and its Kafka and Redis Streams
//!   implementations (ARCHITECTURE.md §5).
//! - [`codec`]: Avro in the Confluent wire format behind a schema resolver.
//! - [`worker`]: the batch loop (consume → handle → commit) with rebuild-on-failure, and the
//!   dead-letter helpers that keep promise 5 (bad input never stops a stage).
//! - [`failure`]: the failure rule engine, circuit breakers and operator alerts, shared by the
//!   send stage (failed calls) and the callback stage (undelivered receipts).
//! - [`config`], [`telemetry`], [`shutdown`], [`util`].

pub mod cli;
pub mod codec;
pub mod config;
pub mod db;
pub mod failure;
pub mod gate;
pub mod health;
pub mod idempotency;
pub mod intake;
pub mod memory;
pub mod netguard;
pub mod quota;
pub mod readmodel;
pub mod redact;
pub mod retention;
pub mod runtime;
pub mod serve;
pub mod shutdown;
pub mod sign;
pub mod telemetry;
pub mod templates;
pub mod transport;
pub mod util;
pub mod validate;
pub mod worker;

pub use herald_schemas as schemas;
