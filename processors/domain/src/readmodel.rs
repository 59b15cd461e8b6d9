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
-- A row is rewritten as each status fact arrives; room on the page keeps those updates HOT
-- (no index writes), since no indexed column changes.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_class WHERE relname = 'messages' AND reloptions @> ARRAY['fillfactor=70']) THEN
    ALTER TABLE messages SET (fillfactor = 70);
  END IF;
END $$;
-- The timeline: keyed by message first, so one index serves both idempotent inserts and
-- reading a message's events.
CREATE TABLE IF NOT EXISTS message_events (
    event_id text NOT NULL,
    message_id text NOT NULL,
    status text NOT NULL,
    at timestamptz NOT NULL,
    stage text NOT NULL,
    provider text,
    attempt int NOT NULL,
    reason_code text,
    reason_message text,
    PRIMARY KEY (message_id, event_id)
);
DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE c.relname = 'message_events_pkey' AND i.indnatts = 1) THEN
    ALTER TABLE message_events DROP CONSTRAINT message_events_pkey;
    ALTER TABLE message_events ADD PRIMARY KEY (message_id, event_id);
  END IF;
END $$;
DROP INDEX IF EXISTS message_events_message;
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
