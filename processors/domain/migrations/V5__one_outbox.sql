-- One signed-webhook outbox (domain::outbox) for operator alerts (kind 'alert', destination =
-- the rule's name) and apps' status webhooks (kind 'status', id = the message id, destination =
-- the app). Rows name their destination, never its URL: the dispatcher looks the URL up when it
-- posts. What the two outboxes it replaces held is carried over.
--
-- The old tables are locked first (this migration runs in one transaction): a row an older
-- process commits while the copy runs is not dropped with its table; the older process's next
-- write waits for the lock, then fails and is retried until the process is replaced.
LOCK TABLE alert_outbox, status_notifications IN ACCESS EXCLUSIVE MODE;
CREATE TABLE IF NOT EXISTS webhook_outbox (
    kind text NOT NULL,
    id text NOT NULL,
    destination text NOT NULL,
    payload text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    last_error text,
    PRIMARY KEY (kind, id)
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (kind, next_attempt_at)
    WHERE delivered_at IS NULL;

INSERT INTO webhook_outbox (kind, id, destination, payload, created_at, attempts,
                            next_attempt_at, delivered_at, last_error)
SELECT 'alert', id, rule, payload, created_at, attempts, next_attempt_at, delivered_at, last_error
FROM alert_outbox
ON CONFLICT DO NOTHING;

INSERT INTO webhook_outbox (kind, id, destination, payload, created_at, attempts,
                            next_attempt_at, delivered_at, last_error)
SELECT 'status', message_id, app_id, payload, created_at, attempts, next_attempt_at,
       delivered_at, last_error
FROM status_notifications
ON CONFLICT DO NOTHING;

DROP TABLE alert_outbox;
DROP TABLE status_notifications;
