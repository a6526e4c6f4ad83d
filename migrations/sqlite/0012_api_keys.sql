-- The SHA-256 of the secret part of a lease's API key (kind api_key), written when the key is
-- handed out, once; the key itself is never stored.
ALTER TABLE leases ADD COLUMN secret_sha256 BLOB;
