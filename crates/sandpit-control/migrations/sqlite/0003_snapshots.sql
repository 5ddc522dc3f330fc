-- Named snapshots: a sandbox's files and memory image, kept under snapshots/<id>/.
CREATE TABLE snapshots (
    id                TEXT PRIMARY KEY,
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    sandbox_id        TEXT NOT NULL,
    template_id       TEXT NOT NULL REFERENCES templates(id),
    template_name     TEXT NOT NULL,
    size              TEXT NOT NULL,
    env               TEXT NOT NULL,
    egress            TEXT NOT NULL,
    has_memory        INTEGER NOT NULL,
    size_bytes        INTEGER NOT NULL,
    created_at        INTEGER NOT NULL
);

CREATE INDEX snapshots_by_workspace ON snapshots(workspace_id, sandbox_id);
