-- CA rotation with overlap. A CA signs from activated_at on (a rotation may set it in the
-- future, so bundle consumers learn the new root before any SVID chains to it); the newest CA
-- whose activation has passed is the signer. A retired CA stays in the trust bundle until
-- publish_until, when every SVID it signed has expired; NULL while it is not retired.
ALTER TABLE ca_keys ADD COLUMN activated_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE ca_keys ADD COLUMN publish_until BIGINT;
UPDATE ca_keys SET activated_at = created_at;
