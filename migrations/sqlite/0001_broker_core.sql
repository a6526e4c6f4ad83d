-- Broker core: workloads and their credentials, signing keys, tasks, leases, revocation feed.
-- Instants are milliseconds since the Unix epoch.

CREATE TABLE workloads (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    spiffe_id   TEXT NOT NULL UNIQUE,
    roles       TEXT NOT NULL,            -- space-separated role names
    created_at  INTEGER NOT NULL
);

CREATE TABLE workload_credentials (
    id             TEXT PRIMARY KEY,
    workload_id    TEXT NOT NULL REFERENCES workloads (id),
    secret_sha256  BLOB NOT NULL,
    created_at     INTEGER NOT NULL,
    revoked_at     INTEGER
);

CREATE TABLE signing_keys (
    kid                 TEXT PRIMARY KEY,
    algorithm           TEXT NOT NULL,
    public_key          BLOB NOT NULL,
    sealed_private_key  BLOB NOT NULL,    -- AES-256-GCM under the master key, bound to kid
    created_at          INTEGER NOT NULL,
    retired_at          INTEGER,          -- NULL for the key currently signing
    publish_until       INTEGER           -- a retired key stays in the JWKS until then
);

CREATE TABLE tasks (
    id               TEXT PRIMARY KEY,
    workload_id      TEXT NOT NULL REFERENCES workloads (id),
    purpose          TEXT NOT NULL,
    context_json     TEXT NOT NULL,
    state            TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    deadline         INTEGER NOT NULL,
    ended_at         INTEGER,
    lease_count      INTEGER NOT NULL,
    idempotency_key  TEXT,
    request_digest   TEXT,
    UNIQUE (workload_id, idempotency_key)
);
CREATE INDEX tasks_active_by_deadline ON tasks (deadline) WHERE state = 'active';

CREATE TABLE leases (
    id                TEXT PRIMARY KEY,   -- also the JWT jti
    task_id           TEXT NOT NULL REFERENCES tasks (id),
    scope             TEXT NOT NULL,
    kind              TEXT NOT NULL,
    audience          TEXT NOT NULL,
    state             TEXT NOT NULL,
    kid               TEXT,               -- key that signed the current token
    issued_at         INTEGER NOT NULL,   -- of the current token (changes on renewal)
    expires_at        INTEGER NOT NULL,
    renewable_until   INTEGER NOT NULL,
    ended_at          INTEGER
);
CREATE INDEX leases_by_task ON leases (task_id);
CREATE INDEX leases_issued_by_expiry ON leases (expires_at) WHERE state = 'issued';

-- The revocation feed. Sequence numbers come from feed_head inside the writing transaction,
-- so they are assigned in commit order and a reader never skips a later-committing event.
CREATE TABLE feed_head (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    last_seq  INTEGER NOT NULL
);
INSERT INTO feed_head (id, last_seq) VALUES (1, 0);

CREATE TABLE revocation_feed (
    seq          INTEGER PRIMARY KEY,
    lease_id     TEXT,                    -- NULL for a task-level event
    task_id      TEXT NOT NULL,
    scope        TEXT,
    audience     TEXT,
    reason       TEXT NOT NULL,
    not_after    INTEGER NOT NULL,
    occurred_at  INTEGER NOT NULL
);
