-- Organizations own workspaces; workspaces own tokens and sandboxes.
-- Times are Unix milliseconds.
CREATE TABLE orgs (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE workspaces (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs(id),
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

-- Only the SHA-256 of a token is stored; the token itself is shown once.
CREATE TABLE api_tokens (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    token_hash    TEXT NOT NULL UNIQUE,
    description   TEXT,
    scopes        TEXT NOT NULL,
    expires_at    INTEGER,
    created_at    INTEGER NOT NULL
);

-- workspace_id NULL: a built-in template every workspace can use.
CREATE TABLE templates (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    workspace_id    TEXT REFERENCES workspaces(id),
    description     TEXT NOT NULL,
    rootfs          TEXT NOT NULL,
    default_egress  TEXT NOT NULL,
    created_at      INTEGER NOT NULL
);

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
    timeout_ms        INTEGER,
    idle_timeout_ms   INTEGER,
    expires_at        INTEGER,
    last_active_at    INTEGER NOT NULL,
    slot              INTEGER UNIQUE,
    runtime_id        TEXT NOT NULL UNIQUE,
    error             TEXT,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);

CREATE INDEX sandboxes_by_workspace ON sandboxes(workspace_id, status);
CREATE INDEX sandboxes_by_status ON sandboxes(status);
