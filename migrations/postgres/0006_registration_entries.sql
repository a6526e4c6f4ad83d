-- Registration entries carry labels for policy, and can be deleted.

-- Labels an admin attached for policy to read, as a JSON object of strings.
ALTER TABLE workloads ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';

-- When the entry was deleted: its identity is revoked, its selectors are released, and it is
-- no longer listed. Its name and SPIFFE ID stay reserved, so that the audit trail never names
-- two different workloads alike.
ALTER TABLE workloads ADD COLUMN deleted_at BIGINT;
