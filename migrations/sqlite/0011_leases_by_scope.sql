-- Revoking by scope (Admin.Revoke with a scope) finds the scope's issued leases without reading
-- every lease ever issued.
CREATE INDEX leases_issued_by_scope ON leases (scope) WHERE state = 'issued';
