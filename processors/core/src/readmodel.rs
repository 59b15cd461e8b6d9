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
ALTER TABLE messages ADD COLUMN IF NOT EXISTS recipient_key text;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS latency_ms bigint;
CREATE INDEX IF NOT EXISTS messages_recipient ON messages (app_id, recipient_key, created_at DESC, message_id DESC);
CREATE INDEX IF NOT EXISTS messages_created ON messages (app_id, created_at);
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
CREATE TABLE IF NOT EXISTS delivery_attempts (
    message_id text NOT NULL,
    attempt int NOT NULL,
    provider text,
    outcome text NOT NULL,
    status text NOT NULL,
    response_code text,
    latency_ms bigint,
    reason_code text,
    reason_message text,
    at timestamptz NOT NULL,
    PRIMARY KEY (message_id, attempt)
);
CREATE TABLE IF NOT EXISTS projector_offsets (
    topic text NOT NULL,
    partition int NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);
";

/// The in-app inbox: written by the send stage's `inapp` provider, read (and marked read) through
/// the API. Inserting is idempotent on the message id.
pub const INBOX_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS inbox (
    message_id text PRIMARY KEY,
    app_id text NOT NULL,
    user_id text NOT NULL,
    title text,
    body text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    read_at timestamptz
);
CREATE INDEX IF NOT EXISTS inbox_user ON inbox (app_id, user_id, created_at DESC, message_id DESC)";

/// `NOTIFY` channel for new inbox rows; the payload is `<app_id>/<user_id>`.
pub const INBOX_CHANNEL: &str = "herald_inbox";

/// Recipients who opted out of a channel, per app (`PUT`/`DELETE /v1/opt-outs/{channel}/{address}`),
/// consulted by the route stage.
pub const OPT_OUT_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS opt_outs (
    app_id text NOT NULL,
    channel text NOT NULL,
    address text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, channel, address)
)";
