-- Every sandbox belongs to one node (`node_id`, its name in `nodes`; '' for rows written
-- before owners existed, adopted by the first node that starts). Network slots are a
-- node's own, so a slot is unique per node, no longer database-wide.
ALTER TABLE sandboxes ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
ALTER TABLE sandboxes DROP CONSTRAINT sandboxes_slot_key;
CREATE UNIQUE INDEX sandboxes_node_slot ON sandboxes(node_id, slot);
