-- Storage engine on rusqlite: the durable job queue; revocation-feed events found by expiry
-- (introspection's in-memory state is loaded from those whose tokens may still be valid); and
-- tasks no longer keep a lease counter nothing read.

ALTER TABLE tasks DROP COLUMN lease_count;

CREATE INDEX revocation_feed_by_expiry ON revocation_feed (not_after);

-- Work that must happen eventually, once at a time (see src/store/jobs.rs).
CREATE TABLE jobs (
    id             TEXT PRIMARY KEY,
    kind           TEXT NOT NULL,
    payload_json   TEXT NOT NULL,          -- never a secret in clear
    attempts       INTEGER NOT NULL DEFAULT 0,
    run_after      INTEGER NOT NULL,       -- not before (backoff after a failure)
    claim          TEXT,                   -- token of the runner's current claim
    claimed_until  INTEGER,                -- the claim lapses then (its runner died)
    last_error     TEXT,
    created_at     INTEGER NOT NULL
);
CREATE INDEX jobs_by_due ON jobs (run_after);
