-- Previews: who may open http://<sandbox>-<port>.<preview domain>, and the preview tokens
-- of private sandboxes. Times are Unix milliseconds.
ALTER TABLE sandboxes ADD COLUMN preview_privacy TEXT NOT NULL DEFAULT 'private';

-- Only the SHA-256 of a token is stored; the token itself is shown once. Revoked tokens
-- keep their row (revoked_at set) so a request with one is told it was revoked.
CREATE TABLE preview_tokens (
    id            TEXT PRIMARY KEY,
    sandbox_id    TEXT NOT NULL REFERENCES sandboxes(id),
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    token_hash    TEXT NOT NULL UNIQUE,
    token_prefix  TEXT NOT NULL,
    expires_at    INTEGER,
    revoked_at    INTEGER,
    created_at    INTEGER NOT NULL
);

CREATE INDEX preview_tokens_by_sandbox ON preview_tokens(sandbox_id);
