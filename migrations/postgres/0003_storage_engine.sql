-- Storage engine on sqlx's typed PgPool: no global lock row on the issuance or revocation path.
--
-- The revocation feed and the audit trail are ordered by the writing transaction's id
-- (`pg_current_xact_id()`) and are read only below the oldest transaction still running
-- (`pg_snapshot_xmin`): everything below it has committed or aborted, so that prefix never
-- changes and a reader never skips an event that commits late. Nothing takes a shared counter
-- row while it writes. The audit chain moves to an insert-only table, so sealing adds small
-- rows instead of rewriting every event.

ALTER TABLE tasks DROP COLUMN lease_count;

-- The feed: position = (tx_id, ordinal within the transaction's one append).
ALTER TABLE revocation_feed RENAME TO revocation_feed_numbered;
CREATE TABLE revocation_feed (
    tx_id        BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    ordinal      INTEGER NOT NULL,
    lease_id     TEXT,                    -- NULL for a task-level event
    task_id      TEXT NOT NULL,
    scope        TEXT,
    audience     TEXT,
    reason       TEXT NOT NULL,
    not_after    BIGINT NOT NULL,
    occurred_at  BIGINT NOT NULL,
    PRIMARY KEY (tx_id, ordinal)
);
-- Earlier events keep their order, below any real transaction id (which the migration's own
-- transaction already exceeds).
INSERT INTO revocation_feed (tx_id, ordinal, lease_id, task_id, scope, audience, reason, not_after, occurred_at)
SELECT 1 + (seq >> 20), (seq & 1048575)::integer, lease_id, task_id, scope, audience, reason, not_after, occurred_at
FROM revocation_feed_numbered;
DROP TABLE revocation_feed_numbered;
DROP TABLE feed_head;
CREATE INDEX revocation_feed_by_expiry ON revocation_feed (not_after);

-- The audit trail: events in (tx_id, pos) order; the chain beside them, insert-only.
CREATE TABLE audit_chain (
    seq        BIGINT PRIMARY KEY,
    event_id   TEXT NOT NULL UNIQUE,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
INSERT INTO audit_chain (seq, event_id, prev_hash, hash)
SELECT seq, id, prev_hash, hash FROM audit_events WHERE seq IS NOT NULL;

ALTER TABLE audit_events ADD COLUMN tx_id BIGINT NOT NULL DEFAULT 0;
ALTER TABLE audit_events ADD COLUMN pos BIGINT;
-- Sealed events keep their chain position; unsealed ones follow in id order.
UPDATE audit_events SET pos = seq WHERE seq IS NOT NULL;
UPDATE audit_events e SET pos = u.pos FROM (
    SELECT id, (SELECT COALESCE(MAX(seq), 0) FROM audit_events) + ROW_NUMBER() OVER (ORDER BY id) AS pos
    FROM audit_events WHERE seq IS NULL
) u WHERE e.id = u.id;
-- Positions only order the events of one transaction (transactions are ordered by tx_id), so
-- each connection may take them from a cache of its own instead of the shared sequence page.
CREATE SEQUENCE audit_events_pos_seq CACHE 64 OWNED BY audit_events.pos;
SELECT setval('audit_events_pos_seq', (SELECT COALESCE(MAX(pos), 0) + 1 FROM audit_events), false);
ALTER TABLE audit_events ALTER COLUMN pos SET DEFAULT nextval('audit_events_pos_seq');
ALTER TABLE audit_events ALTER COLUMN pos SET NOT NULL;
ALTER TABLE audit_events ALTER COLUMN tx_id SET DEFAULT (pg_current_xact_id()::text::bigint);
DROP INDEX audit_events_unsealed;
ALTER TABLE audit_events DROP COLUMN seq, DROP COLUMN prev_hash, DROP COLUMN hash;
CREATE UNIQUE INDEX audit_events_in_chain_order ON audit_events (tx_id, pos);

-- The sealer's position: the last sealed event's (tx_id, pos).
ALTER TABLE audit_head ADD COLUMN last_tx BIGINT NOT NULL DEFAULT 0;
ALTER TABLE audit_head ADD COLUMN last_pos BIGINT NOT NULL DEFAULT 0;
UPDATE audit_head SET last_pos = last_seq;

-- Work that must happen eventually, once at a time (see src/store/jobs.rs).
CREATE TABLE jobs (
    id             TEXT PRIMARY KEY,
    kind           TEXT NOT NULL,
    payload_json   TEXT NOT NULL,          -- never a secret in clear
    attempts       INTEGER NOT NULL DEFAULT 0,
    run_after      BIGINT NOT NULL,        -- not before (backoff after a failure)
    claim          TEXT,                   -- token of the runner's current claim
    claimed_until  BIGINT,                 -- the claim lapses then (its runner died)
    last_error     TEXT,
    created_at     BIGINT NOT NULL
);
CREATE INDEX jobs_by_due ON jobs (run_after);
