-- The PostgreSQL schema: the same tables and meaning as SQLite's migrations 0001-0008,
-- in one step. Times are Unix milliseconds (BIGINT); JSON records are TEXT, decoded by the
-- control layer (fail-closed), so both databases hold the same bytes.

CREATE TABLE orgs (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE workspaces (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs(id),
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

-- The server's own organization and workspace. Warm-pool sandboxes belong to it until they
-- are handed out; no token is ever issued for it.
INSERT INTO orgs (id, name, created_at) VALUES ('org_system', 'system', 0);
INSERT INTO workspaces (id, org_id, name, created_at) VALUES ('ws_system', 'org_system', 'warm pool', 0);

-- Only the SHA-256 of a token is stored; the token itself is shown once.
CREATE TABLE api_tokens (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    token_hash    TEXT NOT NULL UNIQUE,
    description   TEXT,
    scopes        TEXT NOT NULL,
    expires_at    BIGINT,
    created_at    BIGINT NOT NULL
);

-- workspace_id NULL: a built-in template every workspace can use. Names are unique per
-- workspace (built-in ones form one more scope). status: not_built | building | ready |
-- failed | deleted; a deleted template keeps its row under a freed name.
CREATE TABLE templates (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    workspace_id    TEXT REFERENCES workspaces(id),
    description     TEXT NOT NULL,
    rootfs          TEXT NOT NULL,
    default_egress  TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    layers          TEXT NOT NULL DEFAULT '[]',
    config          TEXT NOT NULL DEFAULT '{}',
    status          TEXT NOT NULL DEFAULT 'ready',
    error           TEXT,
    source          TEXT NOT NULL DEFAULT 'builtin',
    updated_at      BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX templates_scope_name ON templates (COALESCE(workspace_id, ''), name);

CREATE TABLE sandboxes (
    id                TEXT PRIMARY KEY,
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    template_id       TEXT NOT NULL REFERENCES templates(id),
    template_name     TEXT NOT NULL,
    mode              TEXT NOT NULL,
    status            TEXT NOT NULL,
    size              TEXT NOT NULL,
    env               TEXT NOT NULL,
    metadata          TEXT NOT NULL,
    egress            TEXT NOT NULL,
    timeout_ms        BIGINT,
    idle_timeout_ms   BIGINT,
    expires_at        BIGINT,
    last_active_at    BIGINT NOT NULL,
    slot              BIGINT UNIQUE,
    runtime_id        TEXT NOT NULL UNIQUE,
    error             TEXT,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    preview_privacy   TEXT NOT NULL DEFAULT 'private'
);
CREATE INDEX sandboxes_by_workspace ON sandboxes(workspace_id, status);
CREATE INDEX sandboxes_by_status ON sandboxes(status);

CREATE TABLE preview_tokens (
    id            TEXT PRIMARY KEY,
    sandbox_id    TEXT NOT NULL REFERENCES sandboxes(id),
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    token_hash    TEXT NOT NULL UNIQUE,
    token_prefix  TEXT NOT NULL,
    expires_at    BIGINT,
    revoked_at    BIGINT,
    created_at    BIGINT NOT NULL
);
CREATE INDEX preview_tokens_by_sandbox ON preview_tokens(sandbox_id);

CREATE TABLE snapshots (
    id                TEXT PRIMARY KEY,
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    sandbox_id        TEXT NOT NULL,
    template_id       TEXT NOT NULL REFERENCES templates(id),
    template_name     TEXT NOT NULL,
    size              TEXT NOT NULL,
    env               TEXT NOT NULL,
    egress            TEXT NOT NULL,
    has_memory        BOOLEAN NOT NULL,
    size_bytes        BIGINT NOT NULL,
    created_at        BIGINT NOT NULL
);
CREATE INDEX snapshots_by_workspace ON snapshots(workspace_id, sandbox_id);

-- status is NULL while the first request with the key runs.
CREATE TABLE idempotency_keys (
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    key           TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    status        BIGINT,
    response      TEXT,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, key)
);
CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys(expires_at);

CREATE TABLE template_aliases (
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    namespace     TEXT NOT NULL,
    alias         TEXT NOT NULL,
    template_id   TEXT NOT NULL REFERENCES templates(id),
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, namespace, alias)
);

-- CodeSandbox compatibility (seed 000), used by sandpit-server's compat surface.
CREATE TABLE csb_sandboxes (
    sandbox_id        TEXT PRIMARY KEY REFERENCES sandboxes(id),
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    title             TEXT,
    description       TEXT,
    tags              TEXT NOT NULL DEFAULT '[]',
    privacy           BIGINT NOT NULL DEFAULT 2,
    tier              TEXT NOT NULL DEFAULT 'Micro'
);

CREATE TABLE csb_agent_tokens (
    token_hash        TEXT PRIMARY KEY,
    sandbox_id        TEXT NOT NULL,
    workspace_id      TEXT NOT NULL,
    permission        TEXT NOT NULL,
    expires_at        BIGINT NOT NULL,
    username          TEXT,
    single_use        BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX csb_agent_tokens_by_sandbox ON csb_agent_tokens(sandbox_id);

CREATE TABLE csb_tags (
    id                TEXT PRIMARY KEY,
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    vm_ids            TEXT NOT NULL,
    created_at        BIGINT NOT NULL
);

CREATE TABLE csb_aliases (
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    namespace         TEXT NOT NULL,
    alias             TEXT NOT NULL,
    tag_id            TEXT NOT NULL REFERENCES csb_tags(id),
    PRIMARY KEY (workspace_id, namespace, alias)
);

CREATE TABLE csb_preview_hosts (
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    host              TEXT NOT NULL,
    inserted_at       BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, host)
);

CREATE TABLE csb_download_tokens (
    token_hash        TEXT PRIMARY KEY,
    sandbox_id        TEXT NOT NULL,
    path              TEXT NOT NULL,
    expires_at        BIGINT NOT NULL
);
