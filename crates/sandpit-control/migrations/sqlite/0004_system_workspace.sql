-- The server's own organization and workspace. Warm-pool sandboxes belong to it until they
-- are handed out; no token is ever issued for it.
INSERT INTO orgs (id, name, created_at) VALUES ('org_system', 'system', 0);
INSERT INTO workspaces (id, org_id, name, created_at) VALUES ('ws_system', 'org_system', 'warm pool', 0);
