//! The read model's tables: written by the projector, read by the API. One DDL for both.

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    message_id text PRIMARY KEY,
    request_id text NOT NULL,
    app_id text NOT NULL,
    channel text NOT NULL,
    recipient_masked text,
    status text NOT NULL,
    status_rank smallint NOT NULL,
    provider text,
    attempts int NOT NULL DEFAULT 0,
    template text,
    template_version int,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_request ON messages (request_id);
CREATE TABLE IF NOT EXISTS message_events (
    event_id text PRIMARY KEY,
    message_id text NOT NULL,
    status text NOT NULL,
    at timestamptz NOT NULL,
    stage text NOT NULL,
    provider text,
    attempt int NOT NULL,
    reason_code text,
    reason_message text
);
CREATE INDEX IF NOT EXISTS message_events_message ON message_events (message_id, at);
CREATE TABLE IF NOT EXISTS projector_offsets (
    topic text NOT NULL,
    partition int NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);
";
