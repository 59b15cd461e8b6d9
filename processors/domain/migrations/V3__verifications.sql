-- Verification codes (POST /v1/verifications). The code is never stored: only its keyed MAC
-- (bound to app, purpose and destination); the destination only as its recipient key and masked.
CREATE TABLE IF NOT EXISTS verifications (
    id text PRIMARY KEY,
    app_id text NOT NULL,
    purpose text NOT NULL,
    channel text NOT NULL,
    destination_key text NOT NULL,
    destination_masked text NOT NULL,
    code_mac bytea NOT NULL,
    -- pending, approved, max_attempts_reached, superseded, unsent
    status text NOT NULL,
    attempts int NOT NULL DEFAULT 0,
    max_attempts int NOT NULL,
    message_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    decided_at timestamptz
);
-- The per-destination send limits, and the latest code of an app, purpose and destination.
CREATE INDEX IF NOT EXISTS verifications_destination ON verifications (destination_key, created_at);
CREATE INDEX IF NOT EXISTS verifications_expires ON verifications (expires_at);
