-- The CA of each secrets lineage, shared by the fleet: a sandbox that moves to another node
-- (drain, a wake elsewhere, a fork placed there) meets the CA it trusts. The certificate
-- is public; the private key (PKCS#8 PEM) is sealed with the operator's master key like a
-- secret's value (`v1:` + hex nonce and ciphertext; the workspace, the lineage and the
-- certificate as associated data). Written once, by whichever node first needs it.
CREATE TABLE secret_lineages (
    lineage           TEXT PRIMARY KEY,
    workspace_id      TEXT NOT NULL,
    cert_pem          TEXT NOT NULL,
    key_sealed        TEXT NOT NULL,
    created_at        BIGINT NOT NULL
);

-- Garbage collection asks which sandboxes still hold a lineage.
CREATE INDEX sandbox_secrets_by_lineage ON sandbox_secrets(lineage);
