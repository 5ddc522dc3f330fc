-- Webhooks: a workspace's endpoints that receive its lifecycle events (`/v1/webhooks`), and
-- one delivery row per (webhook, event), made when the event is appended. A delivery is
-- claimed by one server at a time through its lease (`lease_until`, `lease_node`), attempted,
-- and then delivered, rescheduled (`next_attempt_at`) or failed.
CREATE TABLE webhooks (
    id                TEXT PRIMARY KEY,
    workspace_id      TEXT NOT NULL,
    url               TEXT NOT NULL,
    -- `,kind,kind,`: the event kinds it receives; NULL: every kind.
    events            TEXT,
    description       TEXT,
    -- The signing key (the server needs it to sign, so it is kept as is).
    secret            TEXT NOT NULL,
    created_at        BIGINT NOT NULL
);

CREATE INDEX webhooks_by_workspace ON webhooks(workspace_id);

CREATE TABLE webhook_deliveries (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id        TEXT NOT NULL,
    workspace_id      TEXT NOT NULL,
    event_seq         BIGINT NOT NULL,
    -- When the event happened: retries stop a day after it.
    event_at          BIGINT NOT NULL,
    -- pending, delivered or failed.
    status            TEXT NOT NULL,
    attempts          BIGINT NOT NULL,
    next_attempt_at   BIGINT NOT NULL,
    lease_until       BIGINT,
    lease_node        TEXT,
    last_status_code  BIGINT,
    last_error        TEXT,
    -- The start of the last response's body (bounded).
    last_response     TEXT,
    last_attempt_at   BIGINT
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries(status, next_attempt_at);
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries(webhook_id, id);
CREATE INDEX webhook_deliveries_by_time ON webhook_deliveries(event_at);
