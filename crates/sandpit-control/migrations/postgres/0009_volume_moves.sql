-- A volume can leave its node through object storage (a drain): `remote_image` records the
-- stored image (JSON: reference, bytes) while `node_id` is '~stored'; the node of the next
-- create that mounts it fetches it and takes it.
ALTER TABLE volumes ADD COLUMN remote_image TEXT;
