-- What a server settles at its start is its own: the node running each template build
-- (its event log lives there) and the node running each pending idempotent request. NULL:
-- recorded before this migration (settled by any server, as before).
ALTER TABLE templates ADD COLUMN build_node TEXT;
ALTER TABLE idempotency_keys ADD COLUMN node_id TEXT;
