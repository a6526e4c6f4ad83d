-- Audit trail. Events are written unsealed (seq, prev_hash, hash NULL) in the transaction of the
-- action they record; the sealer later numbers them and links each to its predecessor's hash.
-- Instants are milliseconds since the Unix epoch.

CREATE TABLE audit_events (
    id            TEXT PRIMARY KEY,     -- time-ordered: the order events are sealed in
    seq           INTEGER UNIQUE,       -- position in the chain, set when sealed
    occurred_at   INTEGER NOT NULL,
    event_type    TEXT NOT NULL,
    outcome       TEXT NOT NULL,
    actor         TEXT NOT NULL,        -- who caused it: a workload name, or warrant/<component>
    workload      TEXT,                 -- the workload the event concerns (the task's owner)
    task_id       TEXT,
    scope         TEXT,
    lease_id      TEXT,
    detail_json   TEXT NOT NULL,        -- reason, policy, HMACs of secrets: never a secret
    context_json  TEXT,                 -- the task's context: prompt digest, planned tools, labels
    prev_hash     TEXT,
    hash          TEXT
);
CREATE INDEX audit_events_unsealed ON audit_events (id) WHERE seq IS NULL;
CREATE INDEX audit_events_by_task ON audit_events (task_id);
CREATE INDEX audit_events_by_time ON audit_events (occurred_at);

CREATE TABLE audit_head (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    last_seq   INTEGER NOT NULL,
    last_hash  TEXT NOT NULL
);
INSERT INTO audit_head (id, last_seq, last_hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Signed statements "the chain had head_hash at seq", made periodically with the signing key.
CREATE TABLE audit_checkpoints (
    seq         INTEGER PRIMARY KEY,
    head_hash   TEXT NOT NULL,
    kid         TEXT NOT NULL,
    signature   BLOB NOT NULL,
    created_at  INTEGER NOT NULL
);
