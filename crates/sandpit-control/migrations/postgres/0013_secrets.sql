-- Workspace secrets (`/v1/secrets`): values sealed with the operator's master key
-- (AES-256-GCM; `sealed` is `v1:` + hex nonce and ciphertext), never stored in clear.
CREATE TABLE secrets (
    workspace_id      TEXT NOT NULL,
    name              TEXT NOT NULL,
    sealed            TEXT NOT NULL,
    -- JSON array of normalized host patterns.
    hosts             TEXT NOT NULL,
    -- JSON object: where the value goes (`SecretInject`).
    inject            TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, name)
);

-- The secrets a sandbox holds: its lineage (whose CA it trusts; a fork keeps its parent's)
-- and, as a JSON object, the placeholder of each secret name.
CREATE TABLE sandbox_secrets (
    sandbox_id        TEXT PRIMARY KEY,
    workspace_id      TEXT NOT NULL,
    lineage           TEXT NOT NULL,
    placeholders      TEXT NOT NULL
);
