-- How many times a lease's credential has been accepted, for credentials limited in uses (a
-- tool call's token is accepted once). A row appears with the first use; counting happens in
-- the statement that checks the limit, so two replicas never both accept the last use.
CREATE TABLE lease_uses (
    lease_id TEXT PRIMARY KEY REFERENCES leases (id),
    uses INTEGER NOT NULL,
    last_used_at INTEGER NOT NULL
);
