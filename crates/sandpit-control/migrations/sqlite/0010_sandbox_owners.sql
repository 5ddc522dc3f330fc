-- no-transaction
-- Every sandbox belongs to one node (`node_id`, its name in `nodes`; '' for rows written
-- before owners existed, adopted by the first node that starts). Network slots are a
-- node's own, so a slot is unique per node, no longer database-wide. SQLite cannot drop a
-- column constraint: the table is rebuilt, with foreign keys off so the preview tokens and
-- CodeSandbox rows that refer to sandboxes keep pointing at the same ids.
PRAGMA foreign_keys = OFF;
BEGIN;
CREATE TABLE sandboxes_new (
    id                TEXT PRIMARY KEY,
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    template_id       TEXT NOT NULL REFERENCES templates(id),
    template_name     TEXT NOT NULL,
    mode              TEXT NOT NULL,
    status            TEXT NOT NULL,
    size              TEXT NOT NULL,
    env               TEXT NOT NULL,
    metadata          TEXT NOT NULL,
    egress            TEXT NOT NULL,
    timeout_ms        INTEGER,
    idle_timeout_ms   INTEGER,
    expires_at        INTEGER,
    last_active_at    INTEGER NOT NULL,
    slot              INTEGER,
    runtime_id        TEXT NOT NULL UNIQUE,
    error             TEXT,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    preview_privacy   TEXT NOT NULL DEFAULT 'private',
    node_id           TEXT NOT NULL DEFAULT ''
);
INSERT INTO sandboxes_new (id, workspace_id, template_id, template_name, mode, status, size,
    env, metadata, egress, timeout_ms, idle_timeout_ms, expires_at, last_active_at, slot,
    runtime_id, error, created_at, updated_at, preview_privacy)
SELECT id, workspace_id, template_id, template_name, mode, status, size, env, metadata,
    egress, timeout_ms, idle_timeout_ms, expires_at, last_active_at, slot, runtime_id, error,
    created_at, updated_at, preview_privacy FROM sandboxes;
DROP TABLE sandboxes;
ALTER TABLE sandboxes_new RENAME TO sandboxes;
CREATE INDEX sandboxes_by_workspace ON sandboxes(workspace_id, status);
CREATE INDEX sandboxes_by_status ON sandboxes(status);
CREATE UNIQUE INDEX sandboxes_node_slot ON sandboxes(node_id, slot);
COMMIT;
PRAGMA foreign_keys = ON;
