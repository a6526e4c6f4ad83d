-- The audiences a resource_server workload serves (space-separated URLs); empty for others.
ALTER TABLE workloads ADD COLUMN audiences TEXT NOT NULL DEFAULT '';

-- When a key started signing. NULL (and not retired) for the next key: published in the JWKS
-- before it signs anything, so verifiers know it ahead of the rotation that promotes it.
ALTER TABLE signing_keys ADD COLUMN activated_at INTEGER;
UPDATE signing_keys SET activated_at = created_at;
