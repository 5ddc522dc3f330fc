-- CodeSandbox compatibility (seed 000): what the CSB API shows of a sandbox that Sandpit's
-- own rows do not hold, and the tokens that open the agent gateway (`pitcher_url`).
CREATE TABLE csb_sandboxes (
    sandbox_id        TEXT PRIMARY KEY REFERENCES sandboxes(id),
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    title             TEXT,
    description       TEXT,
    -- JSON array of strings.
    tags              TEXT NOT NULL DEFAULT '[]',
    -- 0 public, 1 unlisted, 2 private.
    privacy           INTEGER NOT NULL DEFAULT 2,
    tier              TEXT NOT NULL DEFAULT 'Micro'
);

-- Agent gateway tokens: SHA-256 hashes only.
CREATE TABLE csb_agent_tokens (
    token_hash        TEXT PRIMARY KEY,
    sandbox_id        TEXT NOT NULL,
    workspace_id      TEXT NOT NULL,
    -- 'read' or 'write'.
    permission        TEXT NOT NULL,
    expires_at        INTEGER NOT NULL,
    -- A session's Linux user (`POST /vm/{id}/sessions`); NULL: root.
    username          TEXT,
    -- Session tokens open one connection, then are gone.
    single_use        INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX csb_agent_tokens_by_sandbox ON csb_agent_tokens(sandbox_id);

-- VM tags (`POST /vm/tag`) and their aliases (`PUT /vm/alias/{namespace}/{alias}`).
CREATE TABLE csb_tags (
    id                TEXT PRIMARY KEY,
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    -- JSON array of sandbox ids.
    vm_ids            TEXT NOT NULL,
    created_at        INTEGER NOT NULL
);

CREATE TABLE csb_aliases (
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    namespace         TEXT NOT NULL,
    alias             TEXT NOT NULL,
    tag_id            TEXT NOT NULL REFERENCES csb_tags(id),
    PRIMARY KEY (workspace_id, namespace, alias)
);

-- Trusted preview hosts (`/workspace/preview_hosts`): a browser page served from one of
-- these hosts may load the workspace's private previews without a preview token.
CREATE TABLE csb_preview_hosts (
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    host              TEXT NOT NULL,
    inserted_at       INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, host)
);

-- `fs/download` links: a path of one sandbox, for five minutes (SHA-256 hashes only).
CREATE TABLE csb_download_tokens (
    token_hash        TEXT PRIMARY KEY,
    sandbox_id        TEXT NOT NULL,
    path              TEXT NOT NULL,
    expires_at        INTEGER NOT NULL
);
