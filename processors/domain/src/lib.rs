//! Herald's domain: the rules every stage applies, apart from the plumbing that moves records
//! (`herald-core`). Stages depend on this crate and on `herald-core`, never on each other.
//!
//! - [`validate`]: the one request validation, used by the gateway (4xx) and the accept stage
//!   (`failed` or dead letter).
//! - [`templates`]: the versioned template store, and compiling and rendering (used by the render
//!   stage, and by the gateway to check a template before storing it).
//! - [`failure`]: the failure rule engine, circuit breakers, operator alerts and receipt
//!   deadlines, shared by the send stage (failed calls) and the callback stage (receipts).
//! - [`gate`], [`idempotency`], [`quota`], [`intake`]: the decisions that must be atomic across
//!   processes, each on its own PostgreSQL table.
//! - [`readmodel`], [`retention`]: the read model's tables and the purge of everything that
//!   grows with traffic.
//! - [`redact`]: what leaves in error texts.
//! - [`destination`]: the one normalised form (and key) of a destination that per-destination
//!   rules key on: e-mail case, phones in E.164.
//! - [`verification`]: verification codes: generation, the keyed MAC they are stored as, their
//!   seal in transit, and the checks and limits.

pub mod cancel;
pub mod dead_letters;
pub mod destination;
pub mod device_tokens;
pub mod event;
pub mod failure;
pub mod gate;
pub mod idempotency;
pub mod inbox;
pub mod intake;
pub mod ledger;
pub mod opt_out;
pub mod outbox;
pub mod quota;
pub mod readmodel;
pub mod redact;
pub mod retention;
pub mod schema;
pub mod status;
pub mod store;
pub mod templates;
pub mod validate;
pub mod verification;
