-- `Idempotency-Key` of create and fork, per workspace: a repeated request with the same key
-- and body replays the first one's response. `status` is NULL while the first one runs.
-- Times are Unix milliseconds.
CREATE TABLE idempotency_keys (
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    key           TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    status        INTEGER,
    response      TEXT,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, key)
);

CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys(expires_at);
