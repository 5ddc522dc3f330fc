-- A named snapshot in object storage (JSON, `remote::RemoteImage`): whether it is uploading,
-- stored (a node without its files may then fetch it and start sandboxes from it) or could
-- not be; NULL when no object store is configured.
ALTER TABLE snapshots ADD COLUMN remote_image TEXT;
-- Template layers in object storage, by layer id (content-addressed, so shared by templates
-- and equal on every node): the reference of the layer's archive, which a node lacking the
-- layer fetches and unpacks.
CREATE TABLE stored_layers (
    layer_id TEXT PRIMARY KEY,
    reference TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    stored_at BIGINT NOT NULL
);
