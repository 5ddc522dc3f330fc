-- E2B compatibility: what the E2B API shows of a sandbox beyond Sandpit's own row, and the
-- envd access tokens the SDK presents (`X-Access-Token`), SHA-256 hashes only.
CREATE TABLE e2b_sandboxes (
    sandbox_id        TEXT PRIMARY KEY,
    workspace_id      TEXT NOT NULL,
    -- The templateID the client asked for.
    template_id       TEXT NOT NULL
);

-- One per create or connect (a connect hands a token to a client that holds none); the
-- oldest go past a small number per sandbox.
CREATE TABLE e2b_envd_tokens (
    token_hash        TEXT PRIMARY KEY,
    sandbox_id        TEXT NOT NULL,
    created_at        BIGINT NOT NULL
);

CREATE INDEX e2b_envd_tokens_by_sandbox ON e2b_envd_tokens(sandbox_id);
