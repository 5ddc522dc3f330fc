-- A suspended sandbox's image in object storage (JSON, `remote::RemoteImage`): whether it
-- is uploading, stored (any node may then wake the sandbox) or could not be; NULL when no
-- object store is configured or the sandbox is not suspended.
ALTER TABLE sandboxes ADD COLUMN remote_image TEXT;
