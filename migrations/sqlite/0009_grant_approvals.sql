-- Grant requests that policy answered with a step-up: they wait for a quorum of operators.
-- The id is the lease id the grant receives when the quorum approves, so an agent follows one
-- id from its request to its credential. request_digest binds every approval to the exact
-- request (task, scope, TTL, context, risk); detail_json is what operators see to judge it.
CREATE TABLE grant_requests (
    id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL REFERENCES tasks (id),
    workload_id TEXT NOT NULL,
    workload_name TEXT NOT NULL,
    scope TEXT NOT NULL,
    ttl_seconds INTEGER NOT NULL,
    request_digest TEXT NOT NULL,
    detail_json TEXT NOT NULL,
    quorum INTEGER NOT NULL,
    approver_labels_json TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    wait_until INTEGER NOT NULL,
    decided_at INTEGER,
    reason TEXT
);
CREATE INDEX grant_requests_by_state ON grant_requests (state, id);
CREATE INDEX grant_requests_by_task ON grant_requests (task_id);
CREATE INDEX grant_requests_by_workload ON grant_requests (workload_id, state);

-- One row per operator and request: a second approval by the same operator counts once.
CREATE TABLE grant_approvals (
    request_id TEXT NOT NULL REFERENCES grant_requests (id),
    approver_id TEXT NOT NULL,
    approver_name TEXT NOT NULL,
    verdict TEXT NOT NULL,
    reason TEXT NOT NULL,
    decided_at INTEGER NOT NULL,
    PRIMARY KEY (request_id, approver_id)
);
