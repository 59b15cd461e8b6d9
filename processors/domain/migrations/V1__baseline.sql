-- Herald's schema as of the first versioned migration. Every statement is idempotent and
-- carries the upgrades earlier releases applied at start (columns added, primary keys widened),
-- so a database created by any earlier Herald is brought forward by this migration as well.
-- Each table belongs to one module (named per section); nobody else writes SQL against it.

-- templates (domain::templates)
CREATE TABLE IF NOT EXISTS templates (
    code text NOT NULL,
    version int NOT NULL,
    body text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (code, version)
);
-- Templates belong to an app ('' = shared, from the config). Rows from before tenancy are
-- shared: nobody's to overwrite.
ALTER TABLE templates ADD COLUMN IF NOT EXISTS app_id text NOT NULL DEFAULT '';
DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE c.relname = 'templates_pkey' AND i.indnatts = 2) THEN
    ALTER TABLE templates DROP CONSTRAINT templates_pkey;
    ALTER TABLE templates ADD PRIMARY KEY (app_id, code, version);
  END IF;
END $$;

-- request keys (domain::idempotency)
CREATE TABLE IF NOT EXISTS request_keys (
    app_id text NOT NULL,
    key text NOT NULL,
    request_id text NOT NULL,
    source text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, key)
);

-- daily quotas (domain::quota)
CREATE TABLE IF NOT EXISTS app_usage (
    app_id text NOT NULL,
    day date NOT NULL,
    messages bigint NOT NULL,
    PRIMARY KEY (app_id, day)
);

-- accepted, not yet projected (domain::intake)
CREATE TABLE IF NOT EXISTS intake (
    message_id text PRIMARY KEY,
    request_id text NOT NULL,
    app_id text NOT NULL,
    channel text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS intake_request ON intake (app_id, request_id);
CREATE INDEX IF NOT EXISTS intake_at ON intake (at);

-- the send gate (domain::gate)
CREATE TABLE IF NOT EXISTS message_gate (
    message_id text PRIMARY KEY,
    state text NOT NULL CHECK (state IN ('canceled', 'sending')),
    at timestamptz NOT NULL DEFAULT now()
);

-- the read model (projector writes, API reads: domain::readmodel)
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

-- the in-app inbox (domain::readmodel::inbox)
CREATE TABLE IF NOT EXISTS inbox (
    message_id text PRIMARY KEY,
    app_id text NOT NULL,
    user_id text NOT NULL,
    title text,
    body text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    read_at timestamptz
);
CREATE INDEX IF NOT EXISTS inbox_user ON inbox (app_id, user_id, created_at DESC, message_id DESC);

-- opt-outs (domain::readmodel)
CREATE TABLE IF NOT EXISTS opt_outs (
    app_id text NOT NULL,
    channel text NOT NULL,
    address text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, channel, address)
);

-- request nonces (api::auth)
CREATE TABLE IF NOT EXISTS api_nonces (
    app_id text NOT NULL,
    nonce text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (app_id, nonce)
);

-- dedup and frequency-cap hits (route::policy)
CREATE TABLE IF NOT EXISTS policy_hits (
    scope text NOT NULL,
    message_id text NOT NULL,
    content_hash text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, message_id)
);
CREATE INDEX IF NOT EXISTS policy_hits_scope_at ON policy_hits (scope, at);

-- the send ledger (send::ledger)
CREATE TABLE IF NOT EXISTS send_ledger (
    message_id text NOT NULL,
    attempt int NOT NULL,
    provider text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz,
    outcome text,
    response_code text,
    provider_message_id text,
    reason_code text,
    reason_message text,
    latency_ms bigint,
    PRIMARY KEY (message_id, attempt)
);
ALTER TABLE send_ledger ADD COLUMN IF NOT EXISTS started_at timestamptz;
ALTER TABLE send_ledger ADD COLUMN IF NOT EXISTS request_id text;
ALTER TABLE send_ledger ADD COLUMN IF NOT EXISTS app_id text;
ALTER TABLE send_ledger ADD COLUMN IF NOT EXISTS channel text;
-- The MessageRouted record (as consumed) where a callback_failure rule may resend it after an
-- undelivered receipt.
ALTER TABLE send_ledger ADD COLUMN IF NOT EXISTS routed bytea;
-- Each attempt's row is updated twice (started, finished): room for HOT updates.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_class WHERE relname = 'send_ledger' AND reloptions @> ARRAY['fillfactor=70']) THEN
    ALTER TABLE send_ledger SET (fillfactor = 70);
  END IF;
END $$;
CREATE INDEX IF NOT EXISTS send_ledger_provider_id ON send_ledger (provider, provider_message_id)
    WHERE provider_message_id IS NOT NULL;

-- breaker state (domain::failure::breaker)
CREATE TABLE IF NOT EXISTS provider_health (
    provider text PRIMARY KEY,
    open_until timestamptz,
    failure_rate double precision NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE provider_health ADD COLUMN IF NOT EXISTS receipts_open_until timestamptz;
ALTER TABLE provider_health ADD COLUMN IF NOT EXISTS receipts_failure_rate double precision NOT NULL DEFAULT 0;

-- alert outbox (domain::failure::alert)
CREATE TABLE IF NOT EXISTS alert_outbox (
    id text PRIMARY KEY,
    rule text NOT NULL,
    url text NOT NULL,
    payload text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    last_error text
);
CREATE INDEX IF NOT EXISTS alert_outbox_due ON alert_outbox (next_attempt_at)
    WHERE delivered_at IS NULL;

-- receipt deadlines (domain::failure::receipt_wait)
CREATE TABLE IF NOT EXISTS receipt_waits (
    message_id text NOT NULL,
    attempt int NOT NULL,
    due_at timestamptz NOT NULL,
    -- A receipt that overtook the send's own record: the wait it would start is over already.
    received boolean NOT NULL DEFAULT false,
    PRIMARY KEY (message_id, attempt)
);
ALTER TABLE receipt_waits ADD COLUMN IF NOT EXISTS received boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS receipt_waits_due ON receipt_waits (due_at);

-- receipt webhook ids (callback)
CREATE TABLE IF NOT EXISTS receipt_ids (
    provider text NOT NULL,
    webhook_id text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, webhook_id)
);

-- status-webhook outbox (notify)
CREATE TABLE IF NOT EXISTS status_notifications (
    message_id text PRIMARY KEY,
    app_id text NOT NULL,
    payload text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    last_error text
);
CREATE INDEX IF NOT EXISTS status_notifications_due ON status_notifications (next_attempt_at)
    WHERE delivered_at IS NULL;
