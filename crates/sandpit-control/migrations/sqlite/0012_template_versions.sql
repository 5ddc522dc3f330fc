-- Template versions: building an existing name adds version N+1 of it (a row of its own,
-- which sandboxes, snapshots and aliases refer to by id). `name` resolves to its highest
-- ready version, `name:N` to version N. A deleted version keeps its row, name and number
-- (numbers are never reused), so names are unique per workspace and version.
ALTER TABLE templates ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
DROP INDEX templates_scope_name;
CREATE UNIQUE INDEX templates_scope_name_version ON templates (COALESCE(workspace_id, ''), name, version);
