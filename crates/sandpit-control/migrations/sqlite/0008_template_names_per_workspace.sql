-- no-transaction
-- Template names are unique per workspace (built-in templates, workspace_id NULL, form one
-- more scope), no longer server-wide: a name taken in another workspace must not show.
-- SQLite cannot drop a column constraint: the table is rebuilt, with foreign keys off so the
-- sandboxes and aliases that refer to templates keep pointing at the same ids.
PRAGMA foreign_keys = OFF;
BEGIN;
CREATE TABLE templates_new (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    workspace_id    TEXT REFERENCES workspaces(id),
    description     TEXT NOT NULL,
    rootfs          TEXT NOT NULL,
    default_egress  TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    layers          TEXT NOT NULL DEFAULT '[]',
    config          TEXT NOT NULL DEFAULT '{}',
    status          TEXT NOT NULL DEFAULT 'ready',
    error           TEXT,
    source          TEXT NOT NULL DEFAULT 'builtin',
    updated_at      INTEGER NOT NULL DEFAULT 0
);
INSERT INTO templates_new (id, name, workspace_id, description, rootfs, default_egress,
    created_at, layers, config, status, error, source, updated_at)
SELECT id, name, workspace_id, description, rootfs, default_egress, created_at, layers,
    config, status, error, source, updated_at FROM templates;
DROP TABLE templates;
ALTER TABLE templates_new RENAME TO templates;
CREATE UNIQUE INDEX templates_scope_name ON templates (COALESCE(workspace_id, ''), name);
COMMIT;
PRAGMA foreign_keys = ON;
