-- Workload identity: the X.509 CA that signs SVIDs, one-time join tokens, and every SVID issued.

-- The CA. Its private key is sealed under the master key (AES-256-GCM, bound to the id); the
-- oldest unretired row signs.
CREATE TABLE ca_keys (
    id                  TEXT PRIMARY KEY,
    certificate         BYTEA NOT NULL,   -- DER
    sealed_private_key  BYTEA NOT NULL,
    created_at          BIGINT NOT NULL,
    expires_at          BIGINT NOT NULL
);

-- One-time bootstrap tokens bound to a workload; only the SHA-256 of the secret is kept.
CREATE TABLE join_tokens (
    id             TEXT PRIMARY KEY,
    workload_id    TEXT NOT NULL REFERENCES workloads (id),
    secret_sha256  BYTEA NOT NULL,
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    consumed_at    BIGINT,
    revoked_at     BIGINT
);

-- Every X.509-SVID handed out, by the SHA-256 of its DER (its RFC 8705 thumbprint). A caller
-- presenting a certificate is authenticated by this row, so revoking it stops the certificate.
CREATE TABLE svids (
    thumbprint   TEXT PRIMARY KEY,
    workload_id  TEXT NOT NULL REFERENCES workloads (id),
    serial       TEXT NOT NULL,
    issued_at    BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    revoked_at   BIGINT
);
CREATE INDEX svids_by_workload ON svids (workload_id);

-- What a workload must prove to the `unix` attestor (space-separated `kind:name:value`,
-- sorted); empty for a workload that attests only with join tokens. No two share a set.
ALTER TABLE workloads ADD COLUMN selectors TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX workloads_by_selectors ON workloads (selectors) WHERE selectors <> '';

-- When the kill switch ended the workload's identity: from then on nothing authenticates or
-- attests as it (NULL while it is in force).
ALTER TABLE workloads ADD COLUMN revoked_at BIGINT;
