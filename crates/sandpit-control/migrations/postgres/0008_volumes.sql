-- Named volumes: a workspace's ext4 image under `volumes/<id>/` on its home node
-- (`node_id`), mounted into sandboxes at create. `sandbox_volumes` says which sandbox mounts
-- which volume where; `snapshot_volumes` the references a snapshot keeps (never the data).
CREATE TABLE volumes (
    id           TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    name         TEXT NOT NULL,
    size_bytes   BIGINT NOT NULL,
    node_id      TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);
CREATE UNIQUE INDEX volumes_workspace_name ON volumes (workspace_id, name);
CREATE TABLE sandbox_volumes (
    sandbox_id TEXT NOT NULL,
    volume_id  TEXT NOT NULL,
    path       TEXT NOT NULL,
    read_only  BOOLEAN NOT NULL,
    PRIMARY KEY (sandbox_id, path)
);
CREATE INDEX sandbox_volumes_volume ON sandbox_volumes (volume_id);
CREATE TABLE snapshot_volumes (
    snapshot_id TEXT NOT NULL,
    volume_id   TEXT NOT NULL,
    path        TEXT NOT NULL,
    read_only   BOOLEAN NOT NULL,
    PRIMARY KEY (snapshot_id, path)
);
CREATE INDEX snapshot_volumes_volume ON snapshot_volumes (volume_id);
