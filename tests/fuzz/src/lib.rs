//! Property-based fuzzing of every place hostile bytes enter Herald: the Avro decode of every
//! input topic, the gateway's JSON and authentication headers, the provider callback parsers,
//! and template compilation and rendering. The targets are in `tests/fuzz.rs`; `scripts/fuzz`
//! runs each for at least 1,000,000 cases, `scripts/test` a short seeded slice.
//!
//! `FUZZ_CASES` sets the cases per target (default 2,000) and `FUZZ_SEED` the seed (default
//! fixed, so CI's slice is the same every run).
