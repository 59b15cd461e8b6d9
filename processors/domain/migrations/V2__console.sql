-- Dead letters, projected from herald.dead-letters.v1 for the console and `herald dlq`:
-- the original bytes and where they came from, and what an operator did with them.
CREATE TABLE IF NOT EXISTS dead_letters (
    event_id text PRIMARY KEY,
    at timestamptz NOT NULL,
    stage text NOT NULL,
    source_topic text NOT NULL,
    source_partition int NOT NULL,
    source_offset bigint NOT NULL,
    record_key bytea,
    payload bytea,
    reason_code text NOT NULL,
    reason_message text NOT NULL,
    message_id text,
    request_id text,
    redriven_at timestamptz,
    redriven_by text,
    redrives int NOT NULL DEFAULT 0,
    resolved_at timestamptz,
    resolved_by text
);
CREATE INDEX IF NOT EXISTS dead_letters_at ON dead_letters (at DESC, event_id);

-- Console operators' sessions: the cookie's hash only, expiring; logout deletes the row.
CREATE TABLE IF NOT EXISTS console_sessions (
    id_hash text PRIMARY KEY,
    operator text NOT NULL,
    role text NOT NULL,
    csrf text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

-- Every change an operator makes in the console (and `herald dlq redrive`).
CREATE TABLE IF NOT EXISTS console_audit (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    operator text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    detail jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS console_audit_at ON console_audit (at DESC);
-- The console's message list, across apps, newest first.
CREATE INDEX IF NOT EXISTS messages_recent ON messages (created_at DESC, message_id);
