-- Mobile push device tokens a provider said are gone for good (FCM UNREGISTERED, APNs 410
-- Unregistered). The route stage suppresses later sends to them (policy dead_token); the app
-- reads them at GET /v1/device-tokens/dead to prune its own records, and may revive one.
CREATE TABLE IF NOT EXISTS dead_device_tokens (
    app_id text NOT NULL,
    channel text NOT NULL,
    token text NOT NULL,
    provider text NOT NULL,
    reason_code text NOT NULL,
    message_id text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, channel, token)
);
CREATE INDEX IF NOT EXISTS dead_device_tokens_at ON dead_device_tokens (app_id, at);
