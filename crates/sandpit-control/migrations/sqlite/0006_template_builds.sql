-- Templates built from Dockerfiles and OCI images (see sandpit-image).
-- layers: JSON array of layer directories, lowest first ('[]': the rootfs column alone).
-- config: JSON image config (env, workdir, user, entrypoint, cmd, ports, ready check).
-- status: building | ready | failed | deleted. A deleted template keeps its row (sandboxes
-- and snapshots refer to it) under a freed name.
ALTER TABLE templates ADD COLUMN layers TEXT NOT NULL DEFAULT '[]';
ALTER TABLE templates ADD COLUMN config TEXT NOT NULL DEFAULT '{}';
ALTER TABLE templates ADD COLUMN status TEXT NOT NULL DEFAULT 'ready';
ALTER TABLE templates ADD COLUMN error TEXT;
ALTER TABLE templates ADD COLUMN source TEXT NOT NULL DEFAULT 'builtin';
ALTER TABLE templates ADD COLUMN updated_at INTEGER NOT NULL DEFAULT 0;

-- Movable names `namespace@alias` pointing at a workspace's template.
CREATE TABLE template_aliases (
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    namespace     TEXT NOT NULL,
    alias         TEXT NOT NULL,
    template_id   TEXT NOT NULL REFERENCES templates(id),
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, namespace, alias)
);
