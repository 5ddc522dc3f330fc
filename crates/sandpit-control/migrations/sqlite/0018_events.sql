-- The per-workspace lifecycle event log (`GET /v1/events`): appended as things happen on any
-- node, read in `seq` order, pruned after the retention period.
CREATE TABLE events (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    workspace_id      TEXT NOT NULL,
    kind              TEXT NOT NULL,
    sandbox_id        TEXT,
    -- JSON object: what else the event says (a reason, a path, a parent).
    detail            TEXT NOT NULL,
    at                BIGINT NOT NULL
);

CREATE INDEX events_by_workspace ON events(workspace_id, seq);
CREATE INDEX events_by_time ON events(at);
